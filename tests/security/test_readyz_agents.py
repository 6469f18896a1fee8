"""Attack: an agent that fails over and over while `/readyz` stays green.

The worker restarts a failing agent (decider, validator, control bridge, orchestrator, projector) with backoff,
forever. While it does, nothing it owns moves: a model waits for a validator that crashes on every command, a
write answers 202 for minutes, and `/readyz` said "ready" all along (it looked at Postgres, the broker and the
projector only), so neither an operator nor Kubernetes could tell.

Defence: the worker's supervisor records each agent's state, last error and restarts in Postgres
(`public.agent_health`, streams/health.py, with a heartbeat); `/readyz` answers 503 naming the failing agent and
its error, and turns ready again once the agent runs again. `/readyz?scope=api`, the API pods' readiness probe,
checks the API's own connections only, so a failing agent never takes the API (where training workloads report)
out of its Service. `/readyz` also shows the sandbox isolation in force (the validator's row).
"""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from tests.conftest import admin_headers, start_plane, stop_plane, wait_until
from tierflow.api.app import create_app
from tierflow.streams.client import CommandClient
from tierflow.streams.settings import Settings

SINGLE = {"input_shape": [None, 28, 28], "output_shapes": [[None, 10]], "params": 7850}


class Sandbox:
    """The validator's port, broken until repaired (as a sandbox pool whose isolation tool went missing). Like
    deploy/bootstrap.py's verdicts, it says which isolation is in force (`isolation`)."""

    def __init__(self) -> None:
        self.broken = True
        self.isolation = {"level": "bwrap", "tool": "/usr/bin/bwrap", "network": "none (own namespace)"}

    async def __call__(self, code: str, imports: str) -> dict[str, Any]:
        if self.broken:
            raise RuntimeError("the sandbox pool is gone: no isolation tool")
        return {"ok": True, "summary": SINGLE}


async def test_readyz_names_a_failing_agent_and_recovers(plane: Settings) -> None:
    sandbox = Sandbox()
    running = await start_plane(plane, sandbox)
    try:
        async with TestClient(TestServer(create_app(plane))) as c, CommandClient(plane.kafka) as client:
            cid = await client.send("RegisterModel", {"name": "waits", "code": "# single"})

            async def validator_reported() -> bool:
                r = await c.get("/readyz")
                agents = (await r.json())["checks"].get("agents", {})
                return r.status == 503 and not agents.get("validator", {"ok": True})["ok"]

            await wait_until(validator_reported, timeout=20, what="/readyz to report the failing validator")
            body = await (await c.get("/readyz")).json()
            validator = body["checks"]["agents"]["validator"]
            assert validator["state"] == "failing", validator
            assert "RuntimeError: the sandbox pool is gone" in validator["error"], validator
            assert validator["restarts"] >= 1
            # The other agents are fine, and say so.
            assert body["checks"]["agents"]["decider"]["ok"], body
            # The API itself is fine: its own readiness (the API pods' probe) does not hang on the worker's
            # agents, so training workloads can still reach it to report.
            own = await c.get("/readyz?scope=api")
            assert own.status == 200, await own.text()
            assert set((await own.json())["checks"]) == {"postgres", "broker"}
            assert (await c.get("/readyz?scope=everything")).status == 422

            # Repaired: the validator runs again, the model is decided, /readyz is green again.
            sandbox.broken = False
            assert (await client.wait(cid, timeout=60)).type == "ModelCreated"

            async def ready() -> bool:
                return (await c.get("/readyz")).status == 200

            await wait_until(ready, timeout=30, what="/readyz ready again")
            body = await (await c.get("/readyz")).json()
            agents = body["checks"]["agents"]
            assert agents["validator"]["ok"] and agents["validator"]["error"] is None, agents
            # The isolation model code runs under, as the worker's validator reports it.
            assert body["sandbox"] == sandbox.isolation, body
    finally:
        await stop_plane(running)


async def test_readyz_says_when_the_worker_stopped_reporting(plane: Settings) -> None:
    # A worker that was killed (or hangs) leaves its last rows behind: once they are older than STALE_S,
    # /readyz stops trusting them.
    import asyncpg

    conn = await asyncpg.connect(plane.database.url)
    try:
        await conn.execute("INSERT INTO public.agent_health (agent, state, restarts, updated_at) "
                           "VALUES ('decider', 'running', 0, now() - interval '1 hour')")
    finally:
        await conn.close()
    async with TestClient(TestServer(create_app(plane))) as c:
        r = await c.get("/readyz")
        decider = (await r.json())["checks"]["agents"]["decider"]
        assert r.status == 503 and not decider["ok"], decider
        assert "no report from the worker for 3600 s" in decider["error"], decider
        metrics = await (await c.get("/metrics", headers=admin_headers(plane))).text()
        assert 'tierflow_agent_up{agent="decider"} 0.0' in metrics


async def test_a_worker_without_the_stacks_secret_fails_closed_and_says_why(plane: Settings) -> None:
    # Without TIERFLOW_SECRET_KEY the decider could check no proof and the validator sign no verdict: they do
    # not run (rather than believe nothing, or everything), and /readyz says what to do.
    import asyncio
    from dataclasses import replace

    from tierflow.streams.worker import Worker

    keyless = replace(plane, security=replace(plane.security, secret_key=""))
    worker = Worker(keyless, validate=Sandbox())
    task = asyncio.create_task(worker.run())
    try:
        # The API has the secret (it would refuse to start without it: api/auth.py); the worker lacks it.
        async with TestClient(TestServer(create_app(plane))) as c:
            async def both_reported() -> bool:
                agents = (await (await c.get("/readyz")).json())["checks"].get("agents", {})
                return all(not agents.get(name, {"ok": True})["ok"] for name in ("decider", "validator"))

            await wait_until(both_reported, timeout=20, what="/readyz to report the decider and the validator")
            r = await c.get("/readyz")
            agents = (await r.json())["checks"]["agents"]
            assert r.status == 503
            for name in ("decider", "validator"):
                assert "MissingSecret: TIERFLOW_SECRET_KEY must hold at least 32 characters" in agents[name]["error"]
            assert agents["projector"]["ok"] and agents["control-bridge"]["ok"]
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)
