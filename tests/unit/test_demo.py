"""The demo's pure parts: choosing the dataset, the held-out split, the target it serves from (relaxed when the
decider refuses it), and the summary it prints: predicted beside observed."""

from __future__ import annotations

import argparse
import io
from typing import Any

import numpy as np
import pytest

from tierflow.deploy.demo import register, target_of
from tierflow.deploy.demo_data import (
    DEFAULT_TARGET,
    HOLDOUT_SEED,
    DemoError,
    DemoOptions,
    choose_dataset,
    split_holdout,
)
from tierflow.deploy.demo_lifecycle import Demo
from tierflow.deploy.demo_summary import Answered, best_reachable, format_summary, served, summarize
from tierflow.streams.exits import SplitTooSmall, Target, TargetInvalid, choose_limits, parse_frontier
from tierflow.streams.settings import Settings
from tierflow.tiers.frontier import build_frontier_record


def test_auto_picks_fashion_mnist_only_when_installed() -> None:
    assert choose_dataset("auto", True) == "fashion-mnist"
    assert choose_dataset("auto", False) == "digits"
    assert choose_dataset("npz:/data/x.npz", True) == "npz:/data/x.npz"


def test_the_holdout_is_disjoint_capped_and_scaled() -> None:
    x = np.random.default_rng(0).integers(0, 256, (100, 2, 2)).astype(np.uint8)
    x[0, 0, 0] = 255
    y = np.arange(100)  # each label names its sample
    x_train, y_train, x_test, y_test = split_holdout(x, y, holdout=0.2, train_cap=50, test_cap=15, seed=3)
    assert (len(x_train), len(x_test)) == (50, 15)
    assert x_train.dtype == np.float32 and x_train.min() >= 0.0 and x_train.max() <= 1.0
    assert not set(y_train.tolist()) & set(y_test.tolist())
    for xs, ys in ((x_train, y_train), (x_test, y_test)):  # each sample keeps its label, scaled by 1/255
        np.testing.assert_allclose(xs * 255.0, x[ys.astype(int)], atol=1e-4)
    with pytest.raises(DemoError, match="holdout"):
        split_holdout(x, y, holdout=1.0, train_cap=50, test_cap=15, seed=3)


def test_summary_counts_each_input_once_and_shares_sum_to_one() -> None:
    answered = Answered()
    answered.add((0, 10), 0, 3, 5.0, now=1.0)
    answered.add((1, 10), 0, 4, 6.0, now=1.5)  # the same offset in another partition: another input
    answered.add((1, 10), 0, 4, 6.0, now=1.6)  # a duplicate (at-least-once)
    answered.add((0, 12), 2, 7, 20.0, now=2.0)
    summary = summarize(exits=[("edge", 0.9), ("fog", 0.91), ("cloud", None)], single=("single", 0.88),
                        offsets=[(0, 10), (1, 10), (0, 12), (0, 13)], labels=[3, 5, 7, 1], answered=answered,
                        started_at=0.0, tiers=3)
    assert (summary["inputs"], summary["answered"], summary["unanswered"], summary["duplicates"]) == (4, 3, 1, 1)
    assert summary["cascade_accuracy"] == pytest.approx(2 / 3)
    assert [t["answered"] for t in summary["tiers"]] == [2, 0, 1]
    assert sum(t["share"] for t in summary["tiers"]) == pytest.approx(1.0)
    assert summary["tiers"][0]["accuracy"] == 0.5 and summary["tiers"][1]["accuracy"] is None
    assert summary["latency_ms"]["p50"] == 6.0 and summary["throughput_per_s"] == pytest.approx(1.5)
    text = format_summary(summary)
    assert "cascade accuracy 0.667" in text and "tier 2 (cloud)   answered  33.3%" in text and "cloud    -" in text


# -- serving from a target ---------------------------------------------------------------------------------------


