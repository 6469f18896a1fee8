"""The orchestrator agent: reconciles the training workloads the projections call for with those that exist.

Run by the worker with a launcher wired in (deploy/local_launcher.py or deploy/kubernetes_launcher.py behind
the `streams.launcher.Launcher` port). Whenever the projector commits events that can change its plan
(`streams.catalogue.WORKLOAD_EVENTS`: not each epoch's progress report), at most once per
`TIERFLOW_RECONCILE_MIN_S`, and every `TIERFLOW_RECONCILE_S` as a safety net, it plans with the pure
`plan_training(...)` over the open results only (a pass costs what is open, not the history) and applies
the plan:
- one workload per chain of a deployment (the chain trains jointly) and one per non-distributed model,
  started only once the deployment's datasource is announced (no TensorFlow process idles waiting for data),
  at most `max_training` at once; the rest queue visibly (`public.training_queue`, shown by the API);
- a workload that ended while its results are not final becomes `TrainingFailed` with its exit code and last
  log lines; a workload whose results all ended (finished, failed, stopped) or whose deployment is gone is
  removed;
- a finished result is never retrained: only results in `created` are launched, so a replay, a restart or a
  Job garbage-collected by Kubernetes changes nothing. A result launched earlier whose workload vanished
  while it was still open is launched again (same deterministic name).
The commands it sends have ids derived from the workload, so a restart that re-sends one is decided once, and
carry the worker's proof (streams/proofs.py): no other writer of the commands topic can report a launch or a
dead workload. Each workload it launches gets an API token scoped to it (streams/tokens.py), in the spec's
`secrets`, and none of the stack's secrets: a training job's token reaches its own deployment and results (and
lets it report for those only, through the API), a tier's its inference and its result's model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

import asyncpg

from tierflow.projections import queries
from tierflow.projections.schema import NOTIFY_CHANNEL, concerns_workloads
from tierflow.streams import tokens
from tierflow.streams.client import CommandClient
from tierflow.streams.envelope import TIERFLOW_NS, Command
from tierflow.streams.kafka import Doorbell, first_of
from tierflow.streams.launcher import (
    LABEL_DEPLOYMENT,
    LABEL_INFERENCE,
    LABEL_KIND,
    LABEL_MANAGED,
    LABEL_RESULTS,
    LABEL_TIER,
    MANAGED_BY,
    Launcher,
    Resources,
    WorkloadSpec,
    WorkloadStatus,
    parse_results_label,
    results_label,
    training_workload_name,
)
from tierflow.streams.proofs import WORKER, Signer
from tierflow.streams.settings import ApiSettings, KafkaSettings, Settings, env_var, stack_secret_names
from tierflow.streams.statuses import InferenceStatus, ResultStatus
from tierflow.streams.tokens import WorkloadClaims
from tierflow.streams.topics import TopicSpec, create_topics

log = logging.getLogger("tierflow.orchestrator")

#: A result in one of these statuses still needs its workload.
OPEN = frozenset({ResultStatus.CREATED, ResultStatus.DEPLOYED, ResultStatus.TRAINING})


@dataclass(frozen=True)
class Group:
    """The results one training workload trains: a chain (bottom first) or a single model."""

    deployment_id: int
    result_ids: tuple[int, ...]
    statuses: tuple[str, ...]
    has_data: bool

    @property
    def name(self) -> str:
        return training_workload_name(self.deployment_id, self.result_ids[0])

    @property
    def open(self) -> bool:
        return any(s in OPEN for s in self.statuses)

    @property
    def launched(self) -> bool:
        return any(s in (ResultStatus.DEPLOYED, ResultStatus.TRAINING) for s in self.statuses)

    @property
    def open_ids(self) -> list[int]:
        return [r for r, s in zip(self.result_ids, self.statuses, strict=True) if s in OPEN]


@dataclass
class Plan:
    launch: list[Group] = field(default_factory=list)  # new: send ReportTrainingLaunched too
    relaunch: list[Group] = field(default_factory=list)  # launched before, workload vanished
    fail: list[tuple[Group, str]] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    queued: list[tuple[Group, int, str]] = field(default_factory=list)


def groups_from_rows(rows: list[dict[str, Any]]) -> list[Group]:
    by_id = {r["id"]: r for r in rows}
    seen: set[int] = set()
    groups: list[Group] = []
    for r in rows:
        if r["id"] in seen:
            continue
        chain = [rid for rid in (r["chain"] or [r["id"]]) if rid in by_id]
        seen.update(chain)
        groups.append(Group(deployment_id=r["deployment_id"], result_ids=tuple(chain),
                            statuses=tuple(by_id[rid]["status"] for rid in chain), has_data=bool(r["has_data"])))
    return groups


def plan_training(groups: list[Group], workloads: list[WorkloadStatus], max_training: int) -> Plan:
    """What to do to make the existing training workloads match the results (pure)."""
    plan = Plan()
    existing = {w.name: w for w in workloads if w.kind == "training"}
    wanted_names = set()
    running = sum(1 for w in existing.values() if not w.finished)
    waiting: list[Group] = []
    for g in groups:
        w = existing.get(g.name)
        wanted_names.add(g.name)
        if not g.open:
            if w is not None:
                plan.remove.append(g.name)  # all results ended: the workload has nothing left to do
            continue
        if w is not None:
            if w.finished:
                why = w.reason or f"exit code {w.exit_code}"
                plan.fail.append((g, f"training workload {g.name} ended ({w.phase}) without reporting results "
                                     f"{g.open_ids}: {why}"))
            continue
        if g.launched:
            plan.relaunch.append(g)
            running += 1
        elif g.has_data:
            waiting.append(g)
    for g in waiting:
        if running < max_training:
            plan.launch.append(g)
            running += 1
        else:
            position = len(plan.queued) + 1
            plan.queued.append((g, position, f"queued: {running} training workloads running (limit "
                                             f"{max_training}); position {position}"))
    for name in existing:
        if name not in wanted_names:
            plan.remove.append(name)  # its deployment or results were deleted
    return plan


def training_spec(g: Group, settings: Settings, env: dict[str, str]) -> WorkloadSpec:
    return WorkloadSpec(
        name=g.name,
        kind="training",
        args=["train", "--deployment", str(g.deployment_id), "--results", ",".join(map(str, g.result_ids))],
        env=env,
        labels={LABEL_MANAGED: MANAGED_BY, LABEL_KIND: "training", LABEL_DEPLOYMENT: str(g.deployment_id),
                LABEL_RESULTS: results_label(list(g.result_ids))},
        resources=Resources(cpu="1", memory="4Gi", gpu=settings.workloads.training_gpus),
    )


#: The variable a workload reads its API token from (`Settings.api.token` in the workload's own settings).
TOKEN_VARIABLE = env_var(ApiSettings, "token").name


def with_token(spec: WorkloadSpec, settings: Settings, claims: WorkloadClaims) -> WorkloadSpec:
    """`spec` with a token scoped to `claims` as its secret, and none of the stack's secrets in its env (the env
    handed to the orchestrator may come from `to_env()`; what a workload sees, its user code can use)."""
    env = {key: value for key, value in spec.env.items() if key not in stack_secret_names()}
    token = tokens.mint(settings.security.secret_key, claims)
    return replace(spec, env=env, secrets={**spec.secrets, TOKEN_VARIABLE: token})


def training_launch(g: Group, settings: Settings, env: dict[str, str]) -> WorkloadSpec:
    """What the orchestrator launches for a group: its spec, with a token for its deployment and results."""
    return with_token(training_spec(g, settings, env), settings,
                      tokens.training_claims(g.deployment_id, g.result_ids))


@dataclass
class InferencePlan:
    launch: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    topics: list[dict[str, Any]] = field(default_factory=list)


def tier_workload_name(inference_id: int, tier_index: int) -> str:
    return f"tierflow-infer-{inference_id}-tier{tier_index}"


def plan_inference(inferences: list[dict[str, Any]], workloads: list[WorkloadStatus]) -> InferencePlan:
    """One workload per tier of every running inference; nothing for stopped or deleted ones (pure).

    A tier workload that ended (a local process that crashed) is removed and launched again on the next
    pass; on Kubernetes the Deployment restarts its pods itself.
    """
    plan = InferencePlan()
    existing = {w.name: w for w in workloads if w.kind == "inference"}
    wanted: set[str] = set()
    for inf in inferences:
        if inf["status"] != InferenceStatus.RUNNING:
            continue
        plan.topics.append(inf)
        for tier in inf["tiers"]:
            name = tier_workload_name(inf["id"], tier["index"])
            wanted.add(name)
            w = existing.get(name)
            if w is None:
                plan.launch.append((inf, tier))
            elif w.finished:
                plan.remove.append(name)
    plan.remove.extend(name for name in existing if name not in wanted)
    return plan


def tier_label(tier: dict[str, Any], names: tuple[str, ...] = ()) -> str:
    """The value of a tier workload's `tierflow.io/tier` label (its pods' default node selector): its sub-model's
    level in the chain (0 = the bottom, edge model; so an inference entering mid-chain still puts the fog model on
    fog nodes), or the level's name from TIERFLOW_TIER_NAMES (`edge,fog,cloud`)."""
    level = int(tier.get("level", tier["index"]))  # inferences requested before levels existed: the index
    return names[level] if level < len(names) else str(level)


