"""Session fixtures: one real Tansu broker and one real Postgres for the whole test session.

Integration and e2e tests get an isolated control plane each (`plane`): their own topic prefix on the
shared broker and their own database on the shared Postgres, so tests never see each other's events.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiokafka import ConsumerRecord, TopicPartition

from tests.fixtures import all_model_code
from tierflow.deploy import services
from tierflow.streams import kafka as kio
from tierflow.streams.client import CommandClient
from tierflow.streams.envelope import Command
from tierflow.streams.proofs import ENTITLED, Signer
from tierflow.streams.settings import KafkaSettings, Settings

REPO = Path(__file__).resolve().parents[1]
#: The admin token and the stack secret of every test plane (`new_plane`), as `tierflow up` would generate them.
TEST_TOKEN = "test-admin-token"
TEST_SECRET = "test-stack-secret-" + "0123456789abcdef" * 3
ARTIFACTS = REPO / "test-artifacts"


@dataclass(frozen=True)
class Infra:
    bootstrap_servers: str
    postgres_port: int

    def admin_url(self) -> str:
        return services.postgres_url(self.postgres_port, "postgres")


@pytest.fixture(scope="session")
def infra() -> Iterator[Infra]:
    ARTIFACTS.mkdir(exist_ok=True)
    broker_port = services.free_port()
    broker = services.spawn(services.tansu_spec(broker_port), ARTIFACTS / "tansu.log")
    pg_root = Path(tempfile.mkdtemp(prefix="tierflow-test-pg-", dir="/tmp"))
    pg_root.chmod(0o755)
    data_dir = pg_root / "data"
    pg_port = services.free_port()
    pg: subprocess.Popen[bytes] | None = None
    try:
        services.wait_for_port(broker_port, deadline_s=20, proc=broker, what="Tansu broker")
        services.init_postgres(data_dir, superuser_password=None)  # trust: throwaway test databases only
        pg = services.spawn(services.postgres_spec(data_dir, pg_port), ARTIFACTS / "postgres.log")
        services.wait_for_port(pg_port, deadline_s=30, proc=pg, what="Postgres")
        services.ensure_database(pg_port)
        yield Infra(f"127.0.0.1:{broker_port}", pg_port)
    finally:
        services.stop(broker)
        if pg is not None:
            services.stop(pg)
        shutil.rmtree(pg_root, ignore_errors=True)


async def new_plane(infra: Infra, name: str = "t") -> Settings:
    """Fresh topics (unique prefix) and a fresh database, with topics created and the schema migrated."""
    from tierflow.projections.schema import migrate
    from tierflow.streams.topics import ensure_topics

    suffix = uuid.uuid4().hex[:10]
    db = f"{name}_{suffix}"
    conn = await asyncpg.connect(infra.admin_url())
    try:
        await conn.execute(f'CREATE DATABASE "{db}"')
    finally:
        await conn.close()
    # TEST_SECRET: the keys the plane's agents and API sign and check workload tokens and proofs with.
    base = Settings.from_env({"TIERFLOW_API_TOKEN": TEST_TOKEN, "TIERFLOW_SECRET_KEY": TEST_SECRET})
    settings = base.with_endpoints(
        bootstrap_servers=infra.bootstrap_servers, database_url=services.postgres_url(infra.postgres_port, db)
    )
    settings = replace(settings, kafka=replace(settings.kafka, topic_prefix=f"{name}-{suffix}",
                                               control_topic=f"{name}-{suffix}.control"))
    await ensure_topics(settings.kafka)
    await migrate(settings.database.url)
    return settings


class StackClient(CommandClient):
    """A commands client that plays the stack's components: each command only a component may send (a training
    report) carries the proof of one entitled to it (streams/proofs.py), as the API or the worker would sign it.
    For tests that drive training by hand; tests/security shows what happens without the proofs."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings.kafka, source="test-components")
        self.secret_key = settings.security.secret_key

    def _signed(self, cmd: Command) -> Command:
        who = ENTITLED.get(cmd.type)
        return cmd if who is None else Signer.from_secret(self.secret_key, sorted(who)[0]).sign(cmd)


