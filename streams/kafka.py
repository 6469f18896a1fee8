"""Thin wrappers over aiokafka: clients configured for tierflow, high-water reads, and dead letters.

Used by every agent of the worker, the API, the archive restore and the benchmarks. All consumers use a
short `fetch_max_wait_ms` (Tansu holds a fetch for the whole wait even when data arrives) and manual
partition assignment where the position is owned by tierflow (events log, Postgres tracking), so no
consumer-group join (slow on Tansu) is on any start-up path.

Dead letters are bounded in size, and one that cannot be sent is logged and skipped (`send_deadletter`), so
no record can make an agent fail on it over and over.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import weakref
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from tierflow.streams.envelope import now_iso
from tierflow.streams.settings import KafkaSettings

log = logging.getLogger("tierflow.kafka")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop for a process whose work is Kafka round trips (a tier agent): uvloop's where it is
    installed (a dependency on Linux and macOS), asyncio's otherwise. Every fetch, produce and acknowledgement
    is a few loop wake-ups, and a tier fed one sample per record makes hundreds of them per second."""
    try:
        import uvloop
    except ImportError:  # Windows, or a device install without it
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def security_options(kafka: KafkaSettings) -> dict[str, Any]:
    """How a client signs in: nothing on a PLAINTEXT broker (the embedded one); the user and password of this
    process on a Kafka that authenticates (SASL, each component its own user with ACLs: docs/cluster.md).
    Every client tierflow makes takes these (producers, consumers, admin clients)."""
    if kafka.security_protocol == "PLAINTEXT":
        return {}
    options: dict[str, Any] = {"security_protocol": kafka.security_protocol}
    if kafka.security_protocol.startswith("SASL"):
        options |= {"sasl_mechanism": kafka.sasl_mechanism, "sasl_plain_username": kafka.sasl_username,
                    "sasl_plain_password": kafka.sasl_password}
    if kafka.security_protocol.endswith("SSL"):
        from aiokafka.helpers import create_ssl_context

        options["ssl_context"] = create_ssl_context()  # the system's CAs
    return options