def tier_spec(inference: dict[str, Any], tier: dict[str, Any], env: dict[str, str], *, port: int = 0,
              tier_names: tuple[str, ...] = ()) -> WorkloadSpec:
    """The workload of one tier. `port` is its HTTP port (probes, metrics): 0 lets each local process pick a free
    one (several tiers share a machine); a pod gets the fixed `TIERFLOW_TIER_PORT` its probes point at."""
    return WorkloadSpec(
        name=tier_workload_name(inference["id"], tier["index"]),
        kind="inference",
        args=["tier", "run", "--inference", str(inference["id"]), "--tier", str(tier["index"])],
        env={**env, "TIERFLOW_TIER_PORT": str(port)},
        labels={LABEL_MANAGED: MANAGED_BY, LABEL_KIND: "inference", LABEL_INFERENCE: str(inference["id"]),
                LABEL_TIER: tier_label(tier, tier_names)},
        resources=Resources(cpu="1", memory="2Gi"),
        replicas=int(tier.get("replicas") or 1),
    )


def tier_launch(inference: dict[str, Any], tier: dict[str, Any], settings: Settings, env: dict[str, str], *,
                port: int = 0) -> WorkloadSpec:
    """What the orchestrator launches for a tier: its spec, with a token for its inference and its result."""
    spec = tier_spec(inference, tier, env, port=port, tier_names=settings.workloads.tier_names)
    return with_token(spec, settings, tokens.tier_claims(inference["id"], tier["index"], int(tier["result_id"])))


