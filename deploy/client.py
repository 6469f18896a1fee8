"""A small synchronous client of the tierflow HTTP API, over the standard library only.

Used by the resource sub-commands of the CLI (deploy/cli_resources.py). Every answer is JSON; a 4xx/5xx
becomes `ApiClientError` carrying the server's code, message and field. A write the server could not
settle within its command timeout answers 202 with a command id: the client polls `GET /commands/{id}`
until the outcome is known and then reads the resource, so callers always see the final answer.
The network is touched only through `Transport` (default: `urllib_transport`), so tests can replace it.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tierflow.streams.errors import STATUS_BY_CODE, HttpError
from tierflow.streams.settings import Settings
from tierflow.streams.stack_state import read_stack_state, resolve_api_token

JSON = dict[str, Any]

DEFAULT_API_URL = "http://127.0.0.1:8080"

#: Where the resource of an outcome's aggregate ("model:3") is read.
AGGREGATE_PATHS: dict[str, str] = {"model": "/models", "configuration": "/configurations",
                                   "deployment": "/deployments"}


class ApiClientError(HttpError):
    """The API answered an error (or could not be asked). `status` is 0 when no answer came back."""


class ApiUnreachable(ApiClientError):
    """No HTTP answer at all: nothing listens at the URL, the connection broke, or it timed out."""

    def __init__(self, base_url: str, reason: str) -> None:
        super().__init__(0, "unreachable",
                         f"cannot reach the tierflow API at {base_url}: {reason}; is `tierflow up` running? "
                         "set TIERFLOW_API_URL to use another API")
        self.base_url = base_url


# --- transport ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HttpRequest:
    method: str
    url: str
    headers: dict[str, str]
    data: bytes | None
    timeout_s: float


@dataclass(frozen=True)
class HttpResponse:
    status: int
    data: bytes
    headers: dict[str, str] = field(default_factory=dict)


#: Sends one request and returns the answer, whatever its status; raises OSError when none came back.
Transport = Callable[[HttpRequest], HttpResponse]


def urllib_transport(request: HttpRequest) -> HttpResponse:
    req = urllib.request.Request(request.url, data=request.data, headers=request.headers, method=request.method)
    try:
        with urllib.request.urlopen(req, timeout=request.timeout_s) as response:
            return HttpResponse(response.status, response.read(), dict(response.headers.items()))
    except urllib.error.HTTPError as exc:  # an answer with a 4xx/5xx status, not a failure to connect
        try:
            return HttpResponse(exc.code, exc.read(), dict(exc.headers.items()) if exc.headers else {})
        finally:
            exc.close()


# --- pure helpers -------------------------------------------------------------------------------------

def with_query(path: str, params: Mapping[str, str | int | bool | None]) -> str:
    """`path` with the non-None params as a query string (booleans as true/false)."""
    pairs = [(k, str(v).lower() if isinstance(v, bool) else str(v)) for k, v in params.items() if v is not None]
    return f"{path}?{urllib.parse.urlencode(pairs)}" if pairs else path


def error_from_body(status: int, data: Any) -> ApiClientError:
    """The error an answer with `status` >= 400 describes (the API's `{"error": {...}}` when it has one)."""
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict) and err.get("message"):
        found = err.get("field")
        return ApiClientError(status, str(err.get("code") or "error"), str(err["message"]),
                              None if found is None else str(found))
    return ApiClientError(status, "http_error", f"the API answered HTTP {status} without an error message")


def error_from_rejection(reason: Any) -> ApiClientError:
    """The error a rejected command's outcome describes, with the status the API would have answered."""
    r = reason if isinstance(reason, dict) else {"message": str(reason)}
    code = str(r.get("code") or "invalid")
    found = r.get("field")
    return ApiClientError(STATUS_BY_CODE.get(code, 422), code, str(r.get("message") or "the command was rejected"),
                          None if found is None else str(found))


def parse_aggregate(aggregate: str) -> tuple[str, int] | None:
    """("model", 3) for "model:3"; None for what is not a resource aggregate."""
    kind, _, ident = aggregate.partition(":")
    return (kind, int(ident)) if kind in AGGREGATE_PATHS and ident.isdigit() else None


# --- the client ---------------------------------------------------------------------------------------

