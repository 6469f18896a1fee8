"""Attack: one record that an agent cannot get past.

An agent dead-letters what it cannot decode, with the record's bytes in the letter. JSON escapes a NUL byte as
`\\u0000` (six bytes), so a 1.5 MB record of NULs makes a 9 MB dead letter, over the producer's 8 MB request
limit: the send failed, the failure was fatal, and the agent restarted at the same offset, forever (the decider
on the commands topic, a tier on its input topic, the control bridge on the control topic). A tier also crashed
on a tensor header it could not decode that was not a `WireError` (a header without a value). And a command
that decodes but whose event would be too large to write (a 5 MB `type`, echoed twice by the rejection) made the
decider fail on writing it, forever.

Defence: dead letters are bounded (streams/kafka.py: the value truncated, with its size and sha256, when the
letter would exceed `DEADLETTER_MAX_BYTES`); a dead letter that cannot be sent is logged, counted and skipped;
every decode failure of a tier is a dead letter with its reason (streams/wire.py); the decider's rejections
are bounded and an event too large to write becomes a rejection (streams/domain). Each test sends the poison,
then a valid record, and checks the valid one is handled within seconds and the poison is in the dead letters.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from typing import Any

import asyncpg
import numpy as np
import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import MessageSizeTooLargeError

from tests.conftest import Infra, deploy_single_model, start_plane, stop_plane, topic_records, wait_until
from tests.integration.test_replay import shape_validate
from tierflow.streams import kafka as kio
from tierflow.streams.client import CommandClient
from tierflow.streams.envelope import new_command_id
from tierflow.streams.settings import KafkaSettings, Settings
from tierflow.streams.topics import TopicSpec, ensure_topics

POISON = b"\0" * 1_500_000
#: How long the valid record after the poison may take (the decider and the tier answer in milliseconds).
WITHIN_S = 10.0


async def produce(kafka: KafkaSettings, topic: str, value: bytes, key: bytes | None = None,
                  headers: list[tuple[str, bytes | None]] | None = None) -> int:
    p = kio.producer(kafka)
    await p.start()
    try:
        meta = await p.send_and_wait(topic, value, key=key, headers=headers)
        return int(meta.offset)
    finally:
        await p.stop()


async def dead_letters(kafka: KafkaSettings, origin_topic: str) -> list[tuple[int, dict[str, Any]]]:
    """(size, parsed) of every dead letter from `origin_topic`."""
    letters = [(len(r.value), orjson.loads(r.value)) for r in await topic_records(kafka, kafka.deadletter_topic)]
    return [(size, letter) for size, letter in letters if letter["origin"]["topic"] == origin_topic]


async def data_topic(plane: Settings) -> str:
    """A data topic of the plane with 10 records: what a valid announcement names (the control bridge checks
    the announced ranges on the broker, and dead-letters one naming a topic that does not exist)."""
    data = f"{plane.kafka.topic_prefix}.data"
    await ensure_topics(plane.kafka, extra=[TopicSpec(data, 1, -1)])
    for i in range(10):
        await produce(plane.kafka, data, bytes([i]) * 784)
    return data


def assert_bounded_letter(letters: list[tuple[int, dict[str, Any]]], offset: int, agent: str) -> dict[str, Any]:
    [(size, letter)] = [(s, d) for s, d in letters if d["origin"]["offset"] == offset]
    assert size <= kio.DEADLETTER_MAX_BYTES, size
    assert letter["agent"] == agent and letter["truncated"] is True
    assert letter["size"] == len(POISON) and letter["sha256"] == hashlib.sha256(POISON).hexdigest()
    assert bytes.fromhex(letter["value"]) == POISON[:kio.DEADLETTER_KEEP_BYTES]
    return letter


# --- the commands topic: the decider ---------------------------------------------------------------------

async def test_a_huge_record_on_the_commands_topic_is_dead_lettered_and_the_next_command_decided(
        plane: Settings) -> None:
    running = await start_plane(plane, shape_validate)
    try:
        poison_at = await produce(plane.kafka, plane.kafka.commands_topic, POISON, key=b"x" * 5000)
        async with CommandClient(plane.kafka) as client:
            cid = await client.send("CreateConfiguration", {"name": "after-the-poison", "model_ids": [1]})
            event = await client.wait(cid, timeout=WITHIN_S)
        assert event.type == "CommandRejected"  # decided (model 1 does not exist): the decider went on
        letter = assert_bounded_letter(await dead_letters(plane.kafka, plane.kafka.commands_topic), poison_at,
                                       "decider")
        assert "not a command" in letter["reason"]
        assert letter["key"]["size"] == 5000  # a key too long to reuse is described, not copied
        assert running.worker.health.agents["decider"].restarts == 0  # type: ignore[attr-defined]
    finally:
        await stop_plane(running)


async def test_a_command_whose_event_would_be_too_large_is_rejected_and_the_next_decided(plane: Settings) -> None:
    running = await start_plane(plane, shape_validate)
    try:
        # A well-formed envelope: its unknown `type` is echoed by the rejection (twice), its description by the
        # accepted event; neither may make an event the broker refuses.
        huge_type = {"command_id": new_command_id(), "type": "T" * 5_000_000, "payload": {}}
        await produce(plane.kafka, plane.kafka.commands_topic, orjson.dumps(huge_type),
                      key=huge_type["command_id"].encode())
        async with CommandClient(plane.kafka) as client:
            rejected = await client.wait(huge_type["command_id"], timeout=WITHIN_S)
            assert rejected.type == "CommandRejected" and len(rejected.encode()) < 10_000
            big = await client.send("RegisterModel", {"name": "big", "code": "# single",
                                                      "description": "d" * 99_000})
            assert (await client.wait(big, timeout=WITHIN_S)).type == "ModelCreated"
            cid = await client.send("CreateConfiguration", {"name": "after", "model_ids": [1]})
            assert (await client.wait(cid, timeout=WITHIN_S)).type == "ConfigurationCreated"
    finally:
        await stop_plane(running)


# --- the control topic: the control bridge ---------------------------------------------------------------

async def test_a_huge_record_on_the_control_topic_is_dead_lettered_and_the_next_announced(plane: Settings) -> None:
    running = await start_plane(plane, shape_validate)
    conn = await asyncpg.connect(plane.database.url)
    try:
        await deploy_single_model(plane.kafka)
        data = await data_topic(plane)
        poison_at = await produce(plane.kafka, plane.kafka.control_topic, POISON, key=bytes([1]))
        announcement = {"topic": f"{data}:0:0:10", "input_format": "RAW", "deployment_id": 1,
                        "input_config": {"data_type": "uint8", "data_reshape": "28 28"}}
        await produce(plane.kafka, plane.kafka.control_topic, orjson.dumps(announcement), key=bytes([1]))

        async def announced() -> bool:
            return bool(await conn.fetchval("SELECT count(*) FROM proj.datasources") == 1)

        await wait_until(announced, timeout=WITHIN_S, what="the announcement after the poison")
        letter = assert_bounded_letter(await dead_letters(plane.kafka, plane.kafka.control_topic), poison_at,
                                       "control-bridge")
        assert "not a datasource announcement" in letter["reason"]
    finally:
        await conn.close()
        await stop_plane(running)


# --- a tier's input topic --------------------------------------------------------------------------------

class Halves:
    """A top tier's model without TensorFlow: 4 float32 in, two classes at 0.5 out (every sample answered)."""

    kind = "keras"
    input_shape = (4,)
    input_dtype = np.dtype("float32")
    n_outputs = 1

    def predict(self, x: np.ndarray) -> list[np.ndarray]:
        return [np.full((len(x), 2), 0.5, dtype=np.float32)]