def producer(kafka: KafkaSettings, **overrides: Any) -> AIOKafkaProducer:
    options: dict[str, Any] = {
        **security_options(kafka),
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
        **security_options(kafka),
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


#: The step of waiting for a fetch response: an empty response wakes no `getmany` (one with nothing to return
#: waits its whole timeout although the answer came at once), so it is noticed by the partition's poll
#: timestamp, checked this often. Records still return at once.
RESPONSE_STEP_MS = 2


async def next_response(c: AIOKafkaConsumer, tp: TopicPartition, *, max_records: int, timeout_s: float
                        ) -> list[ConsumerRecord[Any, Any]]:
    """Wait for the next fetch response of the (assigned, not paused) partition: its records, or [] once an
    empty response came back (the partition's `highwater` is then fresh) or `timeout_s` passed."""
    loop = asyncio.get_running_loop()
    mark = c.last_poll_timestamp(tp)
    deadline = loop.time() + timeout_s
    while True:
        batch = await c.getmany(tp, timeout_ms=RESPONSE_STEP_MS, max_records=max_records)
        records: list[ConsumerRecord[Any, Any]] = batch.get(tp, [])
        if records or c.last_poll_timestamp(tp) != mark or loop.time() > deadline:
            return records


async def fetch_highwater(c: AIOKafkaConsumer, tp: TopicPartition, *, timeout_ms: int = 2000) -> int:
    """The partition's high-water mark as the broker reports it in a fetch response.

    A "latest offset" lookup can answer too small on Tansu after multi-record batches, so the value comes
    from a real fetch. Keeps the consumer's position (the caller's next getmany resumes where it was) and
    whether the partition is paused (a paused one is resumed for this fetch only). Returns as soon as the
    response is in: an empty partition costs one fetch round, not `timeout_ms`.
    """
    position = int(await c.position(tp))
    hw = c.highwater(tp)
    if hw is not None and hw > position:
        return int(hw)
    paused = tp in c.paused()
    if paused:
        c.resume(tp)
    try:
        # Fetch once at the current position: the response carries the high-water mark even when empty.
        records = await next_response(c, tp, max_records=1, timeout_s=timeout_ms / 1000)
    finally:
        if paused:
            c.pause(tp)
    hw = c.highwater(tp)
    c.seek(tp, position)
    if hw is None:
        if records:
            return int(records[-1].offset) + 1
        raise TimeoutError(f"no fetch response for {tp.topic}[{tp.partition}] within {timeout_ms} ms")
    return int(hw)


async def first_of(*events: asyncio.Event, timeout: float | None = None) -> None:
    """Wait until one of `events` is set or `timeout` seconds passed (at once when it is <= 0; None: no limit)."""
    if (timeout is not None and timeout <= 0) or any(e.is_set() for e in events):
        return
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


class Doorbell:
    """A wake-up one part of a process gives the idle readers of the same process: "records are on their way".

    The worker's decider rings it after producing events, and the projector, reading those events, stops
    waiting at once instead of finishing its idle wait. Each reader listens on its own event (`listener`);
    a listener nobody holds any more is dropped, so readers restarted by the worker leave nothing behind.
    """

    def __init__(self) -> None:
        self._listeners: weakref.WeakSet[asyncio.Event] = weakref.WeakSet()

    def listener(self) -> asyncio.Event:
        event = asyncio.Event()
        self._listeners.add(event)
        return event

    def ring(self) -> None:
        for event in list(self._listeners):
            event.set()


class IdleFetch:
    """Fetches one assigned partition with a wait that follows the traffic: at once while records arrive, then
    less and less often while none do, up to `TIERFLOW_FETCH_IDLE_WAIT_MS` between fetches.

    Used by `PositionedReader.run` (decider, validator, control bridge) and the projector loop. Why: the
    embedded broker holds every fetch for the consumer's whole `fetch_max_wait_ms` and does not answer a long
    poll when data arrives, so the wait must be short (5 ms) for latency; but a consumer fetching back to back
    with a 5 ms wait sends ~200 requests/s to the broker while nothing happens, and the agents of an idle stack
    burned most of a core that way (issue 12). Between fetches while idle the partition is paused
    (`AIOKafkaConsumer.pause`, public API: aiokafka's background fetcher then sends nothing for it) for a wait
    that doubles from `fetch_max_wait_ms` up to the idle wait; a record arriving while paused waits at most
    that long, and a ring of the reader's `Doorbell` ends the pause at once; a round after a ring that comes
    back empty fetches again at once (its response may be one the broker began before the ringing write).
    """

    #: how long a fetch may take before the round counts as empty anyway (a broker that does not answer)
    RESPONSE_S = 1.0

    def __init__(self, consumer: AIOKafkaConsumer, tp: TopicPartition, kafka: KafkaSettings, *,
                 wake: asyncio.Event | None = None) -> None:
        self.consumer = consumer
        self.tp = tp
        self.wake = wake
        self.first_idle_s = max(1, kafka.fetch_max_wait_ms) / 1000
        self.max_idle_s = kafka.fetch_idle_wait_ms / 1000
        #: the pause before the next fetch (0 while records arrive)
        self.idle_s = 0.0
        #: fetch rounds that found nothing (read by tests and benchmarks)
        self.empty_rounds = 0

    async def next(self, max_records: int, stopping: asyncio.Event) -> list[ConsumerRecord[Any, Any]]:
        """The next records of the partition (at most `max_records`); [] when a fetch round found none, or
        `stopping` was set during the pause."""
        woken = False
        if self.idle_s > 0 and self.max_idle_s > 0:
            woken = await self._pause(stopping)
            if stopping.is_set():
                return []
        records = await next_response(self.consumer, self.tp, max_records=max_records,
                                      timeout_s=self.RESPONSE_S)
        if records:
            self.idle_s = 0.0
            return records
        self.empty_rounds += 1
        # Woken but empty: the response was one the broker began before the ringing write (Tansu reads a fetch's
        # records when it arrives, then holds it): fetch again at once instead of sleeping the idle wait with the
        # record there (measured: 4 of 15 writes after 3 s of idle took 1,010 ms in the decider).
        self.idle_s = 0.0 if woken else min(self.max_idle_s, max(self.first_idle_s, 2 * self.idle_s))
        return []

    async def _pause(self, stopping: asyncio.Event) -> bool:
        """Pause until the idle wait ends or the doorbell rings (True) or `stopping` is set."""
        self.consumer.pause(self.tp)
        try:
            await first_of(stopping, *([] if self.wake is None else [self.wake]), timeout=self.idle_s)
            if self.wake is None or not self.wake.is_set():
                return False
            self.wake.clear()  # before the fetch: a ring after this point is seen by the next round
            return True
        finally:
            self.consumer.resume(self.tp)


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


#: The largest dead letter sent: below Kafka's default largest message (1 MiB, `message.max.bytes`), so a dead
#: letter fits any broker and topic left at their defaults, and far below the producer's `max_request_size`.
DEADLETTER_MAX_BYTES = 1024 * 1024 - 64 * 1024
#: How much of a value (and of a key) too large for a dead letter is kept, hex-encoded (twice its size).
DEADLETTER_KEEP_BYTES = 64 * 1024
#: A key longer than this is not reused as the dead letter's key (the dead letter names its size and digest).
KEY_MAX_BYTES = 1024
#: Longest reason kept (a reason may quote the record).
REASON_MAX = 10_000


def _as_text(value: bytes) -> tuple[str, str]:
    """The bytes as UTF-8 text when they decode, else hex; and which."""
    try:
        return value.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return value.hex(), "hex"


def deadletter_value(origin: Origin, reason: str, value: bytes | None, agent: str, *,
                     key: bytes | None = None, limit: int = DEADLETTER_MAX_BYTES) -> bytes:
    """A dead letter: the original bytes (as text if they decode, else hex), the reason and the origin.

    Bounded: when the whole record would make a dead letter over `limit` bytes (JSON escapes a NUL byte as six
    bytes, so a 1.5 MB record can make a 9 MB letter), it keeps the first `DEADLETTER_KEEP_BYTES` of the value
    (hex), with the value's size and sha256, `truncated: true`; the record itself stays at its origin. A key
    over `KEY_MAX_BYTES` is described the same way.
    """
    payload: dict[str, Any] = {
        "reason": reason[:REASON_MAX],
        "origin": origin.to_json(),
        "agent": agent,
        "at": now_iso(),
    }
    if key is not None and len(key) > KEY_MAX_BYTES:
        payload["key"] = {"size": len(key), "sha256": hashlib.sha256(key).hexdigest(),
                          "head": key[:KEY_MAX_BYTES].hex(), "encoding": "hex"}
    if value is None:
        payload["value"] = None
        return orjson.dumps(payload)
    payload["value"], payload["encoding"] = _as_text(value)
    whole = orjson.dumps(payload)
    if len(whole) <= limit:
        return whole
    payload["value"], payload["encoding"] = value[:DEADLETTER_KEEP_BYTES].hex(), "hex"
    payload |= {"truncated": True, "size": len(value), "sha256": hashlib.sha256(value).hexdigest()}
    return orjson.dumps(payload)


async def send_deadletter(p: AIOKafkaProducer, kafka: KafkaSettings, record: ConsumerRecord[Any, Any],
                          reason: str, agent: str) -> bool:
    """Send the record's dead letter; whether it was sent.

    A dead letter that cannot be sent (the broker refused it, or did not answer in time) is logged with the
    record's origin, size and digest and skipped, never raised: the record is still at its origin, and raising
    would restart the agent at the same record forever. The caller counts it (a Prometheus metric).
    """
    origin = Origin.of(record)
    log.warning("dead-lettering %s[%d]@%d: %s", origin.topic, origin.partition, origin.offset, reason[:1000])
    key = record.key if record.key is None or len(record.key) <= KEY_MAX_BYTES else None
    headers = [("tierflow.reason", reason.encode()[:1000]), ("tierflow.origin.topic", origin.topic.encode()),
               ("tierflow.origin.partition", str(origin.partition).encode()),
               ("tierflow.origin.offset", str(origin.offset).encode())]
    value = deadletter_value(origin, reason, record.value, agent, key=record.key)
    try:
        await p.send_and_wait(kafka.deadletter_topic, value, key=key, headers=headers)
    except KafkaError as exc:
        size = len(record.value or b"")
        digest = hashlib.sha256(record.value or b"").hexdigest()
        log.error("could not dead-letter %s[%d]@%d (%d bytes, sha256 %s): %s: %s; skipped, the record stays at its "
                  "origin", origin.topic, origin.partition, origin.offset, size, digest, type(exc).__name__, exc)
        return False
    return True
