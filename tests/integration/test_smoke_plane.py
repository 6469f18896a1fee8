"""Smoke: commands produced straight to Kafka are decided, projected, and read back from Postgres."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace

import asyncpg

from tests.conftest import Infra, new_plane, start_plane, stop_plane, wait_until
from tierflow.streams.client import CommandClient
from tierflow.streams.settings import Settings
from tierflow.streams.worker import Worker


async def fake_validate(code: str, imports: str) -> dict[str, object]:
    return {"ok": True, "summary": {"input_shape": [None, 4], "output_shapes": [[None, 3]], "params": 15}}


async def test_command_to_projection(plane: Settings) -> None:
    worker = Worker(plane, validate=fake_validate)
    task = asyncio.create_task(worker.run())
    client = CommandClient(plane.kafka)
    await client.start()
    try:
        ids = [await client.send("RegisterModel", {"name": f"m{i}", "code": "x"}) for i in range(3)]
        conn = await asyncpg.connect(plane.database.url)
        try:
            async def done() -> bool:
                n = await conn.fetchval(
                    "SELECT count(*) FROM proj.command_outcomes WHERE command_id = ANY($1::uuid[])", ids
                )
                return bool(n == 3)
            await wait_until(done, what="3 outcomes")
            names = [r["name"] for r in await conn.fetch("SELECT name FROM proj.models ORDER BY id")]
            assert names == ["m0", "m1", "m2"]
        finally:
            await conn.close()
    finally:
        await client.stop()
        worker.stop()
        await asyncio.wait_for(task, 30)


async def test_a_worker_on_a_fresh_cluster_creates_the_control_plane_topics(infra: Infra) -> None:
    # A cluster deployment runs `tierflow worker` against a Kafka nobody prepared (no `tierflow up`).
    from aiokafka.admin import AIOKafkaAdminClient

    prepared = await new_plane(infra, "fresh")
    settings = replace(prepared, kafka=replace(prepared.kafka, topic_prefix=f"fresh-{uuid.uuid4().hex[:8]}"))
    running = await start_plane(settings, fake_validate)
    try:
        admin = AIOKafkaAdminClient(bootstrap_servers=infra.bootstrap_servers)
        await admin.start()
        try:
            topics = set(await admin.list_topics())
        finally:
            await admin.close()
        k = settings.kafka
        assert {k.commands_topic, k.events_topic, k.deadletter_topic} <= topics
    finally:
        await stop_plane(running)
