"""The exit trade-off of a chain: which limit vectors are worth serving, and what each one costs and keeps.

Called by the training job once a chain has trained and its exits are calibrated (tiers/calibration.py):
`build_frontier_record` turns the validation split's per-exit probabilities into the JSON record that travels
in the training-result event and that the decider reads (streams/exits.py parses it and chooses limits from
a target); the same limit vectors are evaluated again on the test split (`evaluate_limits`), reported beside.

**The cascade.** A chain of K sub-models (tier 0 = the entry, tier K-1 = the top). Tier k < K-1 answers a
sample that reached it when its calibrated confidence `max(softmax(log p / T_k)) >= limit_k`, else forwards
it; the top answers what is left. A *point* is one limit vector (one limit per non-top tier). For each
point, over the N samples of a split: how many each tier answers and gets right; how many of a non-top
tier's answers agree with the top exit's class (the drift signal watches that live); b = samples the top
alone gets right and the cascade wrong, c = the reverse (the paired disagreements the decider bounds:
cascade accuracy = top accuracy - (b - c) / N); the expected compute per input = (1/N) * sum over samples
of the costs of the tiers it passes through = sum_k cost_k * reach_k / N, reach_k = samples reaching tier k.

**Candidate limits.** Per non-top tier, `levels` candidates (1,000 by default, both ends included): 0
(answer everything), `NEVER` (> 1: answer nothing) and cuts at equally spaced quantiles of the tier's
confidences on the split. A cut between two neighbouring distinct confidences u < v is the shortest decimal
in the middle half of (u, v] (short in JSON, and a margin on both sides, so that a tier recomputing the
confidence with other rounding separates the same samples). When the split has fewer distinct confidences
than cuts, every gap between them is a cut: the search is then exhaustive, since no other limit answers a
different set of samples.

**The fast evaluation (O(N + L^(K-1)) per quantity, no loop over points x samples).** Each sample's rank
on tier k, r_k = number of candidates <= its confidence, says at which candidate indices it is answered
(j < r_k). Tier k answers the sample at the index vector j iff r_m <= j_m for every m < k and r_k > j_k,
so its counts over all index vectors are one histogram of (r_0 .. r_k), weighted by the quantity, followed
by prefix sums along axes 0..k-1 and a suffix sum along axis k. With L = 1,000 and K = 3 the full grid is
10^6 points. For K > 3 the grid would be L^(K-1): the number of candidates per tier is lowered to the
largest L with L^(K-1) <= `MAX_GRID` (10^6: 100 per tier for K = 4, 31 for K = 5) and the record says how
many were searched (`levels`). A chain of one tier (K = 1, or an entry at the top) has nothing to trade: its
frontier is the single point with no limits, where the top answers everything.

**What is stored (the Pareto points).** A point is kept when no other point is at least as cheap and at
least as accurate (cascade accuracy = correct answers). "Cheap" is measured K-1 ways and the union kept:
by the expected compute with the measured per-tier costs, and by the share reaching tier k (k = 1..K-1,
the last one being the top share). Why: the decider may override the costs (the trainer's CPU is not the
device's), and any override's expected compute is a positive mix of the reach shares, so each reach's own
frontier holds the best points for the extreme mixes and the measured frontier the ones for the measured
mix; for K = 2 the one reach frontier is exact for every cost, and the top-share frontier is exactly what a
`max_top_share` target needs. Among points equal on both objectives the one with the fewest disagreements
with the top exit (smallest b) is preferred: it has the tightest bound (after a first pass that drops every
point beaten along one grid axis, which may already have settled such a tie).

Each objective's frontier is then thinned (`_thin`) to the points that move at least 1/`MAX_POINTS` of its
range in cost or in accuracy from the last one kept (both ends always kept): at N = 10,000 a step is a few
samples of accuracy, far below the width of the decider's 90% bounds. Measured (benchmarks/exit_frontier.py,
N = 10,000 validation + 10,000 test samples): a 3-tier chain's record holds ~1,450 + ~470 + 1 points
(entries 0, 1, 2) and is ~250 kB of JSON with the test split (~145 kB without); a 4-tier chain's ~400 kB,
a 5-tier chain's ~470 kB.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from tierflow.tiers.calibration import EPS, Labels, Probs, calibrated_confidence

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]

#: Version of the record `build_frontier_record` writes (streams/exits.py reads it).
RECORD_VERSION = 1
#: A limit above 1 answers nothing: no confidence exceeds 1.
NEVER = 1.01
#: Candidate limits per non-top tier, both ends included.
LEVELS = 1000
#: The most limit vectors one frontier evaluates (levels per tier are lowered for long chains to fit).
MAX_GRID = 1_000_000
#: Thinning budget of each objective's frontier (see `_thin`) for chains of up to 3 tiers; a longer chain has
#: more objectives and gets 2 * MAX_POINTS / (tiers - 1) each, so an entry stays at ~1,000-1,500 points.
MAX_POINTS = 500
#: Points of one chunk of `evaluate_limits` (bounds its memory to ~chunk x N x 8 bytes per mask).
_CHUNK_CELLS = 4_000_000


@dataclass(frozen=True)
class ExitOutputs:
    """One exit's outputs on a split: its calibrated confidence and its class, per sample."""

    confidence: Floats
    prediction: Ints


