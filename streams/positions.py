"""Positions of the agents that keep theirs in Postgres (validator, control bridge): the `PositionStore` they
give their `PositionedReader` (streams/positioned.py).

A position names the log it belongs to (`log_id`): after the embedded broker restarts, its topics start
again at offset 0, and a position from the old log must not be applied to the new one.
"""

from __future__ import annotations

import asyncpg


class AgentPositions:
    """One agent's row in `public.agent_positions`: the log it reads and the last offset it handled there."""

    def __init__(self, conn: asyncpg.Connection, agent: str) -> None:
        self.conn = conn
        self.agent = agent

    async def load(self, log_id: str) -> int | None:
        """The last offset the agent handled in log `log_id`; None when it has none in that log."""
        row = await self.conn.fetchrow('SELECT log_id, "offset" FROM public.agent_positions WHERE agent = $1',
                                       self.agent)
        if row is None or row["log_id"] != log_id:
            return None
        return int(row["offset"])

    async def save(self, log_id: str, offset: int) -> None:
        await self.conn.execute(
            'INSERT INTO public.agent_positions (agent, log_id, "offset") VALUES ($1, $2, $3) '
            'ON CONFLICT (agent) DO UPDATE SET log_id = EXCLUDED.log_id, "offset" = EXCLUDED."offset"',
            self.agent, log_id, offset,
        )
