"""Attacks on the local API from a web page and from other local programs, and the doors that close them.

Any page a user opens can make the browser send requests to `http://127.0.0.1:8080`: a form post (no CORS
preflight) with `Content-Type: text/plain` and a body that happens to be JSON registers model code, which is
remote code execution on the user's machine; a page served from a name the attacker resolves to 127.0.0.1 (DNS
rebinding) reads the API's answers as its own origin. Defences (api/auth.py): every route but /healthz,
/readyz and the UI's static files needs a token, reads too (the browser cannot add an `Authorization` header to
a cross-site request); the API refuses to start without one unless auth is switched off explicitly; a body is
accepted only as `application/json` (415); a request whose `Origin` is not the API's own is refused (403), and
so is a `Host` outside the allow-list (403), which holds even with auth switched off.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.conftest import Infra, new_plane, start_plane, stop_plane
from tests.integration.test_replay import shape_validate
from tierflow.api.app import create_app
from tierflow.streams.settings import Settings

TOKEN = "admin-token-for-the-security-tests"
SECRET = "security-test-secret-" + "k" * 43
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EVIL = "http://evil.example"
MODEL = {"name": "csrf", "code": "# single"}


def secured(plane: Settings, **env: str) -> Settings:
    """The plane's settings as the API would read them from its environment, with `env` on top."""
    return Settings.from_env({**plane.to_env(), "TIERFLOW_API_TOKEN": TOKEN, "TIERFLOW_SECRET_KEY": SECRET, **env})


@pytest.fixture(scope="module")
async def plane(infra: Infra) -> AsyncIterator[Settings]:
    settings = await new_plane(infra, "doors")
    running = await start_plane(settings, shape_validate)
    yield settings
    await stop_plane(running)


@pytest.fixture(scope="module")
async def api(plane: Settings) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(create_app(secured(plane)))) as c:
        yield c


async def model_names(c: TestClient[Any, Any]) -> set[str]:
    r = await c.get("/models", headers=AUTH)
    assert r.status == 200, await r.text()
    return {m["name"] for m in (await r.json())["items"]}


async def test_a_cross_site_form_post_cannot_register_model_code(plane: Settings) -> None:
    # What any page can make the browser send: a form post, text/plain, with a body that parses as JSON. With
    # auth switched off (the operator's explicit choice) only the Origin and content-type checks stand.
    open_api = secured(plane, TIERFLOW_API_TOKEN="", TIERFLOW_API_AUTH="off")
    async with TestClient(TestServer(create_app(open_api))) as c:
        r = await c.post("/models", data=json.dumps(MODEL).encode(),
                         headers={"Content-Type": "text/plain", "Origin": EVIL})
        assert r.status == 403, await r.text()
        assert (await r.json())["error"]["code"] == "forbidden"
        # A form post from a page without an Origin (older browsers, some redirects) still is not JSON.
        r = await c.post("/models", data=json.dumps(MODEL).encode(), headers={"Content-Type": "text/plain"})
        assert r.status == 415, await r.text()
        r = await c.post("/models", data={"name": "csrf", "code": "# single"})  # urlencoded
        assert r.status == 415
        r = await c.get("/models")
        assert r.status == 200
        assert "csrf" not in {m["name"] for m in (await r.json())["items"]}


