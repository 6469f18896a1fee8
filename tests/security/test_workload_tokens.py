"""Workloads get their own scoped token and never the stack's secrets: local processes and Kubernetes pods.

Attack: a training workload runs user model code; whatever is in its environment, that code can read and use.
Before, local workloads got the admin token (`workload_env()` passed TIERFLOW_API_TOKEN, and the local launcher
merged the worker's whole environment, DATABASE_URL and TIERFLOW_SECRET_KEY included, into theirs), and in a
cluster every workload shared one Secret holding the admin token. Defences: the orchestrator (streams/
orchestrator.py) mints a token scoped to the workload (streams/tokens.py) and hands it over as the spec's
`secrets`; the local launcher gives a workload its secrets and strips the stack's secrets from everything else
it inherits, and records no secret on disk; the Kubernetes launcher puts the secrets in a Secret of the
workload's own (owned by its Job or Deployment, so it goes with it) that the pod references: the token text is
never in a Job or Deployment spec.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kmock import KubernetesEmulator, Server
from kubernetes import client as k8s

from tests.conftest import wait_until
from tierflow.deploy.kubernetes_launcher import RETRIES, KubernetesLauncher
from tierflow.deploy.local_launcher import LOG_FILE, LocalLauncher
from tierflow.streams.launcher import WorkloadSpec
from tierflow.streams.orchestrator import Group
from tierflow.streams.settings import Settings, WorkloadSettings
from tierflow.streams.tokens import tier_claims, training_claims, verify

ADMIN = "the-admin-token-of-this-stack"
SECRET = "the-stack-secret-" + "s" * 47
DATABASE = "postgresql://tierflow:pw@127.0.0.1:5432/tierflow"
STACK = {"TIERFLOW_API_TOKEN": ADMIN, "TIERFLOW_SECRET_KEY": SECRET, "DATABASE_URL": DATABASE}
PRINT_ENV = "import json, os; print(json.dumps(dict(os.environ)), flush=True)"


def stack_settings(**env: str) -> Settings:
    return Settings.from_env({**STACK, "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092", **env})


def test_the_orchestrator_gives_each_workload_a_token_of_its_own() -> None:
    from tierflow.streams.orchestrator import tier_launch, training_launch

    settings = stack_settings()
    env = {**settings.to_env(), "PYTHONUNBUFFERED": "1"}  # even when handed everything, it passes on no secret
    training = training_launch(Group(3, (4, 5), ("created", "created"), True), settings, env)
    assert verify(SECRET, training.secrets["TIERFLOW_API_TOKEN"]) == training_claims(3, [4, 5])
    tier = tier_launch({"id": 7}, {"index": 1, "result_id": 5, "replicas": 1}, settings, env, port=0)
    assert verify(SECRET, tier.secrets["TIERFLOW_API_TOKEN"]) == tier_claims(7, 1, 5)
    for spec in (training, tier):
        assert set(spec.secrets) == {"TIERFLOW_API_TOKEN"}
        assert not {ADMIN, SECRET, DATABASE} & set(spec.env.values()), spec.name
        assert not set(STACK) & set(spec.env)
    assert settings.workload_env().keys().isdisjoint(STACK)


@pytest.fixture
async def local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[LocalLauncher]:
    # The worker's own environment holds the stack's secrets (the embedded stack passes them to it).
    for name, value in STACK.items():
        monkeypatch.setenv(name, value)
    launcher = LocalLauncher(tmp_path / "workloads", {**stack_settings().to_env()},
                             command_prefix=[sys.executable, "-c", PRINT_ENV])
    yield launcher
    await launcher.stop_all()


async def test_a_local_workload_sees_its_token_and_no_secret_of_the_stack(local: LocalLauncher) -> None:
    spec = WorkloadSpec(name="tierflow-train-3-4", kind="training", args=[], env={"TIERFLOW_X": "1"},
                        secrets={"TIERFLOW_API_TOKEN": "scoped-token-of-this-workload"})
    await local.launch(spec)
    log = local.workload_dir(spec.name) / LOG_FILE
    await wait_until(lambda: log.exists() and log.read_text().strip(), what="the workload printed its env")
    env = json.loads(log.read_text().splitlines()[0])
    assert env["TIERFLOW_API_TOKEN"] == "scoped-token-of-this-workload"
    assert env["TIERFLOW_X"] == "1"
    assert "TIERFLOW_SECRET_KEY" not in env and "DATABASE_URL" not in env
    assert ADMIN not in env.values()
    # What the launcher writes down names the secret, never its value.
    recorded = "".join(p.read_text() for p in local.workload_dir(spec.name).iterdir() if p.name != LOG_FILE)
    assert "scoped-token-of-this-workload" not in recorded and "TIERFLOW_API_TOKEN" in recorded


NS = "tierflow-test"
JOBS, DEPLOYMENTS, SECRETS = "batch/v1/jobs", "apps/v1/deployments", "v1/secrets"


@pytest.fixture
async def cluster() -> AsyncIterator[tuple[KubernetesEmulator, KubernetesLauncher]]:
    async with KubernetesEmulator() as emulator, Server(emulator) as server:
        for resource in (JOBS, DEPLOYMENTS, SECRETS):
            emulator.resources[resource] = {}
        configuration = k8s.Configuration(host=str(server.url).rstrip("/"))
        configuration.retries = RETRIES
        api_client = k8s.ApiClient(configuration)
        launcher = KubernetesLauncher(WorkloadSettings(launcher="kubernetes", namespace=NS), api_client)
        # A real API server gives every object a uid (an owner reference needs it); kmock gives none, so the
        # launcher's own thin wrappers stamp one on what they answer, as the server would.
        for method in ("create_job", "create_deployment", "read_job", "read_deployment"):
            setattr(launcher.api, method, _with_uid(getattr(launcher.api, method)))
        try:
            yield emulator, launcher
        finally:
            await launcher.close()
            api_client.close()  # type: ignore[no-untyped-call]


def _with_uid(call: Any) -> Any:
    async def stamped(**kwargs: Any) -> Any:
        obj = await call(**kwargs)
        obj.metadata.uid = f"uid-of-{obj.metadata.name}"
        return obj

    return stamped


async def test_a_pod_reads_its_token_from_a_secret_of_its_own(
        cluster: tuple[KubernetesEmulator, KubernetesLauncher]) -> None:
    from tierflow.streams.orchestrator import tier_launch, training_launch

    emulator, launcher = cluster
    settings = stack_settings(TIERFLOW_LAUNCHER="kubernetes")
    training = training_launch(Group(3, (4,), ("created",), True), settings, settings.workload_env())
    tier = tier_launch({"id": 7}, {"index": 0, "result_id": 4, "replicas": 2}, settings, settings.workload_env(),
                       port=8000)
    for spec, resource in ((training, JOBS), (tier, DEPLOYMENTS)):
        await launcher.launch(spec)
        await launcher.launch(spec)  # a replayed launch finds both there
        token = spec.secrets["TIERFLOW_API_TOKEN"]
        workload = emulator.objects[resource, NS, spec.name].raw
        text = json.dumps(workload)
        assert token not in text and ADMIN not in text and SECRET not in text
        [container] = workload["spec"]["template"]["spec"]["containers"]
        secret_name = f"{spec.name}-token"
        assert {"secretRef": {"name": secret_name}} in container["envFrom"]
        secret = emulator.objects[SECRETS, NS, secret_name].raw
        assert secret["stringData"] == {"TIERFLOW_API_TOKEN": token}
        [owner] = secret["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"]) == (workload["kind"], spec.name,
                                                                f"uid-of-{spec.name}")
        await launcher.stop(spec.name)
        assert emulator.objects[SECRETS, NS, secret_name].deleted
