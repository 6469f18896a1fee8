"""Exit-frontier benchmark: how long the training job takes to compute a chain's exit trade-off.

Run: `python benchmarks/exit_frontier.py [--samples 10000] [--levels 1000] [--tiers 3] [--repeats 3]`

A synthetic chain (exits that get better up the chain, over-confident softmax outputs) on a validation
and a test split of --samples each. Prints, for the chain entered at its lowest tier:
  1. the frontier computation (every limit vector of levels^(tiers-1), Pareto filter): CPU and wall time,
     best of --repeats; the issue's target is under 2 s for 3 tiers x 10,000 samples x 1,000 levels;
  2. baseline, same process: routing every sample for 1,000 limit vectors directly (`evaluate_limits`),
     extrapolated to the whole grid, and the ratio;
  3. the whole record (a frontier per entry tier, test split re-evaluated): time, points, JSON size;
  4. the decider's side (pure Python): parsing the record and choosing limits for a target.
The machine is shared by the whole team: wall time is noisy, CPU time less so.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from tierflow.streams import exits
from tierflow.tiers import calibration, frontier

T = TypeVar("T")


def timed(fn: Callable[[], T], repeats: int) -> tuple[T, float, float]:
    """The result, and the best CPU and wall seconds over `repeats` runs."""
    best_cpu = best_wall = float("inf")
    result: Any = None
    for _ in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        result = fn()
        best_cpu = min(best_cpu, time.process_time() - cpu)
        best_wall = min(best_wall, time.perf_counter() - wall)
    return result, best_cpu, best_wall


def synthetic_split(rng: np.random.Generator, n: int, tiers: int, classes: int = 10
                    ) -> tuple[list[npt.NDArray[np.float64]], npt.NDArray[np.int64]]:
    y = rng.integers(0, classes, n)
    probs = []
    for k in range(tiers):
        z = rng.normal(0.0, 1.0, (n, classes))
        z[np.arange(n), y] += 1.5 + 2.0 * k / max(tiers - 1, 1)
        e = np.exp(2.0 * z)  # x2: over-confident, so calibration has work to do
        probs.append(e / e.sum(axis=1, keepdims=True))
    return probs, y.astype(np.int64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--levels", type=int, default=frontier.LEVELS)
    ap.add_argument("--tiers", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    val, y = synthetic_split(rng, args.samples, args.tiers)
    test, ty = synthetic_split(rng, args.samples, args.tiers)
    costs = [1e-4 * 3**k for k in range(args.tiers)]
    print(f"chain: {args.tiers} tiers, {args.samples} validation + {args.samples} test samples, "
          f"{args.levels} candidate limits per tier (machine shared: wall times are noisy)")

    cals, cpu, wall = timed(lambda: calibration.calibrate_exits(val, y, test, ty), 1)
    temps = [c.temperature for c in cals]
    print(f"calibration:  {cpu:.3f} s CPU, {wall:.3f} s wall; T = {', '.join(f'{t:.2f}' for t in temps)}; "
          f"test ECE {', '.join(f'{c.ece_before:.3f}->{c.ece_after:.3f}' for c in cals)}")

    outputs = [frontier.exit_outputs(p, t) for p, t in zip(val, temps, strict=True)]
    f, cpu, wall = timed(lambda: frontier.compute_frontier(outputs, y, costs, levels=args.levels), args.repeats)
    grid = int(np.prod(f.levels))
    print(f"frontier:     {cpu:.3f} s CPU, {wall:.3f} s wall (best of {args.repeats}) for {grid:,} limit vectors "
          f"({' x '.join(map(str, f.levels))}); {len(f.limits)} Pareto points kept (target: < 2 s)")

    sample = f.limits[np.linspace(0, len(f.limits) - 1, min(1000, len(f.limits))).astype(int)]
    _, base_cpu, _ = timed(lambda: frontier.evaluate_limits(outputs, y, sample), 1)
    direct = base_cpu / len(sample) * grid
    print(f"baseline:     direct routing, {len(sample)} vectors in {base_cpu:.3f} s CPU -> {direct:.1f} s for the "
          f"grid; the rank histograms are {direct / max(cpu, 1e-9):.0f}x faster")

    record, cpu, wall = timed(lambda: frontier.build_frontier_record(
        val, y, temps, costs, test_probs=test, test_labels=ty, levels=args.levels), 1)
    text = json.dumps(record)
    bare = json.dumps({**record, "entries": [{**e, "test": None} for e in record["entries"]]})
    points = [len(e["limits"]) for e in record["entries"]]
    print(f"record:       {cpu:.3f} s CPU, {wall:.3f} s wall for every entry + the test split; points per entry "
          f"{points}; {len(text) / 1e3:.0f} kB JSON ({len(bare) / 1e3:.0f} kB without the test split)")

    parsed, cpu, _ = timed(lambda: exits.parse_frontier(json.loads(text)), args.repeats)
    print(f"decider:      parse + check the record {cpu * 1e3:.0f} ms CPU")
    for target in ({"max_accuracy_drop": 0.01}, {"min_accuracy": 0.9}, {"max_top_share": 0.2},
                   {"min_accuracy": 0.999}):
        exits.binomial_upper.cache_clear()
        exits.binomial_lower.cache_clear()
        goal = exits.parse_target(target)
        cpu = time.process_time()
        try:
            choice = exits.choose_limits(parsed, goal)
            outcome = (f"limits {choice.limits}, shares {[round(s, 3) for s in choice.shares]}, accuracy "
                       f"{choice.accuracy:.4f} (top alone {choice.top_accuracy:.4f})")
        except exits.ExitsError as e:
            outcome = f"refused: {type(e).__name__}: {e}"
        cpu = time.process_time() - cpu
        print(f"  {json.dumps(target)}: {cpu * 1e3:.0f} ms CPU; {outcome}")


if __name__ == "__main__":
    main()