def admin_headers(settings: Settings) -> dict[str, str]:
    """What a client of the API built from `settings` sends to be the admin (tests' clients send it always)."""
    return {"Authorization": f"Bearer {settings.api.token}"}


@pytest.fixture
async def plane(infra: Infra) -> Settings:
    return await new_plane(infra)


async def wait_until(predicate: object, *, timeout: float = 20.0, interval: float = 0.02,
                     what: str = "condition") -> None:
    """Poll an (async or sync) predicate until it is true or the deadline passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()  # type: ignore[operator]
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


@pytest.fixture(scope="session")
def snippets() -> dict[str, str]:
    """The Kafka-ML style model code in tests/fixtures (a missing file fails the test, never `{}`)."""
    return all_model_code()


async def run_in_background(coro: object) -> AsyncIterator[asyncio.Task[None]]:
    task: asyncio.Task[None] = asyncio.ensure_future(coro)  # type: ignore[arg-type]
    try:
        yield task
    finally:
        task.cancel()


@pytest.fixture(scope="session")
async def sandbox_pool() -> AsyncIterator[object]:
    """One warm sandbox pool for the session: the TensorFlow import is paid once per sandbox, not per test."""
    from tierflow.tiers.sandbox import SandboxPool

    settings = Settings.from_env({}).sandbox
    pool = SandboxPool(replace(settings, pool_size=2, timeout_s=60.0))
    await pool.start()
    await pool.wait_warm(120)
    try:
        yield pool
    finally:
        await pool.close()


@dataclass
class RunningPlane:
    settings: Settings
    worker: object
    task: asyncio.Task[None]


async def start_plane(settings: Settings, validate: object, launcher: object = None) -> RunningPlane:
    from tierflow.streams.worker import Worker

    worker = Worker(settings, validate=validate, launcher=launcher,  # type: ignore[arg-type]
                    workload_env={**settings.workload_env(), "PYTHONUNBUFFERED": "1"})
    task = asyncio.create_task(worker.run())
    await wait_until(lambda: worker.decider.ready.is_set() or task.done(), what="decider ready")
    if task.done():
        task.result()
    return RunningPlane(settings, worker, task)


async def stop_plane(running: RunningPlane) -> None:
    running.worker.stop()  # type: ignore[attr-defined]
    await asyncio.wait_for(running.task, 30)


async def deploy_single_model(kafka: KafkaSettings, deployments: int = 1) -> None:
    """Model 1 (`# single`), configuration 1 and `deployments` deployments of it: what an announcement needs."""
    async with CommandClient(kafka) as client:
        for type_, payload, expected in [
                ("RegisterModel", {"name": "single", "code": "# single"}, "ModelCreated"),
                ("CreateConfiguration", {"name": "c", "model_ids": [1]}, "ConfigurationCreated"),
                *[("RequestDeployment", {"configuration_id": 1, "batch": 8}, "DeploymentRequested")] * deployments]:
            event = await client.wait(await client.send(type_, payload))
            assert event.type == expected, (event.type, event.payload)


async def topic_records(kafka: KafkaSettings, topic: str, *, at_least: int | None = None,
                        timeout: float = 20.0) -> list[ConsumerRecord[bytes, bytes]]:
    """The records of partition 0 of `topic` from its start: those up to its high-water mark now, or (with
    `at_least`) as many as have come once there are at least that many."""
    tp = TopicPartition(topic, 0)
    c = kio.consumer(kafka)
    await c.start()
    out: list[ConsumerRecord[bytes, bytes]] = []
    try:
        c.assign([tp])
        await c.seek_to_beginning(tp)
        if at_least is None:
            hw = await kio.fetch_highwater(c, tp)
            while await c.position(tp) < hw:
                out.extend((await c.getmany(tp, timeout_ms=1000)).get(tp, []))
        else:
            async def collected() -> bool:
                out.extend((await c.getmany(tp, timeout_ms=200)).get(tp, []))
                return len(out) >= at_least

            await wait_until(collected, timeout=timeout, what=f"{at_least} records on {topic}")
    finally:
        await c.stop()
    return out


async def write_answers(settings: Settings, topic: str, tiers: list[int], *, latency_step_ms: float = 1.0,
                        padding: int = 0) -> None:
    """Answers on an output topic as the tier agents write them (Kafka-ML's `values` plus tierflow's fields):
    the i-th answered by tier `tiers[i]` with class i % 10 at confidence 0.91; `padding` bytes of note each."""
    p = kio.producer(settings.kafka)
    await p.start()
    try:
        for i, tier in enumerate(tiers):
            values = [0.01] * 10
            values[i % 10] = 0.91
            answer: dict[str, Any] = {
                "values": values, "tier": tier, "class": i % 10, "confidence": 0.91,
                "latency_ms": 4.0 + latency_step_ms * tier, "origin": {"topic": "in", "partition": 0, "offset": i,
                                                                       "index": 0}}
            if padding:
                answer["note"] = "x" * padding
            await p.send_and_wait(topic, orjson.dumps(answer))
    finally:
        await p.stop()


async def dead_letters(kafka: KafkaSettings, *, at_least: int | None = None,
                       timeout: float = 20.0) -> list[dict[str, Any]]:
    """The dead letters, parsed (see `topic_records` for `at_least`)."""
    return [orjson.loads(r.value) for r in await topic_records(kafka, kafka.deadletter_topic, at_least=at_least,
                                                                 timeout=timeout)]


# -- time budget per test layer --------------------------------------------------------------------------
#: Seconds each layer may take on the 2-core CI machine (setup, call and teardown of its tests, session
#: fixtures included where a layer starts them), so that `.ci/run` stays under 25 minutes. A layer over its
#: budget fails the session: a slow test is found when it lands, not when CI times out.
#: (security grew with issue 9's integrity tests: proofs, poison input, agent health, Postgres auth, Kafka ACLs,
#: ~130 s on a busy machine; integration, ~210 s, gives it the minute, so the sum is unchanged.)
LAYER_BUDGET_S = {"unit": 60.0, "security": 180.0, "integration": 540.0, "e2e": 420.0, "browser": 180.0}
_layer_seconds: dict[str, float] = {}


def _layer(nodeid: str) -> str:
    parts = nodeid.split("/")
    return parts[1] if len(parts) > 2 and parts[0] == "tests" else "other"


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    layer = _layer(report.nodeid)
    _layer_seconds[layer] = _layer_seconds.get(layer, 0.0) + report.duration


def _over_budget() -> list[str]:
    return [f"{layer} {seconds:.0f} s > {LAYER_BUDGET_S[layer]:.0f} s" for layer, seconds in _layer_seconds.items()
            if layer in LAYER_BUDGET_S and seconds > LAYER_BUDGET_S[layer]]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _layer_seconds:
        return
    terminalreporter.section("time per test layer (budget)")
    for layer, seconds in sorted(_layer_seconds.items()):
        budget = LAYER_BUDGET_S.get(layer)
        mark = "" if budget is None else f" / {budget:.0f} s" + ("  OVER BUDGET" if seconds > budget else "")
        terminalreporter.write_line(f"{layer:<12} {seconds:7.1f} s{mark}")
    if _over_budget():
        over = "; ".join(_over_budget())
        terminalreporter.write_line(f"a layer over its time budget fails a whole-suite run: {over}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Only for whole-suite runs: a single slow test run alone is not a layer.
    if _over_budget() and exitstatus == 0 and session.testscollected > 300:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
