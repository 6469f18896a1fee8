"""Unit tests of the decider's pure core, `tierflow.streams.domain`: `decide` turns each command into
exactly one event, `apply` folds events into `State`. No Kafka: a tiny in-memory loop plays the decider
agent (decide, apply, keep the log), and the sandbox verdict is written by hand. The loop plays the stack's
components too: it signs verdicts and training reports as the validator, the API and the worker would
(tests/security/test_forged_commands.py shows what happens to commands nobody vouches for).

The chain used throughout is the thesis one, registered top-down:
cloud (1) <- fog (2) <- edge (3), plus a non-distributed model single (4).
"""

from __future__ import annotations

import random
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from tierflow.streams.catalogue import CODE_COMMANDS, COMMAND_EVENTS, upcasters
from tierflow.streams.domain import decide, needs_validation
from tierflow.streams.domain.state import State, apply
from tierflow.streams.envelope import JSON, Command, Event, Position, decode_event, event_id_for
from tierflow.streams.proofs import ENTITLED, VALIDATOR, Signer, Verifier

ROOT = Path(__file__).resolve().parents[2]
AT = "2024-05-01T10:00:00.000000Z"
LOG = "log-1"

Shape = list[int | None]


# -- sandbox verdicts ----------------------------------------------------------------------------------

def verdict(input_shape: Shape, output_shapes: list[Shape], params: int = 650) -> JSON:
    """What the validator agent attaches once the sandbox has built the code."""
    return {"ok": True, "summary": {"input_shape": input_shape, "output_shapes": output_shapes, "params": params}}


def edge() -> JSON:
    return verdict([None, 28, 28, 1], [[None, 64], [None, 10]])


def fog() -> JSON:
    return verdict([None, 64], [[None, 64], [None, 10]])


def cloud() -> JSON:
    return verdict([None, 64], [[None, 10]])


def single() -> JSON:
    return verdict([None, 28, 28], [[None, 10]])


def command(type_: str, payload: JSON, validation: JSON | None = None, command_id: str | None = None) -> Command:
    return Command(command_id=command_id or str(uuid.uuid4()), type=type_, payload=payload, validation=validation)


SECRET = "unit-test-secret-" + "0" * 32
PROOFS = Verifier.from_secret(SECRET)


def vouch(cmd: Command) -> Command:
    """The command as the entitled component sends it: a verdict signed by the validator, a training report by
    the API or the worker; anything else as it is."""
    if cmd.validation is not None:
        return Signer.from_secret(SECRET, VALIDATOR).sign(cmd)
    if cmd.type in ENTITLED:
        return Signer.from_secret(SECRET, sorted(ENTITLED[cmd.type])[0]).sign(cmd)
    return cmd


# -- the decider loop without Kafka --------------------------------------------------------------------

class Decider:
    """Decide each command against the state, fold the event in, keep the events log."""

    def __init__(self) -> None:
        self.state = State(proofs=PROOFS)
        self.events: list[Event] = []
        self.offset = -1

    def send(self, cmd: Command) -> Event | None:
        self.offset += 1
        event = decide(self.state, vouch(cmd), occurred_at=AT, position=Position(LOG, self.offset))
        if event is not None:
            apply(self.state, event)
            self.events.append(event)
        return event

    def accept(self, type_: str, payload: JSON, validation: JSON | None = None) -> Event:
        event = self.send(command(type_, payload, validation))
        assert event is not None, f"{type_} is pending"
        assert event.type == COMMAND_EVENTS[type_], event.payload.get("reason")
        return event

    def reject(self, type_: str, payload: JSON, validation: JSON | None = None, *, code: str = "invalid",
               field: str | None) -> str:
        """Send a command that must be rejected with `code` on `field`; return the message."""
        cmd = command(type_, payload, validation)
        event = self.send(cmd)
        assert event is not None, f"{type_} is pending"
        assert event.type == "CommandRejected", f"{type_} was accepted: {event.payload}"
        reason = event.payload["reason"]
        assert (reason["code"], reason["field"]) == (code, field), reason
        assert set(reason) == {"code", "message", "field"}
        return str(reason["message"])

    def register(self, name: str, validation: JSON, **fields: Any) -> int:
        payload = {"name": name, "code": f"# {name} model code"} | fields
        return int(self.accept("RegisterModel", payload, validation).payload["id"])

    def configure(self, name: str, model_ids: list[int]) -> int:
        return int(self.accept("CreateConfiguration", {"name": name, "model_ids": model_ids}).payload["id"])

    def deploy(self, configuration_id: int, **fields: Any) -> Event:
        return self.accept("RequestDeployment", {"configuration_id": configuration_id} | fields)


@pytest.fixture
def decider() -> Decider:
    return Decider()


@pytest.fixture
def chain() -> Decider:
    """cloud (1) <- fog (2) <- edge (3), and single (4)."""
    d = Decider()
    assert d.register("cloud", cloud(), distributed=True) == 1
    assert d.register("fog", fog(), distributed=True, upper_id=1) == 2
    assert d.register("edge", edge(), distributed=True, upper_id=2) == 3
    assert d.register("single", single()) == 4
    return d


# -- one command, one event ----------------------------------------------------------------------------

def test_each_command_produces_exactly_one_event_of_its_kind(chain: Decider) -> None:
    # One of every command, each answered by the event the catalogue names for it.
    before = len(chain.events)
    chain.accept("UpdateModel", {"id": 4, "description": "mnist"})
    conf = chain.configure("thesis", [1])
    chain.accept("UpdateConfiguration", {"id": conf, "name": "thesis chain"})
    dep = int(chain.deploy(conf).payload["id"])
    chain.accept("AnnounceDatasource", {"deployment_id": dep, "input_format": "RAW",
                                        "ranges": [{"topic": "mnist", "partition": 0, "start": 0, "end": 70000}]})
    chain.accept("DeleteDeployment", {"id": dep})
    chain.accept("DeleteConfiguration", {"id": conf})
    chain.accept("DeleteModel", {"id": 4})
    types = [e.type for e in chain.events[before:]]
    assert types == ["ModelUpdated", "ConfigurationCreated", "ConfigurationUpdated", "DeploymentRequested",
                     "DatasourceAnnounced", "DeploymentDeleted", "ConfigurationDeleted", "ModelDeleted"]
    assert len(chain.events) == before + len(types)


