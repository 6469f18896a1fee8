"""Kafka-ML's sink offset logic on the embedded broker: every record a sink sends is trained on, no other record is.

Kafka-ML's sinks compute each partition's range with `seek_to_end` + `position` before and after sending,
with kafka-python's default batching, and announce `topic:partition:start:end` on the control topic. Tansu
answers that lookup with the first offset of the partition's last record batch + 1, so the announced ranges
lose the tail of each partition and, on a topic that already held data, take the tail of an earlier writer's
batch. `kafka_ml_send` below does what their sink does (written for the test, not their code) and also keeps
the offset the broker acknowledged for each record: the ground truth the datasource is checked against.

The announcements go through a running control plane (`start_plane`): the control bridge makes them exact
(streams/ranges.py), the decider records the announced and the used ranges, the projector writes the
datasource row, and the training job's loader reads it and splits it into train, validation and test. Each
test prints what the announced ranges alone would have lost (run with `-s`).
"""

from __future__ import annotations

import asyncio
import uuid
import warnings
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import numpy as np
import orjson
import pytest

from tests.conftest import Infra, deploy_single_model, new_plane, start_plane, stop_plane, wait_until
from tests.integration.test_replay import shape_validate
from tierflow.deploy import services
from tierflow.projections import queries
from tierflow.streams.control import parse_ranges
from tierflow.streams.envelope import JSON
from tierflow.streams.ranges import RangesUnresolved, UnknownPartition, resolve_ranges
from tierflow.streams.settings import KafkaSettings, Settings
from tierflow.streams.topics import TopicSpec, admin_client, create_topics
from tierflow.tiers.train_io import KafkaDataLoader
from tierflow.tiers.training import split_sizes

with warnings.catch_warnings():
    # kafka-python 3 loads its protocol schemas with importlib.resources.read_text, deprecated since Python
    # 3.11: its DeprecationWarning, not ours (tests turn warnings into errors). Kafka-ML's sinks use kafka-python.
    warnings.simplefilter("ignore", DeprecationWarning)
    from kafka import KafkaConsumer, KafkaProducer
    from kafka import TopicPartition as KafkaTopicPartition

N = 2000
PARTITIONS = 4
VALIDATION_RATE, TEST_RATE = 0.1, 0.1


@dataclass
class Sent:
    """What a sink sent: the ranges it announced, and where the broker put each of its records."""

    announced: list[JSON] = field(default_factory=list)
    offsets: dict[int, set[int]] = field(default_factory=dict)  # partition -> acknowledged offsets
    values: list[bytes] = field(default_factory=list)

    def count(self) -> int:
        return sum(len(offs) for offs in self.offsets.values())


def records(n: int, size: int, tag: int) -> tuple[list[bytes], list[bytes]]:
    """n distinct `size`-byte values (tag and index up front) and one-byte labels 0..9 (the record keys)."""
    values = [tag.to_bytes(2, "big") + i.to_bytes(4, "big") + bytes(size - 6) for i in range(n)]
    return values, [bytes([i % 10]) for i in range(n)]


def written_offsets(futures: list[Any]) -> dict[int, set[int]]:
    """The offsets the producer's sends were written at, per partition."""
    offsets: dict[int, set[int]] = {}
    for f in futures:
        md = f.get(timeout=10)
        offsets.setdefault(md.partition, set()).add(md.offset)
    return offsets


def batched_write(servers: str, topic: str, values: list[bytes], keys: list[bytes]) -> Sent:
    """A plain producer with default batching (another writer); no announcement."""
    producer = KafkaProducer(bootstrap_servers=servers, enable_idempotence=False)
    try:
        futures = [producer.send(topic, key=k, value=v) for k, v in zip(keys, values, strict=True)]
        producer.flush()
        return Sent(values=list(values), offsets=written_offsets(futures))
    finally:
        producer.close()


