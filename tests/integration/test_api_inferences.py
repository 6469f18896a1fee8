"""Inferences through the API: chains from any entry, limits, tiers on other clusters, the rules around them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.conftest import Infra, StackClient, admin_headers, new_plane, start_plane, stop_plane, wait_until
from tests.integration.test_replay import shape_validate
from tierflow.api.app import create_app
from tierflow.streams.settings import Settings


@pytest.fixture(scope="module")
async def env(infra: Infra) -> AsyncIterator[tuple[TestClient[Any, Any], Settings, dict[str, Any]]]:
    settings = await new_plane(infra, "infer")
    running = await start_plane(settings, shape_validate)
    async with TestClient(TestServer(create_app(settings)), headers=admin_headers(settings)) as c:
        top = await (await c.post("/models", json={"name": "top", "code": "# top", "distributed": True})).json()
        mid = await (await c.post("/models", json={"name": "mid", "code": "# mid", "distributed": True,
                                                   "upper_id": top["id"]})).json()
        conf = await (await c.post("/configurations", json={"name": "c", "model_ids": [top["id"]]})).json()
        dep = await (await c.post("/deployments", json={"configuration_id": conf["id"], "batch": 8})).json()
        results = {r["model_id"]: r["id"] for r in (await (await c.get(f"/deployments/{dep['id']}/results")).json())
                   ["items"]}
        ids = {"deployment": dep["id"], "mid": results[mid["id"]], "top": results[top["id"]]}
        yield c, settings, ids
    await stop_plane(running)


async def finish(settings: Settings, result_ids: list[int]) -> None:
    async with StackClient(settings) as client:  # the workloads' reports, vouched for as the API does
        for rid in result_ids:
            event = await client.wait(await client.send("ReportTrainingResult", {
                "result_id": rid, "metrics": {}, "artefacts": {"keras": {"sha256": "a" * 64, "size": 1}}}))
            assert event.type == "TrainingResultReported"


async def test_inference_rules_and_shapes(env: tuple[TestClient[Any, Any], Settings, dict[str, Any]]) -> None:
    c, settings, ids = env
    body = {"result_id": ids["mid"], "input_topic": "in", "output_topic": "out"}
    # Only finished results can be served.
    r = await c.post("/inferences", json=body)
    assert r.status == 409 and "not" in (await r.json())["error"]["message"]
    await finish(settings, [ids["mid"], ids["top"]])

    async def both_finished() -> bool:
        items = (await (await c.get(f"/deployments/{ids['deployment']}/results")).json())["items"]
        return all(i["status"] == "finished" for i in items)

    await wait_until(both_finished, what="finished results")
    # Field errors name the field.
    for bad, field in ((body | {"input_topic": ""}, "input_topic"), (body | {"limit": 3}, "limit"),
                       (body | {"replicas": 0}, "replicas"), (body | {"limits": {"999": 0.5}}, "limits"),
                       (body | {"tiers": [{"result_id": 999}]}, "tiers[0].result_id")):
        r = await c.post("/inferences", json=bad)
        assert r.status == 422, bad
        assert (await r.json())["error"]["field"] == field
    # The entry's chain from there up: two tiers, the upper topic named automatically, per-tier overrides.
    r = await c.post("/inferences", json=body | {"limit": 0.7, "replicas": 2, "tiers": [
        {"result_id": ids["top"], "bootstrap_servers": "fog-cluster:9092", "replicas": 1}]})
    assert r.status == 201, await r.text()
    inf = await r.json()
    assert inf["status"] == "running" and inf["result_id"] == ids["mid"]
    t0, t1 = inf["tiers"]
    assert (t0["index"], t0["model_name"], t0["input_topic"], t0["limit"], t0["replicas"]) == (0, "mid", "in", 0.7, 2)
    assert t0["upper_topic"] == t1["input_topic"] == f"tierflow.inference.{inf['id']}.tier1"
    assert (t1["model_name"], t1["upper_topic"], t1["bootstrap_servers"], t1["replicas"]) == \
        ("top", None, "fog-cluster:9092", 1)
    assert inf["tiers"][0]["bootstrap_servers"] is None
    # A mid-chain entry serves only the chain above it.
    mid_entry = await (await c.post("/inferences", json={"result_id": ids["top"], "input_topic": "t-in",
                                                         "output_topic": "t-out"})).json()
    assert [t["model_name"] for t in mid_entry["tiers"]] == ["top"]
    # Its tier keeps the level of its model in the chain (placement: the top model's nodes, not the edge's).
    assert [(t["index"], t["level"]) for t in inf["tiers"]] == [(0, 0), (1, 1)]
    assert [(t["index"], t["level"]) for t in mid_entry["tiers"]] == [(0, 1)]
    listed = await (await c.get("/inferences")).json()
    assert listed["total"] == 2
    # A deployment whose results an inference serves cannot be deleted, a served result neither.
    r = await c.delete(f"/deployments/{ids['deployment']}")
    assert r.status == 409 and str(inf["id"]) in (await r.json())["error"]["message"]
    assert (await c.delete(f"/results/{ids['mid']}")).status == 409
    # Stop, then delete; predictions of an inference with no output yet are empty, stats say so.
    r = await c.post(f"/inferences/{inf['id']}/stop")
    assert r.status == 200 and (await r.json())["status"] == "stopped"
    assert (await c.post(f"/inferences/{inf['id']}/stop")).status == 409
    preds = await (await c.get(f"/inferences/{inf['id']}/predictions")).json()
    assert preds["items"] == []
    stats = await (await c.get(f"/inferences/{mid_entry['id']}/stats")).json()
    assert stats["window"] == 0 and [t["model_name"] for t in stats["tiers"]] == ["top"]
    for ident in (inf["id"], mid_entry["id"]):
        assert (await c.delete(f"/inferences/{ident}")).status == 200
    assert (await c.get(f"/inferences/{inf['id']}")).status == 404
    assert (await c.delete(f"/deployments/{ids['deployment']}")).status == 200
