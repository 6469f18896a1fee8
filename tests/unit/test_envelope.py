"""Unit tests of `tierflow.streams.envelope`: command and event envelopes, the command-log marker,
schema upcasting and deterministic event ids. Pure: bytes in, bytes out, no broker.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest

from tierflow.streams.envelope import (
    COMMAND_LOG_STARTED,
    JSON,
    Command,
    CommandLogMarker,
    EnvelopeError,
    Event,
    Position,
    Upcasters,
    decode_command,
    decode_event,
    event_id_for,
    new_command_id,
    now_iso,
)

CID = "0f8c7a52-9a4e-4c53-8a57-4d3f0c6b2a10"


def raw(obj: Any) -> bytes:
    return orjson.dumps(obj)


def command_json(**overrides: Any) -> JSON:
    obj: JSON = {"command_id": CID, "type": "RegisterModel", "payload": {"name": "m", "code": "x"}}
    obj.update(overrides)
    return obj


def event_json(**overrides: Any) -> JSON:
    obj: JSON = {
        "id": event_id_for(CID), "seq": 7, "type": "ModelDeleted", "version": 1, "aggregate": "model:3",
        "aggregate_version": 2, "command_id": CID, "occurred_at": "2024-05-01T10:00:00.000000Z",
        "payload": {"id": 3, "name": "m"},
    }
    obj.update(overrides)
    return obj


# -- commands ------------------------------------------------------------------------------------------

def test_a_command_survives_encode_and_decode() -> None:
    # A client writes a command; the decider reads back exactly the same command.
    cmd = Command(command_id=new_command_id(), type="RegisterModel", payload={"name": "edge", "code": "x = 1"},
                  version=1, issued_at="2024-05-01T10:00:00.000000Z", source="api")
    assert decode_command(cmd.encode()) == cmd


def test_a_validated_command_keeps_its_verdict_through_the_wire() -> None:
    # The validator re-sends the command with the sandbox verdict attached.
    verdict = {"ok": True, "summary": {"input_shape": [None, 64], "output_shapes": [[None, 10]], "params": 650}}
    cmd = Command(command_id=new_command_id(), type="UpdateModel", payload={"id": 1, "code": "y"},
                  validation=verdict, source="api+validator")
    back = decode_command(cmd.encode())
    assert back == cmd
    assert back.validation == verdict


def test_a_command_without_verdict_carries_no_validation_field() -> None:
    cmd = Command(command_id=CID, type="DeleteModel", payload={"id": 1})
    assert "validation" not in cmd.to_json()
    assert cmd.to_json()["payload"] == {"id": 1}


def test_a_command_is_keyed_by_its_command_id() -> None:
    assert Command(command_id=CID, type="DeleteModel", payload={}).key() == CID.encode()


def test_decode_command_fills_defaults_for_optional_fields() -> None:
    # A command produced straight to Kafka may omit everything but id, type and payload.
    cmd = decode_command(raw(command_json()))
    assert isinstance(cmd, Command)
    assert (cmd.version, cmd.issued_at, cmd.source, cmd.validation) == (1, "", "kafka", None)


def test_new_command_ids_are_fresh_uuid4s() -> None:
    a, b = new_command_id(), new_command_id()
    assert a != b
    assert uuid.UUID(a).version == 4


def test_now_iso_is_utc_with_microseconds_and_a_z() -> None:
    stamp = now_iso()
    assert stamp.endswith("Z")
    assert len(stamp.split(".")[1]) == len("123456Z")


@pytest.mark.parametrize(
    ("record", "fragment"),
    [
        (None, "empty record"),
        (b"", "empty record"),
        (b"{not json", "not JSON"),
        (raw([1, 2]), "expected a JSON object, got list"),
        (raw("text"), "expected a JSON object, got str"),
        (raw({"type": "RegisterModel", "payload": {}}), "'command_id' is missing"),
        (raw(command_json(command_id=42)), "'command_id' has the wrong type (int)"),
        (raw(command_json(command_id="not-a-uuid")), "command_id 'not-a-uuid' is not a UUID"),
        (raw({"command_id": CID, "payload": {}}), "'type' is missing"),
        (raw(command_json(type=["RegisterModel"])), "'type' has the wrong type (list)"),
        (raw({"command_id": CID, "type": "RegisterModel"}), "'payload' is missing"),
        (raw(command_json(payload=[1])), "'payload' has the wrong type (list)"),
        (raw(command_json(payload="{}")), "'payload' has the wrong type (str)"),
        (raw(command_json(validation=[True])), "'validation' must be an object"),
    ],
    ids=["none", "empty", "not-json", "array", "string", "no-id", "int-id", "non-uuid-id", "no-type",
         "list-type", "no-payload", "list-payload", "string-payload", "list-validation"],
)
def test_decode_command_rejects_bad_records_naming_the_field(record: bytes | None, fragment: str) -> None:
    # Whatever is wrong, the decider gets an EnvelopeError it can dead-letter with a readable reason.
    with pytest.raises(EnvelopeError) as err:
        decode_command(record)
    assert fragment in str(err.value)


def test_envelope_error_is_a_value_error() -> None:
    # Callers that only know ValueError still catch it.
    assert issubclass(EnvelopeError, ValueError)


# -- the command-log marker ----------------------------------------------------------------------------

def test_the_command_log_marker_round_trips() -> None:
    # The first record of each commands-topic incarnation names that log.
    marker = CommandLogMarker(log_id="log-42")
    wire = orjson.loads(marker.encode())
    assert wire["type"] == COMMAND_LOG_STARTED
    assert "at" in wire
    assert decode_command(marker.encode()) == marker


def test_a_marker_needs_a_string_log_id() -> None:
    with pytest.raises(EnvelopeError, match="'log_id' is missing"):
        decode_command(raw({"type": COMMAND_LOG_STARTED}))
    with pytest.raises(EnvelopeError, match="'log_id' has the wrong type"):
        decode_command(raw({"type": COMMAND_LOG_STARTED, "log_id": 3}))


def test_a_marker_is_not_mistaken_for_a_command() -> None:
    # It has no command_id, yet decodes fine: it is recognised by its type first.
    assert isinstance(decode_command(raw({"type": COMMAND_LOG_STARTED, "log_id": "x"})), CommandLogMarker)


# -- events --------------------------------------------------------------------------------------------

def test_an_event_survives_encode_and_decode() -> None:
    event = Event(id=event_id_for(CID), seq=1, type="ModelCreated", version=1, aggregate="model:1",
                  aggregate_version=1, command_id=CID, occurred_at="2024-05-01T10:00:00.000000Z",
                  payload={"id": 1, "name": "edge"}, position=Position("log-1", 17))
    back = decode_event(event.encode(), Upcasters())
    assert back == event
    assert event.to_json()["position"] == {"log": "log-1", "offset": 17}


def test_an_event_without_position_round_trips_without_one() -> None:
    event = decode_event(raw(event_json()), Upcasters())
    assert event.position is None
    assert "position" not in event.to_json()
    assert decode_event(event.encode(), Upcasters()) == event


def test_an_event_is_keyed_by_its_aggregate() -> None:
    assert decode_event(raw(event_json()), Upcasters()).key() == b"model:3"


@pytest.mark.parametrize(
    ("obj", "fragment"),
    [
        ({k: v for k, v in event_json().items() if k != "type"}, "'type' is missing"),
        (event_json(version="1"), "'version' has the wrong type (str)"),
        (event_json(version=True), "'version' has the wrong type (bool)"),
        (event_json(payload=None), "'payload' has the wrong type (NoneType)"),
        ({k: v for k, v in event_json().items() if k != "id"}, "'id' is missing"),
        (event_json(seq=True), "'seq' has the wrong type (bool)"),
        (event_json(seq="7"), "'seq' has the wrong type (str)"),
        (event_json(aggregate_version=1.0), "'aggregate_version' has the wrong type (float)"),
        ({k: v for k, v in event_json().items() if k != "occurred_at"}, "'occurred_at' is missing"),
    ],
    ids=["no-type", "str-version", "bool-version", "null-payload", "no-id", "bool-seq", "str-seq",
         "float-aggregate-version", "no-occurred-at"],
)
def test_decode_event_rejects_bad_envelopes_naming_the_field(obj: JSON, fragment: str) -> None:
    with pytest.raises(EnvelopeError) as err:
        decode_event(raw(obj), Upcasters())
    assert fragment in str(err.value)


@pytest.mark.parametrize("position", [{"offset": 3}, {"log": "l"}, {"log": "l", "offset": "three"}],
                         ids=["no-log", "no-offset", "text-offset"])
def test_a_malformed_position_is_an_envelope_error(position: JSON) -> None:
    with pytest.raises(EnvelopeError, match="position"):
        decode_event(raw(event_json(position=position)), Upcasters())


# -- upcasting -----------------------------------------------------------------------------------------

def test_an_unknown_event_type_is_at_version_one_and_passes_unchanged() -> None:
    ups = Upcasters()
    assert ups.current("Whatever") == 1
    assert ups.upcast("Whatever", 1, {"a": 1}) == (1, {"a": 1})


def test_a_chain_of_upcasters_lifts_an_old_event_step_by_step() -> None:
    # Two schema changes: v1 named the field 'n', v2 called it 'name', v3 adds 'tags'.
    ups = Upcasters()

    @ups.register("ModelCreated", 1)
    def _rename(payload: JSON) -> JSON:
        out = dict(payload)
        out["name"] = out.pop("n")
        return out

    @ups.register("ModelCreated", 2)
    def _tags(payload: JSON) -> JSON:
        return payload | {"tags": []}

    # Registering a step from v2 makes v3 the current version.
    assert ups.current("ModelCreated") == 3
    old = {"n": "edge"}
    assert ups.upcast("ModelCreated", 1, old) == (3, {"name": "edge", "tags": []})
    assert ups.upcast("ModelCreated", 2, {"name": "fog"}) == (3, {"name": "fog", "tags": []})
    assert ups.upcast("ModelCreated", 3, {"name": "cloud", "tags": ["x"]}) == (3, {"name": "cloud", "tags": ["x"]})
    # Reading never rewrites what was read.
    assert old == {"n": "edge"}


def test_register_returns_the_function_it_decorates() -> None:
    ups = Upcasters()

    def step(payload: JSON) -> JSON:
        return payload

    assert ups.register("X", 1)(step) is step


def test_an_event_newer_than_this_tierflow_is_an_error() -> None:
    ups = Upcasters()
    ups.declare("ModelCreated", 2)
    with pytest.raises(EnvelopeError, match=r"ModelCreated v3 is newer than this tierflow understands \(v2\)"):
        ups.upcast("ModelCreated", 3, {})
    # An undeclared type is at v1, so its v2 is too new as well.
    with pytest.raises(EnvelopeError, match="upgrade tierflow"):
        ups.upcast("Other", 2, {})


def test_a_missing_upcasting_step_is_an_error() -> None:
    # v3 is declared, but only the step v1 -> v2 exists.
    ups = Upcasters()
    ups.declare("ModelCreated", 3)
    ups.register("ModelCreated", 1)(lambda p: p | {"v2": True})
    with pytest.raises(EnvelopeError, match="no upcaster from ModelCreated v2 to v3"):
        ups.upcast("ModelCreated", 1, {})


def test_declare_sets_the_current_version() -> None:
    ups = Upcasters()
    ups.register("X", 1)(lambda p: p)
    ups.declare("X", 5)
    assert ups.current("X") == 5
    # A later lower step never lowers the current version.
    ups.register("X", 1)(lambda p: p)
    assert ups.current("X") == 5


def test_decode_event_upcasts_what_it_reads() -> None:
    ups = Upcasters()
    ups.register("ModelDeleted", 1)(lambda p: p | {"reason": "user"})
    event = decode_event(raw(event_json()), ups)
    assert (event.version, event.payload) == (2, {"id": 3, "name": "m", "reason": "user"})


def test_decode_event_refuses_an_event_from_the_future() -> None:
    with pytest.raises(EnvelopeError, match="newer"):
        decode_event(raw(event_json(version=2)), Upcasters())


# -- event ids -----------------------------------------------------------------------------------------

def test_the_event_id_is_derived_from_the_command_id() -> None:
    # Each command produces one event, so a re-decided command reproduces the same event id.
    first = event_id_for(CID)
    assert event_id_for(CID) == first
    assert uuid.UUID(first).version == 5
    assert first != CID
    assert event_id_for(new_command_id()) != first


def test_distinct_commands_get_distinct_event_ids() -> None:
    ids = [new_command_id() for _ in range(200)]
    assert len({event_id_for(c) for c in ids}) == 200
