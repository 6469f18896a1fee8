"""The decider's pure core: state as a fold of events, and `decide(state, command) -> event`.

Called by the decider agent (streams/decider.py), which feeds it commands in log order, and by unit
tests, which call it without Kafka. `apply` is the only way state changes, so the state rebuilt from
`tierflow.events` after a restart equals the state the decider had when it wrote them (deterministic).
Every rule of the Kafka-ML domain lives here, each rejection naming the culprit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tierflow.streams.catalogue import (
    CODE_COMMANDS,
    COMMAND_EVENTS,
    Invalid,
    ModelFields,
    as_id,
    expected_version,
    name_field,
    parse_deployment,
    parse_model,
    parse_model_ids,
    req_id,
    text_field,
)
from tierflow.streams.envelope import JSON, Command, Event, Position, event_id_for

Shape = list[int | None]

#: A result in one of these states never changes status again.
FINAL_STATUSES = frozenset({"finished", "failed", "stopped"})


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
    status: str
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
    #: inference id -> status ("running" | "stopped")
    inference_status: dict[int, str] = field(default_factory=dict)

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


# --- apply: the fold ----------------------------------------------------------------------------------

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
            state.results[r["id"]] = ResultState(r["id"], p["id"], r["model_id"], "created", chain_of[r["id"]])
            _bump(state, "result", r["id"])
    elif t == "DeploymentDeleted":
        dep = state.deployments.pop(p["id"], None)
        if dep is not None:
            for rid in dep.result_ids:
                state.results.pop(rid, None)
    elif t in _STATUS_BY_EVENT:
        for rid in p.get("result_ids") or [p["result_id"]]:
            if rid in state.results:
                state.results[rid].status = _STATUS_BY_EVENT[t]
    elif t == "ResultDeleted":
        res = state.results.pop(p["id"], None)
        if res is not None and res.deployment_id in state.deployments:
            state.deployments[res.deployment_id].result_ids.remove(res.id)
    elif t == "InferenceRequested":
        state.inferences[p["id"]] = [tier["result_id"] for tier in p["tiers"]]
        state.inference_status[p["id"]] = "running"
        _bump(state, "inference", p["id"])
    elif t == "InferenceStopped":
        state.inference_status[p["id"]] = "stopped"
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
    "TrainingLaunched": "deployed",
    "TrainingStarted": "training",
    "TrainingProgressed": "training",
    "TrainingResultReported": "finished",
    "TrainingFailed": "failed",
    "TrainingStopped": "stopped",
}


# --- decide -------------------------------------------------------------------------------------------

class Pending(Exception):
    """The command needs its model code validated first; the validator agent will re-send it."""


def decide(state: State, cmd: Command, *, occurred_at: str, position: Position | None) -> Event | None:
    """The one event the command produces, or None if it was decided before or awaits validation.

    Never raises on bad input: anything wrong becomes a CommandRejected event naming the culprit.
    """
    if cmd.command_id in state.decided:
        return None
    try:
        event_type, aggregate, agg_version, payload = _decide(state, cmd, occurred_at)
    except Pending:
        return None
    except Invalid as exc:
        event_type, aggregate, agg_version = "CommandRejected", f"command:{cmd.command_id}", 1
        payload = {"command_id": cmd.command_id, "command_type": cmd.type, "reason": exc.to_json()}
    return Event(
        id=event_id_for(cmd.command_id),
        seq=state.seq + 1,
        type=event_type,
        version=2 if event_type == "CommandRejected" else 1,
        aggregate=aggregate,
        aggregate_version=agg_version,
        command_id=cmd.command_id,
        occurred_at=occurred_at,
        payload=payload,
        position=position,
    )


Decision = tuple[str, str, int, JSON]


def _decide(state: State, cmd: Command, at: str) -> Decision:
    handler = _HANDLERS.get(cmd.type)
    if handler is None:
        known = ", ".join(sorted(COMMAND_EVENTS))
        raise Invalid(f"unknown command type {cmd.type!r} (known: {known})", "type")
    return handler(state, cmd, at)


def _model(state: State, model_id: int, field_name: str = "id") -> ModelState:
    m = state.models.get(model_id)
    if m is None:
        # An unknown id in the path is a 404; an unknown id named by a body field is a 422 on that field.
        raise Invalid(f"model {model_id} does not exist", field_name, "not_found" if field_name == "id" else "invalid")
    return m


def _check_version(current: int, cmd_payload: JSON, what: str) -> None:
    wanted = expected_version(cmd_payload)
    if wanted is not None and wanted != current:
        raise Invalid(f"{what} is at version {current}, not the expected version {wanted}; reload and retry",
                      "expected_version", "conflict")


def _validated_summary(cmd: Command) -> JSON:
    """The sandbox's verdict attached by the validator agent; Pending until it is there."""
    v = cmd.validation
    if v is None:
        raise Pending
    if not v.get("ok"):
        raise Invalid(f"the model code does not build: {v.get('error', 'unknown error')}", "code")
    summary = v.get("summary")
    if not (isinstance(summary, dict) and _is_shape(summary.get("input_shape"))
            and isinstance(summary.get("output_shapes"), list) and summary["output_shapes"]
            and all(_is_shape(s) for s in summary["output_shapes"])
            and isinstance(summary.get("params"), int) and not isinstance(summary.get("params"), bool)):
        raise Invalid("the validation record carries no usable model summary "
                      "(input_shape, output_shapes, params)", "code")
    return summary


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and all(d is None or (isinstance(d, int) and not isinstance(d, bool))
                                           for d in value)


