"""The decider's side of calibrated early exits (streams/domain: targets, result reports, inferences): a chain's
exit frontier travels with its top result's report and is folded into the state; a RequestInference with a
`target` gets limits chosen from it, recorded with what each tier compares and what the choice predicts;
typed limits stay exactly as they were (Kafka-ML). Old events read through upcasters. No I/O.

The thesis chain of tests/unit/test_domain.py, deployed: results 1 (edge) -> 2 (fog) -> 3 (cloud). Its
frontier is the hand-made record of tests/unit/test_exits.py (N = 1000 validation samples).
"""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

from tests.unit.test_domain import Decider, cloud, edge, fog, replay
from tests.unit.test_exits import make_record
from tierflow.streams import exits as ex
from tierflow.streams.catalogue import UNCALIBRATED_REASON, upcasters
from tierflow.streams.envelope import JSON, decode_event, event_id_for
from tierflow.tiers.calibration import EPS
from tierflow.tiers.tier_cli import config_from_inference

KERAS = {"keras": {"sha256": "a" * 64, "size": 1}}
BODY = {"result_id": 1, "input_topic": "in", "output_topic": "out"}


def calibration(k: int, temperature: float) -> JSON:
    return {"exit": k, "temperature": temperature, "accuracy": 0.9, "ece_before": 0.08, "ece_after": 0.02,
            "nll_before": 0.5, "nll_after": 0.3, "n_fit": 1000, "n_measured": 1000, "n_bins": 15,
            "measured_on": "test"}


def exits_of(k: int, record: JSON | None = None) -> JSON:
    temperatures = make_record()["temperatures"]
    return {"temperature": temperatures[k], "calibration": calibration(k, temperatures[k]), "cost_s": 1e-4 * 10**k,
            "frontier": record}


def deployed() -> Decider:
    d = Decider()
    d.register("cloud", cloud(), distributed=True)
    d.register("fog", fog(), distributed=True, upper_id=1)
    d.register("edge", edge(), distributed=True, upper_id=2)
    d.deploy(d.configure("thesis", [1]))
    assert [d.state.results[r].chain for r in (1, 2, 3)] == [[1, 2, 3]] * 3
    return d


def report(d: Decider, rid: int, exits: JSON | None) -> JSON:
    payload: JSON = {"result_id": rid, "metrics": {}, "artefacts": KERAS}
    if exits is not None:
        payload["exits"] = exits
    return d.accept("ReportTrainingResult", payload).payload


@pytest.fixture
def trained() -> Decider:
    """The chain finished, its top result carrying the frontier record."""
    d = deployed()
    for k in range(3):
        report(d, k + 1, exits_of(k, make_record() if k == 2 else None))
    return d


def expected(target: dict[str, float], entry: int = 0, **kw: Any) -> ex.ExitChoice:
    return ex.choose_limits(ex.parse_frontier(make_record()), ex.parse_target(target), entry=entry, **kw)


# -- the reports ---------------------------------------------------------------------------------------------


def test_the_chain_frontier_is_folded_from_its_top_results_report(trained: Decider) -> None:
    assert trained.state.exits[3]["frontier"] == make_record()
    assert [trained.state.exits[r]["frontier"] for r in (1, 2)] == [None, None]
    assert [trained.state.exits[r]["temperature"] for r in (1, 2, 3)] == [1.5, 1.2, 0.9]
    # The event is at version 2 and survives the log: replaying it rebuilds the same state.
    assert {e.version for e in trained.events if e.type == "TrainingResultReported"} == {2}
    assert replay(trained.events) == trained.state


def test_a_report_without_exits_reads_as_uncalibrated_and_says_why() -> None:
    d = deployed()
    payload = report(d, 1, None)
    assert payload["exits"]["temperature"] == 1.0
    assert payload["exits"]["calibration"] is None and payload["exits"]["frontier"] is None
    assert "no calibration" in payload["exits"]["reason"]


