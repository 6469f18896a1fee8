"""Positions of the agents that read a topic on their own (validator, control bridge), kept in Postgres.

A position names the log it belongs to (`log_id`): after the embedded broker restarts, its topics start
again at offset 0, and a position from the old log must not be applied to the new one.
"""

from __future__ import annotations

import asyncpg


async def load_position(conn: asyncpg.Connection, agent: str, log_id: str) -> int | None:
    """The last offset `agent` handled in log `log_id`; None when it has none in that log."""
    row = await conn.fetchrow('SELECT log_id, "offset" FROM public.agent_positions WHERE agent = $1', agent)
    if row is None or row["log_id"] != log_id:
        return None
    return int(row["offset"])


async def save_position(conn: asyncpg.Connection, agent: str, log_id: str, offset: int) -> None:
    await conn.execute(
        'INSERT INTO public.agent_positions (agent, log_id, "offset") VALUES ($1, $2, $3) '
        'ON CONFLICT (agent) DO UPDATE SET log_id = EXCLUDED.log_id, "offset" = EXCLUDED."offset"',
        agent, log_id, offset,
    )
