"""Flattening output records into samples and the statistics the API shows (pure)."""

from __future__ import annotations

import orjson

from tierflow.api.outputs import flatten_output, statistics
from tierflow.streams.wire import percentile


def test_single_and_batched_outputs_flatten_to_samples() -> None:
    single = orjson.dumps({"values": [0.1, 0.9], "tier": 1, "class": 1, "confidence": 0.9,
                           "origin": {"topic": "in", "partition": 0, "offset": 5}, "latency_ms": 12.5})
    [s] = flatten_output(single, 1000)
    assert (s["tier"], s["class"], s["confidence"], s["latency_ms"], s["timestamp_ms"]) == (1, 1, 0.9, 12.5, 1000)
    batched = orjson.dumps({"values": [[0.2, 0.8], [0.7, 0.3]], "tier": 0, "classes": [1, 0],
                            "confidences": [0.8, 0.7], "origins": [["in", 0, 1], ["in", 0, 2]],
                            "latencies_ms": [3.0, 4.0]})
    out = flatten_output(batched, 2000)
    assert [(o["class"], o["confidence"], o["latency_ms"]) for o in out] == [(1, 0.8, 3.0), (0, 0.7, 4.0)]
    assert flatten_output(b"not json", 1) == [] and flatten_output(b'{"x": 1}', 1) == []


def test_statistics_give_shares_per_tier_throughput_and_percentiles() -> None:
    samples = [{"tier": 0, "latency_ms": float(i), "timestamp_ms": 1000 + i * 10} for i in range(1, 7)]
    samples += [{"tier": 2, "latency_ms": 50.0, "timestamp_ms": 1100}, {"tier": 2, "latency_ms": 70.0,
                                                                       "timestamp_ms": 1200}]
    stats = statistics(samples, 3)
    assert [t["answered"] for t in stats["tiers"]] == [6, 0, 2]
    assert abs(sum(t["share"] for t in stats["tiers"]) - 1.0) < 1e-9
    assert stats["throughput_per_s"] == 8 / 0.19
    assert stats["latency_ms"]["max"] == 70.0 and stats["tiers"][2]["latency_ms"]["p50"] == 60.0
    assert percentile([], 0.5) is None and statistics([], 2)["throughput_per_s"] is None


def test_the_agents_own_output_records_flatten_like_the_wire_reader() -> None:
    # What a tier agent writes (streams/wire.py): a single-sample record and a batched one, origins as objects.
    import numpy as np

    from tierflow.streams import wire

    spec = wire.InputSpec((2,))
    value, headers = wire.encode_tensor(np.array([[1, 2], [3, 4], [5, 6]], dtype=np.float32))
    records = [wire.WireRecord("in", 0, 7, np.array([0.5, 0.5], dtype=np.float32).tobytes(), timestamp=1000),
               wire.WireRecord("in", 1, 3, value, headers, timestamp=1001)]
    batch = wire.decode_records(records, spec, now_ms=1002.0)
    probs = np.array([[0.1, 0.9], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]], dtype=np.float32)
    outputs = wire.encode_answers(batch, probs, np.ones(4, dtype=bool), tier=1, answered_ms=1010.0)
    flat = [s for v in outputs for s in flatten_output(v, 5)]
    answers = [a for v in outputs for a in wire.read_answers(v)]
    assert len(flat) == len(answers) == 4
    for s, a in zip(flat, answers, strict=True):
        assert (s["tier"], s["class"], s["confidence"], s["latency_ms"]) == (a.tier, a.cls, a.confidence,
                                                                             a.latency_ms)
        o = s["origin"]
        assert (o["topic"], o["partition"], o["offset"], o["index"]) == a.origin
    assert [s["origin"]["offset"] for s in flat] == [7, 3, 3, 3] and flat[0]["latency_ms"] == 10.0