def test_a_chain_without_validation_samples_reports_why_it_has_no_frontier() -> None:
    d = deployed()
    why = "validation_rate is 0: no validation samples to fit temperatures or choose limits on"
    for rid in (1, 2, 3):
        report(d, rid, {"temperature": 1.0, "calibration": None, "cost_s": 1e-4, "frontier": None, "reason": why})
    assert d.state.exits[3]["reason"] == why
    message = d.reject("RequestInference", BODY | {"target": {"max_accuracy_drop": 0.01}}, field="target")
    assert message == f"result 1's chain has no exit frontier to choose limits from a target: {why}"


@pytest.mark.parametrize(("rid", "exits", "field"), [
    (1, exits_of(0, make_record()), "exits.frontier"),  # the frontier belongs to the top's report
    (3, exits_of(2, make_record() | {"temperatures": [1.5, 0.9], "costs_s": [1e-4, 1e-2], "entries": [
        e | {"entry": 0} for e in make_record()["entries"][1:2]]}), "exits.frontier.temperatures"),  # 2 tiers
    (3, exits_of(2, make_record()) | {"temperature": 1.0, "calibration": calibration(2, 1.0)},
     "exits.frontier.temperatures"),  # not the temperature the frontier was computed with
    (3, exits_of(2, make_record() | {"version": 9}), "exits.frontier.version"),
    (3, exits_of(2) | {"frontier": None}, "exits.reason"),  # the top's report says why there is no frontier
    (1, exits_of(0) | {"calibration": None}, "exits.reason"),
    (1, exits_of(0) | {"temperature": -1.0}, "exits.temperature"),
    (1, exits_of(0) | {"colour": "red"}, "exits.colour"),
    (1, exits_of(0) | {"calibration": calibration(0, 1.5) | {"ece_after": 2.0}}, "exits.calibration.ece_after"),
])
def test_a_malformed_exits_field_is_rejected_naming_it(rid: int, exits: JSON, field: str) -> None:
    d = deployed()
    d.reject("ReportTrainingResult", {"result_id": rid, "metrics": {}, "artefacts": KERAS, "exits": exits},
             field=field)
    assert d.state.exits == {}


def test_a_tampered_frontier_is_rejected_by_its_own_identities() -> None:
    record = make_record()
    record["entries"][0]["validation"]["b"][1] += 1  # correct != top_correct - b + c
    d = deployed()
    message = d.reject("ReportTrainingResult", {"result_id": 3, "metrics": {}, "artefacts": KERAS,
                                                "exits": exits_of(2, record)},
                       field="exits.frontier.entries[0].validation point 1")
    assert "top_correct - b + c" in message


# -- limits from a target ------------------------------------------------------------------------------------


def test_a_target_chooses_the_limits_and_records_what_they_compare_and_predict(trained: Decider) -> None:
    choice = expected({"max_accuracy_drop": 0.02})
    p = trained.accept("RequestInference", BODY | {"target": {"max_accuracy_drop": 0.02}}).payload

    assert p["target"] == {"max_accuracy_drop": 0.02}
    assert [t["limit"] for t in p["tiers"]] == [*choice.limits, 1.0]
    assert [t["compare"] for t in p["tiers"]] == ["calibrated"] * 3
    assert [t["temperature"] for t in p["tiers"]] == [1.5, 1.2, 0.9]
    assert {t["eps"] for t in p["tiers"]} == {1e-12}
    assert [t["predicted"]["share"] for t in p["tiers"]] == choice.shares
    assert [t["predicted"]["agreement"] for t in p["tiers"]] == [*choice.tier_agreement, None]
    assert [t["predicted"]["agreement_lower"] for t in p["tiers"]] == [*choice.tier_agreement_lower, None]
    predicted = p["predicted"]
    assert (predicted["shares"], predicted["accuracy"], predicted["agreement"]) == \
        (choice.shares, choice.accuracy, choice.agreement)
    assert predicted["accuracy_drop_upper"] <= 0.02 and predicted["split"] == "validation"
    # The same limits on the test split (the hand-made record's test counts are its validation counts).
    assert predicted["test"]["shares"] == choice.shares and predicted["test"]["accuracy"] == choice.accuracy
    assert p["shadow_fraction"] == 0.02
    assert replay(trained.events) == trained.state


