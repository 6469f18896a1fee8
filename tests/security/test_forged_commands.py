"""Attack: anything that can write `tierflow.commands` forges what only a component of the stack may say.

A plain Kafka producer (any process on the embedded broker's machine, any client of a shared cluster) can
1. attach its own `validation` verdict to model code, so the decider never waits for the sandbox: code that
   does not build (or code that builds into something else than the verdict says) is registered; or copy a
   real verdict, made for another command, onto its own code;
2. report training that never happened: "result 1 finished with artefact X" (X any file it uploaded), or
   started, progressed, failed, launched.

Defence (streams/proofs.py, checked by the decider's rules): a verdict counts only with the validator's proof,
an HMAC over the command id, type, payload and verdict with a key derived from the stack's secret
("proof:validator"); a verdict without a valid one is ignored and the code is built in the sandbox for real.
Training reports need the proof of the component entitled to send them: the API ("proof:api"), which signs a
workload's report after authenticating it (`POST /reports`), or the worker ("proof:worker": the orchestrator's
launch and failure reports). A report without one is rejected.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.conftest import Infra, admin_headers, new_plane, start_plane, stop_plane, topic_records, wait_until
from tierflow.streams import kafka as kio
from tierflow.streams.client import CommandClient
from tierflow.streams.domain import decide, needs_validation
from tierflow.streams.domain.state import State, apply
from tierflow.streams.envelope import JSON, Command, Event, new_command_id
from tierflow.streams.proofs import API, VALIDATOR, WORKER, Signer, Verifier
from tierflow.streams.settings import Settings

SHA = "b" * 64
SINGLE = {"input_shape": [None, 28, 28], "output_shapes": [[None, 10]], "params": 7850}
FORGED_OK = {"ok": True, "summary": SINGLE}

#: What the sandbox saw, in order (the fake sandbox below).
BUILT: list[str] = []


async def sandbox(code: str, imports: str) -> dict[str, Any]:
    """The validator's port: code marked `# single` builds; anything else fails as a real build would."""
    BUILT.append(code)
    if "# single" in code:
        return {"ok": True, "summary": SINGLE}
    return {"ok": False, "error": "NameError: name 'payload' is not defined"}


@pytest.fixture(scope="module")
async def plane(infra: Infra) -> AsyncIterator[Settings]:
    settings = await new_plane(infra, "forged")
    running = await start_plane(settings, sandbox)
    yield settings
    await stop_plane(running)


async def produce_raw(settings: Settings, envelope: JSON) -> str:
    """What an attacker does: a hand-written command envelope, straight onto the commands topic."""
    p = kio.producer(settings.kafka)
    await p.start()
    try:
        await p.send_and_wait(settings.kafka.commands_topic, orjson.dumps(envelope),
                              key=str(envelope["command_id"]).encode())
    finally:
        await p.stop()
    return str(envelope["command_id"])


async def outcome(settings: Settings, command_id: str) -> Event:
    async with CommandClient(settings.kafka) as client:
        return await client.wait(command_id, timeout=30)


async def raw_commands(settings: Settings) -> list[JSON]:
    """Every command on the commands topic, as JSON (the marker and undecodable records left out)."""
    records = await topic_records(settings.kafka, settings.kafka.commands_topic)
    return [obj for obj in map(orjson.loads, (r.value for r in records)) if "command_id" in obj]


# --- verdicts -------------------------------------------------------------------------------------------

async def test_a_forged_verdict_does_not_skip_the_sandbox(plane: Settings) -> None:
    code = "payload()  # runs anything"
    cid = await produce_raw(plane, {"command_id": new_command_id(), "type": "RegisterModel", "source": "attacker",
                                    "payload": {"name": "trojan", "code": code}, "validation": FORGED_OK})
    event = await outcome(plane, cid)
    assert event.type == "CommandRejected", f"the forged verdict was believed: {event.type} {event.payload}"
    assert "NameError" in event.payload["reason"]["message"], event.payload
    assert code in BUILT, "the code was never built in the sandbox"


async def test_a_real_verdict_copied_onto_other_code_is_worthless(plane: Settings) -> None:
    async with CommandClient(plane.kafka) as client:
        real = await client.send("RegisterModel", {"name": "honest", "code": "# single"})
        assert (await client.wait(real)).type == "ModelCreated"
    # The validator's copy of the honest command carries a real verdict (and whatever vouches for it).
    [twin] = [c for c in await raw_commands(plane) if c["command_id"] == real and "validation" in c]
    stolen = twin | {"command_id": new_command_id(), "source": "attacker",
                     "payload": twin["payload"] | {"name": "thief", "code": "payload()  # other code"}}
    event = await outcome(plane, await produce_raw(plane, stolen))
    assert event.type == "CommandRejected", f"the copied verdict was believed: {event.type} {event.payload}"
    assert "NameError" in event.payload["reason"]["message"], event.payload
    # Nor is it worth anything on its own command id with a changed payload.
    same_id = twin | {"payload": twin["payload"] | {"name": "thief2"}, "command_id": new_command_id()}
    same_id["payload"]["code"] = "payload()  # again"
    event = await outcome(plane, await produce_raw(plane, same_id))
    assert event.type == "CommandRejected", event.payload


