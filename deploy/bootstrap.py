"""The front door's wiring, as cosmicpython's bootstrap: the adapters the control-plane worker runs with.

`tierflow worker` (deploy/cli.py) hands these to `streams.worker.run_worker`, which imports neither the sandbox
nor a launcher (the control plane sits below the tiers and below deploy):

* `make_launcher`: which launcher the orchestrator uses. `TIERFLOW_LAUNCHER=local` (the embedded stack):
  workloads are subprocesses with state and logs under `<home>/workloads`. `TIERFLOW_LAUNCHER=kubernetes`: Jobs
  and Deployments in `TIERFLOW_NAMESPACE`, through the official client configured from the pod's service
  account (or ~/.kube/config outside a cluster).
* `sandbox_validation`: the validator's verdicts come from a warm pool of single-use sandboxes
  (tiers/sandbox.py), open for the worker's lifetime; `sandbox_validate(pool)` adapts one pool to the verdict
  the decider reads (the tests pass their own session pool through it).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from tierflow.streams.envelope import JSON
from tierflow.streams.launcher import Launcher
from tierflow.streams.settings import Settings
from tierflow.streams.validator import ValidateFn
from tierflow.tiers.sandbox import CodeInvalid, SandboxError, SandboxPool


def make_launcher(settings: Settings) -> Launcher:
    if settings.workloads.launcher == "kubernetes":
        from tierflow.deploy.kubernetes_launcher import KubernetesLauncher

        return KubernetesLauncher(settings.workloads)
    from tierflow.deploy.local_launcher import LocalLauncher

    env = {**settings.workload_env(), "PYTHONUNBUFFERED": "1"}  # as the orchestrator gives each spec
    return LocalLauncher(settings.stack.home.resolve() / "workloads", env)


def sandbox_validate(pool: SandboxPool) -> ValidateFn:
    """Adapt a SandboxPool to the verdict the decider reads."""

    async def validate(code: str, imports: str) -> JSON:
        try:
            summary = await pool.validate(code, imports)
        except CodeInvalid as exc:
            return {"ok": False, "error": str(exc)}
        except SandboxError as exc:
            return {"ok": False, "error": f"the sandbox stopped building it: {exc}"}
        result: JSON = summary.to_dict()
        return {"ok": True, "summary": result}

    return validate


@contextlib.asynccontextmanager
async def sandbox_validation(settings: Settings) -> AsyncIterator[ValidateFn]:
    """A started sandbox pool for the worker's lifetime, as the validator's validate function; closed on exit."""
    pool = SandboxPool(settings.with_secrets_known().sandbox)  # endpoints resolved by now: scrub their secrets too
    await pool.start()
    try:
        yield sandbox_validate(pool)
    finally:
        await pool.close()