def _fmt(shape: Shape) -> str:
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ")"


def _check_chain(state: State, me_id: int | None, name: str, distributed: bool, upper_id: int | None,
                 input_shape: Shape, output_shapes: list[Shape]) -> None:
    """Chain rules: links, cycles, tree shape, outputs per position and tensor shapes across links."""
    lower = state.lower_of(me_id) if me_id is not None else None
    if not distributed:
        if upper_id is not None:
            raise Invalid("'upper_id' is only allowed for a distributed model (set distributed=true)", "upper_id")
        if lower is not None:
            raise Invalid(f"model '{lower.name}' ({lower.id}) uses this model as its upper; it must stay "
                          "distributed", "distributed")
        if len(output_shapes) != 1:
            raise Invalid(f"a non-distributed model has one output (probabilities); '{name}' has "
                          f"{len(output_shapes)}", "code")
        return
    if upper_id is not None:
        if upper_id == me_id:
            raise Invalid("a model cannot be its own upper model", "upper_id")
        upper = _model(state, upper_id, "upper_id")
        if not upper.distributed:
            raise Invalid(f"upper model '{upper.name}' ({upper.id}) is not distributed", "upper_id")
        other = state.lower_of(upper_id)
        if other is not None and other.id != me_id:
            raise Invalid(f"upper model '{upper.name}' ({upper.id}) already has lower model '{other.name}' "
                          f"({other.id}); a chain cannot branch", "upper_id")
        cursor: ModelState | None = upper
        seen: set[int] = set()
        while cursor is not None and cursor.id not in seen:
            if me_id is not None and cursor.upper_id == me_id:
                raise Invalid(f"upper model '{upper.name}' ({upper.id}) would form a cycle through "
                              f"'{cursor.name}' ({cursor.id})", "upper_id")
            seen.add(cursor.id)
            cursor = state.models.get(cursor.upper_id) if cursor.upper_id is not None else None
        if len(output_shapes) != 2:
            raise Invalid(f"a distributed model with an upper model has two outputs [tensor_to_upper, "
                          f"probabilities]; '{name}' has {len(output_shapes)}", "code")
        if output_shapes[0][1:] != upper.input_shape[1:]:
            raise Invalid(f"the tensor '{name}' sends up has shape {_fmt(output_shapes[0])} but upper model "
                          f"'{upper.name}' ({upper.id}) takes {_fmt(upper.input_shape)}", "upper_id")
    elif len(output_shapes) != 1:
        raise Invalid(f"the top model of a chain has one output (probabilities); '{name}' has "
                      f"{len(output_shapes)} (give it an upper_id, or drop the tensor output)", "code")
    if lower is not None and lower.output_shapes[0][1:] != input_shape[1:]:
        raise Invalid(f"lower model '{lower.name}' ({lower.id}) sends a tensor of shape "
                      f"{_fmt(lower.output_shapes[0])} but this code takes {_fmt(input_shape)}", "code")


