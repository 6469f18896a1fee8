"""The tier's process: a Faust app around the batching loop, its web server, and the worker that runs it.

`run_worker` is what `tierflow tier run` (`tierflow.tiers.tier_cli`) calls, once per tier and replica (a
local process, a pod of a Kubernetes Deployment, or by hand on a device); tests and benchmarks start the app
in-process with `create_app(...)` + `await app.start()`.

Why a Faust app around an aiokafka consumer, not a Faust stream agent: a Faust agent costs ~150-250 us per
record here (`async for` or `take()`), which bounds a tier fed one sample per record to ~5k records/s, and
its worker consumer hardcodes `fetch_max_wait_ms=1500`, which Tansu turns into 1.5 s per hop. So the Faust
app (worker lifecycle, signals, logging, the web server) runs a service around the tier's own batching
loop (`tierflow.tiers.tier_agent.TierAgent`: an aiokafka consumer in the tier's group, polled with `getmany`
and the settings' short fetch wait); the app's own Kafka consumer and producer are off (its boot strategy's
`enable_kafka = False`). Both services are wired through Faust's public service API: the web server with
`App.web_server`, the agent's service with `App.on_init_extra_service` once the app has started, as Faust
starts `@app.service` classes (after the web server, so it stops first and `/readyz` answers while the
agent drains). SIGTERM lets the in-flight batches finish, their records acknowledged and their offsets
committed, before the consumer leaves its group.

HTTP (the app's web server, on `TierConfig.port`, 0 = a free port): `GET /healthz` (alive), `GET /readyz`
(model loaded and consumer in its group; the body says which part is missing) and `GET /metrics`
(Prometheus: records, samples, answered, forwarded, dead-lettered, batch sizes, latency from the input to
this tier's answer, this tier's processing time, model time).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faust
import orjson
from aiohttp import web
from faust.app import BootStrategy
from mode import Service
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tierflow.streams import kafka as kio
from tierflow.streams.settings import KafkaSettings
from tierflow.tiers.engines import Engine
from tierflow.tiers.tier_agent import TierAgent
from tierflow.tiers.tier_config import TierConfig

log = logging.getLogger("tierflow.tier")

#: How long SIGTERM waits for the in-flight batch to be produced, acknowledged and committed.
DRAIN_TIMEOUT_S = 30.0


class TierService(Service):
    """Runs the agent with the app; on stop (SIGTERM) lets it drain; on failure stops the worker."""

    def __init__(self, agent: TierAgent, on_failure: Callable[[BaseException], None] | None = None,
                 datadir: Path | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.agent = agent
        self.on_failure = on_failure
        self.datadir = datadir
        self._task: asyncio.Task[None] | None = None

    async def on_start(self) -> None:
        self._task = asyncio.ensure_future(self._serve())

    async def _serve(self) -> None:
        try:
            await self.agent.run()
        except Exception as exc:
            if self.agent.failure_permanent:
                log.error("%s cannot be served: %s", self.agent.config.name, exc)
            else:
                log.exception("%s failed: %s", self.agent.config.name, exc)
            if self.on_failure is not None:
                self.on_failure(exc)

    async def on_stop(self) -> None:
        self.agent.request_stop()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), DRAIN_TIMEOUT_S)
            except TimeoutError:
                log.error("%s did not drain within %.0f s", self.agent.config.name, DRAIN_TIMEOUT_S)
                self._task.cancel()
        if self.datadir is not None:
            shutil.rmtree(self.datadir, ignore_errors=True)


class TierWeb(Service):
    """The app's web server (registered with `app.web_server`): health, readiness, metrics."""

    def __init__(self, agent: TierAgent, host: str, port: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.agent = agent
        self.host = host
        self.port = port
        self.bound_port: int | None = None
        self._runner: web.AppRunner | None = None

    async def on_start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        addresses = self._runner.addresses
        self.bound_port = int(addresses[0][1]) if addresses else self.port
        log.info("%s: HTTP on %s:%d (/healthz, /readyz, /metrics)", self.agent.config.name, self.host,
                 self.bound_port)

    async def on_stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        body = {"status": "failed" if self.agent.failure else "ok", "error": self.agent.failure}
        return web.json_response(body, status=500 if self.agent.failure else 200, dumps=_dumps)

    async def _readyz(self, request: web.Request) -> web.Response:
        return web.json_response(self.agent.status(), status=200 if self.agent.ready else 503, dumps=_dumps)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.agent.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


class _TierBoot(BootStrategy):
    #: The agent owns its aiokafka clients (its group, `getmany`, short fetch waits); Faust's stay off.
    enable_kafka = False


class TierApp(faust.App):
    """The Faust app of one tier: `tier` is its `TierAgent`, run by `tier_service`; `tier_web` serves HTTP."""

    BootStrategy = _TierBoot

    def __init__(self, agent: TierAgent, *, datadir: Path,
                 on_failure: Callable[[BaseException], None] | None = None,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        config = agent.config
        super().__init__(config.group, broker=f"kafka://{config.bootstrap_servers.split(',')[0]}",
                         datadir=str(datadir), web_enabled=True, loop=loop)
        self.tier = agent
        self.tier_web = self.web_server(TierWeb(agent, config.host, config.port, loop=loop))
        self.tier_service = TierService(agent, on_failure, datadir=datadir, loop=loop)

    async def on_started_init_extra_services(self) -> None:
        """Start the agent's service where Faust starts `@app.service` ones: after the web server."""
        await super().on_started_init_extra_services()
        await self.on_init_extra_service(self.tier_service)


def create_app(config: TierConfig, kafka: KafkaSettings, *, engine: Engine | None = None,
               loop: asyncio.AbstractEventLoop | None = None,
               on_failure: Callable[[BaseException], None] | None = None) -> TierApp:
    """The Faust app serving `config` (start it with `await app.start()` or a `faust.Worker`).

    `kafka` gives the fetch wait, session timeout and dead-letter topic (its bootstrap servers are replaced
    by the tier's); `engine` injects a loaded model (tests); `on_failure` is told when the agent dies.
    """
    # Faust wants a data directory (tables would live there; a tier has none): a private one, removed on stop.
    datadir = Path(tempfile.mkdtemp(prefix=f"{config.group}-", suffix="-faust"))
    return TierApp(TierAgent(config, kafka, engine=engine), datadir=datadir, on_failure=on_failure, loop=loop)


def web_port(app: TierApp) -> int | None:
    """The port the app's web server bound (useful with port 0), once started."""
    return app.tier_web.bound_port


#: glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Blocks up to this size come from the heap, not from their own mmap (glibc's largest allowed value).
MALLOC_MMAP_THRESHOLD = 32 * 1024 * 1024
#: Freed heap memory the process keeps for the next batches before giving any back to the system.
MALLOC_TRIM_THRESHOLD = 256 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory of freed batch buffers for the next batch (True if it could).

    Every batch allocates and frees buffers of megabytes: aiokafka reads each fetch response into a
    bytearray that grows by 256 KB reads (about 6 MB per response with 64-sample float32 records), the
    decoded batch, the model's outputs. With glibc's defaults those blocks are mmapped and unmapped, so each
    batch touches fresh pages, and on this VM a first touch costs up to ~2.5 ms per MB. Measured: reading a
    6 MB response through asyncio's StreamReader, as aiokafka does, took 8.8-15 ms per response, 3.4 ms with
    the heap kept. Process-wide, so only the tier's own process (`run_worker`) calls it; a no-op off glibc.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter is linked with
    except (OSError, AttributeError):  # not glibc: musl and macOS have no mallopt
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD))


def run_worker(config: TierConfig, kafka: KafkaSettings, *, loglevel: str = "INFO") -> int:
    """Run the tier as a Faust worker until SIGTERM/SIGINT; the process exit code: 0 after a drain, 2 when the
    model or config cannot be served, 1 when the agent failed otherwise (e.g. records not acknowledged)."""
    if not keep_freed_memory():
        log.info("malloc is not glibc's: freed batch buffers go back to the system (slower on some VMs)")
    loop = kio.new_event_loop()
    asyncio.set_event_loop(loop)
    worker: faust.Worker | None = None

    def failed(exc: BaseException) -> None:
        if worker is not None:
            stopping = worker
            loop.call_soon(lambda: asyncio.ensure_future(stopping.stop()))

    app = create_app(config, kafka, loop=loop, on_failure=failed)
    worker = faust.Worker(app, loop=loop, loglevel=loglevel, redirect_stdouts=False, override_logging=False,
                          quiet=True)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    else:  # pragma: no cover - execute_from_commandline always raises SystemExit
        code = 0
    if app.tier.failure:
        return 2 if app.tier.failure_permanent else 1
    return code
