"""Cluster mode: deploy/Dockerfile and the kustomize tree under deploy/kubernetes, checked without a cluster.

There is no docker and no kustomize binary here. So the Dockerfile is parsed and its entry point and command
are run through the real `tierflow` argument parser; each kustomization is rendered by `render()` below (a
small renderer for exactly the kustomize features the tree uses: it refuses anything else rather than guess),
every object is parsed into the official client's models (which reject wrong types; a round trip back to a
dict catches misspelt fields, which the models drop) and applied to the kmock emulator over HTTP. Strimzi's
custom resources have no client model: they are checked for their structure and applied through
CustomObjectsApi. kmock cannot take a Namespace (it reads `/api/v1/namespaces` as a namespaced path), so the
example's Namespace is parsed into its model and only stored directly.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import copy
import fnmatch
import json
import re
import shlex
import tomllib
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml  # type: ignore[import-untyped]
from kmock import KubernetesEmulator, Server
from kubernetes import client as k8s

from tests.unit.test_settings import RecordingEnv
from tierflow.api.auth import check_settings
from tierflow.api.routes import READY_SCOPES, routes
from tierflow.deploy.cli import build_parser
from tierflow.deploy.kubernetes_launcher import RETRIES, KubernetesLauncher
from tierflow.deploy.manifests import (
    LABEL_KUBEEDGE_EDGE,
    as_manifest,
    dns_name,
    inference_deployment,
    rbac_objects,
    training_job,
)
from tierflow.streams.launcher import LABEL_MANAGED, LABEL_TIER, MANAGED_BY
from tierflow.streams.orchestrator import Group, tier_spec, training_spec
from tierflow.streams.settings import Settings, WorkloadSettings
from tierflow.streams.topics import control_plane_topics

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "Dockerfile"
KUBE = REPO / "deploy" / "kubernetes"
BASE = KUBE / "base"
EXAMPLE = KUBE / "overlays" / "example"
KUBEEDGE = KUBE / "overlays" / "example-kubeedge"
KUSTOMIZATIONS = [BASE, EXAMPLE, KUBEEDGE]
DOCS = REPO / "docs" / "cluster.md"

Obj = dict[str, Any]


# --- a kustomize renderer for the features the tree uses -----------------------------------------------

#: Kinds kustomize's namespace transformer leaves alone (the cluster-scoped ones this tree could contain).
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
                  "CustomResourceDefinition"}
SUPPORTED_FIELDS = {"apiVersion", "kind", "namespace", "labels", "resources", "images", "patches"}
#: Where pod specs sit in the workload kinds the tree uses (for the `images` transformer).
POD_SPEC_PATHS = {"Deployment": ("spec", "template", "spec"), "StatefulSet": ("spec", "template", "spec"),
                  "Job": ("spec", "template", "spec")}


def load_documents(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def identity(obj: Obj) -> tuple[str, str, str, str]:
    meta = obj["metadata"]
    return obj["apiVersion"], obj["kind"], meta.get("namespace", ""), meta["name"]


def strategic_merge(target: Obj, patch: Obj, where: str = "") -> None:
    """A strategic merge patch limited to maps (merged key by key; null deletes a key). Lists and `$patch`
    directives are refused: their merge rules depend on per-field merge keys this renderer does not know."""
    for key, value in patch.items():
        if key.startswith("$"):
            raise NotImplementedError(f"patch directive {where}{key} is not supported by this renderer")
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict):
            child = target.setdefault(key, {})
            if not isinstance(child, dict):
                raise ValueError(f"patch puts a map at {where}{key}, the target has {type(child).__name__}")
            strategic_merge(child, value, f"{where}{key}.")
        elif isinstance(value, list):
            raise NotImplementedError(f"list at {where}{key}: list merges are not supported by this renderer")
        else:
            target[key] = value


def split_image(image: str) -> tuple[str, str]:
    """`registry:5000/name:tag` -> (`registry:5000/name`, `:tag`); digests are not used here."""
    if "@" in image:
        raise NotImplementedError(f"image digests ({image}) are not supported by this renderer")
    slash = image.rfind("/")
    colon = image.rfind(":")
    return (image[:colon], image[colon:]) if colon > slash else (image, "")


def set_images(objects: list[Obj], images: list[Obj]) -> None:
    for entry in images:
        unsupported = set(entry) - {"name", "newName", "newTag"}
        if unsupported:
            raise NotImplementedError(f"images fields {sorted(unsupported)} are not supported by this renderer")
        for _, container in containers(objects):
            name, tag = split_image(container["image"])
            if name == entry["name"]:
                new_tag = f":{entry['newTag']}" if "newTag" in entry else tag
                container["image"] = f"{entry.get('newName', name)}{new_tag}"


def render(directory: Path) -> list[Obj]:
    """The objects `kubectl kustomize directory` gives, for the features listed in SUPPORTED_FIELDS."""
    kustomization: Obj = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - SUPPORTED_FIELDS
    if unsupported:
        raise NotImplementedError(f"{directory}: kustomization fields {sorted(unsupported)} are not supported")
    objects: list[Obj] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        objects.extend(render(path) if path.is_dir() else load_documents(path))
    for patch_entry in kustomization.get("patches", []):
        if set(patch_entry) != {"path"}:
            raise NotImplementedError(f"patch {patch_entry}: only `path:` patches are supported")
        for patch in load_documents(directory / patch_entry["path"]):
            # A strategic merge patch names its target by apiVersion, kind and name (namespace when it has one).
            matches = [obj for obj in objects if obj["apiVersion"] == patch["apiVersion"]
                       and obj["kind"] == patch["kind"] and obj["metadata"]["name"] == patch["metadata"]["name"]
                       and patch["metadata"].get("namespace", obj["metadata"].get("namespace"))
                       == obj["metadata"].get("namespace")]
            assert len(matches) == 1, f"patch {patch_entry['path']} matches {len(matches)} objects"
            strategic_merge(matches[0], {k: v for k, v in patch.items() if k not in ("apiVersion", "kind")})
    namespace = kustomization.get("namespace")
    if namespace:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = namespace
    for label in kustomization.get("labels", []):
        if label.get("includeSelectors") or label.get("includeTemplates") or set(label) - {
                "pairs", "includeSelectors", "includeTemplates"}:
            raise NotImplementedError(f"labels {label}: only metadata labels (`pairs:`) are supported")
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(label["pairs"])
    set_images(objects, kustomization.get("images", []))
    ids = [identity(obj) for obj in objects]
    assert len(ids) == len(set(ids)), f"{directory}: duplicate objects {sorted(ids)}"
    return objects


@pytest.fixture(scope="module", params=KUSTOMIZATIONS, ids=lambda p: p.relative_to(KUBE).as_posix())
def rendered(request: pytest.FixtureRequest) -> list[Obj]:
    return render(request.param)


@pytest.fixture(scope="module")
def example() -> list[Obj]:
    return render(EXAMPLE)


def find(objects: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} objects of kind {kind} named {name}"
    return found[0]


# --- the client's models ----------------------------------------------------------------------------------

BUILTIN_GROUPS = {"": k8s.CoreV1Api, "apps": k8s.AppsV1Api, "batch": k8s.BatchV1Api,
                  "rbac.authorization.k8s.io": k8s.RbacAuthorizationV1Api,
                  "networking.k8s.io": k8s.NetworkingV1Api}
#: Kinds whose plural is not the kind with an "s".
IRREGULAR_PLURALS = {"NetworkPolicy": "networkpolicies"}


def group_version(obj: Obj) -> tuple[str, str]:
    group, _, version = obj["apiVersion"].rpartition("/")
    return group, version


def is_builtin(obj: Obj) -> bool:
    return group_version(obj)[0] in BUILTIN_GROUPS


def model_name(obj: Obj) -> str:
    return f"{group_version(obj)[1].capitalize()}{obj['kind']}"


def to_model(obj: Obj) -> Any:
    """The object as the client's model: `ApiClient.deserialize` is the public way from JSON text to a model."""
    return k8s.ApiClient().deserialize(json.dumps(obj), model_name(obj), "application/json")


