"""The validation sandbox as a service of its own (cluster mode): `tierflow sandbox serve`, and the worker's client.

In a cluster the worker holds the stack's secrets (the database URL, the API token, a service-account token to
launch workloads). Its sandboxes cannot create namespaces there (a `restricted` pod), so instead of running them
beside those secrets, the worker asks a separate Deployment (deploy/kubernetes/base/sandbox.yaml) that holds
none of them: no database URL, no API token, no service-account token, no egress (a NetworkPolicy lets the
worker in and nothing out), and whose pool confines each runner with Landlock and seccomp
(TIERFLOW_SANDBOX_ISOLATION=landlock; tiers/sandbox_confine.py).

* `serve`: an aiohttp app around one `SandboxPool`. `POST /validate` `{"code", "imports"}` answers
  `{"ok": true, "summary": {...}}` or `{"ok": false, "error": "...", "invalid": bool}` (invalid: the code's
  fault; otherwise the sandbox's) and the isolation in force; `GET /isolation` the isolation; both need
  `Authorization: Bearer <TIERFLOW_SANDBOX_TOKEN>` (the server refuses to start without one). `GET /healthz`
  and `GET /readyz` (a warm sandbox is waiting) are open, for the kubelet's probes. The server turns itself
  non-dumpable first, so its token cannot be read through /proc by anything of the same user.
* `RemoteSandbox`: what `deploy/bootstrap.py` gives the validator when TIERFLOW_SANDBOX_URL is set; the same
  `validate(code, imports) -> ModelSummary` (raising CodeInvalid / SandboxError) and `isolation` as a pool.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import signal
from typing import Any

import orjson
from aiohttp import ClientError, ClientSession, ClientTimeout, web

from tierflow.streams.settings import SandboxSettings, Settings
from tierflow.tiers.sandbox import CodeInvalid, ModelSummary, SandboxError, SandboxPool

log = logging.getLogger("tierflow.sandbox.server")

DEFAULT_PORT = 8081
#: Model code and its imports, as JSON: the API caps model code far below this.
MAX_REQUEST_BYTES = 4 * 1024 * 1024
POOL: web.AppKey[SandboxPool] = web.AppKey("pool", SandboxPool)
TOKEN: web.AppKey[str] = web.AppKey("token", str)


# -- the server ------------------------------------------------------------------------------------------------


def _authorized(request: web.Request) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), request.app[TOKEN].encode())


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _refused(message: str, status: int) -> web.Response:
    return _json({"error": {"code": "unauthorized" if status == 401 else "invalid", "message": message}}, status)


async def healthz(request: web.Request) -> web.Response:
    return _json({"ok": True})


async def readyz(request: web.Request) -> web.Response:
    pool = request.app[POOL]
    ready = pool.ready_count > 0
    return _json({"ready": ready, "isolation": pool.isolation}, 200 if ready else 503)


async def isolation(request: web.Request) -> web.Response:
    if not _authorized(request):
        return _refused("a bearer token (TIERFLOW_SANDBOX_TOKEN) is required", 401)
    return _json(request.app[POOL].isolation)


async def validate(request: web.Request) -> web.Response:
    if not _authorized(request):
        return _refused("a bearer token (TIERFLOW_SANDBOX_TOKEN) is required", 401)
    if request.content_type != "application/json":
        return _refused("send the model code as application/json", 415)
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        return _refused(f"the body is not JSON: {exc}", 400)
    code = body.get("code") if isinstance(body, dict) else None
    imports = body.get("imports", "") if isinstance(body, dict) else None
    if not isinstance(code, str) or not isinstance(imports, str):
        return _refused('the body is {"code": str, "imports": str}', 400)
    pool = request.app[POOL]
    try:
        summary = await pool.validate(code, imports)
    except CodeInvalid as exc:
        return _json({"ok": False, "invalid": True, "error": str(exc), "isolation": pool.isolation})
    except SandboxError as exc:
        return _json({"ok": False, "invalid": False, "error": str(exc), "isolation": pool.isolation})
    return _json({"ok": True, "summary": summary.to_dict(), "isolation": pool.isolation})


def create_app(settings: SandboxSettings, pool: SandboxPool) -> web.Application:
    """The server's app around a pool the caller opened; `settings.token` must be set."""
    if not settings.token:
        raise ValueError("TIERFLOW_SANDBOX_TOKEN is empty: the sandbox server refuses to serve without a token")
    app = web.Application(client_max_size=MAX_REQUEST_BYTES)
    app[POOL] = pool
    app[TOKEN] = settings.token
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/isolation", isolation)
    app.router.add_post("/validate", validate)
    return app