def test_events_are_numbered_and_derive_their_id_from_the_command(decider: Decider) -> None:
    # Accepted or rejected, every event takes the next seq and an id derived from its command id.
    cmds = [command("RegisterModel", {"name": "a", "code": "c"}, single()),
            command("RegisterModel", {"name": "a", "code": "c"}, single()),
            command("DeleteModel", {"id": 1})]
    events = [decider.send(c) for c in cmds]
    assert [e.seq for e in events if e] == [1, 2, 3]
    assert [e.type for e in events if e] == ["ModelCreated", "CommandRejected", "ModelDeleted"]
    for cmd, event in zip(cmds, events, strict=True):
        assert event is not None
        assert (event.id, event.command_id) == (event_id_for(cmd.command_id), cmd.command_id)
        assert event.occurred_at == AT
    # The position of the command in the commands log travels with its event.
    assert [e.position for e in events if e] == [Position(LOG, 0), Position(LOG, 1), Position(LOG, 2)]
    assert decider.state.seq == 3
    assert decider.state.position == Position(LOG, 2)


def test_ids_are_assigned_one_two_three(decider: Decider) -> None:
    assert [decider.register(n, single()) for n in ("a", "b", "c")] == [1, 2, 3]
    assert [decider.configure(n, [1]) for n in ("x", "y")] == [1, 2]
    # A rejected command consumes no id; a deleted model's id is never reused.
    decider.reject("RegisterModel", {"name": "a", "code": "c"}, single(), code="conflict", field="name")
    decider.accept("DeleteModel", {"id": 3})
    assert decider.register("d", single()) == 4


def test_a_command_seen_twice_is_decided_once(decider: Decider) -> None:
    cmd = command("RegisterModel", {"name": "a", "code": "c"}, single())
    assert decider.send(cmd) is not None
    # Redelivered after a crash: nothing new, not even a rejection for the now-duplicate name.
    assert decider.send(cmd) is None
    assert len(decider.events) == 1
    assert cmd.command_id in decider.state.decided


def test_a_rejected_command_seen_twice_is_decided_once(decider: Decider) -> None:
    cmd = command("DeleteModel", {"id": 9})
    first = decider.send(cmd)
    assert first is not None
    assert first.type == "CommandRejected"
    assert decider.send(cmd) is None


def test_a_rejection_names_command_code_message_and_field(decider: Decider) -> None:
    cmd = command("DeleteModel", {"id": 9})
    event = decider.send(cmd)
    assert event is not None
    assert (event.type, event.version) == ("CommandRejected", 2)
    assert (event.aggregate, event.aggregate_version) == (f"command:{cmd.command_id}", 1)
    assert event.payload == {
        "command_id": cmd.command_id, "command_type": "DeleteModel",
        "reason": {"code": "not_found", "message": "model 9 does not exist", "field": "id"},
    }


def test_an_unknown_command_type_is_rejected(decider: Decider) -> None:
    message = decider.reject("LaunchRocket", {}, field="type")
    assert "unknown command type 'LaunchRocket'" in message
    assert "RegisterModel" in message


# -- validation: model code is built in the sandbox before the decision --------------------------------

def test_a_new_model_waits_for_its_verdict(decider: Decider) -> None:
    # Without the sandbox verdict the command is pending: no event, not decided.
    cmd = command("RegisterModel", {"name": "edge", "code": "model = ..."})
    assert needs_validation(cmd, PROOFS)
    assert decider.send(cmd) is None
    assert cmd.command_id not in decider.state.decided
    assert decider.state.seq == 0
    # The validator re-sends the same command with the verdict: now it is decided, once.
    twin = vouch(replace(cmd, validation=single(), source="client+validator"))
    assert not needs_validation(twin, PROOFS)
    event = decider.send(twin)
    assert event is not None
    assert event.type == "ModelCreated"
    assert event.payload["input_shape"] == [None, 28, 28]
    assert event.payload["output_shapes"] == [[None, 10]]
    assert event.payload["params"] == 650
    assert decider.send(twin) is None


def test_cheap_checks_reject_before_the_sandbox_runs(chain: Decider) -> None:
    # A duplicate name, an unknown upper or a missing field is known without building anything.
    chain.reject("RegisterModel", {"name": "fog", "code": "c"}, code="conflict", field="name")
    message = chain.reject("RegisterModel", {"name": "new", "code": "c", "distributed": True, "upper_id": 99},
                           field="upper_id")
    assert message == "model 99 does not exist"
    chain.reject("RegisterModel", {"name": "new"}, field="code")


def test_code_that_does_not_build_is_rejected_with_the_sandbox_error(decider: Decider) -> None:
    message = decider.reject("RegisterModel", {"name": "m", "code": "model = ("},
                             {"ok": False, "error": "SyntaxError: '(' was never closed"}, field="code")
    assert "does not build: SyntaxError: '(' was never closed" in message
    message = decider.reject("RegisterModel", {"name": "m", "code": "c"}, {"ok": True}, field="code")
    assert "no usable model summary" in message


def test_only_code_commands_with_code_need_validation(chain: Decider) -> None:
    assert needs_validation(command("UpdateModel", {"id": 1, "code": "new"}), PROOFS)
    assert not needs_validation(command("UpdateModel", {"id": 1, "description": "d"}), PROOFS)
    assert not needs_validation(command("RegisterModel", {"name": "m", "code": "   "}), PROOFS)
    assert not needs_validation(command("DeleteModel", {"id": 1, "code": "c"}), PROOFS)


def test_the_validator_agent_uses_this_one_needs_validation() -> None:
    # The validator builds exactly what the model rules wait for: one rule, not a copy that could drift.
    from tierflow.streams import validator

    assert validator.needs_validation is needs_validation
    packages = [ROOT / name for name in ("streams", "api", "projections", "tiers", "deploy")]
    defining = sorted(str(path.relative_to(ROOT)) for package in packages for path in package.rglob("*.py")
                      if "def needs_validation(" in path.read_text())
    assert defining == ["streams/domain/__init__.py"]


def test_an_incomplete_verdict_is_rejected_not_raised(decider: Decider) -> None:
    decider.reject("RegisterModel", {"name": "m", "code": "c"}, {"ok": True, "summary": {"input_shape": [None, 8]}},
                   field="code")


# -- model rules ---------------------------------------------------------------------------------------

def test_a_registered_model_is_recorded_in_full(chain: Decider) -> None:
    fog_model = chain.state.models[2]
    assert (fog_model.name, fog_model.distributed, fog_model.upper_id, fog_model.version) == ("fog", True, 1, 1)
    assert fog_model.record["code"] == "# fog model code"
    assert (fog_model.record["created_at"], fog_model.record["updated_at"]) == (AT, AT)
    assert chain.events[1].aggregate == "model:2"


