"""The front door's wiring, as cosmicpython's bootstrap: the adapters the control-plane worker runs with.

`tierflow worker` (deploy/cli.py) hands these to `streams.worker.run_worker`, which imports neither the sandbox
nor a launcher (the control plane sits below the tiers and below deploy):

* `make_launcher`: which launcher the orchestrator uses. `TIERFLOW_LAUNCHER=local` (the embedded stack):
  workloads are subprocesses with state and logs under `<home>/workloads`. `TIERFLOW_LAUNCHER=kubernetes`: Jobs
  and Deployments in `TIERFLOW_NAMESPACE`, through the official client configured from the pod's service
  account (or ~/.kube/config outside a cluster).
* `sandbox_validation`: the validator's verdicts come from a warm pool of single-use sandboxes
  (tiers/sandbox.py), open for the worker's lifetime, or, when TIERFLOW_SANDBOX_URL is set (cluster mode), from
  the sandbox server (`tierflow sandbox serve`, tiers/sandbox_server.py) that runs the pool apart from the
  worker's secrets; `sandbox_validate(pool)` adapts either to the verdict the decider reads (the tests pass
  their own session pool through it), and says which isolation is in force (`.isolation`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Protocol

from tierflow.streams.envelope import JSON
from tierflow.streams.launcher import Launcher
from tierflow.streams.settings import Settings
from tierflow.streams.validator import ValidateFn
from tierflow.tiers.sandbox import CodeInvalid, ModelSummary, SandboxError, SandboxPool
from tierflow.tiers.sandbox_server import RemoteSandbox


def make_launcher(settings: Settings) -> Launcher:
    if settings.workloads.launcher == "kubernetes":
        from tierflow.deploy.kubernetes_launcher import KubernetesLauncher

        return KubernetesLauncher(settings.workloads)
    from tierflow.deploy.local_launcher import LocalLauncher

    env = {**settings.workload_env(), "PYTHONUNBUFFERED": "1"}  # as the orchestrator gives each spec
    state_dir = settings.stack.home.resolve() / "workloads"
    zygote = None
    if settings.workloads.tier_zygote:
        from tierflow.deploy.local_zygote import TierZygote

        zygote = TierZygote.for_workloads(env, state_dir, settings.workloads.tier_engine)
    return LocalLauncher(state_dir, env, zygote=zygote)


class Sandbox(Protocol):
    """A SandboxPool, or the RemoteSandbox of a sandbox server."""

    isolation: dict[str, str]

    async def validate(self, code: str, imports: str = "") -> ModelSummary: ...


class SandboxVerdicts:
    """The validator's validate function over a sandbox, which also says the isolation in force (the worker
    exposes it for /readyz and the UI)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    @property
    def isolation(self) -> dict[str, str]:
        return dict(self._sandbox.isolation)

    async def __call__(self, code: str, imports: str) -> JSON:
        try:
            summary = await self._sandbox.validate(code, imports)
        except CodeInvalid as exc:
            return {"ok": False, "error": str(exc)}
        except SandboxError as exc:
            return {"ok": False, "error": f"the sandbox stopped building it: {exc}"}
        result: JSON = summary.to_dict()
        return {"ok": True, "summary": result}


def sandbox_validate(pool: Sandbox) -> ValidateFn:
    """Adapt a SandboxPool (or a RemoteSandbox) to the verdict the decider reads."""
    return SandboxVerdicts(pool)


@contextlib.asynccontextmanager
async def sandbox_validation(settings: Settings) -> AsyncIterator[ValidateFn]:
    """The validator's validate function for the worker's lifetime: a started sandbox pool, or the sandbox
    server's client when TIERFLOW_SANDBOX_URL is set; closed on exit."""
    known = settings.with_secrets_known().sandbox  # endpoints resolved by now: scrub their secrets too
    if known.url:
        async with RemoteSandbox(known) as remote:
            yield sandbox_validate(remote)
        return
    pool = SandboxPool(known)
    await pool.start()
    try:
        yield sandbox_validate(pool)
    finally:
        await pool.close()
