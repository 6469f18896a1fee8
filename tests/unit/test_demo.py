"""The demo's pure parts: choosing the dataset, the held-out split, and the summary it prints."""

from __future__ import annotations

import numpy as np
import pytest

from tierflow.deploy.demo_data import DemoError, choose_dataset, split_holdout
from tierflow.deploy.demo_summary import Answered, format_summary, summarize


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
