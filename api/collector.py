"""Collecting unreferenced artefacts: blobs no result names are removed once older than a grace period.

Run by the API process (`run_collector`, started by `api/state.py: background` for the app's lifetime), and
called directly by tests. It runs in the API, not the worker, because the API owns the artefact store: the
files are on the API's volume (a ReadWriteOnce claim in cluster mode, which the worker's pod does not mount),
and the API already reads the projections that say which artefacts results name.

A blob is kept while a result row names it (`projections/queries.py: referenced_artefacts`). A failed
result never names one; a deleted result or deployment stops naming its own; an upload whose workload died
before reporting was never named. Such a blob goes once it is `TIERFLOW_ARTEFACT_GRACE_S` old (its last
upload, which renames it into place, sets that time). Safe against uploads in flight: a workload reports
right after it uploads, so a fresh blob is still inside its grace period when its report is projected; a
temporary upload file is never touched before the grace period either; and the collection does nothing while
the projections are behind the events log (a freshly rebuilt or lagging projection would not name
everything yet) or stopped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import asyncpg
from aiokafka.errors import KafkaError

from tierflow.api.artefacts import Collection
from tierflow.projections import queries

if TYPE_CHECKING:
    from tierflow.api.state import AppState

log = logging.getLogger("tierflow.api.collector")


async def collect_artefacts(state: AppState, *, grace_s: float, now: float | None = None) -> Collection:
    """One collection: remove the blobs no result names, last written more than `grace_s` seconds ago."""
    if grace_s <= 0:
        return Collection(skipped="collection is off (grace period 0)")
    # The events log's end first: references read afterwards from projections at least that far are complete.
    high = await state.events_highwater()
    async with state.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        status = await queries.projector_status(conn)
        _, last_offset = await queries.projection_position(conn)
        referenced = await queries.referenced_artefacts(conn)
    if status is not None and status["state"] == "stopped":
        return Collection(skipped=f"the projector is stopped: {status['error']}")
    if last_offset + 1 < high:
        return Collection(skipped=f"the projections are {high - last_offset - 1} events behind the log")
    cutoff = (time.time() if now is None else now) - grace_s
    report = await asyncio.to_thread(state.artefacts.collect, referenced, cutoff)
    state.metrics.artefacts_collected.inc(report.removed)
    state.metrics.artefact_bytes_freed.inc(report.freed_bytes)
    return report


def interval_s(grace_s: float) -> float:
    """How often the collection runs: a quarter of the grace period, between a second and an hour."""
    return min(max(grace_s / 4, 1.0), 3600.0)


async def run_collector(state: AppState) -> None:
    """Collect every `interval_s(grace)` for the app's lifetime; nothing when the grace period is 0."""
    grace = state.settings.workloads.artefact_grace_s
    if grace <= 0:
        log.info("artefact collection is off (TIERFLOW_ARTEFACT_GRACE_S=0)")
        return
    while True:
        await asyncio.sleep(interval_s(grace))
        try:
            report = await collect_artefacts(state, grace_s=grace)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, KafkaError, OSError, TimeoutError) as exc:
            log.warning("artefact collection failed (next try in %.0f s): %s: %s", interval_s(grace),
                        type(exc).__name__, exc)
            continue
        if report.skipped:
            log.info("artefact collection skipped: %s", report.skipped)
        elif report.removed or report.abandoned_uploads:
            log.info("artefact collection: removed %d blobs (%d bytes) and %d abandoned uploads; %d unreferenced "
                     "wait for their grace period", report.removed, report.freed_bytes, report.abandoned_uploads,
                     report.waiting)