async def serve(settings: SandboxSettings, host: str, port: int) -> None:
    from tierflow.tiers.sandbox_child import set_dumpable

    set_dumpable(False)  # nothing of this user may read the token from /proc/<pid>/environ or memory
    async with SandboxPool(settings) as pool:
        runner = web.AppRunner(create_app(settings, pool), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        log.info("sandbox server on %s:%d (isolation %s, %d warm sandboxes)", host, port, settings.isolation,
                 settings.pool_size)
        stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):  # the kubelet's stop: close the pool, kill every sandbox
            asyncio.get_running_loop().add_signal_handler(sig, stopping.set)
        try:
            await stopping.wait()
        finally:
            await runner.cleanup()


def run_serve(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.sandbox.token:
        log.error("TIERFLOW_SANDBOX_TOKEN is empty: the sandbox server refuses to serve without a token")
        return 2
    asyncio.run(serve(settings.sandbox, args.host, args.port))
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `sandbox serve` to the front door (deploy/cli.py)."""
    sandbox = subparsers.add_parser("sandbox", help="the model-code validation sandbox as a service (cluster mode)")
    sub = sandbox.add_subparsers(dest="action", required=True, metavar="ACTION")
    serve_parser = sub.add_parser(
        "serve", help="serve validations to the worker over HTTP (it asks when TIERFLOW_SANDBOX_URL is set)",
        description="Keep a warm pool of validation sandboxes and build model code for the worker; needs "
                    "TIERFLOW_SANDBOX_TOKEN.")
    serve_parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    serve_parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    serve_parser.set_defaults(func=run_serve)


# -- the worker's client -----------------------------------------------------------------------------------------


class RemoteSandbox:
    """The validator's sandbox when it runs apart (`tierflow sandbox serve`): validate() over HTTP."""

    def __init__(self, settings: SandboxSettings, *, timeout_s: float | None = None) -> None:
        self.url = settings.url.rstrip("/")
        self._token = settings.token
        # The server's own build timeout, plus a queue's worth of waiting for a free sandbox.
        self._timeout = ClientTimeout(total=timeout_s or settings.timeout_s * 4 + 30)
        self._session: ClientSession | None = None
        #: The isolation in force at the server (for /readyz and the UI), as it last said.
        self.isolation: dict[str, str] = {"level": "unknown", "server": self.url}

    async def start(self) -> None:
        self._session = ClientSession(timeout=self._timeout)
        try:
            self._note(await self._call("GET", "/isolation"))
        except SandboxError as exc:  # not up yet: each validation asks again
            log.warning("the sandbox server is not answering yet: %s", exc)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> RemoteSandbox:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _note(self, report: Any) -> None:
        if isinstance(report, dict):
            self.isolation = {**{str(k): str(v) for k, v in report.items()}, "server": self.url}

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        if self._session is None:
            raise SandboxError("the sandbox client is not started")
        headers = {"Authorization": f"Bearer {self._token}", "Content-Type": "application/json"}
        try:
            async with self._session.request(method, self.url + path, headers=headers,
                                             data=None if body is None else orjson.dumps(body)) as resp:
                data = await resp.read()
                status = resp.status
        except (ClientError, TimeoutError) as exc:
            raise SandboxError(f"the sandbox server at {self.url} did not answer: {type(exc).__name__}: {exc}"
                               ) from None
        if status != 200:
            raise SandboxError(f"the sandbox server at {self.url} answered HTTP {status}: {data[:300]!r}")
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            raise SandboxError(f"the sandbox server at {self.url} answered something else than JSON") from None

    async def validate(self, code: str, imports: str = "") -> ModelSummary:
        answer = await self._call("POST", "/validate", {"code": code, "imports": imports})
        if not isinstance(answer, dict):
            raise SandboxError("the sandbox server's answer is not a JSON object")
        self._note(answer.get("isolation"))
        if answer.get("ok") is True:
            try:
                return ModelSummary.from_dict(answer.get("summary"))
            except ValueError as exc:
                raise SandboxError(f"the sandbox server sent a malformed summary: {exc}") from None
        error = str(answer.get("error") or "no reason given")
        raise (CodeInvalid if answer.get("invalid") is True else SandboxError)(error)
