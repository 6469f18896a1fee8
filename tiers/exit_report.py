"""What a trained chain reports about its exits: per exit its temperature and calibration, and the chain's
exit frontier (numpy only: no TensorFlow, no I/O).

Called by the training job (tiers/train_job.py) once the chain has trained, with every exit's softmax outputs
on the validation and test splits (`training.exit_probabilities` computes them) and each sub-model's measured
compute per sample; it returns, per result of the chain (bottom first), the `exits` field of its
ReportTrainingResult (docs/commands.md; checked by streams/catalogue.py `parse_result_exits`):

    {"temperature": T, "calibration": {exit, temperature, accuracy, ece_before, ece_after, nll_before,
     nll_after, n_fit, n_measured, n_bins, measured_on} | null, "cost_s": seconds | null,
     "frontier": record | null, "reason": why there is no calibration or frontier | null}

T is fitted on the validation split (tiers/calibration.py); accuracy and ECE before/after are measured on
the test split, or on the validation split when there is no test split (`measured_on` says which: ECE
after is then optimistic). The frontier record (tiers/frontier.py) goes on the chain's top result only: it
covers the whole chain, and an event should carry it once. A chain with fewer than `MIN_VALIDATION`
validation samples (validation_rate 0 included) gets neither, and says why: no bound certifies even a 10%
accuracy drop on fewer (the Clopper-Pearson upper bound of 0 disagreements in n samples at 95% is
1 - 0.05^(1/n), above 0.1 for n < 29), and a temperature fitted on a handful of samples is noise.

The record travels in an event: when its JSON exceeds `MAX_RECORD_BYTES` (a 5-tier chain's record is
~470 kB at N = 10,000) the test split's re-evaluation is dropped first, then the frontier itself (the reason
says so); the calibration stays.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from tierflow.tiers.calibration import calibrate_exits
from tierflow.tiers.frontier import build_frontier_record

JSON = dict[str, Any]
Probs = npt.NDArray[Any]

#: Fewest validation samples a chain is calibrated and given a frontier on (see the module docstring).
MIN_VALIDATION = 30
#: Most JSON the frontier record may take in a report (the decider refuses more than 900 kB; Kafka's default
#: message limit is 1 MB and the event carries the rest of the report too).
MAX_RECORD_BYTES = 700_000
#: How far a row of an exit's outputs may sum from 1 and still be read as probabilities.
SUM_TOLERANCE = 1e-3


class NotProbabilities(ValueError):
    """An exit's outputs are not softmax probabilities (or the labels are not class indices)."""


def uncalibrated(n_exits: int, reason: str, costs_s: Sequence[float | None] | None = None) -> list[JSON]:
    """The `exits` of every result of a chain that has no calibration and no frontier, saying why."""
    costs = list(costs_s) if costs_s is not None else [None] * n_exits
    return [{"temperature": 1.0, "calibration": None, "cost_s": _cost(costs[k]), "frontier": None, "reason": reason}
            for k in range(n_exits)]


def _cost(value: float | None) -> float | None:
    return None if value is None or not np.isfinite(value) or value < 0 else float(value)


def class_labels(y: npt.ArrayLike, n_classes: int) -> npt.NDArray[np.int64]:
    """Labels as class indices: integers (n,) or (n, 1) as they are, one-hot rows (n, classes) by argmax."""
    labels = np.asarray(y)
    if labels.ndim == 2 and labels.shape[1] == n_classes and n_classes > 1:
        labels = labels.argmax(axis=1)
    labels = labels.reshape(len(labels), -1)
    if labels.shape[1] != 1:
        raise NotProbabilities(f"labels of shape {np.asarray(y).shape[1:]} are not class indices")
    flat = labels[:, 0]
    if len(flat) and (not np.all(np.isfinite(flat.astype(np.float64))) or not np.all(flat == np.round(flat))):
        raise NotProbabilities("the labels are not integer class indices")
    out = flat.astype(np.int64)
    if len(out) and (out.min() < 0 or out.max() >= n_classes):
        raise NotProbabilities(f"the labels run from {out.min()} to {out.max()}, outside the exits' {n_classes} "
                               "classes")
    return out