# --- training reports -----------------------------------------------------------------------------------

async def deployed(plane: Settings, name: str) -> int:
    """A model, a configuration and a deployment (sent as any client may): the id of its one result."""
    async with CommandClient(plane.kafka) as client:
        async def accepted(type_: str, payload: JSON) -> JSON:
            event = await client.wait(await client.send(type_, payload))
            assert event.type != "CommandRejected", event.payload
            return event.payload

        model = await accepted("RegisterModel", {"name": name, "code": "# single"})
        conf = await accepted("CreateConfiguration", {"name": name, "model_ids": [model["id"]]})
        deployment = await accepted("RequestDeployment", {"configuration_id": conf["id"], "batch": 8})
    return int(deployment["results"][0]["id"])


FORGED_REPORTS = [
    ("ReportTrainingLaunched", lambda dep, rid: {"deployment_id": dep, "result_ids": [rid], "workload": "fake"}),
    ("ReportTrainingStarted", lambda dep, rid: {"deployment_id": dep, "result_ids": [rid], "seed": 1,
                                                "samples": {"train": 1}}),
    ("ReportTrainingProgress", lambda dep, rid: {"deployment_id": dep, "result_ids": [rid], "epoch": 1,
                                                 "epochs": 1, "metrics": {str(rid): {"loss": 0.0}}}),
    ("ReportTrainingFailure", lambda dep, rid: {"deployment_id": dep, "result_ids": [rid], "reason": "forged"}),
    ("ReportTrainingResult", lambda dep, rid: {"result_id": rid, "metrics": {"test": {"accuracy": 1.0}},
                                               "artefacts": {"keras": {"sha256": SHA}}}),
]


@pytest.mark.parametrize("type_,payload", FORGED_REPORTS, ids=[t for t, _ in FORGED_REPORTS])
async def test_a_forged_training_report_is_refused(plane: Settings, type_: str, payload: Any) -> None:
    rid = await deployed(plane, f"victim-{type_}")
    async with CommandClient(plane.kafka, source="training") as client:
        cid = await client.send(type_, payload(rid, rid))  # deployment and result ids count alike here
        event = await client.wait(cid)
    assert event.type == "CommandRejected", f"a plain producer's {type_} was accepted: {event.payload}"
    assert event.payload["reason"]["field"] == "proof", event.payload


async def test_a_forged_result_does_not_finish_the_result(plane: Settings) -> None:
    import asyncpg

    rid = await deployed(plane, "victim-finish")
    cid = await produce_raw(plane, {"command_id": new_command_id(), "type": "ReportTrainingResult",
                                    "source": "training", "payload": FORGED_REPORTS[-1][1](rid, rid)})
    assert (await outcome(plane, cid)).type == "CommandRejected"
    conn = await asyncpg.connect(plane.database.url)
    try:
        await wait_until(lambda: _outcome_row(conn, cid), what="the rejection projected")
        assert await conn.fetchval("SELECT status FROM proj.results WHERE id = $1", rid) == "created"
    finally:
        await conn.close()


async def _outcome_row(conn: Any, command_id: str) -> bool:
    return bool(await conn.fetchval("SELECT count(*) FROM proj.command_outcomes WHERE command_id = $1::uuid",
                                    command_id))


# --- what the entitled components send is still accepted -----------------------------------------------

async def test_a_workloads_reports_through_the_api_are_accepted(plane: Settings) -> None:
    from tierflow.api.app import create_app

    rid = await deployed(plane, "trained-via-api")
    async with TestClient(TestServer(create_app(plane)), headers=admin_headers(plane)) as c:
        async def report(type_: str, payload: JSON) -> Event:
            r = await c.post("/reports", json={"type": type_, "payload": payload})
            body = await r.json()
            assert r.status == 202, body
            assert r.headers["Location"] == f"/commands/{body['command_id']}"
            return await outcome(plane, body["command_id"])

        # The launch report is the orchestrator's (the worker's proof), never a workload's.
        worker = Signer.from_secret(plane.security.secret_key, WORKER)
        async with CommandClient(plane.kafka, signer=worker) as client:
            launched = await client.wait(await client.send("ReportTrainingLaunched", {
                "deployment_id": rid, "result_ids": [rid], "workload": "tierflow-train-x"}))
        assert launched.type == "TrainingLaunched", launched.payload
        for type_, payload in FORGED_REPORTS[1:3]:
            assert (await report(type_, payload(rid, rid))).type != "CommandRejected"
        done = await report("ReportTrainingResult", FORGED_REPORTS[-1][1](rid, rid))
        assert done.type == "TrainingResultReported", done.payload
        # The API refuses what is not a workload's report, and never vouches for the orchestrator's.
        for body in [{"type": "ReportTrainingLaunched", "payload": {"deployment_id": rid, "result_ids": [rid],
                                                                     "workload": "w"}},
                     {"type": "RegisterModel", "payload": {"name": "x", "code": "# single"}},
                     {"type": "ReportTrainingResult", "payload": "not an object"}]:
            r = await c.post("/reports", json=body)
            assert r.status == 422, await r.text()


