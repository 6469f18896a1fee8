"""Crash: `kill -9` the worker while 2,000+ commands stream in; after a restart nothing is decided twice
and the projections equal a fresh rebuild from the events log."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest
from aiokafka import TopicPartition

from tests.conftest import ARTIFACTS, Infra, new_plane, wait_until
from tests.integration.test_replay import dump
from tierflow.projections.rebuild import rebuild
from tierflow.streams import kafka as kio
from tierflow.streams.client import CommandClient
from tierflow.streams.envelope import Command, new_command_id
from tierflow.streams.settings import Settings

pytestmark = pytest.mark.slow


def start_worker(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, **settings.to_env(), "TIERFLOW_SANDBOX_POOL": "1"}
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "tierflow.deploy.cli", "worker"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


async def test_kill_9_worker_mid_stream(infra: Infra, snippets: dict[str, str]) -> None:
    plane = await new_plane(infra, "crash")
    plane = replace(plane, sandbox=replace(plane.sandbox, pool_size=1))
    log = ARTIFACTS / "crash-worker.log"
    worker = start_worker(plane, log)
    conn = await asyncpg.connect(plane.database.url)
    try:
        async with CommandClient(plane.kafka) as client:
            # Two real models (built in the worker's sandbox) for the configurations to use.
            top = await client.send("RegisterModel", {"name": "cloud", "code": snippets["cloud"], "distributed": True})
            assert (await client.wait(top, timeout=120)).type == "ModelCreated"
            single = await client.send("RegisterModel", {"name": "single", "code": snippets["single"]})
            assert (await client.wait(single, timeout=120)).type == "ModelCreated"

            commands: list[Command] = []
            for i in range(2400):
                if i % 3 == 2:
                    payload = {"configuration_id": 1 + i % 50, "batch": 32, "fit_options": {"epochs": 1}}
                    commands.append(Command(new_command_id(), "RequestDeployment", payload))
                else:
                    commands.append(Command(new_command_id(), "CreateConfiguration",
                                            {"name": f"c{i}", "model_ids": [1 + i % 2]}))
            # Some commands are re-sent (a client retry): still decided once.
            commands += commands[100:150]

            async def decided() -> int:
                return int(await conn.fetchval("SELECT count(*) FROM proj.command_outcomes"))

            killed = asyncio.Event()

            async def stream() -> None:
                # Paced in chunks, so the stream is still flowing when the kill lands. The second half waits
                # for the kill: a worker that has caught up decides a backlog in one batch of the decider and
                # one of the projector, so the outcomes can jump from under 600 to all of them between two
                # polls (it did: "2402 < 2402"), and a kill timed on the count alone may land after the end.
                for start in range(0, len(commands), 100):
                    if start >= 1200:
                        await killed.wait()
                    await client.send_many(commands[start:start + 100])
                    await asyncio.sleep(0.02)

            sender = asyncio.create_task(stream())
            # Kill the worker in the middle of the stream: while it decides the first half, before the second.
            await wait_until(lambda: _gt(decided, 600), timeout=120, what="600 outcomes before the kill")
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=30)
            killed.set()
            # The first half (1,200) and the two model registrations: the second half waits for the kill.
            assert await decided() <= 1202, "the kill should land mid-stream"
            await sender
            worker = start_worker(plane, log)
            await wait_until(lambda: _eq(decided, 2402), timeout=180, what="all 2,402 outcomes after the restart")
        # No command was decided twice: one event per command id on the events log.
        per_command = await events_per_command(plane)
        assert len(per_command) == 2402
        assert max(per_command.values()) == 1
        # The projections equal a fresh rebuild from offset 0.
        before = await dump(conn)
        await rebuild(plane)
        assert await dump(conn) == before
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=30)
        await conn.close()


async def _gt(fn: object, n: int) -> bool:
    return bool(await fn() > n)  # type: ignore[operator]


async def _eq(fn: object, n: int) -> bool:
    return bool(await fn() == n)  # type: ignore[operator]


async def events_per_command(settings: Settings) -> Counter[str]:
    from tierflow.streams.catalogue import upcasters
    from tierflow.streams.envelope import decode_event

    ups = upcasters()
    counts: Counter[str] = Counter()
    c = kio.consumer(settings.kafka)
    await c.start()
    try:
        tp = TopicPartition(settings.kafka.events_topic, 0)
        c.assign([tp])
        await c.seek_to_beginning(tp)
        hw = await kio.fetch_highwater(c, tp)
        while await c.position(tp) < hw:
            batch = await c.getmany(tp, timeout_ms=1000)
            for r in batch.get(tp, []):
                counts[decode_event(r.value, ups).command_id] += 1
    finally:
        await c.stop()
    return counts
