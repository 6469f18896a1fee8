"""The control bridge: Kafka-ML announcements become datasources; garbage becomes dead letters."""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson
from aiokafka import TopicPartition

from tests.conftest import start_plane, stop_plane, wait_until
from tests.integration.test_replay import shape_validate
from tierflow.streams import kafka as kio
from tierflow.streams.client import CommandClient
from tierflow.streams.settings import Settings
from tierflow.streams.topics import TopicSpec, ensure_topics


async def test_announcements_and_garbage_on_the_control_topic(plane: Settings) -> None:
    running = await start_plane(plane, shape_validate)
    conn = await asyncpg.connect(plane.database.url)
    p = kio.producer(plane.kafka)
    await p.start()
    try:
        async with CommandClient(plane.kafka) as client:
            m = await client.send("RegisterModel", {"name": "single", "code": "# single"})
            assert (await client.wait(m)).type == "ModelCreated"
            conf = await client.send("CreateConfiguration", {"name": "c", "model_ids": [1]})
            assert (await client.wait(conf)).type == "ConfigurationCreated"
            dep = await client.send("RequestDeployment", {"configuration_id": 1, "batch": 8})
            assert (await client.wait(dep)).type == "DeploymentRequested"
        # Kafka-ML's sink: one-byte key, the 4th field of `topic` is the end offset.
        kafka_ml = {"topic": "fashion:0:0:700,fashion:1:0:300", "input_format": "RAW",
                    "input_config": orjson.dumps({"data_type": "uint8", "label_type": "uint8",
                                                  "data_reshape": "28 28", "label_reshape": ""}).decode(),
                    "description": "fashion from kafka-ml", "validation_rate": 0.1, "test_rate": 0.1,
                    "total_msg": 1000}
        await p.send_and_wait(plane.kafka.control_topic, orjson.dumps(kafka_ml), key=bytes([1]))
        # tierflow's own sink names the deployment in the JSON (no 255 limit); unknown deployment -> rejected.
        await p.send_and_wait(plane.kafka.control_topic, orjson.dumps(kafka_ml | {"deployment_id": 77}), key=None)
        garbage = [b"\x00\x01garbage", orjson.dumps({"topic": "t:zero:0:5"}), orjson.dumps(kafka_ml | {"test_rate": 2})]
        for g in garbage:
            await p.send_and_wait(plane.kafka.control_topic, g, key=bytes([1]))

        async def announced() -> bool:
            return bool(await conn.fetchval("SELECT count(*) FROM proj.datasources") == 1)

        await wait_until(announced, what="one datasource")
        row = await conn.fetchrow("SELECT * FROM proj.datasources")
        assert row is not None and row["deployment_id"] == 1
        assert orjson.loads(row["ranges"]) == [{"topic": "fashion", "partition": 0, "start": 0, "end": 700},
                                              {"topic": "fashion", "partition": 1, "start": 0, "end": 300}]
        assert orjson.loads(row["input_config"])["data_reshape"] == "28 28"
        # The announced topic is not on the broker: the datasource says so.
        assert any("fashion[0]: the topic does not exist" in w for w in orjson.loads(row["warnings"]))

        # A range that ends below the partition's high-water mark (Kafka-ML's seek-to-end can answer too small)
        # is recorded with a visible warning; one that matches it has none.
        await ensure_topics(plane.kafka, extra=[TopicSpec("real", 1, -1)])
        for i in range(10):
            await p.send_and_wait("real", bytes([i]) * 4, key=bytes([i]))
        short = kafka_ml | {"topic": "real:0:0:6", "deployment_id": 1}
        exact = kafka_ml | {"topic": "real:0:0:10", "deployment_id": 1}
        for msg in (short, exact):
            await p.send_and_wait(plane.kafka.control_topic, orjson.dumps(msg), key=None)

        async def three() -> bool:
            return bool(await conn.fetchval("SELECT count(*) FROM proj.datasources") == 3)

        await wait_until(three, what="three datasources")
        rows = await conn.fetch("SELECT warnings FROM proj.datasources ORDER BY id")
        assert [len(orjson.loads(r["warnings"])) for r in rows[1:]] == [1, 0]
        assert "below the high-water mark 10; 4 later records" in orjson.loads(rows[1]["warnings"])[0]

        async def rejected() -> bool:
            r = await conn.fetchval("SELECT reason->>'message' FROM proj.command_outcomes WHERE status = 'rejected'")
            return r is not None and "77" in r

        await wait_until(rejected, what="the unknown-deployment rejection")
        letters: list[dict[str, Any]] = []
        c = kio.consumer(plane.kafka)
        await c.start()
        try:
            tp = TopicPartition(plane.kafka.deadletter_topic, 0)
            c.assign([tp])
            await c.seek_to_beginning(tp)

            async def collected() -> bool:
                batch = await c.getmany(tp, timeout_ms=200)
                letters.extend(orjson.loads(r.value) for r in batch.get(tp, []))
                return len(letters) >= 3

            await wait_until(collected, what="three dead letters")
        finally:
            await c.stop()
        assert [letter["origin"]["offset"] for letter in letters] == [2, 3, 4]
        assert "not JSON" in letters[0]["reason"]
        assert "non-integer" in letters[1]["reason"]
        assert "test_rate" in letters[2]["reason"]
    finally:
        await p.stop()
        await conn.close()
        await stop_plane(running)
