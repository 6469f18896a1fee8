"""Events are the source of truth: replaying tierflow.events from offset 0 rebuilds identical tables.

Datasources included: the ranges the control bridge found on the broker are in the events, so a rebuild
gives the same rows whatever the broker holds by then.

Also: garbage on the commands topic goes to the dead-letter topic and the worker keeps deciding.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from typing import Any

import asyncpg
import orjson

from tests.conftest import Infra, dead_letters, deploy_single_model, new_plane, start_plane, stop_plane, wait_until
from tierflow.projections.rebuild import rebuild
from tierflow.projections.schema import PROJECTION_TABLES
from tierflow.streams import kafka as kio
from tierflow.streams.client import CommandClient
from tierflow.streams.envelope import Command, new_command_id
from tierflow.streams.proofs import VALIDATOR, Signer
from tierflow.streams.settings import Settings
from tierflow.streams.topics import TopicSpec, ensure_topics

CHAIN = {
    "top": {"input_shape": [None, 64], "output_shapes": [[None, 10]], "params": 650},
    "mid": {"input_shape": [None, 64], "output_shapes": [[None, 64], [None, 10]], "params": 4810},
    "single": {"input_shape": [None, 28, 28], "output_shapes": [[None, 10]], "params": 7850},
}


async def shape_validate(code: str, imports: str) -> dict[str, Any]:
    """The validator port, answering from a marker in the code (this test is about replay, not Keras)."""
    for kind, summary in CHAIN.items():
        if f"# {kind}" in code:
            return {"ok": True, "summary": summary}
    return {"ok": False, "error": "SyntaxError: line 1"}


async def dump(conn: asyncpg.Connection) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for table in PROJECTION_TABLES:
        rows = await conn.fetch(f"SELECT * FROM proj.{table}")
        out[table] = sorted(orjson.dumps({k: str(v) for k, v in dict(r).items()}, option=orjson.OPT_SORT_KEYS)
                            for r in rows)
    return out


def scripted_history(rng: random.Random, n: int, validator: Signer) -> list[Command]:
    """A history of n commands touching every aggregate, with rejections and duplicates in it; model code comes
    with its verdict already signed by `validator` (as the validator would re-send it)."""
    cmds: list[Command] = []
    model_ids: list[int] = []
    next_model = 1

    def c(t: str, p: dict[str, Any], cid: str | None = None) -> Command:
        return Command(command_id=cid or new_command_id(), type=t, payload=p)

    # Chains of two (top + mid) and singles, registered with validation attached (as the validator would).
    while len(cmds) < n:
        roll = rng.random()
        if roll < 0.25 or not model_ids:
            top = c("RegisterModel", {"name": f"top{next_model}", "code": "# top", "distributed": True})
            cmds.append(validator.sign(replace(top, validation={"ok": True, "summary": CHAIN["top"]})))
            top_id = next_model
            next_model += 1
            mid = c("RegisterModel", {"name": f"mid{next_model}", "code": "# mid", "distributed": True,
                                      "upper_id": top_id})
            cmds.append(validator.sign(replace(mid, validation={"ok": True, "summary": CHAIN["mid"]})))
            model_ids += [top_id, next_model]
            next_model += 1
        elif roll < 0.45:
            cmds.append(c("CreateConfiguration", {"name": f"conf{len(cmds)}",
                                                  "model_ids": rng.sample(model_ids, k=min(2, len(model_ids)))}))
        elif roll < 0.6:
            cmds.append(c("RequestDeployment", {"configuration_id": rng.randint(1, 8), "batch": rng.randint(1, 128),
                                                "fit_options": {"epochs": rng.randint(1, 5)}}))
        elif roll < 0.7:
            cmds.append(c("UpdateModel", {"id": rng.choice(model_ids), "description": f"d{len(cmds)}"}))
        elif roll < 0.78:
            cmds.append(c("DeleteDeployment", {"id": rng.randint(1, 10)}))
        elif roll < 0.84:
            cmds.append(c("DeleteConfiguration", {"id": rng.randint(1, 10)}))
        elif roll < 0.9:
            cmds.append(c("DeleteModel", {"id": rng.choice(model_ids)}))
        elif roll < 0.93:
            # A datasource as the control bridge announces it: sometimes with used ranges made exact.
            announced = [{"topic": "digits", "partition": p, "start": 0, "end": rng.randint(1, 500)} for p in (0, 1)]
            moved = rng.random() < 0.5
            used = [announced[0] | {"end": announced[0]["end"] + 7}, announced[1]] if moved else announced
            cmds.append(c("AnnounceDatasource", {"deployment_id": rng.randint(1, 8), "input_format": "RAW",
                                                 "ranges": used, "announced_ranges": announced,
                                                 "range_reasons": ["digits[0]: end moved"] if moved else [],
                                                 "warnings": ["digits[1]: 3 records after ..."]}))
        elif roll < 0.96 and cmds:
            cmds.append(rng.choice(cmds))  # a re-sent command: decided once
        else:
            cmds.append(c("RegisterModel", {"name": "", "code": "x"}))  # rejected
    return cmds


async def test_rebuild_from_offset_zero_gives_identical_tables(infra: Infra) -> None:
    plane = await new_plane(infra, "replay")
    running = await start_plane(plane, shape_validate)
    cmds = scripted_history(random.Random(7), 240, Signer.from_secret(plane.security.secret_key, VALIDATOR))
    unique = {cmd.command_id for cmd in cmds}
    async with CommandClient(plane.kafka) as client:
        await client.send_many(cmds)
    conn = await asyncpg.connect(plane.database.url)
    try:
        async def all_decided() -> bool:
            n = await conn.fetchval("SELECT count(*) FROM proj.command_outcomes")
            return bool(n == len(unique))

        await wait_until(all_decided, timeout=60, what=f"{len(unique)} outcomes")
        statuses = {r["status"]: r["n"] for r in await conn.fetch(
            "SELECT status, count(*) AS n FROM proj.command_outcomes GROUP BY status")}
        assert statuses.get("accepted", 0) > 100 and statuses.get("rejected", 0) > 10, statuses
        before = await dump(conn)
        assert before["models"] and before["deployments"] and before["results"] and before["datasources"]
        # Replay from offset 0 into fresh tables, swap, and compare.
        replayed = await rebuild(plane)
        assert replayed == len(unique)
        after = await dump(conn)
        assert after == before
        # The live projector keeps going on the swapped-in tables.
        async with CommandClient(plane.kafka) as client:
            cid = await client.send("CreateConfiguration", {"name": "after-rebuild", "model_ids": [1]})

        async def projected() -> bool:
            return bool(await conn.fetchval("SELECT count(*) FROM proj.command_outcomes WHERE command_id = $1::uuid",
                                            cid))

        await wait_until(projected, what="a command after the rebuild")
    finally:
        await conn.close()
        await stop_plane(running)


async def test_garbage_on_commands_topic_is_dead_lettered(plane: Settings) -> None:
    running = await start_plane(plane, shape_validate)
    try:
        p = kio.producer(plane.kafka)
        await p.start()
        try:
            garbage = [b"\xff\xfe not json", b"[1, 2]", b'{"type": "CreateConfiguration"}', b"",
                       orjson.dumps({"command_id": "not-a-uuid", "type": "X", "payload": {}})]
            for g in garbage:
                await p.send_and_wait(plane.kafka.commands_topic, g, key=b"junk")
        finally:
            await p.stop()
        async with CommandClient(plane.kafka) as client:
            ok = await client.send("RegisterModel", {"name": "after-junk", "code": "# single"})
            event = await client.wait(ok)
        assert event.type == "ModelCreated"  # the decider kept deciding
        # Every garbage record is in the dead-letter topic with its reason and origin.
        letters = await dead_letters(plane.kafka, at_least=len(garbage))
        assert len(letters) == len(garbage)
        assert all(letter["origin"]["topic"] == plane.kafka.commands_topic for letter in letters)
        offsets = [letter["origin"]["offset"] for letter in letters]
        assert offsets == sorted(offsets)
        assert "not JSON" in letters[0]["reason"] and letters[0]["encoding"] == "hex"
        assert "command_id" in letters[2]["reason"]
        assert "empty" in letters[3]["reason"]
        assert "UUID" in letters[4]["reason"]
    finally:
        await stop_plane(running)


async def test_a_rebuild_gives_the_same_datasources_without_asking_the_broker(infra: Infra) -> None:
    # (imported here: that module imports shape_validate from this one)
    from tests.integration.test_kafka_ml_sinks import batched_write, kafka_ml_sink, records

    plane = await new_plane(infra, "replayds")
    running = await start_plane(plane, shape_validate)
    conn = await asyncpg.connect(plane.database.url)
    try:
        await deploy_single_model(plane.kafka, deployments=2)
        # A Kafka-ML sink's batched records: the control bridge uses other ranges than it announced, and says why.
        topic = f"{plane.kafka.topic_prefix}.digits"
        await ensure_topics(plane.kafka, extra=[TopicSpec(topic, 2, -1)])
        values, keys = records(1000, 12, tag=9)
        await asyncio.to_thread(kafka_ml_sink, plane.kafka.bootstrap_servers, plane.kafka.control_topic, topic,
                                values, keys)

        async def announced() -> bool:
            return bool(await conn.fetchval("SELECT count(*) FROM proj.datasources") == 1)

        await wait_until(announced, what="the Kafka-ML sink's datasource")
        async with CommandClient(plane.kafka) as client:  # and a copy of it for deployment 2
            copy = await client.wait(await client.send("SendDatasource", {"datasource_id": 1, "deployment_id": 2}))
            assert copy.type == "DatasourceAnnounced"
        before = await dump(conn)
        rows = await conn.fetch("SELECT ranges, announced_ranges, range_reasons FROM proj.datasources ORDER BY id")
        assert len(rows) == 2 and rows[0]["ranges"] != rows[0]["announced_ranges"]
        assert orjson.loads(rows[0]["range_reasons"]) and rows[1]["ranges"] == rows[0]["ranges"]

        # Another writer appends to the topic: checking the ranges again now would warn about its records.
        await asyncio.to_thread(batched_write, plane.kafka.bootstrap_servers, topic, *records(300, 12, tag=10))
        assert await rebuild(plane) == 6  # 4 set-up events, the announcement and its copy
        assert await dump(conn) == before
    finally:
        await conn.close()
        await stop_plane(running)