class ApiClient:
    """`get/post/put/delete(path, body=None) -> (status, json)` against one API base URL."""

    def __init__(self, base_url: str, token: str = "", *, timeout_s: float = 60.0,
                 command_deadline_s: float = 300.0, poll_interval_s: float = 0.25,
                 transport: Transport = urllib_transport, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self.command_deadline_s = command_deadline_s
        self.poll_interval_s = poll_interval_s
        self._transport = transport
        self._sleep = sleep
        self._clock = clock

    def get(self, path: str, body: JSON | None = None) -> tuple[int, JSON]:
        return self.request("GET", path, body)

    def post(self, path: str, body: JSON | None = None) -> tuple[int, JSON]:
        return self.request("POST", path, body)

    def put(self, path: str, body: JSON | None = None) -> tuple[int, JSON]:
        return self.request("PUT", path, body)

    def delete(self, path: str, body: JSON | None = None) -> tuple[int, JSON]:
        return self.request("DELETE", path, body)

    def request(self, method: str, path: str, body: JSON | None = None) -> tuple[int, JSON]:
        """Send one request; settle a 202 by polling its command; raise ApiClientError on 4xx/5xx."""
        status, data = self._send(method, path, body)
        if status == 202 and method != "GET" and isinstance(data.get("command_id"), str):
            return self._settle(method, data["command_id"])
        return status, data

    def _send(self, method: str, path: str, body: JSON | None) -> tuple[int, JSON]:
        headers = {"Accept": "application/json"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        url = self.base_url + (path if path.startswith("/") else f"/{path}")
        try:
            response = self._transport(HttpRequest(method, url, headers, payload, self.timeout_s))
        except TimeoutError:
            raise ApiUnreachable(self.base_url, f"no answer within {self.timeout_s:g} s") from None
        except urllib.error.URLError as exc:
            raise ApiUnreachable(self.base_url, str(exc.reason)) from None
        except (OSError, http.client.HTTPException) as exc:
            raise ApiUnreachable(self.base_url, f"{type(exc).__name__}: {exc}") from None
        try:
            data = json.loads(response.data) if response.data else {}
        except ValueError:
            data = None
        if response.status >= 400:
            raise error_from_body(response.status, data)
        if not isinstance(data, dict):
            raise ApiClientError(response.status, "bad_response",
                                 f"{method} {path} answered HTTP {response.status} with a body that is not a "
                                 "JSON object; is TIERFLOW_API_URL a tierflow API?")
        return response.status, data

    def _settle(self, method: str, command_id: str) -> tuple[int, JSON]:
        """Poll the command's outcome until it is known, then answer as the write would have."""
        deadline = self._clock() + self.command_deadline_s
        while True:
            status, outcome = self._send("GET", f"/commands/{command_id}", None)
            if status == 200 and outcome.get("status") in ("accepted", "rejected"):
                break
            if self._clock() > deadline:
                raise ApiClientError(202, "pending",
                                     f"command {command_id} has no outcome after {self.command_deadline_s:g} s; "
                                     f"check later with GET /commands/{command_id}")
            self._sleep(self.poll_interval_s)
        if outcome["status"] == "rejected":
            raise error_from_rejection(outcome.get("reason"))
        target = parse_aggregate(str(outcome.get("aggregate", "")))
        if target is None:
            return 200, outcome
        kind, ident = target
        if str(outcome.get("event_type", "")).endswith("Deleted"):
            return 200, {"id": ident, "deleted": True, "command_id": command_id}
        _, resource = self._send("GET", f"{AGGREGATE_PATHS[kind]}/{ident}", None)
        return (201 if method == "POST" else 200), resource


def resolve_api_url(settings: Settings) -> str:
    """TIERFLOW_API_URL when set, else the running embedded stack's API, else the default local port."""
    configured: str = settings.api.url
    if configured:
        return configured.rstrip("/")
    state = read_stack_state(settings.stack.home.expanduser())
    if state is not None and state.alive() and state.api_url:
        return str(state.api_url).rstrip("/")
    return DEFAULT_API_URL


def client_for(settings: Settings, token: str = "") -> ApiClient:
    """The client the CLI uses: the resolved URL, and the token of `--token`, else TIERFLOW_API_TOKEN, else the
    running embedded stack's (so a newcomer never types one)."""
    return ApiClient(resolve_api_url(settings), resolve_api_token(settings, token))