def _model_record(ident: int, f: ModelFields, prev: JSON | None, summary: JSON | None, version: int,
                  at: str) -> JSON:
    def pick(name: str, new: Any) -> Any:
        return new if new is not None else (prev or {}).get(name)

    rec: JSON = {
        "id": ident,
        "name": pick("name", f.name),
        "description": pick("description", f.description) or "",
        "imports": pick("imports", f.imports) or "",
        "code": pick("code", f.code),
        "distributed": bool(pick("distributed", f.distributed)),
        "upper_id": f.upper_id if f.upper_id_given else (prev or {}).get("upper_id"),
        "version": version,
        "created_at": (prev or {}).get("created_at", at),
        "updated_at": at,
    }
    src = summary if summary is not None else (prev or {})
    rec["input_shape"] = src.get("input_shape")
    rec["output_shapes"] = src.get("output_shapes")
    rec["params"] = src.get("params")
    return rec


def _register_model(state: State, cmd: Command, at: str) -> Decision:
    f = parse_model(cmd.payload, partial=False)
    assert f.name is not None
    clash = state.model_by_name(f.name)
    if clash is not None:
        raise Invalid(f"a model named '{f.name}' already exists (id {clash.id})", "name", "conflict")
    if f.upper_id is not None:
        _model(state, f.upper_id, "upper_id")  # fail fast, before the sandbox spends time on it
    summary = _validated_summary(cmd)
    ident = state.next_id("model")
    _check_chain(state, None, f.name, bool(f.distributed), f.upper_id, summary["input_shape"],
                 summary["output_shapes"])
    return "ModelCreated", f"model:{ident}", 1, _model_record(ident, f, None, summary, 1, at)


def _update_model(state: State, cmd: Command, at: str) -> Decision:
    model = _model(state, req_id(cmd.payload, "id"))
    f = parse_model(cmd.payload, partial=True)
    _check_version(model.version, cmd.payload, f"model '{model.name}' ({model.id})")
    if f.name is not None and f.name != model.name:
        clash = state.model_by_name(f.name)
        if clash is not None:
            raise Invalid(f"a model named '{f.name}' already exists (id {clash.id})", "name", "conflict")
    distributed = model.distributed if f.distributed is None else f.distributed
    upper_id = f.upper_id if f.upper_id_given else model.upper_id
    if (distributed != model.distributed or upper_id != model.upper_id):
        used = state.configurations_using(model.id)
        if used:
            names = ", ".join(f"'{c.name}' ({c.id})" for c in used)
            raise Invalid(f"model '{model.name}' ({model.id}) is used by configuration {names}; it keeps its "
                          "upper_id and distributed flag while configured", "upper_id", "conflict")
    summary: JSON | None = None
    code_changed = f.code is not None and f.code != model.record.get("code")
    imports_changed = f.imports is not None and f.imports != model.record.get("imports")
    if code_changed or imports_changed:
        summary = _validated_summary(cmd)
    input_shape: Shape = summary["input_shape"] if summary is not None else model.input_shape
    output_shapes: list[Shape] = summary["output_shapes"] if summary is not None else model.output_shapes
    name = f.name or model.name
    _check_chain(state, model.id, name, distributed, upper_id, input_shape, output_shapes)
    version = model.version + 1
    record = _model_record(model.id, f, model.record, summary, version, at)
    record["distributed"] = distributed
    record["upper_id"] = upper_id
    return "ModelUpdated", f"model:{model.id}", version, record


def _delete_model(state: State, cmd: Command, at: str) -> Decision:
    model = _model(state, req_id(cmd.payload, "id"))
    _check_version(model.version, cmd.payload, f"model '{model.name}' ({model.id})")
    used = state.configurations_using(model.id)
    if used:
        names = ", ".join(f"'{c.name}' ({c.id})" for c in used)
        raise Invalid(f"model '{model.name}' ({model.id}) is used by configuration {names}; delete or change "
                      "those first", "id", "conflict")
    lower = state.lower_of(model.id)
    if lower is not None:
        raise Invalid(f"model '{model.name}' ({model.id}) is the upper model of '{lower.name}' ({lower.id}); "
                      "delete that model or change its upper_id first", "id", "conflict")
    return "ModelDeleted", f"model:{model.id}", model.version + 1, {"id": model.id, "name": model.name}


def _expand(state: State, model_ids: list[int]) -> list[int]:
    out: list[int] = []
    for mid in model_ids:
        _model(state, mid, "model_ids")
        out.extend(state.chain_below(mid))
    return list(dict.fromkeys(out))