def exit_outputs(probs: Probs, temperature: float, eps: float = EPS) -> ExitOutputs:
    p = np.asarray(probs)
    return ExitOutputs(calibrated_confidence(p, temperature, eps), np.asarray(p.argmax(axis=1), dtype=np.int64))


@dataclass(frozen=True)
class PointStats:
    """The counts of P points of one entry's chain (K tiers) on one split of N samples."""

    n: int
    top_correct: int  # samples the top exit alone gets right
    answered: Ints  # (P, K): samples each tier answers
    correct: Ints  # (P, K): ... and gets right
    agreeing: Ints  # (P, K-1): ... of a non-top tier's answers, those with the top exit's class
    b: Ints  # (P,): top right, cascade wrong
    c: Ints  # (P,): top wrong, cascade right

    def expected_cost(self, costs: Sequence[float]) -> Floats:
        """Expected compute per input (seconds) of each point with these per-tier costs per sample."""
        reach = self.n - np.concatenate([np.zeros((len(self.b), 1), np.int64),
                                         np.cumsum(self.answered[:, :-1], axis=1)], axis=1)
        out: Floats = reach @ np.asarray(costs, dtype=np.float64) / max(self.n, 1)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "top_correct": self.top_correct, "answered": self.answered.tolist(),
                "correct": self.correct.tolist(), "agreeing": self.agreeing.tolist(), "b": self.b.tolist(),
                "c": self.c.tolist()}


@dataclass(frozen=True)
class Frontier:
    """The Pareto points of the chain entered at tier `entry`: their limits and their counts on a split."""

    entry: int
    levels: list[int]  # candidates searched per non-top tier
    limits: Floats  # (P, K-1)
    stats: PointStats


# -- candidate limits ----------------------------------------------------------------------------------------


def _short_between(lo: Floats, hi: Floats) -> Floats:
    """Per pair, the shortest decimal x with lo < x <= hi, preferring the middle half of (lo, hi]."""
    out = hi.copy()
    todo = np.ones(len(lo), dtype=bool)
    a, b = lo + (hi - lo) / 4, hi - (hi - lo) / 4
    mid = (lo + hi) / 2
    for digits in range(1, 18):
        r = np.round(mid, digits)
        ok = todo & (r >= a) & (r <= b) & (r > lo) & (r <= hi)
        out[ok] = r[ok]
        todo &= ~ok
        if not todo.any():
            break
    return out


