"""What a tier compares and what it answers (issue 10, item 4; pure, no I/O).

A typed limit compares the raw max(p), exactly as Kafka-ML, and its answers are what they were before
calibration existed; a limit chosen from a target compares the calibrated confidence, computed by
tiers/calibration.py `calibrated_confidence` with the tier's T and eps, and its answers carry that confidence
with the raw one beside it, `values` staying raw.
"""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from tierflow.streams import wire
from tierflow.streams.settings import KafkaSettings
from tierflow.streams.wire import InputSpec, WireRecord
from tierflow.tiers.calibration import calibrated_confidence
from tierflow.tiers.tier_agent import TierAgent
from tierflow.tiers.tier_cli import config_from_inference
from tierflow.tiers.tier_config import TierConfig

#: Raw max(p): 0.9, 0.75, 0.55, 0.97. With T = 0.5 (sharpening) the middle ones rise, with T = 2 they fall.
PROBS = np.array([[0.9, 0.05, 0.05], [0.75, 0.2, 0.05], [0.55, 0.4, 0.05], [0.01, 0.02, 0.97]], dtype=np.float32)


def agent(compare: str = "raw", temperature: float = 1.0, limit: float = 0.8, *, top: bool = False) -> TierAgent:
    config = TierConfig(inference_id=3, tier_index=0, top=top, input_topic="in", output_topic="out",
                        upper_topic=None if top else "up", limit=limit, bootstrap_servers="k:9092", port=0,
                        compare=compare, temperature=temperature, eps=1e-12)
    return TierAgent(config, KafkaSettings(bootstrap_servers="k:9092"))


def batch_of(n: int, *, batched: bool = False) -> wire.DecodedBatch:
    x = np.zeros((n, 4), dtype=np.float32)
    if batched:
        value, headers = wire.encode_tensor(x)
        records = [WireRecord("in", 0, 9, value, tuple(headers), 100)]
    else:
        records = [WireRecord("in", 0, i, x[i].tobytes(), (), 100) for i in range(n)]
    return wire.decode_records(records, InputSpec((4,)), now_ms=0.0)


# -- typed limits: the raw max(p), unchanged ---------------------------------------------------------------


def test_a_typed_limit_compares_the_raw_max_and_answers_as_before_calibration() -> None:
    tier = agent("raw", limit=0.75)
    assert tier._compared_confidence(PROBS) is None  # the raw path: answered_mask takes max(p) itself
    answered = wire.answered_mask(PROBS, 0.75, confidence=tier._compared_confidence(PROBS))
    assert answered.tolist() == [True, True, False, True]  # 0.75 >= 0.75 answers, as Kafka-ML
    batch = batch_of(4)
    plain = wire.encode_answers(batch, PROBS, answered, tier=0, answered_ms=150.0)
    assert wire.encode_answers(batch, PROBS, answered, tier=0, answered_ms=150.0, confidence=None) == plain
    docs = [orjson.loads(v) for v in plain]
    assert all("raw_confidence" not in d for d in docs)
    assert [d["confidence"] for d in docs] == pytest.approx([0.9, 0.75, 0.97])
    # Readers see the raw confidence either way.
    assert [a.raw_confidence for v in plain for a in wire.read_answers(v)] == pytest.approx([0.9, 0.75, 0.97])


def test_an_inference_that_names_no_comparison_serves_typed_limits_on_the_raw_max() -> None:
    # An inference requested before calibration existed (the upcaster gives compare "raw", T 1) or one whose
    # tiers say nothing: the tier compares the raw max(p).
    inference = {"id": 4, "input_topic": "in", "output_topic": "out",
                 "tiers": [{"index": 0, "result_id": 1, "input_topic": "in", "upper_topic": "up", "limit": 0.7},
                           {"index": 1, "result_id": 2, "input_topic": "up", "upper_topic": None, "limit": 1.0}]}
    cfg = config_from_inference(inference, 0, model=b"m", default_servers="k:9092")
    assert (cfg.compare, cfg.temperature, cfg.shadow_fraction, cfg.predicted_chain) == ("raw", 1.0, 0.0, None)


# -- limits from a target: the calibrated confidence ------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_a_limit_from_a_target_compares_exactly_what_calibration_computed(temperature: float) -> None:
    tier = agent("calibrated", temperature)
    confidence = tier._compared_confidence(PROBS)
    assert confidence is not None
    expected = calibrated_confidence(PROBS, temperature, 1e-12)
    np.testing.assert_array_equal(confidence, expected)  # the very function the limits were chosen with
    assert wire.answered_mask(PROBS, 0.8, confidence=confidence).tolist() == (expected >= 0.8).tolist()


