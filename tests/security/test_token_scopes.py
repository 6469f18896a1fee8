"""Least privilege for workloads: what a training job's or a tier's token can reach, and artefact uploads.

A workload runs user code (a training job runs the model code; a tier loads a model trained from it), so its
token is what that code can use. Attacks: a training workload reads or acts on another deployment's results,
registers model code, or fills the API's disk with uploads; a tier reads another inference's model; anyone
uploads without a workload token; a training workload reports (through the API, which vouches for its reports)
on another deployment's results. Defences (api/auth.py, streams/tokens.py): the orchestrator gives each
workload a token naming its deployment and results (training) or its inference, tier and result (tier); the API
lets each scope reach only the routes and ids its claims name (a report's results included); uploads need a
training token whose results are still open (or the admin token), as `application/octet-stream`, under
TIERFLOW_MAX_ARTEFACT_BYTES (413 beyond, decided from Content-Length before a byte is stored, and by counting
when the length is not sent).
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.conftest import Infra, StackClient, new_plane, start_plane, stop_plane, wait_until
from tests.integration.test_replay import shape_validate
from tests.security.test_api_doors import AUTH, SECRET, secured
from tierflow.api.app import create_app
from tierflow.deploy.cli import main
from tierflow.streams.settings import Settings
from tierflow.streams.tokens import mint, tier_claims, training_claims, verify

LIMIT = 64 * 1024


@dataclass
class World:
    client: TestClient[Any, Any]
    settings: Settings
    artefacts: Path
    #: two deployments of one model each: (deployment id, result id, model id)
    mine: tuple[int, int, int]
    theirs: tuple[int, int, int]


def bearer(token: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **headers}


@pytest.fixture(scope="module")
async def world(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    plane = await new_plane(infra, "scopes")
    artefacts = tmp_path_factory.mktemp("artefacts")
    settings = secured(plane, TIERFLOW_ARTEFACTS=str(artefacts), TIERFLOW_MAX_ARTEFACT_BYTES=str(LIMIT))
    running = await start_plane(settings, shape_validate)
    async with TestClient(TestServer(create_app(settings))) as c:
        made = []
        for name in ("mine", "theirs"):
            model = await (await c.post("/models", json={"name": name, "code": "# single"}, headers=AUTH)).json()
            conf = await (await c.post("/configurations", json={"name": name, "model_ids": [model["id"]]},
                                       headers=AUTH)).json()
            dep = await (await c.post("/deployments", json={"configuration_id": conf["id"], "batch": 8},
                                      headers=AUTH)).json()
            made.append((dep["id"], dep["result_ids"][0], model["id"]))
        yield World(c, settings, artefacts, made[0], made[1])
    await stop_plane(running)


async def status(world: World, method: str, path: str, token: str, **kwargs: Any) -> int:
    r = await world.client.request(method, path, headers=bearer(token, **kwargs.pop("headers", {})), **kwargs)
    return r.status


async def test_a_training_token_reaches_only_its_own_deployment(world: World) -> None:
    dep, rid, mid = world.mine
    other_dep, other_rid, other_mid = world.theirs
    token = mint(SECRET, training_claims(dep, [rid]))
    # What the training job reads (tiers/train_job.py): its deployment, its results, their model versions, its
    # datasources, its commands' outcomes.
    for path in (f"/deployments/{dep}", f"/results/{rid}", f"/models/{mid}/versions/1",
                 f"/datasources?deployment_id={dep}&limit=1000"):
        assert await status(world, "GET", path, token) == 200, path
    assert await status(world, "GET", f"/commands/{uuid.uuid4()}", token) == 202
    # Nothing of another deployment, and no listing of everything.
    for path in (f"/deployments/{other_dep}", f"/results/{other_rid}", f"/models/{other_mid}/versions/1",
                 f"/datasources?deployment_id={other_dep}", "/datasources", "/models", "/deployments",
                 f"/deployments/{dep}/results", "/results", "/inferences", f"/models/{mid}", "/openapi.json",
                 f"/results/{other_rid}/model", "/metrics"):
        assert await status(world, "GET", path, token) == 403, path
    # No writes through the API: not on another deployment's results, not on its own, no model code.
    for method, path, body in (("POST", f"/results/{other_rid}/stop", {}), ("POST", f"/results/{rid}/stop", {}),
                               ("DELETE", f"/results/{other_rid}", None), ("DELETE", f"/deployments/{dep}", None),
                               ("POST", "/models", {"name": "planted", "code": "# single"}),
                               ("POST", "/configurations", {"name": "planted", "model_ids": [mid]}),
                               ("POST", "/inferences", {"result_id": rid, "input_topic": "a", "output_topic": "b"}),
                               ("POST", "/inferences/1/token", {"tier": 0})):
        assert await status(world, method, path, token, json=body) == 403, (method, path)
    models = await (await world.client.get("/models", headers=AUTH)).json()
    assert "planted" not in {m["name"] for m in models["items"]}


async def test_a_token_names_only_what_it_was_minted_for(world: World) -> None:
    dep, rid, _ = world.mine
    _, other_rid, _ = world.theirs
    # Results of another deployment listed in a token for this one: the API checks that they belong together.
    mixed = mint(SECRET, training_claims(dep, [rid, other_rid]))
    assert await status(world, "GET", f"/results/{other_rid}", mixed) == 403
    # A token signed with another stack's secret, or altered, is no token at all.
    foreign = mint("another-stack-secret-" + "x" * 40, training_claims(dep, [rid]))
    assert await status(world, "GET", f"/deployments/{dep}", foreign) == 401
    head, _, signature = mint(SECRET, training_claims(dep, [rid])).split(".")
    other_payload = mint(SECRET, training_claims(world.theirs[0], [other_rid])).split(".")[1]
    assert await status(world, "GET", f"/deployments/{world.theirs[0]}", f"{head}.{other_payload}.{signature}") == 401


async def report(world: World, token: str, type_: str, payload: dict[str, Any]) -> int:
    return await status(world, "POST", "/reports", token, json={"type": type_, "payload": payload})


async def test_a_training_token_reports_only_its_own_results(world: World) -> None:
    dep, rid, _ = world.mine
    other_dep, other_rid, _ = world.theirs
    token = mint(SECRET, training_claims(dep, [rid]))
    # Another deployment's result, under either deployment id: the API refuses before it vouches for anything.
    started = {"seed": 1, "samples": {"train": 1}}
    for payload in ({"deployment_id": other_dep, "result_ids": [other_rid], **started},
                    {"deployment_id": dep, "result_ids": [other_rid], **started},
                    {"deployment_id": dep, "result_ids": [rid, other_rid], **started},
                    {"deployment_id": other_dep, "result_ids": [rid], **started}):
        assert await report(world, token, "ReportTrainingStarted", payload) == 403, payload
    finished = {"metrics": {"test": {"accuracy": 1.0}}, "artefacts": {"keras": {"sha256": "c" * 64}}}
    assert await report(world, token, "ReportTrainingResult", {"result_id": other_rid, **finished}) == 403
    assert await report(world, token, "ReportTrainingFailure", {"deployment_id": other_dep,
                                                                "result_ids": [other_rid], "reason": "x"}) == 403
    # A token that also names another deployment's result reaches it no more than it can read it.
    mixed = mint(SECRET, training_claims(dep, [rid, other_rid]))
    assert await report(world, mixed, "ReportTrainingStarted",
                        {"deployment_id": dep, "result_ids": [other_rid], **started}) == 403
    # A tier reports nothing.
    assert await report(world, mint(SECRET, tier_claims(41, 0, rid)), "ReportTrainingStarted",
                        {"deployment_id": dep, "result_ids": [rid], **started}) == 403
    # Its own result: the API vouches for the report, and the decider accepts it.
    r = await world.client.post("/reports", headers=bearer(token), json={
        "type": "ReportTrainingProgress",
        "payload": {"deployment_id": dep, "result_ids": [rid], "epoch": 1, "epochs": 2,
                    "metrics": {str(rid): {"loss": 0.5}}}})
    assert r.status == 202, await r.text()
    location = r.headers["Location"]

    async def decided() -> Any:
        answer = await world.client.get(location, headers=bearer(token))
        return (await answer.json()) if answer.status == 200 else None

    await wait_until(decided, what="the report's outcome")
    outcome = await decided()
    assert outcome["status"] == "accepted", outcome
    them = await (await world.client.get(f"/results/{other_rid}", headers=AUTH)).json()
    assert them["status"] == "created" and not them.get("history"), them


async def test_a_tier_token_reads_only_its_inference_and_its_model(world: World) -> None:
    _, rid, _ = world.mine
    _, other_rid, _ = world.theirs
    token = mint(SECRET, tier_claims(41, 0, rid))
    # Its inference: allowed (404 here: it does not exist, which is the route's own answer). Its model only while
    # that inference serves it on that tier (test_the_admin_mints_a_tier_token_for_a_device reads one): a deleted
    # inference revokes its tiers' tokens.
    assert await status(world, "GET", "/inferences/41", token) == 404
    for path in ("/inferences/42", f"/results/{rid}/model", f"/results/{other_rid}/model", f"/results/{rid}",
                 "/inferences", "/models", "/inferences/41/predictions", "/inferences/41/stats"):
        assert await status(world, "GET", path, token) == 403, path
    for method, path in (("POST", "/inferences/41/stop"), ("DELETE", "/inferences/41"), ("POST", "/models")):
        assert await status(world, method, path, token, json={}) == 403, (method, path)


async def test_an_upload_needs_a_workload_token_of_an_open_training(world: World) -> None:
    dep, rid, _ = world.mine
    blob = b"trained model" * 100
    sha = hashlib.sha256(blob).hexdigest()
    headers = {"Content-Type": "application/octet-stream", "X-Sha256": sha}
    r = await world.client.put("/artefacts", data=blob, headers=headers)
    assert r.status == 401
    for token in (mint(SECRET, tier_claims(41, 0, rid)),  # a tier uploads nothing
                  mint(SECRET, training_claims(dep + 1000, [rid])),  # a deployment that does not exist
                  mint(SECRET, training_claims(world.theirs[0], [rid]))):  # results of another deployment
        assert await status(world, "PUT", "/artefacts", token, data=blob, headers=headers) == 403
    assert not list(world.artefacts.rglob(sha))
    token = mint(SECRET, training_claims(dep, [rid]))
    # Only as octet-stream: a JSON-typed upload is refused like any other unexpected type.
    assert await status(world, "PUT", "/artefacts", token, data=blob,
                        headers={"Content-Type": "text/plain", "X-Sha256": sha}) == 415
    r = await world.client.put("/artefacts", data=blob, headers=bearer(token, **headers))
    assert r.status == 201, await r.text()
    assert (await r.json()) == {"sha256": sha, "size": len(blob)}
    assert len(list(world.artefacts.rglob(sha))) == 1


async def test_an_oversized_upload_is_refused_and_not_stored(world: World) -> None:
    dep, rid, _ = world.mine
    token = mint(SECRET, training_claims(dep, [rid]))
    blob = b"x" * (LIMIT + 1)
    sha = hashlib.sha256(blob).hexdigest()
    before = sorted(world.artefacts.rglob("*"))
    r = await world.client.put("/artefacts", data=blob,
                               headers=bearer(token, **{"Content-Type": "application/octet-stream"}))
    assert r.status == 413, await r.text()
    assert (await r.json())["error"]["code"] == "too_large"
    assert str(LIMIT) in (await r.json())["error"]["message"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while streamed
        for _ in range(4):
            yield b"y" * (LIMIT // 2)

    r = await world.client.put("/artefacts", data=chunks(),
                               headers=bearer(token, **{"Content-Type": "application/octet-stream"}))
    assert r.status == 413
    assert sorted(world.artefacts.rglob("*")) == before  # nothing stored, no temporary file left
    assert not list(world.artefacts.rglob(sha))


async def test_the_admin_mints_a_tier_token_for_a_device(world: World, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    dep, rid, _ = world.mine
    assert await status(world, "POST", "/inferences/999/token", AUTH["Authorization"].split()[1],
                        json={"tier": 0}) == 404
    async with StackClient(world.settings) as client:  # as the API signs a training job's report
        event = await client.wait(await client.send("ReportTrainingResult", {
            "result_id": rid, "metrics": {}, "artefacts": {"keras": {"sha256": "a" * 64, "size": 1}}}))
        assert event.type == "TrainingResultReported"

    async def finished() -> bool:
        return (await (await world.client.get(f"/results/{rid}", headers=AUTH)).json())["status"] == "finished"

    await wait_until(finished, what="a finished result")
    inference = await (await world.client.post("/inferences", json={
        "result_id": rid, "input_topic": f"in-{dep}", "output_topic": f"out-{dep}"}, headers=AUTH)).json()
    r = await world.client.post(f"/inferences/{inference['id']}/token", json={"tier": 3}, headers=AUTH)
    assert r.status == 422 and (await r.json())["error"]["field"] == "tier"
    r = await world.client.post(f"/inferences/{inference['id']}/token", json={"tier": 0}, headers=AUTH)
    assert r.status == 201, await r.text()
    minted = await r.json()
    assert (minted["inference_id"], minted["tier"], minted["result_id"]) == (inference["id"], 0, rid)
    tier_token = minted["token"]
    assert await status(world, "GET", f"/inferences/{inference['id']}", tier_token) == 200
    assert await status(world, "GET", f"/results/{rid}/model", tier_token) == 404  # allowed; no such file here
    assert await status(world, "GET", f"/results/{rid}/model?format=tflite", tier_token) == 404
    assert await status(world, "GET", f"/inferences/{inference['id'] + 1}", tier_token) == 403
    wrong_tier = mint(SECRET, tier_claims(inference["id"], 1, rid))  # the inference has no tier 1
    assert await status(world, "GET", f"/results/{rid}/model", wrong_tier) == 403
    # A workload cannot mint tokens for itself.
    assert await status(world, "POST", f"/inferences/{inference['id']}/token", tier_token, json={"tier": 0}) == 403
    # The admin's command line prints one for a device: `tierflow inferences token N --tier K`.
    monkeypatch.setenv("TIERFLOW_API_URL", str(world.client.make_url("")).rstrip("/"))
    capsys.readouterr()
    code = await asyncio.to_thread(main, ["inferences", "token", str(inference["id"]), "--tier", "0",
                                          "--token", AUTH["Authorization"].split()[1]])
    printed = capsys.readouterr().out.strip()
    assert code == 0 and verify(SECRET, printed) == tier_claims(inference["id"], 0, rid)