def _check_probs(probs: Sequence[Probs], n: int, split: str) -> list[npt.NDArray[np.float64]]:
    out = []
    for k, p in enumerate(probs):
        a = np.asarray(p, dtype=np.float64)
        if a.ndim != 2 or a.shape[0] != n or a.shape[1] < 2:
            raise NotProbabilities(f"exit {k} gives outputs of shape {a.shape[1:]} on the {split} split, not one "
                                   "probability per class")
        if n and (not np.isfinite(a).all() or a.min() < -1e-6 or np.abs(a.sum(axis=1) - 1).max() > SUM_TOLERANCE):
            raise NotProbabilities(f"exit {k}'s outputs are not probabilities (softmax rows summing to 1): its "
                                   "confidence cannot be calibrated")
        out.append(a)
    if len({a.shape[1] for a in out}) > 1:
        raise NotProbabilities("the exits do not predict the same number of classes")
    return out


def chain_exits(val_probs: Sequence[Probs], val_labels: npt.ArrayLike, test_probs: Sequence[Probs],
                test_labels: npt.ArrayLike, costs_s: Sequence[float]) -> list[JSON]:
    """Per exit of a chain (lowest tier first; one exit for a single model), the `exits` field of its result's
    report: `val_probs[k]` / `test_probs[k]` are exit k's softmax outputs on the split (samples x classes),
    the labels the split's labels, `costs_s[k]` sub-model k's measured compute per sample in seconds."""
    k_exits = len(val_probs)
    if k_exits == 0 or len(test_probs) != k_exits or len(costs_s) != k_exits:
        raise ValueError("give every exit's outputs on both splits and one cost per exit")
    n_val = len(np.asarray(val_labels))
    if n_val == 0:
        return uncalibrated(k_exits, "validation_rate is 0: there are no validation samples to fit the exits' "
                                     "temperatures and choose limits on; serve with typed limits, or announce "
                                     "the data with a validation_rate", costs_s)
    if n_val < MIN_VALIDATION:
        return uncalibrated(k_exits, f"only {n_val} validation samples: at least {MIN_VALIDATION} are needed to fit "
                                     "the exits' temperatures and certify limits; serve with typed limits, or "
                                     "send more data or a larger validation_rate", costs_s)
    try:
        val = _check_probs(val_probs, n_val, "validation")
        y_val = class_labels(val_labels, val[0].shape[1])
        n_test = len(np.asarray(test_labels))
        test = _check_probs(test_probs, n_test, "test") if n_test else []
        y_test = class_labels(test_labels, val[0].shape[1]) if n_test else None
    except NotProbabilities as exc:
        return uncalibrated(k_exits, f"{exc}; serve with typed limits", costs_s)
    measured_on = "test" if test else "validation"
    calibration = calibrate_exits(val, y_val, test or val, y_test if y_test is not None else y_val)
    temperatures = [c.temperature for c in calibration]
    costs = [_cost(c) or 0.0 for c in costs_s]
    record: JSON | None = build_frontier_record(val, y_val, temperatures, costs, test_probs=test or None,
                                                test_labels=y_test)
    reason = None if test else "no test split: accuracy and calibration error are measured on the validation split"
    assert record is not None
    if len(json.dumps(record)) > MAX_RECORD_BYTES:
        record = {**record, "entries": [{**e, "test": None} for e in record["entries"]]}
        reason = "the frontier's test-split evaluation was left out to keep the report small"
    if len(json.dumps(record)) > MAX_RECORD_BYTES:
        record = None
        reason = (f"the exit frontier is larger than {MAX_RECORD_BYTES} bytes of JSON and was not reported; serve "
                  "with typed limits")
    out = []
    for k, cal in enumerate(calibration):
        top = k == k_exits - 1
        out.append({"temperature": cal.temperature, "calibration": cal.to_json() | {"measured_on": measured_on},
                    "cost_s": _cost(costs_s[k]), "frontier": record if top else None,
                    "reason": reason if (top or measured_on == "validation") else None})
    return out