def test_temperature_moves_samples_across_the_limit_the_raw_max_would_not() -> None:
    raw = wire.answered_mask(PROBS, 0.8)
    sharp = wire.answered_mask(PROBS, 0.8, confidence=agent("calibrated", 0.5)._compared_confidence(PROBS))
    soft = wire.answered_mask(PROBS, 0.8, confidence=agent("calibrated", 2.0)._compared_confidence(PROBS))
    assert raw.tolist() == [True, False, False, True]
    assert sharp.tolist() == [True, True, False, True]  # 0.75 sharpened to ~0.93
    assert soft.tolist() == [False, False, False, True]  # 0.9 softened to ~0.68


def test_calibrated_answers_keep_raw_values_and_carry_both_confidences() -> None:
    tier = agent("calibrated", 0.5)
    confidence = tier._compared_confidence(PROBS)
    assert confidence is not None
    answered = wire.answered_mask(PROBS, 0.8, confidence=confidence)
    single = wire.encode_answers(batch_of(4), PROBS, answered, tier=0, answered_ms=150.0, confidence=confidence)
    docs = [orjson.loads(v) for v in single]
    for doc, i in zip(docs, np.flatnonzero(answered), strict=True):
        assert doc["values"] == pytest.approx(PROBS[i].tolist())  # raw: Kafka-ML clients read these
        assert doc["confidence"] == pytest.approx(confidence[i])
        assert doc["raw_confidence"] == pytest.approx(float(PROBS[i].max()))
        assert doc["class"] == int(PROBS[i].argmax())
    answers = [a for v in single for a in wire.read_answers(v)]
    assert [a.confidence for a in answers] == pytest.approx(confidence[answered].tolist())
    assert [a.raw_confidence for a in answers] == pytest.approx(PROBS.max(axis=1)[answered].tolist())
    # The batched form carries them as parallel lists.
    [batched] = wire.encode_answers(batch_of(4, batched=True), PROBS, answered, tier=0, answered_ms=150.0,
                                    confidence=confidence)
    doc = orjson.loads(batched)
    assert doc["confidences"] == pytest.approx(confidence[answered].tolist())
    assert doc["raw_confidences"] == pytest.approx(PROBS.max(axis=1)[answered].tolist())
    assert [f.raw_confidence for f in wire.answer_fields(batched)] == pytest.approx(doc["raw_confidences"])


def test_the_top_tier_reports_the_confidence_its_inference_compares() -> None:
    tier = agent("calibrated", 2.0, limit=1.0, top=True)
    confidence = tier._compared_confidence(PROBS)
    assert confidence is not None
    answered = wire.answered_mask(PROBS, 1.0, top=True, confidence=confidence)
    assert answered.all()
    docs = [orjson.loads(v) for v in wire.encode_answers(batch_of(4), PROBS, answered, tier=1, answered_ms=1.0,
                                                          confidence=confidence)]
    assert [d["confidence"] for d in docs] == pytest.approx(confidence.tolist())


def test_a_diverged_row_is_forwarded_not_a_crash() -> None:
    probs = np.array([[np.nan, np.nan, np.nan], [0.98, 0.01, 0.01]], dtype=np.float32)
    confidence = agent("calibrated", 1.3)._compared_confidence(probs)
    assert confidence is not None and np.isnan(confidence[0]) and confidence[1] > 0.9
    assert wire.answered_mask(probs, 0.5, confidence=confidence).tolist() == [False, True]


def test_the_apis_predictions_show_both_confidences() -> None:
    from tierflow.api.outputs import flatten_output

    confidence = agent("calibrated", 0.5)._compared_confidence(PROBS)
    answered = np.ones(4, dtype=bool)
    [calibrated] = wire.encode_answers(batch_of(4, batched=True), PROBS, answered, tier=0, answered_ms=1.0,
                                       confidence=confidence)
    [typed] = wire.encode_answers(batch_of(1), PROBS[:1], answered[:1], tier=0, answered_ms=1.0)
    shown = flatten_output(calibrated, 7)
    assert [s["raw_confidence"] for s in shown] == pytest.approx(PROBS.max(axis=1).tolist())
    assert [s["confidence"] for s in shown] == pytest.approx(np.asarray(confidence).tolist())
    assert flatten_output(typed, 7)[0]["raw_confidence"] is None  # its confidence is the raw one
