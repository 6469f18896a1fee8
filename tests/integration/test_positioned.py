"""The positioned reader the decider, validator and control bridge share: it resumes after the position stored
for the log it reads, ignores a position recorded in another log, and records its position after each batch."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.conftest import wait_until
from tierflow.streams import kafka as kio
from tierflow.streams.positioned import PositionedReader, Record
from tierflow.streams.settings import Settings
from tierflow.streams.topics import TopicSpec, ensure_topics


class MemoryPositions:
    """A position store in memory: {log_id: offset}."""

    def __init__(self, positions: dict[str, int]) -> None:
        self.positions = dict(positions)

    async def load(self, log_id: str) -> int | None:
        return self.positions.get(log_id)

    async def save(self, log_id: str, offset: int) -> None:
        self.positions[log_id] = offset


async def log_a(c: AIOKafkaConsumer, tp: TopicPartition) -> str:
    return "log-a"


async def read(plane: Settings, topic: str, store: MemoryPositions, until: int) -> list[bytes]:
    """Run a reader until it has handled offset `until`; the values it was handed, in order."""
    reader = PositionedReader(plane.kafka, topic, store=store, log_id=log_a, max_records=2)
    seen: list[bytes] = []
    stopping = asyncio.Event()

    async def handle(records: list[Record]) -> None:
        assert len(records) <= 2  # batches never exceed max_records
        seen.extend(r.value for r in records)

    await reader.start()
    try:
        task = asyncio.create_task(reader.run(stopping, handle))
        await wait_until(lambda: store.positions.get("log-a") == until, what=f"position {until}")
        stopping.set()
        await asyncio.wait_for(task, 10)
    finally:
        await reader.stop()
    return seen


async def test_the_reader_resumes_after_its_position_in_the_same_log(plane: Settings) -> None:
    topic = f"{plane.kafka.topic_prefix}.positioned"
    await ensure_topics(plane.kafka, extra=[TopicSpec(topic, 1, -1)])
    p = kio.producer(plane.kafka)
    await p.start()
    try:
        for i in range(5):
            await p.send_and_wait(topic, f"r{i}".encode())
    finally:
        await p.stop()
    # A position in this log: the reader goes on after it, and records where it got to.
    store = MemoryPositions({"log-a": 1})
    assert await read(plane, topic, store, until=4) == [b"r2", b"r3", b"r4"]
    # A position recorded in another log (a previous broker's) is not applied: the log is read from its start.
    store = MemoryPositions({"log-b": 3})
    assert await read(plane, topic, store, until=4) == [b"r0", b"r1", b"r2", b"r3", b"r4"]
    assert store.positions == {"log-a": 4, "log-b": 3}


async def test_an_idle_reader_fetches_rarely_and_its_doorbell_wakes_it_at_once(plane: Settings) -> None:
    """While nothing arrives the reader pauses between fetches (up to the idle wait) instead of fetching back to
    back; a record arriving then is still handed over, and a ring of its doorbell ends the pause at once."""
    topic = f"{plane.kafka.topic_prefix}.idle"
    await ensure_topics(plane.kafka, extra=[TopicSpec(topic, 1, -1)])
    kafka = replace(plane.kafka, fetch_idle_wait_ms=200)
    bell = kio.Doorbell()
    reader = PositionedReader(kafka, topic, store=MemoryPositions({}), log_id=log_a, max_records=10, wake=bell)
    seen: list[bytes] = []
    stopping = asyncio.Event()

    async def handle(records: list[Record]) -> None:
        seen.extend(r.value for r in records)

    p = kio.producer(plane.kafka)
    await p.start()
    await reader.start()
    task = asyncio.create_task(reader.run(stopping, handle))
    try:
        await wait_until(lambda: reader.fetch.idle_s == 0.2, what="the reader reaching its idle wait")
        before = reader.fetch.empty_rounds
        await asyncio.sleep(2.0)  # the idle window being measured
        rounds = reader.fetch.empty_rounds - before
        # Fetching back to back with a 5 ms wait would be ~400 rounds; pausing 200 ms between them, ~10.
        assert rounds <= 12, rounds
        await p.send_and_wait(topic, b"after-idle")
        await wait_until(lambda: seen == [b"after-idle"], what="the record sent while the reader idled")
        # A long idle wait: only the ring can make the reader see the next record within seconds.
        reader.fetch.max_idle_s = reader.fetch.idle_s = 60.0
        await asyncio.sleep(0.3)  # let it enter its 60 s pause
        await p.send_and_wait(topic, b"rung")
        bell.ring()
        await wait_until(lambda: seen == [b"after-idle", b"rung"], timeout=10, what="the record after the ring")
    finally:
        stopping.set()
        await asyncio.wait_for(task, 10)
        await reader.stop()
        await p.stop()