@pytest.fixture
async def tier(infra: Infra) -> Any:
    from tierflow.tiers.tier_agent import TierAgent
    from tierflow.tiers.tier_config import TierConfig

    kafka = KafkaSettings(bootstrap_servers=infra.bootstrap_servers, topic_prefix=f"poison-{uuid.uuid4().hex[:10]}",
                          session_timeout_ms=1000)
    topics = {"in": f"{kafka.topic_prefix}.in", "out": f"{kafka.topic_prefix}.out"}
    await ensure_topics(kafka, extra=[TopicSpec(t, 1, -1) for t in topics.values()])
    config = TierConfig(inference_id=9, tier_index=0, top=True, input_topic=topics["in"], output_topic=topics["out"],
                        upper_topic=None, limit=0.5, bootstrap_servers=kafka.bootstrap_servers, port=0)
    agent = TierAgent(config, kafka, engine=Halves())
    task = asyncio.create_task(agent.run())
    await wait_until(lambda: agent.ready or task.done(), timeout=30, what="the tier ready")
    try:
        yield agent, kafka, topics, task
    finally:
        agent.request_stop()
        await asyncio.wait({task}, timeout=30)


async def answered(kafka: KafkaSettings, topic: str, offset: int) -> bool:
    from tierflow.streams import wire

    tp = TopicPartition(topic, 0)
    c = kio.consumer(kafka)
    await c.start()
    try:
        c.assign([tp])
        c.seek(tp, 0)
        hw = await kio.fetch_highwater(c, tp)
        while await c.position(tp) < hw:
            for r in (await c.getmany(tp, timeout_ms=500)).get(tp, []):
                if any(a.origin[2] == offset for a in wire.read_answers(r.value)):
                    return True
    finally:
        await c.stop()
    return False