def test_a_mid_chain_entry_chooses_on_its_own_frontier(trained: Decider) -> None:
    choice = expected({"max_accuracy_drop": 0.05}, entry=1)
    p = trained.accept("RequestInference", BODY | {"result_id": 2, "target": {"max_accuracy_drop": 0.05}}).payload
    assert [t["result_id"] for t in p["tiers"]] == [2, 3]
    assert [t["limit"] for t in p["tiers"]] == [*choice.limits, 1.0]
    assert [t["temperature"] for t in p["tiers"]] == [1.2, 0.9]
    assert p["predicted"]["entry"] == 1 and p["predicted"]["test"] is None  # entry 1 has no test counts


def test_cost_overrides_are_keyed_by_result_and_change_the_expected_compute(trained: Decider) -> None:
    target = {"max_top_share": 0.5}
    p = trained.accept("RequestInference", BODY | {"target": target, "costs_s": {"3": 1.0},
                                                   "tiers": [{"result_id": 1, "cost_s": 0.5}]}).payload
    choice = expected(target, costs_s={2: 1.0, 0: 0.5})
    assert p["predicted"]["costs_s"] == [0.5, 1e-3, 1.0]
    assert p["predicted"]["cost_s"] == pytest.approx(choice.cost_s)


def test_an_unreachable_target_is_refused_naming_the_best_reachable_value(trained: Decider) -> None:
    with pytest.raises(ex.TargetUnreachable) as refused:
        expected({"min_accuracy": 0.99})
    message = trained.reject("RequestInference", BODY | {"target": {"min_accuracy": 0.99}}, field="target")
    assert message == refused.value.message
    assert f"the best any limits reach is {refused.value.best:.4g}" in message


def test_a_target_the_validation_split_is_too_small_to_certify_is_refused_saying_so(trained: Decider) -> None:
    with pytest.raises(ex.SplitTooSmall) as refused:
        expected({"max_accuracy_drop": 0.005})
    message = trained.reject("RequestInference", BODY | {"target": {"max_accuracy_drop": 0.005}}, field="target")
    assert message == refused.value.message
    assert "validation split (1000 samples) is too small" in message


@pytest.mark.parametrize(("extra", "field"), [
    ({"target": {"max_accuracy_drop": 0.01}, "limit": 0.8}, "target"),
    ({"target": {"max_accuracy_drop": 0.01}, "limits": {"1": 0.8}}, "target"),
    ({"target": {"max_accuracy_drop": 0.01}, "tiers": [{"result_id": 2, "limit": 0.8}]}, "target"),
    ({"target": {"max_accuracy_drop": 0.01, "min_accuracy": 0.9}}, "target"),
    ({"target": {"max_accuracy_drop": 1.5}}, "target.max_accuracy_drop"),
    ({"target": {"max_accuracy_drop": 0.01}, "costs_s": {"7": 1.0}}, "costs_s"),
    ({"target": {"max_accuracy_drop": 0.01}, "costs_s": {"1": -1}}, "costs_s.1"),
    ({"limit": 0.8, "costs_s": {"1": 1e-3}}, "costs_s"),  # costs only mean something with a target
    ({"shadow_fraction": 1.5}, "shadow_fraction"),
    ({"shadow_fraction": True}, "shadow_fraction"),
])
def test_target_fields_are_checked(trained: Decider, extra: JSON, field: str) -> None:
    trained.reject("RequestInference", BODY | extra, field=field)


# -- typed limits (Kafka-ML) stay as they were -----------------------------------------------------------------


def test_typed_limits_keep_comparing_the_raw_confidence(trained: Decider) -> None:
    p = trained.accept("RequestInference", BODY | {"limit": 0.7, "limits": {"2": 0.9},
                                                   "shadow_fraction": 0.5}).payload
    assert [t["limit"] for t in p["tiers"]] == [0.7, 0.9, 1.0]
    assert [(t["compare"], t["temperature"], t["predicted"]) for t in p["tiers"]] == [("raw", 1.0, None)] * 3
    assert (p["target"], p["predicted"], p["shadow_fraction"]) == (None, None, 0.5)


