"""The exit trade-off of a chain (tiers/frontier.py): the fast grid evaluation against a brute force, the
Pareto property, entry points, chains of 1, 2 and 4 tiers, and the record's size. Pure numpy, no I/O."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pytest

from tierflow.streams.exits import parse_frontier
from tierflow.tiers import frontier as fr

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]


def random_chain(seed: int, n: int, tiers: int, classes: int = 4, distinct: bool = True
                 ) -> tuple[list[fr.ExitOutputs], Ints]:
    """Exits that get better up the chain, with confidences loosely tied to being right."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    outputs = []
    for k in range(tiers):
        right = rng.random(n) < 0.5 + 0.4 * k / max(tiers - 1, 1)
        pred = np.where(right, y, (y + rng.integers(1, classes, n)) % classes)
        conf = np.clip(rng.beta(2, 2, n) * 0.6 + 0.35 + 0.1 * right, 0.25, 1.0)
        if not distinct:
            conf = np.round(conf, 1)  # heavy ties
        outputs.append(fr.ExitOutputs(conf.astype(np.float64), pred.astype(np.int64)))
    return outputs, y


# -- a brute force: route every sample of every limit vector, in plain Python ------------------------------------


def brute_stats(outputs: Sequence[fr.ExitOutputs], y: Ints, limits: Sequence[float]
                ) -> tuple[list[int], list[int], list[int], int, int]:
    k_tiers = len(outputs)
    answered, correct, agreeing = [0] * k_tiers, [0] * k_tiers, [0] * (k_tiers - 1)
    b = c = 0
    for i in range(len(y)):
        tier = next((k for k in range(k_tiers - 1) if outputs[k].confidence[i] >= limits[k]), k_tiers - 1)
        pred, top = int(outputs[tier].prediction[i]), int(outputs[-1].prediction[i])
        answered[tier] += 1
        correct[tier] += pred == y[i]
        if tier < k_tiers - 1:
            agreeing[tier] += pred == top
        b += top == y[i] and pred != y[i]
        c += top != y[i] and pred == y[i]
    return answered, correct, agreeing, b, c


def objectives(answered: Sequence[int], n: int, costs: Sequence[int]) -> list[int]:
    """[cost x n, reach of tier 1, .., reach of the top] as integers (integer costs keep ties exact)."""
    reach = [n - sum(answered[:k]) for k in range(len(answered))]
    return [sum(c * r for c, r in zip(costs, reach, strict=True)), *reach[1:]]


def brute_frontiers(outputs: Sequence[fr.ExitOutputs], y: Ints, costs: Sequence[int], levels: int
                    ) -> tuple[dict[tuple[float, ...], tuple[list[int], int]], list[set[tuple[int, int]]]]:
    """Every limit vector's (objectives, correct), and per objective the (value, correct) pairs no vector beats."""
    cands = [fr.candidate_limits(o.confidence, levels) for o in outputs[:-1]]
    every = {}
    for vec in itertools.product(*cands):
        answered, correct, *_ = brute_stats(outputs, y, vec)
        every[tuple(float(x) for x in vec)] = (objectives(answered, len(y), costs), sum(correct))
    fronts = []
    for m in range(len(outputs)):
        pairs = {(obj[m], corr) for obj, corr in every.values()}
        fronts.append({(o, r) for o, r in pairs
                       if not any(o2 <= o and r2 >= r and (o2, r2) != (o, r) for o2, r2 in pairs)})
    return every, fronts


@pytest.mark.parametrize(("seed", "tiers", "levels", "distinct"),
                         [(0, 3, 6, True), (1, 3, 5, False), (2, 3, 8, True), (3, 2, 30, True), (4, 2, 9, False)])