def _create_configuration(state: State, cmd: Command, at: str) -> Decision:
    name = name_field(cmd.payload)
    ids = parse_model_ids(cmd.payload, required=True)
    assert ids is not None
    expanded = _expand(state, ids)
    ident = state.next_id("configuration")
    return "ConfigurationCreated", f"configuration:{ident}", 1, {
        "id": ident, "name": name, "description": text_field(cmd.payload, "description") or "",
        "model_ids": expanded, "version": 1, "created_at": at, "updated_at": at,
    }


def _configuration(state: State, cid: int) -> ConfigurationState:
    c = state.configurations.get(cid)
    if c is None:
        raise Invalid(f"configuration {cid} does not exist", "id", "not_found")
    return c


def _update_configuration(state: State, cmd: Command, at: str) -> Decision:
    conf = _configuration(state, req_id(cmd.payload, "id"))
    _check_version(conf.version, cmd.payload, f"configuration '{conf.name}' ({conf.id})")
    name = name_field(cmd.payload, required=False) or conf.name
    ids = parse_model_ids(cmd.payload, required=False)
    expanded = _expand(state, ids) if ids is not None else conf.model_ids
    prev = conf.record
    version = conf.version + 1
    description = text_field(cmd.payload, "description", None)
    return "ConfigurationUpdated", f"configuration:{conf.id}", version, {
        "id": conf.id, "name": name,
        "description": description if description is not None else prev.get("description", ""),
        "model_ids": expanded, "version": version, "created_at": prev.get("created_at", at), "updated_at": at,
    }


def _delete_configuration(state: State, cmd: Command, at: str) -> Decision:
    conf = _configuration(state, req_id(cmd.payload, "id"))
    _check_version(conf.version, cmd.payload, f"configuration '{conf.name}' ({conf.id})")
    users = sorted(d.id for d in state.deployments.values() if d.configuration_id == conf.id)
    if users:
        raise Invalid(f"configuration '{conf.name}' ({conf.id}) is used by deployment(s) "
                      f"{', '.join(map(str, users))}; delete those first", "id", "conflict")
    return "ConfigurationDeleted", f"configuration:{conf.id}", conf.version + 1, {"id": conf.id}


def _request_deployment(state: State, cmd: Command, at: str) -> Decision:
    f = parse_deployment(cmd.payload)
    conf = state.configurations.get(f.configuration_id)
    if conf is None:
        raise Invalid(f"configuration {f.configuration_id} does not exist", "configuration_id")
    missing = [mid for mid in conf.model_ids if mid not in state.models]
    if missing:  # cannot happen while the rules hold; kept as a guard with a readable message
        raise Invalid(f"configuration '{conf.name}' refers to deleted model(s) {missing}", "configuration_id")
    if isinstance(f.loss_weights, dict):
        stray = sorted(set(f.loss_weights) - {str(m) for m in conf.model_ids})
        if stray:
            raise Invalid(f"'loss_weights' names model(s) {', '.join(stray)} that configuration "
                          f"'{conf.name}' does not contain", "loss_weights")
    elif isinstance(f.loss_weights, list):
        chains = _chains(state, conf.model_ids)
        for chain in chains:
            if len(chain) != len(f.loss_weights):
                raise Invalid(f"'loss_weights' has {len(f.loss_weights)} weights but chain "
                              f"{'->'.join(state.models[m].name for m in chain)} has {len(chain)} exits; "
                              "use {model_id: weight} for configurations with chains of different lengths",
                              "loss_weights")
    ident = state.next_id("deployment")
    first_result = state.next_id("result")
    results = [{"id": first_result + i, "model_id": mid, "model_version": state.models[mid].version}
               for i, mid in enumerate(conf.model_ids)]
    result_of = {r["model_id"]: r["id"] for r in results}
    chains = [[result_of[mid] for mid in chain] for chain in _chains(state, conf.model_ids)]
    payload = f.to_json() | {
        "id": ident,
        "chains": chains,
        "model_versions": {str(mid): state.models[mid].version for mid in conf.model_ids},
        "results": results,
        "created_at": at,
    }
    return "DeploymentRequested", f"deployment:{ident}", 1, payload


