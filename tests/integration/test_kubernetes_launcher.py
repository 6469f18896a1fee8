"""KubernetesLauncher: the official client over real HTTP against the kmock Kubernetes emulator.

kmock runs in this process (an aiohttp server on a free port: `KubernetesEmulator` + `Server`); the client's
blocking calls run in threads, so the emulator answers on the test's event loop. kmock stores the objects it is
sent and serves them back (create, 409 on a duplicate, list, patch, delete, 404), but it never runs a pod and
ignores label selectors: the tests assert on the stored objects, on status the test patches in, and on the
launcher's own label filtering, never on anything kmock cannot do.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
from kmock import KubernetesEmulator, Request, Server
from kubernetes import client as k8s

from tierflow.deploy.kubernetes_launcher import (
    RETRIES,
    AlreadyExistsError,
    KubernetesLauncher,
    NotFoundError,
    classify,
    job_status,
)
from tierflow.deploy.manifests import as_manifest
from tierflow.streams.errors import PermanentError, TemporaryError
from tierflow.streams.launcher import LABEL_KIND, LABEL_MANAGED, LABEL_RESULTS, LABEL_TIER, WorkloadSpec
from tierflow.streams.settings import WorkloadSettings

NS = "tierflow-test"
JOBS, DEPLOYMENTS, PODS = "batch/v1/jobs", "apps/v1/deployments", "v1/pods"
SETTINGS = WorkloadSettings(launcher="kubernetes", image="registry.example/tierflow:1.2", namespace=NS)


@dataclass
class Cluster:
    emulator: KubernetesEmulator
    launcher: KubernetesLauncher
    batch: k8s.BatchV1Api  # the test's own client, acting "behind the launcher's back"
    core: k8s.CoreV1Api

    def stored(self, resource: str, name: str) -> dict[str, Any]:
        raw: dict[str, Any] = self.emulator.objects[resource, NS, name].raw
        return raw

    def requests(self) -> list[Request]:
        """Every request the emulator served, in order (iterating a kmock view yields its requests)."""
        return list(self.emulator)

    def exists(self, resource: str, name: str) -> bool:
        try:
            return not self.emulator.objects[resource, NS, name].deleted
        except KeyError:
            return False


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with KubernetesEmulator() as emulator, Server(emulator) as server:
        # Declared resources list as empty before their first object (an undeclared one answers 404).
        for resource in (JOBS, DEPLOYMENTS, PODS):
            emulator.resources[resource] = {}
        configuration = k8s.Configuration(host=str(server.url).rstrip("/"))
        configuration.retries = RETRIES  # as load_api_client() configures it
        api_client = k8s.ApiClient(configuration)
        launcher = KubernetesLauncher(SETTINGS, api_client)
        try:
            yield Cluster(emulator, launcher, k8s.BatchV1Api(api_client), k8s.CoreV1Api(api_client))
        finally:
            await launcher.close()
            api_client.close()


def training(name: str = "tierflow-train-3-4") -> WorkloadSpec:
    return WorkloadSpec(name=name, kind="training", args=["train", "--deployment", "3", "--results", "4,5"],
                        env={"KAFKA_BOOTSTRAP_SERVERS": "kafka:9092"}, labels={LABEL_RESULTS: "4-5"})


def tier(name: str = "tierflow-tier-7-0") -> WorkloadSpec:
    return WorkloadSpec(name=name, kind="inference", args=["tier", "run", "--inference", "7", "--tier", "0"],
                        labels={LABEL_TIER: "0"}, replicas=2)


async def test_launch_creates_the_job_the_builder_describes(cluster: Cluster) -> None:
    spec = training()
    await cluster.launcher.launch(spec)
    assert cluster.stored(JOBS, spec.name) == as_manifest(cluster.launcher.training_job(spec))
    assert cluster.stored(JOBS, spec.name)["spec"]["template"]["spec"]["containers"][0]["image"] == SETTINGS.image


async def test_duplicate_launch_counts_as_success(cluster: Cluster) -> None:
    spec = training()
    await cluster.launcher.launch(spec)
    await cluster.launcher.launch(spec)  # the API answers 409 AlreadyExists: launched already
    creates = [r for r in cluster.requests() if r.method == "POST"]
    assert len(creates) == 2
    assert len(cluster.emulator.objects[JOBS, NS, spec.name].history) == 1  # created once, never replaced


async def test_inference_tier_becomes_a_deployment(cluster: Cluster) -> None:
    spec = tier()
    await cluster.launcher.launch(spec)
    await cluster.launcher.launch(spec)
    stored = cluster.stored(DEPLOYMENTS, spec.name)
    assert stored == as_manifest(cluster.launcher.inference_deployment(spec))
    assert stored["spec"]["replicas"] == 2
    assert stored["spec"]["template"]["spec"]["nodeSelector"] == {LABEL_TIER: "0"}
    assert not cluster.exists(JOBS, spec.name)


async def test_list_shows_only_tierflow_workloads_of_the_kind_asked(cluster: Cluster) -> None:
    await cluster.launcher.launch(training())
    await cluster.launcher.launch(tier())
    # A Job someone else runs in the namespace (kmock ignores the label selector: the launcher filters again).
    foreign = k8s.V1Job(metadata=k8s.V1ObjectMeta(name="backup", labels={"app": "backup"}),
                        spec=k8s.V1JobSpec(template=k8s.V1PodTemplateSpec()))
    await asyncio.to_thread(cluster.batch.create_namespaced_job, NS, foreign)

    everything = await cluster.launcher.list()
    assert {(w.name, w.kind, w.phase) for w in everything} == {
        ("tierflow-train-3-4", "training", "running"),
        ("tierflow-tier-7-0", "inference", "running"),
    }
    job = next(w for w in everything if w.kind == "training")
    assert job.labels == {LABEL_RESULTS: "4-5", LABEL_MANAGED: "tierflow", LABEL_KIND: "training"}
    assert [w.name for w in await cluster.launcher.list("training")] == ["tierflow-train-3-4"]
    assert [w.name for w in await cluster.launcher.list("inference")] == ["tierflow-tier-7-0"]
    # The label selector is sent all the same, for a real API server.
    lists = [r for r in cluster.requests() if r.method == "GET" and r.url.path.endswith("/jobs")]
    assert lists[-1].params["labelSelector"] == "app.kubernetes.io/managed-by=tierflow,tierflow.io/kind=training"


async def test_stop_deletes_in_the_background_and_is_idempotent(cluster: Cluster) -> None:
    await cluster.launcher.launch(training())
    await cluster.launcher.launch(tier())
    await cluster.launcher.stop("tierflow-train-3-4")
    await cluster.launcher.stop("tierflow-tier-7-0")
    assert not cluster.exists(JOBS, "tierflow-train-3-4")
    assert not cluster.exists(DEPLOYMENTS, "tierflow-tier-7-0")
    deletes = [r for r in cluster.requests() if r.method == "DELETE"]
    assert all(r.params["propagationPolicy"] == "Background" for r in deletes)
    assert await cluster.launcher.list() == []
    # Gone already (404): still a success.
    await cluster.launcher.stop("tierflow-train-3-4")
    await cluster.launcher.stop("never-launched")


async def test_reconcile_after_a_job_vanished(cluster: Cluster) -> None:
    spec = training()
    await cluster.launcher.launch(spec)
    # The Job is deleted behind the launcher's back (garbage-collected after its TTL, or by hand).
    await asyncio.to_thread(cluster.batch.delete_namespaced_job, spec.name, NS)
    assert await cluster.launcher.list() == []
    # The reconciler decides to launch it again: the same deterministic name is created anew.
    await cluster.launcher.launch(spec)
    assert [w.name for w in await cluster.launcher.list()] == [spec.name]
    assert cluster.exists(JOBS, spec.name)


async def test_status_read_from_a_job_the_test_patches(cluster: Cluster) -> None:
    await cluster.launcher.launch(training("tierflow-train-3-4"))
    await cluster.launcher.launch(training("tierflow-train-3-6"))
    # The Job controller's verdicts, written through the status subresource as it would.
    succeeded = {"status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}}
    message = "Container tierflow for pod tierflow-test/tierflow-train-3-6-x7k2p failed with exit code 2 " \
              "matching FailJob rule at index 0"
    failed = {"status": {"failed": 1, "conditions": [
        {"type": "FailureTarget", "status": "True", "reason": "PodFailurePolicy", "message": message},
        {"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": message},
    ]}}
    await asyncio.to_thread(cluster.batch.patch_namespaced_job_status, "tierflow-train-3-4", NS, succeeded)
    await asyncio.to_thread(cluster.batch.patch_namespaced_job_status, "tierflow-train-3-6", NS, failed)
    # The failed Job's pod and its log (kmock serves the log text we give it).
    pod = k8s.V1Pod(metadata=k8s.V1ObjectMeta(name="tierflow-train-3-6-x7k2p",
                                              labels={"job-name": "tierflow-train-3-6"}))
    await asyncio.to_thread(cluster.core.create_namespaced_pod, NS, pod)
    log_path = f"/api/v1/namespaces/{NS}/pods/tierflow-train-3-6-x7k2p/log"
    cluster.emulator[f"get {log_path}"] << "epoch 1\nValueError: record 17: 783 bytes, expected 784\n"

    by_name = {w.name: w for w in await cluster.launcher.list("training")}
    ok, bad = by_name["tierflow-train-3-4"], by_name["tierflow-train-3-6"]
    assert (ok.phase, ok.exit_code, ok.reason) == ("succeeded", 0, None)
    assert (bad.phase, bad.exit_code) == ("failed", 2)
    assert bad.reason is not None
    assert bad.reason.startswith("Job tierflow-train-3-6 failed: PodFailurePolicy: Container tierflow")
    assert bad.reason.endswith("last log lines:\nepoch 1\nValueError: record 17: 783 bytes, expected 784")
    # The log is read once per failed Job, not at every reconcile.
    await cluster.launcher.list("training")
    log_reads = [r for r in cluster.requests() if r.url.path == log_path]
    assert len(log_reads) == 1
    assert log_reads[0].params == {"container": "tierflow", "tailLines": "20"}


async def test_api_errors_become_the_taxonomy(cluster: Cluster) -> None:
    jobs_path = f"/apis/batch/v1/namespaces/{NS}/jobs"
    cluster.emulator[f"post {jobs_path}"] << 403 << {"kind": "Status", "code": 403, "message": "jobs is forbidden"}
    with pytest.raises(PermanentError, match="apply the Role and RoleBinding"):
        await cluster.launcher.launch(training())
    cluster.emulator[f"get {jobs_path}"] << 429 << {"Retry-After": "7"} << {"kind": "Status", "code": 429}
    with pytest.raises(TemporaryError) as throttled:
        await cluster.launcher.list("training")
    assert throttled.value.delay_s == 7.0


async def test_an_unreachable_api_is_a_temporary_error() -> None:
    configuration = k8s.Configuration(host="http://127.0.0.1:9")  # discard port: connection refused
    configuration.retries = RETRIES
    with k8s.ApiClient(configuration) as api_client:
        launcher = KubernetesLauncher(SETTINGS, api_client, request_timeout_s=5)
        with pytest.raises(TemporaryError, match="unreachable"):
            await launcher.list()


# --- pure parts ----------------------------------------------------------------------------------------

def test_classify_says_what_happens_next() -> None:
    assert isinstance(classify(409, "exists", what="create Job x"), AlreadyExistsError)
    assert isinstance(classify(404, "gone", what="delete Job x"), NotFoundError)
    assert isinstance(classify(422, "invalid", what="create Job x"), PermanentError)
    unavailable = classify(503, "busy", what="list Jobs")
    assert isinstance(unavailable, TemporaryError) and unavailable.delay_s == 5.0
    throttled = classify(429, "slow down", what="list Jobs", retry_after="3")
    assert isinstance(throttled, TemporaryError) and throttled.delay_s == 3.0
    assert "create Job x: HTTP 403" in str(classify(403, "forbidden", what="create Job x"))


def job(status: dict[str, Any] | None, backoff_limit: int = 0) -> k8s.V1Job:
    return k8s.V1Job.from_dict({
        "metadata": {"name": "tierflow-train-1-2", "labels": {LABEL_MANAGED: "tierflow", LABEL_KIND: "training"}},
        "spec": {"backoffLimit": backoff_limit, "template": {}},
        "status": status,
    })


def test_job_status_phases() -> None:
    assert job_status(job(None)).phase == "running"
    assert job_status(job({"active": 1})).phase == "running"
    assert job_status(job({"succeeded": 1})).phase == "succeeded"
    assert job_status(job({"conditions": [{"type": "SuccessCriteriaMet", "status": "True"}]})).phase == "succeeded"
    retrying = job({"failed": 1, "active": 1}, backoff_limit=2)
    assert job_status(retrying).phase == "running"  # a transient failure the Job retries
    exhausted = job_status(job({"failed": 3}, backoff_limit=2))
    assert (exhausted.phase, exhausted.exit_code) == ("failed", None)
    assert exhausted.reason == "Job tierflow-train-1-2 failed: 3 pod(s) failed, more than backoffLimit 2"
    deadline = job_status(job({"conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded",
                                               "message": "Job was active longer than specified deadline"}]}))
    assert deadline.reason == ("Job tierflow-train-1-2 failed: DeadlineExceeded: "
                               "Job was active longer than specified deadline")
    not_yet = job({"conditions": [{"type": "Failed", "status": "False"}]})
    assert job_status(not_yet).phase == "running"


async def test_tier_placement_and_service_account_come_from_the_settings() -> None:
    settings = replace(SETTINGS, tier_node_label="example.com/site", kubeedge_tiers=frozenset({"0"}),
                       service_account="tierflow-workloads", tier_port=9100, secret="tierflow-workload-secrets")
    api_client = k8s.ApiClient(k8s.Configuration(host="http://127.0.0.1:9"))  # never called: builders only
    launcher = KubernetesLauncher(settings, api_client)
    try:
        pod = as_manifest(launcher.inference_deployment(tier()))["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == {"example.com/site": "0", "node-role.kubernetes.io/edge": ""}
        assert pod["serviceAccountName"] == "tierflow-workloads"
        assert pod["containers"][0]["envFrom"] == [{"secretRef": {"name": "tierflow-workload-secrets"}}]
        job = as_manifest(launcher.training_job(training()))["spec"]["template"]["spec"]
        assert job["containers"][0]["envFrom"] == pod["containers"][0]["envFrom"]
        assert {"key": "node-role.kubernetes.io/edge", "operator": "Exists", "effect": "NoSchedule"} in pod[
            "tolerations"]
    finally:
        await launcher.close()
        api_client.close()
