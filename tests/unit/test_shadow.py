"""Shadow samples (issue 10, item 5; pure, no I/O): how they travel, who refuses them, what the top tier
records, how drift is judged and what `/inferences/{id}/stats` shows per tier."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from tierflow.api.outputs import flatten_shadow, live_section, predicted_section, statistics
from tierflow.streams import wire
from tierflow.streams.exits import DRIFT_MIN_OUTCOMES, binomial_upper, live_agreement
from tierflow.streams.orchestrator import inference_topics
from tierflow.streams.settings import KafkaSettings
from tierflow.streams.wire import InputSpec, ShadowTag, WireRecord
from tierflow.tiers.tier_agent import TierAgent, predicted_agreement_lower
from tierflow.tiers.tier_config import TierConfig

TENSORS = InputSpec((4,))
#: What a tier of the release before shadow samples reads: tensor messages of version 1 only.
OLD_READER = (wire.WIRE_VERSION,)


def shadow_message(n: int = 3, *, offset: int = 0) -> tuple[bytes, wire.Headers]:
    x = np.arange(4 * n, dtype=np.float32).reshape(n, 4)
    tags = [ShadowTag(0, i % 3, 0.9 + i / 100) for i in range(n)]
    return wire.encode_tensor(x, origins=[("in", 0, offset + i, 0) for i in range(n)], ts=[[1.0, 2.0]] * n,
                              single=True, shadow=tags)


# -- the message: version 2 -------------------------------------------------------------------------------


def test_a_shadow_message_is_version_2_and_carries_one_tag_per_sample() -> None:
    _, headers = shadow_message(3)
    h = dict(headers)
    assert h["tierflow.v"] == b"2"
    assert orjson.loads(h["tierflow.shadow"]) == [[0, 0, 0.9], [0, 1, 0.91], [0, 2, 0.92]]
    # Ordinary forwards stay version 1 (a tier of the earlier release keeps reading them).
    assert dict(wire.encode_tensor(np.zeros((1, 4), np.float32))[1])["tierflow.v"] == b"1"


def test_the_reader_marks_shadow_samples_inside_a_mixed_batch() -> None:
    value, headers = shadow_message(2, offset=50)
    plain = np.ones(4, dtype=np.float32).tobytes()
    records = [WireRecord("t1", 0, 0, plain), WireRecord("t1", 0, 1, value, tuple(headers)),
               WireRecord("t1", 0, 2, plain)]
    batch = wire.decode_records(records, TENSORS, now_ms=0.0)
    assert batch.rejected == [] and len(batch) == 4
    assert batch.shadow == {1: ShadowTag(0, 0, 0.9), 2: ShadowTag(0, 1, 0.91)}
    assert batch.shadow_mask().tolist() == [False, True, True, False]
    assert batch.origins[1:3] == [("in", 0, 50, 0), ("in", 0, 51, 0)]


def test_a_tier_of_the_earlier_release_dead_letters_a_shadow_message_instead_of_answering_it() -> None:
    value, headers = shadow_message(2)
    batch = wire.decode_records([WireRecord("t1", 0, 7, value, tuple(headers))], TENSORS, now_ms=0.0,
                                versions=OLD_READER)
    assert len(batch) == 0  # nothing to answer
    [rejected] = batch.rejected
    assert rejected.index == 0
    assert "tierflow.v=b'2'" in rejected.reason and "version 1" in rejected.reason


@pytest.mark.parametrize(("headers", "reason"), [
    # A shadow header on a version-1 message: an old reader would answer those samples a second time.
    ([("tierflow.v", b"1"), ("tierflow.dtype", b"float32"), ("tierflow.shape", b"4"),
      ("tierflow.shadow", b"[[0, 1, 0.9]]")], "only allowed in a version 2"),
    ([("tierflow.v", b"2"), ("tierflow.dtype", b"float32"), ("tierflow.shape", b"4")], "needs the header"),
    ([("tierflow.v", b"2"), ("tierflow.dtype", b"float32"), ("tierflow.shape", b"4"),
      ("tierflow.shadow", b"[[0, 1, 0.9], [0, 1, 0.9]]")], "lists 2 samples"),
    ([("tierflow.v", b"2"), ("tierflow.dtype", b"float32"), ("tierflow.shape", b"4"),
      ("tierflow.shadow", b"[[0, -1, 0.9]]")], "[tier, class, confidence]"),
    ([("tierflow.v", b"2"), ("tierflow.dtype", b"float32"), ("tierflow.shape", b"4"),
      ("tierflow.shadow", b"[[0, 1, true]]")], "[tier, class, confidence]"),
])
def test_malformed_shadow_messages_are_refused_with_a_reason(headers: list[tuple[str, bytes]], reason: str) -> None:
    batch = wire.decode_records([WireRecord("t1", 0, 0, b"\0" * 16, tuple(headers))], TENSORS, now_ms=0.0)
    assert len(batch) == 0 and reason in batch.rejected[0].reason


def test_an_intermediate_tier_passes_shadow_samples_up_with_their_tags() -> None:
    value, headers = shadow_message(2)
    batch = wire.decode_records([WireRecord("t1", 0, 0, value, tuple(headers))], TENSORS, now_ms=0.0)
    tensor = np.full((2, 8), 0.5, dtype=np.float32)  # the fog model's tensor output
    [(up, up_headers)] = wire.encode_shadows(batch, tensor, sorted(batch.shadow),
                                             [batch.shadow[i] for i in sorted(batch.shadow)], forwarded_ms=3.0)
    again = wire.decode_records([WireRecord("t2", 0, 0, up, tuple(up_headers))], InputSpec((8,)), now_ms=0.0)
    assert again.shadow == batch.shadow and again.origins == batch.origins
    assert again.ts == [[1.0, 2.0, 3.0]] * 2  # this tier's forward time appended
    assert wire.encode_shadows(batch, tensor, [], [], forwarded_ms=3.0) == []


# -- the top tier's outcomes --------------------------------------------------------------------------------


def test_the_top_tier_records_each_outcome_beside_the_early_answer() -> None:
    value, headers = shadow_message(3)
    batch = wire.decode_records([WireRecord("t2", 0, 0, value, tuple(headers))], TENSORS, now_ms=0.0)
    record = wire.encode_shadow_outcomes(batch, [0, 1, 2], [0, 2, 2], inference=7, top_tier=2, answered_ms=9.0)
    doc = orjson.loads(record)
    assert (doc["inference"], doc["top_tier"]) == (7, 2)
    assert [(o["tier"], o["class"], o["top_class"], o["agree"]) for o in doc["outcomes"]] == [
        (0, 0, 0, True), (0, 1, 2, False), (0, 2, 2, True)]
    outcomes = wire.read_shadow_outcomes(record)
    assert [o.agree for o in outcomes] == [True, False, True]
    assert outcomes[1].origin == ("in", 0, 1, 0)
    # An outcome record is not an answer: the one reader of answers refuses it.
    with pytest.raises(wire.WireError):
        wire.answer_fields(record)
    with pytest.raises(wire.WireError):
        wire.read_shadow_outcomes(b'{"values": [0.5, 0.5]}')


def test_a_tier_picks_the_configured_share_of_its_answers_as_shadows() -> None:
    def tier(fraction: float) -> TierAgent:
        return TierAgent(TierConfig(inference_id=1, tier_index=0, top=False, input_topic="in", output_topic="out",
                                    upper_topic="up", limit=0.5, bootstrap_servers="k:9092", port=0,
                                    shadow_fraction=fraction), KafkaSettings(bootstrap_servers="k:9092"))

    answered = np.arange(20_000) % 2 == 0  # 10,000 answered samples
    assert tier(0.0)._pick_shadows(answered).tolist() == []
    assert tier(1.0)._pick_shadows(answered).tolist() == np.flatnonzero(answered).tolist()
    picked = tier(0.02)._pick_shadows(answered)
    assert set(picked.tolist()) <= set(np.flatnonzero(answered).tolist())
    assert 130 <= len(picked) <= 270  # 200 expected; a binomial's 5 standard deviations are ~70


def test_the_top_tier_finds_each_lower_tiers_predicted_bound() -> None:
    predicted = {"tier_agreement_lower": [0.95, None, 0.8]}
    assert predicted_agreement_lower(predicted, 0) == 0.95
    assert predicted_agreement_lower(predicted, 1) is None  # a tier that answers nothing
    assert predicted_agreement_lower(predicted, 5) is None
    assert predicted_agreement_lower(None, 0) is None  # typed limits


# -- drift ---------------------------------------------------------------------------------------------------


def test_a_few_disagreeing_outcomes_do_not_flag_drift() -> None:
    few = live_agreement(0, DRIFT_MIN_OUTCOMES - 1, 0.95)
    assert (few.agreement, few.n, few.drift) == (0.0, DRIFT_MIN_OUTCOMES - 1, False)


def test_drift_is_flagged_once_the_live_upper_bound_falls_below_the_predicted_lower_bound() -> None:
    live = live_agreement(40, 50, 0.95)
    assert live.agreement == 0.8 and live.agreement_upper is not None and live.agreement_upper < 0.95
    assert live.drift
    assert live.to_json() == {"agreement": 0.8, "n": 50, "agreement_lower": live.agreement_lower, "drift": True}


def test_live_agreement_at_the_predicted_level_is_not_drift() -> None:
    # A tier agreeing live exactly as predicted (97%), at its predicted lower bound (95%), or just below it
    # with few samples: no flag.
    assert not live_agreement(970, 1000, 0.95).drift
    assert not live_agreement(950, 1000, 0.95).drift
    assert not live_agreement(46, 50, 0.95).drift  # 92%: within the noise of 50 outcomes
    assert binomial_upper(46, 50, 0.1) >= 0.95


def test_without_a_prediction_there_is_no_drift_and_without_outcomes_no_agreement() -> None:
    assert not live_agreement(0, 1000, None).drift
    none = live_agreement(0, 0, 0.9)
    assert none.to_json() == {"agreement": None, "n": 0, "agreement_lower": None, "drift": False}
    with pytest.raises(ValueError):
        live_agreement(3, 2, 0.9)


# -- /inferences/{id}/stats ----------------------------------------------------------------------------------

TIERS = [{"index": 0, "predicted": {"share": 0.6, "agreement": 0.97, "agreement_lower": 0.95}},
         {"index": 1, "predicted": {"share": 0.3, "agreement": 0.9, "agreement_lower": 0.85}},
         {"index": 2, "predicted": {"share": 0.1, "agreement": None, "agreement_lower": None}}]


def outcomes(tier: int, agreeing: int, n: int) -> list[dict[str, object]]:
    return [{"tier": tier, "agree": i < agreeing} for i in range(n)]


def test_stats_show_per_tier_the_observed_and_predicted_shares_and_the_live_agreement() -> None:
    samples = [{"tier": t, "latency_ms": 1.0, "timestamp_ms": 1000 + i} for i, t in enumerate([0] * 6 + [1] * 3 + [2])]
    stats = statistics(samples, 3, tier_specs=TIERS, outcomes=outcomes(0, 58, 60) + outcomes(1, 20, 40))
    t0, t1, t2 = stats["tiers"]
    assert (t0["observed_share"], t1["observed_share"], t2["observed_share"]) == (0.6, 0.3, 0.1)
    assert t0["predicted"] == {"share": 0.6, "agreement": 0.97, "agreement_lower": 0.95}
    assert set(t0["live"]) == {"agreement", "n", "agreement_lower", "drift"}  # the UI's contract
    assert (t0["live"]["agreement"], t0["live"]["n"], t0["live"]["drift"]) == (58 / 60, 60, False)
    assert (t1["live"]["agreement"], t1["live"]["n"], t1["live"]["drift"]) == (0.5, 40, True)
    assert t2["live"] is None and t2["predicted"]["agreement"] is None  # the top answers what reaches it
    assert stats["shadow_window"] == 100


def test_typed_limits_have_no_prediction_and_never_drift() -> None:
    typed = [{"index": 0, "predicted": None}, {"index": 1, "predicted": None}]
    predicted = predicted_section(typed)
    assert predicted == [None, None]
    [live, top] = live_section(outcomes(0, 0, 500), predicted)
    assert live == {"agreement": 0.0, "n": 500, "agreement_lower": 0.0, "drift": False} and top is None
    stats = statistics([], 2)  # an inference with no tiers' specs given: the same shape
    assert [(t["predicted"], t["live"]) for t in stats["tiers"]] == [
        (None, {"agreement": None, "n": 0, "agreement_lower": None, "drift": False}), (None, None)]


def test_the_stats_read_shadow_outcome_records_and_skip_anything_else() -> None:
    value, headers = shadow_message(2)
    batch = wire.decode_records([WireRecord("t2", 0, 0, value, tuple(headers))], TENSORS, now_ms=0.0)
    record = wire.encode_shadow_outcomes(batch, [0, 1], [0, 0], inference=7, top_tier=1, answered_ms=9.0)
    assert flatten_shadow(record, 5) == [
        {"tier": 0, "class": 0, "top_class": 0, "agree": True, "timestamp_ms": 5},
        {"tier": 0, "class": 1, "top_class": 0, "agree": False, "timestamp_ms": 5}]
    assert flatten_shadow(record, 5, 1) == flatten_shadow(record, 5)[:1]
    assert flatten_shadow(b'{"values": [1.0]}', 5) == [] and flatten_shadow(b"\xff", 5) == []


# -- the shadow topic ----------------------------------------------------------------------------------------


def test_the_orchestrator_creates_the_shadow_topic_on_the_top_tiers_cluster() -> None:
    inf = {"id": 7, "output_topic": "out", "shadow_fraction": 0.02, "tiers": [
        {"index": 0, "input_topic": "in", "replicas": 1, "bootstrap_servers": "edge:9092"},
        {"index": 1, "input_topic": "t1", "replicas": 1, "bootstrap_servers": None}]}
    shadow = KafkaSettings().shadow_topic(7)
    assert shadow == "tierflow.shadow.7"
    by_cluster = inference_topics(inf, "core:9092", shadow_topic=shadow)
    assert [t.name for t in by_cluster["core:9092"]] == ["t1", "out", shadow]
    assert shadow not in [t.name for t in by_cluster["edge:9092"]]
    # No shadow samples, no shadow topic: a single tier, or a fraction of 0.
    assert shadow not in [t.name for specs in inference_topics(inf | {"shadow_fraction": 0.0}, "core:9092",
                                                              shadow_topic=shadow).values() for t in specs]
    single = inf | {"tiers": inf["tiers"][:1]}
    assert shadow not in [t.name for specs in inference_topics(single, "core:9092", shadow_topic=shadow).values()
                          for t in specs]
