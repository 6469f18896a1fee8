"""Postgres schema of tierflow: the rebuildable projection tables and the durable bookkeeping tables.

Called by `migrate` (at `tierflow up` and by each process that connects) and by the rebuild, which
creates the same tables in a fresh schema, replays the events into it and swaps it in.

- Schema `proj` holds everything derived from `tierflow.events` (dropping it and replaying from offset 0
  rebuilds identical rows), including the projector's tracking row, so a swap moves rows and position
  together.
- Schema `public` holds what is not derived from the events log: the event archive (the copy of the log
  that survives the embedded broker's restart), agent positions in the commands log, projector status, the
  worker's agents' health (streams/health.py).
"""

from __future__ import annotations

import logging

import asyncpg

log = logging.getLogger("tierflow.projections")

LIVE_SCHEMA = "proj"
#: Bump when the projection tables change: the projector then rebuilds them from the events log.
PROJECTION_VERSION = 7
PROJECTOR = "projector"
NOTIFY_CHANNEL = "tierflow_projected"
#: The projector's notification payload: the last sequence number applied, and `WORKLOADS_FLAG` after it when
#: the batch held an event that can change the orchestrator's plan (streams/catalogue.py: WORKLOAD_EVENTS).
WORKLOADS_FLAG = "workloads"


def notify_payload(last_seq: int, workloads: bool) -> str:
    return f"{last_seq} {WORKLOADS_FLAG}" if workloads else str(last_seq)


def concerns_workloads(payload: str) -> bool:
    """Whether a notification of the projector says its batch can change the orchestrator's plan."""
    return payload.endswith(" " + WORKLOADS_FLAG)


#: The API notifies this channel after producing a command: the worker's decider and validator, idle, then
#: read it at once instead of after their idle fetch wait (streams/kafka.py: IdleFetch).
COMMANDS_CHANNEL = "tierflow_commands"


def projection_ddl(schema: str) -> str:
    s = schema
    return f"""
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.tracking (
    consumer    text PRIMARY KEY,
    last_seq    bigint NOT NULL,
    last_offset bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}.models (
    id            integer PRIMARY KEY,
    name          text NOT NULL UNIQUE,
    description   text NOT NULL,
    imports       text NOT NULL,
    code          text NOT NULL,
    distributed   boolean NOT NULL,
    upper_id      integer,
    version       integer NOT NULL,
    input_shape   jsonb,
    output_shapes jsonb,
    params        bigint,
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS models_upper_idx ON {s}.models (upper_id);
CREATE TABLE IF NOT EXISTS {s}.model_versions (
    model_id      integer NOT NULL,
    version       integer NOT NULL,
    name          text NOT NULL,
    imports       text NOT NULL,
    code          text NOT NULL,
    distributed   boolean NOT NULL,
    upper_id      integer,
    input_shape   jsonb,
    output_shapes jsonb,
    params        bigint,
    created_at    timestamptz NOT NULL,
    PRIMARY KEY (model_id, version)
);
CREATE TABLE IF NOT EXISTS {s}.configurations (
    id          integer PRIMARY KEY,
    name        text NOT NULL,
    description text NOT NULL,
    model_ids   integer[] NOT NULL,
    version     integer NOT NULL,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}.deployments (
    id               integer PRIMARY KEY,
    configuration_id integer NOT NULL,
    batch            integer NOT NULL,
    fit_options      jsonb NOT NULL,
    eval_options     jsonb NOT NULL,
    optimizer        text NOT NULL,
    learning_rate    double precision,
    loss             text NOT NULL,
    metrics          jsonb NOT NULL,
    loss_weights     jsonb,
    seed             bigint,
    model_versions   jsonb NOT NULL,
    created_at       timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}.results (
    id            integer PRIMARY KEY,
    deployment_id integer NOT NULL,
    model_id      integer NOT NULL,
    model_version integer NOT NULL,
    status        text NOT NULL,
    chain         integer[] NOT NULL,
    workload      text,
    seed          bigint,
    samples       jsonb,
    history       jsonb NOT NULL DEFAULT '[]',
    metrics       jsonb,
    artefacts     jsonb,
    error         text,
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL,
    started_at    timestamptz,
    finished_at   timestamptz
);
CREATE INDEX IF NOT EXISTS results_deployment_idx ON {s}.results (deployment_id);
CREATE INDEX IF NOT EXISTS results_open_idx ON {s}.results (id)
    WHERE status IN ('created', 'deployed', 'training');
CREATE TABLE IF NOT EXISTS {s}.result_exits (
    result_id     integer PRIMARY KEY,
    deployment_id integer NOT NULL,
    exits         jsonb NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}.datasources (
    id              integer PRIMARY KEY,
    deployment_id   integer NOT NULL,
    ranges          jsonb NOT NULL,
    announced_ranges jsonb NOT NULL,
    range_reasons   jsonb NOT NULL DEFAULT '[]',
    input_format    text NOT NULL,
    input_config    jsonb NOT NULL,
    description     text NOT NULL,
    validation_rate double precision NOT NULL,
    test_rate       double precision NOT NULL,
    total_msg       bigint,
    origin          jsonb,
    warnings        jsonb NOT NULL DEFAULT '[]',
    created_at      timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}.inferences (
    id            integer PRIMARY KEY,
    result_id     integer NOT NULL,
    deployment_id integer NOT NULL,
    status        text NOT NULL,
    input_topic   text NOT NULL,
    output_topic  text NOT NULL,
    input_format  text NOT NULL,
    input_config  jsonb NOT NULL,
    tiers         jsonb NOT NULL,
    shadow_fraction double precision NOT NULL,
    target        jsonb,
    predicted     jsonb,
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS inferences_running_idx ON {s}.inferences (id) WHERE status = 'running';
CREATE INDEX IF NOT EXISTS datasources_deployment_idx ON {s}.datasources (deployment_id);
CREATE TABLE IF NOT EXISTS {s}.command_outcomes (
    command_id   uuid PRIMARY KEY,
    seq          bigint NOT NULL,
    command_type text,
    status       text NOT NULL,
    event_type   text NOT NULL,
    aggregate    text NOT NULL,
    reason       jsonb,
    occurred_at  timestamptz NOT NULL
);
"""


