"""A small Python helper for emitting commands straight to `tierflow.commands` (a supported interface).

For scripts, jobs and services that talk Kafka rather than HTTP. The outcome of every command shows up
as an event on `tierflow.events` (the accepted event, or CommandRejected with the same command_id) and
in the API (`GET /commands/{command_id}`). See docs/commands.md for the envelope and payload schemas.

    client = CommandClient(Settings.from_env().kafka)
    await client.start()
    command_id = await client.send("CreateConfiguration", {"name": "c1", "model_ids": [3]})
    outcome = await client.wait(command_id)      # reads tierflow.events
    await client.stop()

A component of the stack that sends commands only it may send (the orchestrator's reports) passes its
`signer` (streams/proofs.py): every command the client sends then carries its proof.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tierflow.streams import kafka as kio
from tierflow.streams.catalogue import upcasters as make_upcasters
from tierflow.streams.envelope import JSON, Command, Event, decode_event, new_command_id
from tierflow.streams.proofs import Signer
from tierflow.streams.settings import KafkaSettings


class CommandClient:
    def __init__(self, kafka: KafkaSettings, *, source: str = "client", signer: Signer | None = None) -> None:
        self.kafka = kafka
        self.source = source
        self.signer = signer
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        self._producer = kio.producer(self.kafka)
        await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def __aenter__(self) -> CommandClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def build(self, command_type: str, payload: JSON, command_id: str | None = None) -> Command:
        return Command(command_id=command_id or new_command_id(), type=command_type, payload=payload,
                       source=self.source)

    async def send(self, command_type: str, payload: JSON, command_id: str | None = None) -> str:
        """Produce one command and wait for the broker's acknowledgement; returns its command_id."""
        cmd = self.build(command_type, payload, command_id)
        await self.send_command(cmd)
        return cmd.command_id

    def _signed(self, cmd: Command) -> Command:
        return cmd if self.signer is None else self.signer.sign(cmd)

    async def send_command(self, cmd: Command) -> None:
        if self._producer is None:
            raise RuntimeError("CommandClient.start() was not called")
        cmd = self._signed(cmd)
        await self._producer.send_and_wait(self.kafka.commands_topic, cmd.encode(), key=cmd.key())

    async def send_many(self, commands: list[Command]) -> None:
        """Produce many commands, awaiting all acknowledgements at the end (fast path for bulk loads)."""
        if self._producer is None:
            raise RuntimeError("CommandClient.start() was not called")
        futures: list[asyncio.Future[Any]] = []
        for cmd in map(self._signed, commands):
            futures.append(await self._producer.send(self.kafka.commands_topic, cmd.encode(), key=cmd.key()))
        await asyncio.gather(*futures)

    async def wait(self, command_id: str, *, timeout: float = 30.0, from_offset: int = 0) -> Event:
        """Read tierflow.events until the event of `command_id` appears; its type says accepted or rejected."""
        ups = make_upcasters()
        tp = TopicPartition(self.kafka.events_topic, 0)
        c: AIOKafkaConsumer = kio.consumer(self.kafka)
        await c.start()
        try:
            c.assign([tp])
            c.seek(tp, from_offset)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while loop.time() < deadline:
                batch = await c.getmany(tp, timeout_ms=200, max_records=5000)
                for record in batch.get(tp, []):
                    event = decode_event(record.value, ups)
                    if event.command_id == command_id:
                        return event
            raise TimeoutError(f"no outcome for command {command_id} within {timeout} s")
        finally:
            await c.stop()
