"""KubernetesLauncher: workloads as Jobs (training) and Deployments (inference tiers), the `Launcher` port.

Wired in by deploy/bootstrap.py for `TIERFLOW_LAUNCHER=kubernetes`; the orchestrator agent calls it. Manifests
come from the pure builders of deploy/manifests.py; every Kubernetes call goes through `KubernetesApi`, thin
keyword-only wrappers around the official client (blocking, so each call runs in `asyncio.to_thread`) that
turn API errors into tierflow's taxonomy (streams/errors.py, as the `Launcher` port declares), saying what
happens next:
- `TemporaryError(delay_s=...)`: retry after `delay_s` seconds (429, 5xx, API unreachable);
- `PermanentError`: the same request will fail again (400, 401, 403, 422...); the message says what to fix.
`AlreadyExistsError` (409 on create) and `NotFoundError` (404) are permanent errors the launcher expects:
a replayed launch finds its workload there (success), a stop of a gone workload has nothing to do (success).

The API server applies label selectors; this launcher filters on the labels again all the same (the
`kmock` emulator of the tests ignores selectors, and it costs nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from tierflow.deploy.manifests import (
    ANNOTATION_NAME,
    CONTAINER,
    TierPlacement,
    dns_name,
    inference_deployment,
    training_job,
    workload_secret,
    workload_secret_name,
)
from tierflow.streams.errors import PermanentError, TemporaryError
from tierflow.streams.launcher import (
    LABEL_KIND,
    LABEL_MANAGED,
    MANAGED_BY,
    WorkloadKind,
    WorkloadPhase,
    WorkloadRefused,
    WorkloadSpec,
    WorkloadStatus,
)
from tierflow.streams.settings import WorkloadSettings

log = logging.getLogger("tierflow.launcher.kubernetes")

T = TypeVar("T")
LOG_TAIL_LINES = 20
_EXIT_CODE = re.compile(r"exit code (\d+)")


# --- error taxonomy ------------------------------------------------------------------------------------

#: A failed Kubernetes call: PermanentError (fix what the message names: RBAC, namespace, manifest) or
#: TemporaryError (retry after `delay_s`: the API is overloaded, restarting or unreachable).
KubernetesError = PermanentError | TemporaryError


class AlreadyExistsError(PermanentError):
    """409 on create: an object of that name exists (a replayed launch)."""


class NotFoundError(PermanentError):
    """404: the object (or the namespace, or the resource type) does not exist."""


_ADVICE = {
    400: "the request was malformed (a bug in deploy/manifests.py)",
    401: "the credentials were refused: check the service account token or kubeconfig",
    403: "permission denied: apply the Role and RoleBinding of `rbac_objects(namespace)` for this service account",
    404: "not found",
    405: "the API server does not allow this verb here",
    422: "the manifest was rejected as invalid",
}


def classify(status: int, message: str, *, what: str, retry_after: str | None = None) -> KubernetesError:
    """The taxonomy error for an API answer (pure)."""
    text = f"{what}: HTTP {status}: {message}"
    if status == 409:
        return AlreadyExistsError(text)
    if status == 404:
        return NotFoundError(text)
    if status == 429:
        delay = float(retry_after) if retry_after and retry_after.isdigit() else 1.0
        return TemporaryError(f"{text} (throttled; retrying in {delay:g} s)", delay_s=delay)
    if status >= 500 or status in (0, 408, 410):
        return TemporaryError(f"{text} (the API server failed; retrying)", delay_s=5.0)
    return PermanentError(f"{text} ({_ADVICE.get(status, 'retrying will not help')})")


def _from_api_exception(exc: ApiException, what: str) -> KubernetesError:
    headers = exc.headers or {}
    message = str(exc.body or exc.reason or "")
    return classify(int(exc.status or 0), message[:500], what=what, retry_after=headers.get("Retry-After"))


# --- thin wrappers around the official client ----------------------------------------------------------

class Meta(NamedTuple):
    """The metadata fields the launcher reads, with None made empty (the client types every field Optional)."""

    name: str
    uid: str
    labels: dict[str, str]
    annotations: dict[str, str]
    created: str
    deleting: bool


def meta_of(obj: Any) -> Meta:
    """`obj.metadata` of a Job, Deployment or Pod."""
    meta = obj.metadata or k8s.V1ObjectMeta()
    return Meta(name=meta.name or "", uid=meta.uid or "", labels=dict(meta.labels or {}),
                annotations=dict(meta.annotations or {}), created=str(meta.creation_timestamp or ""),
                deleting=meta.deletion_timestamp is not None)


class KubernetesApi:
    """Keyword-only async wrappers: one call each, run in a thread, errors translated to the taxonomy."""

    def __init__(self, api_client: k8s.ApiClient, *, request_timeout_s: float = 30.0) -> None:
        self.batch = k8s.BatchV1Api(api_client)
        self.apps = k8s.AppsV1Api(api_client)
        self.core = k8s.CoreV1Api(api_client)
        self.request_timeout_s = request_timeout_s

    async def _call(self, what: str, fn: Callable[..., T], **kwargs: Any) -> T:
        call = functools.partial(fn, _request_timeout=self.request_timeout_s, **kwargs)
        try:
            return await asyncio.to_thread(call)
        except ApiException as exc:
            raise _from_api_exception(exc, what) from exc
        except urllib3.exceptions.HTTPError as exc:
            raise TemporaryError(f"{what}: the Kubernetes API is unreachable: {exc}", delay_s=5.0) from exc

    async def create_job(self, *, namespace: str, body: k8s.V1Job) -> k8s.V1Job:
        return await self._call(f"create Job {meta_of(body).name}", self.batch.create_namespaced_job,
                                namespace=namespace, body=body)

    async def delete_job(self, *, namespace: str, name: str) -> None:
        await self._call(f"delete Job {name}", self.batch.delete_namespaced_job, namespace=namespace, name=name,
                         propagation_policy="Background")

    async def list_jobs(self, *, namespace: str, label_selector: str) -> list[k8s.V1Job]:
        answer = await self._call("list Jobs", self.batch.list_namespaced_job, namespace=namespace,
                                  label_selector=label_selector)
        return list(answer.items)

    async def create_deployment(self, *, namespace: str, body: k8s.V1Deployment) -> k8s.V1Deployment:
        return await self._call(f"create Deployment {meta_of(body).name}", self.apps.create_namespaced_deployment,
                                namespace=namespace, body=body)

    async def delete_deployment(self, *, namespace: str, name: str) -> None:
        await self._call(f"delete Deployment {name}", self.apps.delete_namespaced_deployment, namespace=namespace,
                         name=name, propagation_policy="Background")

    async def list_deployments(self, *, namespace: str, label_selector: str) -> list[k8s.V1Deployment]:
        answer = await self._call("list Deployments", self.apps.list_namespaced_deployment, namespace=namespace,
                                  label_selector=label_selector)
        return list(answer.items)

    async def read_job(self, *, namespace: str, name: str) -> k8s.V1Job:
        return await self._call(f"read Job {name}", self.batch.read_namespaced_job, namespace=namespace, name=name)

    async def read_deployment(self, *, namespace: str, name: str) -> k8s.V1Deployment:
        return await self._call(f"read Deployment {name}", self.apps.read_namespaced_deployment,
                                namespace=namespace, name=name)

    async def create_secret(self, *, namespace: str, body: k8s.V1Secret) -> k8s.V1Secret:
        return await self._call(f"create Secret {meta_of(body).name}", self.core.create_namespaced_secret,
                                namespace=namespace, body=body)

    async def delete_secret(self, *, namespace: str, name: str) -> None:
        await self._call(f"delete Secret {name}", self.core.delete_namespaced_secret, namespace=namespace,
                         name=name, propagation_policy="Background")

    async def list_pods(self, *, namespace: str, label_selector: str) -> list[k8s.V1Pod]:
        answer = await self._call("list Pods", self.core.list_namespaced_pod, namespace=namespace,
                                  label_selector=label_selector)
        return list(answer.items)

    async def read_pod_log(self, *, namespace: str, name: str, container: str, tail_lines: int) -> str:
        text = await self._call(f"read the log of Pod {name}", self.core.read_namespaced_pod_log,
                                namespace=namespace, name=name, container=container, tail_lines=tail_lines)
        return str(text)


#: Connection errors are retried at once; HTTP answers are not: a 429's Retry-After (or a 503) comes back as
#: `TemporaryError(delay=...)` instead of blocking a thread (urllib3's default sleeps out Retry-After, 3 times).
RETRIES = urllib3.util.Retry(total=2, status=0, respect_retry_after_header=False)


def load_api_client() -> k8s.ApiClient:
    """A client configured from the pod's service account, or from kubeconfig outside a cluster."""
    configuration = k8s.Configuration()
    configuration.retries = RETRIES
    try:
        k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except k8s_config.ConfigException:
        try:
            k8s_config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except (k8s_config.ConfigException, OSError) as exc:
            raise PermanentError(
                "no Kubernetes configuration: run the worker in a pod with a service account, or provide a "
                f"kubeconfig (~/.kube/config or KUBECONFIG); or use TIERFLOW_LAUNCHER=local ({exc})"
            ) from exc
    return k8s.ApiClient(configuration)