def plain(model: Any) -> Obj:
    value: Obj = k8s.ApiClient().sanitize_for_serialization(model)  # type: ignore[no-untyped-call]
    return value


def snake(kind: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", kind).lower()


def plural(obj: Obj) -> str:
    kind = obj["kind"]
    if kind in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[kind]
    assert not kind.endswith(("s", "y")), f"no irregular plurals expected here: {kind}"
    return f"{kind.lower()}s"


def resource_path(obj: Obj) -> str:
    group, version = group_version(obj)
    return f"{group}/{version}/{plural(obj)}" if group else f"{version}/{plural(obj)}"


def containers(objects: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    """(workload, container) for every container of every pod template."""
    for obj in objects:
        path = POD_SPEC_PATHS.get(obj["kind"])
        if path is None:
            continue
        pod: Obj = obj
        for key in path:
            pod = pod[key]
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            yield obj, container


def tierflow_containers(objects: list[Obj]) -> list[tuple[Obj, Obj]]:
    found = [(w, c) for w, c in containers(objects) if c["name"] == "tierflow"]
    assert found, "no tierflow container"
    return found


def test_every_object_parses_into_the_client_models(rendered: list[Obj]) -> None:
    for obj in rendered:
        what = "/".join(identity(obj))
        assert {"apiVersion", "kind", "metadata"} <= obj.keys(), what
        if is_builtin(obj):
            # Wrong types raise here; unknown (misspelt) fields are dropped by the model, so compare.
            assert plain(to_model(obj)) == obj, f"{what}: fields the client's model does not know"
        else:
            assert obj["apiVersion"] == "kafka.strimzi.io/v1beta2", what
            assert isinstance(obj.get("spec"), dict) and obj["spec"], f"{what}: a custom resource needs a spec"


# --- the image and the commands ---------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and line continuations joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        instruction, _, arguments = (pending + line).partition(" ")
        instructions.append((instruction.upper(), arguments.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def docker_instruction(name: str) -> list[str]:
    values = [arguments for instruction, arguments in dockerfile_instructions() if instruction == name]
    assert len(values) == 1, f"{len(values)} {name} instructions"
    return [values[0]]


def exec_form(name: str) -> list[str]:
    """ENTRYPOINT/CMD in exec (JSON) form: the shell form would run `sh -c` and swallow SIGTERM."""
    value = json.loads(docker_instruction(name)[0])
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"{name} is not exec form"
    return value


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, arguments in dockerfile_instructions():
        if instruction == "ENV":
            for pair in shlex.split(arguments):
                key, sep, value = pair.partition("=")
                assert sep, f"ENV {pair}: use the KEY=VALUE form"
                env[key] = value
    return env


def pyproject() -> Obj:
    data: Obj = tomllib.loads((REPO / "pyproject.toml").read_text())
    return data


def parse_cli(argv: list[str], where: str) -> argparse.Namespace:
    """`argv` (after `tierflow`) through the real parser; it must pick a sub-command with a handler."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"{where}: `tierflow {shlex.join(argv)}` is not a valid command") from exc
    assert callable(getattr(args, "func", None)), f"{where}: `tierflow {shlex.join(argv)}` runs nothing"
    return args


def container_argv(container: Obj) -> list[str]:
    """What the container runs, as Kubernetes combines it with the image (command replaces ENTRYPOINT and
    drops CMD; args replace CMD)."""
    if "command" in container:
        return [*container["command"], *container.get("args", [])]
    return [*exec_form("ENTRYPOINT"), *container.get("args", exec_form("CMD"))]


def test_dockerfile_entry_point_and_command_exist() -> None:
    assert docker_instruction("FROM") == ["python:3.11-slim"]
    # ENTRYPOINT is the console script pyproject installs; CMD is a sub-command the real parser accepts.
    assert exec_form("ENTRYPOINT") == ["tierflow"]
    assert pyproject()["project"]["scripts"]["tierflow"] == "tierflow.deploy.cli:main"
    args = parse_cli(exec_form("CMD"), "Dockerfile CMD")
    assert args.command == "api"
    # The `all` extra it installs exists, and the port it exposes is the API's.
    runs = " ".join(arguments for instruction, arguments in dockerfile_instructions() if instruction == "RUN")
    assert "pip install '.[all]'" in runs
    assert "all" in pyproject()["project"]["optional-dependencies"]
    env = dockerfile_env()
    assert docker_instruction("EXPOSE") == [env["TIERFLOW_API_PORT"]]
    assert Settings.from_env(env).api.port == int(env["TIERFLOW_API_PORT"])


def test_dockerfile_runs_as_a_non_root_user() -> None:
    user = docker_instruction("USER")[0]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) > 0, "a numeric non-root uid, so runAsNonRoot can check it"


def test_dockerfile_copies_every_package_and_nothing_dockerignore_drops() -> None:
    sources: set[str] = set()
    for instruction, arguments in dockerfile_instructions():
        if instruction == "COPY":
            *copied, _destination = [a for a in shlex.split(arguments) if not a.startswith("--")]
            sources.update(copied)
    project = pyproject()
    needed = {"pyproject.toml", project["project"]["readme"], *project["tool"]["setuptools"]["package-dir"].values()}
    assert needed <= sources, f"not copied into the image: {sorted(needed - sources)}"
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: no such file"
        assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), f"{source} is dockerignored"


def test_every_container_runs_a_real_tierflow_command(rendered: list[Obj]) -> None:
    for workload, container in tierflow_containers(rendered):
        argv = container_argv(container)
        assert argv[0] == "tierflow", f"{workload['metadata']['name']} does not run tierflow"
        parse_cli(argv[1:], f"{workload['kind']} {workload['metadata']['name']}")


def test_the_workloads_the_orchestrator_launches_run_real_commands() -> None:
    env = Settings().to_env()
    training = training_spec(Group(3, (4, 5, 6), ("created",) * 3, True), Settings(), env)
    tiers = [tier_spec({"id": 7}, {"index": i, "replicas": 1}, env, port=8000) for i in range(3)]
    manifests = [as_manifest(training_job(training, image="tierflow:0.1.0", namespace="tierflow")),
                 *(as_manifest(inference_deployment(t, image="tierflow:0.1.0", namespace="tierflow"))
                   for t in tiers)]
    for workload, container in tierflow_containers(manifests):
        argv = container_argv(container)
        assert argv[0] == "tierflow"
        parse_cli(argv[1:], f"{workload['kind']} {workload['metadata']['name']}")


def docs_commands() -> list[list[str]]:
    """`tierflow ...` command lines in docs/cluster.md's code blocks (also after `kubectl exec ... --`)."""
    commands: list[list[str]] = []
    in_block = False
    lines: list[str] = []
    for line in DOCS.read_text().splitlines():
        if line.startswith("```"):
            in_block = line.strip() == "```sh"
            continue
        if not in_block or line.lstrip().startswith("#"):
            continue
        if lines and lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1] + line
        else:
            lines.append(line)
    for line in lines:
        words = shlex.split(line.split(" # ")[0])
        starts = [i + 1 for i, word in enumerate(words) if word == "tierflow" and (i == 0 or words[i - 1] == "--")]
        commands.extend(words[start:] for start in starts)
    return commands


def test_the_commands_in_the_cluster_docs_exist() -> None:
    commands = docs_commands()
    assert len(commands) >= 3
    for argv in commands:
        parse_cli(argv, "docs/cluster.md")


# --- one image, real settings, real routes ---------------------------------------------------------------

def test_every_tierflow_container_uses_the_one_image_the_orchestrator_launches(rendered: list[Obj]) -> None:
    images = {container["image"] for _, container in tierflow_containers(rendered)}
    assert len(images) == 1, f"several tierflow images: {sorted(images)}"
    config = find(rendered, "ConfigMap", "tierflow-config")
    assert config["data"]["TIERFLOW_IMAGE"] in images, "workloads would run another image than the control plane"


def setting_names() -> set[str]:
    reads = RecordingEnv()
    Settings.from_env(reads)
    return reads.names | set(Settings().to_env())


def env_keys(rendered: list[Obj]) -> set[str]:
    """Every variable name the tree sets: ConfigMap and Secret keys, container env and envFrom sources."""
    keys: set[str] = set()
    for obj in rendered:
        if obj["kind"] in ("ConfigMap", "Secret"):
            keys.update(obj.get("data", {}), obj.get("stringData", {}))
    for _, container in containers(rendered):
        keys.update(e["name"] for e in container.get("env", []))
    return keys


def test_every_tierflow_variable_is_a_real_setting(rendered: list[Obj]) -> None:
    known = setting_names()
    used = {key for key in env_keys(rendered) | set(dockerfile_env()) if key.startswith("TIERFLOW_")}
    assert used, "no TIERFLOW_* variable found"
    assert used <= known, f"not settings of streams/settings.py (they would be ignored): {sorted(used - known)}"


def container_env(objects: list[Obj], container: Obj, namespace: str) -> dict[str, str]:
    """The environment a container starts with: image ENV, envFrom ConfigMaps/Secrets, then env entries."""
    def data(kind: str, name: str) -> dict[str, str]:
        found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
        if not found and kind == "Secret":
            return collections.defaultdict(lambda: f"<from the Secret {name}>")  # created by hand (the base)
        obj = find(objects, kind, name)
        return {**obj.get("data", {}), **obj.get("stringData", {})}

    env = dockerfile_env()
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(data("ConfigMap", source["configMapRef"]["name"]))
        else:
            env.update(data("Secret", source["secretRef"]["name"]))
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
            continue
        ref = entry["valueFrom"]
        if "secretKeyRef" in ref:
            env[entry["name"]] = data("Secret", ref["secretKeyRef"]["name"])[ref["secretKeyRef"]["key"]]
        elif "configMapKeyRef" in ref:
            env[entry["name"]] = data("ConfigMap", ref["configMapKeyRef"]["name"])[ref["configMapKeyRef"]["key"]]
        else:
            assert ref == {"fieldRef": {"fieldPath": "metadata.namespace"}}, entry
            env[entry["name"]] = namespace
    return env


def worker_settings(objects: list[Obj]) -> Settings:
    """The settings `tierflow worker` reads in its pod (the namespace comes from the downward API)."""
    worker = find(objects, "Deployment", "tierflow-worker")
    return Settings.from_env(container_env(objects, worker["spec"]["template"]["spec"]["containers"][0],
                                           worker["metadata"]["namespace"]))


def test_probes_and_services_point_at_real_routes_and_ports(rendered: list[Obj]) -> None:
    get_routes = {route.path for route in routes if route.method == "GET"}  # type: ignore[attr-defined]
    probed = 0
    for workload, container in tierflow_containers(rendered):
        ports = {port["name"]: port["containerPort"] for port in container.get("ports", [])}
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            http = container.get(probe, {}).get("httpGet")
            if http is None:
                continue
            probed += 1
            path, _, query = http["path"].partition("?")
            assert path in get_routes, f"{workload['metadata']['name']} {probe}: no route {http['path']}"
            assert http["port"] in ports
            if path == "/readyz" and query:
                assert parse_qs(query).get("scope", [""])[0] in READY_SCOPES, http["path"]
    api = find(rendered, "Deployment", "tierflow-api")
    api_container = api["spec"]["template"]["spec"]["containers"][0]
    assert api_container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # Only the API's own readiness: a failing agent of the worker must not take the API out of its Service,
    # where training Jobs report (tests/security/test_readyz_agents.py checks that the scope does this).
    assert api_container["readinessProbe"]["httpGet"]["path"] == "/readyz?scope=api"
    assert probed >= 2
    # The API listens where its container port, its Service and TIERFLOW_API_URL say.
    settings = Settings.from_env(container_env(rendered, api_container, "tierflow"))
    assert settings.api.host == "0.0.0.0"
    check_settings(settings)  # it starts: a token, the secret, and the Host names its clients use
    assert {"tierflow-api:8080", "localhost:8080"} <= settings.api.allowed_hosts
    assert {p["name"]: p["containerPort"] for p in api_container["ports"]}["http"] == settings.api.port
    service = find(rendered, "Service", "tierflow-api")
    assert service["spec"]["selector"].items() <= api["spec"]["template"]["metadata"]["labels"].items()
    [service_port] = service["spec"]["ports"]
    assert service_port["targetPort"] == "http"
    url = urlsplit(settings.api.url)
    assert (url.hostname, url.port) == (service["metadata"]["name"], service_port["port"])


def test_selectors_match_their_pod_templates(rendered: list[Obj]) -> None:
    for obj in rendered:
        if obj["kind"] in ("Deployment", "StatefulSet"):
            selector = obj["spec"]["selector"]["matchLabels"]
            assert selector.items() <= obj["spec"]["template"]["metadata"]["labels"].items(), obj["metadata"]["name"]


def test_no_object_carries_the_label_the_orchestrator_owns(rendered: list[Obj]) -> None:
    # The orchestrator removes Deployments labelled managed-by=tierflow that no inference wants: the API's and
    # the worker's own Deployments must never carry that label.
    for obj in rendered:
        assert obj["metadata"].get("labels", {}).get(LABEL_MANAGED) != MANAGED_BY, identity(obj)


def test_the_worker_is_a_single_writer_that_never_overlaps(rendered: list[Obj]) -> None:
    worker = find(rendered, "Deployment", "tierflow-worker")
    assert worker["spec"]["replicas"] == 1
    assert worker["spec"]["strategy"] == {"type": "Recreate"}
    settings = worker_settings(rendered)
    assert (settings.workloads.launcher, settings.workloads.namespace) == ("kubernetes", "tierflow")


# --- RBAC -------------------------------------------------------------------------------------------------

def rules(role: Obj) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def test_rbac_is_least_privilege_and_the_same_as_rbac_objects(rendered: list[Obj]) -> None:
    assert not [o for o in rendered if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    role = find(rendered, "Role")
    binding = find(rendered, "RoleBinding")
    account = find(rendered, "ServiceAccount")
    namespace = role["metadata"]["namespace"]
    granted = rules(role)
    assert {verb for _, _, verb in granted} <= {"create", "get", "list", "watch", "delete"}
    assert {resource for _, resource, _ in granted} == {"jobs", "deployments", "pods", "pods/log", "secrets"}
    assert {verb for _, resource, verb in granted if resource == "secrets"} == {"create", "delete"}  # no reads
    assert not any("*" in part for rule in granted for part in rule)
    # What deploy/manifests.py says the orchestrator needs, rule for rule.
    built = rbac_objects(namespace, name=role["metadata"]["name"])
    assert granted == rules(as_manifest(built.role))
    assert binding["roleRef"] == as_manifest(built.role_binding)["roleRef"]
    assert binding["subjects"] == as_manifest(built.role_binding)["subjects"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": account["metadata"]["namespace"]}]
    # Only the worker runs as that account; other pods get no API token at all.
    for workload, _ in containers(rendered):
        pod = workload["spec"]["template"]["spec"]
        if workload["metadata"]["name"] == "tierflow-worker":
            assert pod["serviceAccountName"] == account["metadata"]["name"]
        else:
            assert "serviceAccountName" not in pod and pod["automountServiceAccountToken"] is False


# --- kmock ------------------------------------------------------------------------------------------------

@pytest.fixture
async def emulator() -> AsyncIterator[tuple[KubernetesEmulator, k8s.ApiClient]]:
    async with KubernetesEmulator() as kmock, Server(kmock) as server:
        configuration = k8s.Configuration(host=str(server.url).rstrip("/"))
        configuration.retries = RETRIES
        api_client = k8s.ApiClient(configuration)
        try:
            yield kmock, api_client
        finally:
            api_client.close()  # type: ignore[no-untyped-call]


async def apply(kmock: KubernetesEmulator, api_client: k8s.ApiClient, obj: Obj) -> Obj:
    """Create `obj` through the official client as `kubectl apply` would the first time; read it back."""
    group, version = group_version(obj)
    name = obj["metadata"]["name"]
    namespace = obj["metadata"].get("namespace")
    kmock.resources[resource_path(obj)] = KubernetesEmulator.ResourceInfo()
    if obj["kind"] == "Namespace":
        # kmock parses POST /api/v1/namespaces as a namespaced path and fails: store the parsed object instead.
        kmock.objects[resource_path(obj), None, name] = plain(to_model(obj))
        return plain(to_model(kmock.objects[resource_path(obj), None, name].raw))
    if is_builtin(obj):
        api = BUILTIN_GROUPS[group](api_client)
        kind = snake(obj["kind"])
        await asyncio.to_thread(getattr(api, f"create_namespaced_{kind}"), namespace=namespace, body=to_model(obj))
        stored = await asyncio.to_thread(getattr(api, f"read_namespaced_{kind}"), name=name, namespace=namespace)
        return plain(stored)
    custom = k8s.CustomObjectsApi(api_client)
    await asyncio.to_thread(custom.create_namespaced_custom_object, group=group, version=version,
                            namespace=namespace, plural=plural(obj), body=obj)
    stored_custom = await asyncio.to_thread(custom.get_namespaced_custom_object, group=group, version=version,
                                            namespace=namespace, plural=plural(obj), name=name)
    return cast(Obj, stored_custom)


async def test_the_manifests_apply_to_kmock(emulator: tuple[KubernetesEmulator, k8s.ApiClient],
                                            rendered: list[Obj]) -> None:
    kmock, api_client = emulator
    kmock.resources["batch/v1/jobs"] = KubernetesEmulator.ResourceInfo()
    kmock.resources["apps/v1/deployments"] = KubernetesEmulator.ResourceInfo()
    kmock.resources["networking.k8s.io/v1/networkpolicies"] = KubernetesEmulator.ResourceInfo()
    for obj in sorted(rendered, key=lambda o: o["kind"] != "Namespace"):
        assert await apply(kmock, api_client, obj) == obj, "/".join(identity(obj))
    stored = {(key[1], key[2]) for key in kmock.objects}
    assert stored == {(o["metadata"].get("namespace"), o["metadata"]["name"]) for o in rendered}
    # The orchestrator's launcher, pointed at this namespace, sees none of it as its own workload (it would
    # remove a Deployment it thinks no inference wants).
    launcher = KubernetesLauncher(WorkloadSettings(launcher="kubernetes", namespace="tierflow"), api_client)
    assert await launcher.list() == []


def request_rule(method: str, path: str, params: Mapping[str, str]) -> tuple[str, str, str, str]:
    """(namespace, apiGroup, resource[/subresource], verb) of a Kubernetes API request, as RBAC sees it."""
    match = re.fullmatch(r"/(?:api/v1|apis/(?P<group>[^/]+)/[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<resource>[^/]+)"
                         r"(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?", path)
    assert match is not None, f"not a namespaced request: {method} {path}"
    resource = match["resource"] + (f"/{match['sub']}" if match["sub"] else "")
    if method == "GET":
        verb = "get" if match["name"] else ("watch" if params.get("watch") in ("true", "1") else "list")
    else:
        verb = {"POST": "create", "DELETE": "delete", "PATCH": "patch", "PUT": "update"}[method]
        verb = "deletecollection" if verb == "delete" and not match["name"] else verb
    return match["ns"], match["group"] or "", resource, verb


async def test_the_role_allows_every_call_the_launcher_makes(
        emulator: tuple[KubernetesEmulator, k8s.ApiClient]) -> None:
    kmock, api_client = emulator
    for resource in ("batch/v1/jobs", "apps/v1/deployments", "v1/pods"):
        kmock.resources[resource] = KubernetesEmulator.ResourceInfo()
    objects = render(EXAMPLE)
    settings = worker_settings(objects)
    launcher = KubernetesLauncher(settings.workloads, api_client)
    batch, core = k8s.BatchV1Api(api_client), k8s.CoreV1Api(api_client)
    calls: list[tuple[str, str, str, str]] = []

    async def as_launcher(coro: Any) -> Any:
        before = len(list(kmock))
        result = await coro
        calls.extend(request_rule(r.method.value, r.url.path, r.params) for r in list(kmock)[before:])
        return result

    env = settings.to_env()
    training = training_spec(Group(3, (4,), ("created",), True), settings, env)
    await as_launcher(launcher.launch(training))
    tier = tier_spec({"id": 7}, {"index": 0, "replicas": 2}, env, port=settings.workloads.tier_port)
    await as_launcher(launcher.launch(tier))
    await as_launcher(launcher.list())
    # The training fails; its pod's log is read (kmock runs no pods: the test writes what a cluster would).
    failed = {"status": {"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimit",
                                                      "message": "exit code 1"}]}}
    job_name = dns_name(training.name)
    await asyncio.to_thread(batch.patch_namespaced_job_status, job_name, "tierflow", failed)
    pod = k8s.V1Pod(metadata=k8s.V1ObjectMeta(name=f"{job_name}-x1", labels={"job-name": job_name}))
    await asyncio.to_thread(core.create_namespaced_pod, "tierflow", pod)
    kmock[f"get /api/v1/namespaces/tierflow/pods/{job_name}-x1/log"] << "Traceback...\n"
    [status] = await as_launcher(launcher.list("training"))
    assert status.phase == "failed" and "Traceback" in (status.reason or "")
    await as_launcher(launcher.stop(training.name))
    await as_launcher(launcher.stop("tierflow-infer-7-tier0"))

    role = find(objects, "Role")
    granted = rules(role)
    used = {(group, resource, verb) for _, group, resource, verb in calls}
    assert {namespace for namespace, *_ in calls} == {role["metadata"]["namespace"]}
    assert used <= granted, f"the Role misses {sorted(used - granted)}"
    # Every kind of call the launcher has: create, list and delete Jobs and Deployments, list pods, read a log.
    assert {(resource, verb) for _, resource, verb in used} >= {
        ("jobs", "create"), ("jobs", "list"), ("jobs", "delete"), ("deployments", "create"),
        ("deployments", "list"), ("deployments", "delete"), ("pods", "list"), ("pods/log", "get")}


# --- the example cluster ----------------------------------------------------------------------------------

def test_the_example_points_tierflow_at_its_kafka_and_postgres(example: list[Obj]) -> None:
    assert find(example, "Namespace")["metadata"]["name"] == "tierflow"
    api = find(example, "Deployment", "tierflow-api")
    settings = Settings.from_env(container_env(example, api["spec"]["template"]["spec"]["containers"][0],
                                               "tierflow"))
    # Kafka: Strimzi in KRaft mode with a node pool; tierflow uses its bootstrap Service and plain listener.
    kafka = find(example, "Kafka")
    pool = find(example, "KafkaNodePool")
    assert "zookeeper" not in kafka["spec"]
    assert pool["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"]
    assert set(pool["spec"]["roles"]) == {"controller", "broker"}
    assert pool["spec"]["replicas"] >= 1 and pool["spec"]["storage"]["type"] in ("jbod", "persistent-claim")
    [listener] = [item for item in kafka["spec"]["kafka"]["listeners"] if not item["tls"]]
    assert listener["type"] == "internal"
    assert settings.kafka.bootstrap_servers == f"{kafka['metadata']['name']}-kafka-bootstrap:{listener['port']}"
    # One broker: replication factors must not ask for more.
    config = kafka["spec"]["kafka"]["config"]
    assert config["default.replication.factor"] == config["offsets.topic.replication.factor"] == pool["spec"][
        "replicas"]
    # The control-plane topics exist with the layout tierflow creates them with on the embedded stack.
    topics = {item["spec"].get("topicName", item["metadata"]["name"]): item["spec"]
              for item in example if item["kind"] == "KafkaTopic"}
    assert {item["metadata"]["labels"]["strimzi.io/cluster"] for item in example if item["kind"] == "KafkaTopic"} == {
        kafka["metadata"]["name"]}
    assert "topicOperator" in kafka["spec"]["entityOperator"]
    assert {name: (spec["partitions"], spec["config"]["retention.ms"]) for name, spec in topics.items()} == {
        spec.name: (spec.partitions, spec.retention_ms) for spec in control_plane_topics(settings.kafka)}
    assert {spec["replicas"] for spec in topics.values()} == {pool["spec"]["replicas"]}
    # Postgres: DATABASE_URL names its Service and the credentials its server was initialised with.
    url = urlsplit(settings.database.url)
    postgres = find(example, "StatefulSet", "postgres")
    service = find(example, "Service", "postgres")
    credentials = find(example, "Secret", "postgres-credentials")["stringData"]
    assert (url.hostname, url.port) == (service["metadata"]["name"], service["spec"]["ports"][0]["port"])
    assert (url.username, url.password, url.path.lstrip("/")) == (
        credentials["POSTGRES_USER"], credentials["POSTGRES_PASSWORD"], credentials["POSTGRES_DB"])
    assert postgres["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= postgres["spec"]["template"]["metadata"]["labels"].items()
    # The image the overlay pushes is the one everything runs.
    assert settings.workloads.image == "registry.example.com/tierflow:0.1.0"
    assert {c["image"] for _, c in tierflow_containers(example)} == {settings.workloads.image}


@pytest.mark.parametrize(("overlay", "kubeedge_tiers"), [(EXAMPLE, set()), (KUBEEDGE, {"0"})],
                         ids=["example", "example-kubeedge"])
async def test_tier_placement_in_the_example_clusters(overlay: Path, kubeedge_tiers: set[str]) -> None:
    """The tier Deployments the orchestrator launches with these settings: tier K selects nodes labelled
    tierflow.io/tier=K (docs/cluster.md); a KubeEdge tier also selects and tolerates KubeEdge's edge role."""
    settings = worker_settings(render(overlay))
    assert settings.workloads.kubeedge_tiers == kubeedge_tiers
    assert settings.workloads.service_account == ""  # workload pods get no Kubernetes API token
    workload_env = {**settings.to_env(), "PYTHONUNBUFFERED": "1"}  # what run_worker() gives the orchestrator
    with k8s.ApiClient(k8s.Configuration(host="http://127.0.0.1:9")) as api_client:  # builders only: no calls
        launcher = KubernetesLauncher(settings.workloads, api_client)
        for index in range(3):
            spec = tier_spec({"id": 7}, {"index": index, "replicas": 1}, workload_env,
                             port=settings.workloads.tier_port)
            deployment = as_manifest(launcher.inference_deployment(spec))
            assert plain(to_model(deployment)) == deployment
            pod = deployment["spec"]["template"]["spec"]
            expected = {LABEL_TIER: str(index)}
            if str(index) in kubeedge_tiers:
                expected[LABEL_KUBEEDGE_EDGE] = ""
                assert {"key": LABEL_KUBEEDGE_EDGE, "operator": "Exists", "effect": "NoSchedule"} in pod[
                    "tolerations"]
            assert pod["nodeSelector"] == expected
            assert pod["automountServiceAccountToken"] is False
            [container] = pod["containers"]
            assert container["image"] == settings.workloads.image
            assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
            assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        await launcher.close()


# --- the renderer itself ----------------------------------------------------------------------------------

def test_the_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\nconfigMapGenerator: []\n")
    with pytest.raises(NotImplementedError, match="configMapGenerator"):
        render(tmp_path)
    target = {"spec": {"containers": [{"name": "a"}]}, "data": {"A": "1", "B": "2"}}
    merged = copy.deepcopy(target)
    strategic_merge(merged, {"data": {"A": "3", "B": None, "C": "4"}})
    assert merged["data"] == {"A": "3", "C": "4"}
    with pytest.raises(NotImplementedError, match=r"spec\.containers"):
        strategic_merge(merged, {"spec": {"containers": [{"name": "a", "image": "x"}]}})
    assert split_image("registry:5000/team/tierflow:1.2") == ("registry:5000/team/tierflow", ":1.2")
    assert split_image("tierflow") == ("tierflow", "")


def test_the_example_namespace_enforces_restricted_and_every_pod_meets_it() -> None:
    from tierflow.deploy.manifests import inference_deployment, training_job
    from tierflow.streams.launcher import WorkloadSpec

    [namespace] = [o for o in render(EXAMPLE) if o["kind"] == "Namespace"]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    workloads = [as_manifest(training_job(WorkloadSpec(name="t", kind="training", args=["train"]),
                                          image="tierflow:1", namespace="tierflow")),
                 as_manifest(inference_deployment(WorkloadSpec(name="i", kind="inference", args=["tier", "run"]),
                                                  image="tierflow:1", namespace="tierflow"))]
    tierflow_pods = [o for o in [*render(EXAMPLE), *workloads]
                     if o["kind"] in ("Deployment", "StatefulSet", "Job")]
    assert len(tierflow_pods) >= 5
    for obj in tierflow_pods:
        pod = obj["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, obj["metadata"]["name"]
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, (obj["metadata"]["name"], c["name"])
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]


# --- the validation sandbox apart from the worker's secrets (cluster mode) -------------------------------------

def pod_of(obj: Obj) -> Obj:
    pod: Obj = obj["spec"]["template"]["spec"]
    return pod


def secrets_used(pod: Obj) -> set[str]:
    """Every Secret a pod template can read: env references, envFrom, volumes."""
    names: set[str] = set()
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        for entry in container.get("env", []):
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                names.add(ref["name"])
        for source in container.get("envFrom", []):
            if "secretRef" in source:
                names.add(source["secretRef"]["name"])
    for volume in pod.get("volumes", []):
        if "secret" in volume:
            names.add(volume["secret"]["secretName"])
        for projected in volume.get("projected", {}).get("sources", []):
            if "secret" in projected or "serviceAccountToken" in projected:
                names.add(str(projected))
    return names


def test_the_validation_sandbox_runs_apart_with_no_secret_of_the_stack(rendered: list[Obj]) -> None:
    sandbox = find(rendered, "Deployment", "tierflow-sandbox")
    pod = pod_of(sandbox)
    [container] = pod["containers"]
    # It serves validations, at the level a restricted pod allows, with its own channel token only.
    assert parse_cli(container_argv(container)[1:], "tierflow-sandbox").func.__module__ == (
        "tierflow.tiers.sandbox_server")
    env = container_env(rendered, container, "tierflow")
    settings = Settings.from_env(env)
    assert settings.sandbox.isolation == "landlock"
    assert settings.sandbox.token
    assert secrets_used(pod) == {"tierflow-sandbox-token"}
    assert not {"DATABASE_URL", "TIERFLOW_API_TOKEN", "TIERFLOW_SECRET_KEY"} & set(env)
    assert pod["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in pod
    # Restricted, and its root file system read-only: the runners' scratch is an emptyDir.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    [mount] = container["volumeMounts"]
    assert env["TMPDIR"] == mount["mountPath"]


def test_only_the_worker_reaches_the_sandbox_and_the_sandbox_reaches_nothing(rendered: list[Obj]) -> None:
    sandbox = find(rendered, "Deployment", "tierflow-sandbox")
    worker = find(rendered, "Deployment", "tierflow-worker")
    policy = find(rendered, "NetworkPolicy", "tierflow-sandbox")
    spec = policy["spec"]
    sandbox_labels = sandbox["spec"]["template"]["metadata"]["labels"]
    assert spec["podSelector"]["matchLabels"].items() <= sandbox_labels.items()
    # No egress rule with both policy types: nothing out, not even DNS.
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    assert spec.get("egress", []) == []
    [rule] = spec["ingress"]
    [source] = rule["from"]
    assert set(source) == {"podSelector"}  # same namespace, pods by label; no namespaceSelector, no ipBlock
    assert source["podSelector"]["matchLabels"].items() <= worker["spec"]["template"]["metadata"]["labels"].items()
    for other in rendered:
        if other["kind"] in ("Deployment", "StatefulSet") and other is not worker:
            labels = other["spec"]["template"]["metadata"]["labels"]
            assert not source["podSelector"]["matchLabels"].items() <= labels.items(), other["metadata"]["name"]
    [container] = pod_of(sandbox)["containers"]
    [port] = rule["ports"]
    assert port == {"protocol": "TCP", "port": container["ports"][0]["containerPort"]}


def test_the_worker_asks_the_sandbox_over_its_service_with_the_shared_token(rendered: list[Obj]) -> None:
    settings = worker_settings(rendered)
    service = find(rendered, "Service", "tierflow-sandbox")
    sandbox = find(rendered, "Deployment", "tierflow-sandbox")
    [service_port] = service["spec"]["ports"]
    url = urlsplit(settings.sandbox.url)
    assert (url.hostname, url.port) == (service["metadata"]["name"], service_port["port"])
    assert service["spec"]["selector"].items() <= sandbox["spec"]["template"]["metadata"]["labels"].items()
    [container] = pod_of(sandbox)["containers"]
    sandbox_env = container_env(rendered, container, "tierflow")
    assert settings.sandbox.token == sandbox_env["TIERFLOW_SANDBOX_TOKEN"]
    # The worker no longer runs model code: the sandbox's token is its only link to it.
    assert "tierflow-sandbox-token" in secrets_used(pod_of(find(rendered, "Deployment", "tierflow-worker")))


def test_training_jobs_confine_their_trainer_and_hold_no_kubernetes_token(rendered: list[Obj]) -> None:
    # The Job the orchestrator launches from the worker's settings: its driver holds the workload token
    # (from the workload Secret), its trainer runs at the landlock level (no socket, no new process, Landlock),
    # and the pod mounts no service-account token.
    settings = worker_settings(rendered)
    spec = training_spec(Group(3, (4,), ("created",), True), settings, settings.workload_env())
    job = as_manifest(training_job(spec, image=settings.workloads.image, namespace="tierflow",
                                   env_secret=settings.workloads.secret or None))
    pod = pod_of(job)
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    assert Settings.from_env(env).sandbox.isolation == "landlock"
    assert "TIERFLOW_SANDBOX_TOKEN" not in env and "DATABASE_URL" not in env
    assert pod["automountServiceAccountToken"] is False
