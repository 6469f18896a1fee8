"""Waiting for a command's outcome: the API's write path parks a request here until it is projected.

Opened by the app factory (api/app.py). One Postgres connection LISTENs on the projector's channel;
on each notification the outcomes of all pending command ids are fetched in one query and the waiting
requests resumed. A request registers before its command is produced, so no notification is missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import asyncpg

from tierflow.projections import queries
from tierflow.projections.schema import NOTIFY_CHANNEL

log = logging.getLogger("tierflow.api.outcomes")

JSON = dict[str, Any]


class OutcomeWaiter:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._pending: dict[str, asyncio.Future[JSON]] = {}
        self._listen: asyncpg.Connection | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, database_url: str) -> None:
        self._listen = await asyncpg.connect(database_url)
        await self._listen.add_listener(NOTIFY_CHANNEL, self._on_notify)
        self._task = asyncio.create_task(self._dispatch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._listen is not None:
            await self._listen.close()
        for fut in self._pending.values():
            fut.cancel()

    def _on_notify(self, conn: object, pid: int, channel: str, payload: str) -> None:
        self._wake.set()

    def register(self, command_id: str) -> asyncio.Future[JSON]:
        fut: asyncio.Future[JSON] = asyncio.get_running_loop().create_future()
        self._pending[command_id] = fut
        return fut

    def forget(self, command_id: str) -> None:
        self._pending.pop(command_id, None)

    async def wait(self, command_id: str, fut: asyncio.Future[JSON], timeout: float) -> JSON | None:
        """The outcome, or None if it is not known within `timeout` seconds."""
        self._wake.set()  # check once right away (the outcome may already be there)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            return None
        finally:
            self.forget(command_id)

    async def _dispatch(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            ids = [cid for cid, fut in self._pending.items() if not fut.done()]
            if not ids:
                continue
            try:
                async with self.pool.acquire() as conn:
                    found = await queries.get_outcomes(conn, ids)
            except (asyncpg.PostgresError, OSError) as exc:
                log.warning("could not read command outcomes (will retry on the next notification): %s", exc)
                continue
            for outcome in found:
                fut = self._pending.get(outcome["command_id"])
                if fut is not None and not fut.done():
                    fut.set_result(outcome)
