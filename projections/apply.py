"""apply(event) per table: how each accepted event changes the projection rows.

Called by the projector agent (live, schema `proj`) and by the rebuild (a fresh schema), always inside a
transaction that also moves the tracking row, so an event is applied exactly once. Rows take their
timestamps from the events, never from the clock, so a replay rebuilds identical tables.
An event this module cannot apply raises `ProjectionError`: a bug, never skipped.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg
import orjson

from tierflow.streams.envelope import Event
from tierflow.streams.errors import PermanentError
from tierflow.streams.statuses import InferenceStatus, ResultStatus


class ProjectionError(PermanentError, RuntimeError):
    """An accepted event could not be applied: the projector stops and /readyz reports this."""


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def js(value: Any) -> str:
    return orjson.dumps(value).decode()


async def apply_event(conn: asyncpg.Connection, schema: str, event: Event) -> None:
    handler = _HANDLERS.get(event.type)
    try:
        if handler is not None:
            await handler(conn, schema, event)
        await _record_outcome(conn, schema, event)
    except (asyncpg.PostgresError, KeyError, TypeError, ValueError) as exc:
        raise ProjectionError(
            f"cannot apply event seq {event.seq} ({event.type}, {event.aggregate}): {type(exc).__name__}: {exc}"
        ) from exc


async def _record_outcome(conn: asyncpg.Connection, s: str, e: Event) -> None:
    p = e.payload
    rejected = e.type == "CommandRejected"
    await conn.execute(
        f"INSERT INTO {s}.command_outcomes (command_id, seq, command_type, status, event_type, aggregate, reason, "
        f"occurred_at) VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8) ON CONFLICT (command_id) DO NOTHING",
        e.command_id, e.seq, p.get("command_type") if rejected else None, "rejected" if rejected else "accepted",
        e.type, e.aggregate, js(p["reason"]) if rejected else None, ts(e.occurred_at),
    )


async def _model_upsert(conn: asyncpg.Connection, s: str, e: Event) -> None:
    p = e.payload
    await conn.execute(
        f"""INSERT INTO {s}.models (id, name, description, imports, code, distributed, upper_id, version,
                input_shape, output_shapes, params, created_at, updated_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10::jsonb, $11, $12, $13)
            ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, description = EXCLUDED.description,
                imports = EXCLUDED.imports, code = EXCLUDED.code, distributed = EXCLUDED.distributed,
                upper_id = EXCLUDED.upper_id, version = EXCLUDED.version, input_shape = EXCLUDED.input_shape,
                output_shapes = EXCLUDED.output_shapes, params = EXCLUDED.params, updated_at = EXCLUDED.updated_at""",
        p["id"], p["name"], p["description"], p["imports"], p["code"], p["distributed"], p["upper_id"],
        p["version"], js(p["input_shape"]), js(p["output_shapes"]), p["params"], ts(p["created_at"]),
        ts(p["updated_at"]),
    )
    await conn.execute(
        f"""INSERT INTO {s}.model_versions (model_id, version, name, imports, code, distributed, upper_id,
                input_shape, output_shapes, params, created_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9::jsonb, $10, $11)""",
        p["id"], p["version"], p["name"], p["imports"], p["code"], p["distributed"], p["upper_id"],
        js(p["input_shape"]), js(p["output_shapes"]), p["params"], ts(p["updated_at"]),
    )


async def _model_deleted(conn: asyncpg.Connection, s: str, e: Event) -> None:
    await conn.execute(f"DELETE FROM {s}.models WHERE id = $1", e.payload["id"])


async def _configuration_upsert(conn: asyncpg.Connection, s: str, e: Event) -> None:
    p = e.payload
    await conn.execute(
        f"""INSERT INTO {s}.configurations (id, name, description, model_ids, version, created_at, updated_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7)
            ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, description = EXCLUDED.description,
                model_ids = EXCLUDED.model_ids, version = EXCLUDED.version, updated_at = EXCLUDED.updated_at""",
        p["id"], p["name"], p["description"], p["model_ids"], p["version"], ts(p["created_at"]),
        ts(p["updated_at"]),
    )


async def _configuration_deleted(conn: asyncpg.Connection, s: str, e: Event) -> None:
    await conn.execute(f"DELETE FROM {s}.configurations WHERE id = $1", e.payload["id"])


async def _deployment_requested(conn: asyncpg.Connection, s: str, e: Event) -> None:
    p = e.payload
    at = ts(p["created_at"])
    await conn.execute(
        f"""INSERT INTO {s}.deployments (id, configuration_id, batch, fit_options, eval_options, optimizer,
                learning_rate, loss, metrics, loss_weights, model_versions, created_at, seed)
            VALUES ($1, $2, $3, $4::jsonb, $5::jsonb, $6, $7, $8, $9::jsonb, $10::jsonb, $11::jsonb, $12, $13)""",
        p["id"], p["configuration_id"], p["batch"], js(p["fit_options"]), js(p["eval_options"]), p["optimizer"],
        p["learning_rate"], p["loss"], js(p["metrics"]),
        js(p["loss_weights"]) if p["loss_weights"] is not None else None, js(p["model_versions"]), at,
        p.get("seed"),  # only when the user asked for one (and in no event from before seeds)
    )
    chains = p.get("chains") or [[r["id"]] for r in p["results"]]
    chain_of = {rid: chain for chain in chains for rid in chain}
    await conn.executemany(
        f"""INSERT INTO {s}.results (id, deployment_id, model_id, model_version, status, chain, created_at,
                updated_at) VALUES ($1, $2, $3, $4, '{ResultStatus.CREATED}', $5, $6, $6)""",
        [(r["id"], p["id"], r["model_id"], r["model_version"], chain_of[r["id"]], at) for r in p["results"]],
    )


async def _deployment_deleted(conn: asyncpg.Connection, s: str, e: Event) -> None:
    await conn.execute(f"DELETE FROM {s}.results WHERE deployment_id = $1", e.payload["id"])
    await conn.execute(f"DELETE FROM {s}.result_exits WHERE deployment_id = $1", e.payload["id"])
    await conn.execute(f"DELETE FROM {s}.deployments WHERE id = $1", e.payload["id"])


async def _datasource_announced(conn: asyncpg.Connection, s: str, e: Event) -> None:
    p = e.payload
    await conn.execute(
        f"""INSERT INTO {s}.datasources (id, deployment_id, ranges, announced_ranges, range_reasons, input_format,
                input_config, description, validation_rate, test_rate, total_msg, origin, warnings, created_at)
            VALUES ($1, $2, $3::jsonb, $4::jsonb, $5::jsonb, $6, $7::jsonb, $8, $9, $10, $11, $12::jsonb, $13::jsonb,
                    $14)""",
        p["id"], p["deployment_id"], js(p["ranges"]), js(p["announced_ranges"]), js(p["range_reasons"]),
        p["input_format"], js(p["input_config"] or {}), p["description"] or "", p["validation_rate"] or 0.0,
        p["test_rate"] or 0.0, p["total_msg"], js(p["origin"]) if p.get("origin") is not None else None,
        js(p.get("warnings") or []), ts(p["created_at"]),
    )


async def _training_launched(conn: asyncpg.Connection, s: str, e: Event) -> None:
    p = e.payload
    await conn.execute(f"UPDATE {s}.results SET status = '{ResultStatus.DEPLOYED}', workload = $2, updated_at = $3 "
                       "WHERE id = ANY($1::int[])", p["result_ids"], p["workload"], ts(p["at"]))


async def _training_started(conn: asyncpg.Connection, s: str, e: Event) -> None:
    p = e.payload
    await conn.execute(f"UPDATE {s}.results SET status = '{ResultStatus.TRAINING}', seed = $2, samples = $3::jsonb, "
                       "started_at = $4, updated_at = $4 WHERE id = ANY($1::int[])",
                       p["result_ids"], p["seed"], js(p["samples"]), ts(p["at"]))


async def _training_progressed(conn: asyncpg.Connection, s: str, e: Event) -> None:
    p = e.payload
    at = ts(p["at"])
    for rid in p["result_ids"]:
        entry = {"epoch": p["epoch"], "epochs": p["epochs"], **(p["metrics"].get(str(rid)) or {})}
        await conn.execute(f"UPDATE {s}.results SET status = '{ResultStatus.TRAINING}', "
                           "history = history || $2::jsonb, updated_at = $3 WHERE id = $1", rid, js([entry]), at)


async def _training_result(conn: asyncpg.Connection, s: str, e: Event) -> None:
    p = e.payload
    await conn.execute(f"UPDATE {s}.results SET status = '{ResultStatus.FINISHED}', metrics = $2::jsonb, "
                       "artefacts = $3::jsonb, finished_at = $4, updated_at = $4 WHERE id = $1",
                       p["result_id"], js(p["metrics"]), js(p["artefacts"]), ts(p["at"]))
    # Its own table: a chain's frontier record is ~100-300 kB, which no listing of results should carry.
    await conn.execute(f"INSERT INTO {s}.result_exits (result_id, deployment_id, exits) VALUES ($1, $2, $3::jsonb) "
                       "ON CONFLICT (result_id) DO UPDATE SET exits = EXCLUDED.exits",
                       p["result_id"], p["deployment_id"], js(p["exits"]))


async def _training_ended(conn: asyncpg.Connection, s: str, e: Event) -> None:
    p = e.payload
    failed = e.type == "TrainingFailed"
    status = ResultStatus.FAILED if failed else ResultStatus.STOPPED
    error = p.get("reason") if failed else f"stopped on request (result {p.get('requested_for')})"
    await conn.execute(f"UPDATE {s}.results SET status = $2, error = $3, finished_at = $4, updated_at = $4 "
                       "WHERE id = ANY($1::int[])", p["result_ids"], status, error, ts(p["at"]))


async def _result_deleted(conn: asyncpg.Connection, s: str, e: Event) -> None:
    await conn.execute(f"DELETE FROM {s}.results WHERE id = $1", e.payload["id"])
    await conn.execute(f"DELETE FROM {s}.result_exits WHERE result_id = $1", e.payload["id"])


async def _inference_requested(conn: asyncpg.Connection, s: str, e: Event) -> None:
    p = e.payload
    at = ts(p["created_at"])
    await conn.execute(
        f"""INSERT INTO {s}.inferences (id, result_id, deployment_id, status, input_topic, output_topic,
                input_format, input_config, tiers, shadow_fraction, target, predicted, created_at, updated_at)
            VALUES ($1, $2, $3, '{InferenceStatus.RUNNING}', $4, $5, $6, $7::jsonb, $8::jsonb, $9, $10::jsonb,
                    $11::jsonb, $12, $12)""",
        p["id"], p["result_id"], p["deployment_id"], p["input_topic"], p["output_topic"], p["input_format"],
        js(p["input_config"]), js(p["tiers"]), float(p["shadow_fraction"]),
        None if p["target"] is None else js(p["target"]), None if p["predicted"] is None else js(p["predicted"]), at,
    )


async def _inference_stopped(conn: asyncpg.Connection, s: str, e: Event) -> None:
    await conn.execute(f"UPDATE {s}.inferences SET status = '{InferenceStatus.STOPPED}', updated_at = $2 WHERE id = $1",
                       e.payload["id"], ts(e.payload["at"]))


async def _inference_deleted(conn: asyncpg.Connection, s: str, e: Event) -> None:
    await conn.execute(f"DELETE FROM {s}.inferences WHERE id = $1", e.payload["id"])


_HANDLERS = {
    "InferenceRequested": _inference_requested,
    "InferenceStopped": _inference_stopped,
    "InferenceDeleted": _inference_deleted,
    "TrainingLaunched": _training_launched,
    "TrainingStarted": _training_started,
    "TrainingProgressed": _training_progressed,
    "TrainingResultReported": _training_result,
    "TrainingFailed": _training_ended,
    "TrainingStopped": _training_ended,
    "ResultDeleted": _result_deleted,
    "DatasourceAnnounced": _datasource_announced,
    "ModelCreated": _model_upsert,
    "ModelUpdated": _model_upsert,
    "ModelDeleted": _model_deleted,
    "ConfigurationCreated": _configuration_upsert,
    "ConfigurationUpdated": _configuration_upsert,
    "ConfigurationDeleted": _configuration_deleted,
    "DeploymentRequested": _deployment_requested,
    "DeploymentDeleted": _deployment_deleted,
}