def candidate_limits(confidence: Floats, levels: int = LEVELS) -> Floats:
    """Ascending candidate limits of one tier: 0, cuts between its distinct confidences at equally spaced
    quantiles (all of them when there are fewer than `levels - 2`), and `NEVER`."""
    if levels < 2:
        raise ValueError("a tier needs at least 2 candidate limits (answer all, answer none)")
    conf = np.sort(np.asarray(confidence, dtype=np.float64))
    u = np.unique(conf)
    n_cuts = min(levels - 2, max(len(u) - 1, 0))
    if n_cuts == len(u) - 1:
        cuts = np.arange(1, len(u))
    else:
        # A cut at index i answers confidences >= u[i]; the quantile positions in the sorted sample give
        # cuts spaced by samples, and ties may merge some, so the rest are spread evenly over the gaps left.
        pos = np.round(np.linspace(0, len(conf), levels)[1:-1]).astype(np.int64).clip(0, len(conf) - 1)
        cuts = np.unique(np.searchsorted(u, conf[pos]))
        cuts = cuts[cuts >= 1]
        if len(cuts) < n_cuts:
            rest = np.setdiff1d(np.arange(1, len(u)), cuts)
            pick = np.round(np.linspace(0, len(rest) - 1, n_cuts - len(cuts))).astype(np.int64)
            cuts = np.union1d(cuts, rest[pick])
        cuts = cuts[:n_cuts] if len(cuts) > n_cuts else cuts
    inner = _short_between(u[cuts - 1], u[cuts]) if len(cuts) else np.zeros(0)
    return np.concatenate([[0.0], inner, [NEVER]])


def levels_for(n_limited: int, levels: int = LEVELS, max_grid: int = MAX_GRID) -> int:
    """Candidates per non-top tier for a chain with `n_limited` non-top tiers: `levels`, lowered so that
    levels ** n_limited <= max_grid (never below 2)."""
    if n_limited <= 1:
        return levels
    fit: int = math.floor(float(max_grid) ** (1.0 / n_limited))
    while (fit + 1) ** n_limited <= max_grid:
        fit += 1
    while fit > 2 and fit**n_limited > max_grid:
        fit -= 1
    return max(2, min(levels, fit))


# -- the grid --------------------------------------------------------------------------------------------------


def _tier_counts(ranks: Sequence[Ints], sizes: Sequence[int], weights: Sequence[Floats | None],
                 answered_at_last: bool) -> list[Floats]:
    """For each weight, the weighted count of samples with r_m <= j_m on every axis but the last, and on
    the last r > j (a tier answering) or r <= j (passing it, for the top), over all index vectors j."""
    dims = tuple(s + 1 for s in sizes)  # a rank runs over 0..L
    flat = np.ravel_multi_index(tuple(ranks), dims)
    size = int(np.prod(dims))
    last = len(sizes) - 1
    out = []
    for w in weights:
        h = np.bincount(flat, weights=w, minlength=size).astype(np.float64, copy=False).reshape(dims)
        for axis in range(last):
            h = np.cumsum(h, axis=axis)
        if answered_at_last:  # the sum over r > j is the suffix sum from j + 1
            h = np.flip(np.cumsum(np.flip(h, last), axis=last), last)
            window = tuple([slice(0, n) for n in sizes[:-1]] + [slice(1, sizes[-1] + 1)])
        else:
            h = np.cumsum(h, axis=last)
            window = tuple(slice(0, n) for n in sizes)
        out.append(h[window])
    return out


def _pareto(cheap: Floats, correct: Ints, b: Ints, n: int) -> Ints:
    """Indices of the points no other point beats: at least as cheap and at least as many correct (of points
    tied on both, the one with the smallest b, then the first), sorted by `cheap`.

    One sort of a single int64 key (cheap's dense rank, then -correct, then b) rather than a three-key
    lexsort, which is ten times slower on a million points; the lexsort remains for splits so large that
    the key would overflow."""
    if np.array_equal(cheap, np.rint(cheap)) and cheap.min(initial=0) >= 0:
        rank = np.rint(cheap).astype(np.int64)  # a count of samples: already a rank
    else:
        by_cost = np.argsort(cheap)
        steps = np.concatenate([[0], np.cumsum(np.diff(cheap[by_cost]) != 0)])
        rank = np.empty(len(cheap), np.int64)
        rank[by_cost] = steps
    width = n + 1
    if (int(rank.max(initial=0)) + 1) * width * width < 2**62:
        order = np.argsort((rank * width + (n - correct)) * width + b)
    else:
        order = np.lexsort((b, -correct, rank))
    best = np.maximum.accumulate(correct[order])
    keep = np.ones(len(order), dtype=bool)
    keep[1:] = correct[order][1:] > best[:-1]
    out: Ints = order[keep].astype(np.int64)
    return out


