"""IdleFetch after a ring: a stale empty response must not put the reader back to sleep for its idle wait.

The embedded broker reads a fetch's records when the request arrives and then holds it for the consumer's
fetch wait, so the first response after a ring can be one that began before the ringing write: empty, though
the record is there. The reader then slept its whole idle wait (1 s by default) with the record waiting; 4 of
15 writes after 3 s of idle took ~1,010 ms in the decider. A consumer stands in here for the broker: no I/O.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import TopicPartition

from tierflow.streams.kafka import Doorbell, IdleFetch
from tierflow.streams.settings import KafkaSettings

TP = TopicPartition("t", 0)


class StaleThenFresh:
    """A consumer whose fetch responses come from a script: each entry is one response (its records)."""

    def __init__(self, responses: list[list[str]]) -> None:
        self.responses = responses
        self.polls = 0
        self.paused = False

    def pause(self, tp: TopicPartition) -> None:
        self.paused = True

    def resume(self, tp: TopicPartition) -> None:
        self.paused = False

    def last_poll_timestamp(self, tp: TopicPartition) -> int:
        return self.polls

    async def getmany(self, tp: TopicPartition, *, timeout_ms: int, max_records: int) -> dict[Any, list[str]]:
        assert not self.paused, "a paused partition is not fetched"
        await asyncio.sleep(0)
        records = self.responses.pop(0) if self.responses else []
        self.polls += 1
        return {tp: records} if records else {}


async def test_a_ring_answered_by_a_stale_empty_response_fetches_again_at_once() -> None:
    kafka = KafkaSettings(bootstrap_servers="unused:9092", fetch_max_wait_ms=5, fetch_idle_wait_ms=30_000)
    bell = Doorbell()
    consumer = StaleThenFresh([[], [], ["the command"]])
    fetch = IdleFetch(consumer, TP, kafka, wake=bell.listener())  # type: ignore[arg-type]
    stopping = asyncio.Event()
    assert await fetch.next(10, stopping) == []  # an empty round: the reader starts waiting
    fetch.idle_s = fetch.max_idle_s  # as after a long idle: the next pause is 30 s
    bell.ring()  # a write: its record is on the topic
    # The first response after the ring is stale (empty); the record comes with the next fetch, which must
    # follow at once, not after the 30 s idle wait.
    assert await asyncio.wait_for(fetch.next(10, stopping), 1) == []
    assert fetch.idle_s == 0.0
    assert await asyncio.wait_for(fetch.next(10, stopping), 1) == ["the command"]


async def test_an_empty_round_without_a_ring_still_lengthens_the_wait() -> None:
    kafka = KafkaSettings(bootstrap_servers="unused:9092", fetch_max_wait_ms=5, fetch_idle_wait_ms=40)
    fetch = IdleFetch(StaleThenFresh([]), TP, kafka, wake=Doorbell().listener())  # type: ignore[arg-type]
    stopping = asyncio.Event()
    waits = []
    for _ in range(5):
        assert await fetch.next(10, stopping) == []
        waits.append(fetch.idle_s)
    assert waits == [0.005, 0.01, 0.02, 0.04, 0.04]
