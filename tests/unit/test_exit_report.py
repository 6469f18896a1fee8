"""What a trained chain reports about its exits (tiers/exit_report.py): calibration per exit, the frontier on
the top result only, and a reason whenever something is missing. Synthetic over-confident exits; no I/O,
no TensorFlow. Every field it writes passes the decider's check (streams/catalogue.py parse_result_exits)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from tierflow.streams.catalogue import parse_result_exits
from tierflow.streams.exits import parse_frontier
from tierflow.tiers import exit_report
from tierflow.tiers.exit_report import chain_exits, class_labels

COSTS = [1e-5, 4e-5, 2e-4]


def synthetic(rng: np.random.Generator, n: int, tiers: int) -> tuple[list[Any], Any]:
    """Softmax outputs of exits that get better up the chain, sharpened x2 (over-confident)."""
    y = rng.integers(0, 10, n)
    probs = []
    for k in range(tiers):
        z = rng.normal(0.0, 1.0, (n, 10))
        z[np.arange(n), y] += 1.5 + k
        e = np.exp(2.0 * z)
        probs.append(e / e.sum(axis=1, keepdims=True))
    return probs, y


def splits(n_val: int, n_test: int, tiers: int = 3) -> tuple[list[Any], Any, list[Any], Any]:
    rng = np.random.default_rng(3)
    val, y = synthetic(rng, n_val, tiers)
    test, ty = synthetic(rng, n_test, tiers)
    return val, y, test, ty


def test_each_exit_is_calibrated_and_the_top_carries_the_frontier() -> None:
    val, y, test, ty = splits(2000, 2000)

    fields = chain_exits(val, y, test, ty, COSTS)

    assert len(fields) == 3
    for k, f in enumerate(fields):
        cal = f["calibration"]
        assert cal["exit"] == k and cal["measured_on"] == "test" and cal["n_fit"] == cal["n_measured"] == 2000
        assert cal["ece_after"] < cal["ece_before"]  # mis-calibrated exits: scaling helps on the test split
        assert f["temperature"] == cal["temperature"]
        assert f["cost_s"] == COSTS[k]
        assert parse_result_exits(f) == f
    assert [f["frontier"] is None for f in fields] == [True, True, False]
    assert [f["reason"] for f in fields] == [None, None, None]
    record = parse_frontier(fields[-1]["frontier"])
    assert record.temperatures == tuple(f["temperature"] for f in fields)
    assert record.costs_s == tuple(COSTS)
    assert [e.entry for e in record.entries] == [0, 1, 2] and all(e.test is not None for e in record.entries)


def test_a_single_model_has_one_exit_and_a_one_point_frontier() -> None:
    val, y, test, ty = splits(500, 500, tiers=1)
    [f] = chain_exits(val, y, test, ty, [1e-4])
    record = parse_frontier(f["frontier"])
    assert [len(e.limits) for e in record.entries] == [1]
    assert f["calibration"]["temperature"] == f["temperature"]


@pytest.mark.parametrize(("n_val", "says"), [(0, "validation_rate is 0"), (29, "only 29 validation samples")])
def test_too_few_validation_samples_give_no_calibration_and_say_why(n_val: int, says: str) -> None:
    val, y, test, ty = splits(max(n_val, 1), 100)
    val, y = [p[:n_val] for p in val], y[:n_val]

    fields = chain_exits(val, y, test, ty, COSTS)

    for f in fields:
        assert (f["temperature"], f["calibration"], f["frontier"]) == (1.0, None, None)
        assert f["reason"].startswith(says)
        assert parse_result_exits(f) == f
    assert [f["cost_s"] for f in fields] == COSTS


def test_without_a_test_split_the_calibration_is_measured_on_validation_and_says_so() -> None:
    val, y, _, _ = splits(300, 1)
    empty = [np.zeros((0, 10))] * 3

    fields = chain_exits(val, y, empty, np.zeros(0, np.int64), COSTS)

    assert {f["calibration"]["measured_on"] for f in fields} == {"validation"}
    assert all("no test split" in f["reason"] for f in fields)
    assert all(e["test"] is None for e in fields[-1]["frontier"]["entries"])


def test_outputs_that_are_not_probabilities_are_not_calibrated() -> None:
    val, y, test, ty = splits(200, 200)
    logits = [np.log(p) for p in val]  # a model ending without its softmax

    fields = chain_exits(logits, y, test, ty, COSTS)

    assert fields[-1]["frontier"] is None and "not probabilities" in fields[-1]["reason"]
    assert {f["temperature"] for f in fields} == {1.0}


def test_a_record_too_large_for_an_event_drops_the_test_split_then_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    val, y, test, ty = splits(1000, 1000)
    full = chain_exits(val, y, test, ty, COSTS)[-1]["frontier"]
    size = len(json.dumps(full))
    bare = len(json.dumps({**full, "entries": [{**e, "test": None} for e in full["entries"]]}))

    monkeypatch.setattr(exit_report, "MAX_RECORD_BYTES", (size + bare) // 2)
    top = chain_exits(val, y, test, ty, COSTS)[-1]
    assert all(e["test"] is None for e in top["frontier"]["entries"]) and "test-split" in top["reason"]

    monkeypatch.setattr(exit_report, "MAX_RECORD_BYTES", bare // 2)
    top = chain_exits(val, y, test, ty, COSTS)[-1]
    assert top["frontier"] is None and top["calibration"] is not None and "larger than" in top["reason"]
    assert parse_result_exits(top) == top


def test_labels_may_be_indices_columns_or_one_hot() -> None:
    y = np.array([0, 2, 1])
    assert class_labels(y, 3).tolist() == [0, 2, 1]
    assert class_labels(y.reshape(3, 1).astype(np.uint8), 3).tolist() == [0, 2, 1]
    assert class_labels(np.eye(3)[y], 3).tolist() == [0, 2, 1]
    with pytest.raises(exit_report.NotProbabilities):
        class_labels(np.array([0.5, 1.0, 2.0]), 3)
    with pytest.raises(exit_report.NotProbabilities):
        class_labels(np.array([0, 3]), 3)
