"""Thin wrappers over aiokafka: clients configured for tierflow, high-water reads, and dead letters.

Used by every agent of the worker, the API, the archive restore and the benchmarks. All consumers use a
short `fetch_max_wait_ms` (Tansu holds a fetch for the whole wait even when data arrives) and manual
partition assignment where the position is owned by tierflow (events log, Postgres tracking), so no
consumer-group join (slow on Tansu) is on any start-up path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from tierflow.streams.envelope import now_iso
from tierflow.streams.settings import KafkaSettings

log = logging.getLogger("tierflow.kafka")


def producer(kafka: KafkaSettings, **overrides: Any) -> AIOKafkaProducer:
    options: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap_servers,
        "acks": "all",
        "linger_ms": 0,
        "enable_idempotence": False,  # Tansu rejects the idempotent producer (DESIGN: known quirks)
        "max_request_size": 8 * 1024 * 1024,
        "request_timeout_ms": 15000,
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


def consumer(kafka: KafkaSettings, **overrides: Any) -> AIOKafkaConsumer:
    """A consumer without a group: the caller assigns partitions and seeks."""
    options: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap_servers,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "fetch_max_wait_ms": kafka.fetch_max_wait_ms,
        "max_partition_fetch_bytes": 8 * 1024 * 1024,
        "fetch_max_bytes": 32 * 1024 * 1024,
        "request_timeout_ms": 15000,
        "group_id": None,
    }
    options.update(overrides)
    return AIOKafkaConsumer(**options)


async def fetch_highwater(c: AIOKafkaConsumer, tp: TopicPartition, *, timeout_ms: int = 2000) -> int:
    """The partition's high-water mark as the broker reports it in a fetch response.

    A "latest offset" lookup can answer too small on Tansu after multi-record batches, so the value comes
    from a real fetch. Keeps the consumer's position: the caller's next getmany resumes where it was.
    """
    position = int(await c.position(tp))
    hw = c.highwater(tp)
    if hw is not None and hw > position:
        return int(hw)
    # Fetch once at the current position: the response carries the high-water mark even when empty.
    batch = await c.getmany(tp, timeout_ms=timeout_ms, max_records=1)
    records = batch.get(tp, [])
    hw = c.highwater(tp)
    c.seek(tp, position)
    if hw is None:
        if records:
            return int(records[-1].offset) + 1
        raise TimeoutError(f"no fetch response for {tp.topic}[{tp.partition}] within {timeout_ms} ms")
    return int(hw)


@dataclass(frozen=True)
class Origin:
    topic: str
    partition: int
    offset: int

    @classmethod
    def of(cls, record: ConsumerRecord[Any, Any]) -> Origin:
        return cls(record.topic, record.partition, record.offset)

    def to_json(self) -> dict[str, Any]:
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset}


def deadletter_value(origin: Origin, reason: str, value: bytes | None, agent: str) -> bytes:
    """A dead letter: the original bytes (as text if they decode, else hex), the reason and the origin."""
    payload: dict[str, Any] = {
        "reason": reason,
        "origin": origin.to_json(),
        "agent": agent,
        "at": now_iso(),
    }
    if value is None:
        payload["value"] = None
    else:
        try:
            payload["value"] = value.decode("utf-8")
            payload["encoding"] = "utf-8"
        except UnicodeDecodeError:
            payload["value"] = value.hex()
            payload["encoding"] = "hex"
    return orjson.dumps(payload)


async def send_deadletter(p: AIOKafkaProducer, kafka: KafkaSettings, record: ConsumerRecord[Any, Any],
                          reason: str, agent: str) -> None:
    origin = Origin.of(record)
    log.warning("dead-lettering %s[%d]@%d: %s", origin.topic, origin.partition, origin.offset, reason)
    headers = [("tierflow.reason", reason.encode()[:1000]), ("tierflow.origin.topic", origin.topic.encode()),
               ("tierflow.origin.partition", str(origin.partition).encode()),
               ("tierflow.origin.offset", str(origin.offset).encode())]
    await p.send_and_wait(kafka.deadletter_topic, deadletter_value(origin, reason, record.value, agent),
                          key=record.key, headers=headers)