# --- status (pure) -------------------------------------------------------------------------------------

def _true_conditions(job: k8s.V1Job) -> dict[str, k8s.V1JobCondition]:
    conditions = (job.status.conditions if job.status else None) or []
    return {c.type: c for c in conditions if c.status == "True"}


def job_status(job: k8s.V1Job, log_tail: str = "") -> WorkloadStatus:
    """A Job's phase: conditions first (Complete/SuccessCriteriaMet, Failed/FailureTarget), then pod counts."""
    meta = meta_of(job)
    labels, name = meta.labels, meta.annotations.get(ANNOTATION_NAME, meta.name)
    kind = labels.get(LABEL_KIND, WorkloadKind.TRAINING)
    conditions = _true_conditions(job)
    status = job.status or k8s.V1JobStatus()
    backoff_limit = job.spec.backoff_limit if job.spec and job.spec.backoff_limit is not None else 6
    failed = next((conditions[t] for t in ("Failed", "FailureTarget") if t in conditions), None)
    succeeded = "Complete" in conditions or "SuccessCriteriaMet" in conditions or (status.succeeded or 0) > 0
    if failed is None and succeeded:
        return WorkloadStatus(name, kind, labels, WorkloadPhase.SUCCEEDED, exit_code=0)
    if failed is None and (status.failed or 0) <= backoff_limit:
        return WorkloadStatus(name, kind, labels, WorkloadPhase.RUNNING)
    if failed is not None:
        why = f"{failed.reason or 'Failed'}: {failed.message or 'no message'}"
    else:
        why = f"{status.failed} pod(s) failed, more than backoffLimit {backoff_limit}"
    match = _EXIT_CODE.search(why)
    exit_code = int(match.group(1)) if match else None
    log_part = f"\nlast log lines:\n{log_tail.rstrip()}" if log_tail.strip() else ""
    reason = f"Job {meta.name} failed: {why}{log_part}"
    return WorkloadStatus(name, kind, labels, WorkloadPhase.FAILED, exit_code=exit_code, reason=reason)


