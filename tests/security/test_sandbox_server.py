"""The validation sandbox as a service (cluster mode): only the worker, with the token, gets validations, and the
worker's client gives the validator what a local pool would, with the isolation in force.

The server runs a real pool at the `landlock` level (what a `restricted` pod allows), as the sandbox
Deployment does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer

from tests.fixtures import model_code
from tierflow.deploy.bootstrap import sandbox_validate
from tierflow.streams.settings import SandboxSettings, Settings
from tierflow.tiers.sandbox import SandboxPool
from tierflow.tiers.sandbox_server import RemoteSandbox, create_app

pytestmark = pytest.mark.slow

TOKEN = "sandbox-channel-token-0123456789"


@pytest.fixture(scope="module")
async def server() -> AsyncIterator[tuple[TestServer, SandboxSettings]]:
    settings = replace(Settings.from_env({"TIERFLOW_SANDBOX_ISOLATION": "landlock",
                                          "TIERFLOW_SANDBOX_TOKEN": TOKEN}).sandbox, pool_size=1)
    async with SandboxPool(settings) as pool:
        await pool.wait_warm(180)
        async with TestServer(create_app(settings, pool)) as test_server:
            yield test_server, replace(settings, url=str(test_server.make_url("")))


def test_the_server_refuses_to_start_without_a_token() -> None:
    settings = Settings.from_env({}).sandbox
    with pytest.raises(ValueError, match="TIERFLOW_SANDBOX_TOKEN"):
        create_app(settings, SandboxPool(settings))


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token"}, {"Authorization": TOKEN}],
                         ids=["none", "wrong", "not-bearer"])
async def test_a_validation_without_the_token_is_refused(server: tuple[TestServer, SandboxSettings],
                                                         headers: dict[str, str]) -> None:
    test_server, _ = server
    async with ClientSession() as session:
        for method, path in (("POST", "/validate"), ("GET", "/isolation")):
            async with session.request(method, test_server.make_url(path), headers=headers,
                                       json={"code": model_code("fog"), "imports": ""}) as resp:
                assert resp.status == 401, (method, path)


async def test_a_form_post_is_refused(server: tuple[TestServer, SandboxSettings]) -> None:
    test_server, _ = server
    async with ClientSession() as session, session.post(
            test_server.make_url("/validate"), data=model_code("fog"),
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "text/plain"}) as resp:
        assert resp.status == 415


async def test_the_worker_gets_verdicts_and_the_isolation_through_its_client(
        server: tuple[TestServer, SandboxSettings]) -> None:
    _, settings = server
    async with RemoteSandbox(settings) as remote:
        verdicts = sandbox_validate(remote)

        fine = await verdicts(model_code("fog"), "")
        broken = await verdicts("model = keras.Sequential([keras.layers.Dense(units_typo)])\n", "")

        assert fine == {"ok": True, "summary": {"input_shape": [None, 64], "output_shapes": [[None, 64], [None, 10]],
                                                "params": 4810}}
        assert broken["ok"] is False and "units_typo" in broken["error"]
        assert "stopped building" not in broken["error"]  # the code's fault, not the sandbox's
        isolation = verdicts.isolation  # type: ignore[attr-defined]
        assert isolation["level"] == "landlock" and isolation["network"].startswith("none")
        assert isolation["server"] == settings.url.rstrip("/")


async def test_health_and_readiness_need_no_token(server: tuple[TestServer, SandboxSettings]) -> None:
    test_server, _ = server
    async with ClientSession() as session:
        async with session.get(test_server.make_url("/healthz")) as resp:
            assert resp.status == 200
        async with session.get(test_server.make_url("/readyz")) as resp:
            assert resp.status in (200, 503)
            assert (await resp.json())["isolation"]["level"] == "landlock"
