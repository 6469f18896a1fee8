"""The Kubernetes manifest builders (deploy/manifests.py): pure functions, asserted on the dicts they serialise to."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tierflow.deploy.manifests import (
    ANNOTATION_NAME,
    DEFAULT_TIER_PORT,
    EXIT_PERMANENT,
    LABEL_KUBEEDGE_EDGE,
    LABEL_WORKLOAD,
    TierPlacement,
    as_manifest,
    dns_name,
    inference_deployment,
    label_value,
    rbac_objects,
    training_job,
)
from tierflow.streams.launcher import (
    LABEL_DEPLOYMENT,
    LABEL_KIND,
    LABEL_MANAGED,
    LABEL_RESULTS,
    LABEL_TIER,
    Resources,
    WorkloadSpec,
)

IMAGE = "registry.example/tierflow:1.2"
NS = "tierflow-test"
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def training_spec(**changes: Any) -> WorkloadSpec:
    fields: dict[str, Any] = {
        "name": "tierflow-train-3-4",
        "kind": "training",
        "args": ["train", "--deployment", "3", "--results", "4,5,6"],
        "env": {"KAFKA_BOOTSTRAP_SERVERS": "kafka:9092", "TIERFLOW_API_URL": "http://api:8080"},
        "labels": {LABEL_DEPLOYMENT: "3", LABEL_RESULTS: "4-5-6"},
        "resources": Resources(cpu="2", memory="4Gi"),
    }
    fields.update(changes)
    return WorkloadSpec(**fields)


def tier_spec(**changes: Any) -> WorkloadSpec:
    fields: dict[str, Any] = {
        "name": "tierflow-tier-7-0",
        "kind": "inference",
        "args": ["tier", "run", "--inference", "7", "--tier", "0"],
        "env": {"TIERFLOW_TIER_PORT": "9100"},
        "labels": {"tierflow.io/inference": "7", LABEL_TIER: "0"},
        "replicas": 3,
    }
    fields.update(changes)
    return WorkloadSpec(**fields)


def job_dict(spec: WorkloadSpec, **options: Any) -> dict[str, Any]:
    return as_manifest(training_job(spec, image=IMAGE, namespace=NS, **options))


def deployment_dict(spec: WorkloadSpec, **options: Any) -> dict[str, Any]:
    return as_manifest(inference_deployment(spec, image=IMAGE, namespace=NS, **options))


def pod_of(manifest: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = manifest["spec"]["template"]["spec"]
    return pod


def container_of(manifest: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod_of(manifest)["containers"]
    assert container["name"] == "tierflow"
    return dict(container)


# --- names and labels ----------------------------------------------------------------------------------

def test_valid_names_are_kept_and_others_become_distinct_dns_labels() -> None:
    assert dns_name("tierflow-train-3-4") == "tierflow-train-3-4"
    odd = ["Tierflow_Train.3", "tierflow_train_3", "-lead-", "x" * 100, "x" * 99 + "y", "ünïcode"]
    names = [dns_name(n) for n in odd]
    for name in names:
        assert DNS_1123.match(name) and len(name) <= 63, name
    assert len(set(names)) == len(odd)  # a name that had to change carries a hash: no two merge
    assert dns_name("Tierflow_Train.3") == dns_name("Tierflow_Train.3")  # deterministic (a replay finds it)


def test_label_values_are_sanitised() -> None:
    assert label_value("4-5-6") == "4-5-6"
    for raw in ["a b/c", "-x-", "9" * 80, "", "résumé"]:
        value = label_value(raw)
        assert LABEL_VALUE.match(value) and len(value) <= 63, (raw, value)


# --- training Jobs -------------------------------------------------------------------------------------

def test_training_job_runs_the_tierflow_command_in_the_image() -> None:
    job = job_dict(training_spec())
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    assert job["metadata"]["name"] == "tierflow-train-3-4"
    assert job["metadata"]["namespace"] == NS
    container = container_of(job)
    assert container["image"] == IMAGE
    assert container["command"] == ["tierflow", "train", "--deployment", "3", "--results", "4,5,6"]
    assert container["env"] == [{"name": "KAFKA_BOOTSTRAP_SERVERS", "value": "kafka:9092"},
                                {"name": "TIERFLOW_API_URL", "value": "http://api:8080"}]
    assert pod_of(job)["restartPolicy"] == "Never"


def test_training_job_labels_select_it_and_keep_its_name() -> None:
    job = job_dict(training_spec())
    expected = {LABEL_DEPLOYMENT: "3", LABEL_RESULTS: "4-5-6", LABEL_MANAGED: "tierflow", LABEL_KIND: "training"}
    assert job["metadata"]["labels"] == expected
    assert job["spec"]["template"]["metadata"]["labels"] == expected  # pods carry them too
    assert job["metadata"]["annotations"] == {ANNOTATION_NAME: "tierflow-train-3-4"}

    renamed = job_dict(training_spec(name="Train_Job"))
    assert DNS_1123.match(renamed["metadata"]["name"])
    assert renamed["metadata"]["annotations"][ANNOTATION_NAME] == "Train_Job"


def test_training_job_resources_without_and_with_gpu() -> None:
    cpu_only = job_dict(training_spec())
    assert container_of(cpu_only)["resources"] == {"requests": {"cpu": "2", "memory": "4Gi"},
                                                   "limits": {"memory": "4Gi"}}
    assert "tolerations" not in pod_of(cpu_only)

    gpu = job_dict(training_spec(resources=Resources(cpu="4", memory="16Gi", gpu=2)))
    assert container_of(gpu)["resources"]["limits"] == {"memory": "16Gi", "nvidia.com/gpu": "2"}
    assert pod_of(gpu)["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_training_job_retry_and_cleanup_policy() -> None:
    job = job_dict(training_spec())
    assert job["spec"]["backoffLimit"] == 0
    assert job["spec"]["ttlSecondsAfterFinished"] == 3600
    tuned = job_dict(training_spec(), backoff_limit=3, ttl_seconds_after_finished=600)
    assert (tuned["spec"]["backoffLimit"], tuned["spec"]["ttlSecondsAfterFinished"]) == (3, 600)


def test_pod_failure_policy_fails_fast_on_permanent_errors_and_ignores_disruptions() -> None:
    rules = job_dict(training_spec())["spec"]["podFailurePolicy"]["rules"]
    assert rules == [
        {"action": "FailJob",
         "onExitCodes": {"containerName": "tierflow", "operator": "In", "values": [EXIT_PERMANENT]}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]
    assert EXIT_PERMANENT == 2


def test_training_job_node_selector_and_service_account() -> None:
    plain = pod_of(job_dict(training_spec()))
    assert "nodeSelector" not in plain
    assert plain["automountServiceAccountToken"] is False  # workloads never call the Kubernetes API
    assert "serviceAccountName" not in plain

    placed = pod_of(job_dict(training_spec(node_selector={"gpu": "a100"}), service_account="trainer"))
    assert placed["nodeSelector"] == {"gpu": "a100"}
    assert placed["serviceAccountName"] == "trainer"
    assert placed["automountServiceAccountToken"] is True


# --- inference Deployments -----------------------------------------------------------------------------

def test_inference_deployment_replicas_selector_and_command() -> None:
    dep = deployment_dict(tier_spec())
    assert (dep["apiVersion"], dep["kind"]) == ("apps/v1", "Deployment")
    assert dep["metadata"]["name"] == "tierflow-tier-7-0"
    assert dep["metadata"]["labels"][LABEL_MANAGED] == "tierflow"
    assert dep["metadata"]["labels"][LABEL_KIND] == "inference"
    assert dep["spec"]["replicas"] == 3
    selector = dep["spec"]["selector"]["matchLabels"]
    assert selector == {LABEL_WORKLOAD: "tierflow-tier-7-0"}
    template_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= template_labels.items()
    assert template_labels[LABEL_TIER] == "0"
    container = container_of(dep)
    assert container["command"] == ["tierflow", "tier", "run", "--inference", "7", "--tier", "0"]
    assert container["image"] == IMAGE


def test_inference_probes_use_the_tier_port() -> None:
    container = container_of(deployment_dict(tier_spec()))
    assert container["ports"] == [{"name": "http", "containerPort": 9100, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert {"name": "TIERFLOW_TIER_PORT", "value": "9100"} in container["env"]


def test_inference_default_port_is_given_to_the_agent_and_probes_can_be_off() -> None:
    container = container_of(deployment_dict(tier_spec(env={})))
    assert container["ports"][0]["containerPort"] == DEFAULT_TIER_PORT
    assert container["env"] == [{"name": "TIERFLOW_TIER_PORT", "value": str(DEFAULT_TIER_PORT)}]

    bare = container_of(deployment_dict(tier_spec(), probes=False))
    assert not {"readinessProbe", "livenessProbe", "startupProbe"} & bare.keys()

    with pytest.raises(ValueError, match="TIERFLOW_TIER_PORT"):
        deployment_dict(tier_spec(env={"TIERFLOW_TIER_PORT": "70000"}))


def test_inference_tier_placement() -> None:
    # Default: pods of tier 0 go to nodes labelled tierflow.io/tier=0.
    assert pod_of(deployment_dict(tier_spec()))["nodeSelector"] == {LABEL_TIER: "0"}
    # A configurable node label, or none.
    custom = deployment_dict(tier_spec(), placement=TierPlacement(node_label="example.com/site"))
    assert pod_of(custom)["nodeSelector"] == {"example.com/site": "0"}
    assert "nodeSelector" not in pod_of(deployment_dict(tier_spec(), placement=TierPlacement(node_label="")))
    # KubeEdge: edge tiers also select the edge role and tolerate its taint; other tiers do not.
    edge = TierPlacement(kubeedge_tiers=frozenset({"0"}))
    edge_pod = pod_of(deployment_dict(tier_spec(), placement=edge))
    assert edge_pod["nodeSelector"] == {LABEL_TIER: "0", LABEL_KUBEEDGE_EDGE: ""}
    assert {"key": LABEL_KUBEEDGE_EDGE, "operator": "Exists", "effect": "NoSchedule"} in edge_pod["tolerations"]
    cloud_pod = pod_of(deployment_dict(tier_spec(labels={LABEL_TIER: "2"}), placement=edge))
    assert cloud_pod["nodeSelector"] == {LABEL_TIER: "2"}
    assert "tolerations" not in cloud_pod
    # The spec's own selector wins over the defaults.
    explicit = deployment_dict(tier_spec(node_selector={LABEL_TIER: "fog-a", "zone": "z1"}))
    assert pod_of(explicit)["nodeSelector"] == {LABEL_TIER: "fog-a", "zone": "z1"}


def test_inference_gpu_tier() -> None:
    dep = deployment_dict(tier_spec(resources=Resources(gpu=1)))
    assert container_of(dep)["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod_of(dep)["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


# --- RBAC ----------------------------------------------------------------------------------------------

def test_rbac_grants_the_orchestrator_only_what_it_uses() -> None:
    account, role, binding = (as_manifest(o) for o in rbac_objects(NS))
    assert account["kind"] == "ServiceAccount"
    assert account["metadata"] == {"name": "tierflow-orchestrator", "namespace": NS,
                                   "labels": {LABEL_MANAGED: "tierflow"}}
    assert role["kind"] == "Role" and role["metadata"]["namespace"] == NS  # a Role, not a ClusterRole
    manage = ["create", "get", "list", "watch", "delete"]
    assert role["rules"] == [
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": manage},
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": manage},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
        {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
        # Each workload's own Secret (its token): never read or listed, so no other Secret is exposed.
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "delete"]},
    ]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "tierflow-orchestrator"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tierflow-orchestrator", "namespace": NS}]


def test_manifests_leave_unset_fields_out() -> None:
    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for item in value.values():
                assert item is not None
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(job_dict(training_spec()))
    walk(deployment_dict(tier_spec()))


def test_workload_pods_meet_pod_security_restricted() -> None:
    for manifest in (job_dict(training_spec()), deployment_dict(tier_spec())):
        pod = pod_of(manifest)
        assert pod["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
        assert container_of(manifest)["securityContext"] == {"allowPrivilegeEscalation": False,
                                                             "capabilities": {"drop": ["ALL"]}}


def test_a_workload_secret_becomes_env_from_and_stays_out_of_the_spec() -> None:
    for manifest in (job_dict(training_spec(), env_secret="wl-secrets"),
                     deployment_dict(tier_spec(), env_secret="wl-secrets")):
        assert container_of(manifest)["envFrom"] == [{"secretRef": {"name": "wl-secrets"}}]
    assert "envFrom" not in container_of(job_dict(training_spec()))
