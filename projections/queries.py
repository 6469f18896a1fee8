"""Read queries the API serves, over the live projection schema. Rows come back as JSON-ready dicts.

Called by api/routes.py. Nothing here writes; the projector is the only writer of these tables.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg
import orjson

from tierflow.projections.schema import LIVE_SCHEMA as S
from tierflow.streams.statuses import ResultStatus

JSON = dict[str, Any]


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def _j(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, str | bytes) else value


def _model(r: asyncpg.Record) -> JSON:
    return {
        "id": r["id"], "name": r["name"], "description": r["description"], "imports": r["imports"],
        "code": r["code"], "distributed": r["distributed"], "upper_id": r["upper_id"], "lower_id": r["lower_id"],
        "version": r["version"], "input_shape": _j(r["input_shape"]), "output_shapes": _j(r["output_shapes"]),
        "params": r["params"], "created_at": _iso(r["created_at"]), "updated_at": _iso(r["updated_at"]),
    }


_MODEL_SQL = f"""SELECT m.*, (SELECT l.id FROM {S}.models l WHERE l.upper_id = m.id LIMIT 1) AS lower_id
                 FROM {S}.models m"""


async def list_models(conn: asyncpg.Connection, *, distributed: bool | None = None, name: str | None = None,
                      limit: int = 100, offset: int = 0) -> tuple[list[JSON], int]:
    where: list[str] = []
    args: list[Any] = []
    if distributed is not None:
        args.append(distributed)
        where.append(f"m.distributed = ${len(args)}")
    if name:
        args.append(f"%{name}%")
        where.append(f"m.name ILIKE ${len(args)}")
    clause = (" WHERE " + " AND ".join(where)) if where else ""
    total = await conn.fetchval(f"SELECT count(*) FROM {S}.models m{clause}", *args)
    rows = await conn.fetch(f"{_MODEL_SQL}{clause} ORDER BY m.id LIMIT {int(limit)} OFFSET {int(offset)}", *args)
    return [_model(r) for r in rows], int(total)


async def get_model(conn: asyncpg.Connection, model_id: int) -> JSON | None:
    r = await conn.fetchrow(f"{_MODEL_SQL} WHERE m.id = $1", model_id)
    return None if r is None else _model(r)


async def get_model_version(conn: asyncpg.Connection, model_id: int, version: int) -> JSON | None:
    r = await conn.fetchrow(f"SELECT * FROM {S}.model_versions WHERE model_id = $1 AND version = $2",
                            model_id, version)
    if r is None:
        return None
    return {"model_id": r["model_id"], "version": r["version"], "name": r["name"], "imports": r["imports"],
            "code": r["code"], "distributed": r["distributed"], "upper_id": r["upper_id"],
            "input_shape": _j(r["input_shape"]), "output_shapes": _j(r["output_shapes"]), "params": r["params"],
            "created_at": _iso(r["created_at"])}


def _configuration(r: asyncpg.Record) -> JSON:
    return {"id": r["id"], "name": r["name"], "description": r["description"], "model_ids": list(r["model_ids"]),
            "version": r["version"], "created_at": _iso(r["created_at"]), "updated_at": _iso(r["updated_at"])}


async def list_configurations(conn: asyncpg.Connection, limit: int = 100, offset: int = 0) -> tuple[list[JSON], int]:
    total = await conn.fetchval(f"SELECT count(*) FROM {S}.configurations")
    rows = await conn.fetch(f"SELECT * FROM {S}.configurations ORDER BY id LIMIT {int(limit)} OFFSET {int(offset)}")
    return [_configuration(r) for r in rows], int(total)


async def get_configuration(conn: asyncpg.Connection, cid: int) -> JSON | None:
    r = await conn.fetchrow(f"SELECT * FROM {S}.configurations WHERE id = $1", cid)
    return None if r is None else _configuration(r)


_DEPLOYMENT_SQL = f"""SELECT d.*, COALESCE((SELECT array_agg(r.id ORDER BY r.id) FROM {S}.results r
                      WHERE r.deployment_id = d.id), '{{}}') AS result_ids FROM {S}.deployments d"""


def _deployment(r: asyncpg.Record) -> JSON:
    return {
        "id": r["id"], "configuration_id": r["configuration_id"], "batch": r["batch"],
        "fit_options": _j(r["fit_options"]), "eval_options": _j(r["eval_options"]), "optimizer": r["optimizer"],
        "learning_rate": r["learning_rate"], "loss": r["loss"], "metrics": _j(r["metrics"]),
        "loss_weights": _j(r["loss_weights"]), "seed": r["seed"], "model_versions": _j(r["model_versions"]),
        "result_ids": list(r["result_ids"]), "created_at": _iso(r["created_at"]),
    }


async def list_deployments(conn: asyncpg.Connection, limit: int = 100, offset: int = 0) -> tuple[list[JSON], int]:
    total = await conn.fetchval(f"SELECT count(*) FROM {S}.deployments")
    rows = await conn.fetch(f"{_DEPLOYMENT_SQL} ORDER BY d.id LIMIT {int(limit)} OFFSET {int(offset)}")
    return [_deployment(r) for r in rows], int(total)


async def get_deployment(conn: asyncpg.Connection, did: int) -> JSON | None:
    r = await conn.fetchrow(f"{_DEPLOYMENT_SQL} WHERE d.id = $1", did)
    return None if r is None else _deployment(r)


_RESULT_SQL = f"""SELECT r.*, m.name AS model_name, q.position AS queue_position, q.note AS queue_note
                  FROM {S}.results r
                  LEFT JOIN {S}.model_versions m ON m.model_id = r.model_id AND m.version = r.model_version
                  LEFT JOIN public.training_queue q ON q.result_id = r.id AND r.status = '{ResultStatus.CREATED}'"""


def _result(r: asyncpg.Record) -> JSON:
    queued = None if r["queue_position"] is None else {"position": r["queue_position"], "note": r["queue_note"]}
    return {"id": r["id"], "deployment_id": r["deployment_id"], "model_id": r["model_id"],
            "model_name": r["model_name"], "model_version": r["model_version"], "status": r["status"],
            "chain": list(r["chain"]), "workload": r["workload"], "queued": queued, "seed": r["seed"],
            "samples": _j(r["samples"]), "history": _j(r["history"]), "metrics": _j(r["metrics"]),
            "artefacts": _j(r["artefacts"]), "error": r["error"], "created_at": _iso(r["created_at"]),
            "updated_at": _iso(r["updated_at"]), "started_at": _iso(r["started_at"]),
            "finished_at": _iso(r["finished_at"])}


async def training_rows(conn: asyncpg.Connection) -> list[JSON]:
    """What the orchestrator compares with the existing workloads: every open result (created, deployed,
    training) that a workload may be needed for, with the other results of its chain (a chain trains as one
    workload, named after its bottom result). Ended results of ended chains are left out, so a planning pass
    costs what is open, not the history (a partial index finds the open ones); their workloads are removed as
    unwanted all the same. So are results that wait for their data (created, no datasource yet): nothing is
    launched for them, and a backlog of such deployments made each pass cost milliseconds of the worker's loop
    per thousand (POST /deployments p99 100-130 ms at 50/s with the passes, 51-56 ms without)."""
    rows = await conn.fetch(
        f"""WITH open AS (SELECT o.id, o.chain FROM {S}.results o
                          WHERE o.status IN ('deployed', 'training')
                             OR (o.status = 'created' AND EXISTS (SELECT 1 FROM {S}.datasources d
                                                                  WHERE d.deployment_id = o.deployment_id)))
            SELECT r.id, r.deployment_id, r.status, r.chain, r.workload,
                   EXISTS (SELECT 1 FROM {S}.datasources d WHERE d.deployment_id = r.deployment_id) AS has_data
            FROM {S}.results r
            WHERE r.id IN (SELECT id FROM open) OR r.id IN (SELECT unnest(chain) FROM open)
            ORDER BY r.id""")
    return [{"id": r["id"], "deployment_id": r["deployment_id"], "status": r["status"], "chain": list(r["chain"]),
             "workload": r["workload"], "has_data": r["has_data"]} for r in rows]


async def running_inferences(conn: asyncpg.Connection) -> list[JSON]:
    """The running inferences (what the orchestrator serves); a partial index finds them, whatever the history."""
    rows = await conn.fetch(f"SELECT * FROM {S}.inferences WHERE status = 'running' ORDER BY id")
    return [_inference(r) for r in rows]


async def list_results(conn: asyncpg.Connection, *, deployment_id: int | None = None, limit: int = 100,
                       offset: int = 0) -> tuple[list[JSON], int]:
    clause, args = ("", []) if deployment_id is None else (" WHERE r.deployment_id = $1", [deployment_id])
    total = await conn.fetchval(f"SELECT count(*) FROM {S}.results r{clause}", *args)
    rows = await conn.fetch(f"{_RESULT_SQL}{clause} ORDER BY r.id LIMIT {int(limit)} OFFSET {int(offset)}", *args)
    return [_result(r) for r in rows], int(total)


async def get_result(conn: asyncpg.Connection, rid: int) -> JSON | None:
    r = await conn.fetchrow(f"{_RESULT_SQL} WHERE r.id = $1", rid)
    return None if r is None else _result(r)


async def get_chain_exits(conn: asyncpg.Connection, rid: int) -> JSON | None:
    """The calibration of every exit of result `rid`'s chain and the chain's exit frontier (`chain_exits`);
    None when the result does not exist."""
    r = await conn.fetchrow(f"SELECT chain FROM {S}.results WHERE id = $1", rid)
    if r is None:
        return None
    chain = list(r["chain"]) or [rid]
    rows = await conn.fetch(
        f"""SELECT r.id, r.status, m.name AS model_name, x.exits FROM {S}.results r
            LEFT JOIN {S}.model_versions m ON m.model_id = r.model_id AND m.version = r.model_version
            LEFT JOIN {S}.result_exits x ON x.result_id = r.id WHERE r.id = ANY($1::int[])""", chain)
    found = {row["id"]: {"status": row["status"], "model_name": row["model_name"], "exits": _j(row["exits"])}
             for row in rows}
    return chain_exits(rid, chain, found)


def chain_exits(rid: int, chain: list[int], found: dict[int, JSON]) -> JSON:
    """`GET /results/{id}/exits` from the rows of the chain's results (pure): per exit its result, model,
    temperature and calibration and measured cost; the chain's frontier record (the top result's); `reason`
    when there is none; `finished` whether every result of the chain has finished (else the rest is empty)."""
    finished = all(found.get(r, {}).get("status") == ResultStatus.FINISHED for r in chain)
    exits: list[JSON] = []
    frontier: JSON | None = None
    reason: str | None = None
    if finished:
        for k, r in enumerate(chain):
            x: JSON = found[r]["exits"] or {}
            exits.append({"exit": k, "result_id": r, "model_name": found[r]["model_name"],
                          "temperature": x.get("temperature", 1.0), "cost_s": x.get("cost_s"),
                          "calibration": x.get("calibration")})
            reason = reason or x.get("reason")
        top: JSON = found[chain[-1]]["exits"] or {}
        frontier = top.get("frontier")
        if frontier is None:
            reason = top.get("reason") or reason or "no calibration was reported for this chain"
        elif any(e["calibration"] is None for e in exits):
            reason = reason or "an exit of the chain has no calibration"
        else:
            reason = None
    else:
        waiting = [f"{r} ({found.get(r, {}).get('status', 'deleted')})" for r in chain
                   if found.get(r, {}).get("status") != ResultStatus.FINISHED]
        reason = (f"the chain's exits are calibrated when all its results have finished; result(s) "
                  f"{', '.join(waiting)} have not")
    return {"result_id": rid, "chain": chain, "finished": finished, "exits": exits, "frontier": frontier,
            "reason": reason}


async def referenced_artefacts(conn: asyncpg.Connection) -> set[str]:
    """The sha256 of every artefact a result still names (the API's artefact collection keeps these)."""
    rows = await conn.fetch(f"SELECT DISTINCT a.value->>'sha256' AS sha256 FROM {S}.results r, "
                            f"jsonb_each(CASE jsonb_typeof(r.artefacts) WHEN 'object' THEN r.artefacts "
                            f"ELSE '{{}}'::jsonb END) a")
    return {r["sha256"] for r in rows if r["sha256"]}


def _datasource(r: asyncpg.Record) -> JSON:
    return {"id": r["id"], "deployment_id": r["deployment_id"], "ranges": _j(r["ranges"]),
            "announced_ranges": _j(r["announced_ranges"]), "range_reasons": _j(r["range_reasons"]),
            "input_format": r["input_format"], "input_config": _j(r["input_config"]),
            "description": r["description"], "validation_rate": r["validation_rate"], "test_rate": r["test_rate"],
            "total_msg": r["total_msg"], "origin": _j(r["origin"]), "warnings": _j(r["warnings"]),
            "created_at": _iso(r["created_at"])}


async def list_datasources(conn: asyncpg.Connection, *, deployment_id: int | None = None, limit: int = 100,
                           offset: int = 0) -> tuple[list[JSON], int]:
    clause, args = ("", []) if deployment_id is None else (" WHERE deployment_id = $1", [deployment_id])
    total = await conn.fetchval(f"SELECT count(*) FROM {S}.datasources{clause}", *args)
    rows = await conn.fetch(f"SELECT * FROM {S}.datasources{clause} ORDER BY id LIMIT {int(limit)} "
                            f"OFFSET {int(offset)}", *args)
    return [_datasource(r) for r in rows], int(total)


async def get_datasource(conn: asyncpg.Connection, ident: int) -> JSON | None:
    r = await conn.fetchrow(f"SELECT * FROM {S}.datasources WHERE id = $1", ident)
    return None if r is None else _datasource(r)


def _inference(r: asyncpg.Record) -> JSON:
    return {"id": r["id"], "status": r["status"], "result_id": r["result_id"], "deployment_id": r["deployment_id"],
            "input_topic": r["input_topic"], "output_topic": r["output_topic"], "input_format": r["input_format"],
            "input_config": _j(r["input_config"]), "tiers": _j(r["tiers"]), "shadow_fraction": r["shadow_fraction"],
            "target": _j(r["target"]), "predicted": _j(r["predicted"]), "created_at": _iso(r["created_at"]),
            "updated_at": _iso(r["updated_at"])}


async def list_inferences(conn: asyncpg.Connection, limit: int = 100, offset: int = 0) -> tuple[list[JSON], int]:
    total = await conn.fetchval(f"SELECT count(*) FROM {S}.inferences")
    rows = await conn.fetch(f"SELECT * FROM {S}.inferences ORDER BY id LIMIT {int(limit)} OFFSET {int(offset)}")
    return [_inference(r) for r in rows], int(total)


async def get_inference(conn: asyncpg.Connection, ident: int) -> JSON | None:
    r = await conn.fetchrow(f"SELECT * FROM {S}.inferences WHERE id = $1", ident)
    return None if r is None else _inference(r)


def outcome_json(r: asyncpg.Record) -> JSON:
    return {"command_id": str(r["command_id"]), "status": r["status"], "event_type": r["event_type"],
            "aggregate": r["aggregate"], "seq": r["seq"], "reason": _j(r["reason"]),
            "occurred_at": _iso(r["occurred_at"])}


async def get_outcomes(conn: asyncpg.Connection, command_ids: list[str]) -> list[JSON]:
    rows = await conn.fetch(f"SELECT * FROM {S}.command_outcomes WHERE command_id = ANY($1::uuid[])", command_ids)
    return [outcome_json(r) for r in rows]


async def projection_position(conn: asyncpg.Connection) -> tuple[int, int]:
    r = await conn.fetchrow(f"SELECT last_seq, last_offset FROM {S}.tracking WHERE consumer = 'projector'")
    return (0, -1) if r is None else (int(r["last_seq"]), int(r["last_offset"]))


async def projector_status(conn: asyncpg.Connection) -> JSON | None:
    r = await conn.fetchrow("SELECT state, error, updated_at FROM public.projector_status WHERE consumer = 'projector'")
    return None if r is None else {"state": r["state"], "error": r["error"], "updated_at": _iso(r["updated_at"])}


async def agent_health(conn: asyncpg.Connection) -> list[JSON]:
    """The worker's agents as it last reported them (streams/health.py), with the age of each report."""
    rows = await conn.fetch("SELECT agent, state, error, restarts, deadletter_failures, detail, updated_at, "
                            "extract(epoch FROM now() - updated_at)::float8 AS age_s "
                            "FROM public.agent_health ORDER BY agent")
    return [{"agent": r["agent"], "state": r["state"], "error": r["error"], "restarts": r["restarts"],
             "deadletter_failures": r["deadletter_failures"], "detail": _j(r["detail"]),
             "updated_at": _iso(r["updated_at"]), "age_s": float(r["age_s"])} for r in rows]
