"""JSON envelopes of commands and events (orjson), with schema versions and upcasting on read.

Used by every producer and consumer of the control-plane topics: the API and `streams.client` write
commands; the decider reads commands and writes events; the projector, the archive and the tests read
events. An event written with an old schema version is upcast when read, never rewritten on Kafka.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from tierflow.streams.errors import PermanentError

JSON = dict[str, Any]

#: Namespace for ids derived from other ids (event ids from command ids), so decisions are deterministic.
TIERFLOW_NS = uuid.UUID("6f1c1f7e-3c43-4d0b-9a55-7a8e5e0e3b11")

#: The record that opens each incarnation of the commands topic (see `CommandLogMarker`).
COMMAND_LOG_STARTED = "CommandLogStarted"


class EnvelopeError(PermanentError, ValueError):
    """A record is not a valid envelope; the message says which field is wrong."""


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def new_command_id() -> str:
    return str(uuid.uuid4())


def _require(obj: JSON, name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in obj:
        raise EnvelopeError(f"envelope field '{name}' is missing")
    value = obj[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise EnvelopeError(f"envelope field '{name}' has the wrong type ({type(value).__name__})")
    return value


def _loads(raw: bytes | None) -> JSON:
    if raw is None or raw == b"":
        raise EnvelopeError("empty record")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise EnvelopeError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise EnvelopeError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


# --- commands -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    """What a client asks for. `validation` is attached by the validator agent to model-code commands; `proof`
    says which component of the stack vouches for the command ({by, sig}: streams/proofs.py)."""

    command_id: str
    type: str
    payload: JSON
    version: int = 1
    issued_at: str = field(default_factory=now_iso)
    source: str = "client"
    validation: JSON | None = None
    proof: JSON | None = None

    def to_json(self) -> JSON:
        out: JSON = {
            "command_id": self.command_id,
            "type": self.type,
            "version": self.version,
            "issued_at": self.issued_at,
            "source": self.source,
            "payload": self.payload,
        }
        if self.validation is not None:
            out["validation"] = self.validation
        if self.proof is not None:
            out["proof"] = self.proof
        return out

    def encode(self) -> bytes:
        return orjson.dumps(self.to_json())

    def key(self) -> bytes:
        return self.command_id.encode()


@dataclass(frozen=True)
class CommandLogMarker:
    """First record of a commands-topic incarnation: lets the decider tell a new log from an old one.

    The embedded broker keeps its log in memory, so after `tierflow down/up` the commands topic starts
    again at offset 0; positions recorded in events name the log they belong to.
    """

    log_id: str

    def encode(self) -> bytes:
        return orjson.dumps({"type": COMMAND_LOG_STARTED, "log_id": self.log_id, "at": now_iso()})


def _version(obj: JSON) -> int:
    version = obj.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise EnvelopeError(f"envelope field 'version' must be a positive integer, got {version!r}")
    return version


def decode_command(raw: bytes | None) -> Command | CommandLogMarker:
    obj = _loads(raw)
    if obj.get("type") == COMMAND_LOG_STARTED:
        return CommandLogMarker(log_id=str(_require(obj, "log_id", str)))
    raw_id = _require(obj, "command_id", str)
    try:
        command_id = str(uuid.UUID(raw_id))  # one spelling per id, so a UUID is never decided twice
    except ValueError:
        raise EnvelopeError(f"command_id {raw_id!r} is not a UUID") from None
    validation = obj.get("validation")
    if validation is not None and not isinstance(validation, dict):
        raise EnvelopeError("envelope field 'validation' must be an object")
    proof = obj.get("proof")
    if proof is not None and not isinstance(proof, dict):
        raise EnvelopeError("envelope field 'proof' must be an object")
    return Command(
        command_id=command_id,
        type=_require(obj, "type", str),
        payload=_require(obj, "payload", dict),
        version=_version(obj),
        issued_at=str(obj.get("issued_at", "")),
        source=str(obj.get("source", "kafka")),
        validation=validation,
        proof=proof,
    )


# --- events -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Position:
    """Where in the commands log the command behind an event was read."""

    log_id: str
    offset: int

    def to_json(self) -> JSON:
        return {"log": self.log_id, "offset": self.offset}


@dataclass(frozen=True)
class Event:
    """An accepted fact. `seq` numbers the events log from 1 without gaps (assigned by the decider)."""

    id: str
    seq: int
    type: str
    version: int
    aggregate: str
    aggregate_version: int
    command_id: str
    occurred_at: str
    payload: JSON
    position: Position | None = None

    def to_json(self) -> JSON:
        out: JSON = {
            "id": self.id,
            "seq": self.seq,
            "type": self.type,
            "version": self.version,
            "aggregate": self.aggregate,
            "aggregate_version": self.aggregate_version,
            "command_id": self.command_id,
            "occurred_at": self.occurred_at,
            "payload": self.payload,
        }
        if self.position is not None:
            out["position"] = self.position.to_json()
        return out

    def encode(self) -> bytes:
        return orjson.dumps(self.to_json())

    def key(self) -> bytes:
        return self.aggregate.encode()


Upcaster = Callable[[JSON], JSON]


class Upcasters:
    """Per event type, the current schema version and the functions lifting version n to n + 1."""

    def __init__(self) -> None:
        self._current: dict[str, int] = {}
        self._steps: dict[tuple[str, int], Upcaster] = {}

    def current(self, event_type: str) -> int:
        return self._current.get(event_type, 1)

    def declare(self, event_type: str, version: int) -> None:
        self._current[event_type] = version

    def register(self, event_type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        def wrap(fn: Upcaster) -> Upcaster:
            self._steps[(event_type, from_version)] = fn
            self._current[event_type] = max(self._current.get(event_type, 1), from_version + 1)
            return fn

        return wrap

    def upcast(self, event_type: str, version: int, payload: JSON) -> tuple[int, JSON]:
        target = self.current(event_type)
        if version > target:
            raise EnvelopeError(
                f"{event_type} v{version} is newer than this tierflow understands (v{target}); upgrade tierflow"
            )
        while version < target:
            step = self._steps.get((event_type, version))
            if step is None:
                raise EnvelopeError(f"no upcaster from {event_type} v{version} to v{version + 1}")
            payload = step(payload)
            version += 1
        return version, payload


def decode_event(raw: bytes | None, upcasters: Upcasters) -> Event:
    obj = _loads(raw)
    etype = _require(obj, "type", str)
    version, payload = upcasters.upcast(etype, _require(obj, "version", int), _require(obj, "payload", dict))
    pos = obj.get("position")
    position: Position | None = None
    if pos is not None:
        if not (isinstance(pos, dict) and isinstance(pos.get("log"), str) and isinstance(pos.get("offset"), int)
                and not isinstance(pos.get("offset"), bool)):
            raise EnvelopeError("envelope field 'position' must be {log: string, offset: integer}")
        position = Position(pos["log"], pos["offset"])
    return Event(
        id=_require(obj, "id", str),
        seq=_require(obj, "seq", int),
        type=etype,
        version=version,
        aggregate=_require(obj, "aggregate", str),
        aggregate_version=_require(obj, "aggregate_version", int),
        command_id=_require(obj, "command_id", str),
        occurred_at=_require(obj, "occurred_at", str),
        payload=payload,
        position=position,
    )


def event_id_for(command_id: str) -> str:
    """Each command produces exactly one event, so the event id is derived from the command id."""
    return str(uuid.uuid5(TIERFLOW_NS, command_id))