#: How long an inference's shadow topic keeps the outcomes of its shadow samples (the live agreement reads
#: the latest of them).
SHADOW_RETENTION_MS = 7 * 24 * 3600 * 1000


def inference_topics(inference: dict[str, Any], default_servers: str, partitions: int = 1, *,
                     shadow_topic: str = "") -> dict[str, list[TopicSpec]]:
    """The topics an inference needs, by cluster (pure): each tier's input topic with `partitions`, or more when
    the tier has more replicas (a replica without a partition idles), the output topic on every cluster a
    tier answers from, and `shadow_topic` (the outcomes of its shadow samples, one partition) on the top
    tier's cluster when the inference sends shadow samples (more than one tier, `shadow_fraction` > 0)."""
    by_cluster: dict[str, list[TopicSpec]] = {}
    for tier in inference["tiers"]:
        servers = tier.get("bootstrap_servers") or default_servers
        tier_partitions = max(1, partitions, int(tier.get("replicas") or 1))
        specs = by_cluster.setdefault(servers, [])
        specs.append(TopicSpec(tier["input_topic"], tier_partitions, -1))
        if all(spec.name != inference["output_topic"] for spec in specs):
            specs.append(TopicSpec(inference["output_topic"], max(1, partitions), -1))
    tiers = inference["tiers"]
    if shadow_topic and len(tiers) > 1 and float(inference.get("shadow_fraction") or 0) > 0:
        top = max(tiers, key=lambda t: int(t.get("index", 0)))
        by_cluster[top.get("bootstrap_servers") or default_servers].append(
            TopicSpec(shadow_topic, 1, SHADOW_RETENTION_MS))
    return by_cluster


async def ensure_inference_topics(inference: dict[str, Any], default_servers: str, partitions: int = 1, *,
                                  shadow_topic: str = "", kafka: KafkaSettings | None = None) -> None:
    """Create what `inference_topics` lists and is missing (explicitly: an auto-created topic would get the
    broker's default partition count); existing topics are left as they are. `kafka`: whose credentials sign in."""
    by_cluster = inference_topics(inference, default_servers, partitions, shadow_topic=shadow_topic)
    for servers, specs in by_cluster.items():
        await create_topics(servers, specs, kafka)


def derived_command_id(*parts: object) -> str:
    return str(uuid.uuid5(TIERFLOW_NS, "orchestrator:" + ":".join(map(str, parts))))


