"""Early-exit routing: which tier answers a sample, and where a tier reads and writes (pure, no I/O)."""

from __future__ import annotations

import numpy as np
import pytest

from tierflow.streams import wire
from tierflow.streams.wire import InputSpec, WireRecord
from tierflow.tiers.tier_cli import TierSetupError, config_from_inference, verify_sha256

PROBS = np.array([[0.1, 0.9], [0.5, 0.5], [0.79, 0.21], [0.8, 0.2]], dtype=np.float32)


# -- the exit rule ----------------------------------------------------------------------------------------


def test_a_sample_is_answered_when_its_highest_probability_reaches_the_limit() -> None:
    assert wire.answered_mask(PROBS, 0.8).tolist() == [True, False, False, True]  # 0.8 >= 0.8 answers


def test_limit_zero_answers_everything_and_a_limit_above_one_nothing() -> None:
    assert wire.answered_mask(PROBS, 0.0).all()
    assert not wire.answered_mask(PROBS, 1.01).any()


def test_the_top_tier_always_answers() -> None:
    assert wire.answered_mask(PROBS, 1.01, top=True).all()


def test_nan_probabilities_are_forwarded_not_answered() -> None:
    probs = np.array([[np.nan, np.nan], [0.9, 0.1]], dtype=np.float32)
    assert wire.answered_mask(probs, 0.5).tolist() == [False, True]


def test_no_samples_no_answers() -> None:
    assert wire.answered_mask(np.zeros((0, 10), np.float32), 0.5).shape == (0,)
    assert wire.answered_mask(np.zeros((0, 10), np.float32), 0.5, top=True).shape == (0,)


@pytest.mark.parametrize("limit", [0.0, 0.5, 0.9, 1.01])
def test_every_sample_is_either_answered_or_forwarded_exactly_once(limit: float) -> None:
    rng = np.random.default_rng(3)
    x = rng.random((10, 64)).astype(np.float32)
    value, headers = wire.encode_tensor(x[5:])
    records = [WireRecord("in", 0, i, x[i].tobytes(), (), 10) for i in range(5)]
    records.append(WireRecord("in", 0, 5, value, headers, 10))
    batch = wire.decode_records(records, InputSpec((64,)), now_ms=0.0)
    logits = rng.normal(size=(10, 10)) * 3
    probs = (np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)).astype(np.float32)
    answered = wire.answered_mask(probs, limit)
    out = [a for v in wire.encode_answers(batch, probs, answered, tier=0, answered_ms=20.0)
           for a in wire.read_answers(v)]
    up = [o for v, h in wire.encode_forwards(batch, x, ~answered, forwarded_ms=20.0)
          for o in wire.decode_records([WireRecord("fog", 0, 0, v, h)], InputSpec((64,)), now_ms=0.0).origins]
    assert sorted([a.origin for a in out] + up) == sorted(batch.origins)
    assert {a.origin for a in out}.isdisjoint(up)
    for a in out:  # the answer is the argmax of the sample's probabilities
        i = batch.origins.index(a.origin)
        assert a.cls == int(probs[i].argmax()) and a.confidence == pytest.approx(float(probs[i].max()))


# -- where each tier reads and writes (GET /inferences/{id} -> TierConfig) ---------------------------------

INFERENCE = {
    "id": 7, "status": "running", "result_id": 11, "input_topic": "in", "output_topic": "out",
    "input_format": "RAW", "input_config": {"data_type": "uint8", "data_reshape": "28 28"},
    "tiers": [
        {"index": 2, "result_id": 13, "model_name": "cloud", "input_topic": "t2", "upper_topic": None, "limit": 0.9,
         "replicas": 1, "bootstrap_servers": ""},
        {"index": 0, "result_id": 11, "model_name": "edge", "input_topic": "in", "upper_topic": "t1", "limit": 0.6,
         "replicas": 2, "bootstrap_servers": "edge-site:9092"},
        {"index": 1, "result_id": 12, "model_name": "fog", "input_topic": "t1", "upper_topic": "t2", "limit": 0.7,
         "replicas": 1, "bootstrap_servers": None},
    ],
}


def test_the_entry_tier_reads_the_datasource_format_and_forwards_to_the_next_cluster() -> None:
    cfg = config_from_inference(INFERENCE, 0, model=b"m", default_servers="core:9092")
    assert (cfg.input_topic, cfg.upper_topic, cfg.output_topic, cfg.limit, cfg.top) == ("in", "t1", "out", 0.6, False)
    assert cfg.bootstrap_servers == "edge-site:9092" and cfg.upper_servers == "core:9092"
    assert cfg.input_config is not None and cfg.input_config.data_type == "uint8"
    assert cfg.group == "tierflow-inference-7-tier-0"


def test_an_upper_tier_reads_tensors_and_the_last_one_is_the_top() -> None:
    fog = config_from_inference(INFERENCE, 1, model=b"m", default_servers="core:9092")
    assert fog.input_config is None and not fog.top and fog.upper_topic == "t2"
    assert fog.bootstrap_servers == fog.upper_servers == "core:9092"
    cloud = config_from_inference(INFERENCE, 2, model=b"m", default_servers="core:9092", engine="litert",
                                  max_batch=64, linger_ms=2, port=0)
    assert cloud.top and cloud.upper_topic is None and cloud.limit == 0.9
    assert (cloud.engine, cloud.max_batch, cloud.linger_ms, cloud.port) == ("litert", 64, 2, 0)


def test_an_unknown_tier_is_a_permanent_error() -> None:
    with pytest.raises(TierSetupError, match="has no tier 5") as caught:
        config_from_inference(INFERENCE, 5, model=b"m", default_servers="core:9092")
    assert caught.value.exit_code == 2


def test_a_download_that_does_not_match_its_checksum_is_a_transient_error() -> None:
    import hashlib

    verify_sha256(b"model", hashlib.sha256(b"model").hexdigest().upper(), "m")
    with pytest.raises(TierSetupError, match="hash to") as caught:
        verify_sha256(b"model", "0" * 64, "m")
    assert caught.value.exit_code == 1
    with pytest.raises(TierSetupError, match="no X-Sha256"):
        verify_sha256(b"model", None, "m")


def test_a_model_file_given_by_hand_picks_its_engine_by_suffix_unless_one_is_asked_for() -> None:
    from pathlib import Path

    from tierflow.tiers.tier_cli import engine_for_file

    assert engine_for_file("auto", Path("edge.tflite")) == "litert"
    assert engine_for_file("auto", Path("edge.keras")) == engine_for_file("auto", Path("edge.h5")) == "keras"
    assert engine_for_file("keras", Path("edge.tflite")) == "keras"  # asked for: as asked (the load says why not)
