"""HTTP routes: writes become commands on Kafka and wait for their outcome; reads query the projections.

Registered by the app factory (api/app.py). A write answers when its outcome is known: 201/200 with the
resource as the projection now shows it, the rejection as 404/409/422, or 202 with
`Location: /commands/{command_id}` if the outcome is not known within the command timeout.
Request bodies are parsed with the same catalogue functions the decider uses, so a malformed field is a
422 naming it before anything is sent.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import orjson
from aiohttp import web

from tierflow.api.errors import ApiError, from_reason, not_found
from tierflow.api.outputs import READ_ERRORS, statistics
from tierflow.api.state import AppState, get_state
from tierflow.projections import queries
from tierflow.streams import catalogue, health, tokens, wire
from tierflow.streams.envelope import Command, new_command_id
from tierflow.streams.proofs import WORKLOAD_REPORTS
from tierflow.streams.statuses import ResultStatus

JSON = dict[str, Any]
routes = web.RouteTableDef()

Reader = Callable[[asyncpg.Connection, int], Awaitable[JSON | None]]


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


async def body(request: web.Request) -> JSON:
    raw = await request.read()
    if not raw:
        raise ApiError(400, "bad_request", "the request needs a JSON body")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "bad_request", f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(422, "invalid", "the body must be a JSON object")
    return data


#: The largest id the projections can hold (their id columns are Postgres `integer`).
MAX_ID = 2**31 - 1


def as_path_id(raw: str) -> int | None:
    """The id a path segment names, or None when it names none: ASCII digits only (Python's `int` also takes
    signs, spaces, `_` and other scripts' digits) and within the projections' range, so a value Postgres
    cannot bind never reaches a query (it answered 500)."""
    if not raw.isascii() or not raw.isdigit() or len(raw) > len(str(MAX_ID)):
        return None
    value = int(raw)
    return value if 1 <= value <= MAX_ID else None


def path_id(request: web.Request, name: str = "id") -> int:
    raw = request.match_info[name]
    value = as_path_id(raw)
    if value is None:
        raise ApiError(404, "not_found", f"{raw!r} is not an id (1..{MAX_ID})")
    return value


def paging(request: web.Request) -> tuple[int, int]:
    try:
        limit = int(request.query.get("limit", "100"))
        offset = int(request.query.get("offset", "0"))
    except ValueError:
        raise ApiError(422, "invalid", "'limit' and 'offset' must be integers", "limit") from None
    if not 1 <= limit <= 1000 or offset < 0:
        raise ApiError(422, "invalid", "'limit' must be 1..1000 and 'offset' >= 0", "limit")
    return limit, offset


async def submit(request: web.Request, command_type: str, payload: JSON, *, read: Reader | None,
                 status: int) -> web.Response:
    """Send the command, wait for its outcome, answer with the resource or the rejection."""
    st = get_state(request)
    cmd = Command(command_id=new_command_id(), type=command_type, payload=payload, source="api")
    fut = st.outcomes.register(cmd.command_id)
    try:
        await st.producer.send_and_wait(st.settings.kafka.commands_topic, cmd.encode(), key=cmd.key())
    except Exception:
        st.outcomes.forget(cmd.command_id)
        raise
    st.outcomes.command_sent()
    outcome = await st.outcomes.wait(cmd.command_id, fut, st.settings.api.command_timeout_s)
    st.metrics.observe_command(command_type, outcome)
    location = f"/commands/{cmd.command_id}"
    if outcome is None:
        return json_response({"command_id": cmd.command_id, "status": "pending",
                              "message": "the command was accepted for processing; poll its Location"},
                             status=202, headers={"Location": location})
    if outcome["status"] == "rejected":
        raise from_reason(outcome["reason"])
    aggregate_id = int(str(outcome["aggregate"]).split(":", 1)[1])
    if read is None:
        return json_response({"id": payload.get("id", aggregate_id), "deleted": True, "command_id": cmd.command_id},
                             headers={"Location": location})
    async with st.pool.acquire() as conn:
        resource = await read(conn, aggregate_id)
    if resource is None:  # deleted again in between: say what happened rather than guessing
        raise not_found(command_type, aggregate_id)
    return json_response(resource, status=status, headers={"Location": location})


async def fetch_one(request: web.Request, read: Reader, what: str) -> web.Response:
    ident = path_id(request)
    async with get_state(request).pool.acquire() as conn:
        found = await read(conn, ident)
    if found is None:
        raise not_found(what, ident)
    return json_response(found)


# --- models -------------------------------------------------------------------------------------------

@routes.post("/models")
async def create_model(request: web.Request) -> web.Response:
    data = await body(request)
    catalogue.parse_model(data, partial=False)
    return await submit(request, "RegisterModel", data, read=queries.get_model, status=201)


@routes.get("/models")
async def list_models(request: web.Request) -> web.Response:
    limit, offset = paging(request)
    flag = request.query.get("distributed")
    distributed = None if flag is None else flag.lower() in ("1", "true", "yes")
    async with get_state(request).pool.acquire() as conn:
        items, total = await queries.list_models(conn, distributed=distributed, name=request.query.get("name"),
                                                 limit=limit, offset=offset)
    return json_response({"items": items, "total": total})


@routes.get("/models/{id}")
async def get_model(request: web.Request) -> web.Response:
    return await fetch_one(request, queries.get_model, "model")


@routes.put("/models/{id}")
async def update_model(request: web.Request) -> web.Response:
    data = await body(request) | {"id": path_id(request)}
    catalogue.parse_model(data, partial=True)
    catalogue.expected_version(data)
    return await submit(request, "UpdateModel", data, read=queries.get_model, status=200)


@routes.delete("/models/{id}")
async def delete_model(request: web.Request) -> web.Response:
    return await _delete(request, "DeleteModel")


async def _delete(request: web.Request, command_type: str) -> web.Response:
    payload: JSON = {"id": path_id(request)}
    if "expected_version" in request.query:
        try:
            payload["expected_version"] = int(request.query["expected_version"])
        except ValueError:
            raise ApiError(422, "invalid", "'expected_version' must be an integer", "expected_version") from None
    return await submit(request, command_type, payload, read=None, status=200)


# --- configurations -----------------------------------------------------------------------------------

@routes.post("/configurations")
async def create_configuration(request: web.Request) -> web.Response:
    data = await body(request)
    catalogue.name_field(data)
    catalogue.parse_model_ids(data, required=True)
    return await submit(request, "CreateConfiguration", data, read=queries.get_configuration, status=201)


@routes.get("/configurations")
async def list_configurations(request: web.Request) -> web.Response:
    limit, offset = paging(request)
    async with get_state(request).pool.acquire() as conn:
        items, total = await queries.list_configurations(conn, limit, offset)
    return json_response({"items": items, "total": total})


@routes.get("/configurations/{id}")
async def get_configuration(request: web.Request) -> web.Response:
    return await fetch_one(request, queries.get_configuration, "configuration")


@routes.put("/configurations/{id}")
async def update_configuration(request: web.Request) -> web.Response:
    data = await body(request) | {"id": path_id(request)}
    catalogue.name_field(data, required=False)
    catalogue.parse_model_ids(data, required=False)
    catalogue.expected_version(data)
    return await submit(request, "UpdateConfiguration", data, read=queries.get_configuration, status=200)


@routes.delete("/configurations/{id}")
async def delete_configuration(request: web.Request) -> web.Response:
    return await _delete(request, "DeleteConfiguration")


# --- deployments and results --------------------------------------------------------------------------

@routes.post("/deployments")
async def create_deployment(request: web.Request) -> web.Response:
    data = await body(request)
    catalogue.parse_deployment(data)
    return await submit(request, "RequestDeployment", data, read=queries.get_deployment, status=201)


@routes.get("/deployments")
async def list_deployments(request: web.Request) -> web.Response:
    limit, offset = paging(request)
    async with get_state(request).pool.acquire() as conn:
        items, total = await queries.list_deployments(conn, limit, offset)
    return json_response({"items": items, "total": total})


@routes.get("/deployments/{id}")
async def get_deployment(request: web.Request) -> web.Response:
    return await fetch_one(request, queries.get_deployment, "deployment")


@routes.delete("/deployments/{id}")
async def delete_deployment(request: web.Request) -> web.Response:
    return await _delete(request, "DeleteDeployment")


@routes.get("/deployments/{id}/results")
async def deployment_results(request: web.Request) -> web.Response:
    ident = path_id(request)
    limit, offset = paging(request)
    async with get_state(request).pool.acquire() as conn:
        if await queries.get_deployment(conn, ident) is None:
            raise not_found("deployment", ident)
        items, total = await queries.list_results(conn, deployment_id=ident, limit=limit, offset=offset)
    return json_response({"items": items, "total": total})


@routes.get("/results")
async def list_results(request: web.Request) -> web.Response:
    limit, offset = paging(request)
    async with get_state(request).pool.acquire() as conn:
        items, total = await queries.list_results(conn, limit=limit, offset=offset)
    return json_response({"items": items, "total": total})


@routes.get("/results/{id}")
async def get_result(request: web.Request) -> web.Response:
    return await fetch_one(request, queries.get_result, "result")


@routes.get("/results/{id}/exits")
async def result_exits(request: web.Request) -> web.Response:
    """The calibration of each exit of the result's chain and the chain's exit frontier (any result of the
    chain answers); 409 with the reason while the chain trains or when it has no calibration."""
    ident = path_id(request)
    async with get_state(request).pool.acquire() as conn:
        found = await queries.get_chain_exits(conn, ident)
    if found is None:
        raise not_found("result", ident)
    if not found["finished"] or all(e["calibration"] is None for e in found["exits"]):
        raise ApiError(409, "conflict", f"result {ident} has no exit calibration: {found['reason']}", "id")
    return json_response(found)


@routes.post("/results/{id}/stop")
async def stop_result(request: web.Request) -> web.Response:
    return await submit(request, "StopTraining", {"id": path_id(request)}, read=_result_of, status=200)


async def _result_of(conn: asyncpg.Connection, deployment_id: int) -> JSON | None:
    # Training events live on the deployment aggregate; answer with the deployment's results.
    items, total = await queries.list_results(conn, deployment_id=deployment_id)
    return {"deployment_id": deployment_id, "items": items, "total": total}


@routes.delete("/results/{id}")
async def delete_result(request: web.Request) -> web.Response:
    ident = path_id(request)
    response = await submit(request, "DeleteResult", {"id": ident}, read=None, status=200)
    return response


# --- training reports ---------------------------------------------------------------------------------

def reported_results(payload: JSON) -> list[int]:
    """The result ids a workload's report speaks for (`result_ids`, or `result_id` of a trained result): what a
    workload's credentials must cover. 422 when it names none."""
    raw = payload.get("result_ids", [payload["result_id"]] if "result_id" in payload else None)
    if not isinstance(raw, list) or not raw:
        raise ApiError(422, "invalid", "a report names its results ('result_ids', or 'result_id')", "payload")
    return [catalogue.as_id(r, "payload.result_ids") for r in raw]


@routes.post("/reports")
async def training_report(request: web.Request) -> web.Response:
    """A training workload's report (ReportTrainingStarted, -Progress, -Result, -Failure), sent with the API's proof.

    Only the stack's components may report training (streams/proofs.py): the decider rejects a report that no
    component vouches for, so a workload reports here and the API, which authenticated it, signs the command.
    Answers 202 with the command id once the broker has it (Location: `/commands/{id}`, the outcome); a
    client-made `command_id` makes a re-sent report count once.
    """
    st = get_state(request)
    data = await body(request)
    command_type = data.get("type")
    if command_type not in WORKLOAD_REPORTS:
        raise ApiError(422, "invalid", f"'type' must be a workload's report: {', '.join(sorted(WORKLOAD_REPORTS))}",
                       "type")
    payload = data.get("payload")
    if not isinstance(payload, dict):
        raise ApiError(422, "invalid", "'payload' must be a JSON object (docs/commands.md)", "payload")
    reported_results(payload)
    command_id = data.get("command_id") or new_command_id()
    try:
        command_id = str(uuid.UUID(str(command_id)))
    except ValueError:
        raise ApiError(422, "invalid", f"'command_id' {command_id!r} is not a UUID", "command_id") from None
    if st.report_signer is None:
        raise ApiError(503, "unavailable", "this API has no TIERFLOW_SECRET_KEY, so it cannot vouch for reports")
    cmd = st.report_signer.sign(Command(command_id=command_id, type=str(command_type), payload=payload,
                                        source="api"))
    await st.producer.send_and_wait(st.settings.kafka.commands_topic, cmd.encode(), key=cmd.key())
    st.outcomes.command_sent()  # the decider reads it at once, not after its idle wait
    return json_response({"command_id": command_id, "status": "pending"}, status=202,
                         headers={"Location": f"/commands/{command_id}"})


@routes.get("/results/{id}/model")
async def download_model(request: web.Request) -> web.StreamResponse:
    ident = path_id(request)
    fmt = request.query.get("format", "keras")
    async with get_state(request).pool.acquire() as conn:
        result = await queries.get_result(conn, ident)
    if result is None:
        raise not_found("result", ident)
    artefacts = result.get("artefacts") or {}
    if result["status"] != ResultStatus.FINISHED or fmt not in artefacts:
        have = ", ".join(sorted(artefacts)) or "none"
        raise ApiError(404, "not_found", f"result {ident} has no '{fmt}' artefact (status {result['status']}; "
                                         f"artefacts: {have})", "format")
    ref = artefacts[fmt]
    suffix = {"keras": "." + str(ref.get("format", "keras")), "tflite": ".tflite"}.get(fmt, "")
    return artefact_response(request, ref["sha256"], f"result-{ident}-{result['model_name']}{suffix}")


def artefact_response(request: web.Request, sha256: str, filename: str) -> web.FileResponse:
    path = get_state(request).artefacts.path(sha256)
    if not path.exists():
        raise ApiError(404, "not_found", f"artefact {sha256} is not stored here")
    return web.FileResponse(path, headers={"X-Sha256": sha256, "Content-Type": "application/octet-stream",
                                           "Content-Disposition": f'attachment; filename="{filename}"'})


@routes.put("/artefacts")
async def upload_artefact(request: web.Request) -> web.Response:
    """Store a trained model (api/auth.py lets only the admin and an open training's token here)."""
    st = get_state(request)
    limit = st.settings.api.max_artefact_bytes
    if request.content_length is not None and request.content_length > limit:
        # Refused before a byte is read; a body without a length is counted as it streams (ArtefactStore).
        raise ApiError(413, "too_large", f"the artefact has {request.content_length} bytes, more than "
                                         f"TIERFLOW_MAX_ARTEFACT_BYTES={limit}")
    expected = request.headers.get("X-Sha256", "").strip().lower() or None
    sha256, size = await st.artefacts.store(request.content, expected=expected)
    return json_response({"sha256": sha256, "size": size}, status=201,
                         headers={"Location": f"/artefacts/{sha256}"})


@routes.get("/artefacts/{sha256}")
async def download_artefact(request: web.Request) -> web.StreamResponse:
    sha256 = request.match_info["sha256"].lower()
    return artefact_response(request, sha256, f"{sha256}.bin")


@routes.get("/models/{id}/versions/{version}")
async def get_model_version(request: web.Request) -> web.Response:
    ident = path_id(request)
    version = path_id(request, "version")
    async with get_state(request).pool.acquire() as conn:
        found = await queries.get_model_version(conn, ident, version)
    if found is None:
        raise ApiError(404, "not_found", f"model {ident} has no version {version}")
    return json_response(found)


@routes.get("/datasources")
async def list_datasources(request: web.Request) -> web.Response:
    limit, offset = paging(request)
    raw = request.query.get("deployment_id")
    deployment_id = query_id(raw, "deployment_id") if raw else None
    if raw and deployment_id is None:
        return json_response({"items": [], "total": 0})
    async with get_state(request).pool.acquire() as conn:
        items, total = await queries.list_datasources(conn, deployment_id=deployment_id, limit=limit, offset=offset)
    return json_response({"items": items, "total": total})


@routes.get("/datasources/{id}")
async def get_datasource(request: web.Request) -> web.Response:
    return await fetch_one(request, queries.get_datasource, "datasource")


@routes.post("/datasources/{id}/send")
async def send_datasource(request: web.Request) -> web.Response:
    data = await body(request)
    payload = {"datasource_id": path_id(request), "deployment_id": catalogue.req_id(data, "deployment_id")}
    return await submit(request, "SendDatasource", payload, read=queries.get_datasource, status=201)


def query_id(raw: str, name: str) -> int | None:
    """An id given as a query filter: a field error when malformed, None when no row can have it (the
    filter then matches nothing, as for any id that does not exist)."""
    if not raw.isascii() or not raw.isdigit() or not raw.strip("0"):
        raise ApiError(422, "invalid", f"'{name}' must be a positive integer id", name)
    return as_path_id(raw)


# --- inferences ---------------------------------------------------------------------------------------

@routes.post("/inferences")
async def create_inference(request: web.Request) -> web.Response:
    data = await body(request)
    catalogue.req_id(data, "result_id")
    reserved = catalogue.reserved_topics(get_state(request).settings.kafka)
    for name in ("input_topic", "output_topic"):
        catalogue.topic_name(data.get(name), name, reserved)  # the decider's rule; it checks tiers' upper topics
    if data.get("target") is not None:  # the decider checks it against the chain's frontier
        catalogue.target_field(data["target"])
    catalogue.shadow_fraction_field(data.get("shadow_fraction"))
    return await submit(request, "RequestInference", data, read=queries.get_inference, status=201)


@routes.get("/inferences")
async def list_inferences(request: web.Request) -> web.Response:
    limit, offset = paging(request)
    async with get_state(request).pool.acquire() as conn:
        items, total = await queries.list_inferences(conn, limit, offset)
    return json_response({"items": items, "total": total})


@routes.get("/inferences/{id}")
async def get_inference(request: web.Request) -> web.Response:
    return await fetch_one(request, queries.get_inference, "inference")


@routes.post("/inferences/{id}/stop")
async def stop_inference(request: web.Request) -> web.Response:
    return await submit(request, "StopInference", {"id": path_id(request)}, read=queries.get_inference, status=200)


@routes.delete("/inferences/{id}")
async def delete_inference(request: web.Request) -> web.Response:
    return await _delete(request, "DeleteInference")


@routes.post("/inferences/{id}/token")
async def mint_tier_token(request: web.Request) -> web.Response:
    """A token for tier K of this inference, for a tier started by hand on a device (admin only: api/auth.py
    lets no workload token here). It reads only this inference and the model of that tier's result."""
    inference = await _inference_or_404(request)
    data = await body(request)
    tier = data.get("tier")
    tiers = {t["index"]: t for t in inference["tiers"]}
    if not isinstance(tier, int) or isinstance(tier, bool) or tier not in tiers:
        raise ApiError(422, "invalid", f"'tier' must be one of inference {inference['id']}'s tiers: "
                                       f"{', '.join(map(str, sorted(tiers)))}", "tier")
    result_id = int(tiers[tier]["result_id"])
    token = tokens.mint(get_state(request).settings.security.secret_key,
                        tokens.tier_claims(inference["id"], tier, result_id))
    return json_response({"token": token, "scope": str(tokens.Scope.TIER), "inference_id": inference["id"],
                          "tier": tier, "result_id": result_id}, status=201)


async def _inference_or_404(request: web.Request) -> JSON:
    ident = path_id(request)
    async with get_state(request).pool.acquire() as conn:
        found = await queries.get_inference(conn, ident)
    if found is None:
        raise not_found("inference", ident)
    return found


#: The largest windows a request may ask for (samples): what a page shows, and what statistics need.
MAX_PREDICTIONS = 1000
MAX_STATS_WINDOW = 10_000


def _window(request: web.Request, default: int, maximum: int) -> int:
    raw = request.query.get("limit", str(default))
    if not raw.isascii() or not raw.isdigit() or len(raw) > 9:
        raise ApiError(422, "invalid", f"'limit' must be an integer 1..{maximum}", "limit")
    n = int(raw)
    if not 1 <= n <= maximum:
        raise ApiError(422, "invalid", f"'limit' must be 1..{maximum}", "limit")
    return n


def _clusters(request: web.Request, inference: JSON) -> list[str]:
    """The distinct clusters an inference's tiers run on (each answers on its own cluster's output topic)."""
    default = get_state(request).settings.kafka.bootstrap_servers
    return list(dict.fromkeys(t.get("bootstrap_servers") or default for t in inference["tiers"]))


def _unreachable(unreachable: list[str], servers: str, exc: BaseException) -> None:
    if not any(u.startswith(f"{servers}:") for u in unreachable):
        unreachable.append(f"{servers}: {type(exc).__name__}: {exc}")


async def _outputs(request: web.Request, inference: JSON, limit: int, unreachable: list[str]) -> list[JSON]:
    """The newest `limit` answers over every cluster the tiers run on, newest first (the shared reader)."""
    reader = get_state(request).outputs
    samples: list[JSON] = []
    for servers in _clusters(request, inference):
        try:
            samples += await reader.latest(servers, inference["output_topic"], limit)
        except READ_ERRORS as exc:
            _unreachable(unreachable, servers, exc)
    samples.sort(key=lambda s: s.get("timestamp_ms") or 0, reverse=True)
    return samples[:limit]


async def _shadow_outcomes(request: web.Request, inference: JSON, limit: int, unreachable: list[str]) -> list[JSON]:
    """The newest `limit` shadow outcomes of the inference (its shadow topic, on the top tier's cluster)."""
    st = get_state(request)
    tiers = inference["tiers"]
    if len(tiers) < 2:
        return []
    top = max(tiers, key=lambda t: int(t["index"]))
    servers = top.get("bootstrap_servers") or st.settings.kafka.bootstrap_servers
    try:
        return await st.outputs.shadow_outcomes(servers, st.settings.kafka.shadow_topic(inference["id"]), limit)
    except READ_ERRORS as exc:
        _unreachable(unreachable, servers, exc)
        return []


async def _lags(request: web.Request, inference: JSON, unreachable: list[str]) -> list[int | None]:
    """Each tier's backlog: input records its consumer group has not committed (None: unknown)."""
    st = get_state(request)
    lags: list[int | None] = []
    for tier in inference["tiers"]:
        servers = tier.get("bootstrap_servers") or st.settings.kafka.bootstrap_servers
        try:
            lags.append(await st.outputs.lag(servers, wire.tier_group(inference["id"], tier["index"]),
                                             tier["input_topic"]))
        except READ_ERRORS as exc:
            _unreachable(unreachable, servers, exc)
            lags.append(None)
    return lags


def _tier_details(stats: JSON, inference: JSON, lags: list[int | None]) -> None:
    """What each tier is (its result, model, exit limit, input topic) and its backlog, next to its answers."""
    for tier, spec, lag in zip(stats["tiers"], inference["tiers"], lags, strict=True):
        tier.update({"result_id": spec["result_id"], "model_name": spec["model_name"], "limit": spec["limit"],
                     "input_topic": spec["input_topic"], "lag": lag})


@routes.get("/inferences/{id}/predictions")
async def inference_predictions(request: web.Request) -> web.Response:
    """The latest answers read from the output topic: tier, class, confidence, origin (RF.7)."""
    limit = _window(request, 50, MAX_PREDICTIONS)
    inference = await _inference_or_404(request)
    unreachable: list[str] = []
    items = await _outputs(request, inference, limit, unreachable)
    return json_response({"inference_id": inference["id"], "items": items, "total": len(items),
                          "unreachable": unreachable})


@routes.get("/inferences/{id}/stats")
async def inference_stats(request: web.Request) -> web.Response:
    """Exit distribution per tier, throughput and latency percentiles over the latest outputs; per tier its
    observed share, the predicted share and agreement, and the live agreement over the latest shadow outcomes."""
    limit = _window(request, MAX_STATS_WINDOW, MAX_STATS_WINDOW)
    inference = await _inference_or_404(request)
    unreachable: list[str] = []
    samples = await _outputs(request, inference, limit, unreachable)
    outcomes = await _shadow_outcomes(request, inference, limit, unreachable)
    tiers = sorted(inference["tiers"], key=lambda t: int(t["index"]))
    stats = statistics(samples, len(tiers), tier_specs=tiers, outcomes=outcomes)
    _tier_details(stats, inference, await _lags(request, inference, unreachable))
    return json_response({"inference_id": inference["id"], "status": inference["status"], **stats,
                          "unreachable": unreachable})


# --- commands, health, metrics ------------------------------------------------------------------------

@routes.get("/commands/{command_id}")
async def get_command(request: web.Request) -> web.Response:
    command_id = request.match_info["command_id"]
    try:
        uuid.UUID(command_id)
    except ValueError:
        raise ApiError(404, "not_found", f"{command_id!r} is not a command id") from None
    async with get_state(request).pool.acquire() as conn:
        found = await queries.get_outcomes(conn, [command_id])
    if not found:
        return json_response({"command_id": command_id, "status": "pending",
                              "message": "no outcome yet (or no such command)"}, status=202)
    return json_response(found[0])


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


def agent_check(agent: JSON) -> JSON:
    """One agent of the worker in `/readyz`: ok while it starts or runs and its worker reports (streams/health.py);
    otherwise the reason (its error, `stopped`, or no report for `STALE_S`)."""
    error = agent["error"]
    ok = agent["state"] in health.HEALTHY
    if agent["age_s"] > health.STALE_S:
        ok = False
        error = (f"no report from the worker for {agent['age_s']:.0f} s (last: {agent['state']}); is `tierflow "
                 "worker` running?")
    elif agent["state"] == health.STOPPED:
        error = "stopped: the worker stopped this agent"
    return {"ok": ok, "state": agent["state"], "error": error, "restarts": agent["restarts"],
            "deadletter_failures": agent["deadletter_failures"], "updated_at": agent["updated_at"]}


#: `/readyz?scope=`: "all" (the default: the API and the worker's agents, what an operator or a monitor asks) or
#: "api" (the API's own Postgres and broker only: the API pods' readinessProbe, so a failing agent of the worker
#: never takes the API out of its Service, where training workloads report).
READY_SCOPES = ("all", "api")


def sandbox_isolation(agents: list[JSON]) -> JSON | None:
    """The sandbox isolation in force, as the worker's validator last reported it (streams/worker.py); None
    before any worker reported one."""
    for agent in agents:
        detail = agent.get("detail")
        if agent["agent"] == "validator" and isinstance(detail, dict) and isinstance(detail.get("isolation"), dict):
            return detail["isolation"] or None
    return None


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """Readiness, with each check's reason. `?scope=api`: the API's own Postgres and broker only (READY_SCOPES)."""
    st: AppState = get_state(request)
    scope = request.query.get("scope", "all")
    if scope not in READY_SCOPES:
        raise ApiError(422, "invalid", f"'scope' must be one of {', '.join(READY_SCOPES)}", "scope")
    whole = scope == "all"
    checks: JSON = {}
    ready = True
    agents: list[JSON] = []
    try:
        async with st.pool.acquire() as conn:
            await conn.fetchval("SELECT 1")
            status = await queries.projector_status(conn)
            _, last_offset = await queries.projection_position(conn)
            if whole:
                agents = await queries.agent_health(conn)
        checks["postgres"] = {"ok": True}
        if whole:
            checks["agents"] = {a["agent"]: agent_check(a) for a in agents}
            ready = ready and all(check["ok"] for check in checks["agents"].values())
            if status is not None and status["state"] == "stopped":
                ready = False
                checks["projector"] = {"ok": False, "error": status["error"]}
            else:
                checks["projector"] = {"ok": True, "state": status["state"] if status else "not started"}
    except (asyncpg.PostgresError, OSError) as exc:
        ready = False
        checks["postgres"] = {"ok": False, "error": str(exc)}
        last_offset = -1
    try:
        hw = await st.events_highwater()
        lag = max(0, hw - (last_offset + 1))
        st.metrics.projection_lag.set(lag)
        checks["broker"] = {"ok": True}
        if whole:  # the projector's lag is the worker's matter, not the API's own
            checks["projection_lag"] = {"ok": lag <= st.max_ready_lag, "events": lag}
            ready = ready and lag <= st.max_ready_lag
    except Exception as exc:  # any broker failure makes the API not ready; the reason is reported
        ready = False
        checks["broker"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    answer: JSON = {"ready": ready, "scope": scope, "checks": checks}
    if whole:
        answer["sandbox"] = sandbox_isolation(agents)
    return json_response(answer, status=200 if ready else 503)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    st = get_state(request)
    try:  # the worker has no HTTP port: its agents' restarts and lost dead letters are exported here
        async with st.pool.acquire() as conn:
            st.metrics.observe_agents(await queries.agent_health(conn))
    except (asyncpg.PostgresError, OSError):
        pass  # /readyz says Postgres is away; the other metrics still render
    data, content_type = st.metrics.render()
    return web.Response(body=data, headers={"Content-Type": content_type})


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    from tierflow.api.openapi import spec

    return json_response(spec())
