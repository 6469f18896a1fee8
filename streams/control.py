"""The control bridge: Kafka-ML datasource announcements on the control topic become commands.

Run by the worker. Kafka-ML's sinks (and tierflow's own) announce training data on the control topic:
key = the deployment id as a big-endian unsigned integer of any length (Kafka-ML sends one byte), value =
JSON `{topic: "t:partition:start:end[,...]", input_format, input_config, description, validation_rate,
test_rate, total_msg, ...}` where the 4th field is the end offset (exclusive); tierflow's sink also puts
`deployment_id` in the JSON. Each message becomes an `AnnounceDatasource` command whose command_id is
derived from the message itself (origin, broker timestamp, content), so a redelivery is decided once while
a new message at a reused offset (a fresh embedded broker) is not mistaken for an old one.

Before the command is sent, the announced ranges are checked on the broker (streams/ranges.py:
`resolve_ranges`): the command carries the ranges training will read (`ranges`), the ones announced
(`announced_ranges`), why they differ (`range_reasons`: Kafka-ML's seek-to-end offsets made exact on a broker
that answers them inside a record batch) and what still does not match (`warnings`). The decider records
all four, so a replay needs no broker. What cannot be parsed, or names a topic or partition the broker
does not have, goes to the dead-letter topic with the reason, within seconds, and the bridge goes on; a
broker that does not answer fails the agent after a few tries, and the worker restarts it at the same
message.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tierflow.streams import kafka as kio
from tierflow.streams.catalogue import MAX_RANGES
from tierflow.streams.envelope import JSON, TIERFLOW_NS, Command
from tierflow.streams.errors import PermanentError, TierflowError
from tierflow.streams.health import AgentHealth
from tierflow.streams.positioned import PositionedReader, Record, first_record
from tierflow.streams.positions import AgentPositions
from tierflow.streams.ranges import DEFAULT_TIMEOUT_S, RangesUnresolved, Resolution, UnknownPartition, resolve_ranges
from tierflow.streams.settings import KafkaSettings

log = logging.getLogger("tierflow.control")

AGENT = "control-bridge"
#: The largest announcement bridged (a Kafka-ML datasource has a range per partition: far below it).
ANNOUNCEMENT_MAX_BYTES = 1024 * 1024
#: Range warnings kept on a datasource (the rest are counted).
WARNINGS_MAX = 100
#: The name of a control log that had no record when the bridge started (named by its first record later).
EMPTY_LOG = "empty"
#: Tries at checking one announcement's ranges on the broker before the agent fails (and restarts there).
RESOLVE_ATTEMPTS = 3

#: Checks the announced ranges on the broker: the used ranges, or UnknownPartition / RangesUnresolved.
Resolver = Callable[[KafkaSettings, list[JSON]], Awaitable[Resolution]]


class ControlMessageError(PermanentError, ValueError):
    """A control message tierflow cannot use; the message says what is wrong."""


def parse_ranges(spec: Any) -> list[JSON]:
    if not isinstance(spec, str) or not spec.strip():
        raise ControlMessageError("'topic' must be a string 'topic:partition:start:end[,...]'")
    parts = spec.split(",")
    if len(parts) > MAX_RANGES:
        raise ControlMessageError(f"'topic' names {len(parts)} ranges; at most {MAX_RANGES} are accepted")
    ranges: list[JSON] = []
    for part in parts:
        fields = part.strip().rsplit(":", 3)
        if len(fields) != 4 or not fields[0]:
            raise ControlMessageError(f"'topic' entry {part!r} is not 'topic:partition:start:end'")
        name, *nums = fields
        try:
            partition, start, end = (int(n) for n in nums)
        except ValueError:
            raise ControlMessageError(f"'topic' entry {part!r} has a non-integer partition or offset") from None
        if partition < 0 or start < 0 or end < start:
            raise ControlMessageError(f"'topic' entry {part!r}: need partition >= 0 and 0 <= start <= end")
        ranges.append({"topic": name, "partition": partition, "start": start, "end": end})
    return ranges


def _rate(obj: JSON, name: str) -> float:
    value = obj.get(name, 0) or 0
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise ControlMessageError(f"'{name}' must be a number in [0, 1), got {value!r}") from None
    if not 0 <= rate < 1:
        raise ControlMessageError(f"'{name}' must be in [0, 1), got {rate}")
    return rate


def parse_control_message(key: bytes | None, value: bytes | None) -> JSON:
    """The AnnounceDatasource payload for one control message (pure)."""
    if not value:
        raise ControlMessageError("empty control message")
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise ControlMessageError(f"control message is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ControlMessageError("control message must be a JSON object")
    deployment_id = obj.get("deployment_id")
    if deployment_id is None:
        if not key:
            raise ControlMessageError("no deployment id: neither a 'deployment_id' field nor a message key")
        deployment_id = int.from_bytes(key, "big", signed=False)
    if isinstance(deployment_id, bool) or not isinstance(deployment_id, int) or deployment_id < 1:
        raise ControlMessageError(f"deployment id must be a positive integer, got {deployment_id!r}")
    fmt = str(obj.get("input_format", "RAW")).upper()
    if fmt not in ("RAW", "AVRO"):
        raise ControlMessageError(f"'input_format' must be RAW or AVRO, got {obj.get('input_format')!r}")
    config = obj.get("input_config", {})
    if isinstance(config, str):
        try:
            config = orjson.loads(config) if config.strip() else {}
        except orjson.JSONDecodeError:
            raise ControlMessageError("'input_config' is a string but not JSON") from None
    if not isinstance(config, dict):
        raise ControlMessageError("'input_config' must be a JSON object")
    validation_rate, test_rate = _rate(obj, "validation_rate"), _rate(obj, "test_rate")
    if validation_rate + test_rate >= 1:
        raise ControlMessageError("validation_rate + test_rate must leave some data for training (< 1)")
    total = obj.get("total_msg")
    if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 0):
        raise ControlMessageError(f"'total_msg' must be a non-negative integer, got {total!r}")
    ranges = parse_ranges(obj.get("topic"))
    payload: JSON = {
        "deployment_id": deployment_id,
        "ranges": ranges,
        "input_format": fmt,
        "input_config": config,
        "description": str(obj.get("description", "")),
        "validation_rate": validation_rate,
        "test_rate": test_rate,
        "total_msg": total,
    }
    # A short `topic` spec expands (200,000 ranges from 1.6 MB): bound the command before anything is probed,
    # or the bridge would fail on producing it, at the same record, forever.
    size = len(orjson.dumps(payload))
    if size > ANNOUNCEMENT_MAX_BYTES:
        raise ControlMessageError(f"the announcement is too large: {size} bytes as a command "
                                  f"({len(ranges)} ranges), over the {ANNOUNCEMENT_MAX_BYTES}-byte limit")
    return payload


def log_identity(first: Record) -> str:
    """The name of a control log: its first record's offset, timestamp and digest."""
    return f"{first.offset}:{first.timestamp}:{hashlib.sha256(first.value or b'').hexdigest()[:16]}"