def test_model_names_are_unique(chain: Decider) -> None:
    message = chain.reject("RegisterModel", {"name": " cloud ", "code": "c"}, cloud(), code="conflict",
                           field="name")
    assert message == "a model named 'cloud' already exists (id 1)"
    # Renaming onto another model's name is a conflict too; keeping one's own name is not.
    chain.reject("UpdateModel", {"id": 4, "name": "fog"}, code="conflict", field="name")
    chain.accept("UpdateModel", {"id": 4, "name": "single"})
    # A deleted model's name is free again.
    chain.accept("DeleteModel", {"id": 4})
    assert chain.register("single", single()) == 5


def test_model_names_have_1_to_64_characters(decider: Decider) -> None:
    decider.reject("RegisterModel", {"name": "n" * 65, "code": "c"}, single(), field="name")
    decider.reject("RegisterModel", {"name": "  ", "code": "c"}, single(), field="name")
    decider.register("n" * 64, single())
    decider.reject("UpdateModel", {"id": 1, "name": ""}, field="name")


def test_model_code_is_required(decider: Decider) -> None:
    assert "'code' is required" in decider.reject("RegisterModel", {"name": "m", "code": " "}, field="code")
    decider.register("m", single())
    decider.reject("UpdateModel", {"id": 1, "code": ""}, field="code")


def test_the_upper_model_must_exist(decider: Decider) -> None:
    message = decider.reject("RegisterModel", {"name": "fog", "code": "c", "distributed": True, "upper_id": 1},
                             fog(), field="upper_id")
    assert message == "model 1 does not exist"


def test_the_upper_model_must_be_distributed(chain: Decider) -> None:
    message = chain.reject("RegisterModel", {"name": "low", "code": "c", "distributed": True, "upper_id": 4},
                           verdict([None, 8], [[None, 28, 28], [None, 10]]), field="upper_id")
    assert message == "upper model 'single' (4) is not distributed"


def test_a_model_cannot_be_its_own_upper(chain: Decider) -> None:
    assert "its own upper" in chain.reject("UpdateModel", {"id": 1, "upper_id": 1}, field="upper_id")


def test_links_never_form_a_cycle(chain: Decider) -> None:
    # cloud -> edge would close edge -> fog -> cloud -> edge.
    message = chain.reject("UpdateModel", {"id": 1, "upper_id": 3}, field="upper_id")
    assert message == "upper model 'edge' (3) would form a cycle through 'fog' (2)"
    # Two models pointing at each other.
    chain.reject("UpdateModel", {"id": 1, "upper_id": 2}, field="upper_id")


def test_a_chain_cannot_branch(chain: Decider) -> None:
    message = chain.reject("RegisterModel", {"name": "fog2", "code": "c", "distributed": True, "upper_id": 1},
                           fog(), field="upper_id")
    assert message == "upper model 'cloud' (1) already has lower model 'fog' (2); a chain cannot branch"


def test_only_a_distributed_model_has_an_upper(chain: Decider) -> None:
    message = chain.reject("RegisterModel", {"name": "low", "code": "c", "upper_id": 1}, fog(), field="upper_id")
    assert "only allowed for a distributed model" in message
    chain.reject("UpdateModel", {"id": 4, "upper_id": 1}, field="upper_id")


def test_a_model_used_as_an_upper_stays_distributed(chain: Decider) -> None:
    message = chain.reject("UpdateModel", {"id": 1, "distributed": False}, field="distributed")
    assert message == "model 'fog' (2) uses this model as its upper; it must stay distributed"


def test_output_counts_follow_the_position_in_the_chain(chain: Decider) -> None:
    # A non-distributed model answers with one output.
    message = chain.reject("RegisterModel", {"name": "two", "code": "c"}, fog(), field="code")
    assert message == "a non-distributed model has one output (probabilities); 'two' has 2"
    # The top of a chain answers with one output.
    message = chain.reject("RegisterModel", {"name": "top", "code": "c", "distributed": True}, fog(), field="code")
    assert "the top model of a chain has one output" in message
    # Below a top, a model sends a tensor up and answers: two outputs.
    top = chain.register("top", cloud(), distributed=True)
    message = chain.reject("RegisterModel", {"name": "low", "code": "c", "distributed": True, "upper_id": top},
                           cloud(), field="code")
    assert "has two outputs [tensor_to_upper, probabilities]; 'low' has 1" in message
    chain.register("low", fog(), distributed=True, upper_id=top)


def test_dropping_the_upper_link_needs_a_single_output(chain: Decider) -> None:
    # fog has two outputs: without its upper it would be a top with a stray tensor output.
    chain.reject("UpdateModel", {"id": 2, "upper_id": None}, field="code")


def test_the_tensor_sent_up_matches_the_upper_input(chain: Decider) -> None:
    top = chain.register("top", cloud(), distributed=True)
    message = chain.reject("RegisterModel", {"name": "low", "code": "c", "distributed": True, "upper_id": top},
                           verdict([None, 8], [[None, 32], [None, 10]]), field="upper_id")
    assert message == "the tensor 'low' sends up has shape (None, 32) but upper model 'top' (5) takes (None, 64)"
    # The batch dimension does not count.
    chain.register("low", verdict([None, 8], [[7, 64], [None, 10]]), distributed=True, upper_id=top)


def test_new_upper_code_must_still_take_its_lower_tensor(chain: Decider) -> None:
    # cloud's new code takes (None, 32) but fog still sends (None, 64).
    message = chain.reject("UpdateModel", {"id": 1, "code": "smaller"}, verdict([None, 32], [[None, 10]]),
                           field="code")
    assert message == "lower model 'fog' (2) sends a tensor of shape (None, 64) but this code takes (None, 32)"
    # Same input, fewer classes: fine, and the model moves to version 2 with its new shapes.
    event = chain.accept("UpdateModel", {"id": 1, "code": "five classes"}, verdict([None, 64], [[None, 5]], 325))
    assert (event.aggregate_version, event.payload["version"]) == (2, 2)
    assert chain.state.models[1].output_shapes == [[None, 5]]
    assert event.payload["params"] == 325


def test_changed_code_waits_for_its_verdict_and_unchanged_code_does_not(chain: Decider) -> None:
    assert chain.send(command("UpdateModel", {"id": 4, "code": "new code"})) is None
    # Re-sending the same code (or no code) changes no shapes: no sandbox needed.
    event = chain.accept("UpdateModel", {"id": 4, "code": "# single model code", "description": "same code"})
    assert event.payload["input_shape"] == [None, 28, 28]
    assert event.payload["description"] == "same code"


