"""The rules of deployments and their training results: request and delete a deployment, the reports of
training workloads (launched, started, progress, result, failure), stopping and deleting a result.

Called through the dispatcher (streams/domain/__init__.py: `decide`). A deployment creates one result per
model, grouped in chains that train together; a result that ended (finished, failed, stopped) never changes
status again.
"""

from __future__ import annotations

from tierflow.streams.catalogue import (
    Invalid,
    as_id,
    parse_deployment,
    parse_failure_reason,
    parse_progress,
    parse_result_exits,
    parse_trained,
    parse_training_started,
    parse_workload,
    req_id,
)
from tierflow.streams.domain.decision import Decision, Handler
from tierflow.streams.domain.state import ResultState, State
from tierflow.streams.envelope import JSON, Command
from tierflow.streams.statuses import ResultStatus


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
    started = [r for r in results if r.status != ResultStatus.CREATED]
    if started:
        raise Invalid(f"result(s) {[r.id for r in started]} were launched already", "result_ids", "conflict")
    workload = parse_workload(cmd.payload)
    return _status_event("TrainingLaunched", results, {"workload": workload}, at)


def _report_started(state: State, cmd: Command, at: str) -> Decision:
    results = _results(state, cmd.payload)
    _not_final(results, "start training")
    seed, samples = parse_training_started(cmd.payload)
    return _status_event("TrainingStarted", results, {"seed": seed, "samples": samples}, at)


def _report_progress(state: State, cmd: Command, at: str) -> Decision:
    results = _results(state, cmd.payload)
    _not_final(results, "report progress")
    epoch, epochs, metrics = parse_progress(cmd.payload)
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
    metrics, artefacts = parse_trained(p)
    exits = parse_result_exits(p.get("exits"))
    _check_chain_exits(res, exits)
    return "TrainingResultReported", f"deployment:{res.deployment_id}", 1, {
        "deployment_id": res.deployment_id, "result_id": rid, "metrics": metrics, "artefacts": artefacts,
        "exits": exits, "at": at,
    }


def _check_chain_exits(res: ResultState, exits: JSON) -> None:
    """The chain's frontier travels with its top result's report, and covers the whole chain."""
    chain = res.chain or [res.id]
    top = chain[-1] == res.id
    frontier = exits["frontier"]
    if frontier is None:
        if top and exits["reason"] is None:
            raise Invalid("'exits.reason' must say why the chain has no exit frontier", "exits.reason")
        return
    if not top:
        raise Invalid(f"'exits.frontier' belongs on the report of the chain's top result {chain[-1]}, not on "
                      f"result {res.id}", "exits.frontier")
    temperatures = frontier["temperatures"]
    if len(temperatures) != len(chain):
        raise Invalid(f"'exits.frontier' covers {len(temperatures)} tiers but result {res.id}'s chain has "
                      f"{len(chain)}", "exits.frontier.temperatures")
    if temperatures[-1] != exits["temperature"]:
        raise Invalid("'exits.frontier.temperatures' differs from the top exit's 'exits.temperature'",
                      "exits.frontier.temperatures")


def _report_failure(state: State, cmd: Command, at: str) -> Decision:
    results = _results(state, cmd.payload)
    open_results = [r for r in results if not r.final]
    if not open_results:
        raise Invalid(f"result(s) {[r.id for r in results]} already ended", "result_ids", "conflict")
    reason = parse_failure_reason(cmd.payload)
    return _status_event("TrainingFailed", open_results, {"reason": reason}, at)


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
    if res.status in (ResultStatus.DEPLOYED, ResultStatus.TRAINING):
        raise Invalid(f"result {rid} is {res.status}; stop it first (POST /results/{rid}/stop)", "id", "conflict")
    return "ResultDeleted", f"deployment:{res.deployment_id}", 1, {"id": rid, "deployment_id": res.deployment_id}


HANDLERS: dict[str, Handler] = {
    "RequestDeployment": _request_deployment,
    "DeleteDeployment": _delete_deployment,
    "ReportTrainingLaunched": _report_launched,
    "ReportTrainingStarted": _report_started,
    "ReportTrainingProgress": _report_progress,
    "ReportTrainingResult": _report_result,
    "ReportTrainingFailure": _report_failure,
    "StopTraining": _stop_training,
    "DeleteResult": _delete_result,
}
