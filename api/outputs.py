"""Reading an inference's output topic for the API: the latest predictions and the per-tier statistics.

Called by the inference routes (`GET /inferences/{id}/predictions` and `/stats`). Outputs are JSON records
written by the tier agents: Kafka-ML's `{"values": [...]}` plus tierflow's fields, one sample or a batch per
record. They are read by the one reader of that format (`streams/wire.py: answer_fields`) and shown here as
one entry per sample, each field as the record holds it (null where it has none). Statistics are computed
over the latest outputs (a window), so they describe recent traffic: exit distribution per tier,
throughput, and latency percentiles.
"""

from __future__ import annotations

from typing import Any

from aiokafka import TopicPartition

from tierflow.streams import kafka as kio
from tierflow.streams import wire
from tierflow.streams.settings import KafkaSettings
from tierflow.streams.topics import admin_client
from tierflow.streams.wire import percentile

JSON = dict[str, Any]


def flatten_output(value: bytes, timestamp_ms: int | None) -> list[JSON]:
    """One entry per sample: {tier, class, confidence, values, origin, latency_ms, timestamp_ms}; none for a
    record that is not an output record."""
    try:
        samples = wire.answer_fields(value)
    except wire.WireError:
        return []
    return [{"tier": s.tier, "class": s.cls, "confidence": s.confidence, "values": s.values, "origin": s.origin,
             "latency_ms": s.latency_ms, "timestamp_ms": timestamp_ms} for s in samples]


def statistics(samples: list[JSON], tiers: int) -> JSON:
    """Exit distribution per tier, throughput and latency percentiles of a window of answered samples."""
    counts = [0] * tiers
    for s in samples:
        t = s.get("tier")
        if isinstance(t, int) and 0 <= t < tiers:
            counts[t] += 1
    total = sum(counts)
    stamps = [s["timestamp_ms"] for s in samples if isinstance(s.get("timestamp_ms"), int)]
    span_s = (max(stamps) - min(stamps)) / 1000 if len(stamps) > 1 else 0.0
    latencies = sorted(float(s["latency_ms"]) for s in samples if isinstance(s.get("latency_ms"), int | float))
    per_tier_latency: list[JSON] = []
    for t in range(tiers):
        lat = sorted(float(s["latency_ms"]) for s in samples
                     if s.get("tier") == t and isinstance(s.get("latency_ms"), int | float))
        per_tier_latency.append({"p50": percentile(lat, 0.5), "p99": percentile(lat, 0.99)})
    return {
        "window": total,
        "tiers": [{"index": t, "answered": counts[t], "share": counts[t] / total if total else 0.0,
                   "latency_ms": per_tier_latency[t]} for t in range(tiers)],
        "throughput_per_s": total / span_s if span_s > 0 else None,
        "latency_ms": {"p50": percentile(latencies, 0.5), "p95": percentile(latencies, 0.95),
                       "p99": percentile(latencies, 0.99), "max": latencies[-1] if latencies else None},
    }


async def consumer_lag(kafka: KafkaSettings, group: str, topic: str) -> int | None:
    """Records of `topic` that consumer group `group` has not committed yet (a tier's backlog); None when the
    topic does not exist. A group that never committed is behind by everything the topic holds.

    The committed offsets are read by a consumer of that group that only assigns partitions by hand, so it
    never joins (or rebalances) the tiers' group. (aiokafka's admin `list_consumer_group_offsets` cannot
    decode Tansu's OffsetFetch answer.)"""
    admin = admin_client(kafka)  # with this process's Kafka credentials
    await admin.start()
    try:
        if topic not in set(await admin.list_topics()):  # never auto-create it by asking for its metadata
            return None
        described = await admin.describe_topics([topic])
        partitions = [p["partition"] for p in described[0]["partitions"]]
    finally:
        await admin.close()
    c = kio.consumer(kafka, group_id=group, enable_auto_commit=False)
    await c.start()
    lag = 0
    try:
        tps = [TopicPartition(topic, p) for p in partitions]
        c.assign(tps)
        for tp in tps:
            done = await c.committed(tp)
            await c.seek_to_beginning(tp)
            low = int(await c.position(tp))
            high = await kio.fetch_highwater(c, tp)
            lag += max(0, high - max(int(done) if done is not None else low, low))
    finally:
        await c.stop()
    return lag


async def latest_outputs(kafka: KafkaSettings, topic: str, limit: int) -> list[JSON]:
    """The latest `limit` output records of `topic` (all partitions), flattened to samples, newest first."""
    admin = admin_client(kafka)  # with this process's Kafka credentials
    await admin.start()
    try:
        if topic not in set(await admin.list_topics()):  # never auto-create it by asking for its metadata
            return []
        described = await admin.describe_topics([topic])
        partitions = [p["partition"] for p in described[0]["partitions"]]
    finally:
        await admin.close()
    if not partitions:
        return []
    c = kio.consumer(kafka)
    await c.start()
    records: list[tuple[int, bytes]] = []
    try:
        tps = [TopicPartition(topic, p) for p in partitions]
        c.assign(tps)
        ends: dict[TopicPartition, int] = {}
        for tp in tps:
            await c.seek_to_beginning(tp)
            low = await c.position(tp)
            hw = await kio.fetch_highwater(c, tp)
            ends[tp] = hw
            c.seek(tp, max(low, hw - limit))
        async def behind() -> bool:
            for tp, end in ends.items():
                if await c.position(tp) < end:
                    return True
            return False

        while await behind():
            batch = await c.getmany(timeout_ms=1000, max_records=5000)
            if not batch:
                break
            for tp, recs in batch.items():
                records.extend((r.timestamp, r.value) for r in recs if r.offset < ends[tp])
    finally:
        await c.stop()
    records.sort(key=lambda r: r[0], reverse=True)
    out: list[JSON] = []
    for ts, value in records:
        out.extend(flatten_output(value, ts))
        if len(out) >= limit:
            break
    return out[:limit]