def _thin(cheap: Floats, correct: Ints, budget: int) -> Ints:
    """Positions to keep along one frontier (sorted by `cheap`, `correct` increasing): the first, the last,
    and each point that moved at least 1/budget of the frontier's range in cost or in accuracy since the last
    kept one. A point left out is then at most one such step from a kept one in both."""
    n = len(cheap)
    if n <= budget:
        return np.arange(n, dtype=np.int64)
    span_cost = max(float(cheap[-1] - cheap[0]), 1e-300) / budget
    span_correct = max(float(correct[-1] - correct[0]), 1e-300) / budget
    kept = [0]
    last_cost, last_correct = float(cheap[0]), float(correct[0])
    for i in range(1, n - 1):
        if cheap[i] - last_cost >= span_cost or correct[i] - last_correct >= span_correct:
            kept.append(i)
            last_cost, last_correct = float(cheap[i]), float(correct[i])
    kept.append(n - 1)
    return np.asarray(kept, dtype=np.int64)


def _check_chain(outputs: Sequence[ExitOutputs], labels: Labels, costs: Sequence[float] | None) -> Ints:
    if not outputs:
        raise ValueError("a chain has at least one tier")
    y = np.asarray(labels)
    n = len(y)
    if y.ndim != 1 or (n and not np.issubdtype(y.dtype, np.integer)):
        raise ValueError("labels must be a 1-D array of class indices")
    for k, o in enumerate(outputs):
        if o.confidence.shape != (n,) or o.prediction.shape != (n,):
            raise ValueError(f"tier {k} has outputs for a different number of samples than the {n} labels")
        if n and not np.isfinite(o.confidence).all():
            raise ValueError(f"tier {k}'s confidences contain NaN or infinite values")
    if costs is not None and (len(costs) != len(outputs) or not all(math.isfinite(c) and c >= 0 for c in costs)):
        raise ValueError(f"give one finite, non-negative cost per tier ({len(outputs)}), got {list(costs)}")
    return y.astype(np.int64, copy=False)


def _indicators(outputs: Sequence[ExitOutputs], y: Ints) -> tuple[Floats, list[tuple[Floats, ...]]]:
    """The top's correctness, and per non-top tier: (1, correct, agrees with the top, b-type, c-type)."""
    top: Floats = (outputs[-1].prediction == y).astype(np.float64)
    per_tier: list[tuple[Floats, ...]] = []
    for o in outputs[:-1]:
        right: Floats = (o.prediction == y).astype(np.float64)
        agree: Floats = (o.prediction == outputs[-1].prediction).astype(np.float64)
        per_tier.append((np.ones(len(y)), right, agree, top * (1 - right), (1 - top) * right))
    return top, per_tier


