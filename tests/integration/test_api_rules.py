"""Every domain rule through the HTTP API, each with a rejected and an accepted case.

A real worker (decider, validator with real TensorFlow sandboxes, projector) runs against the session's
Tansu broker and Postgres; the API is the real aiohttp app on a local port.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.conftest import Infra, admin_headers, new_plane, start_plane, stop_plane
from tierflow.api.app import create_app
from tierflow.deploy.bootstrap import sandbox_validate

pytestmark = pytest.mark.slow

TOP_WITH_TWO_OUTPUTS = """
i = keras.Input(shape=64)
h = keras.layers.Dense(8)(i)
o = keras.layers.Dense(10, activation='softmax')(h)
bad_top = keras.Model(inputs=i, outputs=[h, o])
"""
SMALL_TENSOR_EDGE = """
i = keras.Input(shape=(28, 28))
f = keras.layers.Flatten()(i)
t = keras.layers.Dense(32, activation='relu')(f)
o = keras.layers.Dense(10, activation='softmax')(t)
narrow_edge = keras.Model(inputs=i, outputs=[t, o])
"""
ONE_OUTPUT = """
i = keras.Input(shape=(28, 28))
o = keras.layers.Dense(10, activation='softmax')(keras.layers.Flatten()(i))
one = keras.Model(inputs=i, outputs=o)
"""


@pytest.fixture(scope="module")
async def client(infra: Infra, sandbox_pool: Any) -> AsyncIterator[TestClient[Any, Any]]:
    settings = await new_plane(infra, "api")
    # Model writes wait for a sandbox build; on a loaded 2-core CI machine that can pass the default 10 s.
    settings = replace(settings, api=replace(settings.api, command_timeout_s=60.0))
    running = await start_plane(settings, sandbox_validate(sandbox_pool))
    app = create_app(settings)
    async with TestClient(TestServer(app), headers=admin_headers(settings)) as c:
        yield c
    await stop_plane(running)


async def post(c: TestClient[Any, Any], path: str, body: dict[str, Any], status: int) -> dict[str, Any]:
    r = await c.post(path, json=body)
    data: dict[str, Any] = await r.json()
    assert r.status == status, data
    return data


def assert_error(data: dict[str, Any], field: str | None, *words: str) -> None:
    err = data["error"]
    assert err["field"] == field, err
    for w in words:
        assert w in err["message"], err


async def test_model_rules(client: TestClient[Any, Any], snippets: dict[str, str]) -> None:
    c = client
    # The thesis chain registers top-down, each lower model naming its upper.
    cloud = await post(c, "/models", {"name": "cloud", "code": snippets["cloud"], "distributed": True}, 201)
    assert cloud["input_shape"] == [None, 64] and cloud["output_shapes"] == [[None, 10]]
    assert cloud["version"] == 1 and cloud["params"] > 0
    fog = await post(c, "/models", {"name": "fog", "code": snippets["fog"], "distributed": True,
                                    "upper_id": cloud["id"]}, 201)
    edge = await post(c, "/models", {"name": "edge", "code": snippets["edge"], "distributed": True,
                                     "upper_id": fog["id"]}, 201)
    assert edge["input_shape"] == [None, 28, 28, 1]
    single = await post(c, "/models", {"name": "single", "code": snippets["single"]}, 201)
    assert single["distributed"] is False and single["upper_id"] is None
    got = await (await c.get(f"/models/{fog['id']}")).json()
    assert got["upper_id"] == cloud["id"] and got["lower_id"] == edge["id"]

    # Name: unique, 1..64 characters; code required and must build.
    assert_error(await post(c, "/models", {"name": "fog", "code": snippets["fog"]}, 409), "name", "already exists")
    assert_error(await post(c, "/models", {"name": "x" * 65, "code": snippets["fog"]}, 422), "name", "64")
    assert_error(await post(c, "/models", {"name": "", "code": snippets["fog"]}, 422), "name")
    assert_error(await post(c, "/models", {"name": "nocode"}, 422), "code", "required")
    bad = await post(c, "/models", {"name": "broken", "code": "x = keras.layers.Dense(\n"}, 422)
    assert_error(bad, "code", "does not build")
    nomodel = await post(c, "/models", {"name": "nomodel", "code": "x = 1"}, 422)
    assert_error(nomodel, "code")

    # upper_id must exist, be distributed, not be itself, form no cycle, and have no other lower model.
    assert_error(await post(c, "/models", {"name": "orphan", "code": snippets["fog"], "distributed": True,
                                           "upper_id": 999}, 422), "upper_id", "999")
    assert_error(await post(c, "/models", {"name": "on-single", "code": snippets["fog"], "distributed": True,
                                           "upper_id": single["id"]}, 422), "upper_id", "not distributed")
    assert_error(await post(c, "/models", {"name": "fog2", "code": snippets["fog"], "distributed": True,
                                           "upper_id": cloud["id"]}, 422), "upper_id", "already has lower")
    r = await c.put(f"/models/{fog['id']}", json={"upper_id": fog["id"]})
    assert r.status == 422
    assert_error(await r.json(), "upper_id", "own upper")
    r = await c.put(f"/models/{cloud['id']}", json={"upper_id": edge["id"]})
    assert r.status == 422, await r.text()

    # Chain shapes: two outputs below a top, one at the top, tensor shape equals the upper's input.
    assert_error(await post(c, "/models", {"name": "bad-top", "code": TOP_WITH_TWO_OUTPUTS, "distributed": True},
                            422), "code", "one output")
    narrow_top = await post(c, "/models", {"name": "cloud2", "code": snippets["cloud"], "distributed": True}, 201)
    assert_error(await post(c, "/models", {"name": "narrow", "code": SMALL_TENSOR_EDGE, "distributed": True,
                                           "upper_id": narrow_top["id"]}, 422), "upper_id", "(None, 32)", "(None, 64)")
    assert_error(await post(c, "/models", {"name": "one-out", "code": ONE_OUTPUT, "distributed": True,
                                           "upper_id": narrow_top["id"]}, 422), "code", "two outputs")
    assert_error(await post(c, "/models", {"name": "up-nd", "code": snippets["single"], "upper_id": cloud["id"]},
                            422), "upper_id", "distributed")

    # Optimistic concurrency on updates.
    r = await c.put(f"/models/{single['id']}", json={"description": "v2", "expected_version": 7})
    assert r.status == 409
    assert_error(await r.json(), "expected_version", "version 1")
    r = await c.put(f"/models/{single['id']}", json={"description": "v2", "expected_version": 1})
    assert r.status == 200
    assert (await r.json())["version"] == 2

    # Listing with the distributed filter.
    listed = await (await c.get("/models?distributed=true")).json()
    assert {m["name"] for m in listed["items"]} == {"cloud", "fog", "edge", "cloud2"}
    assert listed["total"] == 4

    # Configurations: >= 1 existing model; choosing the top brings the whole lower chain.
    assert_error(await post(c, "/configurations", {"name": "empty", "model_ids": []}, 422), "model_ids")
    assert_error(await post(c, "/configurations", {"name": "ghost", "model_ids": [999]}, 422), "model_ids", "999")
    conf = await post(c, "/configurations", {"name": "thesis", "model_ids": [cloud["id"], single["id"]]}, 201)
    assert conf["model_ids"] == [edge["id"], fog["id"], cloud["id"], single["id"]]

    # A configured model keeps its upper_id; a configured model cannot be deleted.
    r = await c.put(f"/models/{fog['id']}", json={"upper_id": None})
    assert r.status == 409
    assert_error(await r.json(), "upper_id", "thesis")
    r = await c.delete(f"/models/{single['id']}")
    assert r.status == 409
    assert_error(await r.json(), "id", "thesis")
    r = await c.delete(f"/models/{narrow_top['id']}")
    assert r.status == 200 and (await r.json())["deleted"] is True
    assert (await c.get(f"/models/{narrow_top['id']}")).status == 404

    # Deployments: existing configuration, batch >= 1, structured fit/eval options with allowed keys only.
    base = {"configuration_id": conf["id"], "batch": 64, "fit_options": {"epochs": 5}}
    assert_error(await post(c, "/deployments", base | {"batch": 0}, 422), "batch")
    assert_error(await post(c, "/deployments", base | {"configuration_id": 999}, 422), "configuration_id")
    assert_error(await post(c, "/deployments", base | {"fit_options": {"epochs": 5, "x": [1]}}, 422),
                 "fit_options.x", "x")
    assert_error(await post(c, "/deployments", base | {"fit_options": "{'epochs': 5}"}, 422), "fit_options",
                 "never evaluated")
    assert_error(await post(c, "/deployments", base | {"eval_options": {"callbacks": []}}, 422),
                 "eval_options.callbacks")
    assert_error(await post(c, "/deployments", base | {"loss_weights": [1.0, 0.5]}, 422), "loss_weights", "3 exits")
    assert_error(await post(c, "/deployments", base | {"seed": -1}, 422), "seed", "[0, 2147483648)")
    dep = await post(c, "/deployments", base | {"optimizer": "adam", "learning_rate": 0.001,
                                                "loss_weights": {str(edge["id"]): 1.0}, "seed": 7}, 201)
    assert len(dep["result_ids"]) == 4
    assert dep["seed"] == 7  # what its training job reads: a reproducible training
    assert dep["model_versions"] == {str(edge["id"]): 1, str(fog["id"]): 1, str(cloud["id"]): 1,
                                     str(single["id"]): 2}
    results = await (await c.get(f"/deployments/{dep['id']}/results")).json()
    assert results["total"] == 4 and {r["status"] for r in results["items"]} == {"created"}
    assert (await (await c.get(f"/results/{dep['result_ids'][0]}")).json())["model_id"] == edge["id"]

    # Later edits do not change what a deployment trains: it pinned the versions.
    r = await c.put(f"/models/{single['id']}", json={"description": "v3"})
    assert r.status == 200
    again = await (await c.get(f"/deployments/{dep['id']}")).json()
    assert again["model_versions"][str(single["id"])] == 2

    # A configuration used by a deployment cannot be deleted; the error lists the deployments.
    r = await c.delete(f"/configurations/{conf['id']}")
    assert r.status == 409
    assert_error(await r.json(), "id", str(dep["id"]))
    assert (await c.delete(f"/deployments/{dep['id']}")).status == 200
    assert (await c.get(f"/deployments/{dep['id']}")).status == 404
    assert (await c.get(f"/results/{dep['result_ids'][0]}")).status == 404
    assert (await c.delete(f"/configurations/{conf['id']}")).status == 200
    assert (await c.delete(f"/models/{single['id']}")).status == 200
    # An upper model with a lower model cannot be deleted; bottom-up works.
    assert (await c.delete(f"/models/{fog['id']}")).status == 409
    for m in (edge, fog, cloud):
        assert (await c.delete(f"/models/{m['id']}")).status == 200
