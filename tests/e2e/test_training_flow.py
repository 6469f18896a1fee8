"""Training end to end: the thesis chain and a single model from Kafka-ML snippets, data through a sink,
workloads launched by the orchestrator as local processes, results with metrics and downloadable artefacts.

One trained deployment is shared with the inference e2e tests (`tests/e2e/conftest.py`: training costs seconds
of TensorFlow per run); the failure cases run one small workload each.
"""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from tests.conftest import wait_until
from tests.e2e.conftest import Env, deploy, results_of, wait_status
from tierflow.streams import kafka as kio
from tierflow.streams.topics import TopicSpec, ensure_topics
from tierflow.tiers.datasets import load_digits
from tierflow.tiers.sinks import RawSink

pytestmark = pytest.mark.slow


async def test_the_chain_and_the_single_model_train_to_good_accuracy(trained: dict[str, Any], env: Env) -> None:
    results = trained["results"]
    assert [r["status"] for r in results] == ["finished"] * 4, [r.get("error") for r in results]
    by_model = {r["model_id"]: r for r in results}
    for name in ("edge", "fog", "cloud", "single"):
        r = by_model[env.models[name]]
        assert r["metrics"]["test"]["accuracy"] >= 0.8, (name, r["metrics"])
        # Progress was reported every epoch, for every exit.
        assert [h["epoch"] for h in r["history"]] == [1, 2, 3, 4, 5]
        assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(r["history"][-1])
    # The chain trained in one workload, the single model in another.
    chain = by_model[env.models["edge"]]["chain"]
    assert len(chain) == 3 and by_model[env.models["single"]]["chain"] == [by_model[env.models["single"]]["id"]]
    assert len({r["workload"] for r in results}) == 2
    samples = by_model[env.models["edge"]]["samples"]
    assert samples["train"] + samples["validation"] + samples["test"] == trained["n"]
    assert samples["classes"] == {"train": 10, "validation": 10, "test": 10}


async def test_each_artefact_downloads_verifies_and_loads(trained: dict[str, Any], env: Env) -> None:
    from tierflow.tiers.training import load_keras

    digits = load_digits(28)
    x = (digits.x[:8] / max(1.0, float(digits.x.max()))).astype(np.float32)
    for r in trained["results"]:
        got = await env.client.get(f"/results/{r['id']}/model")
        assert got.status == 200
        data = await got.read()
        assert hashlib.sha256(data).hexdigest() == got.headers["X-Sha256"] == r["artefacts"]["keras"]["sha256"]
        model = load_keras(data)
        assert model.count_params() > 0
        if r["model_id"] in (env.models["edge"], env.models["single"]):
            shape = model.input_shape[1:]
            out = model(x.reshape((-1, *shape)), training=False)
            probs = out[-1] if isinstance(out, list | tuple) else out
            assert probs.shape == (8, 10)
    # Every non-top sub-model also comes as LiteRT for devices.
    edge = next(r for r in trained["results"] if r["model_id"] == env.models["edge"])
    tflite = await env.client.get(f"/results/{edge['id']}/model?format=tflite")
    assert tflite.status == 200 and len(await tflite.read()) > 100_000


async def test_finished_results_are_never_retrained(trained: dict[str, Any], env: Env) -> None:
    # The finished workloads were removed; a reconcile pass launches nothing for them.
    orchestrator = env.running.worker.orchestrator  # type: ignore[attr-defined]
    await wait_until(lambda: not _training_dirs(env), timeout=30, what="finished workloads removed")
    before = orchestrator.reconciled
    await wait_until(lambda: orchestrator.reconciled > before + 1, what="two more reconcile passes")
    assert not _training_dirs(env)


def _training_dirs(env: Env) -> list[str]:
    root = env.launcher.state_dir if hasattr(env.launcher, "state_dir") else None
    if root is None or not Path(root).exists():
        return []
    return [p.name for p in Path(root).iterdir() if p.name.startswith("tierflow-train-")]


async def test_records_of_the_wrong_size_fail_with_a_clear_reason(env: Env) -> None:
    dep = await deploy(env, [env.models["single"]], epochs=1)
    topic = f"short-{dep['id']}"
    await ensure_topics(env.settings.kafka, extra=[TopicSpec(topic, 1, -1)])
    # A foreign producer (as Kafka-ML clients are) writes the records; record 17 is one byte short.
    p = kio.producer(env.settings.kafka)
    await p.start()
    try:
        rng = np.random.default_rng(1)
        offsets = []
        for i in range(40):
            size = 783 if i == 17 else 784
            meta = await p.send_and_wait(topic, rng.integers(0, 255, size=size, dtype=np.uint8).tobytes(),
                                         key=bytes([i % 10]))
            offsets.append(meta.offset)
        announcement = {"topic": f"{topic}:0:{min(offsets)}:{max(offsets) + 1}", "input_format": "RAW",
                        "input_config": {"data_type": "uint8", "label_type": "uint8", "data_reshape": "28 28",
                                         "label_reshape": ""},
                        "validation_rate": 0.1, "test_rate": 0.1, "total_msg": 40}
        await p.send_and_wait(env.settings.kafka.control_topic, orjson.dumps(announcement),
                              key=dep["id"].to_bytes(1, "big"))
    finally:
        await p.stop()
    [result] = await wait_status(env, dep["id"], {"failed", "finished"}, timeout=180)
    assert result["status"] == "failed"
    assert "record 17: 783 bytes, expected 784 for uint8 28x28" in result["error"]


