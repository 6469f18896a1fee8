"""The decider's state and the fold that builds it: `apply(state, event)`, the only way state changes.

Called by the decider agent (streams/decider.py) while it folds `tierflow.events` on start and after each
event it decides, and by the per-aggregate rules (streams/domain/*.py), which read the state. Because state
changes only here, the state rebuilt from `tierflow.events` after a restart equals the state the decider had
when it wrote them (deterministic).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tierflow.streams.catalogue import DEFAULT_RESERVED
from tierflow.streams.envelope import JSON, Event, Position
from tierflow.streams.proofs import Verifier
from tierflow.streams.statuses import FINAL_STATUSES, InferenceStatus, ResultStatus

Shape = list[int | None]

@dataclass
class ModelState:
    id: int
    name: str
    distributed: bool
    upper_id: int | None
    version: int
    input_shape: Shape
    output_shapes: list[Shape]
    record: JSON  # the full projection-shaped record (as in the last ModelCreated/ModelUpdated)


@dataclass
class ConfigurationState:
    id: int
    name: str
    model_ids: list[int]
    version: int
    record: JSON


@dataclass
class DeploymentState:
    id: int
    configuration_id: int
    result_ids: list[int]


@dataclass
class ResultState:
    id: int
    deployment_id: int
    model_id: int
    status: ResultStatus
    #: result ids trained together (one chain, bottom first); a single model's result is a chain of one
    chain: list[int] = field(default_factory=list)

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES


@dataclass
class State:
    seq: int = 0
    position: Position | None = None
    decided: set[str] = field(default_factory=set)
    next_ids: dict[str, int] = field(default_factory=dict)
    models: dict[int, ModelState] = field(default_factory=dict)
    configurations: dict[int, ConfigurationState] = field(default_factory=dict)
    deployments: dict[int, DeploymentState] = field(default_factory=dict)
    results: dict[int, ResultState] = field(default_factory=dict)
    #: datasource id -> deployment id it was announced for
    datasources: dict[int, int] = field(default_factory=dict)
    #: datasource id -> its announcement (for re-sending it to another deployment)
    datasource_records: dict[int, JSON] = field(default_factory=dict)
    #: inference id -> result ids it serves (kept until the inference is deleted)
    inferences: dict[int, list[int]] = field(default_factory=dict)
    #: inference id -> its status
    inference_status: dict[int, InferenceStatus] = field(default_factory=dict)
    #: finished result id -> the `exits` of its TrainingResultReported (temperature, calibration, and on a
    #: chain's top result the chain's exit frontier record, unparsed: parsed when an inference asks for a target)
    exits: dict[int, JSON] = field(default_factory=dict)
    #: the topics no command may name (`catalogue.reserved_topics` of the decider's settings; not folded)
    reserved_topics: frozenset[str] = DEFAULT_RESERVED
    #: the keys proofs on commands are checked with (streams/proofs.py; from the decider's secret; not folded).
    #: The default holds none: no verdict and no training report is believed.
    proofs: Verifier = field(default_factory=Verifier, compare=False)

    def next_id(self, kind: str) -> int:
        return self.next_ids.get(kind, 0) + 1

    def model_by_name(self, name: str) -> ModelState | None:
        for m in self.models.values():
            if m.name == name:
                return m
        return None

    def lower_of(self, model_id: int) -> ModelState | None:
        for m in self.models.values():
            if m.upper_id == model_id:
                return m
        return None

    def chain_below(self, model_id: int) -> list[int]:
        """The model and its whole lower chain, bottom (edge) first."""
        chain = [model_id]
        seen = {model_id}
        lower = self.lower_of(model_id)
        while lower is not None and lower.id not in seen:
            chain.append(lower.id)
            seen.add(lower.id)
            lower = self.lower_of(lower.id)
        return list(reversed(chain))

    def configurations_using(self, model_id: int) -> list[ConfigurationState]:
        return [c for c in self.configurations.values() if model_id in c.model_ids]


def _bump(state: State, kind: str, ident: int) -> None:
    state.next_ids[kind] = max(state.next_ids.get(kind, 0), ident)


def apply(state: State, event: Event) -> None:
    """Fold one event into the state (also used while rebuilding after a restart)."""
    state.seq = event.seq
    state.decided.add(event.command_id)
    if event.position is not None:
        state.position = event.position
    p = event.payload
    t = event.type
    if t in ("ModelCreated", "ModelUpdated"):
        state.models[p["id"]] = ModelState(
            id=p["id"], name=p["name"], distributed=p["distributed"], upper_id=p["upper_id"],
            version=p["version"], input_shape=p["input_shape"], output_shapes=p["output_shapes"], record=p,
        )
        _bump(state, "model", p["id"])
    elif t == "ModelDeleted":
        state.models.pop(p["id"], None)
    elif t in ("ConfigurationCreated", "ConfigurationUpdated"):
        state.configurations[p["id"]] = ConfigurationState(p["id"], p["name"], list(p["model_ids"]), p["version"], p)
        _bump(state, "configuration", p["id"])
    elif t == "ConfigurationDeleted":
        state.configurations.pop(p["id"], None)
    elif t == "DeploymentRequested":
        state.deployments[p["id"]] = DeploymentState(p["id"], p["configuration_id"],
                                                     [r["id"] for r in p["results"]])
        _bump(state, "deployment", p["id"])
        chains = p.get("chains") or [[r["id"]] for r in p["results"]]
        chain_of = {rid: chain for chain in chains for rid in chain}
        for r in p["results"]:
            state.results[r["id"]] = ResultState(r["id"], p["id"], r["model_id"], ResultStatus.CREATED,
                                                 chain_of[r["id"]])
            _bump(state, "result", r["id"])
    elif t == "DeploymentDeleted":
        dep = state.deployments.pop(p["id"], None)
        if dep is not None:
            for rid in dep.result_ids:
                state.results.pop(rid, None)
                state.exits.pop(rid, None)
    elif t in _STATUS_BY_EVENT:
        for rid in p.get("result_ids") or [p["result_id"]]:
            if rid in state.results:
                state.results[rid].status = _STATUS_BY_EVENT[t]
        if t == "TrainingResultReported" and p["result_id"] in state.results and p.get("exits") is not None:
            state.exits[p["result_id"]] = p["exits"]
    elif t == "ResultDeleted":
        state.exits.pop(p["id"], None)
        res = state.results.pop(p["id"], None)
        if res is not None and res.deployment_id in state.deployments:
            state.deployments[res.deployment_id].result_ids.remove(res.id)
    elif t == "InferenceRequested":
        state.inferences[p["id"]] = [tier["result_id"] for tier in p["tiers"]]
        state.inference_status[p["id"]] = InferenceStatus.RUNNING
        _bump(state, "inference", p["id"])
    elif t == "InferenceStopped":
        state.inference_status[p["id"]] = InferenceStatus.STOPPED
    elif t == "InferenceDeleted":
        state.inferences.pop(p["id"], None)
        state.inference_status.pop(p["id"], None)
    elif t == "DatasourceAnnounced":
        state.datasources[p["id"]] = p["deployment_id"]
        state.datasource_records[p["id"]] = {k: v for k, v in p.items()
                                             if k not in ("id", "deployment_id", "origin", "created_at")}
        _bump(state, "datasource", p["id"])
    # CommandRejected changes nothing but `decided` and `seq`.


_STATUS_BY_EVENT = {
    "TrainingLaunched": ResultStatus.DEPLOYED,
    "TrainingStarted": ResultStatus.TRAINING,
    "TrainingProgressed": ResultStatus.TRAINING,
    "TrainingResultReported": ResultStatus.FINISHED,
    "TrainingFailed": ResultStatus.FAILED,
    "TrainingStopped": ResultStatus.STOPPED,
}