def compute_frontier(outputs: Sequence[ExitOutputs], labels: Labels, costs: Sequence[float], *, entry: int = 0,
                     levels: int = LEVELS, max_grid: int = MAX_GRID, max_points: int = MAX_POINTS) -> Frontier:
    """The Pareto points of the chain `outputs` (its lowest tier first) on a split (see the module
    docstring): every limit vector of the candidate grid is evaluated at once, and only the points on one of
    the frontiers are kept, sorted by expected compute (measured costs) and then by accuracy."""
    y = _check_chain(outputs, labels, costs)
    n, k_tiers = len(y), len(outputs)
    top, per_tier = _indicators(outputs, y)
    top_correct = int(top.sum())
    d = k_tiers - 1
    if n == 0:
        raise ValueError("no samples on this split: a chain validated on no samples has no frontier")
    if d == 0:  # nothing to trade: the top answers everything
        limits = np.zeros((1, d))
        limits[:] = NEVER
        answered = np.zeros((1, k_tiers), np.int64)
        answered[0, -1] = n
        correct = np.zeros((1, k_tiers), np.int64)
        correct[0, -1] = top_correct
        stats = PointStats(n, top_correct, answered, correct, np.zeros((1, d), np.int64), np.zeros(1, np.int64),
                           np.zeros(1, np.int64))
        return Frontier(entry, [2] * d, limits, stats)

    per_level = levels_for(d, levels, max_grid)
    cands = [candidate_limits(o.confidence, per_level) for o in outputs[:-1]]
    sizes = [len(c) for c in cands]
    ranks = [np.searchsorted(c, o.confidence, side="right").astype(np.int64)
             for c, o in zip(cands, outputs[:-1], strict=True)]
    grid = tuple(sizes)

    # Per non-top tier k: arrays over (j_0 .. j_k) of answered, correct, agreeing, b, c.
    tiers = [_tier_counts(ranks[: k + 1], sizes[: k + 1], list(per_tier[k]), True) for k in range(d)]
    (top_right,) = _tier_counts(ranks, sizes, [top], False)

    def full(a: Floats) -> Floats:  # broadcast a (j_0 .. j_k) array over the whole grid
        out: Floats = a.reshape(a.shape + (1,) * (d - a.ndim))
        return out

    answered_early = [full(t[0]) for t in tiers]
    reach = [np.full(grid, float(n))]
    for a in answered_early:
        reach.append(reach[-1] - a)  # reach[k] = samples reaching tier k; reach[d] = the top's share
    correct_total = top_right + sum((full(t[1]) for t in tiers), np.zeros(grid))
    b_total = sum((full(t[3]) for t in tiers), np.zeros(grid))
    cost = sum((c * r for c, r in zip(costs, reach, strict=True)), np.zeros(grid)) / n

    # Every objective is non-decreasing along every axis (a higher limit sends more samples up), so a point
    # with no more correct answers than some point before it on an axis is beaten (or tied) by that point:
    # drop those first (a cheap pass that removes about half the grid), then sort the rest per objective.
    alive = np.ones(grid, dtype=bool)
    for axis in range(d):
        before = np.maximum.accumulate(correct_total, axis=axis)
        later = tuple(slice(1, None) if a == axis else slice(None) for a in range(d))
        earlier = tuple(slice(None, -1) if a == axis else slice(None) for a in range(d))
        alive[later] &= correct_total[later] > before[earlier]
    cand = np.flatnonzero(alive)
    flat_correct = np.rint(correct_total.ravel()[cand]).astype(np.int64)
    flat_b = np.rint(b_total.ravel()[cand]).astype(np.int64)
    flat_cost = cost.ravel()[cand]
    keep = []
    budget = max(1, 2 * max_points // max(d, 2))
    for objective in [flat_cost] + [r.ravel()[cand] for r in reach[1:]]:
        front = _pareto(objective, flat_correct, flat_b, n)
        keep.append(front[_thin(objective[front], flat_correct[front], budget)])
    picked = np.unique(np.concatenate(keep))
    picked = picked[np.lexsort((-flat_correct[picked], flat_cost[picked]))]
    chosen = cand[picked]
    j = np.unravel_index(chosen, grid)

    def at(a: Floats, k: int) -> Ints:  # values of a (j_0 .. j_k) array at the chosen points
        return np.rint(a[tuple(j[: k + 1])]).astype(np.int64)

    answered = np.stack([at(t[0], k) for k, t in enumerate(tiers)] + [np.rint(reach[d].ravel()[chosen])
                                                                      .astype(np.int64)], axis=1)
    correct = np.stack([at(t[1], k) for k, t in enumerate(tiers)] + [np.rint(top_right.ravel()[chosen])
                                                                     .astype(np.int64)], axis=1)
    agreeing = np.stack([at(t[2], k) for k, t in enumerate(tiers)], axis=1)
    b = sum((at(t[3], k) for k, t in enumerate(tiers)), np.zeros(len(chosen), np.int64))
    c = sum((at(t[4], k) for k, t in enumerate(tiers)), np.zeros(len(chosen), np.int64))
    limits = np.stack([cands[k][j[k]] for k in range(d)], axis=1)
    return Frontier(entry, sizes, limits, PointStats(n, top_correct, answered, correct, agreeing, b, c))


# -- evaluating given limits on another split ------------------------------------------------------------------


def evaluate_limits(outputs: Sequence[ExitOutputs], labels: Labels, limits: npt.ArrayLike) -> PointStats:
    """The counts of the limit vectors `limits` (P x K-1) on a split, e.g. the test split for the points chosen
    on the validation split. Routes every sample for every point (chunked matrix products, no Python loop
    over samples): fine for the few thousand stored points, not for the whole grid."""
    y = _check_chain(outputs, labels, None)
    n, k_tiers = len(y), len(outputs)
    d = k_tiers - 1
    lim = np.asarray(limits, dtype=np.float64)
    if lim.ndim != 2 or lim.shape[1] != d:
        raise ValueError(f"limits must be points x {d} (one limit per non-top tier), got shape {lim.shape}")
    p = len(lim)
    top, per_tier = _indicators(outputs, y)
    answered = np.zeros((p, k_tiers), np.int64)
    correct = np.zeros((p, k_tiers), np.int64)
    agreeing = np.zeros((p, d), np.int64)
    b = np.zeros(p, np.int64)
    c = np.zeros(p, np.int64)
    step = max(1, _CHUNK_CELLS // max(n, 1))
    for start in range(0, p, step):
        part = lim[start:start + step]
        waiting = np.ones((len(part), n), dtype=bool)  # not answered yet
        rows = slice(start, start + len(part))
        for k in range(d):
            here = waiting & (outputs[k].confidence[None, :] >= part[:, k, None])
            waiting &= ~here
            counts = np.rint(here.astype(np.float64) @ np.stack(per_tier[k], axis=1)).astype(np.int64)
            answered[rows, k], correct[rows, k], agreeing[rows, k] = counts[:, 0], counts[:, 1], counts[:, 2]
            b[rows] += counts[:, 3]
            c[rows] += counts[:, 4]
        answered[rows, d] = waiting.sum(axis=1)
        correct[rows, d] = np.rint(waiting.astype(np.float64) @ top).astype(np.int64)
    return PointStats(n, int(top.sum()), answered, correct, agreeing, b, c)


# -- the record -------------------------------------------------------------------------------------------------


def build_frontier_record(val_probs: Sequence[Probs], val_labels: Labels, temperatures: Sequence[float],
                          costs: Sequence[float], *, test_probs: Sequence[Probs] | None = None,
                          test_labels: Labels | None = None, levels: int = LEVELS, max_grid: int = MAX_GRID,
                          eps: float = EPS) -> dict[str, Any]:
    """The JSON record of a chain's exit trade-off, one frontier per entry tier (see streams/exits.py for the
    schema and its checks). `val_probs[k]` / `test_probs[k]`: tier k's softmax outputs on the split (N x
    classes); `temperatures[k]`: its fitted T; `costs[k]`: its measured compute per sample, seconds."""
    k_tiers = len(val_probs)
    if len(temperatures) != k_tiers or len(costs) != k_tiers:
        raise ValueError(f"give one temperature and one cost per tier ({k_tiers})")
    if (test_probs is None) != (test_labels is None) or (test_probs is not None and len(test_probs) != k_tiers):
        raise ValueError("give the test split's probabilities for every tier together with its labels")
    val = [exit_outputs(p, t, eps) for p, t in zip(val_probs, temperatures, strict=True)]
    test = None if test_probs is None else [exit_outputs(p, t, eps) for p, t in zip(test_probs, temperatures,
                                                                                   strict=True)]
    entries = []
    for e in range(k_tiers):
        f = compute_frontier(val[e:], val_labels, costs[e:], entry=e, levels=levels, max_grid=max_grid)
        tested = None if test is None or test_labels is None else evaluate_limits(test[e:], test_labels,
                                                                                  f.limits)
        entries.append({"entry": e, "levels": f.levels, "limits": f.limits.tolist(),
                        "validation": f.stats.to_json(), "test": None if tested is None else tested.to_json()})
    return {"version": RECORD_VERSION, "eps": eps, "temperatures": [float(t) for t in temperatures],
            "costs_s": [float(c) for c in costs], "entries": entries}
