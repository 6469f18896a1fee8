"""Proofs on commands: which component of the stack vouches for a command that only it may send.

Anything that can write `tierflow.commands` can write any command; a few must come from the component entitled
to them: the validator's verdict on model code (`validation`), a training workload's reports (vouched for by the
API, which authenticated the workload) and the orchestrator's launch and failure reports (the worker). The
sender signs the command (`Signer.sign`: HMAC-SHA256 under the key derived from the stack's secret for
"proof:<signer>", streams/keys.py); the decider's rules check it (`Verifier`, held by the State they read). The
signed bytes cover the command id, its type, its payload and its verdict, so a proof is worth nothing on another
command, on a changed payload or next to another verdict.

Used by the validator (verdicts), the API's report route (workloads' reports), the orchestrator (through
`CommandClient(signer=...)`) and the decider's rules (`streams/domain`). docs/commands.md lists what a plain
producer may still send.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import orjson

from tierflow.streams.envelope import Command
from tierflow.streams.keys import derive_key, sign, verify

#: The components that sign commands.
VALIDATOR = "validator"
API = "api"
WORKER = "worker"
SIGNERS = (VALIDATOR, API, WORKER)

#: The command types a plain producer cannot send, and who may vouch for each. Everything else any client of
#: `tierflow.commands` may send; it goes through the same rules (and model code through the sandbox).
ENTITLED: Mapping[str, frozenset[str]] = {
    "ReportTrainingLaunched": frozenset({WORKER}),
    "ReportTrainingStarted": frozenset({API}),
    "ReportTrainingProgress": frozenset({API}),
    "ReportTrainingResult": frozenset({API}),
    "ReportTrainingFailure": frozenset({API, WORKER}),
}
#: The reports a training workload sends (through the API, which vouches for them).
WORKLOAD_REPORTS = frozenset(t for t, who in ENTITLED.items() if API in who)
#: Bumped if the signed bytes ever change shape, so an old proof never verifies against a new layout.
FORMAT = 1


def purpose(signer: str) -> str:
    """The key purpose of a signer (`streams.keys.derive_key`)."""
    return f"proof:{signer}"


def signed_bytes(cmd: Command) -> bytes:
    """What a proof covers: the command id, its type, the digest of its payload and its verdict (canonical
    JSON: sorted keys, so the bytes do not depend on how a client ordered its fields)."""
    payload = hashlib.sha256(orjson.dumps(cmd.payload, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return orjson.dumps([FORMAT, cmd.command_id, cmd.type, payload, cmd.validation], option=orjson.OPT_SORT_KEYS)


@dataclass(frozen=True)
class Signer:
    """One component's signing key."""

    name: str
    key: bytes = field(repr=False)

    @classmethod
    def from_secret(cls, secret: str, name: str) -> Signer:
        """MissingSecret (streams.keys) when the stack has no secret: nothing can be vouched for without one."""
        return cls(name, derive_key(secret, purpose(name)))

    def sign(self, cmd: Command) -> Command:
        """The command with this component's proof (replacing any it carried)."""
        return replace(cmd, proof={"by": self.name, "sig": sign(self.key, signed_bytes(cmd))})


@dataclass(frozen=True)
class Verifier:
    """The keys proofs are checked with. The default holds none: it vouches for nothing (fails closed)."""

    keys: Mapping[str, bytes] = field(default_factory=dict, repr=False)

    @classmethod
    def from_secret(cls, secret: str) -> Verifier:
        return cls({name: derive_key(secret, purpose(name)) for name in SIGNERS})

    def vouched(self, cmd: Command, by: frozenset[str]) -> bool:
        """Whether `cmd` carries a valid proof of one of the components `by`."""
        proof = cmd.proof
        if proof is None:
            return False
        signer, sig = proof.get("by"), proof.get("sig")
        if not isinstance(signer, str) or signer not in by or not isinstance(sig, str) or not sig.isascii():
            return False  # (hmac.compare_digest refuses non-ASCII text)
        key = self.keys.get(signer)
        return key is not None and verify(key, signed_bytes(cmd), sig)
