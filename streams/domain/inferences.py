"""The rules of inferences: serve a trained result (and the chain above it) on topics, stop, delete.

Called through the dispatcher (streams/domain/__init__.py: `decide`). Only finished results can be served;
an inference entering at a mid-chain result serves that result and the ones above it, one tier each. The
request's fields are parsed by the catalogue (`parse_inference`); the rules here need the state. Limits come
typed (compared with the raw max(p), as in Kafka-ML) or from a target (streams/domain/targets.py).
"""

from __future__ import annotations

from tierflow.streams.catalogue import Invalid, input_format_field, parse_inference, req_id
from tierflow.streams.domain import targets
from tierflow.streams.domain.decision import Decision, Handler
from tierflow.streams.domain.state import State
from tierflow.streams.envelope import JSON, Command
from tierflow.streams.statuses import InferenceStatus, ResultStatus


def _request_inference(state: State, cmd: Command, at: str) -> Decision:
    p = cmd.payload
    entry_id = req_id(p, "result_id")
    entry = state.results.get(entry_id)
    if entry is None:
        raise Invalid(f"result {entry_id} does not exist", "result_id")
    chain = entry.chain or [entry_id]
    tier_ids = chain[chain.index(entry_id):]  # from the entry up to the top of its chain
    unfinished = [f"{r} ({state.results[r].status})" for r in tier_ids
                  if state.results[r].status != ResultStatus.FINISHED]
    if unfinished:
        raise Invalid(f"only finished results can be served; result(s) {', '.join(unfinished)} are not", "result_id",
                      "conflict")
    f = parse_inference(p, tier_ids, state.reserved_topics)
    plan = targets.typed(len(tier_ids)) if f.target is None else targets.from_target(state, chain, entry_id, f)
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
    input_format_field(input_format)
    if not isinstance(input_config, dict):
        raise Invalid("'input_config' must be an object", "input_config")
    tiers: list[JSON] = []
    for k, rid in enumerate(tier_ids):
        top = k == len(tier_ids) - 1
        t = f.tier(k, rid, top=top, reserved=state.reserved_topics)
        upper = None if top else (t.upper_topic or f"tierflow.inference.{ident}.tier{k + 1}")
        model = state.models.get(state.results[rid].model_id)
        chosen = plan.tiers[k]
        limit = 1.0 if top else (t.limit if chosen.limit is None else chosen.limit)
        tiers.append({"index": k, "level": chain.index(rid), "result_id": rid, "model_id": state.results[rid].model_id,
                      "model_name": model.name if model else None, "limit": limit,
                      "replicas": t.replicas, "bootstrap_servers": t.bootstrap_servers, "upper_topic": upper,
                      **chosen.fields()})
    for k, tier in enumerate(tiers):
        tier["input_topic"] = f.input_topic if k == 0 else tiers[k - 1]["upper_topic"]
        tier["top"] = k == len(tiers) - 1
    return "InferenceRequested", f"inference:{ident}", 1, {
        "id": ident, "result_id": entry_id, "deployment_id": entry.deployment_id, "input_topic": f.input_topic,
        "output_topic": f.output_topic, "input_format": input_format, "input_config": input_config,
        "tiers": tiers, "shadow_fraction": f.shadow_fraction, "target": plan.target, "predicted": plan.predicted,
        "created_at": at,
    }


def _inference(state: State, cmd: Command) -> int:
    ident = req_id(cmd.payload, "id")
    if ident not in state.inferences:
        raise Invalid(f"inference {ident} does not exist", "id", "not_found")
    return ident


def _stop_inference(state: State, cmd: Command, at: str) -> Decision:
    ident = _inference(state, cmd)
    if state.inference_status.get(ident) == InferenceStatus.STOPPED:
        raise Invalid(f"inference {ident} is already stopped", "id", "conflict")
    return "InferenceStopped", f"inference:{ident}", 2, {"id": ident, "at": at}


def _delete_inference(state: State, cmd: Command, at: str) -> Decision:
    ident = _inference(state, cmd)
    return "InferenceDeleted", f"inference:{ident}", 3, {"id": ident, "at": at}


HANDLERS: dict[str, Handler] = {
    "RequestInference": _request_inference,
    "StopInference": _stop_inference,
    "DeleteInference": _delete_inference,
}