def test_an_update_keeps_what_it_does_not_name(chain: Decider) -> None:
    event = chain.accept("UpdateModel", {"id": 2, "description": "fog node"})
    p = event.payload
    assert (p["name"], p["code"], p["distributed"], p["upper_id"]) == ("fog", "# fog model code", True, 1)
    assert (p["input_shape"], p["output_shapes"], p["created_at"]) == ([None, 64], [[None, 64], [None, 10]], AT)


def test_changing_only_the_imports_is_rejected_asking_for_the_code(chain: Decider) -> None:
    # Imports and code are built together, so an imports change must carry the code.
    message = chain.reject("UpdateModel", {"id": 4, "imports": "import tensorflow_addons as tfa"}, field="imports")
    assert "code" in message


def test_the_same_imports_change_with_the_code_waits_for_a_verdict(chain: Decider) -> None:
    # The consistent half of the previous test: resending the unchanged code with new imports is validated.
    cmd = command("UpdateModel", {"id": 4, "code": "# single model code", "imports": "import numpy as np"})
    assert chain.send(cmd) is None


def test_an_unknown_model_is_not_found(decider: Decider) -> None:
    decider.reject("UpdateModel", {"id": 5, "description": "x"}, code="not_found", field="id")
    decider.reject("DeleteModel", {"id": 5}, code="not_found", field="id")
    decider.reject("DeleteModel", {}, field="id")


def test_a_configured_model_cannot_be_deleted_and_the_message_lists_its_configurations(chain: Decider) -> None:
    chain.configure("first", [4])
    chain.configure("second", [4, 1])
    message = chain.reject("DeleteModel", {"id": 4}, code="conflict", field="id")
    assert message == ("model 'single' (4) is used by configuration 'first' (1), 'second' (2); "
                       "delete or change those first")


def test_an_upper_model_with_a_lower_cannot_be_deleted_but_bottom_up_works(chain: Decider) -> None:
    message = chain.reject("DeleteModel", {"id": 1}, code="conflict", field="id")
    assert message.startswith("model 'cloud' (1) is the upper model of 'fog' (2)")
    chain.reject("DeleteModel", {"id": 2}, code="conflict", field="id")
    for model_id in (3, 2, 1):
        event = chain.accept("DeleteModel", {"id": model_id})
        assert event.payload == {"id": model_id, "name": chain.events[model_id - 1].payload["name"]}
        assert event.aggregate_version == 2
    assert list(chain.state.models) == [4]


# -- configurations ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("chosen", "expanded"),
    [([1], [3, 2, 1]), ([2], [3, 2]), ([3], [3]), ([4, 1], [4, 3, 2, 1]), ([1, 3], [3, 2, 1]),
     ([3, 1, 1], [3, 2, 1])],
    ids=["top", "middle", "bottom", "single-and-top", "top-and-bottom", "repeated"],
)
def test_choosing_a_model_brings_its_lower_chain_bottom_first(chain: Decider, chosen: list[int],
                                                              expanded: list[int]) -> None:
    event = chain.accept("CreateConfiguration", {"name": "c", "model_ids": chosen})
    assert event.payload["model_ids"] == expanded
    assert chain.state.configurations[1].model_ids == expanded


def test_a_configuration_needs_a_name_and_existing_models(chain: Decider) -> None:
    chain.reject("CreateConfiguration", {"model_ids": [1]}, field="name")
    chain.reject("CreateConfiguration", {"name": "c"}, field="model_ids")
    chain.reject("CreateConfiguration", {"name": "c", "model_ids": []}, field="model_ids")
    # An unknown id in the body is a 422 on that field, not a 404.
    message = chain.reject("CreateConfiguration", {"name": "c", "model_ids": [4, 9]}, field="model_ids")
    assert message == "model 9 does not exist"


def test_a_configuration_update_changes_what_it_names(chain: Decider) -> None:
    conf = chain.accept("CreateConfiguration", {"name": "c", "model_ids": [4], "description": "d"}).payload["id"]
    event = chain.accept("UpdateConfiguration", {"id": conf, "model_ids": [2]})
    assert event.payload | {"updated_at": None} == {
        "id": conf, "name": "c", "description": "d", "model_ids": [3, 2], "version": 2, "created_at": AT,
        "updated_at": None,
    }
    assert event.aggregate_version == 2
    chain.reject("UpdateConfiguration", {"id": conf, "model_ids": [99]}, field="model_ids")
    chain.reject("UpdateConfiguration", {"id": 9, "name": "x"}, code="not_found", field="id")


def test_a_configured_model_keeps_its_upper_id_and_distributed_flag(chain: Decider) -> None:
    chain.configure("thesis", [1])
    message = chain.reject("UpdateModel", {"id": 2, "upper_id": None}, code="conflict", field="upper_id")
    assert "is used by configuration 'thesis' (1)" in message
    assert "keeps its upper_id and distributed flag" in message
    chain.reject("UpdateModel", {"id": 3, "distributed": False, "upper_id": None}, code="conflict",
                 field="upper_id")
    # Its code and description may still change (deployments pin versions).
    chain.accept("UpdateModel", {"id": 2, "description": "fog node"})
    chain.accept("UpdateModel", {"id": 2, "code": "new fog"}, fog())
    # Restating the current link is not a change.
    chain.accept("UpdateModel", {"id": 2, "upper_id": 1, "distributed": True})


def test_a_configuration_used_by_deployments_cannot_be_deleted(chain: Decider) -> None:
    conf = chain.configure("thesis", [1])
    first = int(chain.deploy(conf).payload["id"])
    second = int(chain.deploy(conf, batch=64).payload["id"])
    message = chain.reject("DeleteConfiguration", {"id": conf}, code="conflict", field="id")
    assert message == "configuration 'thesis' (1) is used by deployment(s) 1, 2; delete those first"
    chain.accept("DeleteDeployment", {"id": first})
    assert "deployment(s) 2;" in chain.reject("DeleteConfiguration", {"id": conf}, code="conflict", field="id")
    chain.accept("DeleteDeployment", {"id": second})
    chain.accept("DeleteConfiguration", {"id": conf})
    assert chain.state.configurations == {}
    chain.reject("DeleteConfiguration", {"id": conf}, code="not_found", field="id")


# -- deployments ---------------------------------------------------------------------------------------

