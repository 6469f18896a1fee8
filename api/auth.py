"""The API's doors: who may send a request, from where, in what form, and what each token may reach.

Installed by the app factory (api/app.py): `check_settings(settings)` refuses to build an app that would be
open by accident, and `security_middleware(settings)` runs before every handler, in this order:

1. Open routes pass: /healthz, /readyz, and /metrics with TIERFLOW_METRICS_AUTH=open (probes and scrapers
   address a pod by its IP, so no Host rule could fit them; they reveal no data).
2. Host: the Host header must be in TIERFLOW_API_ALLOWED_HOSTS (default: 127.0.0.1, localhost and [::1] on the
   port the connection arrived on), else 403. A page served from a name the attacker resolves to 127.0.0.1
   (DNS rebinding) is its own origin in the browser, so only this check keeps it from reading the API.
3. Origin: when a browser sends one it must be the API's own, else 403 (and `Sec-Fetch-Site` must not say
   cross-site or same-site). This is the CSRF defence; cookies are never used (they do not separate ports on
   127.0.0.1), the UI sends the token in a header, which a cross-site page cannot add.
4. Content type: a write with a body (or with a content type) must be `application/json`, else 415: a
   cross-site form can post only text/plain, urlencoded or multipart without a preflight. Artefact uploads are
   `application/octet-stream`.
5. Token: the UI's static files need none; everything else needs `Authorization: Bearer <token>`, the admin
   token (TIERFLOW_API_TOKEN) or a workload token (streams/tokens.py), else 401. TIERFLOW_API_AUTH=off makes
   every caller the admin (steps 2-4 still hold).
6. Scope: a workload token reaches only the routes of `WORKLOAD_ROUTES`, for the ids its claims name and that
   belong together in the projections (a training token's results must be of its deployment), else 403. A
   training token reports (`POST /reports`, which the API then vouches for) for its own results only.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from tierflow.api.errors import Handler, error_response
from tierflow.api.routes import body, reported_results
from tierflow.api.state import get_state
from tierflow.api.ui import is_ui_path
from tierflow.projections import queries
from tierflow.streams.errors import PermanentError
from tierflow.streams.keys import MissingSecret, derive_key
from tierflow.streams.settings import Settings
from tierflow.streams.statuses import FINAL_STATUSES
from tierflow.streams.tokens import PURPOSE, InvalidToken, Scope, WorkloadClaims, looks_like_workload_token, verify

JSON = dict[str, Any]

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
JSON_TYPE = "application/json"
UPLOAD_TYPE = "application/octet-stream"
#: The route whose body is an artefact, not JSON.
UPLOAD_ROUTE = ("PUT", "/artefacts")
DEFAULT_PORTS = {"http": 80, "https": 443}


class ApiConfigError(PermanentError):
    """Settings under which the API would be open to anyone; the message says what to set."""


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: the admin (the stack's token, or anyone with auth off) or a workload."""

    admin: bool
    claims: WorkloadClaims | None = None

    def describe(self) -> str:
        if self.admin or self.claims is None:
            return "the admin token"
        return f"a {self.claims.scope} token ({self.claims.subject})"


PRINCIPAL_KEY: web.RequestKey[Principal] = web.RequestKey("tierflow_principal", Principal)
ADMIN = Principal(admin=True)


def principal(request: web.Request) -> Principal:
    """Who sent `request` (set by the middleware; the admin on routes that need no token)."""
    found: Principal = request.get(PRINCIPAL_KEY, ADMIN)
    return found


# --- settings -----------------------------------------------------------------------------------------

def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_settings(settings: Settings) -> None:
    """ApiConfigError unless the API would start with its doors closed (or opened on purpose)."""
    api = settings.api
    if api.auth == "token":
        if not api.token:
            raise ApiConfigError(
                "the API needs a token: set TIERFLOW_API_TOKEN (`tierflow up` generates one and clients find it), "
                "or set TIERFLOW_API_AUTH=off to run it without authentication (only behind a proxy that "
                "authenticates for it)")
        try:
            derive_key(settings.security.secret_key, PURPOSE)
        except MissingSecret as exc:
            raise ApiConfigError(f"the API verifies workload tokens with the stack's secret: {exc}") from None
    beyond_loopback = not _is_loopback(api.host) or settings.workloads.launcher == "kubernetes"
    if beyond_loopback and not api.allowed_hosts:
        raise ApiConfigError(
            f"the API listens on {api.host or 'every interface'}: set TIERFLOW_API_ALLOWED_HOSTS to the names "
            "clients reach it by (its Service, e.g. tierflow-api:8080, an ingress host, localhost:PORT of a "
            "port-forward); any other Host is refused, which stops DNS rebinding")


# --- Host and Origin ----------------------------------------------------------------------------------