async def test_a_huge_record_on_a_tiers_input_is_dead_lettered_and_the_next_answered(tier: Any) -> None:
    agent, kafka, topics, task = tier
    poison_at = await produce(kafka, topics["in"], POISON)
    good_at = await produce(kafka, topics["in"], np.ones(4, dtype=np.float32).tobytes())
    await wait_until(lambda: answered(kafka, topics["out"], good_at), timeout=WITHIN_S,
                     what="the input after the poison answered")
    assert not task.done() and agent.failure is None
    letter = assert_bounded_letter(await dead_letters(kafka, topics["in"]), poison_at, "tier-0")
    assert "1500000 bytes, expected 16 bytes" in letter["reason"]


async def test_every_undecodable_header_is_a_dead_letter_with_its_reason(tier: Any) -> None:
    agent, kafka, topics, task = tier
    sample = np.ones(4, dtype=np.float32).tobytes()
    bad = [
        [("tierflow.v", b"1"), ("tierflow.dtype", None), ("tierflow.shape", b"4")],  # a header without a value
        [("tierflow.v", b"1"), ("tierflow.dtype", b"float32"), ("tierflow.shape", None)],
        [("tierflow.v", None), ("tierflow.dtype", b"float32"), ("tierflow.shape", b"4")],
        [("tierflow.v", b"1"), ("tierflow.dtype", b"float32"), ("tierflow.shape", b"4"), ("tierflow.ts", None)],
        [("tierflow.v", b"1"), ("tierflow.dtype", b"\xff\xfe"), ("tierflow.shape", b"4")],
    ]
    offsets = [await produce(kafka, topics["in"], sample, headers=h) for h in bad]
    good_at = await produce(kafka, topics["in"], sample)
    await wait_until(lambda: answered(kafka, topics["out"], good_at), timeout=WITHIN_S,
                     what="the input after the bad headers answered")
    assert not task.done() and agent.failure is None, agent.failure
    letters = {d["origin"]["offset"]: d for _, d in await dead_letters(kafka, topics["in"])}
    assert sorted(letters) == offsets
    assert all(d["reason"] for d in letters.values())


# --- a dead letter that cannot be sent -------------------------------------------------------------------

