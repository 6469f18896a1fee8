"""Sinks against the real broker and control plane: a sent dataset becomes a datasource row that reads back.

tierflow's RawSink and a sink written the way Kafka-ML's works (kafka-python, seek-to-end offsets, a
one-byte key) both announce on the control topic; the control bridge turns each into a row of
`proj.datasources`, and the training job's reader gets exactly the announced records back.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import numpy as np
import orjson
import pytest

from tests.conftest import deploy_single_model, start_plane, stop_plane, wait_until
from tests.integration.test_replay import shape_validate
from tierflow.streams.settings import Settings
from tierflow.streams.topics import TopicSpec, ensure_topics
from tierflow.tiers.reader import read_datasource, read_ranges
from tierflow.tiers.sinks import RawSink, SinkError  # imports kafka-python quietly (see sinks.py)

N = 600


def samples(n: int, seed: int = 3) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """uint8 28x28 images whose first pixel is the label, so a sample's pairing with its label is checkable."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, size=n, dtype=np.uint8)
    x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    x[:, 0, 0] = y
    return x, y


async def datasources(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    rows = await conn.fetch("SELECT * FROM proj.datasources ORDER BY id")
    return [dict(r) for r in rows]


def kafka_ml_style_send(servers: str, topic: str, control_topic: str, deployment_id: int,
                        x: np.ndarray[Any, Any], y: np.ndarray[Any, Any]) -> str:
    """What Kafka-ML's KafkaMLSink does, written for the test: positions from seek_to_end before and after."""
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=servers, group_id=None, enable_auto_commit=False)
    # Kafka-ML runs kafka-python 2.0, whose producer is not idempotent; 3.x defaults to idempotent,
    # which Tansu rejects.
    producer = KafkaProducer(bootstrap_servers=servers, enable_idempotence=False)
    try:
        def positions() -> dict[int, int]:
            out = {}
            for p in sorted(consumer.partitions_for_topic(topic) or ()):
                tp = TopicPartition(topic, p)
                consumer.assign([tp])
                consumer.seek_to_end(tp)
                out[p] = consumer.position(tp)
            return out

        before = positions()
        for sample, label in zip(x, y, strict=True):
            producer.send(topic, key=label.tobytes(), value=sample.tobytes())
        producer.flush()
        after = positions()
        spec = ",".join(f"{topic}:{p}:{before.get(p, 0)}:{end}" for p, end in after.items())
        message = {"topic": spec, "input_format": "RAW",
                   "input_config": {"data_type": "uint8", "label_type": "uint8", "data_reshape": "28 28",
                                    "label_reshape": ""},
                   "description": "kafka-ml style", "validation_rate": 0.1, "test_rate": 0.1,
                   "total_msg": sum(after[p] - before.get(p, 0) for p in after)}
        producer.send(control_topic, key=bytes([deployment_id]), value=orjson.dumps(message))
        producer.flush()
        return spec
    finally:
        producer.close()
        consumer.close()


async def test_raw_sink_and_a_kafka_ml_style_sink_become_datasources(plane: Settings) -> None:
    running = await start_plane(plane, shape_validate)
    conn = await asyncpg.connect(plane.database.url)
    servers = plane.kafka.bootstrap_servers
    topic = f"{plane.kafka.topic_prefix}.fashion"
    try:
        await deploy_single_model(plane.kafka)
        x, y = samples(N)

        # Someone else already wrote 7 records to the topic: the sink's range starts after them.
        def other_writer(n: int) -> None:
            sink = RawSink(servers, topic, 1, control_topic=plane.kafka.control_topic)
            sink.send_many(np.zeros((n, 28, 28), np.uint8), np.full(n, 99, np.uint8))
            sink.abort()  # sent but not announced

        await asyncio.to_thread(other_writer, 7)

        def tierflow_sink() -> dict[str, Any]:
            sink = RawSink(servers, topic, 1, validation_rate=0.2, test_rate=0.1, description="fashion",
                           control_topic=plane.kafka.control_topic)
            sink.send(x[0], y[0])
            sink.send_many(x[1:], y[1:])
            return sink.close()

        announced = await asyncio.to_thread(tierflow_sink)
        await asyncio.to_thread(other_writer, 5)  # appended after the announcement: not part of it
        assert announced["topic"] == f"{topic}:0:7:{7 + N}"
        assert announced["total_msg"] == N and announced["deployment_id"] == 1
        assert announced["input_config"] == {"data_type": "uint8", "label_type": "uint8",
                                             "data_reshape": "28 28", "label_reshape": ""}

        async def one() -> bool:
            return len(await datasources(conn)) == 1

        await wait_until(one, what="the RawSink's datasource")
        row = (await datasources(conn))[0]
        assert row["deployment_id"] == 1 and row["input_format"] == "RAW"
        assert orjson.loads(row["ranges"]) == [{"topic": topic, "partition": 0, "start": 7, "end": 7 + N}]
        # tierflow's sink announces the offsets the broker acknowledged: exact, used as announced, no reason.
        assert orjson.loads(row["announced_ranges"]) == orjson.loads(row["ranges"])
        assert orjson.loads(row["range_reasons"]) == []
        assert (row["validation_rate"], row["test_rate"], row["total_msg"]) == (0.2, 0.1, N)
        # The training job's view of the row: exactly the sink's samples, paired with their labels.
        dx, dy = await read_datasource(plane.kafka, row)
        assert np.array_equal(dx, x) and np.array_equal(dy, y)

        # A sink written the way Kafka-ML's is, to another topic, announced with a one-byte key.
        km_topic = f"{plane.kafka.topic_prefix}.kafkaml"
        await ensure_topics(plane.kafka, extra=[TopicSpec(km_topic, 1, -1)])
        spec = await asyncio.to_thread(kafka_ml_style_send, servers, km_topic, plane.kafka.control_topic, 1,
                                       x[:100], y[:100])

        async def two() -> bool:
            return len(await datasources(conn)) == 2

        await wait_until(two, what="the Kafka-ML-style datasource")
        row = (await datasources(conn))[1]
        name, partition, start, end = spec.rsplit(":", 3)
        assert orjson.loads(row["announced_ranges"]) == [{"topic": name, "partition": int(partition),
                                                          "start": int(start), "end": int(end)}]
        assert row["deployment_id"] == 1 and row["description"] == "kafka-ml style"
        # Whatever end that sink computed (seek-to-end answers inside the last record batch on Tansu), the
        # datasource reads every record it sent, and says why when that is not what it announced.
        assert orjson.loads(row["ranges"]) == [{"topic": name, "partition": 0, "start": 0, "end": 100}]
        assert len(orjson.loads(row["range_reasons"])) == (int(end) != 100)
        values, keys = await read_ranges(plane.kafka, orjson.loads(row["ranges"]))
        assert values == [s.tobytes() for s in x[:100]] and keys == [bytes([v]) for v in y[:100]]
    finally:
        await conn.close()
        await stop_plane(running)


