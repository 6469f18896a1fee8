"""The orchestrator's port: how workloads (training jobs, tier agents) are started, listed and stopped.

Owned by `streams/` and implemented in `deploy/` (LocalLauncher: subprocesses; KubernetesLauncher: Jobs and
Deployments through the official client). The control plane never imports a Kubernetes client: the entry
point wires a launcher in (deploy/bootstrap.py). Workload names are deterministic
(`tierflow-train-<deployment>-<result>`), so a replayed launch finds the workload there and counts it as launched.

Errors (streams/errors.py): a launcher raises `TemporaryError` when the same call may work later (the cluster's
API throttles, restarts or cannot be reached, a process could not be spawned; `delay_s` says how long to wait),
and `PermanentError` when it will fail the same way again (permissions, a rejected manifest; `WorkloadRefused`: a
spec this launcher cannot run). The message says what to fix. Either ends the orchestrator's pass; the worker
restarts the orchestrator with backoff, and its next pass plans again from the projections.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from tierflow.streams.errors import PermanentError

#: Labels every workload carries; the orchestrator selects on them.
LABEL_MANAGED = "app.kubernetes.io/managed-by"
LABEL_KIND = "tierflow.io/kind"  # a WorkloadKind
LABEL_DEPLOYMENT = "tierflow.io/deployment"
LABEL_RESULTS = "tierflow.io/results"  # result ids joined by "-"
LABEL_INFERENCE = "tierflow.io/inference"
LABEL_TIER = "tierflow.io/tier"
MANAGED_BY = "tierflow"


class WorkloadKind(StrEnum):
    """What a workload runs (the `tierflow.io/kind` label)."""

    TRAINING = "training"  # a training job: runs once (a Kubernetes Job)
    INFERENCE = "inference"  # a tier agent: runs until it is removed (a Kubernetes Deployment)


class WorkloadPhase(StrEnum):
    """Where a workload is, as a launcher lists it."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class WorkloadRefused(PermanentError, ValueError):
    """A spec this launcher cannot run (an unknown kind, a name it cannot use): fix the spec, not the cluster.

    Also a ValueError: the spec is a bad argument."""


@dataclass(frozen=True)
class Resources:
    cpu: str = "1"
    memory: str = "2Gi"
    gpu: int = 0


@dataclass(frozen=True)
class WorkloadSpec:
    """One workload: the `tierflow` sub-command a pod (or a local subprocess) runs."""

    name: str
    kind: str  # a WorkloadKind
    args: list[str]  # arguments of the `tierflow` command, e.g. ["train", "--deployment", "3", ...]
    env: dict[str, str] = field(default_factory=dict)
    #: variables only this workload may see (its scoped API token): a launcher keeps them out of every record
    #: it writes (a local spec file, a Job or Deployment spec: Kubernetes gets a Secret the pod references).
    secrets: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    node_selector: dict[str, str] = field(default_factory=dict)
    replicas: int = 1  # inference tiers (Deployments); training runs once (Jobs)


@dataclass(frozen=True)
class WorkloadStatus:
    name: str
    kind: str
    labels: dict[str, str]
    phase: str  # a WorkloadPhase
    exit_code: int | None = None
    reason: str | None = None  # for failures: exit code, signal, last log lines

    @property
    def finished(self) -> bool:
        return self.phase in (WorkloadPhase.SUCCEEDED, WorkloadPhase.FAILED)


class Launcher(Protocol):
    """Starts, lists and stops workloads; raises TemporaryError or PermanentError (see the module docstring)."""

    async def launch(self, spec: WorkloadSpec) -> None:
        """Start the workload; an existing workload of that name counts as success (idempotent)."""

    async def stop(self, name: str) -> None:
        """Stop and remove the workload; a missing one counts as success (idempotent)."""

    async def list(self, kind: str | None = None) -> list[WorkloadStatus]:
        """The tierflow workloads that exist now (running or finished and not yet removed)."""

    async def stop_all(self) -> None:
        """At a graceful stop of the worker (`tierflow down`): stop the workloads that would otherwise be orphaned
        on this machine (local processes; the orchestrator relaunches open results on the next start). A no-op
        where workloads outlive the worker by design (Kubernetes: a restarted worker finds them)."""

    async def close(self) -> None:
        """Release clients; running workloads keep running (a restarted worker finds them)."""


def training_workload_name(deployment_id: int, result_id: int) -> str:
    return f"tierflow-train-{deployment_id}-{result_id}"


def results_label(result_ids: list[int]) -> str:
    return "-".join(str(r) for r in result_ids)


def parse_results_label(value: str) -> list[int]:
    return [int(v) for v in value.split("-") if v.isdigit()]