# --- the rules alone (no Kafka): what a proof is worth --------------------------------------------------

SECRET = "forged-commands-unit-secret-" + "0" * 32


def rules_with_a_deployment() -> tuple[State, int]:
    """The decider's state with one deployed result, decided by the pure rules with this secret's keys."""
    state = State(proofs=Verifier.from_secret(SECRET))
    validator = Signer.from_secret(SECRET, VALIDATOR)
    for cmd in [validator.sign(Command(new_command_id(), "RegisterModel", {"name": "m", "code": "# single"},
                                       validation=FORGED_OK)),
                Command(new_command_id(), "CreateConfiguration", {"name": "c", "model_ids": [1]}),
                Command(new_command_id(), "RequestDeployment", {"configuration_id": 1})]:
        event = decide(state, cmd, occurred_at="2026-01-01T00:00:00Z", position=None)
        assert event is not None and event.type != "CommandRejected", event
        apply(state, event)
    return state, 1


def outcome_of(state: State, cmd: Command) -> Event | None:
    return decide(state, cmd, occurred_at="2026-01-01T00:00:00Z", position=None)


def test_a_report_needs_the_proof_of_a_component_entitled_to_it() -> None:
    state, rid = rules_with_a_deployment()
    result = Command(new_command_id(), "ReportTrainingResult", FORGED_REPORTS[-1][1](rid, rid))
    launch = Command(new_command_id(), "ReportTrainingLaunched", FORGED_REPORTS[0][1](rid, rid))
    # The wrong component's proof is no proof: the API never vouches for a launch, the worker or the validator
    # never for a result; the same holds for a proof made with another stack's secret.
    other = "another-stacks-secret-" + "1" * 32
    for cmd, signer in [(launch, Signer.from_secret(SECRET, API)), (result, Signer.from_secret(SECRET, WORKER)),
                        (result, Signer.from_secret(SECRET, VALIDATOR)), (result, Signer.from_secret(other, API))]:
        event = outcome_of(state, signer.sign(cmd))
        assert event is not None and event.type == "CommandRejected", (cmd.type, signer.name)
        assert event.payload["reason"]["field"] == "proof"
    # A proof does not survive a change of the payload, or a move to another command id.
    signed = Signer.from_secret(SECRET, API).sign(result)
    tampered = replace(signed, payload=signed.payload | {"artefacts": {"keras": {"sha256": "c" * 64}}})
    moved = replace(signed, command_id=new_command_id())
    for cmd in (tampered, moved):
        event = outcome_of(state, cmd)
        assert event is not None and event.type == "CommandRejected"
    # Garbage in the proof is refused, never raised (compare_digest raises on non-ASCII text).
    for junk in ({"by": "api", "sig": "é" * 64}, {"by": "api"}, {"by": 7, "sig": "00"}, {"sig": signed.proof}):
        event = outcome_of(state, replace(result, proof=junk))
        assert event is not None and event.type == "CommandRejected"
    # The entitled component's proof is accepted.
    event = outcome_of(state, signed)
    assert event is not None and event.type == "TrainingResultReported"


def test_a_verdict_without_the_validators_proof_waits_for_the_real_one() -> None:
    state, _ = rules_with_a_deployment()
    proofs = state.proofs
    forged = Command(new_command_id(), "RegisterModel", {"name": "x", "code": "payload()"}, validation=FORGED_OK)
    api_signed = Signer.from_secret(SECRET, API).sign(forged)  # the API's key vouches for reports, not verdicts
    for cmd in (forged, api_signed):
        assert outcome_of(state, cmd) is None  # pending: no event, the validator will build it
        assert needs_validation(cmd, proofs)
    real = Signer.from_secret(SECRET, VALIDATOR).sign(replace(forged, validation={"ok": False, "error": "NameError"}))
    assert not needs_validation(real, proofs)
    event = outcome_of(state, real)
    assert event is not None and event.type == "CommandRejected" and "NameError" in event.payload["reason"]["message"]


def test_the_decider_without_a_secret_believes_nothing() -> None:
    # A State built without keys (the default) vouches for nothing: it fails closed.
    state = State()
    signed = Signer.from_secret(SECRET, VALIDATOR).sign(
        Command(new_command_id(), "RegisterModel", {"name": "m", "code": "# single"}, validation=FORGED_OK))
    assert outcome_of(state, signed) is None
