"""The API's error vocabulary and the one middleware that turns every failure into JSON.

Every error answer is `{"error": {"code", "message", "field"}}`. Domain rejections (from the decider)
and field errors (from the catalogue's parsers) keep their code; aiohttp's own HTTP errors (404 for an
unknown path, 405, 413 for a body over the size limit) are rendered the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from tierflow.streams.catalogue import Invalid
from tierflow.streams.errors import STATUS_BY_CODE, HttpError

log = logging.getLogger("tierflow.api")

class ApiError(HttpError):
    """An answer other than success: the HTTP status, the error code and the field it names."""


def error_response(status: int, code: str, message: str, field: str | None = None) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message, "field": field}}, status=status)


def not_found(what: str, ident: object) -> ApiError:
    return ApiError(404, "not_found", f"{what} {ident} does not exist")


def from_reason(reason: dict[str, object]) -> ApiError:
    code = str(reason.get("code") or "invalid")
    field = reason.get("field")
    return ApiError(STATUS_BY_CODE.get(code, 422), code, str(reason.get("message")),
                    None if field is None else str(field))


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message, exc.field)
    except Invalid as exc:
        return error_response(STATUS_BY_CODE.get(exc.code, 422), exc.code, exc.message, exc.field)
    except web.HTTPRequestEntityTooLarge as exc:
        return error_response(413, "too_large", f"request body too large: {exc.text}")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 403: "forbidden",
                415: "unsupported_media_type"}.get(exc.status, "http_error")
        return error_response(exc.status, code, exc.reason)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal", "internal error; the server log has the details")