def kafka_ml_send(servers: str, topic: str, values: list[bytes], keys: list[bytes]) -> Sent:
    """Kafka-ML's sink offset logic: latest offsets per partition before sending and after flushing."""
    consumer = KafkaConsumer(bootstrap_servers=servers, group_id=None, enable_auto_commit=False)
    # Kafka-ML runs kafka-python 2.0, whose producer is not idempotent; 3.x defaults to idempotent, which
    # Tansu rejects. Batching is left at its defaults (batch_size 16384, linger_ms 0), as Kafka-ML does.
    producer = KafkaProducer(bootstrap_servers=servers, enable_idempotence=False)
    try:
        def latest() -> dict[int, int]:
            out = {}
            for p in sorted(consumer.partitions_for_topic(topic) or ()):
                tp = KafkaTopicPartition(topic, p)
                consumer.assign([tp])
                consumer.seek_to_end(tp)
                out[p] = consumer.position(tp)
            return out

        before = latest()
        futures = [producer.send(topic, key=k, value=v) for k, v in zip(keys, values, strict=True)]
        producer.flush()
        after = latest()
        # The control message's 'topic' field ("length" in Kafka-ML is the end offset), parsed as the bridge does.
        spec = ",".join(f"{topic}:{p}:{before.get(p, 0)}:{end}" for p, end in after.items())
        return Sent(announced=parse_ranges(spec), values=list(values), offsets=written_offsets(futures))
    finally:
        producer.close()
        consumer.close()


def kafka_ml_announce(servers: str, control_topic: str, sent: Sent, deployment_id: int = 1) -> None:
    """Kafka-ML's control message: a one-byte key, `topic:partition:start:end`, the format and the split."""
    producer = KafkaProducer(bootstrap_servers=servers, enable_idempotence=False)
    try:
        spec = ",".join(f"{r['topic']}:{r['partition']}:{r['start']}:{r['end']}" for r in sent.announced)
        message = {"topic": spec, "input_format": "RAW", "description": "a Kafka-ML sink",
                   "input_config": {"data_type": "uint8", "label_type": "uint8",
                                    "data_reshape": str(len(sent.values[0])), "label_reshape": ""},
                   "validation_rate": VALIDATION_RATE, "test_rate": TEST_RATE,
                   "total_msg": sum(r["end"] - r["start"] for r in sent.announced)}
        producer.send(control_topic, key=bytes([deployment_id]), value=orjson.dumps(message)).get(timeout=10)
    finally:
        producer.close()


def kafka_ml_sink(servers: str, control_topic: str, topic: str, values: list[bytes], keys: list[bytes]) -> Sent:
    """Send, then announce, as Kafka-ML's sink does on `close()`."""
    sent = kafka_ml_send(servers, topic, values, keys)
    kafka_ml_announce(servers, control_topic, sent)
    return sent


def covered(ranges: Iterable[JSON]) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for r in ranges:
        out.setdefault(r["partition"], set()).update(range(r["start"], r["end"]))
    return {p: offs for p, offs in out.items() if offs}


def report(what: str, sent: Sent, others: Sent | None = None) -> str:
    """What the announced ranges alone would give: records of the sink left out, other records taken."""
    announced = covered(sent.announced)
    ours = sum(len(offs & announced.get(p, set())) for p, offs in sent.offsets.items())
    foreign = sum(len(offs & announced.get(p, set())) for p, offs in (others.offsets if others else {}).items())
    line = (f"{what}: sent {sent.count()}, the announced ranges hold {sum(map(len, announced.values()))}: "
            f"{sent.count() - ours} sent records left out, {foreign} earlier records taken")
    print(line)
    return line


async def topic_with_partitions(infra: Infra, name: str, prefix: str | None = None) -> tuple[KafkaSettings, str]:
    prefix = prefix or f"kmsinks-{uuid.uuid4().hex[:8]}"
    kafka = KafkaSettings(bootstrap_servers=infra.bootstrap_servers, topic_prefix=prefix)
    topic = f"{prefix}.{name}"
    await create_topics(kafka.bootstrap_servers, [TopicSpec(topic, PARTITIONS, -1)])
    return kafka, topic


