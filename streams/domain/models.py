"""The rules of models: register, update and delete, with the chain rules (links, cycles, shapes across links).

Called through the dispatcher (streams/domain/__init__.py: `decide`). Model code is built by the validator
agent in the sandbox before these rules run: a command without its verdict is `Pending`.
"""

from __future__ import annotations

from typing import Any

from tierflow.streams.catalogue import Invalid, ModelFields, parse_model, req_id
from tierflow.streams.domain.decision import Decision, Handler, Pending, check_version, model_of
from tierflow.streams.domain.state import ModelState, Shape, State
from tierflow.streams.envelope import JSON, Command
from tierflow.streams.proofs import VALIDATOR


def _validated_summary(state: State, cmd: Command) -> JSON:
    """The sandbox's verdict attached by the validator agent; Pending until it is there. A verdict without the
    validator's proof is no verdict (anyone can write one): still Pending, the validator builds the code."""
    v = cmd.validation
    if v is None or not state.proofs.vouched(cmd, frozenset({VALIDATOR})):
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
        upper = model_of(state, upper_id, "upper_id")
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
        model_of(state, f.upper_id, "upper_id")  # fail fast, before the sandbox spends time on it
    summary = _validated_summary(state, cmd)
    ident = state.next_id("model")
    _check_chain(state, None, f.name, bool(f.distributed), f.upper_id, summary["input_shape"],
                 summary["output_shapes"])
    return "ModelCreated", f"model:{ident}", 1, _model_record(ident, f, None, summary, 1, at)


def _update_model(state: State, cmd: Command, at: str) -> Decision:
    model = model_of(state, req_id(cmd.payload, "id"))
    f = parse_model(cmd.payload, partial=True)
    check_version(model.version, cmd.payload, f"model '{model.name}' ({model.id})")
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
        summary = _validated_summary(state, cmd)
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
    model = model_of(state, req_id(cmd.payload, "id"))
    check_version(model.version, cmd.payload, f"model '{model.name}' ({model.id})")
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


HANDLERS: dict[str, Handler] = {
    "RegisterModel": _register_model,
    "UpdateModel": _update_model,
    "DeleteModel": _delete_model,
}
