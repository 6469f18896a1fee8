"""Attacks on the API's resources, and their defences (issue 9, item 5 "bounded resources").

- **An id outside the database's range** (`GET /models/3000000000`) reached Postgres as an int4 argument and
  answered 500; negative, non-numeric and non-ASCII-digit ids must be 404 too, on every route with an id.
  Defence: `api/routes.py: path_id` accepts ASCII digits up to the projections' int4 range only.
- **Each `/predictions` and `/stats` call opened new Kafka clients** (an admin client and a consumer for the
  outputs, two more per tier for its backlog), and expanded a window of up to 100,000 records per partition.
  A page that polls, or a script in a loop, made the API connect and disconnect endlessly. Defence: one shared
  reader per API process (`api/outputs.py: OutputReader`): long-lived clients per cluster, a short TTL cache,
  and windows bounded in records and bytes.
- **The outcome listener died with its Postgres connection**: after a Postgres restart (here: its backend
  terminated, as a restart does) no notification woke a waiting write again, so every later write answered
  202 after the command timeout although its command was decided. Defence: the listener reconnects
  (`api/outcomes.py`) and re-checks what it may have missed.
- **Nothing ever removed an artefact**: blobs of failed or deleted results and uploads never reported filled
  the disk. Defence: the API collects blobs no result references once they are older than a grace period
  (`api/artefacts.py`), never an upload in flight.
"""

from __future__ import annotations

import hashlib
import os
import time
import traceback
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.conftest import (
    Infra,
    RunningPlane,
    StackClient,
    new_plane,
    start_plane,
    stop_plane,
    wait_until,
    write_answers,
)
from tests.integration.test_replay import shape_validate
from tierflow.api.app import create_app
from tierflow.api.state import STATE_KEY
from tierflow.streams import kafka as kio
from tierflow.streams.settings import Settings
from tierflow.streams.topics import TopicSpec, ensure_topics

TOKEN = "bounded-resources-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: Ids the projections (int4 columns) can never hold, and path segments that are not ids at all.
BAD_IDS = ["3000000000", "2147483648", "99999999999999999999999", "-1", "0", "abc", "1e3", "1.0", " 7",
           "\u0663", "1_000"]
GRACE_S = 600.0


@dataclass
class Env:
    client: TestClient[Any, Any]
    settings: Settings
    plane: RunningPlane
    artefacts: Path


