"""The rules of configurations: create, update and delete a named set of models deployed together.

Called through the dispatcher (streams/domain/__init__.py: `decide`). Choosing a model brings its whole lower
chain; a configuration a deployment uses cannot be deleted.
"""

from __future__ import annotations

from tierflow.streams.catalogue import Invalid, name_field, parse_model_ids, req_id, text_field
from tierflow.streams.domain.decision import Decision, Handler, check_version, model_of
from tierflow.streams.domain.state import ConfigurationState, State
from tierflow.streams.envelope import Command


def _expand(state: State, model_ids: list[int]) -> list[int]:
    out: list[int] = []
    for mid in model_ids:
        model_of(state, mid, "model_ids")
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
    check_version(conf.version, cmd.payload, f"configuration '{conf.name}' ({conf.id})")
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
    check_version(conf.version, cmd.payload, f"configuration '{conf.name}' ({conf.id})")
    users = sorted(d.id for d in state.deployments.values() if d.configuration_id == conf.id)
    if users:
        raise Invalid(f"configuration '{conf.name}' ({conf.id}) is used by deployment(s) "
                      f"{', '.join(map(str, users))}; delete those first", "id", "conflict")
    return "ConfigurationDeleted", f"configuration:{conf.id}", conf.version + 1, {"id": conf.id}


HANDLERS: dict[str, Handler] = {
    "CreateConfiguration": _create_configuration,
    "UpdateConfiguration": _update_configuration,
    "DeleteConfiguration": _delete_configuration,
}
