"""Every route and its errors: 400/401/404/413/422, 202 + Location, /commands, /readyz, /metrics, /openapi.json,
the training lifecycle as the workloads report it, artefact upload and download."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.conftest import Infra, admin_headers, new_plane, start_plane, stop_plane, wait_until
from tests.integration.test_replay import shape_validate
from tierflow.api.app import create_app
from tierflow.api.ui import is_ui_path
from tierflow.streams import kafka as kio
from tierflow.streams.client import CommandClient
from tierflow.streams.envelope import Event
from tierflow.streams.proofs import WORKER, Signer
from tierflow.streams.settings import Settings
from tierflow.streams.topics import TopicSpec, ensure_topics

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
async def env(infra: Infra) -> AsyncIterator[tuple[TestClient[Any, Any], Settings]]:
    settings = await new_plane(infra, "routes")
    settings = replace(settings, api=replace(settings.api, token=TOKEN, max_body_bytes=64 * 1024))
    running = await start_plane(settings, shape_validate)
    async with TestClient(TestServer(create_app(settings)), headers=AUTH) as c:
        yield c, settings
    await stop_plane(running)


async def test_errors_are_json_and_name_the_problem(env: tuple[TestClient[Any, Any], Settings]) -> None:
    c, _ = env
    # Every route needs the bearer token, reads too (tests/security/test_api_doors.py has the rest).
    r = await c.post("/models", json={"name": "m", "code": "# single"}, headers={"Authorization": "Bearer nope"})
    assert r.status == 401 and (await r.json())["error"]["code"] == "unauthorized"
    assert (await c.get("/models", headers={"Authorization": "Bearer nope"})).status == 401
    assert (await c.get("/models")).status == 200
    # Not JSON, not an object, too large.
    r = await c.post("/models", data=b"{nope", headers=AUTH | {"Content-Type": "application/json"})
    assert r.status == 400 and "not valid JSON" in (await r.json())["error"]["message"]
    r = await c.post("/configurations", json=[1, 2], headers=AUTH)
    assert r.status == 422
    r = await c.post("/models", json={"name": "big", "code": "#" * 100_000}, headers=AUTH)
    assert r.status == 413 and (await r.json())["error"]["code"] == "too_large"
    # Unknown ids and paths.
    for path in ("/models/999", "/configurations/999", "/deployments/999", "/results/999", "/datasources/999",
                 "/models/abc", "/deployments/999/results", "/models/1/versions/9", "/nowhere"):
        r = await c.get(path)
        assert r.status == 404, path
        assert (await r.json())["error"]["code"] == "not_found"
    r = await c.delete("/deployments/999", headers=AUTH)
    assert r.status == 404 and (await r.json())["error"]["field"] == "id"
    r = await c.get("/models?limit=0")
    assert r.status == 422 and (await r.json())["error"]["field"] == "limit"
    # Method not allowed is JSON too.
    r = await c.patch("/models", headers=AUTH)
    assert r.status == 405 and "error" in await r.json()


async def test_the_api_checks_topic_names_by_the_deciders_rule(env: tuple[TestClient[Any, Any], Settings]) -> None:
    c, _ = env
    # A malformed topic is refused by the API itself, before a command is sent (the decider would have
    # answered first that result 999 does not exist), with the decider's own message.
    r = await c.post("/inferences", json={"result_id": 999, "input_topic": "in put", "output_topic": "out"},
                     headers=AUTH)
    err = (await r.json())["error"]
    assert r.status == 422 and err["field"] == "input_topic", err
    assert "1-249 characters, no spaces" in err["message"]


async def test_openapi_matches_the_routes(env: tuple[TestClient[Any, Any], Settings]) -> None:
    c, _ = env
    spec = await (await c.get("/openapi.json")).json()
    documented = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}
    served = set()
    ui = set()
    for resource in c.server.app.router.resources():
        info = resource.get_info()
        path = info.get("path") or info.get("formatter") or info.get("prefix")
        for route in resource:
            if route.method != "HEAD":
                (ui if is_ui_path(path) else served).add((route.method, path))
    assert documented == served
    # The web UI is not part of the JSON contract: it is served, but left out of the document on purpose.
    assert ui == {("GET", "/"), ("GET", "/ui"), ("GET", "/ui/"), ("GET", "/ui/static")}
    assert not any(is_ui_path(path) for path in spec["paths"])


async def test_health_readiness_metrics_and_outcomes(env: tuple[TestClient[Any, Any], Settings]) -> None:
    c, _ = env
    assert (await (await c.get("/healthz")).json()) == {"status": "ok"}

    async def ready() -> bool:
        r = await c.get("/readyz")
        return r.status == 200 and bool((await r.json())["ready"])

    await wait_until(ready, what="/readyz")
    r = await c.post("/models", json={"name": "single", "code": "# single"}, headers=AUTH)
    assert r.status == 201
    command = r.headers["Location"]
    outcome = await (await c.get(command)).json()
    assert outcome["status"] == "accepted" and outcome["event_type"] == "ModelCreated"
    assert (await c.get("/commands/not-a-uuid")).status == 404
    unknown = await c.get("/commands/6f1c1f7e-3c43-4d0b-9a55-7a8e5e0e3b11")
    assert unknown.status == 202
    text = await (await c.get("/metrics")).text()
    assert 'tierflow_api_commands_total{outcome="accepted",type="RegisterModel"}' in text
    assert "tierflow_api_request_seconds_bucket" in text
    version = await (await c.get("/models/1/versions/1")).json()
    assert version["code"] == "# single" and version["input_shape"] == [None, 28, 28]


async def test_a_slow_outcome_answers_202_with_a_location(env: tuple[TestClient[Any, Any], Settings]) -> None:
    _, settings = env
    impatient = replace(settings, api=replace(settings.api, command_timeout_s=0.0))
    async with TestClient(TestServer(create_app(impatient)), headers=AUTH) as c:
        r = await c.post("/configurations", json={"name": "slow", "model_ids": [1]}, headers=AUTH)
        assert r.status == 202
        location = r.headers["Location"]
        assert location.startswith("/commands/")

        async def decided() -> bool:
            return (await c.get(location)).status == 200

        await wait_until(decided, what="the outcome behind the Location")
        assert (await (await c.get(location)).json())["event_type"] == "ConfigurationCreated"


async def test_training_lifecycle_and_artefacts(env: tuple[TestClient[Any, Any], Settings]) -> None:
    c, settings = env
    conf = await (await c.post("/configurations", json={"name": "lifecycle", "model_ids": [1]}, headers=AUTH)).json()
    dep = await (await c.post("/deployments", json={"configuration_id": conf["id"], "batch": 16},
                              headers=AUTH)).json()
    rid = dep["result_ids"][0]
    # An artefact upload is content-addressed and verified against X-Sha256.
    blob = b"keras model bytes" * 100
    sha = hashlib.sha256(blob).hexdigest()
    r = await c.put("/artefacts", data=blob, headers=AUTH | {"X-Sha256": "0" * 64})
    assert r.status == 422 and (await r.json())["error"]["field"] == "X-Sha256"
    r = await c.put("/artefacts", data=blob, headers=AUTH | {"X-Sha256": sha})
    assert r.status == 201 and (await r.json()) == {"sha256": sha, "size": len(blob)}
    assert await (await c.get(f"/artefacts/{sha}")).read() == blob
    # The orchestrator's launch report carries the worker's proof; the workload's reports go through the API,
    # which vouches for them (POST /reports); they move the result through its states.
    worker = Signer.from_secret(settings.security.secret_key, WORKER)
    async with CommandClient(settings.kafka, signer=worker) as orchestrator, CommandClient(settings.kafka) as client:
        launch = {"deployment_id": dep["id"], "result_ids": [rid], "workload": "w"}
        assert (await orchestrator.wait(await orchestrator.send("ReportTrainingLaunched", launch))).type \
            == "TrainingLaunched"
        again = await orchestrator.wait(await orchestrator.send("ReportTrainingLaunched", launch))
        assert again.type == "CommandRejected" and "launched already" in again.payload["reason"]["message"]

        async def report(kind: str, payload: dict[str, Any]) -> Event:
            r = await c.post("/reports", json={"type": kind, "payload": payload}, headers=AUTH)
            assert r.status == 202, await r.text()
            return await client.wait((await r.json())["command_id"])

        await report("ReportTrainingStarted", {"deployment_id": dep["id"], "result_ids": [rid], "seed": 7,
                                               "samples": {"train": 80, "validation": 10, "test": 10}})
        for epoch in (1, 2):
            await report("ReportTrainingProgress", {"deployment_id": dep["id"], "result_ids": [rid], "epoch": epoch,
                                                    "epochs": 2, "metrics": {str(rid): {"loss": 1.0 / epoch}}})
        assert (await c.get(f"/results/{rid}/model")).status == 404  # not finished yet
        done = await report("ReportTrainingResult", {"result_id": rid, "metrics": {"test": {"accuracy": 0.9}},
                                                     "artefacts": {"keras": {"sha256": sha, "size": len(blob)}}})
        assert done.type == "TrainingResultReported"
        late = await report("ReportTrainingFailure", {"deployment_id": dep["id"], "result_ids": [rid],
                                                      "reason": "too late"})
        assert late.type == "CommandRejected"

    async def finished() -> bool:
        return bool((await (await c.get(f"/results/{rid}")).json())["status"] == "finished")

    await wait_until(finished, what="the result to finish")
    result = await (await c.get(f"/results/{rid}")).json()
    assert [h["epoch"] for h in result["history"]] == [1, 2] and result["history"][1]["loss"] == 0.5
    assert result["seed"] == 7 and result["metrics"]["test"]["accuracy"] == 0.9
    r = await c.get(f"/results/{rid}/model")
    assert r.status == 200 and await r.read() == blob and r.headers["X-Sha256"] == sha
    assert (await c.get(f"/results/{rid}/model?format=tflite")).status == 404
    # A finished result cannot be stopped; it can be deleted.
    r = await c.post(f"/results/{rid}/stop", headers=AUTH)
    assert r.status == 409
    r = await c.delete(f"/results/{rid}", headers=AUTH)
    assert r.status == 200 and (await r.json())["id"] == rid
    assert (await c.get(f"/results/{rid}")).status == 404


async def test_stop_and_resend_a_datasource(env: tuple[TestClient[Any, Any], Settings]) -> None:
    c, settings = env
    conf = await (await c.post("/configurations", json={"name": "stoppable", "model_ids": [1]}, headers=AUTH)).json()
    dep1 = await (await c.post("/deployments", json={"configuration_id": conf["id"], "batch": 8}, headers=AUTH)).json()
    dep2 = await (await c.post("/deployments", json={"configuration_id": conf["id"], "batch": 8}, headers=AUTH)).json()
    r = await c.post(f"/results/{dep1['result_ids'][0]}/stop", headers=AUTH)
    assert r.status == 200
    body = await r.json()
    assert [x["status"] for x in body["items"]] == ["stopped"]
    # A datasource announced for one deployment is sent to another without re-sending the data. The sink wrote
    # two record batches (offsets 0..39 and 40..99) and announced the end Tansu's latest-offset lookup gives,
    # the last batch's first offset + 1: the datasource reads all 100 records and says why.
    data = f"{settings.kafka.topic_prefix}.data"
    await ensure_topics(settings.kafka, extra=[TopicSpec(data, 1, -1)])
    p = kio.producer(settings.kafka)
    await p.start()
    try:
        for first, n in ((0, 40), (40, 60)):
            batch = p.create_batch()
            for i in range(first, first + n):
                assert batch.append(key=bytes([i % 10]), value=bytes([i]) * 4, timestamp=None) is not None
            assert (await (await p.send_batch(batch, data, partition=0))).offset == first
        await p.send_and_wait(settings.kafka.control_topic, orjson.dumps(
            {"topic": f"{data}:0:0:41", "input_format": "RAW", "input_config": {"data_type": "uint8",
                                                                                "data_reshape": "2 2"},
             "deployment_id": dep1["id"]}))
    finally:
        await p.stop()

    async def announced() -> bool:
        return bool((await (await c.get(f"/datasources?deployment_id={dep1['id']}")).json())["total"] == 1)

    await wait_until(announced, what="the datasource")
    source = (await (await c.get(f"/datasources?deployment_id={dep1['id']}")).json())["items"][0]
    assert source == await (await c.get(f"/datasources/{source['id']}")).json()
    assert source["ranges"] == [{"topic": data, "partition": 0, "start": 0, "end": 100}], source
    assert source["announced_ranges"] == [{"topic": data, "partition": 0, "start": 0, "end": 41}]
    [reason] = source["range_reasons"]
    assert reason.startswith(f"{data}[0]: end 41 -> 100: the announced last record 40 is inside record batch 40..99")
    assert "latest-offset lookup answered the batch's first offset + 1" in reason
    assert source["warnings"] == []
    r = await c.post(f"/datasources/{source['id']}/send", json={"deployment_id": dep2["id"]}, headers=AUTH)
    assert r.status == 201
    copy = await r.json()
    assert copy["deployment_id"] == dep2["id"]
    assert {k: copy[k] for k in ("ranges", "announced_ranges", "range_reasons", "warnings")} == {
        k: source[k] for k in ("ranges", "announced_ranges", "range_reasons", "warnings")}
    assert copy["origin"] == {"datasource_id": source["id"]}
    r = await c.post(f"/datasources/{source['id']}/send", json={"deployment_id": 999}, headers=AUTH)
    assert r.status == 422 and (await r.json())["error"]["field"] == "deployment_id"


async def test_an_event_the_projector_cannot_apply_stops_it_and_readyz_says_why(infra: Infra) -> None:
    plane = await new_plane(infra, "broken")
    running = await start_plane(plane, shape_validate)
    try:
        async with TestClient(TestServer(create_app(plane)), headers=admin_headers(plane)) as c:
            # A bug elsewhere wrote an event whose payload the projector cannot apply.
            bad = Event(id="x", seq=1, type="ModelCreated", version=1, aggregate="model:1", aggregate_version=1,
                        command_id="6f1c1f7e-3c43-4d0b-9a55-7a8e5e0e3b12", occurred_at="2026-01-01T00:00:00Z",
                        payload={"id": 1})
            p = kio.producer(plane.kafka)
            await p.start()
            try:
                await p.send_and_wait(plane.kafka.events_topic, bad.encode())
            finally:
                await p.stop()

            async def not_ready() -> bool:
                r = await c.get("/readyz")
                return r.status == 503 and not (await r.json())["checks"]["projector"]["ok"]

            await wait_until(not_ready, what="/readyz to report the stopped projector")
            checks = (await (await c.get("/readyz")).json())["checks"]
            assert "seq 1" in checks["projector"]["error"] and "ModelCreated" in checks["projector"]["error"]
    finally:
        await stop_plane(running)