def test_the_fast_frontier_equals_a_brute_force_evaluation(seed: int, tiers: int, levels: int,
                                                           distinct: bool) -> None:
    outputs, y = random_chain(seed, 60, tiers, distinct=distinct)
    costs = [1, 3, 7][:tiers]
    f = fr.compute_frontier(outputs, y, [float(c) for c in costs], levels=levels, max_points=10**6)
    every, fronts = brute_frontiers(outputs, y, costs, levels)

    # Each stored point's counts are what routing every sample at its limits gives ...
    for p, vec in enumerate(f.limits):
        answered, correct, agreeing, b, c = brute_stats(outputs, y, vec)
        assert f.stats.answered[p].tolist() == answered
        assert f.stats.correct[p].tolist() == correct
        assert f.stats.agreeing[p].tolist() == agreeing
        assert (f.stats.b[p], f.stats.c[p]) == (b, c)
    assert f.stats.top_correct == int((outputs[-1].prediction == y).sum())

    # ... every stored point is on the frontier of at least one objective, and every frontier value is stored.
    stored = [every[tuple(float(x) for x in vec)] for vec in f.limits]
    for obj, corr in stored:
        assert any((obj[m], corr) in fronts[m] for m in range(tiers))
    for m in range(tiers):
        assert fronts[m] <= {(obj[m], corr) for obj, corr in stored}


def test_a_four_tier_chain_lowers_its_levels_and_still_matches_the_brute_force() -> None:
    outputs, y = random_chain(9, 40, 4)
    f = fr.compute_frontier(outputs, y, [1.0, 2.0, 3.0, 4.0], levels=1000, max_grid=216, max_points=10**6)
    assert f.levels == [6, 6, 6]  # 6 ** 3 = 216
    every, fronts = brute_frontiers(outputs, y, [1, 2, 3, 4], 6)
    for vec, answered in zip(f.limits, f.stats.answered, strict=True):
        assert brute_stats(outputs, y, vec)[0] == answered.tolist()
    stored = {(every[tuple(float(x) for x in vec)][0][0], every[tuple(float(x) for x in vec)][1]) for vec in f.limits}
    assert fronts[0] <= stored


def test_levels_per_tier_for_long_chains() -> None:
    assert fr.levels_for(1) == fr.levels_for(2) == 1000
    assert fr.levels_for(3) == 100
    assert fr.levels_for(4) == 31
    assert fr.levels_for(20) == 2


# -- the Pareto property on a realistic chain ------------------------------------------------------------------


def test_no_stored_point_is_beaten_on_cost_and_accuracy_by_a_cheaper_stored_point_of_its_front() -> None:
    outputs, y = random_chain(5, 3000, 3)
    f = fr.compute_frontier(outputs, y, [1e-4, 5e-4, 2e-3], levels=200)
    cost = f.stats.expected_cost([1e-4, 5e-4, 2e-3])
    correct = f.stats.correct.sum(axis=1)
    assert np.all(np.diff(cost) >= -1e-15)  # stored cheapest first (up to rounding)
    # The measured-cost front: walking by cost, accuracy only rises; the others are the reach fronts' points.
    on_cost_front = correct > np.concatenate([[-1], np.maximum.accumulate(correct)[:-1]])
    assert on_cost_front.sum() >= 10
    assert correct.max() == correct[on_cost_front].max()  # the most accurate point is there
    # Every point answers each sample once and every limit is a candidate on [0, NEVER].
    assert (f.stats.answered.sum(axis=1) == len(y)).all()
    assert ((f.limits >= 0) & (f.limits <= fr.NEVER)).all()


def test_thinning_keeps_the_ends_and_leaves_no_gap_wider_than_a_step() -> None:
    cheap = np.linspace(0.0, 1.0, 1000) ** 2
    correct = np.arange(1000, dtype=np.int64)
    kept = fr._thin(cheap, correct, 50)
    assert kept[0] == 0 and kept[-1] == 999
    assert len(kept) <= 2 * 50 + 1
    gaps_cost, gaps_correct = np.diff(cheap[kept[:-1]]), np.diff(correct[kept[:-1]])
    assert np.all((gaps_cost <= 1 / 50 + 0.01) & (gaps_correct <= 1000 / 50 + 1))


