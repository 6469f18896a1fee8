"""Which launcher the worker's orchestrator uses: wired here, at the entry point, from the settings.

`TIERFLOW_LAUNCHER=local` (the embedded stack): workloads are subprocesses with state and logs under
`<home>/workloads`. `TIERFLOW_LAUNCHER=kubernetes`: Jobs and Deployments in `TIERFLOW_NAMESPACE`, through the
official client configured from the pod's service account (or ~/.kube/config outside a cluster).
"""

from __future__ import annotations

from tierflow.streams.launcher import Launcher
from tierflow.streams.settings import Settings


def make_launcher(settings: Settings) -> Launcher:
    if settings.workloads.launcher == "kubernetes":
        from tierflow.deploy.kubernetes_launcher import KubernetesLauncher

        return KubernetesLauncher(settings.workloads)
    from tierflow.deploy.local_launcher import LocalLauncher

    env = {**settings.workload_env(), "PYTHONUNBUFFERED": "1"}  # as the orchestrator gives each spec
    return LocalLauncher(settings.stack.home.resolve() / "workloads", env)
