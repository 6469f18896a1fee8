"""Settings from the environment: parsing, clear errors naming the variable, and a lossless `to_env`."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import pytest

from tierflow.streams.settings import Settings, SettingsError, env_names


def test_to_env_rebuilds_the_same_settings() -> None:
    settings = Settings.from_env({"TIERFLOW_KUBEEDGE_TIERS": "edge, 0", "TIERFLOW_TIER_NAMES": "edge,fog,cloud",
                                  "TIERFLOW_TIER_PORT": "9100",
                                  "TIERFLOW_TIER_NODE_LABEL": "example.com/tier", "TIERFLOW_MAX_TRAINING": "3",
                                  "TIERFLOW_WORKLOAD_SERVICE_ACCOUNT": "tierflow-workloads"})
    assert settings.workloads.kubeedge_tiers == frozenset({"edge", "0"})
    assert settings.workloads.tier_port == 9100 and settings.workloads.tier_names == ("edge", "fog", "cloud")
    assert settings.workloads.tier_node_label == "example.com/tier"
    assert Settings.from_env(settings.to_env()) == settings


def test_defaults_place_tiers_by_their_label() -> None:
    w = Settings.from_env({}).workloads
    assert (w.tier_port, w.tier_node_label, w.kubeedge_tiers, w.service_account) == (
        8000, "tierflow.io/tier", frozenset(), "")


@pytest.mark.parametrize(("env", "message"), [
    ({"TIERFLOW_TIER_PORT": "http"}, "TIERFLOW_TIER_PORT='http' is not an integer"),
    ({"TIERFLOW_TIER_PORT": "70000"}, "TIERFLOW_TIER_PORT=70000 is not a TCP port"),
    ({"TIERFLOW_LAUNCHER": "docker"}, "TIERFLOW_LAUNCHER='docker'"),
    ({"TIERFLOW_TIER_NAMES": "edge,fog node"}, "TIERFLOW_TIER_NAMES: 'fog node' is not a Kubernetes label value"),
    ({"TIERFLOW_SESSION_TIMEOUT_MS": "10"}, "TIERFLOW_SESSION_TIMEOUT_MS=10 must be >= 1000"),
    ({"TIERFLOW_TIER_ENGINE": "onnx"}, "TIERFLOW_TIER_ENGINE='onnx' must be one of auto, keras, litert"),
])
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)


def test_workloads_get_no_database_url_no_secret_key_and_no_admin_token() -> None:
    local = Settings.from_env({"DATABASE_URL": "postgresql://u:pw@db/t", "TIERFLOW_API_TOKEN": "s3cret",
                               "TIERFLOW_SECRET_KEY": "k" * 64})
    env = local.workload_env()
    assert not {"DATABASE_URL", "TIERFLOW_API_TOKEN", "TIERFLOW_SECRET_KEY"} & set(env)  # each gets its own token
    cluster = Settings.from_env({"DATABASE_URL": "postgresql://u:pw@db/t", "TIERFLOW_API_TOKEN": "s3cret",
                                 "TIERFLOW_LAUNCHER": "kubernetes", "TIERFLOW_WORKLOAD_SECRET": "wl-secrets"})
    env = cluster.workload_env()
    assert "s3cret" not in env.values() and "postgresql://u:pw@db/t" not in env.values()
    assert env["TIERFLOW_WORKLOAD_SECRET"] == "wl-secrets"


class RecordingEnv(Mapping[str, str]):
    """An empty environment that records the names looked up in it."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.names.add(key)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def test_each_variable_and_default_is_declared_once() -> None:
    # from_env reads exactly the variables the fields declare (the README test lists the same), and an empty
    # environment gives the dataclasses' own defaults: no second copy of a name or a default to drift.
    env = RecordingEnv()
    assert Settings.from_env(env) == Settings()
    assert env.names == set(env_names())
    assert len(env_names()) == len(set(env_names()))


def test_the_embedded_broker_gets_a_short_session_timeout_unless_one_was_chosen() -> None:
    from tierflow.deploy.stack_runtime import EMBEDDED_SESSION_TIMEOUT_MS, embedded_kafka

    assert embedded_kafka(Settings.from_env({}).kafka).session_timeout_ms == EMBEDDED_SESSION_TIMEOUT_MS == 2000
    chosen = Settings.from_env({"TIERFLOW_SESSION_TIMEOUT_MS": "9000"}).kafka
    assert embedded_kafka(chosen).session_timeout_ms == 9000