# -- candidate limits ---------------------------------------------------------------------------------------------


def test_candidate_limits_separate_distinct_confidences_with_a_margin() -> None:
    conf = np.array([0.3, 0.5, 0.5, 0.71, 0.9, 0.9, 0.95])
    lim = fr.candidate_limits(conf, 1000)
    assert lim[0] == 0.0 and lim[-1] == fr.NEVER
    assert len(lim) == 6  # 0, 4 gaps between 5 distinct values, never: exhaustive
    assert np.all(np.diff(lim) > 0)
    # Each cut answers a different set of samples, and sits away from both neighbours.
    answered = [int((conf >= x).sum()) for x in lim]
    assert answered == [7, 6, 4, 3, 1, 0]
    assert all(len(repr(float(x))) <= 5 for x in lim[1:-1])  # short decimals: 0.4, 0.6, 0.8, 0.93


def test_candidate_limits_follow_quantiles_when_there_are_many_confidences() -> None:
    conf = np.random.default_rng(0).random(100_000)
    lim = fr.candidate_limits(conf, 1000)
    assert len(lim) == 1000
    between = np.histogram(conf, bins=lim)[0]
    assert between.max() <= 2 * between.mean()  # about equally many samples between neighbouring limits


def test_candidate_limits_fill_their_budget_despite_heavy_ties() -> None:
    conf = np.concatenate([np.ones(9000), np.random.default_rng(1).random(1000)])  # 90% certain
    assert len(fr.candidate_limits(conf, 500)) == 500


# -- chains of one and two tiers, entry points -------------------------------------------------------------------


def test_a_single_tier_has_one_point_where_the_top_answers_everything() -> None:
    outputs, y = random_chain(6, 50, 1)
    f = fr.compute_frontier(outputs, y, [1.0])
    assert f.limits.shape == (1, 0)
    assert f.stats.answered.tolist() == [[50]]
    assert f.stats.correct.tolist() == [[f.stats.top_correct]]
    assert f.stats.b.tolist() == f.stats.c.tolist() == [0]


def test_a_two_tier_chain_stores_its_exact_front_for_any_costs() -> None:
    outputs, y = random_chain(7, 400, 2)
    f = fr.compute_frontier(outputs, y, [1.0, 1.0], max_points=10**6)
    top_share, correct = f.stats.answered[:, 1], f.stats.correct.sum(axis=1)
    for cost in ([1.0, 10.0], [5.0, 0.1]):  # any positive costs rank points by their top share
        assert np.array_equal(np.argsort(f.stats.expected_cost(cost), kind="stable"),
                              np.argsort(top_share, kind="stable"))
    assert np.all(np.diff(correct[np.argsort(top_share)]) > 0)


def test_each_entry_point_gets_the_frontier_of_the_chain_above_it() -> None:
    outputs, y = random_chain(8, 300, 3)
    probs = [one_hot_probs(o, 4) for o in outputs]
    record = fr.build_frontier_record(probs, y, [1.0, 1.0, 1.0], [1.0, 2.0, 3.0], levels=50)
    assert [e["entry"] for e in record["entries"]] == [0, 1, 2]
    # The fog entry's frontier is the two-tier chain fog -> cloud on its own.
    fog = fr.compute_frontier([fr.exit_outputs(p, 1.0) for p in probs[1:]], y, [2.0, 3.0], entry=1, levels=50)
    assert record["entries"][1]["limits"] == fog.limits.tolist()
    assert record["entries"][1]["validation"] == fog.stats.to_json()
    # The cloud entry has nothing to trade.
    assert record["entries"][2]["limits"] == [[]]
    assert record["entries"][2]["validation"]["answered"] == [[300]]