@pytest.fixture(scope="module")
async def env(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    settings = await new_plane(infra, "bounded")
    artefacts = tmp_path_factory.mktemp("artefacts")
    settings = replace(settings, api=replace(settings.api, token=TOKEN, command_timeout_s=10.0),
                       workloads=replace(settings.workloads, artefacts_dir=str(artefacts)))
    running = await start_plane(settings, shape_validate)
    async with TestClient(TestServer(create_app(settings)), headers=AUTH) as c:
        yield Env(c, settings, running, artefacts)
    await stop_plane(running)


async def post(c: TestClient[Any, Any], path: str, body: dict[str, Any], status: int = 201) -> dict[str, Any]:
    r = await c.post(path, json=body)
    assert r.status == status, f"{path}: {r.status} {await r.text()}"
    found: dict[str, Any] = await r.json()
    return found


async def finish(settings: Settings, artefacts: dict[int, str]) -> None:
    """What a training workload reports at the end (vouched for by the API): each result finished with its Keras
    artefact."""
    async with StackClient(settings) as client:
        for rid, sha in artefacts.items():
            event = await client.wait(await client.send("ReportTrainingResult", {
                "result_id": rid, "metrics": {}, "artefacts": {"keras": {"sha256": sha, "size": 1}}}))
            assert event.type == "TrainingResultReported", event.payload


async def deployment(c: TestClient[Any, Any], name: str) -> list[int]:
    """A two-model chain registered, configured and deployed; its result ids (edge first)."""
    top = await post(c, "/models", {"name": f"{name}-top", "code": "# top", "distributed": True})
    mid = await post(c, "/models", {"name": f"{name}-mid", "code": "# mid", "distributed": True,
                                    "upper_id": top["id"]})
    conf = await post(c, "/configurations", {"name": name, "model_ids": [top["id"]]})
    dep = await post(c, "/deployments", {"configuration_id": conf["id"], "batch": 8})
    results = (await (await c.get(f"/deployments/{dep['id']}/results")).json())["items"]
    by_model = {r["model_id"]: r["id"] for r in results}
    return [by_model[mid["id"]], by_model[top["id"]]]


async def finished(c: TestClient[Any, Any], result_ids: list[int]) -> None:
    async def done() -> bool:
        for rid in result_ids:
            if (await (await c.get(f"/results/{rid}")).json())["status"] != "finished":
                return False
        return True

    await wait_until(done, what=f"results {result_ids} finished")


# --- ids outside the database's range ----------------------------------------------------------------------

def routes_with_ids(c: TestClient[Any, Any]) -> Iterator[tuple[str, str]]:
    """(method, path template) of every route whose path holds an integer id."""
    for resource in c.server.app.router.resources():
        template = resource.get_info().get("formatter")
        if not template or "{id}" not in template:
            continue
        for route in resource:
            if route.method != "HEAD":
                yield route.method, template


async def test_an_id_outside_the_databases_range_is_a_404_on_every_route(env: Env) -> None:
    c = env.client
    await post(c, "/models", {"name": "exists", "code": "# single"})
    checked = []
    for method, template in routes_with_ids(c):
        for bad in BAD_IDS:
            for path in {template.replace("{id}", bad).replace("{version}", "1"),
                         template.replace("{id}", "1").replace("{version}", bad)}:
                if path == template.replace("{id}", "1").replace("{version}", "1"):
                    continue
                r = await c.request(method, path, json={} if method in ("POST", "PUT") else None)
                text = await r.text()
                assert r.status == 404, f"{method} {path!r}: {r.status} {text}"
                assert orjson.loads(text)["error"]["code"] == "not_found", text
                checked.append((method, path))
    assert len({m for m, _ in checked}) >= 3 and len(checked) > 100, checked
    # A query filter naming an id that cannot exist matches nothing (a malformed one is a field error).
    r = await c.get("/datasources?deployment_id=3000000000")
    assert r.status == 200 and (await r.json())["items"] == [], await r.text()
    r = await c.get("/datasources?deployment_id=abc")
    assert r.status == 422 and (await r.json())["error"]["field"] == "deployment_id"


# --- /predictions and /stats: one shared reader, bounded windows -------------------------------------------

@pytest.fixture
def kafka_clients(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every Kafka client (aiokafka's AIOKafkaClient: each producer, consumer and admin client has one) that
    the API's code constructs from now on, as the API frame that made it."""
    from aiokafka.client import AIOKafkaClient

    made: list[str] = []
    original = AIOKafkaClient.__init__

    def counting(self: Any, *args: Any, **kwargs: Any) -> None:
        api_frames = [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack() if "/api/" in f.filename]
        if api_frames:
            made.append(api_frames[-1])
        original(self, *args, **kwargs)

    monkeypatch.setattr(AIOKafkaClient, "__init__", counting)
    return made


async def test_stats_and_predictions_share_one_reader_and_stay_correct(env: Env, kafka_clients: list[str]) -> None:
    c = env.client
    edge, top = await deployment(c, "reader")
    await finish(env.settings, {edge: "1" * 64, top: "2" * 64})
    await finished(c, [edge, top])
    prefix = env.settings.kafka.topic_prefix
    out = f"{prefix}-reader-out"
    inference = await post(c, "/inferences", {"result_id": edge, "input_topic": f"{prefix}-reader-in",
                                              "output_topic": out})
    ident = inference["id"]
    # The topics the orchestrator would create (no launcher runs here): two output partitions.
    await ensure_topics(env.settings.kafka, extra=[TopicSpec(out, 2, -1)] + [
        TopicSpec(t["input_topic"], 1, -1) for t in inference["tiers"]])
    await write_answers(env.settings, out, [0] * 6 + [1] * 4)

    async def stats() -> dict[str, Any]:
        r = await c.get(f"/inferences/{ident}/stats")
        assert r.status == 200, await r.text()
        body: dict[str, Any] = await r.json()
        return body

    first = await stats()  # the first read may open the shared clients
    assert first["window"] == 10 and [t["answered"] for t in first["tiers"]] == [6, 4], first
    assert first["unreachable"] == [] and [t["lag"] for t in first["tiers"]] == [0, 0], first
    opened = len(kafka_clients)
    for _ in range(5):
        body = await stats()
        assert body["window"] == 10
        r = await c.get(f"/inferences/{ident}/predictions?limit=7")
        assert r.status == 200 and len((await r.json())["items"]) == 7
    assert kafka_clients[opened:] == [], f"{len(kafka_clients) - opened} Kafka clients opened by 10 requests"
    # New answers are seen once the cache's short TTL passes, still without a new client.
    await write_answers(env.settings, out, [1] * 5)

    async def fresh() -> bool:
        return bool((await stats())["window"] == 15)

    await wait_until(fresh, timeout=10, what="stats to show the new answers")
    assert [t["answered"] for t in (await stats())["tiers"]] == [6, 9]
    assert kafka_clients[opened:] == [], kafka_clients[opened:]


async def test_windows_are_bounded(env: Env) -> None:
    c = env.client
    # The windows a request may ask for have a maximum.
    inferences = (await (await c.get("/inferences")).json())["items"]
    ident = inferences[0]["id"] if inferences else 1
    for path in (f"/inferences/{ident}/predictions?limit=1001", f"/inferences/{ident}/stats?limit=10001",
                 f"/inferences/{ident}/predictions?limit=0"):
        r = await c.get(path)
        assert r.status == 422 and (await r.json())["error"]["field"] == "limit", path
    # Bytes: 40 answers of ~20 kB each on one partition; a reader allowed 100 kB keeps only the newest.
    from tierflow.api.outputs import OutputReader

    topic = f"{env.settings.kafka.topic_prefix}-bytes"
    missing = f"{env.settings.kafka.topic_prefix}-missing"
    await ensure_topics(env.settings.kafka, extra=[TopicSpec(topic, 1, -1)])
    await write_answers(env.settings, topic, list(range(40)), padding=20_000)
    reader = OutputReader(env.settings.kafka, ttl_s=0.0, window_bytes=100_000)
    try:
        samples = await reader.latest(env.settings.kafka.bootstrap_servers, topic, 1000)
        assert 1 <= len(samples) <= 5, len(samples)
        assert [s["tier"] for s in samples] == list(range(39, 39 - len(samples), -1))  # the newest, newest first
        # Records: a window of 3 answers reads 3, newest first.
        assert [s["tier"] for s in await reader.latest(env.settings.kafka.bootstrap_servers, topic, 3)] == \
            [39, 38, 37]
        # A topic that does not exist is not created by asking for it.
        assert await reader.latest(env.settings.kafka.bootstrap_servers, missing, 10) == []
        assert await reader.lag(env.settings.kafka.bootstrap_servers, "g", missing) is None
        # A group that never committed is behind by everything the topic holds.
        assert await reader.lag(env.settings.kafka.bootstrap_servers, "never-committed", topic) == 40
    finally:
        await reader.close()
    admin = kio.consumer(env.settings.kafka)
    await admin.start()
    try:
        assert missing not in await admin.topics()
    finally:
        await admin.stop()


# --- the outcome listener survives its connection ----------------------------------------------------------

# (The worker listens too, for the API's commands: its connection is named, and not the API's.)
LISTENER = ("application_name = 'tierflow-api-outcomes' OR (query ILIKE 'LISTEN%' AND application_name NOT LIKE "
            "'tierflow-worker%')")


async def terminate(env: Env, where: str) -> int:
    """Terminate the backends of the test's database that `where` selects, as a Postgres restart would."""
    conn = await asyncpg.connect(env.settings.database.url)
    try:
        killed = await conn.fetch(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                                  f"datname = current_database() AND pid <> pg_backend_pid() AND ({where})")
    finally:
        await conn.close()
    return len(killed)


async def test_a_write_still_gets_its_outcome_after_the_listener_lost_its_connection(env: Env) -> None:
    c = env.client
    model = (await post(c, "/models", {"name": "listened", "code": "# single"}))["id"]
    await post(c, "/configurations", {"name": "before", "model_ids": [model]})
    # The listener's backend (before the defence it had no name; its last statement was the LISTEN).
    assert await terminate(env, LISTENER) == 1
    started = time.monotonic()
    await post(c, "/configurations", {"name": "after-listener", "model_ids": [model]})  # 201, not 202 after 10 s
    assert time.monotonic() - started < 8
    # Every connection of the API at once (the pool's too), as a Postgres restart does.
    assert await terminate(env, "application_name LIKE 'tierflow-api%'") >= 2
    await post(c, "/configurations", {"name": "after-restart", "model_ids": [model]})
    await wait_until(lambda: _listening(env), what="the listener back")
    assert c.server.app[STATE_KEY].outcomes.reconnects >= 2


async def _listening(env: Env) -> bool:
    conn = await asyncpg.connect(env.settings.database.url)
    try:
        n = await conn.fetchval(f"SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                f"AND ({LISTENER})")
    finally:
        await conn.close()
    return bool(n == 1)


# --- unreferenced artefacts are collected -------------------------------------------------------------------

def blob(directory: Path, data: bytes, age_s: float) -> str:
    """A stored artefact as a finished upload leaves it, last written `age_s` seconds ago."""
    sha = hashlib.sha256(data).hexdigest()
    path = directory / sha[:2] / sha
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return sha


def stored(directory: Path) -> set[str]:
    return {p.name for p in directory.glob("*/*") if p.is_file()}


async def single(c: TestClient[Any, Any], name: str) -> int:
    """A one-model deployment; its result id."""
    model = await post(c, "/models", {"name": name, "code": "# single"})
    conf = await post(c, "/configurations", {"name": name, "model_ids": [model["id"]]})
    dep = await post(c, "/deployments", {"configuration_id": conf["id"], "batch": 8})
    rid: int = dep["result_ids"][0]
    return rid


async def test_unreferenced_artefacts_are_collected_after_the_grace_period(env: Env) -> None:
    from tierflow.api.collector import collect_artefacts

    c = env.client
    store = env.artefacts
    old = GRACE_S * 2
    # A chain whose results finished: their artefacts are referenced.
    edge, top = await deployment(c, "gc-chain")
    kept = {edge: blob(store, b"the edge model", old), top: blob(store, b"the cloud model", old)}
    # A result that finished and was deleted: its artefact is not referenced any more.
    deleted = await single(c, "gc-deleted")
    of_deleted = blob(store, b"a deleted result's model", old)
    await finish(env.settings, kept | {deleted: of_deleted})
    await finished(c, [edge, top, deleted])
    assert (await c.delete(f"/results/{deleted}")).status == 200
    # Uploads no report names: one from a workload that failed before reporting, one a moment ago (its
    # report may be on the way), one still being written, one left half-written by an API that crashed.
    never_reported = blob(store, b"uploaded by a workload that failed before reporting", old)
    fresh = blob(store, b"uploaded a moment ago; its report is on the way", 1)
    in_flight = store / ".upload-inflight"
    in_flight.write_bytes(b"half an upload")
    crashed = store / ".upload-crashed"
    crashed.write_bytes(b"left by an API that crashed mid-upload")
    os.utime(crashed, (time.time() - old, time.time() - old))

    state = c.server.app[STATE_KEY]
    report = await collect_artefacts(state, grace_s=GRACE_S)
    assert report.skipped is None, report
    assert stored(store) == {*kept.values(), fresh}, report
    assert of_deleted not in stored(store) and never_reported not in stored(store)
    assert in_flight.exists() and not crashed.exists()
    assert (report.removed, report.freed_bytes) == (2, len(b"a deleted result's model") +
                                                    len(b"uploaded by a workload that failed before reporting"))
    r = await c.get(f"/results/{edge}/model")
    assert r.status == 200 and await r.read() == b"the edge model"
    # The chain's deployment deleted: its results go, and their artefacts with them.
    dep = (await (await c.get(f"/results/{edge}")).json())["deployment_id"]
    assert (await c.delete(f"/deployments/{dep}")).status == 200
    await collect_artefacts(state, grace_s=GRACE_S)
    assert stored(store) == {fresh}
    assert (await c.get(f"/artefacts/{kept[edge]}")).status == 404


async def test_the_api_collects_on_its_own(env: Env, tmp_path: Path) -> None:
    # An API whose grace period is one second collects every second, with no call from outside.
    store = tmp_path / "artefacts"
    settings = replace(env.settings, workloads=replace(env.settings.workloads, artefacts_dir=str(store),
                                                       artefact_grace_s=1.0))
    orphan = blob(store, b"an upload no report names", 60)
    async with TestClient(TestServer(create_app(settings)), headers=AUTH):
        await wait_until(lambda: orphan not in stored(store), timeout=15, what="the orphan collected")


def test_an_upload_landing_during_a_collection_is_kept(tmp_path: Path) -> None:
    from tierflow.api.artefacts import ArtefactStore, unreferenced

    store = ArtefactStore(tmp_path)
    sha = blob(tmp_path, b"old bytes, uploaded again right now", GRACE_S * 2)
    cutoff = time.time() - GRACE_S
    [listed] = unreferenced(store.blobs(), set(), cutoff)  # the collection lists it as old and unreferenced...
    blob(tmp_path, b"old bytes, uploaded again right now", 0)  # ...then an upload renames a fresh copy into place
    assert not store.remove_if_stale(listed, cutoff)
    assert stored(tmp_path) == {sha} and not list(tmp_path.glob(".collect-*"))
    # Referenced blobs and fresh ones are never listed; old unreferenced ones are.
    old = blob(tmp_path, b"old and unreferenced", GRACE_S * 2)
    kept = blob(tmp_path, b"old and referenced", GRACE_S * 2)
    assert [b.sha256 for b in unreferenced(store.blobs(), {kept}, cutoff)] == [old]


def test_a_collection_interrupted_after_its_rename_is_finished_by_the_next(tmp_path: Path) -> None:
    from tierflow.api.artefacts import ArtefactStore

    store = ArtefactStore(tmp_path)
    fresh = hashlib.sha256(b"re-uploaded while the collection stopped").hexdigest()
    (tmp_path / f".collect-{fresh}-0000").write_bytes(b"re-uploaded while the collection stopped")
    doomed = tmp_path / f".collect-{'e' * 64}-0000"
    doomed.write_bytes(b"old and unreferenced")
    os.utime(doomed, (time.time() - GRACE_S * 2, time.time() - GRACE_S * 2))
    report = store.collect(set(), time.time() - GRACE_S)
    assert stored(tmp_path) == {fresh} and not doomed.exists() and report.removed == 0
