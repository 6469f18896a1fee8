"""The projector agent: applies `tierflow.events` to the Postgres projections, exactly once in effect.

Run by the worker. Its position is the tracking row of the live projection schema (not a consumer-group
offset): each batch is applied, archived (`public.event_archive`, restored into a fresh embedded broker
by `streams.archive`) and tracked in one transaction, then waiting API requests are notified. An event
it cannot apply is a bug, not bad input: the projector stops on it, records why in
`public.projector_status` (which `/readyz` reports) and never skips it.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg
from aiokafka import TopicPartition

from tierflow.projections.apply import ProjectionError
from tierflow.projections.projector import apply_batch, last_applied
from tierflow.projections.schema import LIVE_SCHEMA, PROJECTOR, migrate_conn
from tierflow.streams import kafka as kio
from tierflow.streams.catalogue import upcasters as make_upcasters
from tierflow.streams.envelope import EnvelopeError, Event, decode_event
from tierflow.streams.settings import KafkaSettings

log = logging.getLogger("tierflow.projector")


async def set_status(conn: asyncpg.Connection, state: str, error: str | None) -> None:
    await conn.execute(
        "INSERT INTO public.projector_status (consumer, state, error, updated_at) VALUES ($1, $2, $3, now()) "
        "ON CONFLICT (consumer) DO UPDATE SET state = EXCLUDED.state, error = EXCLUDED.error, updated_at = now()",
        PROJECTOR, state, error,
    )


class Projector:
    def __init__(self, kafka: KafkaSettings, database_url: str, *, batch_size: int = 5000,
                 wake: kio.Doorbell | None = None) -> None:
        self.kafka = kafka
        #: rung by the decider of this process when it wrote events: the projector's idle wait ends at once
        self.wake = wake
        self.database_url = database_url
        self.batch_size = batch_size
        self.last_seq = 0
        self.failed: str | None = None
        self.caught_up = asyncio.Event()

    async def run(self, stopping: asyncio.Event, drain: asyncio.Event | None = None) -> None:
        """Project until `stopping`; when `drain` is set, stop once caught up with the log's high-water mark."""
        ups = make_upcasters()
        tp = TopicPartition(self.kafka.events_topic, 0)
        conn = await asyncpg.connect(self.database_url)
        c = kio.consumer(self.kafka, max_poll_records=self.batch_size)
        await c.start()
        try:
            await migrate_conn(conn)
            await set_status(conn, "running", None)
            self.last_seq, last_offset = await last_applied(conn, LIVE_SCHEMA)
            c.assign([tp])
            c.seek(tp, last_offset + 1)
            log.info("projector resuming after seq %d (offset %d)", self.last_seq, last_offset)
            fetch = kio.IdleFetch(c, tp, self.kafka, wake=None if self.wake is None else self.wake.listener())
            while not stopping.is_set():
                records = await fetch.next(self.batch_size, stopping)
                if not records:
                    hw = c.highwater(tp)
                    if hw is not None and await c.position(tp) >= hw:
                        self.caught_up.set()
                        if drain is not None and drain.is_set():
                            return
                    continue
                decoded: list[tuple[int, bytes, Event]] = []
                try:
                    for r in records:
                        decoded.append((r.offset, r.value, decode_event(r.value, ups)))
                    self.last_seq, _ = await apply_batch(conn, LIVE_SCHEMA, decoded, archive=True, notify=True)
                except (ProjectionError, EnvelopeError) as exc:
                    self.failed = str(exc)
                    log.error("projector stopped: %s", exc)
                    await set_status(conn, "stopped", str(exc))
                    # Halted, never skipping the event; readiness reports why. A drain (the worker stopping) has
                    # nothing to wait for here: it ends the wait too, instead of the worker's drain deadline.
                    await kio.first_of(*(e for e in (stopping, drain) if e is not None))
                    return
        finally:
            await c.stop()
            await conn.close()
