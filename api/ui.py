"""The web UI: a static single-page app (plain HTML, CSS and ES modules) served by the API under `/ui/`.

Registered by the app factory (api/app.py, `setup_ui(app)`). Everything the browser loads comes from
`api/static/` (package data), so the UI works offline and needs no build step; the pages call the same
JSON API as every other client. The UI is not part of the JSON contract, so `/openapi.json` leaves these
routes out and says so through `is_ui_path`.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).resolve().parent / "static"
PREFIX = "/ui"

#: The page only talks to its own origin; no inline scripts, no third-party hosts (the UI works offline).
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def is_ui_path(path: str) -> bool:
    """Whether a route path belongs to the UI (and not to the JSON API documented in /openapi.json)."""
    return path == "/" or path == PREFIX or path.startswith(PREFIX + "/")


async def _to_ui(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound(PREFIX + "/")


async def _index(request: web.Request) -> web.StreamResponse:
    # Deep links (/ui/#/deployments/3) all load this one page; the hash selects the view in the browser.
    # The first load may carry the one-time token in its address (/ui/?token=...): no Referer leaks it.
    return web.FileResponse(STATIC / "index.html", headers={
        "Cache-Control": "no-cache", "Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer"})


def setup_ui(app: web.Application) -> None:
    """Add the UI routes: `/` and `/ui` redirect to `/ui/`, assets under `/ui/static/`."""
    app.router.add_get("/", _to_ui, name="ui-root")
    app.router.add_get(PREFIX, _to_ui, name="ui-bare")
    app.router.add_get(PREFIX + "/", _index, name="ui-index")
    app.router.add_static(PREFIX + "/static", STATIC, name="ui-static", append_version=False)
