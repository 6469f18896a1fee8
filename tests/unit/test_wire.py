"""The tiers' data-plane wire formats (streams/wire.py): inputs decoded, answers and forwards encoded (no I/O)."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from tierflow.streams import wire
from tierflow.streams.wire import InputSpec, WireRecord

IMAGES = InputSpec((28, 28, 1), raw_dtype=np.dtype(np.uint8), raw_shape=(28, 28))  # a first tier, Kafka-ML's
TENSORS = InputSpec((64,))  # a fog tier: float32 tensors of the fog model's input


def raw(offset: int, value: bytes | None, *, topic: str = "in", ts: int = 1000,
        headers: tuple[tuple[str, bytes], ...] = ()) -> WireRecord:
    return WireRecord(topic, 0, offset, value, headers, ts)


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)


# -- Kafka-ML inputs ---------------------------------------------------------------------------------------


def test_kafka_ml_raw_samples_decode_into_one_batch_with_their_origins() -> None:
    # A Kafka-ML client sends `x_test[i].tobytes()` with no headers: one sample per record.
    x = images(3)
    batch = wire.decode_records([raw(10 + i, x[i].tobytes(), ts=1000 + i) for i in range(3)], IMAGES, now_ms=5e3)
    assert batch.x.shape == (3, 28, 28, 1) and batch.x.dtype == np.float32
    np.testing.assert_array_equal(batch.x[..., 0], x.astype(np.float32))
    assert batch.origins == [("in", 0, 10, 0), ("in", 0, 11, 0), ("in", 0, 12, 0)]
    assert batch.ts == [[1000.0], [1001.0], [1002.0]]
    assert batch.single.tolist() == [True, True, True] and batch.record.tolist() == [0, 1, 2]
    assert batch.rejected == []


def test_kafka_ml_float32_tensor_and_thesis_json_lists_feed_a_fog_tier() -> None:
    t = np.arange(64, dtype=np.float32) / 64
    records = [
        raw(0, t.tobytes()),  # Kafka-ML forwards raw float32 bytes, one sample per record
        raw(1, orjson.dumps(t.reshape(8, 8).tolist())),  # the 2020 thesis: a nested JSON list
        raw(2, orjson.dumps(t.tolist())),  # or a flat one
    ]
    batch = wire.decode_records(records, TENSORS, now_ms=0.0)
    assert batch.rejected == []
    assert batch.x.shape == (3, 64)
    for row in batch.x:
        np.testing.assert_allclose(row, t)


def test_a_record_without_a_timestamp_takes_the_arrival_time() -> None:
    batch = wire.decode_records([raw(0, images(1)[0].tobytes(), ts=-1)], IMAGES, now_ms=777.0)
    assert batch.ts == [[777.0]]


# -- tierflow tensor messages ------------------------------------------------------------------------------


def test_a_clients_batched_record_gets_one_origin_per_sample_from_its_position() -> None:
    x = images(5)
    value, headers = wire.encode_tensor(x)  # no origins: the client does not know its offset yet
    batch = wire.decode_records([raw(7, value, headers=tuple(headers), ts=2000)], IMAGES, now_ms=0.0)
    assert batch.x.shape == (5, 28, 28, 1)
    assert batch.origins == [("in", 0, 7, i) for i in range(5)]
    assert batch.ts == [[2000.0]] * 5
    assert batch.single.tolist() == [False] * 5


def test_a_forwarded_tensor_keeps_the_original_origins_and_timestamps() -> None:
    t = np.random.default_rng(1).random((2, 64)).astype(np.float32)
    origins = [("in", 3, 41, 0), ("in", 1, 9, 4)]
    value, headers = wire.encode_tensor(t, origins=origins, ts=[[100.0, 105.5], [90.0, 105.5]], single=True)
    batch = wire.decode_records([WireRecord("fog", 0, 0, value, headers, 106)], TENSORS, now_ms=0.0)
    assert batch.origins == origins
    assert batch.ts == [[100.0, 105.5], [90.0, 105.5]]
    assert batch.single.tolist() == [True, True]
    np.testing.assert_array_equal(batch.x, t)


def test_headers_carry_dtype_shape_and_json_lists() -> None:
    value, headers = wire.encode_tensor(np.zeros((2, 3, 4), dtype=np.float64), origins=[("a", 0, 1, 0)] * 2,
                                        ts=[[1.0], [2.0]])
    h = dict(headers)
    assert (h["tierflow.v"], h["tierflow.dtype"], h["tierflow.shape"]) == (b"1", b"float64", b"3,4")
    assert orjson.loads(h["tierflow.origins"]) == [["a", 0, 1, 0], ["a", 0, 1, 0]]
    assert orjson.loads(h["tierflow.ts"]) == [[1.0], [2.0]]
    assert "tierflow.single" not in h and len(value) == 2 * 12 * 8


def test_samples_reshape_to_the_model_input_and_cast_to_its_dtype() -> None:
    # (28, 28) uint8 samples feed a (28, 28, 1) float32 model: same element count.
    value, headers = wire.encode_tensor(images(2))
    batch = wire.decode_records([raw(0, value, headers=tuple(headers))], IMAGES, now_ms=0.0)
    assert batch.x.shape == (2, 28, 28, 1) and batch.x.dtype == np.float32


def test_mixed_record_kinds_keep_record_order() -> None:
    x = images(4)
    value, headers = wire.encode_tensor(x[1:3])
    records = [raw(0, x[0].tobytes()), raw(1, value, headers=tuple(headers)), raw(2, x[3].tobytes())]
    batch = wire.decode_records(records, IMAGES, now_ms=0.0)
    np.testing.assert_array_equal(batch.x[..., 0], x.astype(np.float32))
    assert batch.record.tolist() == [0, 1, 1, 2]
    assert batch.origins == [("in", 0, 0, 0), ("in", 0, 1, 0), ("in", 0, 1, 1), ("in", 0, 2, 0)]
    assert batch.single.tolist() == [True, False, False, True]


# -- malformed inputs --------------------------------------------------------------------------------------


def _reasons(records: list[WireRecord], spec: InputSpec) -> dict[int, str]:
    batch = wire.decode_records(records, spec, now_ms=0.0)
    return {r.index: r.reason for r in batch.rejected}


def test_malformed_records_are_reported_with_a_reason_and_left_out() -> None:
    good = images(1)[0].tobytes()
    f32 = images(1)[0].astype(np.float32).tobytes()
    records = [raw(0, good), raw(1, b""), raw(2, None), raw(3, good[:-1]), raw(4, f32), raw(5, b"[1, 2, oops]"),
               raw(6, good)]
    batch = wire.decode_records(records, IMAGES, now_ms=0.0)
    reasons = {r.index: r.reason for r in batch.rejected}
    assert sorted(reasons) == [1, 2, 3, 4, 5]
    assert "empty value" in reasons[1] and "empty value" in reasons[2]
    assert "783 bytes, expected 784 bytes of uint8 28x28" in reasons[3]
    assert "is the producer sending float32?" in reasons[4]  # the wrong dtype is named
    assert "JSON" in reasons[5]
    assert batch.origins == [("in", 0, 0, 0), ("in", 0, 6, 0)]  # the good ones still decode


def test_json_tensors_of_the_wrong_size_or_type_are_rejected() -> None:
    reasons = _reasons([raw(0, b"[1, 2, 3]"), raw(1, b'["a", "b"]'), raw(2, b"[[1, 2], [3]]")], TENSORS)
    assert "holds 3 numbers, expected 64" in reasons[0]
    assert "numbers" in reasons[1] and "numbers" in reasons[2]


@pytest.mark.parametrize(("headers", "value", "expected"), [
    ([("tierflow.v", b"2"), ("tierflow.dtype", b"float32"), ("tierflow.shape", b"64")], b"\0" * 256, "version"),
    ([("tierflow.v", b"1"), ("tierflow.shape", b"64")], b"\0" * 256, "tierflow.dtype"),
    ([("tierflow.v", b"1"), ("tierflow.dtype", b"complex64"), ("tierflow.shape", b"64")], b"\0" * 512,
     "not numeric"),
    ([("tierflow.v", b"1"), ("tierflow.dtype", b"str"), ("tierflow.shape", b"64")], b"\0" * 256, "numeric"),
    ([("tierflow.v", b"1"), ("tierflow.dtype", b"float32"), ("tierflow.shape", b"63")], b"\0" * 252,
     "cannot feed this tier's model"),
    ([("tierflow.v", b"1"), ("tierflow.dtype", b"float32"), ("tierflow.shape", b"64")], b"\0" * 255,
     "not a whole number"),
    ([("tierflow.v", b"1"), ("tierflow.dtype", b"float32"), ("tierflow.shape", b"6x4")], b"\0" * 256,
     "comma-separated"),
    ([("tierflow.v", b"1"), ("tierflow.dtype", b"float32"), ("tierflow.shape", b"64"),
      ("tierflow.origins", b'[["in", 0, 1, 0]]')], b"\0" * 512, "lists 1 samples but the value holds 2"),
    ([("tierflow.v", b"1"), ("tierflow.dtype", b"float32"), ("tierflow.shape", b"64"),
      ("tierflow.origins", b'[["in", 0]]')], b"\0" * 256, "[topic, partition, offset, index]"),
    ([("tierflow.v", b"1"), ("tierflow.dtype", b"float32"), ("tierflow.shape", b"64"),
      ("tierflow.ts", b"{}")], b"\0" * 256, "JSON list"),
])
def test_bad_tensor_messages_are_rejected(headers: list[tuple[str, bytes]], value: bytes, expected: str) -> None:
    reasons = _reasons([raw(0, value, headers=tuple(headers))], TENSORS)
    assert expected in reasons[0], reasons[0]
    assert reasons[0].startswith("bad tierflow tensor message")


def test_foreign_headers_do_not_make_a_record_a_tensor_message() -> None:
    t = np.zeros(64, dtype=np.float32)
    batch = wire.decode_records([raw(0, t.tobytes(), headers=(("traceparent", b"00-abc"),))], TENSORS, now_ms=0.0)
    assert batch.rejected == [] and len(batch) == 1


def test_an_input_config_that_does_not_fit_the_model_is_refused() -> None:
    with pytest.raises(wire.WireError, match="cannot feed a model whose input is 28x28x1"):
        InputSpec((28, 28, 1), raw_dtype=np.dtype(np.uint8), raw_shape=(8, 8))


def test_a_plain_decoder_replaces_raw_and_json_and_its_errors_become_reasons() -> None:
    def plain(value: bytes) -> np.ndarray:
        if value == b"bad":
            raise ValueError("value is not Avro for data_scheme")
        return np.full(64, len(value), dtype=np.float32)

    spec = InputSpec((64,), plain=plain)
    batch = wire.decode_records([raw(0, b"abc"), raw(1, b"bad")], spec, now_ms=0.0)
    assert batch.x[0, 0] == 3 and batch.rejected[0].reason == "value is not Avro for data_scheme"


def test_an_empty_batch_decodes_to_an_empty_array() -> None:
    batch = wire.decode_records([], TENSORS, now_ms=0.0)
    assert batch.x.shape == (0, 64) and len(batch) == 0


# -- answers ----------------------------------------------------------------------------------------------


def test_a_single_sample_input_gets_a_kafka_ml_answer_with_tierflow_fields() -> None:
    batch = wire.decode_records([raw(42, images(1)[0].tobytes(), ts=1000)], IMAGES, now_ms=0.0)
    probs = np.array([[0.05, 0.9, 0.05]], dtype=np.float32)
    [value] = wire.encode_answers(batch, probs, np.array([True]), tier=0, answered_ms=1012.5)
    doc = orjson.loads(value)
    assert doc["values"] == pytest.approx([0.05, 0.9, 0.05])  # Kafka-ML's field
    assert (doc["tier"], doc["exit"], doc["class"]) == (0, 0, 1)
    assert doc["confidence"] == pytest.approx(0.9)
    assert doc["origin"] == {"topic": "in", "partition": 0, "offset": 42, "index": 0}
    assert doc["timestamps"] == {"input": 1000.0, "forwarded": [], "answered": 1012.5}
    assert doc["latency_ms"] == 12.5
    [answer] = wire.read_answers(value)
    assert (answer.origin, answer.tier, answer.cls, answer.batched) == (("in", 0, 42, 0), 0, 1, False)


def test_a_batched_input_gets_one_batched_answer_with_the_samples_this_tier_answers() -> None:
    value, headers = wire.encode_tensor(images(4))
    batch = wire.decode_records([raw(7, value, headers=tuple(headers), ts=500)], IMAGES, now_ms=0.0)
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.5, 0.5]], dtype=np.float32)
    answered = np.array([True, False, True, False])
    [out] = wire.encode_answers(batch, probs, answered, tier=1, answered_ms=520.0)
    doc = orjson.loads(out)
    assert doc["classes"] == [0, 1] and doc["confidences"] == pytest.approx([0.9, 0.8])
    assert [o["index"] for o in doc["origins"]] == [0, 2]
    assert doc["values"] == [pytest.approx([0.9, 0.1]), pytest.approx([0.2, 0.8])]
    assert doc["latencies_ms"] == [20.0, 20.0] and (doc["tier"], doc["exit"]) == (1, 1)
    assert [a.origin for a in wire.read_answers(out)] == [("in", 0, 7, 0), ("in", 0, 7, 2)]


def test_answers_of_a_mixed_batch_mirror_each_original_record() -> None:
    # Two single-sample records and two batched ones (forwarded together): four answer records.
    t = np.zeros((6, 64), dtype=np.float32)
    origins = [("in", 0, 1, 0), ("in", 0, 2, 0), ("in", 0, 2, 1), ("in", 0, 3, 0), ("in", 0, 5, 0),
               ("in", 0, 5, 3)]
    v1, h1 = wire.encode_tensor(t[[0, 3]], origins=[origins[0], origins[3]], ts=[[1.0], [1.0]], single=True)
    v2, h2 = wire.encode_tensor(t[[1, 2, 4, 5]], origins=[origins[i] for i in (1, 2, 4, 5)], ts=[[1.0]] * 4)
    batch = wire.decode_records([WireRecord("fog", 0, 0, v1, h1), WireRecord("fog", 0, 1, v2, h2)], TENSORS,
                                now_ms=0.0)
    probs = np.tile(np.array([[0.3, 0.7]], dtype=np.float32), (6, 1))
    out = [orjson.loads(v) for v in wire.encode_answers(batch, probs, np.ones(6, bool), tier=1, answered_ms=2.0)]
    assert [d.get("origin", {}).get("offset") for d in out] == [1, 3, None, None]
    assert [[o["offset"], o["index"]] for o in out[2]["origins"]] == [[2, 0], [2, 1]]
    assert [[o["offset"], o["index"]] for o in out[3]["origins"]] == [[5, 0], [5, 3]]


def test_nothing_answered_gives_no_records() -> None:
    batch = wire.decode_records([raw(0, images(1)[0].tobytes())], IMAGES, now_ms=0.0)
    assert wire.encode_answers(batch, np.array([[0.5, 0.5]]), np.array([False]), tier=0, answered_ms=1.0) == []


# -- forwards ---------------------------------------------------------------------------------------------


def test_forwarded_samples_go_up_as_one_tensor_message_with_their_origins() -> None:
    value, headers = wire.encode_tensor(images(3))
    batch = wire.decode_records([raw(9, value, headers=tuple(headers), ts=100)], IMAGES, now_ms=0.0)
    tensor = np.arange(3 * 64, dtype=np.float32).reshape(3, 64)
    [(fv, fh)] = wire.encode_forwards(batch, tensor, np.array([True, False, True]), forwarded_ms=104.25)
    up = wire.decode_records([WireRecord("fog", 0, 0, fv, fh, 105)], TENSORS, now_ms=0.0)
    np.testing.assert_array_equal(up.x, tensor[[0, 2]])
    assert up.origins == [("in", 0, 9, 0), ("in", 0, 9, 2)]
    assert up.ts == [[100.0, 104.25], [100.0, 104.25]]  # this tier's forward time appended
    assert up.single.tolist() == [False, False]


def test_forwards_of_single_and_batched_origins_travel_as_two_messages() -> None:
    x = images(3)
    value, headers = wire.encode_tensor(x[1:])
    batch = wire.decode_records([raw(0, x[0].tobytes()), raw(1, value, headers=tuple(headers))], IMAGES,
                                now_ms=0.0)
    forwards = wire.encode_forwards(batch, np.zeros((3, 64), np.float32), np.ones(3, bool), forwarded_ms=1.0)
    assert [dict(h).get("tierflow.single") for _, h in forwards] == [b"1", None]
    assert wire.encode_forwards(batch, np.zeros((3, 64), np.float32), np.zeros(3, bool), forwarded_ms=1.0) == []


def test_encode_tensor_refuses_inconsistent_arguments() -> None:
    with pytest.raises(wire.WireError, match="at least one sample"):
        wire.encode_tensor(np.zeros((0, 4), np.float32))
    with pytest.raises(wire.WireError, match="2 origins for 1 samples"):
        wire.encode_tensor(np.zeros((1, 4), np.float32), origins=[("a", 0, 0, 0)] * 2)
    with pytest.raises(wire.WireError, match="not numeric"):
        wire.encode_tensor(np.array([["a"]]))


def test_read_answers_refuses_what_is_not_an_answer() -> None:
    with pytest.raises(wire.WireError):
        wire.read_answers(b"nope")
    with pytest.raises(wire.WireError):
        wire.read_answers(b'{"class": 1}')
