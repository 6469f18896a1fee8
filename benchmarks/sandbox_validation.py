"""Benchmark: model-code validation with the sandbox's isolation against the same pool without it.

Run by hand (`python benchmarks/sandbox_validation.py [--runs 10]`); prints, all measured in this run on this
machine:

* warm: one validation at a time with a ready sandbox waiting, p50/p90, for the isolated pool
  (TIERFLOW_SANDBOX_ISOLATION=bwrap: namespaces, unprivileged user, per-validation pid namespace), for the
  cluster-mode level (landlock: Landlock and seccomp, no namespaces) and for a pool with isolation "none" (the
  same zygote and runners, no confinement), and each isolated level's ratio to "none" (target: within 1.5x);
* burst: 10 distinct small models (Kafka-ML style fixtures at other widths) validated back to back without
  waiting for the pool to refill, each latency (target: each <= 1 s, issue 12);
* memory: the proportional set size of the isolated pool's whole process tree when idle and warm
  (target: <= 2 GiB);
* CPU seconds this process and the sandboxes used, since wall times are noisy on a shared machine.

Sandbox settings come from the environment (TIERFLOW_SANDBOX_*, see streams/settings.py); `--pool-size`
overrides the pool size.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from tierflow.streams.settings import SandboxSettings, Settings
from tierflow.tiers.sandbox import SandboxPool

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "kafka_ml_models"
NAMES = ("edge", "fog", "cloud", "single")
TARGET_RATIO = 1.5
TARGET_BURST_S = 1.0
TARGET_MEMORY_BYTES = 2 * 1024**3


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (no interpolation: honest for ~10 samples)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def report(label: str, seconds: Sequence[float]) -> float:
    p50, p90 = percentile(seconds, 0.5), percentile(seconds, 0.9)
    print(f"{label:<16} n={len(seconds):<3} p50 {p50 * 1000:8.1f} ms   p90 {p90 * 1000:8.1f} ms   "
          f"min {min(seconds) * 1000:8.1f} ms   max {max(seconds) * 1000:8.1f} ms")
    return p50


def distinct_models(count: int) -> list[str]:
    """`count` different small models: the fog fixture with its hidden layer at other widths."""
    fog = (FIXTURES / "fog.py").read_text()
    return [fog.replace("Dense(64,", f"Dense({8 + 4 * i},") for i in range(count)]


def children_cpu_s() -> float:
    times = os.times()
    return times.children_user + times.children_system


async def warm(settings: SandboxSettings, snippets: Sequence[str], runs: int) -> list[float]:
    """One validation at a time, each with a ready sandbox waiting."""
    timings = []
    async with SandboxPool(settings) as pool:
        for i in range(runs):
            await pool.wait_warm()
            started = time.perf_counter()
            await pool.validate(snippets[i % len(snippets)])
            timings.append(time.perf_counter() - started)
    return timings


async def burst_and_memory(settings: SandboxSettings, count: int) -> tuple[list[float], int, int]:
    """(latency of each of `count` distinct models sent back to back, idle PSS before, idle PSS after)."""
    timings = []
    async with SandboxPool(settings) as pool:
        await pool.wait_warm()
        idle_before = pool.memory_bytes()
        for code in distinct_models(count):
            started = time.perf_counter()
            await pool.validate(code)
            timings.append(time.perf_counter() - started)
        await pool.wait_warm()
        idle_after = pool.memory_bytes()
    return timings, idle_before, idle_after


async def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=10, help="warm validations per isolation level (default 10)")
    parser.add_argument("--burst", type=int, default=10, help="distinct models in the burst (default 10)")
    parser.add_argument("--pool-size", type=int, default=None, help="warm pool size (default: settings)")
    args = parser.parse_args(argv)
    settings = Settings.from_env().sandbox
    if args.pool_size is not None:
        settings = replace(settings, pool_size=args.pool_size)
    isolated, bare = replace(settings, isolation="bwrap"), replace(settings, isolation="none")
    landlock = replace(settings, isolation="landlock")
    snippets = [(FIXTURES / f"{name}.py").read_text() for name in NAMES]

    print(f"sandbox validation: {args.runs} warm runs per level, burst of {args.burst}, pool_size "
          f"{settings.pool_size}, {os.cpu_count()} CPUs; wall times are noisy on a shared machine")
    cpu_started, children_started = time.process_time(), children_cpu_s()
    # Interleave the two levels twice so a change in the machine's load hits both alike.
    half = max(1, args.runs // 2)
    isolated_s = await warm(isolated, snippets, half)
    landlock_s = await warm(landlock, snippets, half)
    bare_s = await warm(bare, snippets, half)
    isolated_s += await warm(isolated, snippets, args.runs - half)
    landlock_s += await warm(landlock, snippets, args.runs - half)
    bare_s += await warm(bare, snippets, args.runs - half)
    burst_s, idle_before, idle_after = await burst_and_memory(isolated, args.burst)

    isolated_p50 = report("warm, bwrap", isolated_s)
    landlock_p50 = report("warm, landlock", landlock_s)
    bare_p50 = report("warm, none", bare_s)
    for level, p50 in (("bwrap", isolated_p50), ("landlock", landlock_p50)):
        ratio = p50 / bare_p50
        print(f"ratio {level}/none p50: {ratio:.2f}x ({'within' if ratio <= TARGET_RATIO else 'OVER'} the "
              f"{TARGET_RATIO:g}x target)")
    report("burst, bwrap", burst_s)
    print("burst latencies: " + ", ".join(f"{s * 1000:.0f}" for s in burst_s) + " ms "
          f"({'each within' if max(burst_s) <= TARGET_BURST_S else 'OVER'} the {TARGET_BURST_S:g} s target)")
    worst = max(idle_before, idle_after)
    print(f"pool memory (PSS of its whole tree, idle and warm): {idle_before / 2**20:.0f} MiB before the burst, "
          f"{idle_after / 2**20:.0f} MiB after ({'within' if worst <= TARGET_MEMORY_BYTES else 'OVER'} the "
          f"{TARGET_MEMORY_BYTES / 2**30:g} GiB target)")
    print(f"CPU: this process {time.process_time() - cpu_started:.1f} s, sandboxes "
          f"{children_cpu_s() - children_started:.1f} s (reaped children only)")


if __name__ == "__main__":
    asyncio.run(main())
