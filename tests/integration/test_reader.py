"""The training job's reader against the real broker: exactly the announced records, and clear errors.

Announcements here are read back from the control topic and parsed as the control bridge parses them,
so these tests check the sinks' wire format without running the worker.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from tests.conftest import wait_until
from tierflow.streams import kafka as kio
from tierflow.streams.control import parse_control_message
from tierflow.streams.settings import Settings
from tierflow.streams.topics import TopicSpec, ensure_topics
from tierflow.tiers.data import DataError
from tierflow.tiers.reader import DataUnavailable, read_datasource, read_ranges
from tierflow.tiers.sinks import AvroSink, RawSink

DATA_SCHEME = {"type": "record", "name": "reading", "fields": [
    {"name": "temperature", "type": "float"},
    {"name": "spectrum", "type": {"type": "array", "items": "float"}}]}
LABEL_SCHEME = {"type": "record", "name": "label", "fields": [{"name": "label", "type": "int"}]}


async def announcements(plane: Settings, n: int) -> list[dict[str, Any]]:
    """The first n control messages, parsed as the control bridge parses them."""
    c = kio.consumer(plane.kafka)
    await c.start()
    found: list[dict[str, Any]] = []
    try:
        tp = TopicPartition(plane.kafka.control_topic, 0)
        c.assign([tp])
        await c.seek_to_beginning(tp)

        async def collected() -> bool:
            batch = await c.getmany(tp, timeout_ms=200)
            found.extend(parse_control_message(r.key, r.value) for r in batch.get(tp, []))
            return len(found) >= n

        await wait_until(collected, what=f"{n} announcement(s)")
    finally:
        await c.stop()
    return found[:n]


async def produce(plane: Settings, topic: str, values: list[bytes], partition: int = 0) -> None:
    p = kio.producer(plane.kafka, linger_ms=5)
    await p.start()
    try:
        futures = [await p.send(topic, v, key=b"\x01", partition=partition) for v in values]
        await asyncio.gather(*futures)
    finally:
        await p.stop()


async def test_avro_round_trip(plane: Settings) -> None:
    topic = f"{plane.kafka.topic_prefix}.avro"
    rng = np.random.default_rng(5)
    rows = [{"temperature": float(np.float32(rng.normal())), "spectrum": [float(v) for v in
                                                                           rng.random(6).astype(np.float32)]}
            for _ in range(200)]
    labels = [{"label": i % 3} for i in range(200)]

    def send() -> None:
        sink = AvroSink(plane.kafka.bootstrap_servers, topic, 4, DATA_SCHEME, LABEL_SCHEME, test_rate=0.2,
                        control_topic=plane.kafka.control_topic)
        sink.send_many(rows, labels)
        sink.close()

    await asyncio.to_thread(send)
    (announcement,) = await announcements(plane, 1)
    assert announcement["deployment_id"] == 4 and announcement["input_format"] == "AVRO"
    assert announcement["ranges"] == [{"topic": topic, "partition": 0, "start": 0, "end": 200}]
    x, y = await read_datasource(plane.kafka, announcement)
    assert x.shape == (200, 7) and x.dtype == np.float32
    expected = np.array([[r["temperature"], *r["spectrum"]] for r in rows], dtype=np.float32)
    assert np.array_equal(x, expected)
    assert y.tolist() == [i % 3 for i in range(200)]


async def test_records_spread_over_four_partitions_by_label_read_back_completely(plane: Settings) -> None:
    topic = f"{plane.kafka.topic_prefix}.spread"
    n = 2000
    rng = np.random.default_rng(11)
    y = rng.integers(0, 10, size=n).astype(np.uint8)
    x = rng.random((n, 8, 8), dtype=np.float32)
    x[:, 0, 0] = y  # pairs stay checkable after the reader regroups records by partition

    def send() -> dict[str, Any]:
        sink = RawSink(plane.kafka.bootstrap_servers, topic, 2, partitions=4, validation_rate=0.1, test_rate=0.1,
                       control_topic=plane.kafka.control_topic)
        sink.send_many(x, y)
        return sink.close()

    sent = await asyncio.to_thread(send)
    (announcement,) = await announcements(plane, 1)
    ranges = announcement["ranges"]
    assert len(ranges) > 1 and {r["partition"] for r in ranges} <= {0, 1, 2, 3}
    assert sum(r["end"] - r["start"] for r in ranges) == n == sent["total_msg"]
    read: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> None:
        read.append((done, total))

    dx, dy = await read_datasource(plane.kafka, announcement, progress=progress)
    assert read[-1] == (n, n)
    assert dx.shape == (n, 8, 8) and np.array_equal(dx[:, 0, 0], dy.astype(np.float32))
    assert sorted(s.tobytes() for s in dx) == sorted(s.tobytes() for s in x)
    # Keyed by label: each label lands in exactly one partition (Kafka-ML's producer does the same).
    _, keys = await read_ranges(plane.kafka, ranges)
    seen: dict[bytes | None, int] = {}
    offset = 0
    for r in ranges:
        for key in keys[offset:offset + r["end"] - r["start"]]:
            assert seen.setdefault(key, r["partition"]) == r["partition"]
        offset += r["end"] - r["start"]
    assert len(seen) == 10
    # In one stable order however the fetches of the four partitions interleaved: partition by partition as
    # announced, each in offset (= send) order. A seeded training sees the same array every time it reads.
    partition_of = np.array([seen[label.tobytes()] for label in y])
    assert np.array_equal(dx, np.concatenate([x[partition_of == r["partition"]] for r in ranges]))


async def test_read_ranges_returns_exactly_the_announced_records(plane: Settings) -> None:
    topic = f"{plane.kafka.topic_prefix}.exact"
    await ensure_topics(plane.kafka, extra=[TopicSpec(topic, 2, -1)])
    await produce(plane, topic, [b"p0-%03d" % i for i in range(100)], partition=0)
    await produce(plane, topic, [b"p1-%03d" % i for i in range(30)], partition=1)
    ranges = [{"topic": topic, "partition": 1, "start": 3, "end": 6},
              {"topic": topic, "partition": 0, "start": 10, "end": 60},
              {"topic": topic, "partition": 0, "start": 80, "end": 82},
              {"topic": topic, "partition": 1, "start": 9, "end": 9}]
    expected = ([b"p1-%03d" % i for i in (3, 4, 5)] + [b"p0-%03d" % i for i in range(10, 60)]
                + [b"p0-080", b"p0-081"])
    values, keys = await read_ranges(plane.kafka, ranges)
    assert values == expected
    assert keys == [b"\x01"] * len(values)
    assert await read_ranges(plane.kafka, []) == ([], [])
    # The same through the RAW path, which copies each fetched batch straight into the arrays.
    x, y = await read_datasource(plane.kafka, {"ranges": ranges, "input_format": "RAW",
                                               "input_config": {"data_type": "uint8", "label_type": "uint8"}})
    assert [row.tobytes() for row in x] == expected and y.tolist() == [1] * len(expected)


async def test_reader_errors_say_what_happened(plane: Settings) -> None:
    topic = f"{plane.kafka.topic_prefix}.short"
    await ensure_topics(plane.kafka, extra=[TopicSpec(topic, 1, -1)])
    await produce(plane, topic, [bytes(784)] * 17 + [bytes(783)] + [bytes(784)] * 2)
    # A topic the broker does not have (the embedded broker restarted): an error, and no auto-created topic.
    gone = f"{plane.kafka.topic_prefix}.gone"
    with pytest.raises(DataUnavailable, match=f"topic '{gone}' does not exist.*does not restore"):
        await read_ranges(plane.kafka, [{"topic": gone, "partition": 0, "start": 0, "end": 10}])
    admin = AIOKafkaAdminClient(bootstrap_servers=plane.kafka.bootstrap_servers)
    await admin.start()
    try:
        assert gone not in await admin.list_topics()
    finally:
        await admin.close()
    with pytest.raises(DataUnavailable, match="no partition 3"):
        await read_ranges(plane.kafka, [{"topic": topic, "partition": 3, "start": 0, "end": 10}])
    with pytest.raises(DataUnavailable, match="ends at offset 20 but the datasource announces records up to 50"):
        await read_ranges(plane.kafka, [{"topic": topic, "partition": 0, "start": 0, "end": 50}])
    # A record of the wrong size: named by position, topic, partition and offset.
    source = {"ranges": [{"topic": topic, "partition": 0, "start": 2, "end": 20}], "input_format": "RAW",
              "input_config": '{"data_type": "uint8", "label_type": "uint8", "data_reshape": "28 28"}'}
    with pytest.raises(DataError, match=rf"record 15: 783 bytes, expected 784 for uint8 28x28 \(topic {topic}, "
                                        r"partition 0, offset 17\)"):
        await read_datasource(plane.kafka, source)