#: The tables compared by the replay tests and copied by nothing: everything derived from events.
PROJECTION_TABLES = ("models", "model_versions", "configurations", "deployments", "results", "result_exits",
                     "datasources", "inferences", "command_outcomes")

BOOKKEEPING_DDL = """
CREATE TABLE IF NOT EXISTS public.tierflow_meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);
CREATE TABLE IF NOT EXISTS public.event_archive (
    seq          bigint PRIMARY KEY,
    kafka_offset bigint NOT NULL,
    event_type   text NOT NULL,
    envelope     bytea NOT NULL
);
CREATE TABLE IF NOT EXISTS public.agent_positions (
    agent   text PRIMARY KEY,
    log_id  text NOT NULL,
    "offset" bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS public.training_queue (
    result_id  integer PRIMARY KEY,
    position   integer NOT NULL,
    note       text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS public.projector_status (
    consumer   text PRIMARY KEY,
    state      text NOT NULL,
    error      text,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS public.agent_health (
    agent               text PRIMARY KEY,
    state               text NOT NULL,
    error               text,
    restarts            integer NOT NULL DEFAULT 0,
    deadletter_failures bigint NOT NULL DEFAULT 0,
    detail              jsonb,
    updated_at          timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE public.agent_health ADD COLUMN IF NOT EXISTS detail jsonb;
"""

MIGRATION_LOCK = 7_310_001


async def migrate(database_url: str) -> None:
    """Create or upgrade the schema; safe to call from several processes at once."""
    conn = await asyncpg.connect(database_url)
    try:
        await migrate_conn(conn)
    finally:
        await conn.close()


async def migrate_conn(conn: asyncpg.Connection) -> None:
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(BOOKKEEPING_DDL)
        stored = await conn.fetchval("SELECT value FROM public.tierflow_meta WHERE key = 'projection_version'")
        if stored is not None and int(stored) != PROJECTION_VERSION:
            # The tables changed shape: drop them; the projector replays the events log into new ones.
            log.warning("projection tables are version %s, this tierflow needs %s: rebuilding from the events log",
                        stored, PROJECTION_VERSION)
            await conn.execute(f"DROP SCHEMA IF EXISTS {LIVE_SCHEMA} CASCADE")
        await conn.execute(projection_ddl(LIVE_SCHEMA))
        await conn.execute(
            "INSERT INTO public.tierflow_meta (key, value) VALUES ('projection_version', $1) "
            "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            str(PROJECTION_VERSION),
        )