def test_a_deployment_pins_model_versions_and_creates_one_result_per_model(chain: Decider) -> None:
    chain.accept("UpdateModel", {"id": 2, "description": "fog v2"})
    conf = chain.configure("thesis", [1])
    event = chain.deploy(conf, batch=16, fit_options={"epochs": 3})
    p = event.payload
    assert (event.aggregate, event.aggregate_version) == ("deployment:1", 1)
    assert p["model_versions"] == {"3": 1, "2": 2, "1": 1}
    assert p["results"] == [{"id": 1, "model_id": 3, "model_version": 1},
                            {"id": 2, "model_id": 2, "model_version": 2},
                            {"id": 3, "model_id": 1, "model_version": 1}]
    assert (p["batch"], p["fit_options"], p["optimizer"], p["created_at"]) == (16, {"epochs": 3}, "adam", AT)
    assert {r.id: (r.deployment_id, r.model_id, r.status) for r in chain.state.results.values()} == {
        1: (1, 3, "created"), 2: (1, 2, "created"), 3: (1, 1, "created")}
    # A later edit does not change what that deployment trains; the next one pins the new version.
    chain.accept("UpdateModel", {"id": 2, "description": "fog v3"})
    later = chain.deploy(conf).payload
    assert later["id"] == 2
    assert later["model_versions"]["2"] == 3
    assert [r["id"] for r in later["results"]] == [4, 5, 6]
    assert chain.state.deployments[1].result_ids == [1, 2, 3]


def test_a_deployment_needs_an_existing_configuration(chain: Decider) -> None:
    message = chain.reject("RequestDeployment", {"configuration_id": 7}, field="configuration_id")
    assert message == "configuration 7 does not exist"
    chain.reject("RequestDeployment", {}, field="configuration_id")


@pytest.mark.parametrize(
    ("fields", "field"),
    [({"batch": 0}, "batch"), ({"fit_options": {"epochs": 1, "x": [1]}}, "fit_options.x"),
     ({"fit_options": {"callbacks": []}}, "fit_options.callbacks"), ({"fit_options": "epochs=5"}, "fit_options"),
     ({"eval_options": {"batch_size": 8}}, "eval_options.batch_size"), ({"optimizer": "magic"}, "optimizer"),
     ({"loss_weights": [1, -1, 1]}, "loss_weights")],
    ids=["batch", "fit-x", "fit-callbacks", "fit-string", "eval-batch-size", "optimizer", "negative-weight"],
)
def test_deployment_options_are_checked(chain: Decider, fields: JSON, field: str) -> None:
    conf = chain.configure("thesis", [1])
    chain.reject("RequestDeployment", {"configuration_id": conf} | fields, field=field)


def test_a_deployment_records_the_seed_it_was_asked_to_train_with(chain: Decider) -> None:
    conf = chain.configure("thesis", [1])
    assert chain.deploy(conf, seed=7).payload["seed"] == 7
    assert "seed" not in chain.deploy(conf).payload  # the job draws one, as before
    chain.reject("RequestDeployment", {"configuration_id": conf, "seed": -1}, field="seed")


def test_loss_weights_as_a_list_need_one_weight_per_exit(chain: Decider) -> None:
    conf = chain.configure("thesis", [1])
    message = chain.reject("RequestDeployment", {"configuration_id": conf, "loss_weights": [1, 1]},
                           field="loss_weights")
    assert "'loss_weights' has 2 weights but chain edge->fog->cloud has 3 exits" in message
    assert chain.deploy(conf, loss_weights=[0.2, 0.3, 0.5]).payload["loss_weights"] == [0.2, 0.3, 0.5]


def test_chains_of_different_lengths_need_weights_per_model(chain: Decider) -> None:
    conf = chain.configure("mixed", [4, 1])
    message = chain.reject("RequestDeployment", {"configuration_id": conf, "loss_weights": [1, 1, 1]},
                           field="loss_weights")
    assert "chain single has 1 exits" in message
    assert "use {model_id: weight}" in message
    weights = {"4": 1, "3": 0.2, "2": 0.3, "1": 0.5}
    event = chain.deploy(conf, loss_weights=weights)
    assert event.payload["loss_weights"] == {k: float(v) for k, v in weights.items()}


def test_loss_weights_per_model_name_only_configured_models(chain: Decider) -> None:
    conf = chain.configure("thesis", [1])
    message = chain.reject("RequestDeployment", {"configuration_id": conf, "loss_weights": {"1": 1, "4": 1}},
                           field="loss_weights")
    assert message == "'loss_weights' names model(s) 4 that configuration 'thesis' does not contain"
    # Naming a subset is fine.
    chain.deploy(conf, loss_weights={"1": 2})


def test_a_deployment_is_deleted_with_its_results(chain: Decider) -> None:
    conf = chain.configure("thesis", [1])
    dep = chain.deploy(conf).payload["id"]
    event = chain.accept("DeleteDeployment", {"id": dep})
    assert event.payload == {"id": dep, "result_ids": [1, 2, 3]}
    assert (event.aggregate, event.aggregate_version) == ("deployment:1", 2)
    assert chain.state.deployments == {}
    assert chain.state.results == {}
    chain.reject("DeleteDeployment", {"id": dep}, code="not_found", field="id")


def test_a_deployment_whose_results_are_served_cannot_be_deleted(chain: Decider) -> None:
    conf = chain.configure("thesis", [1])
    first = chain.deploy(conf).payload["id"]
    second = chain.deploy(conf).payload["id"]
    # Inference 7 serves result 2 (of the first deployment); inference 9 serves one of the second's.
    chain.state.inferences = {9: [5], 7: [2]}
    message = chain.reject("DeleteDeployment", {"id": first}, code="conflict", field="id")
    assert message == "deployment 1 has results served by inference(s) 7; stop and delete those first"
    chain.state.inferences = {9: [5]}
    chain.accept("DeleteDeployment", {"id": first})
    chain.reject("DeleteDeployment", {"id": second}, code="conflict", field="id")


# -- datasources ---------------------------------------------------------------------------------------

def test_a_datasource_is_announced_for_an_existing_deployment(chain: Decider) -> None:
    conf = chain.configure("thesis", [1])
    dep = chain.deploy(conf).payload["id"]
    ranges = [{"topic": "mnist", "partition": 0, "start": 0, "end": 70000}]
    event = chain.accept("AnnounceDatasource", {"deployment_id": dep, "ranges": ranges, "input_format": "RAW",
                                                "validation_rate": 0.1, "test_rate": 0.1, "total_msg": 70000})
    p = event.payload
    assert (event.aggregate, p["id"], p["deployment_id"], p["ranges"]) == ("datasource:1", 1, dep, ranges)
    assert (p["input_format"], p["total_msg"], p["created_at"]) == ("RAW", 70000, AT)
    # Fields the control message did not carry get their defaults.
    assert (p["description"], p["input_config"], p["origin"]) == ("", {}, None)
    assert chain.state.datasources == {1: dep}
    second = {"deployment_id": dep, "ranges": ranges, "input_format": "AVRO"}
    assert chain.accept("AnnounceDatasource", second).payload["id"] == 2


