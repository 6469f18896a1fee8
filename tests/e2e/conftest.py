"""The e2e plane shared by the e2e modules: a real broker and Postgres, the worker with the TensorFlow sandbox
and a local launcher, the API; the thesis chain (edge -> fog -> cloud) and single.py registered, and one
deployment of both trained on the digits (`trained`), made once per session.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.conftest import Infra, RunningPlane, admin_headers, new_plane, start_plane, stop_plane, wait_until
from tierflow.api.app import create_app
from tierflow.deploy.bootstrap import sandbox_validate
from tierflow.deploy.local_launcher import LocalLauncher
from tierflow.deploy.local_zygote import TierZygote
from tierflow.deploy.services import free_port
from tierflow.streams.settings import Settings
from tierflow.tiers.datasets import load_digits
from tierflow.tiers.sinks import RawSink


@dataclass
class Env:
    client: TestClient[Any, Any]
    settings: Settings
    launcher: LocalLauncher
    running: RunningPlane
    models: dict[str, int]


@pytest.fixture(scope="session")
async def env(infra: Infra, sandbox_pool: Any, snippets: dict[str, str]) -> AsyncIterator[Env]:
    home = Path(tempfile.mkdtemp(prefix="tierflow-train-e2e-", dir="/tmp"))
    settings = await new_plane(infra, "train")
    port = free_port()
    # The embedded stack's session timeout (deploy/stack_runtime.py): a tier's group join takes half of it.
    settings = replace(settings, api=replace(settings.api, url=f"http://127.0.0.1:{port}", command_timeout_s=60.0),
                       kafka=replace(settings.kafka, session_timeout_ms=2000),
                       workloads=replace(settings.workloads, artefacts_dir=str(home / "artefacts"),
                                         reconcile_s=0.5, max_training=2))
    workload_env = {**settings.to_env(), "PYTHONUNBUFFERED": "1"}
    # As the embedded stack's worker does (deploy/bootstrap.py): tiers are forked from the tier zygote.
    zygote = TierZygote.for_workloads(workload_env, home / "workloads", settings.workloads.tier_engine)
    launcher = LocalLauncher(home / "workloads", workload_env, zygote=zygote)
    running = await start_plane(settings, sandbox_validate(sandbox_pool), launcher)
    async with TestClient(TestServer(create_app(settings), port=port), headers=admin_headers(settings)) as c:
        models: dict[str, int] = {}
        for name, upper in (("cloud", None), ("fog", "cloud"), ("edge", "fog"), ("single", None)):
            body: dict[str, Any] = {"name": name, "code": snippets[name], "distributed": name != "single"}
            if upper:
                body["upper_id"] = models[upper]
            r = await c.post("/models", json=body)
            assert r.status == 201, await r.text()
            models[name] = (await r.json())["id"]
        yield Env(c, settings, launcher, running, models)
    await stop_plane(running)
    await launcher.stop_all()
    await launcher.close()


async def deploy(env: Env, model_ids: list[int], epochs: int) -> dict[str, Any]:
    c = env.client
    conf = await (await c.post("/configurations", json={"name": f"conf-{os.urandom(3).hex()}",
                                                       "model_ids": model_ids})).json()
    r = await c.post("/deployments", json={"configuration_id": conf["id"], "batch": 64,
                                          "fit_options": {"epochs": epochs}})
    assert r.status == 201, await r.text()
    return dict(await r.json())


async def results_of(env: Env, deployment_id: int) -> list[dict[str, Any]]:
    return list((await (await env.client.get(f"/deployments/{deployment_id}/results")).json())["items"])


async def wait_status(env: Env, deployment_id: int, statuses: set[str], timeout: float = 300) -> list[dict[str, Any]]:
    async def reached() -> bool:
        return all(r["status"] in statuses for r in await results_of(env, deployment_id))

    await wait_until(reached, timeout=timeout, what=f"results of deployment {deployment_id} in {statuses}")
    return await results_of(env, deployment_id)


@pytest.fixture(scope="session")
async def trained(env: Env) -> dict[str, Any]:
    """The thesis chain (chosen by its top model) and single.py, trained on the digits: 5 epochs, batch 64."""
    dep = await deploy(env, [env.models["cloud"], env.models["single"]], epochs=5)
    digits = load_digits(28)
    x = digits.x.astype(np.float32)
    if x.max() > 1.0:
        x = x / x.max()
    sink = RawSink(env.settings.kafka.bootstrap_servers, f"digits-{dep['id']}", dep["id"], data_reshape="28 28",
                   validation_rate=0.1, test_rate=0.1, control_topic=env.settings.kafka.control_topic)
    sink.send_many(x, digits.y.astype(np.uint8))
    sink.close()
    results = await wait_status(env, dep["id"], {"finished", "failed"})
    return {"deployment": dep, "results": results, "n": len(x), "x": x, "y": digits.y.astype(np.int64)}
