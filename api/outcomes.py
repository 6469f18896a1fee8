"""Waiting for a command's outcome: the API's write path parks a request here until it is projected.

Opened by the app factory (api/app.py). One Postgres connection LISTENs on the projector's channel;
on each notification the outcomes of all pending command ids are fetched in one query and the waiting
requests resumed. A request registers before its command is produced, so no notification is missed.

The listening connection is kept alive: when it ends (Postgres restarted, the backend terminated, the
network dropped it: a periodic ping finds a silently dead one), it is reopened with backoff, and the pending
ids are checked once it is back, since notifications sent in between are lost. Without that, one Postgres
restart made every later write answer 202 after the command timeout although its command was decided.

After producing a command the write path rings the worker (`command_sent`: a NOTIFY on the commands channel),
whose idle readers of the commands topic then fetch at once instead of after their idle wait; a lost ring
costs only that wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import asyncpg

from tierflow.projections import queries
from tierflow.projections.schema import COMMANDS_CHANNEL, NOTIFY_CHANNEL

log = logging.getLogger("tierflow.api.outcomes")

JSON = dict[str, Any]

#: How the API's connections show in `pg_stat_activity` (the pool's is set by the app factory).
APPLICATION_NAME = "tierflow-api-outcomes"
#: Errors that mean "Postgres is not reachable right now": a terminated connection raises an InterfaceError,
#: and a pooled connection caught mid-protocol by a restart an InternalClientError.
DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError, TimeoutError)


class OutcomeWaiter:
    def __init__(self, pool: asyncpg.Pool, *, ping_s: float = 10.0, retry_s: float = 0.25,
                 max_retry_s: float = 5.0) -> None:
        self.pool = pool
        self.ping_s = ping_s
        self.retry_s = retry_s
        self.max_retry_s = max_retry_s
        self._url = ""
        self._pending: dict[str, asyncio.Future[JSON]] = {}
        self._listen: asyncpg.Connection | None = None
        self._wake = asyncio.Event()
        self._lost = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._ringing: asyncio.Task[None] | None = None
        self._ring_again = False
        #: times the listening connection was reopened (shown in logs; read by tests)
        self.reconnects = 0
        #: rings of the worker sent (one per command, or fewer when commands come faster than a round trip)
        self.rings = 0

    async def start(self, database_url: str) -> None:
        self._url = database_url
        await self._connect()  # the first connection must work: the API does not start without its database
        self._tasks = [asyncio.create_task(self._dispatch()), asyncio.create_task(self._keep_listening())]

    async def stop(self) -> None:
        if self._ringing is not None:
            self._tasks.append(self._ringing)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._close_listener()
        for fut in self._pending.values():
            fut.cancel()

    # --- the listening connection ------------------------------------------------------------------------

    async def _connect(self) -> None:
        conn = await asyncpg.connect(self._url, server_settings={"application_name": APPLICATION_NAME})
        try:
            await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
        except BaseException:
            await conn.close()
            raise
        conn.add_termination_listener(self._on_terminated)
        self._listen = conn
        self._lost.clear()

    def _on_terminated(self, conn: object) -> None:
        if conn is self._listen:
            self._lost.set()

    async def _close_listener(self) -> None:
        conn, self._listen = self._listen, None
        if conn is not None:
            conn.remove_termination_listener(self._on_terminated)
            with contextlib.suppress(*DB_ERRORS):
                await asyncio.wait_for(conn.close(), 5)

    async def _alive(self) -> bool:
        """Whether the listening connection still answers (a half-open TCP connection never reports its end)."""
        conn = self._listen
        if conn is None or conn.is_closed():
            return False
        try:
            await asyncio.wait_for(conn.execute("SELECT 1"), self.ping_s)
        except DB_ERRORS:
            return False
        return True

    async def _keep_listening(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), self.ping_s)
            if not self._lost.is_set() and await self._alive():
                continue
            log.warning("the outcome listener lost its Postgres connection; reconnecting")
            await self._close_listener()
            delay = self.retry_s
            while True:
                try:
                    await self._connect()
                    break
                except DB_ERRORS as exc:
                    log.warning("the outcome listener cannot reconnect yet (retrying in %.1f s): %s", delay, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.max_retry_s)
            self.reconnects += 1
            log.info("the outcome listener is listening again (reconnect %d)", self.reconnects)
            self._wake.set()  # notifications sent while it was away are lost: check every pending id now

    # --- ringing the worker ----------------------------------------------------------------------------------

    def command_sent(self) -> None:
        """Tell the worker that a command is on the commands topic. At most one NOTIFY is in flight: commands
        sent meanwhile are covered by one more after it (the worker then reads all of them)."""
        if self._ringing is not None and not self._ringing.done():
            self._ring_again = True
            return
        self._ringing = asyncio.create_task(self._ring())

    async def _ring(self) -> None:
        while True:
            self._ring_again = False
            try:
                await self.pool.execute("SELECT pg_notify($1, '')", COMMANDS_CHANNEL)
                self.rings += 1
            except DB_ERRORS as exc:  # the worker reads the command after its idle wait anyway
                log.debug("could not ring the worker: %s: %s", type(exc).__name__, exc)
            if not self._ring_again:
                return

    # --- waiting requests --------------------------------------------------------------------------------

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
        delay = self.retry_s
        while True:
            await self._wake.wait()
            self._wake.clear()
            ids = [cid for cid, fut in self._pending.items() if not fut.done()]
            if not ids:
                continue
            try:
                async with self.pool.acquire() as conn:
                    found = await queries.get_outcomes(conn, ids)
            except Exception as exc:  # this loop must outlive any failed read, or every later write hangs
                # No notification may come to retry this (the projector wrote while the read failed): retry
                # on a timer while requests wait, with backoff. Nothing is lost: the ids stay pending.
                log.warning("could not read command outcomes (retrying in %.1f s): %s: %s", delay,
                            type(exc).__name__, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_retry_s)
                self._wake.set()
                continue
            delay = self.retry_s
            for outcome in found:
                fut = self._pending.get(outcome["command_id"])
                if fut is not None and not fut.done():
                    fut.set_result(outcome)
