"""Control-plane benchmark: commands/s (Kafka -> decided -> projected) and POST -> 201 latency at 50 req/s.

Run: `python benchmarks/control_plane.py [--commands 5000] [--rate 50] [--seconds 10]`

Starts its own Tansu broker and Postgres (as the embedded stack does), the worker and the API as separate
processes (`tierflow worker`, `tierflow api`, as in production), and measures from this process:
  1. throughput: N CreateConfiguration/RequestDeployment commands produced straight to tierflow.commands,
     until all N outcomes are projected; baseline: the same N records produced and consumed bare on the
     same broker (the broker's limit for this record size);
  2. latency: POST /configurations and POST /deployments paced at --rate requests/s, p50/p99 of the 201;
     baseline: a bare produce -> consume round trip on the same broker, paced the same.
Targets (issue 2, 2-core machine): >= 1,000 commands/s and p99 <= 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiokafka import TopicPartition

from tierflow.deploy import services
from tierflow.projections.schema import migrate
from tierflow.streams import kafka as kio
from tierflow.streams.client import CommandClient
from tierflow.streams.envelope import Command, new_command_id
from tierflow.streams.settings import Settings
from tierflow.streams.topics import TopicSpec, ensure_topics

SNIPPETS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "kafka_ml_models"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.01)


async def bare_throughput(settings: Settings, n: int, size: int) -> float:
    topic = "bench.bare"
    await ensure_topics(settings.kafka, extra=[TopicSpec(topic, 1, -1)])
    tp = TopicPartition(topic, 0)
    value = b"x" * size
    p = kio.producer(settings.kafka)
    c = kio.consumer(settings.kafka)
    await p.start()
    await c.start()
    try:
        c.assign([tp])
        await c.seek_to_end(tp)
        start_pos = await c.position(tp)
        started = time.perf_counter()
        futures = [await p.send(topic, value) for _ in range(n)]
        got = 0
        while got < n:
            batch = await c.getmany(tp, timeout_ms=100)
            got += len(batch.get(tp, []))
        await asyncio.gather(*futures)
        del start_pos
        return n / (time.perf_counter() - started)
    finally:
        await p.stop()
        await c.stop()


async def bare_latency(settings: Settings, rate: float, seconds: float) -> list[float]:
    topic = "bench.rtt"
    await ensure_topics(settings.kafka, extra=[TopicSpec(topic, 1, -1)])
    tp = TopicPartition(topic, 0)
    p = kio.producer(settings.kafka)
    c = kio.consumer(settings.kafka)
    await p.start()
    await c.start()
    out: list[float] = []
    try:
        c.assign([tp])
        await c.seek_to_end(tp)
        await c.position(tp)
        for _ in range(int(rate * seconds)):
            t0 = time.perf_counter()
            await p.send_and_wait(topic, b"ping")
            while not (await c.getmany(tp, timeout_ms=100)).get(tp):
                pass
            out.append(time.perf_counter() - t0)
            await asyncio.sleep(max(0.0, 1 / rate - (time.perf_counter() - t0)))
        return out
    finally:
        await p.stop()
        await c.stop()


async def paced_posts(api: str, token: str, path: str, bodies: list[dict[str, Any]], rate: float) -> list[float]:
    latencies: list[float] = []
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as s:
        async def one(body: dict[str, Any]) -> None:
            t0 = time.perf_counter()
            async with s.post(f"{api}{path}", json=body) as r:
                await r.read()
                if r.status != 201:
                    raise RuntimeError(f"POST {path} answered {r.status}: {await r.text()}")
            latencies.append(time.perf_counter() - t0)

        tasks = []
        start = time.perf_counter()
        for i, body in enumerate(bodies):
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(body)))
        await asyncio.gather(*tasks)
    return latencies


async def main(args: argparse.Namespace) -> None:
    home = Path(tempfile.mkdtemp(prefix="tierflow-bench-", dir="/tmp"))
    home.chmod(0o755)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        broker_port, pg_port, api_port = services.free_port(), services.free_port(), services.free_port()
        procs.append(services.spawn(services.tansu_spec(broker_port), home / "tansu.log"))
        services.wait_for_port(broker_port, deadline_s=20, proc=procs[-1], what="broker")
        services.init_postgres(home / "pg")
        procs.append(services.spawn(services.postgres_spec(home / "pg", pg_port), home / "pg.log"))
        services.wait_for_port(pg_port, deadline_s=20, proc=procs[-1], what="postgres")
        services.ensure_database(pg_port)
        # A token, as `tierflow up` makes one: the API refuses to start without.
        token = secrets.token_urlsafe(24)
        settings = Settings.from_env({"TIERFLOW_SANDBOX_POOL": "1", "TIERFLOW_API_PORT": str(api_port),
                                      "TIERFLOW_API_TOKEN": token, "TIERFLOW_SECRET_KEY": secrets.token_hex(32)})
        settings = settings.with_endpoints(bootstrap_servers=f"127.0.0.1:{broker_port}",
                                           database_url=services.postgres_url(pg_port))
        await ensure_topics(settings.kafka)
        await migrate(settings.database.url)
        env = {**os.environ, **settings.to_env()}
        for role in ("worker", "api"):
            procs.append(subprocess.Popen([sys.executable, "-m", "tierflow.deploy.cli", role], env=env,
                                          stdout=(home / f"{role}.log").open("wb"), stderr=subprocess.STDOUT,
                                          start_new_session=True))
        services.wait_for_port(api_port, deadline_s=60, proc=procs[-1], what="api")
        api = f"http://127.0.0.1:{api_port}"
        conn = await asyncpg.connect(settings.database.url)

        # Setup: one real model (built in the worker's sandbox) for the configurations to use.
        body = {"name": "single", "code": (SNIPPETS / "single.py").read_text()}
        headers = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession(headers=headers) as s, s.post(f"{api}/models", json=body,
                                                        timeout=aiohttp.ClientTimeout(total=120)) as r:
            assert r.status in (201, 202), await r.text()
        await wait_for(lambda: _count(conn, "models", 1), 120, "the model")

        # 1. Throughput: commands produced straight to Kafka until all are projected.
        n = args.commands
        cmds = [Command(new_command_id(), "CreateConfiguration", {"name": f"c{i}", "model_ids": [1]})
                if i % 2 == 0 else
                Command(new_command_id(), "RequestDeployment", {"configuration_id": 1, "batch": 32,
                                                                "fit_options": {"epochs": 1}})
                for i in range(n)]
        size = len(cmds[0].encode())
        baseline_tput = await bare_throughput(settings, n, size)
        before = int(await conn.fetchval("SELECT count(*) FROM proj.command_outcomes"))
        async with CommandClient(settings.kafka) as client:
            t0 = time.perf_counter()
            await client.send_many(cmds)
            await wait_for(lambda: _outcomes(conn, before + n), 300, "all outcomes")
            elapsed = time.perf_counter() - t0
        tput = n / elapsed
        print(f"throughput: {n} commands decided+projected in {elapsed:.2f} s = {tput:,.0f} commands/s "
              f"(target >= 1,000)")
        print(f"  baseline bare produce->consume of {n} records of {size} B: {baseline_tput:,.0f} records/s; "
              f"ratio {tput / baseline_tput:.2f}")

        # 2. Latency of POST -> 201 at a steady rate.
        count = int(args.rate * args.seconds)
        base_rtt = await bare_latency(settings, args.rate, min(args.seconds, 5))
        conf_lat = await paced_posts(api, token, "/configurations",
                                     [{"name": f"p{i}", "model_ids": [1]} for i in range(count)], args.rate)
        dep_lat = await paced_posts(api, token, "/deployments",
                                    [{"configuration_id": 1, "batch": 16, "fit_options": {"epochs": 2}}
                                     for _ in range(count)], args.rate)
        for name, lat in (("POST /configurations", conf_lat), ("POST /deployments", dep_lat)):
            print(f"latency {name} at {args.rate:g}/s, {len(lat)} requests: p50 {pct(lat, .5) * 1000:.1f} ms, "
                  f"p99 {pct(lat, .99) * 1000:.1f} ms, max {max(lat) * 1000:.1f} ms (target p99 <= 100 ms)")
        print(f"  baseline bare produce->consume round trip: p50 {pct(base_rtt, .5) * 1000:.1f} ms, "
              f"p99 {pct(base_rtt, .99) * 1000:.1f} ms; POST p50 / bare p50 = "
              f"{statistics.median(conf_lat + dep_lat) / pct(base_rtt, .5):.1f}x")
        await conn.close()
    finally:
        for p in reversed(procs):
            services.stop(p)
        shutil.rmtree(home, ignore_errors=True)


async def _count(conn: asyncpg.Connection, table: str, n: int) -> bool:
    return bool(await conn.fetchval(f"SELECT count(*) FROM proj.{table}") >= n)


async def _outcomes(conn: asyncpg.Connection, n: int) -> bool:
    return bool(await conn.fetchval("SELECT count(*) FROM proj.command_outcomes") >= n)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commands", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    asyncio.run(main(parser.parse_args()))