def test_a_datasource_records_the_announced_and_the_used_ranges_and_a_copy_keeps_them(chain: Decider) -> None:
    dep = chain.deploy(chain.configure("thesis", [4])).payload["id"]
    other = chain.deploy(chain.configure("again", [4])).payload["id"]
    announced = [{"topic": "digits", "partition": p, "start": 0, "end": 400} for p in (0, 1)]
    used = [announced[0] | {"end": 449}, announced[1]]
    reasons = ["digits[0]: end 400 -> 449: the announced last record 399 is inside record batch 399..448, ..."]
    event = chain.accept("AnnounceDatasource", {
        "deployment_id": dep, "input_format": "RAW", "ranges": used, "announced_ranges": announced,
        "range_reasons": reasons, "warnings": ["digits[1]: 3 records after offset 399 ..."]})
    assert (event.type, event.version) == ("DatasourceAnnounced", 2)
    p = event.payload
    assert (p["ranges"], p["announced_ranges"], p["range_reasons"]) == (used, announced, reasons)
    assert p["warnings"] == ["digits[1]: 3 records after offset 399 ..."]
    # Sent to another deployment: the same data, read the same way, for the same reasons.
    copy = chain.accept("SendDatasource", {"datasource_id": p["id"], "deployment_id": other}).payload
    assert {k: copy[k] for k in ("ranges", "announced_ranges", "range_reasons", "warnings")} == {
        k: p[k] for k in ("ranges", "announced_ranges", "range_reasons", "warnings")}
    # A used range that does not follow from the announced one is refused, naming the field.
    chain.reject("AnnounceDatasource", {"deployment_id": dep, "input_format": "RAW", "ranges": used,
                                        "announced_ranges": announced}, field="range_reasons")


def test_a_copy_of_a_v1_datasource_read_from_the_log_uses_its_ranges_as_announced(chain: Decider) -> None:
    dep = chain.deploy(chain.configure("thesis", [4])).payload["id"]
    ranges = [{"topic": "digits", "partition": 0, "start": 0, "end": 400}]
    # A DatasourceAnnounced written by an earlier tierflow (v1), read back from the events log.
    v1 = orjson.dumps({"id": event_id_for("old"), "seq": chain.state.seq + 1, "type": "DatasourceAnnounced",
                       "version": 1, "aggregate": "datasource:1", "aggregate_version": 1, "command_id": "old",
                       "occurred_at": AT, "payload": {
                           "id": 1, "deployment_id": dep, "ranges": ranges, "input_format": "RAW",
                           "input_config": {}, "description": "", "validation_rate": 0.0, "test_rate": 0.0,
                           "total_msg": None, "origin": None, "warnings": [], "created_at": AT}})
    apply(chain.state, decode_event(v1, upcasters()))
    copy = chain.accept("SendDatasource", {"datasource_id": 1, "deployment_id": dep}).payload
    assert (copy["ranges"], copy["announced_ranges"], copy["range_reasons"]) == (ranges, ranges, [])


def test_a_datasource_needs_a_deployment_and_ranges(chain: Decider) -> None:
    message = chain.reject("AnnounceDatasource", {"deployment_id": 5, "ranges": [{}]}, field="deployment_id")
    assert message == "datasource announced for deployment 5, which does not exist"
    chain.reject("AnnounceDatasource", {"ranges": [{}]}, field="deployment_id")
    dep = chain.deploy(chain.configure("thesis", [4])).payload["id"]
    chain.reject("AnnounceDatasource", {"deployment_id": dep, "ranges": []}, field="ranges")
    chain.reject("AnnounceDatasource", {"deployment_id": dep, "ranges": "t:0:0:10"}, field="ranges")


def test_a_datasource_without_an_input_format_is_rejected(chain: Decider) -> None:
    dep = chain.deploy(chain.configure("thesis", [4])).payload["id"]
    chain.reject("AnnounceDatasource", {"deployment_id": dep, "ranges": [{"topic": "t", "partition": 0,
                                                                         "start": 0, "end": 9}]},
                 field="input_format")


# -- optimistic concurrency ----------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("type_", "payload", "what"),
    [("UpdateModel", {"id": 4, "description": "x"}, "model 'single' (4)"),
     ("DeleteModel", {"id": 4}, "model 'single' (4)"),
     ("UpdateConfiguration", {"id": 1, "name": "renamed"}, "configuration 'thesis' (1)"),
     ("DeleteConfiguration", {"id": 1}, "configuration 'thesis' (1)")],
    ids=["update-model", "delete-model", "update-configuration", "delete-configuration"],
)
def test_a_stale_expected_version_is_a_conflict(chain: Decider, type_: str, payload: JSON, what: str) -> None:
    chain.accept("CreateConfiguration", {"name": "thesis", "model_ids": [1]})
    message = chain.reject(type_, payload | {"expected_version": 2}, code="conflict", field="expected_version")
    assert message == f"{what} is at version 1, not the expected version 2; reload and retry"
    chain.reject(type_, payload | {"expected_version": 0}, field="expected_version")
    chain.accept(type_, payload | {"expected_version": 1})


def test_versions_count_the_updates(chain: Decider) -> None:
    chain.accept("UpdateModel", {"id": 4, "description": "a", "expected_version": 1})
    chain.accept("UpdateModel", {"id": 4, "description": "b", "expected_version": 2})
    chain.reject("UpdateModel", {"id": 4, "description": "c", "expected_version": 2}, code="conflict",
                 field="expected_version")
    assert chain.state.models[4].version == 3


# -- determinism and replay ----------------------------------------------------------------------------