def deployment_status(deployment: k8s.V1Deployment) -> WorkloadStatus:
    """A Deployment runs until it is removed (its pods restart on failure)."""
    meta = meta_of(deployment)
    name = meta.annotations.get(ANNOTATION_NAME, meta.name)
    return WorkloadStatus(name, meta.labels.get(LABEL_KIND, WorkloadKind.INFERENCE), meta.labels, WorkloadPhase.RUNNING)


def _ours(obj: Any, kind: str | None) -> bool:
    """Managed by tierflow, of the kind asked for, and not being deleted."""
    meta = meta_of(obj)
    return (meta.labels.get(LABEL_MANAGED) == MANAGED_BY and (kind is None or meta.labels.get(LABEL_KIND) == kind)
            and not meta.deleting)


# --- the launcher --------------------------------------------------------------------------------------

class KubernetesLauncher:
    """Training workloads as Jobs, inference tiers as Deployments, in `settings.namespace`, image `settings.image`.

    `api_client`: a configured client (tests point one at kmock); by default one is loaded from the
    service account or kubeconfig, and `close()` closes it. Jobs keep finished pods `ttl_seconds_after_finished`
    (the orchestrator never retrains a finished result, even after the Job is garbage-collected).
    """

    def __init__(self, settings: WorkloadSettings, api_client: k8s.ApiClient | None = None, *,
                 placement: TierPlacement | None = None, service_account: str | None = None,
                 backoff_limit: int = 0, ttl_seconds_after_finished: int = 3600,
                 request_timeout_s: float = 30.0) -> None:
        self.settings = settings
        self._owns_client = api_client is None
        self.api_client = api_client if api_client is not None else load_api_client()
        self.api = KubernetesApi(self.api_client, request_timeout_s=request_timeout_s)
        self.placement = placement or TierPlacement(node_label=settings.tier_node_label,
                                                    kubeedge_tiers=settings.kubeedge_tiers)
        self.service_account = service_account or settings.service_account or None
        self.backoff_limit = backoff_limit
        self.ttl_seconds_after_finished = ttl_seconds_after_finished
        self._log_tails: dict[tuple[str, str], str] = {}  # (Job name, uid) -> last log lines, read once

    @property
    def namespace(self) -> str:
        return self.settings.namespace

    def training_job(self, spec: WorkloadSpec) -> k8s.V1Job:
        return training_job(spec, image=self.settings.image, namespace=self.namespace,
                            backoff_limit=self.backoff_limit,
                            ttl_seconds_after_finished=self.ttl_seconds_after_finished,
                            service_account=self.service_account, env_secret=self.settings.secret or None)

    def inference_deployment(self, spec: WorkloadSpec) -> k8s.V1Deployment:
        return inference_deployment(spec, image=self.settings.image, namespace=self.namespace,
                                    placement=self.placement, service_account=self.service_account,
                                    env_secret=self.settings.secret or None)

    async def launch(self, spec: WorkloadSpec) -> None:
        """Create the Job or Deployment, then its own Secret (`spec.secrets`: its token), owned by it. Until the
        Secret exists the pod waits (CreateContainerConfigError, retried by the kubelet); a replayed launch
        creates a Secret lost between the two calls."""
        name = dns_name(spec.name)
        owner: Any
        try:
            if spec.kind == WorkloadKind.TRAINING:
                owner = await self.api.create_job(namespace=self.namespace, body=self.training_job(spec))
            elif spec.kind == WorkloadKind.INFERENCE:
                owner = await self.api.create_deployment(namespace=self.namespace,
                                                         body=self.inference_deployment(spec))
            else:
                raise WorkloadRefused(f"workload {spec.name}: unknown kind {spec.kind!r} (training or inference)")
        except AlreadyExistsError:
            log.debug("workload %s exists already: launched", spec.name)
            if not spec.secrets:
                return
            read = self.api.read_job if spec.kind == WorkloadKind.TRAINING else self.api.read_deployment
            owner = await read(namespace=self.namespace, name=name)
        if spec.secrets:
            with contextlib.suppress(AlreadyExistsError):
                await self.api.create_secret(namespace=self.namespace,
                                             body=workload_secret(spec, namespace=self.namespace, owner=owner))

    async def stop(self, name: str) -> None:
        # The name alone does not say the kind: remove a Job and a Deployment of that name, whichever exists.
        # Their Secret goes with them (owner reference); it is deleted here too, for a cluster whose garbage
        # collector lags and for one created without an owner.
        object_name = dns_name(name)
        with contextlib.suppress(NotFoundError):
            await self.api.delete_job(namespace=self.namespace, name=object_name)
        with contextlib.suppress(NotFoundError):
            await self.api.delete_deployment(namespace=self.namespace, name=object_name)
        with contextlib.suppress(NotFoundError):
            await self.api.delete_secret(namespace=self.namespace, name=workload_secret_name(name))

    async def list(self, kind: str | None = None) -> list[WorkloadStatus]:
        selector = f"{LABEL_MANAGED}={MANAGED_BY}" + (f",{LABEL_KIND}={kind}" if kind else "")
        statuses: list[WorkloadStatus] = []
        if kind in (None, WorkloadKind.TRAINING):
            jobs = [j for j in await self.api.list_jobs(namespace=self.namespace, label_selector=selector)
                    if _ours(j, kind)]
            for job in jobs:
                status = job_status(job)
                if status.phase == WorkloadPhase.FAILED:
                    status = job_status(job, await self._log_tail(job))
                statuses.append(status)
            listed = {(meta_of(j).name, meta_of(j).uid) for j in jobs}
            self._log_tails = {key: tail for key, tail in self._log_tails.items() if key in listed}
        if kind in (None, WorkloadKind.INFERENCE):
            deployments = await self.api.list_deployments(namespace=self.namespace, label_selector=selector)
            statuses.extend(deployment_status(d) for d in deployments if _ours(d, kind))
        return statuses

    async def _log_tail(self, job: k8s.V1Job) -> str:
        """The last log lines of a failed Job's newest pod (read once per Job; "" when its pods are gone)."""
        meta = meta_of(job)
        key = (meta.name, meta.uid)
        if key not in self._log_tails:
            tail = await self._read_log_tail(meta.name)
            if tail is None:
                return ""  # try again at the next list()
            self._log_tails[key] = tail
        return self._log_tails[key]

    async def _read_log_tail(self, job_name: str) -> str | None:
        try:
            pods = await self.api.list_pods(namespace=self.namespace, label_selector=f"job-name={job_name}")
            metas = [m for m in map(meta_of, pods) if m.labels.get("job-name") == job_name]
            if not metas:
                return ""
            newest = max(metas, key=lambda m: m.created)
            return await self.api.read_pod_log(namespace=self.namespace, name=newest.name,
                                               container=CONTAINER, tail_lines=LOG_TAIL_LINES)
        except (PermanentError, TemporaryError) as exc:
            # The failure is reported all the same; only its log lines are missing.
            log.warning("no log lines for failed Job %s: %s", job_name, exc)
            return None if isinstance(exc, TemporaryError) else ""

    async def stop_all(self) -> None:
        """Nothing: Jobs and Deployments outlive the worker, and a restarted worker finds them."""

    async def close(self) -> None:
        """Close the client this launcher created; Jobs and Deployments keep running."""
        if self._owns_client:
            self.api_client.close()  # type: ignore[no-untyped-call]