def _split_host(value: str) -> tuple[str, int | None] | None:
    """("name", port or None) of a Host header value; None when it is not one."""
    try:
        parts = urlsplit(f"//{value}")
        return (parts.hostname or "").lower(), parts.port
    except ValueError:
        return None


def host_allowed(host: str, allowed: frozenset[str], local_port: int | None) -> bool:
    """Whether a Host header names this API: an allow-list entry (`name` matches any port), or by default a
    loopback name on the port the connection arrived on."""
    found = _split_host(host)
    if found is None or not found[0]:
        return False
    name, port = found
    if not allowed:
        return name.strip("[]") in LOOPBACK_NAMES and port is not None and port == local_port
    for entry in allowed:
        wanted = _split_host(entry)
        if wanted is not None and wanted[0] == name and (wanted[1] is None or wanted[1] == port):
            return True
    return False


def origin_is_own(origin: str, host: str) -> bool:
    """Whether an Origin header names the same host and port as the request's Host (default ports by the
    Origin's scheme, so `https://name` behind a TLS ingress matches Host `name`)."""
    try:
        parts = urlsplit(origin)
        origin_port = parts.port
    except ValueError:
        return False
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/"):
        return False
    found = _split_host(host)
    if found is None:
        return False
    default = DEFAULT_PORTS[parts.scheme]
    return (parts.hostname.lower(), origin_port or default) == (found[0], found[1] or default)


def _local_port(request: web.Request) -> int | None:
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    if isinstance(sockname, tuple) and len(sockname) >= 2 and isinstance(sockname[1], int):
        return sockname[1]
    return None


# --- workload scopes ----------------------------------------------------------------------------------

Check = Callable[[web.Request, WorkloadClaims], Awaitable[bool]]


def _id(request: web.Request, name: str = "id") -> int | None:
    raw = request.match_info.get(name, "")
    return int(raw) if raw.isdigit() else None


async def _own_results(request: web.Request, claims: WorkloadClaims) -> list[JSON]:
    """The token's results that exist and belong to its deployment (a token naming others gets none of them)."""
    async with get_state(request).pool.acquire() as conn:
        found = [await queries.get_result(conn, rid) for rid in claims.results]
    return [r for r in found if r is not None and r["deployment_id"] == claims.deployment]


async def _own_deployment(request: web.Request, claims: WorkloadClaims) -> bool:
    return _id(request) == claims.deployment


async def _own_result(request: web.Request, claims: WorkloadClaims) -> bool:
    ident = _id(request)
    if ident is None or ident not in claims.results:
        return False
    async with get_state(request).pool.acquire() as conn:
        result = await queries.get_result(conn, ident)
    return result is None or result["deployment_id"] == claims.deployment  # a missing one answers 404


async def _own_model_version(request: web.Request, claims: WorkloadClaims) -> bool:
    return _id(request) in {r["model_id"] for r in await _own_results(request, claims)}


async def _own_datasources(request: web.Request, claims: WorkloadClaims) -> bool:
    raw = request.query.get("deployment_id", "")
    return raw.isdigit() and int(raw) == claims.deployment


async def _any_outcome(request: web.Request, claims: WorkloadClaims) -> bool:
    # A training job waits for its reports' outcomes; command ids are random UUIDs only their sender knows.
    return True


async def _upload(request: web.Request, claims: WorkloadClaims) -> bool:
    """Uploads while the training is open: every result the token names is of its deployment, one not final."""
    results = await _own_results(request, claims)
    return len(results) == len(claims.results) and any(r["status"] not in FINAL_STATUSES for r in results)


async def _own_reports(request: web.Request, claims: WorkloadClaims) -> bool:
    """A training report for the token's own results only (`reported_results` of its payload), each of the
    token's deployment in the projections, under that deployment's id when the report names one: the API signs
    what passes, so the decider believes it (streams/proofs.py). A body that names no results is the route's
    422."""
    data = await body(request)
    payload = data.get("payload")
    if not isinstance(payload, dict):
        return True  # the route answers 422 and sends nothing
    ids = reported_results(payload)
    if not set(ids) <= set(claims.results):
        return False
    if "deployment_id" in payload and payload["deployment_id"] != claims.deployment:
        return False
    async with get_state(request).pool.acquire() as conn:
        found = [await queries.get_result(conn, rid) for rid in ids]
    return all(r is not None and r["deployment_id"] == claims.deployment for r in found)


async def _own_inference(request: web.Request, claims: WorkloadClaims) -> bool:
    return _id(request) == claims.inference


async def _own_model(request: web.Request, claims: WorkloadClaims) -> bool:
    """The model of the tier's result, while its inference still serves that result on that tier."""
    ident = _id(request)
    if ident is None or ident not in claims.results or claims.inference is None:
        return False
    async with get_state(request).pool.acquire() as conn:
        inference = await queries.get_inference(conn, claims.inference)
    if inference is None:
        return False  # deleting an inference revokes its tiers' tokens
    return any(t["index"] == claims.tier and t["result_id"] == ident for t in inference["tiers"])