async def test_a_body_is_accepted_only_as_json(api: TestClient[Any, Any]) -> None:
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                         "application/octet-stream"):
        r = await api.post("/models", data=json.dumps(MODEL | {"name": "typed"}).encode(),
                           headers=AUTH | {"Content-Type": content_type})
        assert r.status == 415, (content_type, await r.text())
        assert (await r.json())["error"]["code"] == "unsupported_media_type"
    # A bodyless write with a form's content type is refused too (a form can post nothing but its type).
    r = await api.post("/results/1/stop", headers=AUTH | {"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status == 415
    assert "typed" not in await model_names(api)
    r = await api.post("/models", data=json.dumps(MODEL | {"name": "typed"}).encode(),
                       headers=AUTH | {"Content-Type": "application/json; charset=utf-8"})
    assert r.status == 201, await r.text()


async def test_a_foreign_origin_is_refused_even_with_the_token(api: TestClient[Any, Any]) -> None:
    for origin in (EVIL, "null", "http://127.0.0.1:1", f"http://localhost:{api.server.port}", "file://"):
        r = await api.get("/models", headers=AUTH | {"Origin": origin})
        assert r.status == 403, origin
        r = await api.post("/models", json=MODEL | {"name": "origin"}, headers=AUTH | {"Origin": origin})
        assert r.status == 403, origin
    assert "origin" not in await model_names(api)
    # The API's own origin (the UI's fetches) is fine.
    own = f"http://{api.server.host}:{api.server.port}"
    assert (await api.get("/models", headers=AUTH | {"Origin": own})).status == 200


async def test_a_foreign_host_is_refused_dns_rebinding(api: TestClient[Any, Any], plane: Settings) -> None:
    port = api.server.port
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1:{port + 1}", f"localhost.evil.example:{port}"):
        r = await api.get("/models", headers=AUTH | {"Host": host})
        assert r.status == 403, host
        assert (await r.json())["error"]["code"] == "forbidden"
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
        assert (await api.get("/models", headers=AUTH | {"Host": host})).status == 200, host
    # With auth off the Host check is what stops a rebinding page from reading the API.
    open_api = secured(plane, TIERFLOW_API_TOKEN="", TIERFLOW_API_AUTH="off")
    async with TestClient(TestServer(create_app(open_api))) as c:
        assert (await c.get("/models", headers={"Host": f"evil.example:{c.server.port}"})).status == 403
    # An operator names the hosts clients use (a cluster's Service or ingress); loopback names then are not
    # implied.
    named = secured(plane, TIERFLOW_API_ALLOWED_HOSTS="tierflow.example.com,tierflow-api:8080")
    async with TestClient(TestServer(create_app(named))) as c:
        assert (await c.get("/models", headers=AUTH | {"Host": "tierflow.example.com"})).status == 200
        assert (await c.get("/models", headers=AUTH | {"Host": "tierflow-api:8080"})).status == 200
        assert (await c.get("/models", headers=AUTH | {"Host": "tierflow-api:9999"})).status == 403
        assert (await c.get("/models", headers=AUTH | {"Host": f"127.0.0.1:{c.server.port}"})).status == 403


async def test_the_token_is_required_by_default_reads_too(api: TestClient[Any, Any]) -> None:
    for path in ("/models", "/models/1", "/deployments", "/results", "/inferences", "/datasources",
                 "/openapi.json", "/commands/6f1c1f7e-3c43-4d0b-9a55-7a8e5e0e3b11", "/metrics"):
        r = await api.get(path)
        assert r.status == 401, path
        assert (await r.json())["error"]["code"] == "unauthorized"
        assert (await api.get(path, headers={"Authorization": "Bearer wrong"})).status == 401, path
        assert (await api.get(path, headers={"Authorization": TOKEN})).status == 401, path  # no scheme
    r = await api.post("/models", json=MODEL | {"name": "anonymous"})
    assert r.status == 401
    assert "anonymous" not in await model_names(api)
    # What stays open: liveness, readiness and the UI's files (the page asks for the token itself).
    for path in ("/healthz", "/readyz", "/ui/", "/ui/static/js/api.js"):
        assert (await api.get(path)).status in (200, 503), path


async def test_the_api_refuses_to_start_without_a_token(plane: Settings) -> None:
    with pytest.raises(Exception, match="TIERFLOW_API_AUTH=off"):
        create_app(secured(plane, TIERFLOW_API_TOKEN=""))
    # Switched off explicitly, it starts and asks nobody.
    open_api = secured(plane, TIERFLOW_API_TOKEN="", TIERFLOW_API_AUTH="off")
    async with TestClient(TestServer(create_app(open_api))) as c:
        assert (await c.get("/models")).status == 200


async def test_an_api_beyond_loopback_needs_an_allow_list(plane: Settings) -> None:
    with pytest.raises(Exception, match="TIERFLOW_API_ALLOWED_HOSTS"):
        create_app(secured(plane, TIERFLOW_API_HOST="0.0.0.0"))
    create_app(secured(plane, TIERFLOW_API_HOST="0.0.0.0", TIERFLOW_API_ALLOWED_HOSTS="tierflow-api:8080"))


async def test_metrics_are_open_only_when_the_operator_says_so(plane: Settings) -> None:
    async with TestClient(TestServer(create_app(secured(plane, TIERFLOW_METRICS_AUTH="open")))) as c:
        assert (await c.get("/metrics")).status == 200
        assert (await c.get("/models")).status == 401  # nothing else opens with it
