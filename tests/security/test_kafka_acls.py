"""Attack (cluster mode): every pod, and every client of the cluster's Kafka, may write every topic.

The example cluster's Kafka listener took anyone, unauthenticated, with no authorization: a training Job or a
tier pod running user model code, or any client in the cluster, could write `tierflow.commands` (forged
commands), `tierflow.events` (the source of truth, which the projector and the decider then fold), read the
dead letters, or join a tier's consumer group and take its partitions.

Defence (deploy/kubernetes/overlays/example): the listener authenticates with SCRAM-SHA-512 and the brokers
authorize with ACLs; each component is its own Strimzi `KafkaUser` with only what it needs: the API writes
commands and reads events and outputs; the worker reads and writes the control-plane topics and creates tier
topics; workloads (training Jobs, tier pods) read and write data and tier topics and dead letters but none of
the control plane; data producers and inference clients (`tierflow-client`) write data and the control topic.
tierflow's clients authenticate with KAFKA_SECURITY_PROTOCOL / KAFKA_SASL_* (streams/kafka.py), and the
worker's Kafka identity is never passed on to its workloads. Checked on the rendered manifests, with the ACL
rules of Kafka's `AclAuthorizer` (deny wins; literal, `*` and prefix patterns).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.test_cluster_manifests import EXAMPLE, Obj, container_env, find, render
from tierflow.streams import kafka as kio
from tierflow.streams.orchestrator import Group, tier_spec, training_spec
from tierflow.streams.settings import KafkaSettings, Settings

COMMANDS, EVENTS, DEADLETTER, CONTROL = "tierflow.commands", "tierflow.events", "tierflow.deadletter", \
    "KAFKA_ML_CONTROL_TOPIC"
#: Topics users name: training data, a tier's input, forwarded tensors, answers.
USER_TOPICS = ["mnist-data", "sensor-in", "tierflow-inference-7-tier1", "answers"]
TIER_GROUP = "tierflow-inference-7-tier-0"


@pytest.fixture(scope="module")
def example() -> list[Obj]:
    return render(EXAMPLE)


def users(example: list[Obj]) -> dict[str, Obj]:
    return {u["metadata"]["name"]: u for u in example if u["kind"] == "KafkaUser"}


def allowed(user: Obj, resource: str, name: str, operation: str) -> bool:
    """Kafka's simple authorizer: some allow ACL matches and no deny ACL does. An ACL matches a resource of its
    type whose name equals (literal), starts with (prefix) or is anything (`*`), for its operations (`All`
    covers every one; Read, Write and Delete imply Describe)."""
    def matches(acl: Obj) -> bool:
        res = acl["resource"]
        if res["type"] != resource:
            return False
        if resource != "cluster":
            pattern = res.get("patternType", "literal")
            if not (res["name"] == "*" or (pattern == "literal" and res["name"] == name)
                    or (pattern == "prefix" and name.startswith(res["name"]))):
                return False
        ops = set(acl["operations"])
        implied = {"Describe"} if ops & {"Read", "Write", "Delete", "Alter"} and operation == "Describe" else set()
        return "All" in ops or operation in ops or bool(implied)

    acls = user["spec"]["authorization"]["acls"]
    if any(matches(a) for a in acls if a.get("type", "allow") == "deny"):
        return False
    return any(matches(a) for a in acls if a.get("type", "allow") == "allow")


def test_the_example_kafka_authenticates_and_authorizes(example: list[Obj]) -> None:
    kafka = find(example, "Kafka")["spec"]
    listeners = kafka["kafka"]["listeners"]
    assert listeners and all(item.get("authentication", {}).get("type") == "scram-sha-512" for item in listeners)
    assert kafka["kafka"]["authorization"]["type"] == "simple"
    assert "userOperator" in kafka["entityOperator"]  # it turns KafkaUsers into SCRAM credentials and ACLs
    for user in users(example).values():
        assert user["metadata"]["labels"]["strimzi.io/cluster"] == find(example, "Kafka")["metadata"]["name"]
        assert user["spec"]["authentication"]["type"] == "scram-sha-512"
        assert user["spec"]["authorization"]["type"] == "simple"


def test_each_component_is_its_own_kafka_user_with_least_privilege(example: list[Obj]) -> None:
    u = users(example)
    assert {"tierflow-api", "tierflow-worker", "tierflow-workload", "tierflow-client"} <= set(u)
    api, worker, workload, client = (u[n] for n in ("tierflow-api", "tierflow-worker", "tierflow-workload",
                                                    "tierflow-client"))
    # The API: commands in, events and answers out.
    assert allowed(api, "topic", COMMANDS, "Write") and allowed(api, "topic", EVENTS, "Read")
    assert all(allowed(api, "topic", t, "Read") for t in USER_TOPICS)
    assert allowed(api, "group", TIER_GROUP, "Describe")  # the tiers' lag
    assert not any(allowed(api, "topic", t, "Write") for t in (EVENTS, DEADLETTER, CONTROL, *USER_TOPICS))
    # The worker: the control plane, and the tier topics it creates.
    for topic, ops in [(COMMANDS, ("Read", "Write")), (EVENTS, ("Read", "Write")), (DEADLETTER, ("Write",)),
                       (CONTROL, ("Read",))]:
        assert all(allowed(worker, "topic", topic, op) for op in ops), (topic, ops)
    assert allowed(worker, "topic", "sensor-in", "Create") and allowed(worker, "topic", "mnist-data", "Read")
    assert not allowed(worker, "topic", "answers", "Write")
    # Workloads run user model code: data and tier topics, dead letters, their groups; no control plane at all.
    assert all(allowed(workload, "topic", t, op) for t in USER_TOPICS for op in ("Read", "Write"))
    assert allowed(workload, "topic", DEADLETTER, "Write") and allowed(workload, "group", TIER_GROUP, "Read")
    for topic in (COMMANDS, EVENTS, CONTROL):
        assert not any(allowed(workload, "topic", topic, op) for op in ("Read", "Write", "Describe")), topic
    assert not allowed(workload, "topic", DEADLETTER, "Read")
    # Data producers and inference clients: data, answers and datasource announcements, nothing of tierflow's.
    assert allowed(client, "topic", "mnist-data", "Write") and allowed(client, "topic", CONTROL, "Write")
    assert allowed(client, "topic", "answers", "Read") and allowed(client, "group", "my-app", "Read")
    for topic in (COMMANDS, EVENTS, DEADLETTER):
        assert not any(allowed(client, "topic", topic, op) for op in ("Read", "Write")), topic
    assert not allowed(client, "group", TIER_GROUP, "Read")  # a client cannot take a tier's partitions
    # Whoever may write the control plane: commands the API and the worker, events the worker alone.
    assert {n for n, user in u.items() if allowed(user, "topic", COMMANDS, "Write")} == {"tierflow-api",
                                                                                         "tierflow-worker"}
    assert {n for n, user in u.items() if allowed(user, "topic", EVENTS, "Write")} == {"tierflow-worker"}


def deployment_settings(example: list[Obj], name: str) -> Settings:
    workload = find(example, "Deployment", name)
    return Settings.from_env(container_env(example, workload["spec"]["template"]["spec"]["containers"][0],
                                           "tierflow"))


def test_the_api_and_the_worker_sign_in_as_their_users(example: list[Obj]) -> None:
    for deployment, user in [("tierflow-api", "tierflow-api"), ("tierflow-worker", "tierflow-worker")]:
        kafka = deployment_settings(example, deployment).kafka
        assert (kafka.security_protocol, kafka.sasl_mechanism, kafka.sasl_username) == (
            "SASL_PLAINTEXT", "SCRAM-SHA-512", user)
        # The password is the one Strimzi's user operator generates into the Secret named after the user.
        pod = find(example, "Deployment", deployment)["spec"]["template"]["spec"]
        [password] = [e for e in pod["containers"][0]["env"] if e["name"] == "KAFKA_SASL_PASSWORD"]
        assert password["valueFrom"]["secretKeyRef"] == {"name": user, "key": "password",
                                                         "optional": True}  # (the base serves any Kafka)


def test_workloads_sign_in_as_the_workload_user_never_as_the_worker(example: list[Obj]) -> None:
    settings = deployment_settings(example, "tierflow-worker")
    env = {**settings.workload_env(), "PYTHONUNBUFFERED": "1"}  # what run_worker() gives the orchestrator
    assert "KAFKA_SASL_PASSWORD" not in env and "KAFKA_SASL_USERNAME" not in env
    secret = find(example, "Secret", settings.workloads.secret)["stringData"]
    workload_user = find(example, "KafkaUser", "tierflow-workload")
    assert workload_user["spec"]["authentication"]["password"]["valueFrom"]["secretKeyRef"] == {
        "name": settings.workloads.secret, "key": "KAFKA_SASL_PASSWORD"}
    for spec in (training_spec(Group(3, (4,), ("created",), True), settings, env),
                 tier_spec({"id": 7}, {"index": 0, "replicas": 1}, env, port=8000)):
        # The pod's environment: the spec's env, then the workload Secret (envFrom) for what env lacks.
        kafka = Settings.from_env({**secret, **spec.env}).kafka
        assert (kafka.security_protocol, kafka.sasl_username) == ("SASL_PLAINTEXT", "tierflow-workload")
        assert kafka.sasl_password == secret["KAFKA_SASL_PASSWORD"]


def test_the_clients_sign_in_with_the_settings_credentials() -> None:
    kafka = KafkaSettings(bootstrap_servers="k:9092", security_protocol="SASL_PLAINTEXT",
                          sasl_mechanism="SCRAM-SHA-512", sasl_username="u", sasl_password="p")
    options: dict[str, Any] = kio.security_options(kafka)  # what every producer, consumer and admin client takes
    assert options == {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512",
                       "sasl_plain_username": "u", "sasl_plain_password": "p"}
    tls = kio.security_options(KafkaSettings(security_protocol="SASL_SSL", sasl_username="u", sasl_password="p"))
    assert tls["security_protocol"] == "SASL_SSL" and tls["ssl_context"] is not None
    assert kio.security_options(KafkaSettings(bootstrap_servers="k:9092")) == {}  # the embedded broker
