"""Workload tokens: the scoped credentials a training job or a tier presents to the API instead of the admin token.

Minted by the orchestrator (streams/orchestrator.py) for each workload it launches, and by the API's admin-only
route `POST /inferences/{id}/token` for a tier started by hand on a device; verified by the API (api/auth.py),
which lets each scope reach only the routes and ids its claims name. Workloads only present a token, they never
decode one, so the base install (a device tier) needs no JWT library.

Format: a JWT (RFC 7519) signed with HS256 (PyJWT, in the server extra) under the key derived from the stack's
secret for the purpose "workload-token" (streams/keys.py). Claims: `iss` "tierflow", `sub` a readable name,
`iat`, `scope` ("training" or "tier") and the ids the scope is bound to: a training token names its deployment
and the results it trains; a tier token its inference, its tier and the one result whose model it serves.
There is no expiry: the ids a token names end (a result finishes, an inference stops), and rotating
TIERFLOW_SECRET_KEY revokes every token at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import jwt

from tierflow.streams.errors import PermanentError
from tierflow.streams.keys import derive_key

PURPOSE = "workload-token"
ISSUER = "tierflow"
ALGORITHM = "HS256"
#: Clock skew tolerated between the host that minted a token and the API (`iat` in the future).
LEEWAY_S = 300


class Scope(StrEnum):
    TRAINING = "training"
    TIER = "tier"


class InvalidToken(PermanentError):
    """A bearer token that is not a workload token this stack signed; the message says why."""


@dataclass(frozen=True)
class WorkloadClaims:
    """What a workload token lets its holder reach (see the module docstring)."""

    scope: str  # a Scope
    results: tuple[int, ...]
    deployment: int | None = None
    inference: int | None = None
    tier: int | None = None

    @property
    def subject(self) -> str:
        if self.scope == Scope.TRAINING:
            return f"training:deployment-{self.deployment}:results-{'-'.join(map(str, self.results))}"
        return f"tier:inference-{self.inference}:tier-{self.tier}"

    def to_payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {"scope": str(self.scope), "results": list(self.results)}
        if self.scope == Scope.TRAINING:
            payload["deployment"] = self.deployment
        else:
            payload.update(inference=self.inference, tier=self.tier)
        return payload


def training_claims(deployment_id: int, result_ids: list[int] | tuple[int, ...]) -> WorkloadClaims:
    """A training workload's claims: report and upload for `result_ids` of `deployment_id`, read what they need."""
    return WorkloadClaims(Scope.TRAINING, tuple(result_ids), deployment=deployment_id)


def tier_claims(inference_id: int, tier_index: int, result_id: int) -> WorkloadClaims:
    """A tier's claims: read inference `inference_id` and the model of `result_id` (its tier's result)."""
    return WorkloadClaims(Scope.TIER, (result_id,), inference=inference_id, tier=tier_index)


def mint(secret: str, claims: WorkloadClaims, *, now: float | None = None) -> str:
    """The signed token for `claims` (MissingSecret when the stack has no secret)."""
    issued = int(time.time() if now is None else now)
    payload = {"iss": ISSUER, "sub": claims.subject, "iat": issued, **claims.to_payload()}
    return jwt.encode(payload, derive_key(secret, PURPOSE), algorithm=ALGORITHM)


def looks_like_workload_token(token: str) -> bool:
    """Whether `token` has the shape of a JWT (three dot-separated parts); the admin token has no dots."""
    return token.count(".") == 2


def _int(payload: dict[str, Any], name: str) -> int:
    value = payload.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidToken(f"the token's claim {name!r} is {value!r}, not an id")
    return value


def verify(secret: str, token: str) -> WorkloadClaims:
    """The claims of a token this stack signed; InvalidToken for anything else (forged, altered, foreign)."""
    try:
        payload = jwt.decode(token, derive_key(secret, PURPOSE), algorithms=[ALGORITHM], issuer=ISSUER,
                             leeway=LEEWAY_S, options={"require": ["iss", "iat", "scope", "results"]})
    except jwt.InvalidTokenError as exc:
        raise InvalidToken(f"not a valid workload token: {exc}") from None
    raw_results = payload["results"]
    if not isinstance(raw_results, list) or not raw_results:
        raise InvalidToken("the token's claim 'results' is not a list of ids")
    results = tuple(_int({"results": r}, "results") for r in raw_results)
    scope = payload["scope"]
    if scope == Scope.TRAINING:
        return training_claims(_int(payload, "deployment"), results)
    if scope == Scope.TIER and len(results) == 1:
        return tier_claims(_int(payload, "inference"), _int(payload, "tier"), results[0])
    raise InvalidToken(f"the token's scope {scope!r} is not one this API knows (training, tier)")
