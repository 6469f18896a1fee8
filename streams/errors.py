"""The root of tierflow's errors and the taxonomy that says what happens next (as kopf's does).

Every exception class tierflow defines derives from `TierflowError`, so a caller can tell tierflow's own
failures from a library's. Where the caller must decide whether to try again, the error is a
`PermanentError` (retrying cannot help: bad input, a refused request, a missing artefact; report it and
stop) or a `TemporaryError` (the same call may work later: a broker or API that is not reachable yet; wait
`delay_s` and retry). Training jobs, both launchers and the tier agent use this one pair.
"""

from __future__ import annotations


class TierflowError(Exception):
    """Base of every error tierflow raises on purpose."""


class PermanentError(TierflowError):
    """Retrying cannot help: the caller reports the failure (a 4xx, a dead letter, a failed result)."""


class TemporaryError(TierflowError):
    """The same call may succeed later: the caller waits `delay_s` and tries again."""

    def __init__(self, message: str, *, delay_s: float = 1.0) -> None:
        super().__init__(message)
        self.delay_s = delay_s


#: The HTTP status the API answers for each error code of its wire format (`{"error": {"code", ...}}`): the
#: API renders with it and its clients read with it.
STATUS_BY_CODE: dict[str, int] = {"invalid": 422, "not_found": 404, "conflict": 409, "unauthorized": 401,
                                  "forbidden": 403, "bad_request": 400, "too_large": 413,
                                  "unsupported_media_type": 415, "unavailable": 503}


class HttpError(TierflowError):
    """An error answer of the API, as its wire format has it: the HTTP status (0 where no answer came), the
    error code, the message and the field it names."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