def _chains(state: State, model_ids: list[int]) -> list[list[int]]:
    """Group a configuration's models into chains (bottom first); single models are chains of one."""
    members = set(model_ids)
    chains: list[list[int]] = []
    for mid in model_ids:
        m = state.models[mid]
        below = state.lower_of(mid)
        if below is not None and below.id in members:
            continue  # not the bottom of its chain
        chain = [mid]
        cursor = m
        while cursor.upper_id is not None and cursor.upper_id in members:
            chain.append(cursor.upper_id)
            cursor = state.models[cursor.upper_id]
        chains.append(chain)
    return chains


def _delete_deployment(state: State, cmd: Command, at: str) -> Decision:
    did = req_id(cmd.payload, "id")
    dep = state.deployments.get(did)
    if dep is None:
        raise Invalid(f"deployment {did} does not exist", "id", "not_found")
    served = sorted(i for i, rids in state.inferences.items() if set(rids) & set(dep.result_ids))
    if served:
        raise Invalid(f"deployment {did} has results served by inference(s) {', '.join(map(str, served))}; "
                      "stop and delete those first", "id", "conflict")
    return "DeploymentDeleted", f"deployment:{did}", 2, {"id": did, "result_ids": dep.result_ids}


def _announce_datasource(state: State, cmd: Command, at: str) -> Decision:
    p = cmd.payload
    did = req_id(p, "deployment_id")
    if did not in state.deployments:
        raise Invalid(f"datasource announced for deployment {did}, which does not exist", "deployment_id")
    ranges = p.get("ranges")
    if not isinstance(ranges, list) or not ranges or not all(
            isinstance(r, dict) and isinstance(r.get("topic"), str) and r["topic"]
            and all(isinstance(r.get(k), int) and not isinstance(r.get(k), bool) and r[k] >= 0
                    for k in ("partition", "start", "end")) and r["start"] <= r["end"] for r in ranges):
        raise Invalid("'ranges' must list {topic, partition, start, end} with 0 <= start <= end", "ranges")
    if p.get("input_format") not in ("RAW", "AVRO"):
        raise Invalid(f"'input_format' must be RAW or AVRO, got {p.get('input_format')!r}", "input_format")
    if not isinstance(p.get("input_config", {}), dict):
        raise Invalid("'input_config' must be a JSON object", "input_config")
    for rate in ("validation_rate", "test_rate"):
        value = p.get(rate, 0) or 0
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
            raise Invalid(f"'{rate}' must be a number in [0, 1), got {value!r}", rate)
    if (p.get("validation_rate") or 0) + (p.get("test_rate") or 0) >= 1:
        raise Invalid("validation_rate + test_rate must leave data for training (< 1)", "test_rate")
    if not isinstance(p.get("description", ""), str):
        raise Invalid("'description' must be a string", "description")
    ident = state.next_id("datasource")
    warnings = p.get("warnings") or []
    if not isinstance(warnings, list) or not all(isinstance(w, str) for w in warnings):
        raise Invalid("'warnings' must be a list of strings", "warnings")
    payload = {k: p.get(k) for k in ("input_format", "total_msg", "origin")} | {"warnings": warnings} | {
        "input_config": p.get("input_config") or {}, "description": p.get("description") or "",
        "validation_rate": float(p.get("validation_rate") or 0), "test_rate": float(p.get("test_rate") or 0),
    }
    return "DatasourceAnnounced", f"datasource:{ident}", 1, payload | {
        "id": ident, "deployment_id": did, "ranges": ranges, "created_at": at,
    }


def _results(state: State, payload: JSON, field_name: str = "result_ids") -> list[ResultState]:
    raw = payload.get(field_name)
    if not isinstance(raw, list) or not raw:
        raise Invalid(f"'{field_name}' must be a non-empty list of result ids", field_name)
    out: list[ResultState] = []
    for value in raw:
        rid = as_id(value, field_name)
        res = state.results.get(rid)
        if res is None:
            raise Invalid(f"result {rid} does not exist", field_name)
        out.append(res)
    deployments = {r.deployment_id for r in out}
    if len(deployments) != 1:
        raise Invalid(f"results {[r.id for r in out]} belong to different deployments", field_name)
    return out


def _not_final(results: list[ResultState], what: str) -> None:
    done = [r for r in results if r.final]
    if done:
        listing = ", ".join(f"{r.id} ({r.status})" for r in done)
        raise Invalid(f"cannot {what}: result(s) {listing} already ended", "result_ids", "conflict")


def _status_event(event_type: str, results: list[ResultState], extra: JSON, at: str) -> Decision:
    dep = results[0].deployment_id
    return event_type, f"deployment:{dep}", 1, extra | {
        "deployment_id": dep, "result_ids": [r.id for r in results], "at": at,
    }


