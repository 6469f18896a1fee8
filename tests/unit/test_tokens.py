"""Workload tokens (pure): what a token claims survives the round trip, and nothing else verifies."""

from __future__ import annotations

import base64
import json
import warnings

import jwt
import pytest
from jwt.warnings import InsecureKeyLengthWarning

from tierflow.streams.keys import derive_key
from tierflow.streams.tokens import (
    PURPOSE,
    InvalidToken,
    Scope,
    looks_like_workload_token,
    mint,
    tier_claims,
    training_claims,
    verify,
)

SECRET = "s" * 64
OTHER_SECRET = "o" * 64


def test_claims_survive_the_round_trip() -> None:
    training = training_claims(3, [7, 8, 9])
    assert verify(SECRET, mint(SECRET, training)) == training
    tier = tier_claims(5, 1, 8)
    assert verify(SECRET, mint(SECRET, tier)) == tier
    assert tier.scope == Scope.TIER and tier.results == (8,)
    assert looks_like_workload_token(mint(SECRET, tier)) and not looks_like_workload_token("a" * 43)


def test_a_token_of_another_stack_does_not_verify() -> None:
    with pytest.raises(InvalidToken, match="Signature verification failed"):
        verify(SECRET, mint(OTHER_SECRET, training_claims(3, [7])))


def _altered(token: str, **changes: object) -> str:
    """The token with its payload changed and its signature kept (what a holder could try)."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    raw = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{raw}.{signature}"


def test_a_holder_cannot_widen_its_own_claims() -> None:
    token = mint(SECRET, training_claims(3, [7]))
    with pytest.raises(InvalidToken):
        verify(SECRET, _altered(token, deployment=4))
    with pytest.raises(InvalidToken):
        verify(SECRET, _altered(token, results=[7, 99]))


def test_unsigned_and_foreign_algorithms_are_refused() -> None:
    payload = {"iss": "tierflow", "iat": 1, "scope": "training", "deployment": 3, "results": [7]}
    unsigned = jwt.encode(payload, None, algorithm="none")
    with pytest.raises(InvalidToken):
        verify(SECRET, unsigned)
    # The right key under another algorithm is refused too: only HS256 is accepted.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)  # the forger's problem, not ours
        other_algorithm = jwt.encode(payload, derive_key(SECRET, PURPOSE), algorithm="HS512")
    with pytest.raises(InvalidToken):
        verify(SECRET, other_algorithm)


def test_claims_of_the_wrong_shape_are_refused() -> None:
    key = derive_key(SECRET, PURPOSE)
    base = {"iss": "tierflow", "iat": 1}
    for bad in ({"scope": "admin", "results": [1]}, {"scope": "training", "results": [1]},
                {"scope": "training", "deployment": "3", "results": [1]},
                {"scope": "tier", "inference": 1, "tier": 0, "results": [1, 2]},
                {"scope": "training", "deployment": 3, "results": []},
                {"scope": "training", "deployment": 3}):
        with pytest.raises(InvalidToken):
            verify(SECRET, jwt.encode(base | bad, key, algorithm="HS256"))
    with pytest.raises(InvalidToken):  # another issuer
        verify(SECRET, jwt.encode({"iss": "x", "iat": 1, "scope": "training", "deployment": 3, "results": [1]},
                                  key, algorithm="HS256"))
