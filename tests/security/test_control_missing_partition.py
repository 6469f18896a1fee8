"""Attack: a control message naming a partition (or a topic) that does not exist stops the control bridge.

Anyone who can write the Kafka-ML control topic (any local process on the embedded broker) could announce
`data:7:0:10` for a topic with one partition: the bridge asked the broker for that partition's position and
waited for an answer that never comes, so every later announcement, good ones included, waited behind it
forever. Defence: the bridge checks each announced topic and partition against the broker's metadata before
anything else (streams/ranges.py: `resolve_ranges`), dead-letters an announcement that names one that does
not exist with the reason, within seconds, and goes on with the next message; asking creates no topic.
"""

from __future__ import annotations

import asyncpg
import orjson

from tests.conftest import dead_letters, deploy_single_model, start_plane, stop_plane, wait_until
from tests.integration.test_replay import shape_validate
from tierflow.streams import kafka as kio
from tierflow.streams.settings import Settings
from tierflow.streams.topics import TopicSpec, admin_client, ensure_topics

#: How long a refusal may take: the bridge must answer from the broker's metadata, not from a time-out.
WITHIN_S = 10.0


def announcement(spec: str) -> bytes:
    return orjson.dumps({"topic": spec, "input_format": "RAW", "deployment_id": 1, "validation_rate": 0.1,
                         "test_rate": 0.1, "input_config": {"data_type": "uint8", "label_type": "uint8"}})


async def test_an_announcement_naming_a_missing_partition_is_dead_lettered_and_the_bridge_goes_on(
        plane: Settings) -> None:
    running = await start_plane(plane, shape_validate)
    p = kio.producer(plane.kafka)
    await p.start()
    conn = await asyncpg.connect(plane.database.url)
    try:
        await deploy_single_model(plane.kafka)
        data, missing = f"{plane.kafka.topic_prefix}.data", f"{plane.kafka.topic_prefix}.missing"
        await ensure_topics(plane.kafka, extra=[TopicSpec(data, 1, -1)])
        for i in range(10):
            await p.send_and_wait(data, bytes([i]) * 4, key=bytes([i % 10]))

        # The attack: partition 7 of a one-partition topic, then a topic that does not exist; then a good one.
        for spec in (f"{data}:7:0:10", f"{missing}:0:0:10", f"{data}:0:0:10"):
            await p.send_and_wait(plane.kafka.control_topic, announcement(spec), key=None)

        letters = await dead_letters(plane.kafka, at_least=2, timeout=WITHIN_S)
        assert [letter["origin"]["offset"] for letter in letters] == [0, 1]
        assert f"topic '{data}' has no partition 7" in letters[0]["reason"], letters[0]
        assert "its partitions are 0..0" in letters[0]["reason"], letters[0]
        assert f"topic '{missing}' of range {missing}:0:0:10 does not exist" in letters[1]["reason"], letters[1]
        assert all(letter["agent"] == "control-bridge" for letter in letters)

        # The bridge went on: the good announcement behind them is a datasource.
        async def announced() -> bool:
            return bool(await conn.fetchval("SELECT count(*) FROM proj.datasources") == 1)

        await wait_until(announced, timeout=WITHIN_S, what="the good announcement's datasource")
        ranges = orjson.loads(await conn.fetchval("SELECT ranges FROM proj.datasources"))
        assert ranges == [{"topic": data, "partition": 0, "start": 0, "end": 10}]

        # Asking about the missing topic did not make the broker create it.
        admin = admin_client(plane.kafka)
        await admin.start()
        try:
            assert missing not in set(await admin.list_topics())
        finally:
            await admin.close()
    finally:
        await p.stop()
        await conn.close()
        await stop_plane(running)