def _report_launched(state: State, cmd: Command, at: str) -> Decision:
    results = _results(state, cmd.payload)
    _not_final(results, "launch training")
    started = [r for r in results if r.status != "created"]
    if started:
        raise Invalid(f"result(s) {[r.id for r in started]} were launched already", "result_ids", "conflict")
    workload = cmd.payload.get("workload")
    if not isinstance(workload, str) or not workload:
        raise Invalid("'workload' must name the launched workload", "workload")
    return _status_event("TrainingLaunched", results, {"workload": workload}, at)


def _report_started(state: State, cmd: Command, at: str) -> Decision:
    results = _results(state, cmd.payload)
    _not_final(results, "start training")
    samples = cmd.payload.get("samples") or {}
    seed = cmd.payload.get("seed")
    if not isinstance(samples, dict) or (seed is not None and not isinstance(seed, int)):
        raise Invalid("'samples' must be an object and 'seed' an integer", "samples")
    return _status_event("TrainingStarted", results, {"seed": seed, "samples": samples}, at)


def _metrics_object(value: Any, field_name: str) -> JSON:
    if not isinstance(value, dict):
        raise Invalid(f"'{field_name}' must be an object of metrics", field_name)
    return value


def _report_progress(state: State, cmd: Command, at: str) -> Decision:
    p = cmd.payload
    results = _results(state, p)
    _not_final(results, "report progress")
    epoch, epochs = p.get("epoch"), p.get("epochs")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
        raise Invalid("'epoch' must be an integer >= 1", "epoch")
    if epochs is not None and (not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < epoch):
        raise Invalid("'epochs' must be an integer >= epoch", "epochs")
    metrics = _metrics_object(p.get("metrics"), "metrics")
    ids = {str(r.id) for r in results}
    stray = sorted(set(metrics) - ids)
    if stray:
        raise Invalid(f"'metrics' names result(s) {', '.join(stray)} not in 'result_ids'", "metrics")
    return _status_event("TrainingProgressed", results, {"epoch": epoch, "epochs": epochs, "metrics": metrics}, at)


def _report_result(state: State, cmd: Command, at: str) -> Decision:
    p = cmd.payload
    rid = req_id(p, "result_id")
    res = state.results.get(rid)
    if res is None:
        raise Invalid(f"result {rid} does not exist", "result_id")
    _not_final([res], "report a result")
    metrics = _metrics_object(p.get("metrics"), "metrics")
    artefacts = _metrics_object(p.get("artefacts") or {}, "artefacts")
    for kind, ref in artefacts.items():
        sha = ref.get("sha256") if isinstance(ref, dict) else None
        if not isinstance(sha, str) or len(sha) != 64 or any(ch not in "0123456789abcdef" for ch in sha):
            raise Invalid(f"artefact '{kind}' needs a sha256 (64 lowercase hex digits)", f"artefacts.{kind}")
    if "keras" not in artefacts:
        raise Invalid("a trained result needs its 'keras' artefact", "artefacts")
    return "TrainingResultReported", f"deployment:{res.deployment_id}", 1, {
        "deployment_id": res.deployment_id, "result_id": rid, "metrics": metrics, "artefacts": artefacts, "at": at,
    }


def _report_failure(state: State, cmd: Command, at: str) -> Decision:
    results = _results(state, cmd.payload)
    open_results = [r for r in results if not r.final]
    if not open_results:
        raise Invalid(f"result(s) {[r.id for r in results]} already ended", "result_ids", "conflict")
    reason = cmd.payload.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise Invalid("'reason' must say why the training failed", "reason")
    return _status_event("TrainingFailed", open_results, {"reason": reason[:20_000]}, at)


def _stop_training(state: State, cmd: Command, at: str) -> Decision:
    rid = req_id(cmd.payload, "id")
    res = state.results.get(rid)
    if res is None:
        raise Invalid(f"result {rid} does not exist", "id", "not_found")
    if res.final:
        raise Invalid(f"result {rid} already ended ({res.status})", "id", "conflict")
    # The whole chain trains in one workload: stopping one result stops its chain.
    group = [state.results[r] for r in (res.chain or [rid]) if r in state.results and not state.results[r].final]
    return _status_event("TrainingStopped", group, {"requested_for": rid}, at)


