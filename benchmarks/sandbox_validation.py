"""Benchmark: validating model code in a cold sandbox vs a warm `SandboxPool`.

Run by hand (`python benchmarks/sandbox_validation.py [--runs 10]`); prints p50/p90 latencies and ratios,
all measured in this run on this machine:

* cold: start a child, import TensorFlow, validate one snippet, stop (what a pool-less design would pay);
* warm: validate with a ready child waiting (what the API pays when requests are spaced out);
* back-to-back: validations issued one after another without waiting for the pool to refill (sustained
  rate; bounded by how fast fresh children import TensorFlow).

Target: warm p50 <= 1 s on a 2-core machine. Sandbox settings come from the environment
(TIERFLOW_SANDBOX_*, see streams/settings.py); `--pool-size` overrides the pool size.
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
TARGET_WARM_P50_S = 1.0


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (no interpolation: honest for ~10 samples)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def report(label: str, seconds: Sequence[float]) -> tuple[float, float]:
    p50, p90 = percentile(seconds, 0.5), percentile(seconds, 0.9)
    print(f"{label:<13} n={len(seconds):<3} p50 {p50 * 1000:8.1f} ms   p90 {p90 * 1000:8.1f} ms   "
          f"min {min(seconds) * 1000:8.1f} ms   max {max(seconds) * 1000:8.1f} ms")
    return p50, p90


async def cold(settings: SandboxSettings, snippets: Sequence[str], runs: int) -> list[float]:
    timings = []
    for i in range(runs):
        started = time.perf_counter()
        async with SandboxPool(replace(settings, pool_size=1)) as pool:
            await pool.validate(snippets[i % len(snippets)])
        timings.append(time.perf_counter() - started)
    return timings


async def warm(settings: SandboxSettings, snippets: Sequence[str], runs: int) -> tuple[list[float], list[float]]:
    spaced, back_to_back = [], []
    async with SandboxPool(settings) as pool:
        for i in range(runs):
            await pool.wait_warm()
            started = time.perf_counter()
            await pool.validate(snippets[i % len(snippets)])
            spaced.append(time.perf_counter() - started)
        await pool.wait_warm()
        for i in range(runs):
            started = time.perf_counter()
            await pool.validate(snippets[i % len(snippets)])
            back_to_back.append(time.perf_counter() - started)
    return spaced, back_to_back


async def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=10, help="validations per mode (default 10)")
    parser.add_argument("--pool-size", type=int, default=None, help="warm pool size (default: settings)")
    args = parser.parse_args(argv)
    settings = Settings.from_env().sandbox
    if args.pool_size is not None:
        settings = replace(settings, pool_size=args.pool_size)
    snippets = [(FIXTURES / f"{name}.py").read_text() for name in ("edge", "fog", "cloud", "single")]

    print(f"sandbox validation: {args.runs} runs per mode, pool_size {settings.pool_size}, "
          f"{os.cpu_count()} CPUs, fixtures from {FIXTURES}")
    cold_s = await cold(settings, snippets, args.runs)
    warm_s, burst_s = await warm(settings, snippets, args.runs)
    cold_p50, cold_p90 = report("cold", cold_s)
    warm_p50, warm_p90 = report("warm", warm_s)
    burst_p50, _ = report("back-to-back", burst_s)
    print(f"ratio cold/warm: p50 {cold_p50 / warm_p50:.1f}x   p90 {cold_p90 / warm_p90:.1f}x")
    print(f"ratio back-to-back/warm p50: {burst_p50 / warm_p50:.1f}x (refill-bound when requests arrive "
          "faster than children start)")
    verdict = "meets" if warm_p50 <= TARGET_WARM_P50_S else "MISSES"
    print(f"warm p50 {warm_p50 * 1000:.1f} ms {verdict} the {TARGET_WARM_P50_S:g} s target")


if __name__ == "__main__":
    asyncio.run(main())
