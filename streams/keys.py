"""Keys derived from the stack's one secret (`TIERFLOW_SECRET_KEY`), one per purpose.

Called by whatever signs or checks: workload tokens (the API and the orchestrator), proofs that a command comes
from the component entitled to send it (validator verdicts, training reports; checked by the decider). A key is
HMAC-SHA256(secret, purpose), so knowing one purpose's key reveals neither the secret nor another purpose's key,
and rotating the secret rotates them all.
"""

from __future__ import annotations

import hashlib
import hmac

from tierflow.streams.errors import PermanentError

#: The shortest secret accepted: 32 characters (`secrets.token_hex(32)` gives 64).
MIN_SECRET_CHARS = 32


class MissingSecret(PermanentError):
    """No (or too short a) `TIERFLOW_SECRET_KEY` where one is needed; the message says how to set it."""


def derive_key(secret: str, purpose: str) -> bytes:
    """The key for `purpose` (e.g. "workload-token", "proof:validator"), derived from the stack's secret."""
    if len(secret) < MIN_SECRET_CHARS:
        raise MissingSecret(f"TIERFLOW_SECRET_KEY must hold at least {MIN_SECRET_CHARS} characters: `tierflow up` "
                            "generates one; in a cluster, put the output of `python -c 'import secrets; "
                            "print(secrets.token_hex(32))'` in the stack's Secret")
    return hmac.new(secret.encode(), purpose.encode(), hashlib.sha256).digest()


def sign(key: bytes, message: bytes) -> str:
    """The hex HMAC-SHA256 of `message` under `key`."""
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def verify(key: bytes, message: bytes, signature: str) -> bool:
    """Whether `signature` is `sign(key, message)`, compared in constant time."""
    return hmac.compare_digest(sign(key, message), signature)