def _delete_result(state: State, cmd: Command, at: str) -> Decision:
    rid = req_id(cmd.payload, "id")
    res = state.results.get(rid)
    if res is None:
        raise Invalid(f"result {rid} does not exist", "id", "not_found")
    served = sorted(i for i, rids in state.inferences.items() if rid in rids)
    if served:
        raise Invalid(f"result {rid} is served by inference(s) {', '.join(map(str, served))}; stop and delete "
                      "those first", "id", "conflict")
    if res.status in ("deployed", "training"):
        raise Invalid(f"result {rid} is {res.status}; stop it first (POST /results/{rid}/stop)", "id", "conflict")
    return "ResultDeleted", f"deployment:{res.deployment_id}", 1, {"id": rid, "deployment_id": res.deployment_id}


def _send_datasource(state: State, cmd: Command, at: str) -> Decision:
    p = cmd.payload
    source_id = req_id(p, "datasource_id")
    record = state.datasource_records.get(source_id)
    if record is None:
        raise Invalid(f"datasource {source_id} does not exist", "datasource_id", "not_found")
    did = req_id(p, "deployment_id")
    if did not in state.deployments:
        raise Invalid(f"deployment {did} does not exist", "deployment_id")
    ident = state.next_id("datasource")
    return "DatasourceAnnounced", f"datasource:{ident}", 1, record | {
        "id": ident, "deployment_id": did, "origin": {"datasource_id": source_id}, "created_at": at,
    }


def _topic(value: Any, field_name: str, required: bool = True) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > 249 or any(c.isspace() for c in value):
        raise Invalid(f"'{field_name}' must be a Kafka topic name (1-249 characters, no spaces)", field_name)
    return value