async def topics(kafka: KafkaSettings) -> set[str]:
    admin = admin_client(kafka)
    await admin.start()
    try:
        return set(await admin.list_topics())  # all-topics metadata: creates nothing
    finally:
        await admin.close()


@pytest.fixture(scope="module")
async def plane(infra: Infra) -> AsyncIterator[Settings]:
    """A running control plane with deployment 1, which every Kafka-ML sink here announces its data for."""
    settings = await new_plane(infra, "kmsinks")
    running = await start_plane(settings, shape_validate)
    try:
        await deploy_single_model(settings.kafka)
        yield settings
    finally:
        await stop_plane(running)


async def datasource_of(plane: Settings, topic: str) -> JSON:
    """The datasource announced for `topic`, as `GET /datasources/{id}` answers it."""
    conn = await asyncpg.connect(plane.database.url)
    try:
        ident: list[int] = []

        async def announced() -> bool:
            found = await conn.fetchval("SELECT id FROM proj.datasources WHERE announced_ranges->0->>'topic' = $1",
                                        topic)
            ident[:] = [] if found is None else [found]
            return bool(ident)

        await wait_until(announced, what=f"the datasource of {topic}")
        datasource = await queries.get_datasource(conn, ident[0])
        assert datasource is not None
        return datasource
    finally:
        await conn.close()


async def trained_on(plane: Settings, datasource: JSON) -> tuple[np.ndarray[Any, Any], int]:
    """What the training job does with the datasource: load it, and split it (train + validation + test)."""
    x, _ = await KafkaDataLoader(plane.kafka).load(datasource)
    n_train, n_val, n_test = split_sizes(len(x), datasource["validation_rate"], datasource["test_rate"])
    assert min(n_train, n_val, n_test) > 0
    return x, n_train + n_val + n_test


def assert_trained_on_exactly(x: np.ndarray[Any, Any], counted: int, sent: Sent) -> None:
    assert counted == sent.count(), f"the training split holds {counted} samples, the sink sent {sent.count()}"
    assert sorted(bytes(row) for row in x.reshape(len(x), -1)) == sorted(sent.values)


def moved_endpoints(datasource: JSON) -> int:
    return sum((u["start"] != a["start"]) + (u["end"] != a["end"])
               for u, a in zip(datasource["ranges"], datasource["announced_ranges"], strict=True))


@pytest.mark.parametrize("size", [12, 784])
async def test_every_record_a_kafka_ml_sink_sends_is_trained_on(plane: Settings, infra: Infra, size: int) -> None:
    _, topic = await topic_with_partitions(infra, f"digits{size}", plane.kafka.topic_prefix)
    values, keys = records(N, size, tag=1)

    sent = await asyncio.to_thread(kafka_ml_sink, infra.bootstrap_servers, plane.kafka.control_topic, topic,
                                   values, keys)
    assert sent.count() == N and len(sent.offsets) == PARTITIONS
    loss = report(f"{size}-byte records on {PARTITIONS} partitions", sent)

    datasource = await datasource_of(plane, topic)
    # The datasource reads exactly the records the sink sent, partition by partition ...
    assert covered(datasource["ranges"]) == sent.offsets, loss
    assert datasource["announced_ranges"] == sent.announced  # ... and keeps the announcement as it was
    assert datasource["warnings"] == []
    # Every difference says why: one reason per moved endpoint.
    assert len(datasource["range_reasons"]) == moved_endpoints(datasource)
    if size == 12:  # many records per batch: the defect shows on every partition
        assert moved_endpoints(datasource) >= PARTITIONS, loss
    # The training job trains on each sent record once, and on nothing else.
    assert_trained_on_exactly(*await trained_on(plane, datasource), sent)


