"""The one-sample paths of streams/wire.py (a light stream's usual batch: one record, one sample) give exactly
what the general paths give, for every kind of record and row they take, and leave the rest to them (no I/O)."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest

from tierflow.streams import wire
from tierflow.streams.wire import DecodedBatch, InputSpec, WireRecord

IMAGES = InputSpec((28, 28, 1), raw_dtype=np.dtype(np.uint8), raw_shape=(28, 28))
FLOATS = InputSpec((28, 28, 1))  # Kafka-ML float32 inputs
TENSORS = InputSpec((64,))


def same_batch(a: DecodedBatch, b: DecodedBatch) -> None:
    assert a.x.dtype == b.x.dtype and a.x.shape == b.x.shape
    np.testing.assert_array_equal(a.x, b.x)
    assert (a.origins, a.ts, a.rejected, a.shadow) == (b.origins, b.ts, b.rejected, b.shadow)
    assert a.single.tolist() == b.single.tolist() and a.single.dtype == b.single.dtype
    assert a.record.tolist() == b.record.tolist() and a.record.dtype == b.record.dtype


def tensor_record(n: int, *, single: bool, with_meta: bool = True, ts: int = 1000) -> WireRecord:
    x = np.random.default_rng(n).random((n, 64), dtype=np.float32)
    meta = {"origins": [("in", 3, 40 + i, i) for i in range(n)], "ts": [[900.5 + i, 950.25] for i in range(n)]}
    value, headers = wire.encode_tensor(x, **(meta if with_meta else {}), single=single)
    return WireRecord("fog", 2, 17, value, tuple(headers), ts)


RECORDS = {
    "raw uint8": (WireRecord("in", 0, 5, np.arange(784, dtype=np.uint8).tobytes(), (), 1234), IMAGES),
    "raw float32": (WireRecord("in", 1, 6, np.linspace(0, 1, 784, dtype=np.float32).tobytes(), (), 99), FLOATS),
    "raw, no timestamp": (WireRecord("in", 0, 7, bytes(784), (), -1), IMAGES),
    "raw, foreign header": (WireRecord("in", 0, 8, bytes(784), (("traceparent", b"00-ab"),), 5), IMAGES),
    "tensor, single": (tensor_record(1, single=True), TENSORS),
    "tensor, from a batch": (tensor_record(1, single=False), TENSORS),
    "tensor, no origins": (tensor_record(1, single=False, with_meta=False), TENSORS),
    # what the one-sample path leaves to the general one:
    "tensor of 3 samples": (tensor_record(3, single=False), TENSORS),
    "json": (WireRecord("in", 0, 9, orjson.dumps(list(range(64))), (), 5), TENSORS),
    "wrong size": (WireRecord("in", 0, 10, b"\x01\x02\x03", (), 5), IMAGES),
    "empty": (WireRecord("in", 0, 11, b"", (), 5), IMAGES),
    "bad tensor": (WireRecord("fog", 0, 12, b"\x00" * 8, ((wire.H_VERSION, b"9"),), 5), TENSORS),
}


@pytest.mark.parametrize("name", RECORDS)
def test_one_record_decodes_as_the_general_path_decodes_it(name: str) -> None:
    record, spec = RECORDS[name]
    fast = wire.decode_records([record], spec, now_ms=777.0)
    same_batch(fast, wire._decode_all([record], spec, now_ms=777.0, versions=wire.READ_VERSIONS))
    taken = wire._decode_one(record, spec, 777.0, wire.READ_VERSIONS) is not None
    assert taken == (name in {"raw uint8", "raw float32", "raw, no timestamp", "raw, foreign header",
                              "tensor, single", "tensor, from a batch", "tensor, no origins"})
    with pytest.raises(ValueError, match="read-only"):  # shared by every one-sample batch: never written to
        fast.single[:] = True


def numpy_mask(probs: np.ndarray, limit: float) -> list[bool]:
    mask: list[bool] = (probs.reshape(len(probs), -1).max(axis=1) >= limit).tolist()
    return mask


F32_09 = float(np.float32(0.9))
ROWS = {
    "below": [0.1, 0.85, 0.05], "above": [0.02, 0.03, 0.95], "tie at the top": [0.45, 0.1, 0.45],
    "float32 of the limit": [F32_09, 0.05, 1 - F32_09 - 0.05], "nan": [0.2, math.nan, 0.99],
    "nan first": [math.nan, 0.5, 0.5], "inf": [math.inf, 0.0, 0.0], "all zero": [0.0, 0.0, 0.0],
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ROWS)
@pytest.mark.parametrize("limit", [0.9, 0.45, 1.01, 0.0])
def test_one_sample_routing_is_numpys(name: str, dtype: type, limit: float) -> None:
    probs = np.asarray([ROWS[name]], dtype=dtype)
    assert wire.answered_mask(probs, limit).tolist() == numpy_mask(probs, limit)
    assert wire.answered_mask(probs, limit, top=True).tolist() == [True]


def one_batch(single: bool = True) -> DecodedBatch:
    return wire.decode_records([tensor_record(1, single=single)], TENSORS, now_ms=0.0)


@pytest.mark.parametrize("name", ROWS)
def test_one_answer_encodes_as_the_general_path_encodes_it(name: str) -> None:
    probs = np.asarray([ROWS[name]], dtype=np.float32)
    answered = np.ones(1, dtype=bool)
    for single in (True, False):
        batch = one_batch(single)
        fast = wire.encode_answers(batch, probs, answered, tier=2, answered_ms=1234.56789)
        general = wire._encode_all_answers(batch, probs, answered, tier=2, answered_ms=1234.56789, confidence=None)
        assert fast == general


def test_one_forward_encodes_as_the_general_path_encodes_it() -> None:
    tensor = np.random.default_rng(5).random((1, 64), dtype=np.float32)
    for single in (True, False):
        batch = one_batch(single)
        fast = wire.encode_forwards(batch, tensor, np.ones(1, dtype=bool), forwarded_ms=1500.12345)
        # the general path, given the same sample as the second of two
        pair = DecodedBatch(x=np.concatenate([batch.x, batch.x]), origins=[("o", 0, 0, 0), *batch.origins],
                            ts=[[1.0], *batch.ts], single=np.asarray([not single, single]),
                            record=np.zeros(2, dtype=np.int64), rejected=[])
        general = wire.encode_forwards(pair, np.concatenate([tensor, tensor]), np.asarray([False, True]),
                                       forwarded_ms=1500.12345)
        assert [(v, list(h)) for v, h in fast] == [(v, list(h)) for v, h in general]
        assert wire.encode_forwards(batch, tensor, np.zeros(1, dtype=bool), forwarded_ms=1.0) == []