def story() -> list[Command]:
    """A fixed history with fixed command ids: registrations, rules hit, a deployment, deletions."""
    n = iter(range(1, 1000))

    def cmd(type_: str, payload: JSON, validation: JSON | None = None) -> Command:
        return command(type_, payload, validation, command_id=str(uuid.UUID(int=next(n))))

    registered = cmd("RegisterModel", {"name": "fog", "code": "f", "distributed": True, "upper_id": 1}, fog())
    return [
        cmd("RegisterModel", {"name": "cloud", "code": "c", "distributed": True}, cloud()),
        registered,
        registered,
        cmd("RegisterModel", {"name": "edge", "code": "e", "distributed": True, "upper_id": 2}, edge()),
        cmd("RegisterModel", {"name": "edge", "code": "e"}, single()),
        cmd("RegisterModel", {"name": "single", "code": "s"}),
        cmd("RegisterModel", {"name": "single", "code": "s"}, single()),
        cmd("CreateConfiguration", {"name": "thesis", "model_ids": [1]}),
        cmd("CreateConfiguration", {"name": "alone", "model_ids": [4]}),
        cmd("UpdateModel", {"id": 2, "upper_id": None}),
        cmd("UpdateModel", {"id": 1, "code": "c2"}, verdict([None, 64], [[None, 5]])),
        cmd("RequestDeployment", {"configuration_id": 1, "loss_weights": [1, 1, 1]}),
        cmd("RequestDeployment", {"configuration_id": 2, "batch": 0}),
        cmd("RequestDeployment", {"configuration_id": 2}),
        cmd("DeleteConfiguration", {"id": 2}),
        cmd("DeleteDeployment", {"id": 2}),
        cmd("DeleteConfiguration", {"id": 2, "expected_version": 1}),
        cmd("DeleteModel", {"id": 4}),
        cmd("UpdateConfiguration", {"id": 1, "model_ids": [3], "expected_version": 1}),
        cmd("Nonsense", {}),
    ]


def run(commands: list[Command]) -> Decider:
    d = Decider()
    for cmd in commands:
        d.send(cmd)
    return d


def replay(events: list[Event]) -> State:
    """Rebuild the state from the events log as written to Kafka (encoded, decoded, upcast)."""
    state = State(proofs=PROOFS)
    ups = upcasters()
    for event in events:
        apply(state, decode_event(event.encode(), ups))
    return state


def test_the_same_commands_and_clock_give_identical_events() -> None:
    first, second = run(story()), run(story())
    assert [e.encode() for e in first.events] == [e.encode() for e in second.events]
    # The story hits every outcome it was written for.
    types = [e.type for e in first.events]
    assert len(types) == len(story()) - 2  # one redelivery, one pending
    assert types.count("CommandRejected") == 5


def test_replaying_the_events_rebuilds_the_same_state() -> None:
    live = run(story())
    rebuilt = replay(live.events)
    assert rebuilt == live.state
    # Spelled out, for a readable failure: everything the decider relies on survives a restart.
    assert rebuilt.models == live.state.models
    assert rebuilt.configurations == live.state.configurations
    assert rebuilt.deployments == live.state.deployments
    assert rebuilt.results == live.state.results
    assert rebuilt.decided == live.state.decided
    assert rebuilt.next_ids == live.state.next_ids
    assert (rebuilt.seq, rebuilt.position) == (live.state.seq, live.state.position)


def test_after_a_restart_the_decider_decides_as_before() -> None:
    # Decide the story up to a crash, rebuild the state from the events log, resume after the position
    # of the last event (re-reading the pending command behind it): the log is the one of a single run.
    commands = story()
    whole = run(commands)
    before_crash = run(commands[:6])
    restarted = Decider()
    restarted.state = replay(before_crash.events)
    position = restarted.state.position
    assert position is not None
    assert position == Position(LOG, 4)
    restarted.offset = position.offset
    for cmd in commands[position.offset + 1:]:
        restarted.send(cmd)
    assert [e.encode() for e in before_crash.events + restarted.events] == [e.encode() for e in whole.events]


# -- property: a random history keeps every invariant and replays exactly ------------------------------

ODD_NAMES = ["edge", "fog", "cloud", " fog ", "", "n" * 65]
BAD_VERDICTS: list[JSON | None] = [
    verdict([None, 32], [[None, 64], [None, 10]]), verdict([None, 64], [[None, 32], [None, 10]]),
    verdict([None, 64], [[None, 10], [None, 10], [None, 10]]), {"ok": False, "error": "ValueError: bad layer"},
    None,
]
COMMAND_TYPES = ["RegisterModel"] * 5 + ["UpdateModel"] * 3 + ["DeleteModel", "CreateConfiguration",
                 "CreateConfiguration", "UpdateConfiguration", "DeleteConfiguration", "RequestDeployment",
                 "RequestDeployment", "DeleteDeployment", "AnnounceDatasource", "Unknown"]