def small_chain_record(n: int) -> dict[str, Any]:
    """The frontier record of a 3-tier chain (tiers/frontier.py) on n validation samples of over-confident exits
    that get better up the chain: with n ~ 150, as the digits give, a 1% drop cannot be certified."""
    rng = np.random.default_rng(11)
    y = rng.integers(0, 10, n)
    probs = []
    for k in range(3):
        z = rng.normal(0.0, 1.0, (n, 10))
        z[np.arange(n), y] += 2.0 + k
        e = np.exp(2.0 * z)
        probs.append(e / e.sum(axis=1, keepdims=True))
    return build_frontier_record(probs, y, [2.0, 2.0, 2.0], [1e-5, 4e-5, 2e-4])


def test_a_refused_target_is_relaxed_to_the_strictest_one_the_frontier_certifies() -> None:
    record = small_chain_record(150)
    parsed = parse_frontier(record)
    asked = Target("max_accuracy_drop", 0.01)
    with pytest.raises(SplitTooSmall) as refused:
        choose_limits(parsed, asked)
    relaxed = best_reachable(record, asked)
    assert relaxed is not None and refused.value.best <= relaxed < refused.value.best + 1e-4
    assert round(relaxed, 4) == relaxed
    choose_limits(parsed, Target("max_accuracy_drop", relaxed))  # the decider accepts it
    # A floor relaxes downwards; a target that is met stays as it is.
    floor = best_reachable(record, Target("min_accuracy", 0.9999))
    assert floor is not None and floor < 0.9999
    choose_limits(parsed, Target("min_accuracy", floor))
    assert best_reachable(record, Target("max_accuracy_drop", 0.5)) == 0.5
    assert best_reachable({"version": 99}, asked) is None  # an unreadable record: nothing to relax to


INFERENCE = {
    "id": 4, "result_id": 1, "target": {"max_accuracy_drop": 0.0187},
    "tiers": [{"index": 0, "model_name": "edge", "limit": 0.93, "compare": "calibrated", "top": False},
              {"index": 1, "model_name": "fog", "limit": 1.01, "compare": "calibrated", "top": False},
              {"index": 2, "model_name": "cloud", "limit": 1.0, "compare": "calibrated", "top": True}],
    "predicted": {"n": 144, "point": 17, "shares": [0.75, 0.0, 0.25], "accuracy": 0.951, "accuracy_lower": 0.917,
                  "top_accuracy": 0.944, "accuracy_drop": -0.007, "accuracy_drop_upper": 0.0186,
                  "top_share_upper": 0.31, "cost_s": 5e-5, "confidence": 0.9, "entry": 0,
                  "tier_agreement": [0.97, None],
                  "test": {"n": 143, "shares": [0.7, 0.0, 0.3], "accuracy": 0.937, "top_accuracy": 0.93,
                           "agreement": 0.96, "tier_agreement": [0.95, None]}},
}


def test_the_summary_puts_the_predicted_shares_and_accuracy_beside_the_observed_ones() -> None:
    answered = Answered()
    for i, (tier, cls) in enumerate([(0, 1), (0, 2), (0, 3), (2, 4)]):
        answered.add((0, i), tier, cls, 5.0, now=1.0 + i)
    summary = summarize(exits=[("edge", 0.9), ("fog", 0.91), ("cloud", 0.93)], single=None,
                        offsets=[(0, i) for i in range(4)], labels=[1, 2, 0, 4], answered=answered, started_at=0.0,
                        tiers=3, serving=served(INFERENCE, requested={"max_accuracy_drop": 0.01}))
    # --json carries the target, the limits, the prediction and the observation.
    assert summary["target"] == {"max_accuracy_drop": 0.0187}
    assert summary["requested_target"] == {"max_accuracy_drop": 0.01}
    assert summary["limits"] == [0.93, 1.01] and summary["compare"] == "calibrated"
    assert summary["predicted"]["shares"] == [0.75, 0.0, 0.25] and summary["predicted"]["accuracy"] == 0.951
    assert summary["predicted"]["test"]["accuracy"] == 0.937
    assert summary["observed"] == {"n": 4, "shares": [0.75, 0.0, 0.25], "accuracy": 0.75}
    assert [t["predicted_share"] for t in summary["tiers"]] == [0.75, 0.0, 0.25]
    text = format_summary(summary)
    assert "served from the target max_accuracy_drop 0.0187\n  (asked for max_accuracy_drop 0.01: refused" in text
    assert "chosen limits on the calibrated confidence: edge 0.93, fog 1.01 (never answers)" in text
    assert "  tier 0 (edge)        75.0%      70.0%     75.0%  answered (observed accuracy 0.667)" in text
    assert "  cascade accuracy     0.951      0.937     0.750" in text
    assert "the chosen point on 144 validation samples (accuracy >= 0.917 with 90% confidence" in text