def test_the_tier_config_carries_what_its_tier_compares() -> None:
    d = deployed()
    for k in range(3):
        report(d, k + 1, exits_of(k, make_record() if k == 2 else None))
    inference = d.accept("RequestInference", BODY | {"target": {"max_accuracy_drop": 0.02}}).payload
    edge_tier = config_from_inference(inference, 0, model=b"m", default_servers="b:9092")
    top_tier = config_from_inference(inference, 2, model=b"m", default_servers="b:9092")
    assert (edge_tier.compare, edge_tier.temperature, edge_tier.eps) == ("calibrated", 1.5, EPS)
    assert edge_tier.limit == inference["tiers"][0]["limit"] and edge_tier.shadow_fraction == 0.02
    assert edge_tier.predicted == inference["tiers"][0]["predicted"]
    assert edge_tier.target == {"max_accuracy_drop": 0.02} and edge_tier.predicted_chain == inference["predicted"]
    assert (top_tier.compare, top_tier.temperature, top_tier.top) == ("calibrated", 0.9, True)
    # A typed-limit inference (and one from before calibration) configures today's comparison.
    typed = d.accept("RequestInference", BODY | {"limit": 0.6}).payload
    for old in (typed, {k: v for k, v in typed.items() if k not in ("shadow_fraction", "target", "predicted")}
                | {"tiers": [{k: v for k, v in t.items() if k not in ("compare", "temperature", "eps", "predicted")}
                             for t in typed["tiers"]]}):
        cfg = config_from_inference(old, 0, model=b"m", default_servers="b:9092")
        assert (cfg.compare, cfg.temperature, cfg.limit, cfg.predicted) == ("raw", 1.0, 0.6, None)
    assert EPS == ex.DEFAULT_EPS  # the tier clips as the job did when the limits were chosen


# -- events written before calibration ------------------------------------------------------------------------


def v1(event_type: str, payload: JSON) -> bytes:
    return orjson.dumps({"id": event_id_for("c"), "seq": 1, "type": event_type, "version": 1,
                         "aggregate": "deployment:1", "aggregate_version": 1, "command_id": "c",
                         "occurred_at": "t", "payload": payload})


def test_a_result_reported_before_calibration_reads_as_temperature_1_without_frontier() -> None:
    payload = {"deployment_id": 1, "result_id": 3, "metrics": {}, "artefacts": KERAS, "at": "t"}
    event = decode_event(v1("TrainingResultReported", payload), upcasters())
    assert event.version == 2
    assert event.payload["exits"] == {"temperature": 1.0, "calibration": None, "cost_s": None, "frontier": None,
                                      "reason": UNCALIBRATED_REASON}
    assert "exits" not in payload  # the stored event is untouched


def test_an_inference_requested_before_calibration_reads_as_typed_raw_limits() -> None:
    tiers = [{"index": 0, "result_id": 1, "limit": 0.8, "top": False}, {"index": 1, "result_id": 2, "limit": 1.0,
                                                                         "top": True}]
    event = decode_event(v1("InferenceRequested", {"id": 1, "tiers": copy.deepcopy(tiers)}), upcasters())
    assert event.version == 2
    assert [(t["limit"], t["compare"], t["temperature"], t["eps"], t["predicted"]) for t in event.payload["tiers"]] \
        == [(0.8, "raw", 1.0, 1e-12, None), (1.0, "raw", 1.0, 1e-12, None)]
    assert (event.payload["shadow_fraction"], event.payload["target"], event.payload["predicted"]) == (0.0, None, None)


def test_a_chain_trained_before_calibration_refuses_a_target_and_serves_typed_limits() -> None:
    d = deployed()
    for rid in (1, 2, 3):
        report(d, rid, None)
    # Written at v1 (before the change) and read back: the upcaster's reason is what the refusal names.
    old = [decode_event(v1(e.type, {k: v for k, v in e.payload.items() if k != "exits"}), upcasters())
           if e.type == "TrainingResultReported" else e for e in d.events]
    d.state = replay(old)
    message = d.reject("RequestInference", BODY | {"target": {"max_accuracy_drop": 0.01}}, field="target")
    assert message.endswith(UNCALIBRATED_REASON)
    assert d.accept("RequestInference", BODY | {"limit": 0.8}).payload["tiers"][0]["compare"] == "raw"