def one_hot_probs(o: fr.ExitOutputs, classes: int) -> Floats:
    """Softmax outputs whose class and confidence are those of `o` (the rest spread evenly)."""
    n = len(o.prediction)
    p = np.tile(((1 - o.confidence) / (classes - 1))[:, None], (1, classes))
    p[np.arange(n), o.prediction] = o.confidence
    return p


# -- re-evaluation on another split ------------------------------------------------------------------------------


def test_evaluating_the_stored_limits_on_the_same_split_gives_the_stored_counts() -> None:
    outputs, y = random_chain(10, 2000, 3)
    f = fr.compute_frontier(outputs, y, [1.0, 2.0, 3.0], levels=100)
    again = fr.evaluate_limits(outputs, y, f.limits)
    assert again.to_json() == f.stats.to_json()


def test_evaluating_on_another_split_routes_by_the_limits() -> None:
    outputs, y = random_chain(11, 500, 3)
    other, y2 = random_chain(12, 300, 3)
    f = fr.compute_frontier(outputs, y, [1.0, 2.0, 3.0], levels=40)
    tested = fr.evaluate_limits(other, y2, f.limits)
    assert tested.n == 300
    for p in (0, len(f.limits) // 2, len(f.limits) - 1):
        answered, correct, agreeing, b, c = brute_stats(other, y2, f.limits[p])
        assert tested.answered[p].tolist() == answered and tested.correct[p].tolist() == correct
        assert tested.agreeing[p].tolist() == agreeing and (tested.b[p], tested.c[p]) == (b, c)


# -- the record ---------------------------------------------------------------------------------------------------


def test_the_record_of_a_three_tier_chain_over_10000_samples_is_small_and_parses() -> None:
    rng = np.random.default_rng(2)
    n, classes = 10_000, 10

    def split() -> tuple[list[Floats], Ints]:
        y = rng.integers(0, classes, n)
        probs = []
        for strength in (1.5, 2.5, 3.5):
            z = rng.normal(0, 1, (n, classes))
            z[np.arange(n), y] += strength
            e = np.exp(2 * z)
            probs.append(e / e.sum(axis=1, keepdims=True))
        return probs, y

    (val, y), (test, ty) = split(), split()
    record = fr.build_frontier_record(val, y, [1.3, 0.8, 0.6], [1e-4, 3e-4, 1e-3], test_probs=test,
                                      test_labels=ty)
    text = json.dumps(record)
    assert len(text) < 400_000  # well under Kafka's 1 MB message default, test split included
    assert record["version"] == fr.RECORD_VERSION
    assert record["entries"][0]["levels"] == [1000, 1000]
    parsed = parse_frontier(json.loads(text))  # the decider's checks hold for what the job writes
    assert parsed.entry(0).test is not None and parsed.entry(0).test.n == n
    assert len(parsed.entry(0).limits) <= 3 * (2 * fr.MAX_POINTS + 1)


# -- bad input ---------------------------------------------------------------------------------------------------


def test_bad_chains_are_refused() -> None:
    outputs, y = random_chain(13, 20, 2)
    with pytest.raises(ValueError, match="no samples"):
        fr.compute_frontier([fr.ExitOutputs(np.zeros(0), np.zeros(0, np.int64))] * 2, np.zeros(0, np.int64),
                            [1.0, 1.0])
    with pytest.raises(ValueError, match="cost per tier"):
        fr.compute_frontier(outputs, y, [1.0, -1.0])
    with pytest.raises(ValueError, match="different number of samples"):
        fr.compute_frontier(outputs, y[:10], [1.0, 1.0])
    with pytest.raises(ValueError, match="one limit per non-top tier"):
        fr.evaluate_limits(outputs, y, [[0.5, 0.5]])
    with pytest.raises(ValueError, match="one temperature and one cost per tier"):
        fr.build_frontier_record([np.ones((2, 2)) / 2], np.array([0, 1]), [1.0, 1.0], [1.0])