async def control_log_id(c: AIOKafkaConsumer, tp: TopicPartition) -> str:
    """The control topic has no marker (other tools read it): its first record identifies the log."""
    first = await first_record(c, tp)
    return EMPTY_LOG if first is None else log_identity(first)


def command_id_for(topic: str, partition: int, offset: int, timestamp: int, value: bytes) -> str:
    digest = hashlib.sha256(value).hexdigest()
    return str(uuid.uuid5(TIERFLOW_NS, f"control:{topic}:{partition}:{offset}:{timestamp}:{digest}"))


class Stopping(TierflowError):
    """The worker stops while an announcement waits for the broker: leave without recording the position."""


async def resolve_in_time(kafka: KafkaSettings, ranges: list[JSON]) -> Resolution:
    """The bridge's `Resolver`: `resolve_ranges` within its default time bound."""
    return await resolve_ranges(kafka, ranges, timeout_s=DEFAULT_TIMEOUT_S)


class ControlBridge:
    def __init__(self, kafka: KafkaSettings, database_url: str, *, resolve: Resolver = resolve_in_time,
                 health: AgentHealth | None = None, commands_written: kio.Doorbell | None = None) -> None:
        self.kafka = kafka
        self.database_url = database_url
        #: rung after an announcement is on the commands topic: the decider (same process) reads it at once
        self.commands_written = commands_written
        #: checks an announcement's ranges on the broker (a test may wrap it to play a broker that fails)
        self.resolve = resolve
        self.health = health or AgentHealth()
        self.bridged = 0
        #: times the broker did not answer an announcement's check (each try counts)
        self.unresolved = 0

    async def run(self, stopping: asyncio.Event) -> None:
        prod = kio.producer(self.kafka)
        conn = await asyncpg.connect(self.database_url)
        control = PositionedReader(self.kafka, self.kafka.control_topic, store=AgentPositions(conn, AGENT),
                                   log_id=control_log_id, max_records=500)
        try:
            await control.start()
            await prod.start()

            async def handle(records: list[Record]) -> None:
                if control.log_id == EMPTY_LOG and records[0].offset == 0:
                    control.log_id = log_identity(records[0])  # the log was empty at start: now it has a name
                await self._bridge(records, prod, stopping)

            with contextlib.suppress(Stopping):  # raised before the position is saved: the next start resumes there
                await control.run(stopping, handle)
        finally:
            await control.stop()
            await prod.stop()
            await conn.close()

    async def _bridge(self, records: list[Record], prod: AIOKafkaProducer, stopping: asyncio.Event) -> None:
        for record in records:
            try:
                payload = parse_control_message(record.key, record.value)
                resolution = await self._resolve(payload["ranges"], stopping)
            except (ControlMessageError, UnknownPartition) as exc:
                what = "not a datasource announcement" if isinstance(exc, ControlMessageError) else (
                    "the announcement names data that is not on the broker")
                if not await kio.send_deadletter(prod, self.kafka, record, f"{what}: {exc}", AGENT):
                    self.health.deadletter_failed(AGENT)
                continue
            warnings = list(resolution.warnings)
            payload |= {"ranges": resolution.used, "announced_ranges": resolution.announced,
                        "range_reasons": resolution.reasons,
                        "warnings": warnings[:WARNINGS_MAX] + (
                            [f"... and {len(warnings) - WARNINGS_MAX} more warnings"]
                            if len(warnings) > WARNINGS_MAX else []),
                        "origin": {"topic": record.topic, "partition": record.partition, "offset": record.offset}}
            for warning in payload["warnings"]:
                log.warning("datasource for deployment %s: %s", payload["deployment_id"], warning)
            cmd = Command(command_id=command_id_for(record.topic, record.partition, record.offset,
                                                    int(record.timestamp or 0), record.value),
                          type="AnnounceDatasource", payload=payload, source=AGENT)
            await prod.send_and_wait(self.kafka.commands_topic, cmd.encode(), key=cmd.key())
            self.bridged += 1
            if self.commands_written is not None:
                self.commands_written.ring()

    async def _resolve(self, ranges: list[JSON], stopping: asyncio.Event) -> Resolution:
        """The used ranges of an announcement (streams/ranges.py), asking the broker up to RESOLVE_ATTEMPTS times.

        A broker that does not answer in time is waited for, then the agent fails: the worker restarts it at
        the same position, so the announcement is neither lost nor decided without its check.
        """
        for attempt in range(1, RESOLVE_ATTEMPTS + 1):
            try:
                return await self.resolve(self.kafka, ranges)
            except RangesUnresolved as exc:
                self.unresolved += 1
                if attempt == RESOLVE_ATTEMPTS:
                    raise
                log.warning("announced ranges not checked (attempt %d of %d): %s; retrying in %.1f s", attempt,
                            RESOLVE_ATTEMPTS, exc, exc.delay_s)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), timeout=exc.delay_s)
                if stopping.is_set():
                    raise Stopping("stopping while an announcement waits for the broker") from None
        raise AssertionError("unreachable")  # the loop returns or raises
