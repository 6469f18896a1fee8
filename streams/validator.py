"""The validator agent: builds the model code of RegisterModel/UpdateModel commands in the sandbox.

Run by the worker beside the decider. It reads `tierflow.commands` on its own (its position, per commands
log, lives in Postgres `agent_positions`), builds each new piece of model code in a warm, single-use
sandbox subprocess (tiers/sandbox.py: TensorFlow is never imported here), and re-sends the command with
the verdict attached (`validation`: input shape, output shapes, parameter count, or the error) and signed
with the validator's key (streams/proofs.py), so no other writer of the commands topic can attach a verdict.
The decider decides the command when that copy arrives, so a slow build never holds other commands up.
Commands the decider already decided (e.g. rejected for a duplicate name) are not built; a command that came
with a verdict the validator did not sign is built like one without.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace

import asyncpg
from aiokafka import AIOKafkaProducer

from tierflow.streams import kafka as kio
from tierflow.streams.commandlog import read_log_id
from tierflow.streams.domain import needs_validation
from tierflow.streams.envelope import JSON, Command, EnvelopeError, decode_command
from tierflow.streams.positioned import PositionedReader, Record
from tierflow.streams.positions import AgentPositions
from tierflow.streams.proofs import VALIDATOR, Signer, Verifier
from tierflow.streams.settings import KafkaSettings

log = logging.getLogger("tierflow.validator")

AGENT = "validator"

#: validate(code, imports) -> {"ok": True, "summary": {...}} | {"ok": False, "error": "..."}
ValidateFn = Callable[[str, str], Awaitable[JSON]]


class Validator:
    """`secret_key`: the stack's secret, from which the key that signs verdicts is derived; without one the
    validator does not start (MissingSecret says how to set it)."""

    def __init__(self, kafka: KafkaSettings, database_url: str, validate: ValidateFn, *, concurrency: int = 2,
                 secret_key: str = "", commands_written: kio.Doorbell | None = None,
                 wake: kio.Doorbell | None = None) -> None:
        self.kafka = kafka
        self.secret_key = secret_key
        #: ends the idle wait of its reader of the commands topic (the worker rings it when the API sent one)
        self.wake = wake
        #: rung after each verdict is sent: the decider of this process reads it at once
        self.commands_written = commands_written
        self.database_url = database_url
        self.validate = validate
        self.concurrency = concurrency
        self.validated = 0

    async def run(self, stopping: asyncio.Event) -> None:
        signer = Signer.from_secret(self.secret_key, VALIDATOR)
        prod = kio.producer(self.kafka)
        conn = await asyncpg.connect(self.database_url)
        commands = PositionedReader(self.kafka, self.kafka.commands_topic, store=AgentPositions(conn, AGENT),
                                    log_id=read_log_id, max_records=200, wake=self.wake)
        try:
            await commands.start()
            await prod.start()
            gate = asyncio.Semaphore(self.concurrency)

            async def handle(records: list[Record]) -> None:
                await self._handle(records, conn, prod, gate, signer)

            await commands.run(stopping, handle)
        finally:
            await commands.stop()
            await prod.stop()
            await conn.close()

    async def _handle(self, records: list[Record], conn: asyncpg.Connection, prod: AIOKafkaProducer,
                      gate: asyncio.Semaphore, signer: Signer) -> None:
        mine = Verifier({signer.name: signer.key})  # its own proofs: a copy it sent is never built again
        todo: list[Command] = []
        for record in records:
            try:
                cmd = decode_command(record.value)
            except EnvelopeError:
                continue  # the decider dead-letters it
            if isinstance(cmd, Command) and needs_validation(cmd, mine):
                todo.append(cmd)
        if not todo:
            return
        decided = {
            str(r["command_id"])
            for r in await conn.fetch("SELECT command_id FROM proj.command_outcomes WHERE command_id = ANY($1::uuid[])",
                                      [c.command_id for c in todo])
        }
        todo = [c for c in todo if c.command_id not in decided]

        async def one(cmd: Command) -> None:
            async with gate:
                verdict = await self.validate(str(cmd.payload["code"]), str(cmd.payload.get("imports") or ""))
            self.validated += 1
            if verdict.get("ok"):
                log.info("%s %s: code builds (%s params)", cmd.type, cmd.command_id, verdict["summary"].get("params"))
            else:
                log.info("%s %s: code rejected: %s", cmd.type, cmd.command_id, verdict.get("error"))
            twin = signer.sign(replace(cmd, validation=verdict, source=f"{cmd.source}+validator"))
            await prod.send_and_wait(self.kafka.commands_topic, twin.encode(), key=twin.key())
            if self.commands_written is not None:
                self.commands_written.ring()

        await asyncio.gather(*(one(cmd) for cmd in todo))