def test_typed_limits_print_as_before_and_predict_nothing() -> None:
    typed = {"tiers": [{"limit": 0.8, "top": False}, {"limit": 0.8, "top": False}, {"limit": 1.0, "top": True}],
             "target": None, "predicted": None}
    answered = Answered()
    answered.add((0, 0), 0, 1, 5.0, now=1.0)
    summary = summarize(exits=[("edge", 0.9), ("fog", 0.91), ("cloud", 0.93)], single=None, offsets=[(0, 0)],
                        labels=[1], answered=answered, started_at=0.0, tiers=3, serving=served(typed))
    assert (summary["target"], summary["predicted"], summary["limits"]) == (None, None, [0.8, 0.8])
    text = format_summary(summary)
    assert "served with typed limits (edge 0.8, fog 0.8) on the raw max(p), as Kafka-ML" in text
    assert "cascade accuracy 1.000" in text and "predicted" not in text


def demo_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["demo", *argv])


def test_a_demo_seed_seeds_the_holdout_and_must_be_a_31_bit_integer() -> None:
    assert demo_args().seed is None and DemoOptions().holdout_seed == HOLDOUT_SEED  # the held-out split as before
    assert demo_args("--seed", "7").seed == 7 and DemoOptions(seed=7).holdout_seed == 7
    for bad in ("-1", "2147483648", "x"):
        with pytest.raises(SystemExit):
            demo_args("--seed", bad)


class RecordingApi:
    """What the demo posts, each answered with the next id."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict[str, Any]]] = []

    def post(self, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        self.posts.append((path, dict(body or {})))
        return 201, {"id": len(self.posts)}


@pytest.mark.parametrize("seed", [7, None])
def test_the_demo_seed_reaches_its_deployment(seed: int | None) -> None:
    api = RecordingApi()
    demo = Demo(api, Settings.from_env({}), DemoOptions(seed=seed), out=io.StringIO())  # type: ignore[arg-type]

    demo.deploy({"cloud": 1, "single": 2})

    [body] = [body for path, body in api.posts if path == "/deployments"]
    assert body.get("seed") == seed and ("seed" in body) == (seed is not None)


def test_the_demo_serves_from_a_one_percent_drop_unless_told_otherwise() -> None:
    assert target_of(demo_args()) == DEFAULT_TARGET == ("max_accuracy_drop", 0.01)
    assert target_of(demo_args("--min-accuracy", "0.9")) == ("min_accuracy", 0.9)
    assert target_of(demo_args("--max-top-share", "0.2")) == ("max_top_share", 0.2)
    assert demo_args("--limit", "0.8").limit == 0.8
    with pytest.raises(TargetInvalid, match=r"must be in \[0, 1\)"):
        target_of(demo_args("--max-accuracy-drop", "1.5"))
    with pytest.raises(SystemExit):  # a target and a typed limit are exclusive
        demo_args("--limit", "0.8", "--max-accuracy-drop", "0.01")
