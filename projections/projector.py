"""Apply a batch of events to a projection schema in one transaction, together with the tracking row.

Called by the projector agent (streams/projector.py) for the live schema, which also archives the events
and notifies waiting API requests, and by the rebuild for a fresh schema. The tracking row is locked
(`FOR UPDATE`) and events at or below its `last_seq` are skipped, so a redelivered batch, a second
projector, or a concurrent rebuild never applies an event twice.
"""

from __future__ import annotations

import asyncpg

from tierflow.projections.apply import ProjectionError, apply_event
from tierflow.projections.schema import NOTIFY_CHANNEL, PROJECTOR, notify_payload
from tierflow.streams.catalogue import WORKLOAD_EVENTS
from tierflow.streams.envelope import Event

SWAP_LOCK = 7_310_002


async def last_applied(conn: asyncpg.Connection, schema: str, consumer: str = PROJECTOR) -> tuple[int, int]:
    """(last_seq, last_offset) of the schema's tracking row; (0, -1) when nothing was applied."""
    row = await conn.fetchrow(f"SELECT last_seq, last_offset FROM {schema}.tracking WHERE consumer = $1", consumer)
    return (0, -1) if row is None else (int(row["last_seq"]), int(row["last_offset"]))


async def apply_batch(conn: asyncpg.Connection, schema: str, batch: list[tuple[int, bytes, Event]], *,
                      archive: bool, notify: bool, consumer: str = PROJECTOR) -> tuple[int, int]:
    """Apply (offset, raw, event) triples in order; returns the tracking row after the batch.

    Raises ProjectionError on a gap in `seq` or an event that cannot be applied (nothing is committed).
    """
    async with conn.transaction():
        # Shared lock: a rebuild's swap takes it exclusively, so no batch straddles a swap.
        await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", SWAP_LOCK)
        await conn.execute(
            f"INSERT INTO {schema}.tracking (consumer, last_seq, last_offset) VALUES ($1, 0, -1) "
            "ON CONFLICT (consumer) DO NOTHING",
            consumer,
        )
        row = await conn.fetchrow(
            f"SELECT last_seq, last_offset FROM {schema}.tracking WHERE consumer = $1 FOR UPDATE", consumer
        )
        assert row is not None
        last_seq, last_offset = int(row["last_seq"]), int(row["last_offset"])
        applied: list[tuple[int, bytes, Event]] = []
        for offset, raw, event in batch:
            if event.seq <= last_seq:
                continue  # already applied (redelivery, or a duplicate written by a retried produce)
            if event.seq != last_seq + 1:
                raise ProjectionError(
                    f"events log has a gap: expected seq {last_seq + 1} after offset {last_offset}, "
                    f"found seq {event.seq} at offset {offset}"
                )
            await apply_event(conn, schema, event)
            applied.append((offset, raw, event))
            last_seq, last_offset = event.seq, offset
        if applied:
            await conn.execute(
                f"UPDATE {schema}.tracking SET last_seq = $2, last_offset = $3 WHERE consumer = $1",
                consumer, last_seq, last_offset,
            )
            if archive:
                await conn.executemany(
                    "INSERT INTO public.event_archive (seq, kafka_offset, event_type, envelope) "
                    "VALUES ($1, $2, $3, $4) ON CONFLICT (seq) DO NOTHING",
                    [(e.seq, off, e.type, raw) for off, raw, e in applied],
                )
            if notify:
                workloads = any(e.type in WORKLOAD_EVENTS for _, _, e in applied)
                await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, notify_payload(last_seq, workloads))
        return last_seq, last_offset
