"""`tierflow projections rebuild`: replay `tierflow.events` from offset 0 into fresh tables and swap them in.

Called from the CLI (and the tests). The replay fills a separate schema while the live projector keeps
serving; the last stretch up to the high-water mark and the swap happen under the exclusive swap lock
(the projector's batches take it shared), so readers see either the old tables or the complete new ones,
never a half-built state. The tracking row moves with the tables, so the live projector just continues.
"""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition

from tierflow.projections.projector import SWAP_LOCK, apply_batch
from tierflow.projections.schema import LIVE_SCHEMA, migrate_conn, projection_ddl
from tierflow.streams import kafka as kio
from tierflow.streams.catalogue import upcasters as make_upcasters
from tierflow.streams.envelope import Event, decode_event
from tierflow.streams.settings import Settings

log = logging.getLogger("tierflow.rebuild")

NEW_SCHEMA = "proj_rebuild"
OLD_SCHEMA = "proj_retired"


async def _replay_to_highwater(c: AIOKafkaConsumer, tp: TopicPartition, conn: asyncpg.Connection,
                               schema: str) -> int:
    ups = make_upcasters()
    hw = await kio.fetch_highwater(c, tp)
    replayed = 0
    while await c.position(tp) < hw:
        batch = await c.getmany(tp, timeout_ms=1000, max_records=5000)
        records = batch.get(tp, [])
        decoded: list[tuple[int, bytes, Event]] = [(r.offset, r.value, decode_event(r.value, ups)) for r in records]
        if decoded:
            await apply_batch(conn, schema, decoded, archive=False, notify=False)
            replayed += len(decoded)
    return replayed


async def rebuild(settings: Settings) -> int:
    """Rebuild the projections from the events log; returns the number of events replayed."""
    started = time.monotonic()
    conn = await asyncpg.connect(settings.database.url)
    tp = TopicPartition(settings.kafka.events_topic, 0)
    c = kio.consumer(settings.kafka)
    await c.start()
    try:
        await migrate_conn(conn)
        await conn.execute(f"DROP SCHEMA IF EXISTS {NEW_SCHEMA} CASCADE")
        await conn.execute(projection_ddl(NEW_SCHEMA))
        c.assign([tp])
        await c.seek_to_beginning(tp)
        replayed = await _replay_to_highwater(c, tp, conn, NEW_SCHEMA)
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", SWAP_LOCK)
            replayed += await _replay_to_highwater(c, tp, conn, NEW_SCHEMA)
            await conn.execute(f"DROP SCHEMA IF EXISTS {OLD_SCHEMA} CASCADE")
            await conn.execute(f"ALTER SCHEMA {LIVE_SCHEMA} RENAME TO {OLD_SCHEMA}")
            await conn.execute(f"ALTER SCHEMA {NEW_SCHEMA} RENAME TO {LIVE_SCHEMA}")
            await conn.execute(f"DROP SCHEMA {OLD_SCHEMA} CASCADE")
        log.info("rebuilt projections from %d events in %.2f s", replayed, time.monotonic() - started)
        return replayed
    finally:
        await c.stop()
        await conn.close()


def run_rebuild(settings: Settings) -> int:
    from tierflow.streams.stack_state import with_stack_endpoints

    resolved = with_stack_endpoints(settings)
    if resolved is None:
        print("tierflow: no KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL and no running embedded stack")
        return 2
    settings = resolved
    n = asyncio.run(rebuild(settings))
    print(f"rebuilt the projections from {n} events")
    return 0
