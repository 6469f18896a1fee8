"""One partition read from a remembered position: the set-up and the fetch loop of the positioned agents.

Used by the decider (streams/decider.py), the validator (streams/validator.py) and the control bridge
(streams/control.py). Each reads one single-partition topic on its own, without a consumer group (a group
join is slow on Tansu, and the position is tierflow's): it assigns the partition, names the log it reads (the
embedded broker's topics start again at offset 0 after a restart, so a position recorded in one incarnation
of a log must never be applied to another), loads its last position in that log, seeks past it, then takes
records in batches and records its position after handling each one. `PositionedReader` does that once for
all three; an agent says where its position lives (`PositionStore`), how its log is named (`LogIdFn`), and
what to do with a batch.

How the agents poll is decided here alone, in `PositionedReader.run`: through `streams.kafka.IdleFetch`, at once
while records arrive and with a wait that lengthens while the partition is idle (a `Doorbell` of the same
process, given as `wake`, ends such a wait).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeAlias

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from tierflow.streams import kafka as kio
from tierflow.streams.settings import KafkaSettings

Record: TypeAlias = "ConsumerRecord[Any, Any]"
#: Names the log in the (assigned) partition; leaves the consumer at the start of the partition.
LogIdFn = Callable[[AIOKafkaConsumer, TopicPartition], Awaitable[str]]
#: Handles one batch of records, in offset order; the position is recorded after it returns.
HandleFn = Callable[[list[Record]], Awaitable[None]]

class PositionStore(Protocol):
    """Where an agent keeps its position: the last offset it handled, per log."""

    async def load(self, log_id: str) -> int | None:
        """The last offset handled in log `log_id`; None when there is none in that log."""
        ...

    async def save(self, log_id: str, offset: int) -> None: ...


async def first_record(c: AIOKafkaConsumer, tp: TopicPartition) -> Record | None:
    """The first record of the (assigned) partition, None when it is empty; leaves the consumer at the start."""
    await c.seek_to_beginning(tp)
    start = await c.position(tp)
    hw = await kio.fetch_highwater(c, tp)
    if hw <= start:
        return None
    batch = await c.getmany(tp, timeout_ms=5000, max_records=1)
    c.seek(tp, start)
    records = batch.get(tp, [])
    return records[0] if records else None


class PositionedReader:
    """Partition 0 of `topic`, read in batches of at most `max_records` from the position in `store`."""

    def __init__(self, kafka: KafkaSettings, topic: str, *, store: PositionStore, log_id: LogIdFn,
                 max_records: int, wake: kio.Doorbell | None = None) -> None:
        self.tp = TopicPartition(topic, 0)
        self.store = store
        self.max_records = max_records
        self.consumer = kio.consumer(kafka, max_poll_records=max_records)
        self._log_id = log_id
        self._wake = None if wake is None else wake.listener()
        #: how the partition is fetched (made by `run`; its counters are read by tests)
        self.fetch = kio.IdleFetch(self.consumer, self.tp, kafka, wake=self._wake)
        self._started = False
        #: the name of the log being read (an agent may name a log that was empty at start once it has records)
        self.log_id = ""
        #: the position read from the store at start; None: the log is read from its start
        self.resumed_after: int | None = None

    async def start(self) -> None:
        """Start the consumer, name the log and seek past the stored position in it."""
        await self.consumer.start()
        self._started = True
        # Assign at once: stopping a started consumer that was never assigned can raise CancelledError (aiokafka).
        self.consumer.assign([self.tp])
        self.log_id = await self._log_id(self.consumer, self.tp)
        self.resumed_after = await self.store.load(self.log_id)
        if self.resumed_after is not None:
            self.consumer.seek(self.tp, self.resumed_after + 1)
        else:
            await self.consumer.seek_to_beginning(self.tp)

    async def stop(self) -> None:
        if self._started:
            await self.consumer.stop()

    async def run(self, stopping: asyncio.Event, handle: HandleFn) -> None:
        """Hand each batch to `handle`, then save the batch's last offset as the position; until `stopping`."""
        while not stopping.is_set():
            records = await self.fetch.next(self.max_records, stopping)
            if not records:
                continue
            await handle(records)
            await self.store.save(self.log_id, records[-1].offset)
