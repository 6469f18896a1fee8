"""The control-plane worker process (`tierflow worker`): decider, validator and projector agents.

Started by the embedded stack's supervisor (or as a Deployment in cluster mode). Each agent runs as a
task that is restarted with backoff when it fails, so one agent's crash never takes the others down and
every agent resumes from its own durable position; each agent's state and last error are published to
Postgres (streams/health.py), where the API's `/readyz` reports a failing agent, and with the validator's the
sandbox isolation in force (`sandbox_isolation`), which `/readyz` and the UI show. Only the worker holding the
decider lock (a Postgres advisory lock) runs a decider, so a second replica waits as a hot standby. SIGTERM
stops the decider and the validator first and lets the projector drain what was decided, so `tierflow down`
archives it.

Why not Faust `@app.agent`s here: the control plane owns its positions (events log, Postgres tracking
rows), needs manual partition assignment and short fetch waits, and cannot use Faust tables or
exactly-once on the embedded broker; plain aiokafka loops give exactly that with less machinery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager

import asyncpg

from tierflow.projections.schema import COMMANDS_CHANNEL, migrate
from tierflow.streams import kafka as kio
from tierflow.streams.control import ControlBridge
from tierflow.streams.decider import Decider
from tierflow.streams.health import HEALTHY_AFTER_S, AgentHealth
from tierflow.streams.launcher import Launcher
from tierflow.streams.orchestrator import Orchestrator
from tierflow.streams.projector import Projector
from tierflow.streams.settings import Settings
from tierflow.streams.stack_state import with_stack_endpoints
from tierflow.streams.validator import ValidateFn, Validator

log = logging.getLogger("tierflow.worker")

DECIDER_LOCK = 7_310_003
#: How the worker's connection listening for the API's commands shows in `pg_stat_activity`.
COMMANDS_LISTENER = "tierflow-worker-commands"

LauncherFactory = Callable[[Settings], Launcher]
#: Opens the validator's validate function for the worker's lifetime (deploy/bootstrap.py: the sandbox pool).
ValidationFactory = Callable[[Settings], AbstractAsyncContextManager[ValidateFn]]


async def supervise(name: str, run: Callable[[], Awaitable[None]], stopping: asyncio.Event,
                    health: AgentHealth | None = None) -> None:
    """Run an agent until `stopping`; restart it with backoff when it fails (and log why). `health` records
    each (re)start, failure and stop, and marks the agent running once it survived `HEALTHY_AFTER_S`."""
    health = health or AgentHealth()
    delay = 0.5
    while not stopping.is_set():
        health.starting(name)
        survived = asyncio.get_running_loop().call_later(HEALTHY_AFTER_S, health.running, name)
        try:
            await run()
            health.stopped(name)
            return
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                health.stopped(name)
                raise  # the worker is stopping this agent
            # A library raised CancelledError from inside (e.g. aiokafka on some stop paths): a failure.
            log.exception("agent %s failed with an internal cancellation; restarting in %.1f s", name, delay)
            health.failed(name, "CancelledError: an internal cancellation", delay)
        except Exception as exc:
            log.exception("agent %s failed; restarting in %.1f s", name, delay)
            health.failed(name, f"{type(exc).__name__}: {exc}", delay)
        finally:
            survived.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), timeout=delay)
        delay = min(delay * 2, 30.0)
    health.stopped(name)


class Worker:
    def __init__(self, settings: Settings, validate: ValidateFn, launcher: Launcher | None = None,
                 workload_env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self._validate = validate
        self.launcher = launcher
        # In-process wake-ups: what one agent writes, the next one reads without waiting out its idle wait.
        self.events_written = kio.Doorbell()
        self.commands_written = kio.Doorbell()
        self.orchestrator: Orchestrator | None = None
        if launcher is not None:
            self.orchestrator = Orchestrator(settings, launcher, workload_env or settings.workload_env(),
                                             commands_written=self.commands_written)
        # The validator's row carries the sandbox's isolation in force (for /readyz and the UI).
        self.health = AgentHealth(details=lambda: {"validator": {"isolation": self.sandbox_isolation}})
        self.decider = Decider(settings.kafka, secret_key=settings.security.secret_key, health=self.health)
        self.projector = Projector(settings.kafka, settings.database.url, wake=self.events_written)
        self.validator: Validator | None = None
        self.stopping = asyncio.Event()
        self._drain = asyncio.Event()
        self._control_stopping = asyncio.Event()
        self._projector_stopping = asyncio.Event()

    async def _run_decider(self) -> None:
        conn = await asyncpg.connect(self.settings.database.url)
        try:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", DECIDER_LOCK):
                log.info("another worker holds the decider lock; standing by")
                lock = asyncio.ensure_future(conn.fetchval("SELECT pg_advisory_lock($1)", DECIDER_LOCK))
                stop = asyncio.ensure_future(self._control_stopping.wait())
                done, _ = await asyncio.wait({lock, stop}, return_when=asyncio.FIRST_COMPLETED)
                if stop in done:
                    lock.cancel()
                    return
                stop.cancel()
            self.decider = Decider(self.settings.kafka, secret_key=self.settings.security.secret_key,
                                   health=self.health, events_written=self.events_written,
                                   commands_written=self.commands_written)
            await self.decider.run(self._control_stopping)
        finally:
            await conn.close()

    async def _ensure_topics(self) -> None:
        """Create the control-plane topics a fresh cluster lacks (the embedded stack has done it already; on a
        cluster, an operator may have). Waits for the broker with backoff instead of failing the process."""
        from aiokafka.errors import KafkaError

        from tierflow.streams.topics import ensure_topics

        delay = 0.5
        while True:
            try:
                await ensure_topics(self.settings.kafka)
                return
            except (KafkaError, OSError) as exc:
                log.warning("cannot reach Kafka at %s to check the control-plane topics (%s); retrying in %.1f s",
                            self.settings.kafka.bootstrap_servers, exc, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=delay)
            if self.stopping.is_set():
                return
            delay = min(delay * 2, 30.0)

    async def run(self) -> None:
        await migrate(self.settings.database.url)
        await self._ensure_topics()
        self.validator = Validator(self.settings.kafka, self.settings.database.url, self._validate,
                                   concurrency=self.settings.sandbox.pool_size,
                                   secret_key=self.settings.security.secret_key,
                                   commands_written=self.commands_written, wake=self.commands_written)
        validator = self.validator
        self.bridge = ControlBridge(self.settings.kafka, self.settings.database.url, health=self.health,
                                    commands_written=self.commands_written)
        bridge = self.bridge
        health = self.health
        published = asyncio.Event()
        publisher = asyncio.create_task(health.publish(self.settings.database.url, published))
        tasks = [
            asyncio.create_task(supervise("decider", self._run_decider, self._control_stopping, health)),
            asyncio.create_task(supervise("validator", lambda: validator.run(self._control_stopping),
                                          self._control_stopping, health)),
            asyncio.create_task(supervise("control-bridge", lambda: bridge.run(self._control_stopping),
                                          self._control_stopping, health)),
            asyncio.create_task(supervise("commands-listener", self._listen_commands, self._control_stopping,
                                          health)),
        ]
        if self.orchestrator is not None:  # without a launcher this worker runs the control plane only
            tasks.append(asyncio.create_task(supervise("orchestrator", self._run_orchestrator,
                                                       self._control_stopping, health)))
        projector = asyncio.create_task(supervise(
            "projector", lambda: self.projector.run(self._projector_stopping, self._drain),
            self._projector_stopping, health))
        try:
            await self.stopping.wait()
        finally:
            self._control_stopping.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            tasks.append(projector)
            # Let the projector archive what the decider wrote, within a deadline.
            self._drain.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(projector), timeout=10)
            self._projector_stopping.set()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            published.set()  # one last write: the agents' `stopped`
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(publisher, timeout=5)

    async def _listen_commands(self) -> None:
        """Ring `commands_written` whenever the API says it produced a command (a NOTIFY on the commands
        channel), so the idle decider and validator read it at once. Until stopping; a connection that ends
        raises, and `supervise` opens a new one (meanwhile the readers' idle wait still bounds the delay)."""
        conn = await asyncpg.connect(self.settings.database.url,
                                     server_settings={"application_name": COMMANDS_LISTENER})
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _: lost.set())
        try:
            await conn.add_listener(COMMANDS_CHANNEL, lambda *_: self.commands_written.ring())
            self.commands_written.ring()  # commands sent while nobody listened
            waits = [asyncio.ensure_future(self._control_stopping.wait()), asyncio.ensure_future(lost.wait())]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            if lost.is_set() and not self._control_stopping.is_set():
                raise ConnectionError("the connection listening for the API's commands ended")
        finally:
            await conn.close()

    async def _run_orchestrator(self) -> None:
        assert self.orchestrator is not None
        await self.orchestrator.run(self._control_stopping)

    def stop(self) -> None:
        self.stopping.set()

    @property
    def sandbox_isolation(self) -> dict[str, str]:
        """The isolation model code runs under, as the validate function reports it (the sandbox pool's
        `isolation`: level, tool, what holds), for /readyz and the UI; empty when it says nothing."""
        isolation = getattr(self._validate, "isolation", None)
        return {str(k): str(v) for k, v in isolation.items()} if isinstance(isolation, dict) else {}


def run_worker(settings: Settings, validation: ValidationFactory, launcher_factory: LauncherFactory | None = None
               ) -> int:
    """Run the worker until SIGTERM, with the adapters the entry point wires in (deploy/bootstrap.py): `validation`
    opens the validator's validate function (the sandbox pool) for the worker's lifetime; `launcher_factory`
    enables the orchestrator."""
    resolved = with_stack_endpoints(settings)
    if resolved is None:
        log.error("no KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL and no running embedded stack in %s", settings.stack.home)
        return 2
    settings = resolved

    async def main() -> None:
        launcher = launcher_factory(settings) if launcher_factory is not None else None
        env = {**settings.workload_env(), "PYTHONUNBUFFERED": "1"}
        try:
            async with validation(settings) as validate:
                worker = Worker(settings, validate, launcher=launcher, workload_env=env)
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, worker.stop)
                await worker.run()
        finally:
            if launcher is not None:
                # Local workloads are this machine's processes: a graceful stop (`tierflow down`) takes them
                # along so none is orphaned; the orchestrator relaunches open results on the next start.
                # A crashed worker does not get here, and its restart finds them still running.
                await launcher.stop_all()
                await launcher.close()

    asyncio.run(main())
    return 0