def _limit(value: Any, field_name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 2:
        raise Invalid(f"'{field_name}' must be a number in [0, 2] (> 1 sends every sample to the top tier)",
                      field_name)
    return float(value)


def _replicas(value: Any, field_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
        raise Invalid(f"'{field_name}' must be an integer from 1 to 64", field_name)
    return value


def _request_inference(state: State, cmd: Command, at: str) -> Decision:
    p = cmd.payload
    entry_id = req_id(p, "result_id")
    entry = state.results.get(entry_id)
    if entry is None:
        raise Invalid(f"result {entry_id} does not exist", "result_id")
    chain = entry.chain or [entry_id]
    tier_ids = chain[chain.index(entry_id):]  # from the entry up to the top of its chain
    unfinished = [f"{r} ({state.results[r].status})" for r in tier_ids if state.results[r].status != "finished"]
    if unfinished:
        raise Invalid(f"only finished results can be served; result(s) {', '.join(unfinished)} are not", "result_id",
                      "conflict")
    input_topic = _topic(p.get("input_topic"), "input_topic")
    output_topic = _topic(p.get("output_topic"), "output_topic")
    default_limit = _limit(p.get("limit", 0.8), "limit")
    limits = p.get("limits") or {}
    if not isinstance(limits, dict):
        raise Invalid("'limits' must map result ids to limits", "limits")
    for key, value in limits.items():
        if not str(key).isdigit() or int(key) not in tier_ids:
            raise Invalid(f"'limits' names result {key}, which is not a tier of this inference ({tier_ids})",
                          "limits")
        _limit(value, f"limits.{key}")
    overrides = p.get("tiers") or []
    if not isinstance(overrides, list) or not all(isinstance(o, dict) for o in overrides):
        raise Invalid("'tiers' must be a list of objects {result_id, bootstrap_servers?, replicas?, limit?, "
                      "upper_topic?}", "tiers")
    by_result: dict[int, JSON] = {}
    for i, o in enumerate(overrides):
        rid = as_id(o.get("result_id"), f"tiers[{i}].result_id")
        if rid not in tier_ids:
            raise Invalid(f"'tiers[{i}]' names result {rid}, which is not a tier of this inference ({tier_ids})",
                          f"tiers[{i}].result_id")
        by_result[rid] = o
    default_replicas = _replicas(p.get("replicas", 1), "replicas")
    default_servers = p.get("bootstrap_servers")
    if default_servers is not None and not isinstance(default_servers, str):
        raise Invalid("'bootstrap_servers' must be a string host:port[,host:port]", "bootstrap_servers")
    ident = state.next_id("inference")
    input_format = p.get("input_format")
    input_config = p.get("input_config")
    if input_format is None or input_config is None:
        # Kafka-ML pre-fills the input format from the deployment's datasource.
        announced = [rec for did, rec in sorted(state.datasource_records.items())
                     if state.datasources.get(did) == entry.deployment_id]
        latest = announced[-1] if announced else {}
        input_format = input_format if input_format is not None else latest.get("input_format", "RAW")
        input_config = input_config if input_config is not None else latest.get("input_config", {})
    if input_format not in ("RAW", "AVRO"):
        raise Invalid(f"'input_format' must be RAW or AVRO, got {input_format!r}", "input_format")
    if not isinstance(input_config, dict):
        raise Invalid("'input_config' must be an object", "input_config")
    tiers: list[JSON] = []
    for k, rid in enumerate(tier_ids):
        o = by_result.get(rid, {})
        top = k == len(tier_ids) - 1
        limit = _limit(o["limit"], f"tiers[{k}].limit") if "limit" in o else (
            float(limits[str(rid)]) if str(rid) in limits else default_limit)
        upper = None if top else (_topic(o.get("upper_topic"), f"tiers[{k}].upper_topic", required=False)
                                  or f"tierflow.inference.{ident}.tier{k + 1}")
        servers = o.get("bootstrap_servers", default_servers)
        if servers is not None and not isinstance(servers, str):
            raise Invalid(f"'tiers[{k}].bootstrap_servers' must be a string", f"tiers[{k}].bootstrap_servers")
        model = state.models.get(state.results[rid].model_id)
        tiers.append({"index": k, "level": chain.index(rid), "result_id": rid, "model_id": state.results[rid].model_id,
                      "model_name": model.name if model else None, "limit": 1.0 if top else limit,
                      "replicas": _replicas(o.get("replicas", default_replicas), f"tiers[{k}].replicas"),
                      "bootstrap_servers": servers, "upper_topic": upper})
    for k, tier in enumerate(tiers):
        tier["input_topic"] = input_topic if k == 0 else tiers[k - 1]["upper_topic"]
        tier["top"] = k == len(tiers) - 1
    return "InferenceRequested", f"inference:{ident}", 1, {
        "id": ident, "result_id": entry_id, "deployment_id": entry.deployment_id, "input_topic": input_topic,
        "output_topic": output_topic, "input_format": input_format, "input_config": input_config,
        "tiers": tiers, "created_at": at,
    }


def _inference(state: State, cmd: Command) -> int:
    ident = req_id(cmd.payload, "id")
    if ident not in state.inferences:
        raise Invalid(f"inference {ident} does not exist", "id", "not_found")
    return ident


def _stop_inference(state: State, cmd: Command, at: str) -> Decision:
    ident = _inference(state, cmd)
    if state.inference_status.get(ident) == "stopped":
        raise Invalid(f"inference {ident} is already stopped", "id", "conflict")
    return "InferenceStopped", f"inference:{ident}", 2, {"id": ident, "at": at}


def _delete_inference(state: State, cmd: Command, at: str) -> Decision:
    ident = _inference(state, cmd)
    return "InferenceDeleted", f"inference:{ident}", 3, {"id": ident, "at": at}


_HANDLERS = {
    "RequestInference": _request_inference,
    "StopInference": _stop_inference,
    "DeleteInference": _delete_inference,
    "ReportTrainingLaunched": _report_launched,
    "ReportTrainingStarted": _report_started,
    "ReportTrainingProgress": _report_progress,
    "ReportTrainingResult": _report_result,
    "ReportTrainingFailure": _report_failure,
    "StopTraining": _stop_training,
    "DeleteResult": _delete_result,
    "SendDatasource": _send_datasource,
    "AnnounceDatasource": _announce_datasource,
    "RegisterModel": _register_model,
    "UpdateModel": _update_model,
    "DeleteModel": _delete_model,
    "CreateConfiguration": _create_configuration,
    "UpdateConfiguration": _update_configuration,
    "DeleteConfiguration": _delete_configuration,
    "RequestDeployment": _request_deployment,
    "DeleteDeployment": _delete_deployment,
}


def needs_validation(state: State, cmd: Command) -> bool:
    """Whether the validator agent must build this command's code (the decider will wait for it)."""
    if cmd.type not in CODE_COMMANDS or cmd.validation is not None:
        return False
    code = cmd.payload.get("code")
    return isinstance(code, str) and bool(code.strip())
