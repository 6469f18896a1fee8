"""Flattening output records into samples and the statistics the API shows (pure)."""

from __future__ import annotations

import orjson

from tierflow.api.outputs import flatten_output, percentile, statistics


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