#: What each workload scope may do: (method, route) -> the check on the request's ids. Anything else is 403.
WORKLOAD_ROUTES: dict[str, dict[tuple[str, str], Check]] = {
    Scope.TRAINING: {
        ("GET", "/deployments/{id}"): _own_deployment,
        ("GET", "/results/{id}"): _own_result,
        ("GET", "/models/{id}/versions/{version}"): _own_model_version,
        ("GET", "/datasources"): _own_datasources,
        ("GET", "/commands/{command_id}"): _any_outcome,
        UPLOAD_ROUTE: _upload,
        ("POST", "/reports"): _own_reports,
    },
    Scope.TIER: {
        ("GET", "/inferences/{id}"): _own_inference,
        ("GET", "/results/{id}/model"): _own_model,
    },
}


async def workload_may(request: web.Request, claims: WorkloadClaims) -> bool:
    resource = request.match_info.route.resource
    if resource is None:
        return False
    method = "GET" if request.method == "HEAD" else request.method
    check = WORKLOAD_ROUTES.get(claims.scope, {}).get((method, resource.canonical))
    return check is not None and await check(request, claims)


# --- the middleware -----------------------------------------------------------------------------------

def _bearer(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


#: The types a page may send cross-site without a CORS preflight (an HTML form, a "simple" fetch).
FORM_TYPES = frozenset({"text/plain", "application/x-www-form-urlencoded", "multipart/form-data"})


def _refused_type(request: web.Request) -> web.Response | None:
    """415 for a write whose body is not the route's type, or a bodyless write typed as a form."""
    given = request.headers.get("Content-Type", "")
    mimetype = given.split(";", 1)[0].strip().lower()
    if not request.body_exists:
        # Clients may type an empty body (aiohttp's says octet-stream); a form's type is refused all the same.
        refused = mimetype in FORM_TYPES
        wanted = JSON_TYPE
    else:
        resource = request.match_info.route.resource
        route = (request.method, resource.canonical if resource is not None else "")
        wanted = UPLOAD_TYPE if route == UPLOAD_ROUTE else JSON_TYPE
        refused = mimetype != wanted
    if not refused:
        return None
    return error_response(415, "unsupported_media_type",
                          f"send the body as '{wanted}' (Content-Type {given or 'missing'!r})", "Content-Type")


def forbidden(message: str) -> web.Response:
    return error_response(403, "forbidden", message)


def unauthorized(message: str) -> web.Response:
    response = error_response(401, "unauthorized", message)
    response.headers["WWW-Authenticate"] = 'Bearer realm="tierflow"'
    return response


def security_middleware(settings: Settings) -> web.middleware:  # type: ignore[valid-type]
    api = settings.api
    admin_token = api.token.encode()
    open_paths = OPEN_PATHS | ({"/metrics"} if api.metrics_auth == "open" else frozenset())

    def authenticate(request: web.Request) -> Principal | web.Response:
        if api.auth == "off":
            return ADMIN
        token = _bearer(request)
        if token is None:
            return unauthorized("this API needs 'Authorization: Bearer <token>': the CLI and the demo find the "
                                "token of the running stack; scripts get it from `tierflow status --json`; the "
                                "web UI from the link `tierflow up` prints")
        if hmac.compare_digest(token.encode(), admin_token):
            return ADMIN
        if looks_like_workload_token(token):
            try:
                return Principal(admin=False, claims=verify(settings.security.secret_key, token))
            except InvalidToken as exc:
                return unauthorized(f"the bearer token is refused: {exc}")
        return unauthorized("the bearer token is neither this API's token nor a workload token it signed")

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in open_paths:
            return await handler(request)
        host = request.headers.get("Host", "")
        if not host_allowed(host, api.allowed_hosts, _local_port(request)):
            return forbidden(f"this API does not answer for Host {host!r} (TIERFLOW_API_ALLOWED_HOSTS)")
        origin = request.headers.get("Origin")
        if origin is not None and not origin_is_own(origin, host):
            return forbidden(f"requests from the origin {origin!r} are refused: only this API's own pages may "
                             "call it from a browser")
        ui = is_ui_path(request.path)
        if not ui and request.headers.get("Sec-Fetch-Site") in ("cross-site", "same-site"):
            return forbidden("cross-site requests are refused")
        if request.method in WRITE_METHODS:
            refused = _refused_type(request)
            if refused is not None:
                return refused
        if ui:
            return await handler(request)
        who = authenticate(request)
        if isinstance(who, web.Response):
            return who
        if who.claims is not None and not await workload_may(request, who.claims):
            return forbidden(f"{who.describe()} may not {request.method} {request.path}")
        request[PRINCIPAL_KEY] = who
        return await handler(request)

    return check