class RefusingProducer:
    """A producer whose broker refuses every record (as one with a small `message.max.bytes` would)."""

    async def send_and_wait(self, *args: Any, **kwargs: Any) -> Any:
        raise MessageSizeTooLargeError("the broker refused the record")


async def test_a_dead_letter_that_cannot_be_sent_is_logged_and_skipped(caplog: pytest.LogCaptureFixture) -> None:
    from aiokafka import ConsumerRecord

    record = ConsumerRecord(topic="inputs", partition=0, offset=7, timestamp=0, timestamp_type=0, key=None,
                            value=POISON, checksum=None, serialized_key_size=0, serialized_value_size=len(POISON),
                            headers=())
    with caplog.at_level(logging.ERROR, logger="tierflow.kafka"):
        sent = await kio.send_deadletter(RefusingProducer(), KafkaSettings(), record,  # type: ignore[arg-type]
                                         "bad", "decider")
    assert sent is False
    assert "could not dead-letter inputs[0]@7 (1500000 bytes, sha256 " in caplog.text


async def test_an_announcement_that_expands_past_any_limit_is_dead_lettered(plane: Settings) -> None:
    # 1.6 MB of "t:0:0:1," becomes 200,000 ranges: an AnnounceDatasource command over 8 MB, which the producer
    # refuses; and a short range list with 1.2 MB of description makes a command over the bridge's byte limit.
    # Both announcements are dead-lettered (the first on its count of ranges, the second on its size); the next
    # one is announced.
    running = await start_plane(plane, shape_validate)
    conn = await asyncpg.connect(plane.database.url)
    try:
        await deploy_single_model(plane.kafka)
        data = await data_topic(plane)
        huge = {"topic": ",".join(["t:0:0:1"] * 200_000), "input_format": "RAW", "deployment_id": 1}
        huge_at = await produce(plane.kafka, plane.kafka.control_topic, orjson.dumps(huge), key=bytes([1]))
        wordy = {"topic": f"{data}:0:0:10", "input_format": "RAW", "deployment_id": 1, "description": "w" * 1_200_000}
        wordy_at = await produce(plane.kafka, plane.kafka.control_topic, orjson.dumps(wordy), key=bytes([1]))
        announcement = {"topic": f"{data}:0:0:10", "input_format": "RAW", "deployment_id": 1}
        await produce(plane.kafka, plane.kafka.control_topic, orjson.dumps(announcement), key=bytes([1]))

        async def announced() -> bool:
            return bool(await conn.fetchval("SELECT count(*) FROM proj.datasources") == 1)

        await wait_until(announced, timeout=WITHIN_S, what="the announcement after the huge ones")
        letters = {d["origin"]["offset"]: d for _, d in await dead_letters(plane.kafka, plane.kafka.control_topic)}
        assert "at most 1024 are accepted" in letters[huge_at]["reason"], letters[huge_at]["reason"]
        assert "too large" in letters[wordy_at]["reason"], letters[wordy_at]["reason"]
    finally:
        await conn.close()
        await stop_plane(running)


def test_code_the_rules_refuse_is_never_built() -> None:
    # A RegisterModel with 7 MB of code: the rules reject it on its size alone, so the validator neither runs it
    # in the sandbox nor re-sends its megabytes with a verdict (a copy over the producer's limit).
    from tierflow.streams.catalogue import CODE_MAX
    from tierflow.streams.domain import needs_validation
    from tierflow.streams.envelope import Command
    from tierflow.streams.proofs import Verifier

    huge = Command(new_command_id(), "RegisterModel", {"name": "huge", "code": "x" * 7_000_000})
    assert not needs_validation(huge, Verifier())
    assert not needs_validation(Command(new_command_id(), "RegisterModel", {"name": "", "code": "x"}), Verifier())
    assert needs_validation(Command(new_command_id(), "RegisterModel", {"name": "ok", "code": "x" * CODE_MAX}),
                            Verifier())
