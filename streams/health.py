"""The health of the worker's agents as `/readyz` reports it: state, last error, restarts, dead letters lost.

The worker (streams/worker.py) keeps one `AgentHealth` for its agents. Its supervisor marks an agent `running`
once it has run `HEALTHY_AFTER_S` without failing, `failing` (with the error) when it raised and waits to be
restarted, `stopped` when the worker stopped it; the agents that dead-letter count the dead letters they could
not send (`deadletter_failed`). `publish` writes every agent's row to Postgres (`public.agent_health`) at each
change and every `HEARTBEAT_S`, so a row older than `STALE_S` means the worker no longer reports (stopped,
killed, or stuck). A row also carries what its agent says about itself (`detail`, from the `details` function
the worker gives: the validator's sandbox isolation in force, which `/readyz` and the UI show). The API's
`/readyz` and `/metrics` read the rows (projections/queries.py: `agent_health`).
Nothing here waits on Postgres inside an agent: the agents only change the in-memory record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

log = logging.getLogger("tierflow.health")

#: How often the worker rewrites its agents' rows even when nothing changed.
HEARTBEAT_S = 5.0
#: A row older than this: the worker stopped reporting (readiness fails, naming it).
STALE_S = 30.0
#: An agent that has run this long since its (re)start without raising counts as running again.
HEALTHY_AFTER_S = 3.0

STARTING = "starting"
RUNNING = "running"
FAILING = "failing"
STOPPED = "stopped"
#: The states in which an agent does its work (or is about to).
HEALTHY = frozenset({STARTING, RUNNING})
#: Longest error text kept (a traceback's last line is what an operator needs).
ERROR_MAX = 2000


@dataclass
class AgentRecord:
    state: str = STARTING
    error: str | None = None
    restarts: int = 0
    deadletter_failures: int = 0


#: What agents say about themselves, by agent name (a JSON object each), read at every write.
Details = Callable[[], Mapping[str, Mapping[str, Any]]]


class AgentHealth:
    """The worker's agents, by name, and the task that publishes them to Postgres. `details`: what each agent
    says about itself (evaluated at every write, so a change shows within `HEARTBEAT_S`)."""

    def __init__(self, details: Details | None = None) -> None:
        self.agents: dict[str, AgentRecord] = {}
        self.details = details
        self._changed = asyncio.Event()

    def _set(self, agent: str, state: str, error: str | None = None) -> AgentRecord:
        record = self.agents.setdefault(agent, AgentRecord())
        record.state = state
        record.error = None if error is None else error[:ERROR_MAX]
        self._changed.set()
        return record

    def starting(self, agent: str) -> None:
        """A (re)start: a first start is `starting`; a restart stays `failing` with its error until it has run
        `HEALTHY_AFTER_S` (so a crash loop never looks healthy between two crashes)."""
        record = self.agents.get(agent)
        if record is None or record.state != FAILING:
            self._set(agent, STARTING)

    def running(self, agent: str) -> None:
        self._set(agent, RUNNING)

    def failed(self, agent: str, error: str, retry_in_s: float) -> None:
        record = self._set(agent, FAILING, f"{error} (restarting in {retry_in_s:.1f} s)")
        record.restarts += 1

    def stopped(self, agent: str) -> None:
        self._set(agent, STOPPED)

    def deadletter_failed(self, agent: str) -> None:
        """A dead letter the agent could not send (logged and skipped by `kafka.send_deadletter`)."""
        self.agents.setdefault(agent, AgentRecord()).deadletter_failures += 1
        self._changed.set()

    async def publish(self, database_url: str, stopping: asyncio.Event) -> None:
        """Write the rows at each change and every `HEARTBEAT_S` until `stopping`, then once more (the last
        states, e.g. `stopped`). Postgres being away is logged and retried: health never stops an agent."""
        conn: asyncpg.Connection | None = None
        try:
            while True:
                self._changed.clear()
                conn = await self._write(conn, database_url)
                if stopping.is_set():
                    return
                changed = asyncio.ensure_future(self._changed.wait())
                stop = asyncio.ensure_future(stopping.wait())
                await asyncio.wait({changed, stop}, timeout=HEARTBEAT_S, return_when=asyncio.FIRST_COMPLETED)
                for f in (changed, stop):
                    f.cancel()
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()

    def _details(self) -> Mapping[str, Mapping[str, Any]]:
        if self.details is None:
            return {}
        try:
            return self.details()
        except Exception:  # what an agent says about itself never stops its health from being reported
            log.exception("could not read the agents' details")
            return {}

    async def _write(self, conn: asyncpg.Connection | None, database_url: str) -> asyncpg.Connection | None:
        details = self._details()
        rows = [(name, r.state, r.error, r.restarts, r.deadletter_failures,
                 orjson.dumps(details[name]).decode() if name in details else None)
                for name, r in self.agents.items()]
        try:
            if conn is None or conn.is_closed():
                conn = await asyncpg.connect(database_url)
            await conn.executemany(
                "INSERT INTO public.agent_health (agent, state, error, restarts, deadletter_failures, detail, "
                "updated_at) VALUES ($1, $2, $3, $4, $5, $6::jsonb, now()) ON CONFLICT (agent) DO UPDATE SET "
                "state = EXCLUDED.state, error = EXCLUDED.error, restarts = EXCLUDED.restarts, "
                "deadletter_failures = EXCLUDED.deadletter_failures, detail = EXCLUDED.detail, updated_at = now()",
                rows)
            return conn
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("could not record the agents' health in Postgres (%s: %s); retrying", type(exc).__name__,
                        exc)
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
            return None