async def test_records_of_an_earlier_batched_producer_are_not_taken(plane: Settings, infra: Infra) -> None:
    _, topic = await topic_with_partitions(infra, "shared", plane.kafka.topic_prefix)
    earlier_values, earlier_keys = records(1500, 12, tag=2)
    earlier = await asyncio.to_thread(batched_write, infra.bootstrap_servers, topic, earlier_values, earlier_keys)
    assert len(earlier.offsets) == PARTITIONS  # every partition already holds some of the earlier records

    values, keys = records(N, 12, tag=3)
    sent = await asyncio.to_thread(kafka_ml_sink, infra.bootstrap_servers, plane.kafka.control_topic, topic,
                                   values, keys)
    loss = report("12-byte records after an earlier writer", sent, earlier)

    datasource = await datasource_of(plane, topic)
    used = covered(datasource["ranges"])
    assert used == sent.offsets, loss
    assert all(not (offs & used.get(p, set())) for p, offs in earlier.offsets.items())
    assert any("the announced start is inside record batch" in r for r in datasource["range_reasons"]), loss
    assert_trained_on_exactly(*await trained_on(plane, datasource), sent)


async def test_a_second_writer_after_the_announcement_is_not_taken_and_the_warning_says_so(
        plane: Settings, infra: Infra) -> None:
    _, topic = await topic_with_partitions(infra, "appended", plane.kafka.topic_prefix)
    values, keys = records(N, 12, tag=4)
    # The sink sends and computes its ranges; a second writer appends before the bridge reads the announcement.
    sent = await asyncio.to_thread(kafka_ml_send, infra.bootstrap_servers, topic, values, keys)
    later_values, later_keys = records(700, 12, tag=5)
    later = await asyncio.to_thread(batched_write, infra.bootstrap_servers, topic, later_values, later_keys)
    loss = report("12-byte records, then a second writer", sent)
    await asyncio.to_thread(kafka_ml_announce, infra.bootstrap_servers, plane.kafka.control_topic, sent)

    datasource = await datasource_of(plane, topic)
    used = covered(datasource["ranges"])
    assert used == sent.offsets, loss
    assert all(not (offs & used.get(p, set())) for p, offs in later.offsets.items())
    # One warning per partition the second writer appended to, with the number of its records there.
    for p, offs in later.offsets.items():
        warned = [w for w in datasource["warnings"] if w.startswith(f"{topic}[{p}]:")]
        assert len(warned) == 1 and f"{len(offs)} records after offset" in warned[0], datasource["warnings"]
        assert "another writer appended them after the announced records" in warned[0]
    assert_trained_on_exactly(*await trained_on(plane, datasource), sent)


async def test_a_topic_or_partition_that_does_not_exist_is_a_clear_error_and_creates_nothing(infra: Infra) -> None:
    kafka, topic = await topic_with_partitions(infra, "exists")
    missing = f"{kafka.topic_prefix}.missing"
    # Not RangesUnresolved (the time bound): the answer comes from the broker's metadata at once.
    with pytest.raises(UnknownPartition, match=f"topic '{missing}' of range {missing}:0:0:10 does not exist"):
        await resolve_ranges(kafka, [{"topic": missing, "partition": 0, "start": 0, "end": 10}])
    with pytest.raises(UnknownPartition, match=rf"topic '{topic}' has no partition 7 .*its partitions are 0\.\.3"):
        await resolve_ranges(kafka, [{"topic": topic, "partition": 0, "start": 0, "end": 0},
                                     {"topic": topic, "partition": 7, "start": 0, "end": 10}])
    assert missing not in await topics(kafka)  # asking did not make Tansu create it


async def test_a_broker_that_does_not_answer_is_a_temporary_error_within_the_time_bound() -> None:
    kafka = KafkaSettings(bootstrap_servers=f"127.0.0.1:{services.free_port()}")  # nothing listens there
    with pytest.raises(RangesUnresolved, match=r"could not be checked|did not answer within"):
        await resolve_ranges(kafka, [{"topic": "t", "partition": 0, "start": 0, "end": 1}], timeout_s=2)