class Orchestrator:
    def __init__(self, settings: Settings, launcher: Launcher, workload_env: dict[str, str], *,
                 commands_written: Doorbell | None = None) -> None:
        self._topics_ready: set[int] = set()
        #: rung after the orchestrator's own commands are on the topic: the decider reads them at once
        self.commands_written = commands_written
        self.settings = settings
        self.launcher = launcher
        self.workload_env = workload_env
        self.reconciled = 0
        self._wake = asyncio.Event()
        #: the training queue as last written (rewritten only when it changes)
        self._queue: list[tuple[int, int, str]] | None = None

    def _on_notify(self, conn: object, pid: int, channel: str, payload: str) -> None:
        if concerns_workloads(payload):
            self._wake.set()

    async def run(self, stopping: asyncio.Event) -> None:
        signer = Signer.from_secret(self.settings.security.secret_key, WORKER)
        conn = await asyncpg.connect(self.settings.database.url)
        listen = await asyncpg.connect(self.settings.database.url)
        await listen.add_listener(NOTIFY_CHANNEL, self._on_notify)
        client = CommandClient(self.settings.kafka, source="orchestrator", signer=signer)
        await client.start()
        loop = asyncio.get_running_loop()
        w = self.settings.workloads
        try:
            while not stopping.is_set():
                # Cleared before the pass: a notification that comes during it is planned for by the next one.
                self._wake.clear()
                last = loop.time()
                await self.reconcile(conn, client)
                await first_of(stopping, self._wake, timeout=w.reconcile_s - (loop.time() - last))
                # However often events wake it, at least `reconcile_min_s` between two passes.
                await first_of(stopping, timeout=w.reconcile_min_s - (loop.time() - last))
        finally:
            await client.stop()
            await listen.close()
            await conn.close()

    async def reconcile(self, conn: asyncpg.Connection, client: CommandClient) -> Plan:
        # Workloads first: a workload that ended had its reports projected before it exited, so rows read
        # after it are final and it is not mistaken for one that died without reporting.
        workloads = await self.launcher.list("training")
        groups = groups_from_rows(await queries.training_rows(conn))
        plan = plan_training(groups, workloads, self.settings.workloads.max_training)
        commands: list[Command] = []
        for g in plan.launch + plan.relaunch:
            await self.launcher.launch(training_launch(g, self.settings, self.workload_env))
            log.info("launched %s for results %s", g.name, list(g.result_ids))
            if g in plan.launch:
                commands.append(Command(derived_command_id("launched", g.name), "ReportTrainingLaunched",
                                        {"deployment_id": g.deployment_id, "result_ids": list(g.result_ids),
                                         "workload": g.name}, source="orchestrator"))
        for g, reason in plan.fail:
            log.warning("%s", reason)
            commands.append(Command(derived_command_id("failed", g.name, g.open_ids), "ReportTrainingFailure",
                                    {"deployment_id": g.deployment_id, "result_ids": g.open_ids, "reason": reason},
                                    source="orchestrator"))
        if commands:
            await client.send_many(commands)
            if self.commands_written is not None:
                self.commands_written.ring()
        for name in plan.remove:
            await self.launcher.stop(name)
            log.info("removed workload %s", name)
        queue = [(rid, pos, note) for g, pos, note in plan.queued for rid in g.result_ids]
        if queue != self._queue:  # an idle pass writes nothing
            async with conn.transaction():
                await conn.execute("DELETE FROM public.training_queue")
                if queue:
                    await conn.executemany(
                        "INSERT INTO public.training_queue (result_id, position, note) VALUES ($1, $2, $3)", queue)
            self._queue = queue
        await self.reconcile_inferences(conn)
        self.reconciled += 1
        return plan

    async def reconcile_inferences(self, conn: asyncpg.Connection) -> InferencePlan:
        workloads = await self.launcher.list("inference")
        plan = plan_inference(await queries.running_inferences(conn), workloads)
        for inference in plan.topics:
            if inference["id"] not in self._topics_ready:
                await ensure_inference_topics(inference, self.settings.kafka.bootstrap_servers,
                                              self.settings.workloads.tier_partitions,
                                              shadow_topic=self.settings.kafka.shadow_topic(inference["id"]),
                                              kafka=self.settings.kafka)
                self._topics_ready.add(inference["id"])
        for name in plan.remove:
            await self.launcher.stop(name)
            log.info("removed tier workload %s", name)
        for inference, tier in plan.launch:
            port = self.settings.workloads.tier_port if self.settings.workloads.launcher == "kubernetes" else 0
            await self.launcher.launch(tier_launch(inference, tier, self.settings, self.workload_env, port=port))
            log.info("launched tier %d of inference %d (%s)", tier["index"], inference["id"], tier["model_name"])
        return plan


def workload_results(w: WorkloadStatus) -> list[int]:
    with contextlib.suppress(KeyError):
        return parse_results_label(w.labels[LABEL_RESULTS])
    return []
