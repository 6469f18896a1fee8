"""The control bridge: Kafka-ML datasource announcements on the control topic become commands.

Run by the worker. Kafka-ML's sinks (and tierflow's own) announce training data on the control topic:
key = the deployment id as a big-endian unsigned integer of any length (Kafka-ML sends one byte), value =
JSON `{topic: "t:partition:start:end[,...]", input_format, input_config, description, validation_rate,
test_rate, total_msg, ...}` where the 4th field is the end offset (exclusive); tierflow's sink also puts
`deployment_id` in the JSON. Each message becomes an `AnnounceDatasource` command whose command_id is
derived from the message itself (origin, broker timestamp, content), so a redelivery is decided once while
a new message at a reused offset (a fresh embedded broker) is not mistaken for an old one. What cannot be
parsed goes to the dead-letter topic with the reason.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from tierflow.streams import kafka as kio
from tierflow.streams.envelope import JSON, TIERFLOW_NS, Command
from tierflow.streams.errors import PermanentError
from tierflow.streams.health import AgentHealth
from tierflow.streams.positioned import PositionedReader, Record, first_record
from tierflow.streams.positions import AgentPositions
from tierflow.streams.settings import KafkaSettings
from tierflow.streams.topics import admin_client

log = logging.getLogger("tierflow.control")

AGENT = "control-bridge"
#: The largest announcement bridged (a Kafka-ML datasource has a range per partition: far below it).
ANNOUNCEMENT_MAX_BYTES = 1024 * 1024
#: Range warnings kept on a datasource (the rest are counted).
WARNINGS_MAX = 100
#: The name of a control log that had no record when the bridge started (named by its first record later).
EMPTY_LOG = "empty"


class ControlMessageError(PermanentError, ValueError):
    """A control message tierflow cannot use; the message says what is wrong."""


def parse_ranges(spec: Any) -> list[JSON]:
    if not isinstance(spec, str) or not spec.strip():
        raise ControlMessageError("'topic' must be a string 'topic:partition:start:end[,...]'")
    ranges: list[JSON] = []
    for part in spec.split(","):
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


class ControlBridge:
    def __init__(self, kafka: KafkaSettings, database_url: str, *, health: AgentHealth | None = None) -> None:
        self.kafka = kafka
        self.database_url = database_url
        self.health = health or AgentHealth()
        self.bridged = 0

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
                await self._bridge(records, prod)

            await control.run(stopping, handle)
        finally:
            await control.stop()
            await prod.stop()
            await conn.close()

    async def _check_ranges(self, ranges: list[JSON]) -> list[str]:
        """Compare each announced range with its partition's high-water mark (fetched, not looked up).

        Kafka-ML's sink computes its ranges with a seek-to-end lookup that some brokers (Tansu among them)
        answer too small, so a disagreement is recorded on the datasource for the user to see.
        """
        admin = admin_client(self.kafka)
        await admin.start()
        try:
            # Listing every topic does not auto-create any; describing an unknown one would (Tansu).
            existing = set(await admin.list_topics())
        finally:
            await admin.close()
        warnings: list[str] = []
        present = [r for r in ranges if r["topic"] in existing]
        for r in ranges:
            if r["topic"] not in existing:
                warnings.append(f"{r['topic']}[{r['partition']}]: the topic does not exist on the broker")
        if not present:
            return warnings  # (an aiokafka consumer stopped without ever being assigned raises CancelledError)
        probe = kio.consumer(self.kafka)
        await probe.start()
        try:
            for r in present:
                where = f"{r['topic']}[{r['partition']}]"
                tp = TopicPartition(r["topic"], r["partition"])
                probe.assign([tp])
                try:
                    hw = await kio.fetch_highwater(probe, tp, timeout_ms=3000)
                except (TimeoutError, KafkaError) as exc:
                    warnings.append(f"{where}: could not read the high-water mark ({exc})")
                    continue
                if r["end"] > hw:
                    warnings.append(f"{where}: announced end offset {r['end']} is beyond the high-water mark {hw}; "
                                    f"{r['end'] - hw} announced records are not on the broker")
                elif r["end"] < hw:
                    warnings.append(f"{where}: announced end offset {r['end']} is below the high-water mark {hw}; "
                                    f"{hw - r['end']} later records are not part of this datasource (another "
                                    "writer, or a sink whose end-offset lookup answered too small)")
        finally:
            await probe.stop()
        return warnings

    async def _bridge(self, records: list[Record], prod: AIOKafkaProducer) -> None:
        for record in records:
            try:
                payload = parse_control_message(record.key, record.value)
            except ControlMessageError as exc:
                if not await kio.send_deadletter(prod, self.kafka, record, f"not a datasource announcement: {exc}",
                                                 AGENT):
                    self.health.deadletter_failed(AGENT)
                continue
            payload["origin"] = {"topic": record.topic, "partition": record.partition, "offset": record.offset}
            warnings = await self._check_ranges(payload["ranges"])
            payload["warnings"] = warnings[:WARNINGS_MAX] + (
                [f"... and {len(warnings) - WARNINGS_MAX} more warnings"] if len(warnings) > WARNINGS_MAX else [])
            for warning in payload["warnings"]:
                log.warning("datasource for deployment %s: %s", payload["deployment_id"], warning)
            cmd = Command(command_id=command_id_for(record.topic, record.partition, record.offset,
                                                    int(record.timestamp or 0), record.value),
                          type="AnnounceDatasource", payload=payload, source="control-bridge")
            await prod.send_and_wait(self.kafka.commands_topic, cmd.encode(), key=cmd.key())
            self.bridged += 1
