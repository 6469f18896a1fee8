"""The supervisor process of the embedded stack (`tierflow up` in the foreground, or detached by `up --detach`).

Called by deploy/stack.py (`up_foreground`). It resolves the broker and Postgres (external ones from
KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL, else a private Tansu and Postgres), prepares them (topics, schema, events
restored from the Postgres archive) before any agent runs, then starts the worker and the API, with a fresh admin
token and the stack's secret (created once in `<home>/secrets/`), and supervises all of them (deploy/supervisor.py)
until SIGINT/SIGTERM. While it runs, `<home>/stack.json` (mode 0600) says where everything is and holds the token
(streams/stack_state.py); `<home>/stack.lock` is held for its lifetime so that two `up` for one home never race.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from tierflow.deploy.services import (
    ChildSpec,
    ServiceError,
    choose_port,
    free_port,
    init_postgres,
    port_is_free,
    postgres_data_dir,
    postgres_spec,
    postgres_url,
    tansu_spec,
)
from tierflow.deploy.stack_processes import POLL_S, healthy, refuse_if_running, stack_lock, stop_signal, up_summary
from tierflow.deploy.supervisor import RestartPolicy, Supervisor
from tierflow.streams.settings import KafkaSettings, Settings
from tierflow.streams.stack_state import StackState, load_or_create_secret_key, stack_file, write_stack_state

log = logging.getLogger("tierflow.stack")

_PORT_DEADLINE_S = 30.0


async def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str,
                     deadline_s: float = _PORT_DEADLINE_S) -> None:
    deadline = time.monotonic() + deadline_s
    while True:
        if proc.poll() is not None:
            raise ServiceError(f"the {what} exited with code {proc.returncode} before accepting connections "
                               f"(see its log)")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise ServiceError(f"the {what} did not accept connections on 127.0.0.1:{port} "
                                   f"within {deadline_s:.0f} s (see its log)") from None
            await asyncio.sleep(0.05)  # polling interval of a condition with a deadline
            continue
        writer.close()
        await writer.wait_closed()
        return


async def _wait_healthy(api_url: str, proc: subprocess.Popen[bytes], deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while not await asyncio.to_thread(healthy, api_url, timeout_s=1.0):
        if proc.poll() is not None:
            raise ServiceError(f"the API exited with code {proc.returncode} before answering {api_url}/healthz "
                               "(see its log)")
        if time.monotonic() > deadline:
            raise ServiceError(f"the API did not answer {api_url}/healthz with 200 within {deadline_s:.0f} s "
                               "(see its log)")
        await asyncio.sleep(POLL_S)  # polling interval of a condition with a deadline


def _api_address(settings: Settings) -> tuple[int, str, str | None]:
    """The API port, its URL and a note when the wanted port was busy."""
    host = settings.api.host
    wanted = settings.api.port
    note = None
    if wanted == 0:
        port = free_port()
    elif port_is_free(wanted, host):
        port = wanted
    else:
        port = free_port()
        note = f"port {wanted} for the API is busy: the API uses {port} (set TIERFLOW_API_PORT to choose)"
    url_host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
    return port, f"http://{url_host}:{port}", note


#: The consumer-group session timeout of the embedded broker's clients (the tiers), unless one was set: a group
#: join takes half of it on Tansu, so the default's 6 s made every tier wait 3 s for its partitions. A real
#: Kafka refuses session timeouts below its group.min.session.timeout.ms (6 s by default): this is for the
#: embedded broker only. Not lower: a tier loading a Keras model stalls its event loop up to ~0.5 s.
EMBEDDED_SESSION_TIMEOUT_MS = 2000


def embedded_kafka(kafka: KafkaSettings) -> KafkaSettings:
    """The client settings for the embedded broker: its shorter session timeout unless another was chosen."""
    if kafka.session_timeout_ms != KafkaSettings().session_timeout_ms:
        return kafka
    return replace(kafka, session_timeout_ms=EMBEDDED_SESSION_TIMEOUT_MS)


class _Stack:
    """One run of the embedded stack inside the supervisor process."""

    def __init__(self, settings: Settings, home: Path, health_timeout_s: float) -> None:
        self.settings = settings
        self.home = home
        self.health_timeout_s = health_timeout_s
        self.supervisor = Supervisor(
            log_dir=home / "logs",
            policy=RestartPolicy(initial_s=settings.stack.restart_backoff_s),
            on_change=self._publish,
        )
        self.published = False
        self.prepared = False  # topics exist and the events are restored: a broker restart must redo it
        self.started_at = datetime.now(UTC)
        self.api_url = ""

    def _publish(self) -> None:
        """(Re)write stack.json once the stack is up, e.g. after a child restarted with a new pid."""
        if self.published:
            write_stack_state(self.home, self.state())

    async def _start_broker(self) -> str:
        port = choose_port(self.settings.stack.broker_port, "broker", "TIERFLOW_BROKER_PORT")
        print(f"starting the broker (Tansu, memory storage) on 127.0.0.1:{port} ...", flush=True)

        async def ready(proc: subprocess.Popen[bytes]) -> None:
            await _wait_port(port, proc, "broker")

        await self.supervisor.start(tansu_spec(port), ready=ready, on_restarted=self._after_broker_restart)
        return f"127.0.0.1:{port}"

    async def _after_broker_restart(self) -> None:
        """The restarted memory broker lost its log: restore it before the agents go on."""
        from tierflow.streams.archive import restore_events
        from tierflow.streams.topics import ensure_topics

        if not self.prepared:
            return  # still starting: `start` creates the topics and restores the events next
        await ensure_topics(self.settings.kafka)
        restored = await restore_events(self.settings)
        log.warning("the broker restarted with an empty log: restored %d events into %s; restarting the worker",
                    restored, self.settings.kafka.events_topic)
        if "worker" in self.supervisor:
            await self.supervisor.restart("worker")

    async def _start_postgres(self) -> str:
        from tierflow.deploy.postgres_auth import PostgresCredentials, credentials_file, secure_postgres

        data_dir = postgres_data_dir(self.home)
        # Passwords for every connection (deploy/postgres_auth.py); a data dir from before them is upgraded.
        creds = PostgresCredentials.load_or_create(credentials_file(self.home))
        await asyncio.to_thread(functools.partial(init_postgres, data_dir, superuser_password=creds.superuser_password))
        port = choose_port(self.settings.stack.postgres_port, "Postgres", "TIERFLOW_POSTGRES_PORT")
        print(f"starting Postgres on 127.0.0.1:{port} (data in {data_dir}) ...", flush=True)

        async def ready(proc: subprocess.Popen[bytes]) -> None:
            await _wait_port(port, proc, "Postgres")
            await secure_postgres(data_dir, port, creds)

        await self.supervisor.start(postgres_spec(data_dir, port), ready=ready, stop_signal=stop_signal("postgres"))
        return postgres_url(port, password=creds.password)

    async def start(self) -> None:
        from tierflow.projections.migrate import migrate
        from tierflow.streams.archive import restore_events
        from tierflow.streams.topics import ensure_topics

        external_broker = self.settings.kafka.bootstrap_servers
        bootstrap = external_broker or await self._start_broker()
        external_db = self.settings.database.url
        database_url = external_db or await self._start_postgres()
        api_port, self.api_url, note = _api_address(self.settings)
        if note:
            print(note, flush=True)
        settings = self.settings.with_endpoints(bootstrap_servers=bootstrap, database_url=database_url,
                                                api_url=self.api_url)
        # The admin token is new at every `up` (as Jupyter's): it reaches clients through stack.json (0600);
        # the secret outlives it in <home>/secrets, so the workload tokens it signed stay valid. Proofs on commands
        # (streams/proofs.py) use keys derived from the same secret.
        token = settings.api.token or secrets.token_urlsafe(32)
        secret_key = settings.security.secret_key or load_or_create_secret_key(self.home)
        if not external_broker:
            settings = replace(settings, kafka=embedded_kafka(settings.kafka))
        self.settings = replace(settings, api=replace(settings.api, port=api_port, token=token),
                                security=replace(settings.security, secret_key=secret_key),
                                stack=replace(settings.stack, home=self.home))

        print("creating topics and migrating the schema ...", flush=True)
        await ensure_topics(self.settings.kafka)
        await migrate(database_url)
        restored = await restore_events(self.settings)
        print(f"restored {restored} events from the Postgres archive into {self.settings.kafka.events_topic}",
              flush=True)
        self.prepared = True

        env = {**self.settings.to_env(), "PYTHONUNBUFFERED": "1"}
        entry = [sys.executable, "-m", "tierflow.deploy.cli"]
        await self.supervisor.start(ChildSpec(name="worker", argv=[*entry, "worker"], env=env))

        async def api_ready(proc: subprocess.Popen[bytes]) -> None:
            await _wait_healthy(self.api_url, proc, self.health_timeout_s)

        print(f"starting the worker and the API on {self.api_url} ...", flush=True)
        await self.supervisor.start(ChildSpec(name="api", argv=[*entry, "api"], env=env), ready=api_ready)

        self.published = True
        self._publish()
        print(up_summary(self.state(), external_broker=bool(external_broker), external_db=bool(external_db)),
              flush=True)
        print("supervising; press Ctrl-C (or run `tierflow down`) to stop", flush=True)

    def state(self) -> StackState:
        return StackState(pid=os.getpid(), api_url=self.api_url,
                          bootstrap_servers=self.settings.kafka.bootstrap_servers,
                          database_url=self.settings.database.url, home=self.home, started_at=self.started_at,
                          children=self.supervisor.pids(), token=self.settings.api.token)


async def _serve(settings: Settings, home: Path, health_timeout_s: float) -> int:
    """Start the stack and supervise it until SIGINT/SIGTERM; stop every child before returning."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stack = _Stack(settings, home, health_timeout_s)
    startup = asyncio.create_task(stack.start(), name="stack-start")
    stopped = asyncio.create_task(stop.wait(), name="stack-stop")
    code = 0
    try:
        await asyncio.wait({startup, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if startup.done():
            startup.result()  # raises what made the start-up fail
            await stopped
        else:
            print("interrupted while starting", flush=True)
    except ServiceError as exc:
        print(f"tierflow up: {exc}", file=sys.stderr, flush=True)
        code = 1
    except Exception as exc:
        log.exception("the stack failed to start")
        print(f"tierflow up: the stack failed to start: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        for task in (startup, stopped):
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        print("stopping the stack ...", flush=True)
        stack.published = False
        await stack.supervisor.stop()
        stack_file(home).unlink(missing_ok=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        print("stopped", flush=True)
    return code


def up_foreground(settings: Settings, home: Path, health_timeout_s: float) -> int:
    if refuse_if_running(home):
        return 1
    with stack_lock(home) as locked:
        if not locked:
            print(f"tierflow up: another `tierflow up` is starting or running for {home} "
                  f"(it holds {home / 'stack.lock'})", file=sys.stderr)
            return 1
        return asyncio.run(_serve(settings, home, health_timeout_s))