async def test_a_training_killed_with_kill_9_ends_failed_with_the_reason(env: Env) -> None:
    dep = await deploy(env, [env.models["single"]], epochs=200)
    await send_random(env, dep["id"], 2000)
    [result] = await wait_status(env, dep["id"], {"training"}, timeout=180)
    pid = int((Path(env.launcher.state_dir) / result["workload"] / "pid").read_text().split()[0])
    os.killpg(pid, signal.SIGKILL)
    [result] = await wait_status(env, dep["id"], {"failed"}, timeout=60)
    assert result["workload"] in result["error"] and "without reporting" in result["error"]


async def test_a_running_training_is_stopped_and_its_workload_is_gone(env: Env) -> None:
    dep = await deploy(env, [env.models["single"]], epochs=200)
    await send_random(env, dep["id"], 2000)
    [result] = await wait_status(env, dep["id"], {"training"}, timeout=180)
    r = await env.client.post(f"/results/{result['id']}/stop")
    assert r.status == 200
    [result] = await wait_status(env, dep["id"], {"stopped"}, timeout=30)
    workload_dir = Path(env.launcher.state_dir) / result["workload"]
    await wait_until(lambda: not workload_dir.exists(), timeout=60, what="the stopped workload removed")
    names = [w.name for w in await env.launcher.list("training")]
    assert result["workload"] not in names


async def send_random(env: Env, deployment_id: int, n: int) -> None:
    rng = np.random.default_rng(deployment_id)
    sink = RawSink(env.settings.kafka.bootstrap_servers, f"random-{deployment_id}", deployment_id,
                   control_topic=env.settings.kafka.control_topic)
    sink.send_many(rng.random((n, 28, 28), dtype=np.float32), rng.integers(0, 10, n).astype(np.uint8))
    sink.close()


AVRO_DATA = {"type": "record", "name": "digit", "fields": [{"name": "pixels", "type": {"type": "array",
                                                                                      "items": "float"}}]}
AVRO_LABEL = {"type": "record", "name": "label", "fields": [{"name": "label", "type": "int"}]}


async def test_kafka_ml_style_sink_avro_and_label_keyed_partitions_all_train(env: Env) -> None:
    """Three more ways data arrives, each trained by single.py (2 epochs): a sink written the way Kafka-ML's
    works (kafka-python, offsets from seek-to-end before and after, 1-byte key, "t:0:start:end"), AVRO, and
    records keyed by label over 4 partitions (every split must still see every class)."""
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    digits = load_digits(28)
    x, y = digits.x.astype(np.float32), digits.y.astype(np.uint8)
    kafka_ml, avro, spread = [await deploy(env, [env.models["single"]], epochs=2) for _ in range(3)]
    servers = env.settings.kafka.bootstrap_servers

    # 1. Kafka-ML's sink: offsets from a seek-to-end lookup before and after sending.
    topic = f"kafkaml-{kafka_ml['id']}"
    await ensure_topics(env.settings.kafka, extra=[TopicSpec(topic, 1, -1)])
    tp = TopicPartition(topic, 0)
    probe = KafkaConsumer(bootstrap_servers=servers, enable_auto_commit=False)
    probe.assign([tp])
    probe.seek_to_end(tp)
    start = probe.position(tp)
    producer = KafkaProducer(bootstrap_servers=servers, enable_idempotence=False, acks="all")
    for xi, yi in zip(x, y, strict=True):
        producer.send(topic, value=xi.tobytes(), key=yi.tobytes(), partition=0)
    producer.flush()
    probe.seek_to_end(tp)
    end = probe.position(tp)
    probe.close()
    producer.send(env.settings.kafka.control_topic, key=bytes([kafka_ml["id"]]), value=orjson.dumps({
        "topic": f"{topic}:0:{start}:{end}", "input_format": "RAW", "description": "kafka-ml style",
        "input_config": {"data_type": "float32", "label_type": "uint8", "data_reshape": "28 28",
                         "label_reshape": ""},
        "validation_rate": 0.1, "test_rate": 0.1, "total_msg": end - start}))
    producer.flush()
    producer.close()

    # 2. AVRO records (pixels as an array field, label as the Avro-encoded key).
    from tierflow.tiers.sinks import AvroSink

    sink = AvroSink(servers, f"avro-{avro['id']}", avro["id"], AVRO_DATA, AVRO_LABEL, validation_rate=0.1,
                    test_rate=0.1, control_topic=env.settings.kafka.control_topic)
    sink.send_many(({"pixels": xi.ravel().tolist()} for xi in x), ({"label": int(yi)} for yi in y))
    sink.close()

    # 3. Keyed by label over 4 partitions: reading partition by partition groups the classes.
    raw = RawSink(servers, f"spread-{spread['id']}", spread["id"], validation_rate=0.1, test_rate=0.1,
                  control_topic=env.settings.kafka.control_topic, partitions=4)
    raw.send_many(x, y)
    raw.close()

    for dep in (kafka_ml, avro, spread):
        [result] = await wait_status(env, dep["id"], {"finished", "failed"}, timeout=300)
        assert result["status"] == "finished", (dep["id"], result["error"])
        assert result["metrics"]["test"]["accuracy"] >= 0.5, result["metrics"]
    # Every record the Kafka-ML sink sent is trained on (its seek-to-end end falls short on the embedded broker;
    # the control bridge extends it to the end of the sink's last record batch).
    [kafka_ml_result] = await results_of(env, kafka_ml["id"])
    assert sum(kafka_ml_result["samples"][split] for split in ("train", "validation", "test")) == len(x)
    [spread_result] = await results_of(env, spread["id"])
    assert spread_result["samples"]["classes"] == {"train": 10, "validation": 10, "test": 10}
    ranges = (await (await env.client.get(f"/datasources?deployment_id={spread['id']}")).json())["items"][0]["ranges"]
    assert len(ranges) == 4
