"""The control bridge: Kafka-ML announcements become datasources; garbage, and announcements of data the broker
does not have, become dead letters."""

from __future__ import annotations

import asyncpg
import orjson

from tests.conftest import dead_letters, deploy_single_model, start_plane, stop_plane, wait_until
from tests.integration.test_replay import shape_validate
from tierflow.streams import kafka as kio
from tierflow.streams.control import RESOLVE_ATTEMPTS, ControlBridge
from tierflow.streams.envelope import JSON
from tierflow.streams.ranges import RangesUnresolved, Resolution
from tierflow.streams.settings import KafkaSettings, Settings
from tierflow.streams.topics import TopicSpec, ensure_topics


async def test_announcements_and_garbage_on_the_control_topic(plane: Settings) -> None:
    running = await start_plane(plane, shape_validate)
    conn = await asyncpg.connect(plane.database.url)
    p = kio.producer(plane.kafka)
    await p.start()
    try:
        await deploy_single_model(plane.kafka)
        # Kafka-ML's sink: one-byte key, the 4th field of `topic` is the end offset. Each record here is its own
        # record batch (one send each), so the announced ranges are exact as they are.
        fashion = f"{plane.kafka.topic_prefix}.fashion"
        await ensure_topics(plane.kafka, extra=[TopicSpec(fashion, 2, -1)])
        for partition, n in ((0, 7), (1, 3)):
            for i in range(n):
                await p.send_and_wait(fashion, bytes([i]) * 784, key=bytes([i]), partition=partition)
        kafka_ml = {"topic": f"{fashion}:0:0:7,{fashion}:1:0:3", "input_format": "RAW",
                    "input_config": orjson.dumps({"data_type": "uint8", "label_type": "uint8",
                                                  "data_reshape": "28 28", "label_reshape": ""}).decode(),
                    "description": "fashion from kafka-ml", "validation_rate": 0.1, "test_rate": 0.1,
                    "total_msg": 10}
        await p.send_and_wait(plane.kafka.control_topic, orjson.dumps(kafka_ml), key=bytes([1]))
        # tierflow's own sink names the deployment in the JSON (no 255 limit); unknown deployment -> rejected.
        await p.send_and_wait(plane.kafka.control_topic, orjson.dumps(kafka_ml | {"deployment_id": 77}), key=None)
        garbage = [b"\x00\x01garbage", orjson.dumps({"topic": "t:zero:0:5"}), orjson.dumps(kafka_ml | {"test_rate": 2}),
                   orjson.dumps(kafka_ml | {"topic": f"{plane.kafka.topic_prefix}.nowhere:0:0:700"})]
        for g in garbage:
            await p.send_and_wait(plane.kafka.control_topic, g, key=bytes([1]))

        async def announced() -> bool:
            return bool(await conn.fetchval("SELECT count(*) FROM proj.datasources") == 1)

        await wait_until(announced, what="one datasource")
        row = await conn.fetchrow("SELECT * FROM proj.datasources")
        assert row is not None and row["deployment_id"] == 1
        ranges = [{"topic": fashion, "partition": 0, "start": 0, "end": 7},
                  {"topic": fashion, "partition": 1, "start": 0, "end": 3}]
        assert orjson.loads(row["ranges"]) == ranges == orjson.loads(row["announced_ranges"])
        assert orjson.loads(row["range_reasons"]) == [] and orjson.loads(row["warnings"]) == []
        assert orjson.loads(row["input_config"])["data_reshape"] == "28 28"

        # A range that ends below the partition's high-water mark at a batch boundary (another writer appended
        # after it) is used as announced, with a warning that says so; one that matches the mark has none.
        real = f"{plane.kafka.topic_prefix}.real"
        await ensure_topics(plane.kafka, extra=[TopicSpec(real, 1, -1)])
        for i in range(10):
            await p.send_and_wait(real, bytes([i]) * 4, key=bytes([i]))
        short = kafka_ml | {"topic": f"{real}:0:0:6", "deployment_id": 1}
        exact = kafka_ml | {"topic": f"{real}:0:0:10", "deployment_id": 1}
        for msg in (short, exact):
            await p.send_and_wait(plane.kafka.control_topic, orjson.dumps(msg), key=None)

        async def three() -> bool:
            return bool(await conn.fetchval("SELECT count(*) FROM proj.datasources") == 3)

        await wait_until(three, what="three datasources")
        rows = await conn.fetch("SELECT ranges, announced_ranges, warnings FROM proj.datasources ORDER BY id")
        assert [len(orjson.loads(r["warnings"])) for r in rows[1:]] == [1, 0]
        assert all(r["ranges"] == r["announced_ranges"] for r in rows)
        assert ("4 records after offset 5 (up to the high-water mark 10) are not part of this datasource"
                in orjson.loads(rows[1]["warnings"])[0])

        async def rejected() -> bool:
            r = await conn.fetchval("SELECT reason->>'message' FROM proj.command_outcomes WHERE status = 'rejected'")
            return r is not None and "77" in r

        await wait_until(rejected, what="the unknown-deployment rejection")
        letters = await dead_letters(plane.kafka, at_least=len(garbage))
        assert [letter["origin"]["offset"] for letter in letters] == [2, 3, 4, 5]
        assert "not JSON" in letters[0]["reason"]
        assert "non-integer" in letters[1]["reason"]
        assert "test_rate" in letters[2]["reason"]
        assert "names data that is not on the broker" in letters[3]["reason"]
        assert f"{plane.kafka.topic_prefix}.nowhere' of range" in letters[3]["reason"]
    finally:
        await p.stop()
        await conn.close()
        await stop_plane(running)


