"""Every writer of the control plane wakes the reader of what it wrote, so an idle reader's long wait
(`TIERFLOW_FETCH_IDLE_WAIT_MS`) never delays a write made through tierflow: the control bridge and the
orchestrator ring the decider in process after their commands; the API notifies the worker after a training
job's report, as it does after every other command."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import asyncpg
import orjson
from aiohttp.test_utils import TestClient, TestServer

from tests.conftest import admin_headers, start_plane, stop_plane, wait_until
from tests.integration.test_replay import shape_validate
from tierflow.api.app import create_app
from tierflow.projections.schema import COMMANDS_CHANNEL
from tierflow.streams import kafka as kio
from tierflow.streams.control import ControlBridge
from tierflow.streams.settings import Settings
from tierflow.streams.topics import TopicSpec, ensure_topics

#: An idle wait no test would sit out: a reader that saw the record within seconds was woken.
LONG_IDLE_MS = 120_000


async def test_the_control_bridge_rings_the_decider_after_its_announcement(plane: Settings) -> None:
    data = f"{plane.kafka.topic_prefix}.data"
    await ensure_topics(plane.kafka, extra=[TopicSpec(data, 1, -1)])
    p = kio.producer(plane.kafka)
    await p.start()
    rung = kio.Doorbell()
    listener = rung.listener()
    bridge = ControlBridge(plane.kafka, plane.database.url, commands_written=rung)
    stopping = asyncio.Event()
    task = asyncio.create_task(bridge.run(stopping))
    try:
        for i in range(4):
            await p.send_and_wait(data, bytes([i]) * 4, key=bytes([i]))
        await p.send_and_wait(plane.kafka.control_topic, orjson.dumps(
            {"topic": f"{data}:0:0:4", "input_format": "RAW", "deployment_id": 1}), key=bytes([1]))

        await wait_until(listener.is_set, what="the bridge's ring")
        assert bridge.bridged == 1
    finally:
        stopping.set()
        await asyncio.wait_for(task, 30)
        await p.stop()


async def test_a_training_report_through_the_api_notifies_the_worker(plane: Settings) -> None:
    settings = replace(plane, kafka=replace(plane.kafka, fetch_idle_wait_ms=LONG_IDLE_MS))
    running = await start_plane(settings, shape_validate)
    listen = await asyncpg.connect(settings.database.url)
    notified: list[str] = []
    await listen.add_listener(COMMANDS_CHANNEL, lambda *args: notified.append(args[2]))
    try:
        async with TestClient(TestServer(create_app(settings)), headers=admin_headers(settings)) as c:
            for path, body in (("/models", {"name": "single", "code": "# single"}),
                               ("/configurations", {"name": "c", "model_ids": [1]}),
                               ("/deployments", {"configuration_id": 1, "batch": 8})):
                r = await c.post(path, json=body)
                assert r.status == 201, await r.text()
            assert notified, "the API notifies the worker after each command"
            notified.clear()
            r = await c.post("/reports", json={"type": "ReportTrainingFailure", "payload": {
                "deployment_id": 1, "result_ids": [1], "reason": "out of memory"}})
            assert r.status == 202, await r.text()
            await wait_until(lambda: notified, what="the API's NOTIFY on the commands channel")

            # The worker's readers idle for two minutes; the report is decided and projected within seconds.
            async def failed() -> bool:
                body: dict[str, Any] = await (await c.get("/results/1")).json()
                return body["status"] == "failed"

            await wait_until(failed, timeout=20, what="the reported failure to be projected")
    finally:
        await listen.close()
        await stop_plane(running)
