"""Restore the archived events into a fresh broker before any agent starts.

Called by `tierflow up` (deploy/stack.py) after the topics exist and the schema is migrated, and again
after the embedded broker restarted. The projector archives every event it applies in
`public.event_archive`; the embedded broker keeps its log in memory, so after a restart the events topic
is empty (or, after a restore that was cut short, partial) and this writes the missing events back, in
order. When the broker gives them other offsets than before, the archive and the projector's tracking row
are moved to the new offsets in one transaction, so the projector resumes at the right record.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg
from aiokafka import TopicPartition

from tierflow.projections.schema import LIVE_SCHEMA, PROJECTOR
from tierflow.streams import kafka as kio
from tierflow.streams.catalogue import upcasters as make_upcasters
from tierflow.streams.envelope import decode_event
from tierflow.streams.settings import Settings

log = logging.getLogger("tierflow.archive")


async def last_seq_on_broker(settings: Settings) -> tuple[int, int]:
    """(seq of the last event on the broker, high-water mark); (0, 0) for an empty topic."""
    tp = TopicPartition(settings.kafka.events_topic, 0)
    c = kio.consumer(settings.kafka)
    await c.start()
    try:
        c.assign([tp])
        await c.seek_to_beginning(tp)
        hw = await kio.fetch_highwater(c, tp)
        if hw == 0:
            return 0, 0
        c.seek(tp, hw - 1)
        batch = await c.getmany(tp, timeout_ms=5000, max_records=1)
        records = batch.get(tp, [])
        if not records:
            raise RuntimeError(f"could not read the last event at offset {hw - 1}")
        return decode_event(records[-1].value, make_upcasters()).seq, hw
    finally:
        await c.stop()


async def restore_events(settings: Settings) -> int:
    """Write archived events the broker lacks back into the events topic; returns how many."""
    on_broker, _ = await last_seq_on_broker(settings)
    conn = await asyncpg.connect(settings.database.url)
    try:
        rows = await conn.fetch(
            "SELECT seq, kafka_offset, envelope FROM public.event_archive WHERE seq > $1 ORDER BY seq", on_broker
        )
        if not rows:
            return 0
        expected = on_broker + 1
        if int(rows[0]["seq"]) != expected:
            raise RuntimeError(f"the event archive starts at seq {rows[0]['seq']} but the broker ends at "
                               f"seq {on_broker}: events are missing, restore cannot continue")
        p = kio.producer(settings.kafka)
        await p.start()
        try:
            futures: list[asyncio.Future[Any]] = []
            for row in rows:
                futures.append(await p.send(settings.kafka.events_topic, bytes(row["envelope"])))
            metas = await asyncio.gather(*futures)
        finally:
            await p.stop()
        moved = [(int(row["seq"]), int(meta.offset)) for row, meta in zip(rows, metas, strict=True)
                 if int(meta.offset) != int(row["kafka_offset"])]
        if moved:
            async with conn.transaction():
                await conn.executemany("UPDATE public.event_archive SET kafka_offset = $2 WHERE seq = $1", moved)
                await conn.execute(
                    f"UPDATE {LIVE_SCHEMA}.tracking t SET last_offset = a.kafka_offset FROM public.event_archive a "
                    "WHERE t.consumer = $1 AND a.seq = t.last_seq",
                    PROJECTOR,
                )
            log.info("restored events got new offsets; archive and projector tracking moved (%d events)", len(moved))
        log.info("restored %d events (seq %d..%d) into %s", len(rows), rows[0]["seq"], rows[-1]["seq"],
                 settings.kafka.events_topic)
        return len(rows)
    finally:
        await conn.close()