async def test_a_broker_that_does_not_answer_the_check_fails_the_bridge_which_restarts_at_the_same_message(
        plane: Settings) -> None:
    running = await start_plane(plane, shape_validate)
    bridge: ControlBridge = running.worker.bridge  # type: ignore[attr-defined]
    real = bridge.resolve
    # The broker does not answer the first RESOLVE_ATTEMPTS + 1 checks: the first run of the bridge gives up
    # (the agent fails), the restarted one is refused once more, then the broker answers.
    refusals = RESOLVE_ATTEMPTS + 1

    async def flaky(kafka: KafkaSettings, ranges: list[JSON]) -> Resolution:
        if bridge.unresolved < refusals:
            raise RangesUnresolved("the broker did not answer (played by the test)", delay_s=0.01)
        return await real(kafka, ranges)

    bridge.resolve = flaky
    conn = await asyncpg.connect(plane.database.url)
    p = kio.producer(plane.kafka)
    await p.start()
    try:
        await deploy_single_model(plane.kafka)
        data = f"{plane.kafka.topic_prefix}.data"
        await ensure_topics(plane.kafka, extra=[TopicSpec(data, 1, -1)])
        for i in range(5):
            await p.send_and_wait(data, bytes([i]) * 4, key=bytes([i]))
        message = {"topic": f"{data}:0:0:5", "input_format": "RAW", "deployment_id": 1}
        await p.send_and_wait(plane.kafka.control_topic, orjson.dumps(message))
        await p.send_and_wait(plane.kafka.control_topic, orjson.dumps(message | {"description": "second"}))

        async def both() -> bool:
            return bool(await conn.fetchval("SELECT count(*) FROM proj.datasources") == 2)

        await wait_until(both, what="both announcements as datasources")
        assert bridge.unresolved == refusals  # the failed run and the restarted one both tried the first message
        rows = await conn.fetch("SELECT description, origin FROM proj.datasources ORDER BY id")
        # Neither lost nor doubled, in their order on the control topic.
        assert [(r["description"], orjson.loads(r["origin"])["offset"]) for r in rows] == [("", 0), ("second", 1)]
    finally:
        await p.stop()
        await conn.close()
        await stop_plane(running)