class RandomClient:
    """Seeded clients, validator and broker: mostly plausible commands about what exists, some nonsense,
    redeliveries, and validator twins of commands that were left pending."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.sent: list[Command] = []
        self.awaiting: list[Command] = []

    def pick(self, ids: Any, p: float = 0.85) -> int:
        ids = sorted(ids)
        return self.rng.choice(ids) if ids and self.rng.random() < p else self.rng.randint(1, 12)

    def maybe(self, payload: JSON, key: str, value: Any, p: float = 0.5) -> None:
        if self.rng.random() < p:
            payload[key] = value

    def model_fields(self, state: State) -> tuple[JSON, JSON | None]:
        """A model's place in a chain, and a verdict that usually fits it."""
        rng = self.rng
        role = rng.choice(["top", "lower", "lower", "single"])
        fields: JSON
        if role == "top":
            fields, fits = {"distributed": True}, cloud()
        elif role == "lower":
            fields, fits = {"distributed": True, "upper_id": self.pick(state.models)}, fog()
        else:
            fields, fits = ({"upper_id": self.pick(state.models)} if rng.random() < 0.1 else {}), single()
        return fields, (fits if rng.random() < 0.8 else rng.choice(BAD_VERDICTS))

    def next(self, state: State) -> Command:
        rng = self.rng
        if self.sent and rng.random() < 0.08:
            cmd = rng.choice(self.sent)  # redelivered
        elif self.awaiting and rng.random() < 0.5:  # the validator re-sends a pending command with its verdict
            pending = self.awaiting.pop(rng.randrange(len(self.awaiting)))
            cmd = replace(pending, validation=rng.choice([fog(), cloud(), single(), edge(), *BAD_VERDICTS[:-1]]))
        else:
            cmd = self.fresh(state)
            if cmd.validation is None and cmd.type in CODE_COMMANDS:
                self.awaiting.append(cmd)
        self.sent.append(cmd)
        return cmd

    def fresh(self, state: State) -> Command:
        rng = self.rng
        type_ = rng.choice(COMMAND_TYPES)
        payload: JSON = {}
        validation: JSON | None = None
        if type_ == "RegisterModel":
            name = rng.choice(ODD_NAMES) if rng.random() < 0.15 else f"m{rng.randint(1, 10**6)}"
            fields, validation = self.model_fields(state)
            payload = {"name": name, "code": f"code {rng.randint(1, 3)}"} | fields
        elif type_ == "UpdateModel":
            payload = {"id": self.pick(state.models)}
            self.maybe(payload, "name", rng.choice(ODD_NAMES) if rng.random() < 0.5 else f"r{rng.randint(1, 99)}",
                       0.2)
            self.maybe(payload, "description", f"d{rng.randint(1, 3)}", 0.3)
            self.maybe(payload, "expected_version", rng.randint(1, 3), 0.2)
            if rng.random() < 0.3:
                fields, validation = self.model_fields(state)
                payload |= fields | ({} if "upper_id" in fields else {"upper_id": None})
                payload["code"] = f"code {rng.randint(1, 3)}"
            elif rng.random() < 0.3:
                payload["code"] = f"code {rng.randint(1, 3)}"
                validation = rng.choice([fog(), cloud(), single(), *BAD_VERDICTS])
        elif type_ == "DeleteModel":
            payload = {"id": self.pick(state.models)}
            self.maybe(payload, "expected_version", rng.randint(1, 3), 0.2)
        elif type_ == "CreateConfiguration":
            payload = {"name": f"c{rng.randint(1, 5)}",
                       "model_ids": [self.pick(state.models) for _ in range(rng.randint(1, 2))]}
        elif type_ == "UpdateConfiguration":
            payload = {"id": self.pick(state.configurations)}
            self.maybe(payload, "model_ids", [self.pick(state.models)])
            self.maybe(payload, "name", f"c{rng.randint(1, 5)}")
            self.maybe(payload, "expected_version", rng.randint(1, 3), 0.2)
        elif type_ == "DeleteConfiguration":
            payload = {"id": self.pick(state.configurations, 0.6)}
        elif type_ == "RequestDeployment":
            payload = {"configuration_id": self.pick(state.configurations), "batch": rng.choice([0, 16, 32, 32])}
            self.maybe(payload, "loss_weights", rng.choice([[1.0], [0.2, 0.8], {"1": 1, "2": 1}, {"3": 0.1}]), 0.4)
        elif type_ == "DeleteDeployment":
            payload = {"id": self.pick(state.deployments, 0.6)}
        elif type_ == "AnnounceDatasource":
            payload = {"deployment_id": self.pick(state.deployments), "input_format": rng.choice(["RAW", "AVRO"]),
                       "ranges": [] if rng.random() < 0.2 else [{"topic": "t", "partition": 0, "start": 0, "end": 9}]}
        return command(type_, payload, validation, command_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)))


def play(seed: int, steps: int = 200, check: bool = True) -> tuple[Decider, list[Command]]:
    """Let a seeded client drive the decider, checking every decision and the invariants as it goes."""
    d = Decider()
    client = RandomClient(seed)
    for _ in range(steps):
        cmd = client.next(d.state)
        decided_before = cmd.command_id in d.state.decided
        seq_before = d.state.seq
        event = d.send(cmd)
        if not check:
            continue
        if event is None:
            # Nothing happens only to a command decided before, or to model code still awaiting its verdict.
            assert decided_before or (cmd.validation is None and cmd.type in CODE_COMMANDS), cmd
            assert d.state.seq == seq_before
        else:
            assert not decided_before
            assert event.seq == seq_before + 1
            assert event.id == event_id_for(cmd.command_id)
            assert event.type in (COMMAND_EVENTS.get(cmd.type), "CommandRejected")
            if event.type == "CommandRejected":
                reason = event.payload["reason"]
                assert set(reason) == {"code", "message", "field"}
                assert reason["code"] in {"invalid", "not_found", "conflict"}
                assert reason["message"]
        check_invariants(d.state)
    return d, client.sent


def check_invariants(state: State) -> None:
    """What the rules promise about any state the decider can reach."""
    names = [m.name for m in state.models.values()]
    assert len(names) == len(set(names)), names
    assert all(1 <= len(n) <= 64 for n in names)
    has_lower: set[int] = set()
    for m in state.models.values():
        if m.upper_id is None:
            assert len(m.output_shapes) == 1, m
        else:
            upper = state.models[m.upper_id]  # the upper exists ...
            assert m.distributed and upper.distributed  # ... both are distributed ...
            assert m.upper_id not in has_lower  # ... the chain does not branch ...
            has_lower.add(m.upper_id)
            assert len(m.output_shapes) == 2, m  # ... and the tensor fits the upper's input
            assert m.output_shapes[0][1:] == upper.input_shape[1:], (m, upper)
        seen: set[int] = set()
        cursor = m
        while cursor.upper_id is not None:  # no cycle
            assert cursor.id not in seen, m
            seen.add(cursor.id)
            cursor = state.models[cursor.upper_id]
    for c in state.configurations.values():
        assert set(c.model_ids) <= set(state.models), c
    for d in state.deployments.values():
        assert d.configuration_id in state.configurations, d
        assert all(state.results[r].deployment_id == d.id for r in d.result_ids)
    assert all(r.deployment_id in state.deployments for r in state.results.values())
    for kind, ids in [("model", state.models), ("configuration", state.configurations),
                      ("deployment", state.deployments), ("result", state.results)]:
        assert all(i <= state.next_ids.get(kind, 0) for i in ids)


@pytest.mark.parametrize("seed", range(30))
def test_a_random_history_keeps_every_rule_and_replays_exactly(seed: int) -> None:
    d, history = play(seed)
    # One event per decided command, and the events log rebuilds the state exactly.
    assert len({e.command_id for e in d.events}) == len(d.events) == len(d.state.decided)
    assert replay(d.events) == d.state
    # The same history decides the same way.
    assert [e.encode() for e in run(history).events] == [e.encode() for e in d.events]


def test_random_histories_reach_the_interesting_states() -> None:
    # Guard against a generator that only ever produces rejections.
    accepted: dict[str, int] = {}
    for seed in range(30):
        for event in play(seed, check=False)[0].events:
            accepted[event.type] = accepted.get(event.type, 0) + 1
    for command_type in set(COMMAND_TYPES) - {"Unknown"}:
        assert accepted.get(COMMAND_EVENTS[command_type], 0) >= 10, (command_type, accepted)
    assert accepted["CommandRejected"] < sum(accepted.values()) * 0.7, accepted
