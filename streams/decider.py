"""The decider agent: reads `tierflow.commands` in order and writes one event per command.

Run by the worker (streams/worker.py) while it holds the decider lock, so one decider writes
`tierflow.events` at a time. On start it checks that both topics have one partition, folds
`tierflow.events` up to the fetch high-water mark into its state, and resumes after the last command
position recorded in those events (when they name the current commands log; otherwise it reads the new log
from its start), reading the commands through a `PositionedReader` (streams/positioned.py). Decisions are
made by the pure `streams.domain.decide`; undecodable commands go to the dead-letter topic. Commands are
taken in batches: decide all, produce all, await the acknowledgements.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tierflow.streams import kafka as kio
from tierflow.streams.catalogue import reserved_topics
from tierflow.streams.catalogue import upcasters as make_upcasters
from tierflow.streams.commandlog import read_log_id
from tierflow.streams.domain import decide
from tierflow.streams.domain.state import State, apply
from tierflow.streams.envelope import CommandLogMarker, EnvelopeError, Position, decode_command, decode_event, now_iso
from tierflow.streams.health import AgentHealth
from tierflow.streams.positioned import PositionedReader, Record
from tierflow.streams.proofs import Verifier
from tierflow.streams.settings import KafkaSettings
from tierflow.streams.topics import check_single_partition

log = logging.getLogger("tierflow.decider")


async def fold_events(c: AIOKafkaConsumer, tp: TopicPartition, state: State | None = None) -> State:
    """Read the events partition from its start to the fetch high-water mark into a State."""
    ups = make_upcasters()
    state = state or State()
    await c.seek_to_beginning(tp)
    hw = await kio.fetch_highwater(c, tp)
    while await c.position(tp) < hw:
        batch = await c.getmany(tp, timeout_ms=1000, max_records=5000)
        for record in batch.get(tp, []):
            event = decode_event(record.value, ups)
            if event.seq <= state.seq:
                continue  # a duplicate written by a retried produce: already folded
            apply(state, event)
    return state


class DecidedPosition:
    """The decider's `PositionStore`: its position is the last command position its events name, so writing an
    event records it (nothing to save apart) and folding the events on start loads it."""

    def __init__(self, state_of: Callable[[], State]) -> None:
        self.state_of = state_of

    async def load(self, log_id: str) -> int | None:
        pos = self.state_of().position
        return pos.offset if pos is not None and pos.log_id == log_id else None

    async def save(self, log_id: str, offset: int) -> None:
        return None


class Decider:
    """`secret_key`: the stack's secret, from which the keys that check proofs on commands are derived
    (streams/proofs.py); without one the decider does not start (MissingSecret says how to set it)."""

    def __init__(self, kafka: KafkaSettings, *, secret_key: str = "", clock: Callable[[], str] = now_iso,
                 batch_size: int = 2000, health: AgentHealth | None = None, events_written: kio.Doorbell | None = None,
                 commands_written: kio.Doorbell | None = None) -> None:
        self.kafka = kafka
        self.secret_key = secret_key
        self.health = health or AgentHealth()
        #: rung after each batch of events is acknowledged (the worker's projector listens)
        self.events_written = events_written
        #: rung by the agents of this process that write commands (the validator, the control bridge, the
        #: orchestrator) and by the API's NOTIFY: they are read at once
        self.commands_written = commands_written
        self.clock = clock
        self.batch_size = batch_size
        self.state = State(reserved_topics=reserved_topics(kafka))
        self.log_id = ""
        self.decided = 0
        self.ready = asyncio.Event()

    async def run(self, stopping: asyncio.Event) -> None:
        proofs = Verifier.from_secret(self.secret_key)
        await check_single_partition(self.kafka)
        events_tp = TopicPartition(self.kafka.events_topic, 0)
        events_c = kio.consumer(self.kafka)
        prod = kio.producer(self.kafka)
        commands = PositionedReader(self.kafka, self.kafka.commands_topic, store=DecidedPosition(lambda: self.state),
                                    log_id=read_log_id, max_records=self.batch_size, wake=self.commands_written)
        await events_c.start()
        await prod.start()
        try:
            events_c.assign([events_tp])
            started = time.monotonic()
            self.state = await fold_events(events_c, events_tp, State(reserved_topics=reserved_topics(self.kafka),
                                                                      proofs=proofs))
            await events_c.stop()
            await commands.start()
            self.log_id = commands.log_id
            if commands.resumed_after is not None:
                where = f"offset {commands.resumed_after + 1}"
            else:
                where = "the start of a new commands log" if self.state.position is not None else "the start"
            log.info("decider ready: %d events folded in %.2f s, commands log %s, resuming at %s",
                     self.state.seq, time.monotonic() - started, self.log_id, where)
            self.ready.set()

            async def handle(records: list[Record]) -> None:
                await self.decide_batch(records, prod)

            await commands.run(stopping, handle)
        finally:
            await commands.stop()
            await events_c.stop()
            await prod.stop()

    async def decide_batch(self, records: list[Record], prod: AIOKafkaProducer) -> None:
        pending: list[asyncio.Future[Any]] = []
        for record in records:
            try:
                cmd = decode_command(record.value)
            except EnvelopeError as exc:
                await asyncio.gather(*pending)  # keep the dead letter after what precedes it
                pending.clear()
                await self._deadletter(prod, record, f"not a command: {exc}")
                continue
            if isinstance(cmd, CommandLogMarker):
                continue
            try:
                event = decide(self.state, cmd, occurred_at=self.clock(),
                               position=Position(self.log_id, record.offset))
            except Exception as exc:  # a bug in a rule: keep the command (dead letter) and keep deciding
                log.exception("deciding %s %s failed", cmd.type, cmd.command_id)
                await asyncio.gather(*pending)
                pending.clear()
                await self._deadletter(prod, record,
                                       f"the decider failed on this command: {type(exc).__name__}: {exc}")
                continue
            if event is None:
                continue
            apply(self.state, event)
            self.decided += 1
            if event.type == "CommandRejected":
                log.info("rejected %s %s: %s", cmd.type, cmd.command_id, event.payload["reason"]["message"])
            pending.append(await prod.send(self.kafka.events_topic, event.encode(), key=event.key()))
        if pending:
            await asyncio.gather(*pending)
            if self.events_written is not None:
                self.events_written.ring()

    async def _deadletter(self, prod: AIOKafkaProducer, record: Record, reason: str) -> None:
        if not await kio.send_deadletter(prod, self.kafka, record, reason, "decider"):
            self.health.deadletter_failed("decider")
