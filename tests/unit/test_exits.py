"""Limits from a target (streams/exits.py): the decider's pure choice over a stored frontier record, its
bounds, cost overrides, refusals and the record's checks. No I/O, no numpy in the module under test."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
from scipy import stats

from tierflow.streams import exits as ex
from tierflow.streams.errors import PermanentError

N = 1000
TOP_CORRECT = 900
COSTS = [1e-4, 1e-3, 1e-2]

# Hand-made points of a 3-tier chain over N = 1000 validation samples, the top exit alone right on 900.
# Each: limits, answered per tier, correct per tier, agreeing per non-top tier, b, c; correct sums to
# TOP_CORRECT - b + c.
POINTS: list[tuple[list[float], list[int], list[int], list[int], int, int]] = [
    ([0.5, 0.5], [600, 300, 100], [510, 260, 80], [540, 280], 60, 10),  # P0: cheap, drop 0.05
    ([0.8, 0.7], [400, 300, 300], [380, 270, 238], [385, 285], 20, 8),  # P1: drop 0.012
    ([0.9, 0.9], [200, 200, 600], [195, 190, 514], [198, 196], 5, 4),  # P2: drop 0.001
    ([1.01, 1.01], [0, 0, 1000], [0, 0, 900], [0, 0], 0, 0),  # P3: the top answers everything
    ([0.3, 0.99], [700, 50, 250], [600, 40, 215], [640, 45], 55, 10),  # P4: less to the fog, more to the top
]


def split(points: list[tuple[list[float], list[int], list[int], list[int], int, int]], n: int = N,
          top_correct: int = TOP_CORRECT) -> dict[str, Any]:
    return {"n": n, "top_correct": top_correct, "answered": [p[1] for p in points],
            "correct": [p[2] for p in points], "agreeing": [p[3] for p in points],
            "b": [p[4] for p in points], "c": [p[5] for p in points]}


def make_record() -> dict[str, Any]:
    fog = [([0.7], [500, 500], [470, 430], [480], 20, 20), ([1.01], [0, 1000], [0, 900], [0], 0, 0)]
    return copy.deepcopy({  # fresh lists: tests mutate the record
        "version": 1, "eps": 1e-12, "temperatures": [1.5, 1.2, 0.9], "costs_s": list(COSTS),
        "entries": [
            {"entry": 0, "levels": [1000, 1000], "limits": [p[0] for p in POINTS], "validation": split(POINTS),
             "test": split(POINTS)},
            {"entry": 1, "levels": [1000], "limits": [p[0] for p in fog], "validation": split(fog), "test": None},
            {"entry": 2, "levels": [], "limits": [[]], "test": None,
             "validation": {"n": N, "top_correct": 900, "answered": [[N]], "correct": [[900]], "agreeing": [[]],
                            "b": [0], "c": [0]}},
        ],
    })


@pytest.fixture
def record() -> ex.FrontierRecord:
    return ex.parse_frontier(make_record())


def choose(record: ex.FrontierRecord, target: dict[str, Any], **kw: Any) -> ex.ExitChoice:
    return ex.choose_limits(record, ex.parse_target(target), **kw)


def drop_bound(b: int, c: int, n: int = N) -> float:
    """The documented bound, from scipy: U(b, 95%) - L(c, 95%) (Clopper-Pearson)."""
    upper = stats.beta.ppf(0.95, b + 1, n - b)
    lower = stats.beta.ppf(0.05, c, n - c + 1) if c else 0.0
    return float(upper - lower)


# -- the bounds -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "n"), [(0, 10), (1, 10), (5, 10), (10, 10), (3, 1000), (60, 10_000),
                                      (5000, 10_000), (9990, 10_000), (7, 60_000), (149_000, 300_000)])
@pytest.mark.parametrize("alpha", [0.1, 0.05])
def test_clopper_pearson_bounds_match_the_beta_quantiles(k: int, n: int, alpha: float) -> None:
    upper = 1.0 if k == n else stats.beta.ppf(1 - alpha, k + 1, n - k)
    lower = 0.0 if k == 0 else stats.beta.ppf(alpha, k, n - k + 1)
    assert ex.binomial_upper(k, n, alpha) == pytest.approx(upper, abs=1e-11)
    assert ex.binomial_lower(k, n, alpha) == pytest.approx(lower, abs=1e-11)


def test_the_bounds_with_no_success_or_no_failure_have_closed_forms() -> None:
    assert ex.binomial_upper(0, 50, 0.1) == pytest.approx(1 - 0.1 ** (1 / 50), rel=1e-12)
    assert ex.binomial_lower(50, 50, 0.1) == pytest.approx(0.1 ** (1 / 50), rel=1e-12)


@pytest.mark.parametrize(("p", "n"), [(0.01, 100), (0.3, 40), (0.9, 200), (0.002, 1000)])
def test_the_upper_bound_covers_the_truth_at_least_90_percent_of_the_time(p: float, n: int) -> None:
    # Exact coverage: the probability of the counts k whose bound is >= p.
    coverage = sum(stats.binom.pmf(k, n, p) for k in range(n + 1) if ex.binomial_upper(k, n, 0.1) >= p)
    assert coverage >= 0.90


@pytest.mark.parametrize(("p_b", "p_c", "n"), [(0.05, 0.02, 60), (0.01, 0.0, 80), (0.1, 0.1, 50)])
def test_the_drop_bound_covers_the_true_drop_at_least_90_percent_of_the_time(p_b: float, p_c: float,
                                                                             n: int) -> None:
    # Exact coverage over the trinomial law of (b, c): the Bonferroni pair of 95% bounds holds at 90%.
    coverage = 0.0
    for b in range(n + 1):
        for c in range(n + 1 - b):
            if ex.binomial_upper(b, n, 0.05) - ex.binomial_lower(c, n, 0.05) >= p_b - p_c:
                coverage += stats.multinomial.pmf([b, c, n - b - c], n, [p_b, p_c, 1 - p_b - p_c])
    assert coverage >= 0.90


# -- each target kind ---------------------------------------------------------------------------------------------


def test_max_accuracy_drop_picks_the_cheapest_point_whose_drop_bound_meets_it(record: ex.FrontierRecord) -> None:
    # P2's bound (b=5, c=4) is ~0.009: the only early-exit point within 0.01; P3 never answers early.
    choice = choose(record, {"max_accuracy_drop": 0.01})
    assert choice.point == 2 and choice.limits == [0.9, 0.9]
    assert choice.accuracy_drop_upper == pytest.approx(drop_bound(5, 4), abs=1e-10)
    assert choice.accuracy_drop_upper <= 0.01
    assert choice.accuracy == 0.899 and choice.top_accuracy == 0.9 and choice.accuracy_drop == pytest.approx(0.001)
    assert choice.shares == [0.2, 0.2, 0.6]
    # A looser target lets the cheaper P1 (b=20, c=8, bound ~0.025) through, not P0 (bound ~0.07).
    assert choose(record, {"max_accuracy_drop": 0.03}).point == 1
    assert choose(record, {"max_accuracy_drop": 0.1}).point == 0


def test_min_accuracy_picks_the_cheapest_point_whose_lower_bound_meets_it(record: ex.FrontierRecord) -> None:
    choice = choose(record, {"min_accuracy": 0.87})
    assert choice.point == 1  # 888/1000, lower bound ~0.875; P0 (850) and P4 (855) fall short
    assert choice.accuracy_lower == pytest.approx(stats.beta.ppf(0.1, 888, 113), abs=1e-10)
    assert choice.accuracy_lower >= 0.87 > ex.binomial_lower(855, N, 0.1)


def test_max_top_share_picks_the_most_accurate_point_within_the_share(record: ex.FrontierRecord) -> None:
    choice = choose(record, {"max_top_share": 0.35})
    assert choice.point == 1  # P0 (100 to the top) and P4 (250) fit too, but P1 (300) is the most accurate
    assert choice.top_share_upper == pytest.approx(stats.beta.ppf(0.9, 301, 700), abs=1e-10)
    assert choose(record, {"max_top_share": 0.27}).point == 4  # P1's bound (~0.32) no longer fits


def test_the_choice_carries_agreement_and_its_lower_bound_per_tier(record: ex.FrontierRecord) -> None:
    choice = choose(record, {"min_accuracy": 0.87})
    assert choice.tier_agreement == [385 / 400, 285 / 300]
    assert choice.tier_agreement_lower == [ex.binomial_lower(385, 400, 0.1), ex.binomial_lower(285, 300, 0.1)]
    assert choice.agreement == (385 + 285 + 300) / N
    assert choice.agreement_lower == ex.binomial_lower(970, N, 0.1) < choice.agreement
    data = choice.to_json()
    assert data["target"] == {"min_accuracy": 0.87} and data["limits"] == [0.8, 0.7] and data["n"] == N


def test_a_mid_chain_entry_uses_its_own_frontier(record: ex.FrontierRecord) -> None:
    choice = choose(record, {"max_accuracy_drop": 0.05}, entry=1)
    assert choice.entry == 1 and choice.limits == [0.7] and choice.shares == [0.5, 0.5]
    assert choice.costs_s == COSTS[1:]
    assert choice.cost_s == pytest.approx(COSTS[1] + COSTS[2] * 0.5)


def test_an_entry_at_the_top_has_nothing_to_choose(record: ex.FrontierRecord) -> None:
    choice = choose(record, {"max_accuracy_drop": 0.0}, entry=2)
    assert choice.limits == [] and choice.shares == [1.0] and choice.accuracy_drop_upper == 0.0
    with pytest.raises(ex.TargetUnreachable, match="best any limits reach is 1"):
        choose(record, {"max_top_share": 0.5}, entry=2)


def test_an_entry_without_a_frontier_is_refused(record: ex.FrontierRecord) -> None:
    with pytest.raises(ex.TargetInvalid, match="no frontier for an entry at tier 5"):
        choose(record, {"min_accuracy": 0.5}, entry=5)


# -- cost overrides ---------------------------------------------------------------------------------------------


def test_expected_compute_is_recomputed_from_the_answered_counts(record: ex.FrontierRecord) -> None:
    choice = choose(record, {"min_accuracy": 0.8})
    assert choice.point == 0  # the cheapest with the measured costs
    assert choice.cost_s == pytest.approx(COSTS[0] + COSTS[1] * 0.4 + COSTS[2] * 0.1)


@pytest.mark.parametrize("override", [[None, 0.1, 1e-4], {1: 0.1, 2: 1e-4}, {"1": 0.1, "2": 1e-4}])
def test_a_cost_override_can_change_the_cheapest_point(record: ex.FrontierRecord, override: Any) -> None:
    # A slow fog and a fast cloud: P4 (30% reach the fog, 25% the top) beats P0 (40%, 10%).
    choice = choose(record, {"min_accuracy": 0.8}, costs_s=override)
    assert choice.point == 4
    assert choice.costs_s == [COSTS[0], 0.1, 1e-4]
    assert choice.cost_s == pytest.approx(COSTS[0] + 0.1 * 0.3 + 1e-4 * 0.25)


@pytest.mark.parametrize("override", [[0.1], [None, -1.0, None], [None, True, None], {7: 0.1}, {"x": 0.1},
                                      {1: math.inf}])
def test_bad_cost_overrides_are_refused(record: ex.FrontierRecord, override: Any) -> None:
    with pytest.raises(ex.TargetInvalid, match=r"costs_s|cost overrides"):
        choose(record, {"min_accuracy": 0.8}, costs_s=override)


# -- refusals -----------------------------------------------------------------------------------------------------


def test_an_unreachable_target_names_the_best_reachable_value(record: ex.FrontierRecord) -> None:
    with pytest.raises(ex.TargetUnreachable) as caught:
        choose(record, {"min_accuracy": 0.95})  # the best estimate, 0.899, is below it
    best = ex.binomial_lower(899, N, 0.1)
    assert caught.value.best == pytest.approx(best)
    assert f"{best:.4g}" in str(caught.value) and "0.899" in str(caught.value)
    assert caught.value.field == "target" and isinstance(caught.value, PermanentError)

    with pytest.raises(ex.TargetUnreachable) as caught:
        choose(record, {"max_accuracy_drop": 0.0005})  # every early point drops at least 0.001
    assert caught.value.best == pytest.approx(drop_bound(5, 4), abs=1e-10)

    with pytest.raises(ex.TargetUnreachable) as caught:
        choose(record, {"max_top_share": 0.05})  # P0 sends 10% to the top
    assert caught.value.best == pytest.approx(ex.binomial_upper(100, N, 0.1))


def test_a_target_the_estimate_meets_but_the_bound_cannot_certify_is_a_too_small_split(
        record: ex.FrontierRecord) -> None:
    # P2's observed drop, 0.001, is within 0.005, but its 90% bound (~0.009) is not.
    with pytest.raises(ex.SplitTooSmall) as caught:
        choose(record, {"max_accuracy_drop": 0.005})
    assert caught.value.n == N
    assert caught.value.best == pytest.approx(drop_bound(5, 4), abs=1e-10)
    assert "1000 samples" in str(caught.value) and "too small" in str(caught.value)
    assert not isinstance(caught.value, ex.TargetUnreachable)


def test_a_tiny_validation_split_cannot_certify_a_small_drop() -> None:
    # 50 samples, an early exit that never disagrees with the top: its drop is 0, but the bound is
    # 1 - 0.05^(1/50) ~ 0.058, wider than the 1% asked for.
    points = [([0.8], [30, 20], [28, 18], [30], 0, 0), ([1.01], [0, 50], [0, 46], [0], 0, 0)]
    raw = {"version": 1, "eps": 1e-12, "temperatures": [1.0, 1.0], "costs_s": [1.0, 2.0],
           "entries": [{"entry": 0, "levels": [1000], "limits": [p[0] for p in points],
                        "validation": split(points, n=50, top_correct=46), "test": None}]}
    record = ex.parse_frontier(raw)
    with pytest.raises(ex.SplitTooSmall) as caught:
        choose(record, {"max_accuracy_drop": 0.01})
    assert caught.value.best == pytest.approx(1 - 0.05 ** (1 / 50))
    assert "50 samples" in str(caught.value)
    assert choose(record, {"max_accuracy_drop": 0.06}).limits == [0.8]  # a target the split supports


# -- malformed targets and records ----------------------------------------------------------------------------


@pytest.mark.parametrize(("target", "match"), [
    (None, "exactly one of"), ({}, "exactly one of"), ({"max_accuracy_drop": 0.01, "min_accuracy": 0.9}, "exactly"),
    ({"accuracy": 0.9}, "exactly one of"), ({"min_accuracy": 0}, r"\(0, 1\]"), ({"max_accuracy_drop": 1}, r"\[0, 1\)"),
    ({"max_top_share": 1.5}, r"\[0, 1\]"), ({"max_top_share": True}, "a number"), ({"min_accuracy": "0.9"}, "a number"),
    ({"min_accuracy": math.nan}, "a number"),
])
def test_malformed_targets_are_refused(target: Any, match: str) -> None:
    with pytest.raises(ex.TargetInvalid, match=match):
        ex.parse_target(target)


def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(raw: dict[str, Any]) -> None:
        node = raw
        for key in path[:-1]:
            node = node[key]
        if value is KeyError:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return mutate


V0 = ["entries", 0, "validation"]


@pytest.mark.parametrize(("mutate", "match"), [
    (_set(["version"], 2), "newer than this decider reads"),
    (_set(["version"], KeyError), "version: must be 1"),
    (_set(["version"], True), "version: must be 1"),
    (_set(["eps"], 0), r"eps: must be in \(0"),
    (_set(["temperatures"], []), "at least one tier"),
    (_set(["temperatures", 1], -1.0), r"temperatures\[1\]"),
    (_set(["costs_s"], [1e-4, 1e-3]), "costs_s: must have 3 items"),
    (_set(["costs_s", 0], -1), r"costs_s\[0\]"),
    (_set(["entries"], "x"), "entries: must be a list"),
    (_set(["entries"], []), "at least one entry"),
    (_set(["entries", 1, "entry"], 0), "entry 0 appears twice"),
    (_set(["entries", 1, "entry"], 3), r"entries\[1\].entry: must be in \[0, 2\]"),
    (_set(["entries", 0, "levels"], [1000]), "levels: must have 2 items"),
    (_set(["entries", 0, "limits", 1], [0.8]), r"limits\[1\]: must have 2 items"),
    (_set(["entries", 0, "limits", 1, 0], math.nan), r"limits\[1\]\[0\]: must be a finite number"),
    (_set(["entries", 0, "limits", 1, 0], 3.0), r"limits\[1\]\[0\]: must be in \[0.0, 2.0\]"),
    (_set(["entries", 0, "limits"], []), "at least one point"),
    (_set(["entries", 0, "validation"], KeyError), "validation: must be an object"),
    (_set([*V0, "n"], 0), r"validation.n: must be in \[1"),
    (_set([*V0, "answered", 0, 0], 601), "answer 1001 samples, not n = 1000"),
    (_set([*V0, "answered", 0, 0], 600.0), r"answered\[0\]\[0\]: must be an integer"),
    (_set([*V0, "answered", 0, 0], True), r"answered\[0\]\[0\]: must be an integer"),
    (_set([*V0, "correct", 0], [510, 260]), r"correct\[0\]: must have 3 items"),
    (_set([*V0, "correct", 3, 2], 1001), r"must be in \[0, 1000\]"),
    (_set([*V0, "agreeing", 0, 0], 601), "agrees with the top exit more often than it answers"),
    (_set([*V0, "b", 0], 61), "top_correct - b \\+ c"),
    (_set([*V0, "b"], [60, 20, 5, 0]), "b: must have 5 items"),
    (_set(["entries", 0, "test", "c", 2], 3), "test point 2: correct answers"),
    (_set(["entries", 1, "validation", "top_correct"], 10), "b counts samples the top exit gets right"),
    (_set([*V0, "correct", 3], [1, 0, 899]), "point 3: a tier is right more often than it answers"),
    (_set([*V0, "b", 3], 1), "point 3: correct answers"),
    (lambda raw: raw["entries"][0]["validation"].update(b=[60, 20, 5, 1, 55], c=[10, 8, 4, 1, 10]),
     "point 3: more disagreements with the top exit than answers below it"),
])
def test_malformed_records_are_refused_naming_the_field(mutate: Callable[[dict[str, Any]], None], match: str) -> None:
    raw = make_record()
    mutate(raw)
    with pytest.raises(ex.FrontierInvalid, match=match):
        ex.parse_frontier(raw)


def test_a_record_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(ex.FrontierInvalid, match="must be a JSON object"):
        ex.parse_frontier([make_record()])


def test_a_well_formed_record_parses_without_being_changed() -> None:
    raw = make_record()
    before = copy.deepcopy(raw)
    parsed = ex.parse_frontier(raw)
    assert raw == before
    assert parsed.entry(0).limits[2] == (0.9, 0.9) and parsed.entry(1).test is None
    assert parsed.entry(2).tiers == 1 and parsed.entry(2).limits == ((),)