async def test_sink_errors_are_clear(plane: Settings) -> None:
    servers = plane.kafka.bootstrap_servers
    topic = f"{plane.kafka.topic_prefix}.errors"

    def wrong_control_topic() -> None:
        RawSink(servers, topic, 1, control_topic="no-such-control-topic")

    with pytest.raises(SinkError, match="control topic 'no-such-control-topic' does not exist"):
        await asyncio.to_thread(wrong_control_topic)

    def scenario() -> None:
        sink = RawSink(servers, topic, 1, control_topic=plane.kafka.control_topic, partitions=2)
        with pytest.raises(ValueError, match=r"a sample has 783 values; this datasource's samples are 28x28"):
            sink.send(np.zeros((28, 28), np.uint8), np.uint8(1))
            sink.send(np.zeros(783, np.uint8), np.uint8(1))
        sink.abort()
        with pytest.raises(SinkError, match="exists with 2 partition"):
            RawSink(servers, topic, 1, control_topic=plane.kafka.control_topic, partitions=3)
        empty = RawSink(servers, topic, 1, control_topic=plane.kafka.control_topic)
        with pytest.raises(SinkError, match="nothing was sent"):
            empty.close()
        with pytest.raises(ValueError, match="validation_rate"):
            RawSink(servers, topic, 1, validation_rate=0.6, test_rate=0.5, control_topic=plane.kafka.control_topic)

    await asyncio.to_thread(scenario)


async def test_tierflow_send_sends_digits_with_a_progress_bar(plane: Settings,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from tierflow.tiers import send_cli

    parser = argparse.ArgumentParser(prog="tierflow")
    send_cli.register(parser.add_subparsers(dest="command", required=True))
    topic = f"{plane.kafka.topic_prefix}.digits"
    args = parser.parse_args(["send", "--deployment", "3", "--dataset", "digits", "--limit", "300", "--topic", topic,
                              "--partitions", "2", "--validation-rate", "0.2", "--test-rate", "0.1"])
    code = await asyncio.to_thread(args.func, args, plane)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"\rdigits -> {topic} [" in err and "300/300 100%" in err  # the progress bar, redrawn in place
    assert f"sent 300 records of digits to {topic}" in out
    ranges_line = next(line for line in out.splitlines() if line.startswith("ranges: "))
    ranges = [part.rsplit(":", 3) for part in ranges_line.removeprefix("ranges: ").split(",")]
    assert sum(int(end) - int(start) for _, _, start, end in ranges) == 300
    # What the training job will read: the digits resized to 28x28, float32 in [0, 1].
    source = {"ranges": [{"topic": t, "partition": int(p), "start": int(s), "end": int(e)} for t, p, s, e in ranges],
              "input_format": "RAW", "input_config": {"data_type": "float32", "label_type": "uint8",
                                                       "data_reshape": "28 28", "label_reshape": ""}}
    x, y = await read_datasource(plane.kafka, source)
    assert x.shape == (300, 28, 28) and x.dtype == np.float32 and float(x.max()) <= 1.0
    assert sorted(set(y.tolist())) == list(range(10))
    bad = parser.parse_args(["send", "--deployment", "3", "--dataset", "imagenet"])
    assert await asyncio.to_thread(bad.func, bad, plane) == 1
    assert "unknown dataset 'imagenet'" in capsys.readouterr().err
