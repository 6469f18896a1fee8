"""Kubernetes manifests of tierflow workloads, built by pure functions (no I/O).

Called by `deploy/kubernetes_launcher.py` (which sends the objects through the official client) and usable
to write the kustomize manifests of cluster mode (`as_manifest` gives the plain camelCase dict).

Every workload runs the one `tierflow` image with `["tierflow", *spec.args]` in a container named
`tierflow`; every object carries `spec.labels` plus `app.kubernetes.io/managed-by=tierflow` and
`tierflow.io/kind`, and the original workload name in the annotation `tierflow.io/name` (object names are
sanitised to DNS-1123 labels, so `list()` can give back the name the orchestrator asked for).

Exit-code contract of workloads (what a training Job's `podFailurePolicy` relies on):
- 0: done (the report was acknowledged);
- 2 (`EXIT_PERMANENT`): permanent error, e.g. bad input or bad model code; retrying cannot help, so the
  Job fails at once (`FailJob`) whatever its `backoffLimit`;
- anything else (crash, OOM kill 137, broker unreachable): transient; the pod counts towards `backoffLimit`.
Pods evicted or preempted (condition `DisruptionTarget`) are ignored: they are retried without counting.

Tier agents (inference Deployments) serve HTTP on the port in their env `TIERFLOW_TIER_PORT` (the builder
sets `DEFAULT_TIER_PORT` when the spec does not): `GET /healthz` (liveness; also the startup probe, which
gives TensorFlow time to load) and `GET /readyz` (readiness: model loaded, consumer assigned), the same
paths as the API.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from kubernetes import client as k8s

from tierflow.streams.launcher import LABEL_KIND, LABEL_MANAGED, LABEL_TIER, MANAGED_BY, WorkloadSpec
from tierflow.streams.settings import stack_secret_names

CONTAINER = "tierflow"
#: Annotation holding the workload name as the orchestrator gave it (object names are sanitised).
ANNOTATION_NAME = "tierflow.io/name"
#: Pod label selecting the pods of one workload (a Deployment's immutable selector).
LABEL_WORKLOAD = "tierflow.io/workload"
#: KubeEdge's role label (and taint) of edge nodes.
LABEL_KUBEEDGE_EDGE = "node-role.kubernetes.io/edge"
GPU_RESOURCE = "nvidia.com/gpu"
EXIT_PERMANENT = 2
TIER_PORT_ENV = "TIERFLOW_TIER_PORT"
DEFAULT_TIER_PORT = 8000
LIVENESS_PATH = "/healthz"
READINESS_PATH = "/readyz"

_MAX_NAME = 63
_INVALID_NAME = re.compile(r"[^a-z0-9-]+")
_INVALID_LABEL_VALUE = re.compile(r"[^A-Za-z0-9._-]+")


# --- names and labels ----------------------------------------------------------------------------------

def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:8]


def dns_name(name: str, *, max_length: int = _MAX_NAME) -> str:
    """`name` as a DNS-1123 label; a name that had to change gets a hash suffix so two names never merge."""
    cleaned = _INVALID_NAME.sub("-", name.lower()).strip("-")
    if cleaned == name and len(cleaned) <= max_length:
        return cleaned
    stem = cleaned[: max_length - 9].rstrip("-") or "tierflow"
    return f"{stem}-{_digest(name)}"


def label_value(value: str) -> str:
    """`value` as a valid label value (<= 63 characters of [A-Za-z0-9._-], alphanumeric at both ends)."""
    cleaned = _INVALID_LABEL_VALUE.sub("-", value).strip("._-")
    if cleaned == value and len(cleaned) <= _MAX_NAME:
        return cleaned
    stem = cleaned[: _MAX_NAME - 9].rstrip("._-")
    return f"{stem}-{_digest(value)}" if stem else _digest(value)


def workload_labels(spec: WorkloadSpec) -> dict[str, str]:
    """The labels of a workload's objects and pods: the spec's, plus the ones the orchestrator selects on."""
    labels = {key: label_value(value) for key, value in spec.labels.items()}
    labels[LABEL_MANAGED] = MANAGED_BY
    labels[LABEL_KIND] = label_value(spec.kind)
    return labels


def _metadata(spec: WorkloadSpec, namespace: str | None, extra_labels: Mapping[str, str] = {}) -> k8s.V1ObjectMeta:
    """Object metadata (with `namespace`) or pod template metadata (without, with `extra_labels`)."""
    return k8s.V1ObjectMeta(
        name=dns_name(spec.name) if namespace is not None else None,
        namespace=namespace,
        labels={**workload_labels(spec), **extra_labels},
        annotations={ANNOTATION_NAME: spec.name},
    )


# --- pod template parts --------------------------------------------------------------------------------

def _env(env: Mapping[str, str]) -> list[k8s.V1EnvVar]:
    return [k8s.V1EnvVar(name=key, value=value) for key, value in sorted(env.items())]


def _resources(spec: WorkloadSpec) -> k8s.V1ResourceRequirements:
    # CPU is requested, not limited: a CPU limit throttles TensorFlow's thread pools. Memory is both, so an
    # oversized model fails with OOMKilled (137) instead of starving its neighbours.
    requests = {"cpu": spec.resources.cpu, "memory": spec.resources.memory}
    limits = {"memory": spec.resources.memory}
    if spec.resources.gpu > 0:
        limits[GPU_RESOURCE] = str(spec.resources.gpu)
    return k8s.V1ResourceRequirements(requests=requests, limits=limits)


def _gpu_tolerations(spec: WorkloadSpec) -> list[k8s.V1Toleration]:
    if spec.resources.gpu <= 0:
        return []
    return [k8s.V1Toleration(key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")]


def workload_secret_name(workload: str) -> str:
    """The Secret holding the own `spec.secrets` (its scoped API token) of the workload named `workload`."""
    return dns_name(f"{workload}-token")


def _container(spec: WorkloadSpec, image: str, env: Mapping[str, str], env_secret: str | None = None
               ) -> k8s.V1Container:
    # The stack's secrets never go into a spec (readable by anyone who may list Jobs), whoever handed them in;
    # the workload's own secrets come from its Secret.
    plain = {key: value for key, value in env.items() if key not in stack_secret_names()}
    secrets = [name for name in (env_secret, workload_secret_name(spec.name) if spec.secrets else None) if name]
    return k8s.V1Container(
        name=CONTAINER,
        image=image,
        command=["tierflow", *spec.args],
        env=_env(plain) or None,
        env_from=[k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=name)) for name in secrets] or None,
        resources=_resources(spec),
        security_context=k8s.V1SecurityContext(allow_privilege_escalation=False,
                                               capabilities=k8s.V1Capabilities(drop=["ALL"])),
    )


def _pod_security() -> k8s.V1PodSecurityContext:
    """Pod Security "restricted": workloads need no privilege (the image's user is non-root)."""
    return k8s.V1PodSecurityContext(run_as_non_root=True,
                                    seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"))


# --- training: a Job -----------------------------------------------------------------------------------

def pod_failure_policy() -> k8s.V1PodFailurePolicy:
    """FailJob on the permanent exit code; evictions and preemptions do not count as failures."""
    return k8s.V1PodFailurePolicy(rules=[
        k8s.V1PodFailurePolicyRule(
            action="FailJob",
            on_exit_codes=k8s.V1PodFailurePolicyOnExitCodesRequirement(
                container_name=CONTAINER, operator="In", values=[EXIT_PERMANENT],
            ),
        ),
        k8s.V1PodFailurePolicyRule(
            action="Ignore",
            on_pod_conditions=[k8s.V1PodFailurePolicyOnPodConditionsPattern(type="DisruptionTarget", status="True")],
        ),
    ])


def training_job(
    spec: WorkloadSpec,
    *,
    image: str,
    namespace: str,
    backoff_limit: int = 0,
    ttl_seconds_after_finished: int = 3600,
    service_account: str | None = None,
    env_secret: str | None = None,
) -> k8s.V1Job:
    """The Job running one training workload once (restartPolicy Never; retries are the Job's, by policy)."""
    pod = k8s.V1PodSpec(
        containers=[_container(spec, image, spec.env, env_secret)],
        restart_policy="Never",
        node_selector=dict(spec.node_selector) or None,
        tolerations=_gpu_tolerations(spec) or None,
        service_account_name=service_account,
        # Workloads talk to Kafka and the API, never to Kubernetes.
        automount_service_account_token=service_account is not None,
        security_context=_pod_security(),
    )
    return k8s.V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=_metadata(spec, namespace),
        spec=k8s.V1JobSpec(
            backoff_limit=backoff_limit,
            ttl_seconds_after_finished=ttl_seconds_after_finished,
            pod_failure_policy=pod_failure_policy(),
            template=k8s.V1PodTemplateSpec(metadata=_metadata(spec, None), spec=pod),
        ),
    )


# --- inference tiers: a Deployment ---------------------------------------------------------------------

@dataclass(frozen=True)
class TierPlacement:
    """Where tier pods are scheduled when the spec gives no explicit `node_selector` for a key."""

    #: Node label whose value names the tier a node serves: a pod of tier `t` (its `tierflow.io/tier` label:
    #: the tier's index or name, as the orchestrator sets it) selects nodes labelled `<node_label>=t`.
    #: "" disables the default selector.
    node_label: str = LABEL_TIER
    #: Tiers (values of the pod's tier label) that run on KubeEdge edge nodes: their pods also select
    #: `node-role.kubernetes.io/edge` and tolerate its NoSchedule taint.
    kubeedge_tiers: frozenset[str] = frozenset()


def tier_node_selector(spec: WorkloadSpec, placement: TierPlacement) -> dict[str, str]:
    """Default tier selector, then the KubeEdge role, then the spec's own selector (which wins)."""
    selector: dict[str, str] = {}
    tier = spec.labels.get(LABEL_TIER)
    if tier is not None and placement.node_label:
        selector[placement.node_label] = label_value(tier)
    if tier is not None and tier in placement.kubeedge_tiers:
        selector[LABEL_KUBEEDGE_EDGE] = ""
    selector.update(spec.node_selector)
    return selector


def tier_port(spec: WorkloadSpec) -> int:
    """The HTTP port of a tier agent (`TIERFLOW_TIER_PORT` in the spec's env, else `DEFAULT_TIER_PORT`)."""
    raw = spec.env.get(TIER_PORT_ENV)
    if raw is None:
        return DEFAULT_TIER_PORT
    port = int(raw)
    if not 0 < port < 65536:
        raise ValueError(f"{TIER_PORT_ENV}={raw!r} in workload {spec.name!r} is not a TCP port")
    return port


def _probe(path: str, *, period_s: int, failures: int) -> k8s.V1Probe:
    return k8s.V1Probe(
        http_get=k8s.V1HTTPGetAction(path=path, port="http"),
        period_seconds=period_s,
        failure_threshold=failures,
        timeout_seconds=2,
    )


def inference_deployment(
    spec: WorkloadSpec,
    *,
    image: str,
    namespace: str,
    probes: bool = True,
    placement: TierPlacement | None = None,
    service_account: str | None = None,
    env_secret: str | None = None,
) -> k8s.V1Deployment:
    """The Deployment running one inference tier with `spec.replicas` pods (one consumer group)."""
    placement = placement or TierPlacement()
    name = dns_name(spec.name)
    port = tier_port(spec)
    container = _container(spec, image, {**spec.env, TIER_PORT_ENV: str(port)}, env_secret)
    container.ports = [k8s.V1ContainerPort(name="http", container_port=port, protocol="TCP")]
    if probes:
        # Startup allows 5 minutes for TensorFlow and the model to load before liveness applies.
        container.startup_probe = _probe(LIVENESS_PATH, period_s=5, failures=60)
        container.liveness_probe = _probe(LIVENESS_PATH, period_s=10, failures=3)
        container.readiness_probe = _probe(READINESS_PATH, period_s=5, failures=3)
    tolerations = _gpu_tolerations(spec)
    if spec.labels.get(LABEL_TIER) in placement.kubeedge_tiers:
        tolerations.append(k8s.V1Toleration(key=LABEL_KUBEEDGE_EDGE, operator="Exists", effect="NoSchedule"))
    return k8s.V1Deployment(
        api_version="apps/v1",
        kind="Deployment",
        metadata=_metadata(spec, namespace),
        spec=k8s.V1DeploymentSpec(
            replicas=spec.replicas,
            selector=k8s.V1LabelSelector(match_labels={LABEL_WORKLOAD: name}),
            template=k8s.V1PodTemplateSpec(
                metadata=_metadata(spec, None, {LABEL_WORKLOAD: name}),
                spec=k8s.V1PodSpec(
                    containers=[container],
                    node_selector=tier_node_selector(spec, placement) or None,
                    tolerations=tolerations or None,
                    service_account_name=service_account,
                    automount_service_account_token=service_account is not None,
                    security_context=_pod_security(),
                ),
            ),
        ),
    )


# --- a workload's own Secret ----------------------------------------------------------------------------

def workload_secret(spec: WorkloadSpec, *, namespace: str, owner: Any = None) -> k8s.V1Secret:
    """The Secret of `spec.secrets`, owned by the workload's Job or Deployment (`owner`, as the API server
    answered its creation) so that Kubernetes deletes it with the workload."""
    metadata = _metadata(spec, namespace)
    metadata.name = workload_secret_name(spec.name)
    meta = getattr(owner, "metadata", None)
    if meta is not None and meta.uid:
        metadata.owner_references = [k8s.V1OwnerReference(api_version=owner.api_version, kind=owner.kind,
                                                           name=meta.name, uid=meta.uid)]
    return k8s.V1Secret(api_version="v1", kind="Secret", metadata=metadata, type="Opaque",
                        string_data=dict(spec.secrets))


# --- RBAC of the orchestrator (cluster mode) -----------------------------------------------------------

class RbacObjects(NamedTuple):
    service_account: k8s.V1ServiceAccount
    role: k8s.V1Role
    role_binding: k8s.V1RoleBinding


def rbac_objects(namespace: str, *, name: str = "tierflow-orchestrator") -> RbacObjects:
    """ServiceAccount, Role and RoleBinding the orchestrator needs in `namespace`, and nothing more:
    manage Jobs and Deployments (create, get, list, watch, delete), read pods and their logs (the last
    lines of a failed training), and create and delete each workload's own Secret (never read or list one)."""

    def meta() -> k8s.V1ObjectMeta:
        return k8s.V1ObjectMeta(name=name, namespace=namespace, labels={LABEL_MANAGED: MANAGED_BY})

    manage = ["create", "get", "list", "watch", "delete"]
    role = k8s.V1Role(
        api_version="rbac.authorization.k8s.io/v1",
        kind="Role",
        metadata=meta(),
        rules=[
            k8s.V1PolicyRule(api_groups=["batch"], resources=["jobs"], verbs=manage),
            k8s.V1PolicyRule(api_groups=["apps"], resources=["deployments"], verbs=manage),
            k8s.V1PolicyRule(api_groups=[""], resources=["pods"], verbs=["get", "list"]),
            k8s.V1PolicyRule(api_groups=[""], resources=["pods/log"], verbs=["get"]),
            # Each workload's own Secret (its scoped API token): created and deleted, never read or listed.
            k8s.V1PolicyRule(api_groups=[""], resources=["secrets"], verbs=["create", "delete"]),
        ],
    )
    binding = k8s.V1RoleBinding(
        api_version="rbac.authorization.k8s.io/v1",
        kind="RoleBinding",
        metadata=meta(),
        role_ref=k8s.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name=name),
        subjects=[k8s.RbacV1Subject(kind="ServiceAccount", name=name, namespace=namespace)],
    )
    account = k8s.V1ServiceAccount(api_version="v1", kind="ServiceAccount", metadata=meta())
    return RbacObjects(account, role, binding)


# --- serialisation ---------------------------------------------------------------------------------------

def _prune(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _prune(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_prune(item) for item in value]
    return value


def as_manifest(obj: Any) -> dict[str, Any]:
    """A built object as the plain dict `kubectl apply` takes (camelCase keys, unset fields left out)."""
    manifest: dict[str, Any] = _prune(obj.to_dict(serialize=True))
    return manifest
