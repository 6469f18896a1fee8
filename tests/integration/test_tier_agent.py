"""Tier agents on a real Tansu broker: early exits equal the offline chain, Kafka-ML compatibility, dead
letters, at-least-once through `kill -9`, a tier on a second broker, a mid-chain entry.

The chain is the thesis' edge -> fog -> cloud snippets with random (seeded) weights, no training: routing
correctness does not need accuracy. The exits' last layers are scaled so that confidences spread over
[0.1, 1] and limits 0.5 and 0.9 split the samples between the three tiers. The sub-models are saved once
per module (`.keras`, and the edge as `.tflite`); in-process agents share their loaded engines, except where
a test loads from the file on purpose. The offline reference is the same saved models called on the whole
input batch; a sample whose highest probability lies within `NEAR` of the limit at some tier may go either
way with another batch composition (float rounding), so it is left out of the exact comparison.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiokafka import AIOKafkaConsumer, TopicPartition
from fastavro import parse_schema, schemaless_writer
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from tests.conftest import ARTIFACTS, Infra, wait_until
from tests.fixtures import model_code
from tierflow.deploy import services
from tierflow.streams import kafka as kio
from tierflow.streams import wire
from tierflow.streams.settings import KafkaSettings
from tierflow.streams.topics import TopicSpec, ensure_topics
from tierflow.tiers.data import InputConfig
from tierflow.tiers.engines import Engine, KerasEngine, LiteRTEngine
from tierflow.tiers.tier_app import TierApp, create_app, keep_freed_memory, web_port
from tierflow.tiers.tier_cli import TierSetupError, config_from_api
from tierflow.tiers.tier_config import TierConfig, TierConfigError, input_spec
from tierflow.tiers.tier_metrics import BulkHistogram

CHAIN = ("edge", "fog", "cloud")
#: Scale of each exit's last layer: spreads the random models' confidences (see the module docstring).
EXIT_SCALE = {"edge": ("edge_output", 6.0), "fog": ("fog_output", 60.0), "cloud": ("cloud_output", 10.0)}
NEAR = 1e-4
#: How far LiteRT's answers may be from Keras' (measured: 1.6e-6 on the edge model).
LITERT_TOLERANCE = 1e-4
FLOAT_IMAGES = {"data_type": "float32", "data_reshape": "28 28"}
UINT8_IMAGES = {"data_type": "uint8", "data_reshape": "28 28"}
Headers = list[tuple[str, bytes]]


# -- the chain, saved once ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chain:
    files: dict[str, Path]  # edge/fog/cloud .keras, edge_tflite
    engines: dict[str, KerasEngine]  # loaded back from the files

    def offline(self, x: np.ndarray, limit: float, *, start: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                           np.ndarray]:
        """(tier, class, probabilities of the answering tier, near-the-limit mask) per sample, entering the
        chain at tier `start`; tier numbers count from the entry (0)."""
        n = len(x)
        tier = np.full(n, -1)
        cls = np.zeros(n, dtype=np.int64)
        probs = np.zeros((n, 10), dtype=np.float32)
        near = np.zeros(n, dtype=bool)
        tensor = x
        names = CHAIN[start:]
        for k, name in enumerate(names):
            outputs = self.engines[name].predict(tensor)
            p = outputs[-1]
            top = k == len(names) - 1
            here = (tier < 0) & ((p.max(axis=1) >= limit) | top)
            if not top:
                near |= (tier < 0) & (np.abs(p.max(axis=1) - limit) < NEAR)
            tier[here], cls[here], probs[here] = k, p[here].argmax(axis=1), p[here]
            if not top:
                tensor = outputs[0]
        return tier, cls, probs, near


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    from tierflow.tiers.keras_code import build_model, load_keras
    from tierflow.tiers.training import export_keras, export_tflite

    _, keras = load_keras()
    keras.utils.set_random_seed(7)
    folder = tmp_path_factory.mktemp("chain")
    files: dict[str, Path] = {}
    for name in CHAIN:
        model = build_model(model_code(name))
        layer_name, scale = EXIT_SCALE[name]
        layer = model.get_layer(layer_name)
        weights, bias = layer.get_weights()
        layer.set_weights([weights * scale, bias])
        files[name] = folder / f"{name}.keras"
        files[name].write_bytes(export_keras(model).data)
        if name == "edge":
            files["edge_tflite"] = folder / "edge.tflite"
            files["edge_tflite"].write_bytes(export_tflite(model).data)
    return Chain(files, {name: KerasEngine.from_path(files[name]) for name in CHAIN})


def images(n: int, seed: int) -> np.ndarray:
    """Float32 28x28 images with varied contrast (so the exits' confidences vary)."""
    rng = np.random.default_rng(seed)
    return (rng.random((n, 28, 28)) * rng.uniform(0.2, 3.0, (n, 1, 1))).astype(np.float32)


# -- broker helpers ----------------------------------------------------------------------------------------


def kafka_on(servers: str) -> KafkaSettings:
    """Settings with a fresh topic prefix (its own dead-letter topic) and a short group session."""
    return KafkaSettings(bootstrap_servers=servers, topic_prefix=f"tiers-{uuid.uuid4().hex[:10]}",
                         session_timeout_ms=1000)


async def make_topics(kafka: KafkaSettings, **partitions: int) -> dict[str, str]:
    """Create `<prefix>.<name>` topics explicitly (Tansu would auto-create them with 4 partitions)."""
    names = {name: f"{kafka.topic_prefix}.{name}" for name in partitions}
    await ensure_topics(kafka, extra=[TopicSpec(names[n], p, -1) for n, p in partitions.items()])
    return names


async def produce(kafka: KafkaSettings, topic: str, items: Sequence[tuple[bytes, Headers | None]],
                  partition: int | None = None) -> list[tuple[int, int]]:
    """Send and wait for every acknowledgement; the (partition, offset) of each record."""
    producer = kio.producer(kafka)
    await producer.start()
    try:
        futures = [await producer.send(topic, value, headers=headers, partition=partition)
                   for value, headers in items]
        return [(m.partition, m.offset) for m in await asyncio.gather(*futures)]
    finally:
        await producer.stop()


class TopicReader:
    """Reads a topic from the beginning (no group), polled until a condition holds."""

    def __init__(self, kafka: KafkaSettings, topic: str, partitions: int = 1) -> None:
        self.consumer: AIOKafkaConsumer = kio.consumer(kafka)
        self.tps = [TopicPartition(topic, p) for p in range(partitions)]
        self.records: list[Any] = []

    async def __aenter__(self) -> TopicReader:
        await self.consumer.start()
        self.consumer.assign(self.tps)
        for tp in self.tps:
            self.consumer.seek(tp, 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()

    async def read(self) -> list[Any]:
        batch = await self.consumer.getmany(*self.tps, timeout_ms=50)
        for part in batch.values():
            self.records.extend(part)
        return self.records

    def answers(self) -> list[wire.Answer]:
        return [a for r in self.records for a in wire.read_answers(r.value)]

    async def until(self, predicate: Any, *, timeout: float = 30.0, what: str) -> None:
        async def check() -> bool:
            await self.read()
            return bool(predicate(self))

        await wait_until(check, timeout=timeout, what=what)


@contextlib.asynccontextmanager
async def serving(kafka: KafkaSettings, configs: Sequence[TierConfig],
                  engines: Sequence[Engine | None]) -> AsyncIterator[list[TierApp]]:
    """The tiers' Faust apps, started in this process and ready (model loaded, consumer in its group)."""
    loop = asyncio.get_running_loop()
    apps = [create_app(c, kafka, engine=e, loop=loop) for c, e in zip(configs, engines, strict=True)]
    try:
        for app in apps:
            await app.start()
        await wait_until(lambda: all(a.tier.ready or a.tier.failure for a in apps), timeout=60, what="tiers ready")
        assert [a.tier.failure for a in apps if a.tier.failure] == []
        yield apps
    finally:
        for app in apps:
            await app.stop()


def chain_configs(kafka: KafkaSettings, t: dict[str, str], limit: float, *, entry: str = "edge",
                  input_config: dict[str, Any] | None = None, inference: int = 1) -> list[TierConfig]:
    """Tier configs from `entry` up to the cloud on one broker; topics in `t`: in, <tier>, out."""
    names = CHAIN[CHAIN.index(entry):]
    configs = []
    for k, name in enumerate(names):
        top = k == len(names) - 1
        configs.append(TierConfig(
            inference_id=inference, tier_index=k, top=top, input_topic=t["in"] if k == 0 else t[name],
            output_topic=t["out"], upper_topic=None if top else t[names[k + 1]], limit=limit,
            bootstrap_servers=kafka.bootstrap_servers,
            input_config=InputConfig.parse(input_config) if k == 0 and input_config else None, port=0))
    return configs


def check_against_offline(answers: list[wire.Answer], origins: dict[tuple[str, int, int, int], int],
                          expected: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]) -> int:
    """Every sample answered exactly once by the tier and with the class of the offline chain; the number of
    near-the-limit samples left out of the comparison."""
    tier, cls, probs, near = expected
    assert Counter(a.origin for a in answers) == Counter(dict.fromkeys(origins, 1)), "each sample once"
    for a in answers:
        i = origins[a.origin]
        if near[i]:
            continue
        assert (a.tier, a.cls) == (tier[i], cls[i]), f"sample {i} ({a.origin})"
        np.testing.assert_allclose(a.values, probs[i], atol=1e-5)
    return int(near.sum())


# -- correctness: the tiers answer exactly as the offline chain --------------------------------------------


@pytest.mark.parametrize("limit", [0.0, 0.5, 0.9, 1.01])
async def test_three_tiers_answer_every_sample_as_the_offline_chain(infra: Infra, chain: Chain,
                                                                    limit: float) -> None:
    kafka = kafka_on(infra.bootstrap_servers)
    t = await make_topics(kafka, **{"in": 1, "fog": 1, "cloud": 1, "out": 1})
    x = images(120, seed=int(limit * 100))
    configs = chain_configs(kafka, t, limit, input_config=FLOAT_IMAGES)
    configs[1] = replace(configs[1], linger_ms=2.0, max_batch=16)  # a lingering tier with small batches
    async with serving(kafka, configs, [chain.engines[n] for n in CHAIN]) as apps:
        # 60 Kafka-ML inputs (one sample's raw bytes, no headers) and 3 tierflow batched records of 20.
        singles = [(x[i].tobytes(), None) for i in range(60)]
        batches = [wire.encode_tensor(x[i:i + 20]) for i in range(60, 120, 20)]
        sent = await produce(kafka, t["in"], singles + batches)
        origins = {(t["in"], p, off, 0): i for i, (p, off) in enumerate(sent[:60])}
        for b, (p, off) in enumerate(sent[60:]):
            origins.update({(t["in"], p, off, j): 60 + 20 * b + j for j in range(20)})
        async with TopicReader(kafka, t["out"]) as out:
            await out.until(lambda r: len(r.answers()) >= 120, what="120 answers")
            await wait_until(lambda: sum(a.tier.stats.answered for a in apps) == 120, what="all settled")
            answers = out.answers()
            records = list(out.records)
    near = check_against_offline(answers, origins, chain.offline(x[..., None], limit))
    assert near <= 2
    tiers = Counter(a.tier for a in answers)
    if limit == 0.0:
        assert tiers == {0: 120}  # everything answers at the first exit
    if limit > 1:
        assert tiers == {2: 120}  # nothing is confident enough: everything reaches the top
    if 0 < limit <= 1:
        assert set(tiers) == {0, 1, 2}, tiers  # the exits really split the samples
    # Outputs mirror inputs: a Kafka-ML input gets `{"values": [...]}` with one sample; a batched record gets
    # one batched record per tier that answered some of its samples.
    for a in answers:
        assert a.batched == (origins[a.origin] >= 60)
    singles_out = [orjson.loads(r.value) for r in records if "origin" in orjson.loads(r.value)]
    assert len(singles_out) == 60 and all(len(d["values"]) == 10 for d in singles_out)
    batched_out = Counter((a.tier, a.origin[2]) for a in answers if a.batched)
    assert sum(1 for r in records if "origins" in orjson.loads(r.value)) == len(batched_out)
    # Every answer carries its timestamps: end-to-end latency and one forward time per tier it climbed.
    for a in answers:
        assert len(a.timestamps["forwarded"]) == a.tier and a.latency_ms >= 0


async def test_mid_chain_entry_takes_kafka_ml_and_thesis_tensors(infra: Infra, chain: Chain) -> None:
    # Inputs sent straight to the fog tier: Kafka-ML's header-less float32 tensors (what its edge forwards),
    # the 2020 thesis' JSON lists, and a tierflow tensor message; the cloud is the top.
    kafka = kafka_on(infra.bootstrap_servers)
    t = await make_topics(kafka, **{"in": 1, "cloud": 1, "out": 1})
    tensors = chain.engines["edge"].predict(images(30, seed=3)[..., None])[0]
    items: list[tuple[bytes, Headers | None]] = [(tensors[i].tobytes(), None) for i in range(10)]
    items += [(orjson.dumps(tensors[i].tolist()), None) for i in range(10, 20)]
    items.append(wire.encode_tensor(tensors[20:]))
    async with serving(kafka, chain_configs(kafka, t, 0.5, entry="fog"),
                       [chain.engines["fog"], chain.engines["cloud"]]):
        sent = await produce(kafka, t["in"], items)
        origins = {(t["in"], p, off, 0): i for i, (p, off) in enumerate(sent[:20])}
        origins.update({(t["in"], sent[20][0], sent[20][1], j): 20 + j for j in range(10)})
        async with TopicReader(kafka, t["out"]) as out:
            await out.until(lambda r: len(r.answers()) >= 30, what="30 answers")
            answers = out.answers()
    assert check_against_offline(answers, origins, chain.offline(tensors, 0.5, start=1)) <= 1
    assert {a.tier for a in answers} <= {0, 1}


# -- bad input never stops a tier ------------------------------------------------------------------------


async def test_malformed_inputs_go_to_dead_letters_and_the_tier_keeps_answering(infra: Infra,
                                                                                chain: Chain) -> None:
    # A single top tier on Kafka-ML uint8 images, its model loaded from the file (as `tier run --model`).
    kafka = kafka_on(infra.bootstrap_servers)
    t = await make_topics(kafka, **{"in": 1, "out": 1})
    config = TierConfig(inference_id=5, tier_index=0, top=True, input_topic=t["in"], output_topic=t["out"],
                        upper_topic=None, limit=0.8, bootstrap_servers=kafka.bootstrap_servers,
                        input_config=InputConfig.parse(UINT8_IMAGES), model=chain.files["edge"], port=0)
    good = (np.random.default_rng(4).integers(0, 256, (28, 28)) // 16).astype(np.uint8)
    bad_header = [("tierflow.v", b"1"), ("tierflow.dtype", b"complex64"), ("tierflow.shape", b"28,28")]
    malformed: list[tuple[bytes, Headers | None]] = [
        (good.tobytes()[:-5], None),  # wrong size
        (good.astype(np.float32).tobytes(), None),  # wrong dtype
        (b"", None),  # empty
        (b"[1, 2, {]", None),  # garbage JSON
        (b"\0" * 1568, bad_header),  # a tensor message with a type no model takes
    ]
    async with serving(kafka, [config], [None]) as [app]:
        sent = await produce(kafka, t["in"], [(good.tobytes(), None), *malformed, (good.tobytes(), None)])
        async with TopicReader(kafka, kafka.deadletter_topic) as dead, TopicReader(kafka, t["out"]) as out:
            await dead.until(lambda r: len(r.records) >= 5, what="5 dead letters")
            await out.until(lambda r: len(r.answers()) >= 2, what="the good inputs answered")
            # Still answering after the bad ones.
            [(_, after)] = await produce(kafka, t["in"], [(good.tobytes(), None)])
            await out.until(lambda r: any(a.origin[2] == after for a in r.answers()), what="answer after")
            letters = [orjson.loads(r.value) for r in dead.records]
        assert [d["origin"]["offset"] for d in letters] == [off for _, off in sent[1:6]]
        reasons = [d["reason"] for d in letters]
        assert "779 bytes, expected 784 bytes of uint8 28x28" in reasons[0]
        assert "float32" in reasons[1] and "empty value" in reasons[2] and "JSON" in reasons[3]
        assert "not numeric" in reasons[4]
        assert all(d["agent"] == "tier-0" for d in letters)
        assert app.tier.stats.deadlettered == 5 and app.tier.failure is None
        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{web_port(app)}"
            async with http.get(f"{base}/healthz") as resp:
                assert resp.status == 200
            async with http.get(f"{base}/readyz") as resp:
                body = await resp.json()
                assert resp.status == 200 and body["model_loaded"] and body["consumer_joined"]
            async with http.get(f"{base}/metrics") as resp:
                metrics = await resp.text()
        assert 'tierflow_tier_deadlettered_total{inference="5",tier="0"} 5.0' in metrics
        assert 'tierflow_tier_answered_total{inference="5",tier="0"} 3.0' in metrics
        assert 'tierflow_tier_latency_seconds_count{inference="5",tier="0"} 3' in metrics


# -- each tier on its own cluster ----------------------------------------------------------------------------


async def test_a_tier_forwards_to_an_upper_tier_on_a_second_broker(infra: Infra, chain: Chain) -> None:
    port = services.free_port()
    broker = services.spawn(services.tansu_spec(port), ARTIFACTS / "tansu-second.log")
    try:
        await asyncio.to_thread(services.wait_for_port, port, deadline_s=20, proc=broker, what="second Tansu")
        edge_site, core = kafka_on(infra.bootstrap_servers), kafka_on(f"127.0.0.1:{port}")
        a = await make_topics(edge_site, **{"in": 1, "out": 1})
        b = await make_topics(core, **{"fog": 1, "cloud": 1, "out": 1})
        configs = [
            TierConfig(2, 0, False, a["in"], a["out"], b["fog"], 0.5, edge_site.bootstrap_servers,
                       upper_bootstrap_servers=core.bootstrap_servers,
                       input_config=InputConfig.parse(FLOAT_IMAGES), port=0),
            TierConfig(2, 1, False, b["fog"], b["out"], b["cloud"], 0.5, core.bootstrap_servers, port=0),
            TierConfig(2, 2, True, b["cloud"], b["out"], None, 0.5, core.bootstrap_servers, port=0),
        ]
        x = images(40, seed=5)
        async with serving(edge_site, configs, [chain.engines[n] for n in CHAIN]):
            sent = await produce(edge_site, a["in"], [(x[i].tobytes(), None) for i in range(40)])
            origins = {(a["in"], p, off, 0): i for i, (p, off) in enumerate(sent)}
            async with TopicReader(edge_site, a["out"]) as near, TopicReader(core, b["out"]) as far:
                async def all_answered() -> bool:
                    await near.read()
                    await far.read()
                    return len(near.answers()) + len(far.answers()) >= 40

                await wait_until(all_answered, what="40 answers on the two brokers")
                answers = near.answers() + far.answers()
        assert check_against_offline(answers, origins, chain.offline(x[..., None], 0.5)) <= 1
        assert {a.tier for a in near.answers()} == {0} and {a.tier for a in far.answers()} <= {1, 2}
        assert far.answers(), "some samples climbed to the second broker"
    finally:
        services.stop(broker)


# -- at-least-once through kill -9, and a draining SIGTERM --------------------------------------------------


def _spawn_tier(args: list[str], kafka: KafkaSettings, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers, "TIERFLOW_SESSION_TIMEOUT_MS": "1000",
           "TIERFLOW_TOPIC_PREFIX": kafka.topic_prefix, "PYTHONUNBUFFERED": "1"}
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "tierflow.tiers.tier_cli", "run", *args], env=env,
                                stdout=out, stderr=subprocess.STDOUT)


async def _readyz(port: int) -> dict[str, Any] | None:
    try:
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/readyz") as resp:
            body: dict[str, Any] = await resp.json()
            return body if resp.status == 200 else None
    except aiohttp.ClientError:
        return None


@pytest.mark.slow
async def test_kill_9_in_the_middle_of_20000_inputs_loses_none(infra: Infra, chain: Chain) -> None:
    # A LiteRT tier in a subprocess (no TensorFlow in it), killed with SIGKILL halfway, then restarted.
    kafka = kafka_on(infra.bootstrap_servers)
    t = await make_topics(kafka, **{"in": 2, "out": 1})
    port = services.free_port()
    args = ["--model", str(chain.files["edge_tflite"]), "--engine", "litert", "--input-topic", t["in"],
            "--output-topic", t["out"], "--top", "--input-config", orjson.dumps(UINT8_IMAGES).decode(),
            "--inference-id", "900", "--port", str(port), "--max-batch", "64"]
    log = ARTIFACTS / f"tier-kill9-{kafka.topic_prefix}.log"
    x = np.random.default_rng(6).integers(0, 16, (20000, 28, 28), dtype=np.uint8)
    items = [(x[i].tobytes(), None) for i in range(20000)]
    proc = _spawn_tier(args, kafka, log)
    try:
        ready: dict[str, Any] = {}

        async def is_ready() -> bool:
            body = await _readyz(port)
            ready.update(body or {})
            return body is not None or proc.poll() is not None

        await wait_until(is_ready, timeout=60, what="the tier subprocess ready")
        assert proc.poll() is None, log.read_text()[-2000:]
        assert ready["tensorflow_loaded"] is False and ready["engine"] == "litert"
        sent = [*await produce(kafka, t["in"], items[:5000], partition=0),
                *await produce(kafka, t["in"], items[5000:10000], partition=1)]
        async with TopicReader(kafka, t["out"]) as out:
            await out.until(lambda r: len(r.records) >= 1000, what="the first answers")
            proc.kill()  # SIGKILL: no drain, no commit of the batch in flight
            await asyncio.to_thread(proc.wait, 10)
            sent += [*await produce(kafka, t["in"], items[10000:15000], partition=0),
                     *await produce(kafka, t["in"], items[15000:], partition=1)]
            proc = _spawn_tier(args, kafka, log)
            expected = {(t["in"], p, off, 0) for p, off in sent}
            await out.until(lambda r: expected <= {a.origin for a in r.answers()}, timeout=90,
                            what="an answer for each of the 20,000 inputs")
            answers = out.answers()
        duplicates = len(answers) - len({a.origin for a in answers})
        assert len({a.origin for a in answers}) == 20000 and {a.origin for a in answers} == expected
        print(f"kill -9: {len(answers)} answers for 20000 inputs ({duplicates} duplicates, by origin)")
        # SIGTERM drains: the restarted tier exits 0 with every offset committed.
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
        group = kio.consumer(kafka, group_id="tierflow-inference-900-tier-0")
        await group.start()
        try:
            committed = [await group.committed(TopicPartition(t["in"], p)) for p in (0, 1)]
        finally:
            await group.stop()
        assert committed == [10000, 10000]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        # The SIGKILLed agent could not remove its Faust data directory.
        for leftover in Path(tempfile.gettempdir()).glob("tierflow-inference-900-tier-0-*-faust"):
            shutil.rmtree(leftover, ignore_errors=True)


@pytest.mark.slow
async def test_a_keras_tier_forked_from_the_zygote_answers_as_the_model_and_drains(infra: Infra, chain: Chain,
                                                                                    tmp_path: Path) -> None:
    # The embedded stack's way with TIERFLOW_TIER_ENGINE=keras: the local launcher forks the tier from a zygote that
    # imported TensorFlow already (deploy/local_zygote.py); the forked tier loads its model and serves as any tier.
    from tierflow.deploy.local_launcher import LocalLauncher
    from tierflow.deploy.local_zygote import DEFAULT_PRELOAD, ZYGOTE_LOG, TierZygote
    from tierflow.streams.launcher import WorkloadSpec

    kafka = kafka_on(infra.bootstrap_servers)
    t = await make_topics(kafka, **{"in": 1, "out": 1})
    port = services.free_port()
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers, "TIERFLOW_SESSION_TIMEOUT_MS": "1000",
           "TIERFLOW_TOPIC_PREFIX": kafka.topic_prefix, "PYTHONUNBUFFERED": "1"}
    zygote = TierZygote(env, tmp_path / ZYGOTE_LOG, preload=DEFAULT_PRELOAD)
    launcher = LocalLauncher(tmp_path / "workloads", env, zygote=zygote)
    args = ["tier", "run", "--model", str(chain.files["edge"]), "--engine", "keras", "--input-topic", t["in"],
            "--output-topic", t["out"], "--top", "--inference-id", "901", "--port", str(port)]
    x = images(40, seed=11)
    try:
        await launcher.launch(WorkloadSpec(name="keras-tier", kind="inference", args=args))
        ready: dict[str, Any] = {}

        async def is_ready() -> bool:
            body = await _readyz(port)
            ready.update(body or {})
            return body is not None

        await wait_until(is_ready, timeout=90, what="the forked Keras tier ready")
        assert ready["engine"] == "keras" and ready["tensorflow_loaded"] is True
        record = orjson.loads((launcher.workload_dir("keras-tier") / "spec.json").read_bytes())
        assert record["forked"] is True
        sent = await produce(kafka, t["in"], [(x[i].tobytes(), None) for i in range(len(x))])
        async with TopicReader(kafka, t["out"]) as out:
            await out.until(lambda r: len(r.answers()) >= len(x), what="an answer for each of 40 inputs")
            answers = out.answers()
        probabilities = chain.engines["edge"].predict(x[..., None])[1]
        origins = {(t["in"], partition, offset, 0): i for i, (partition, offset) in enumerate(sent)}
        assert sorted(origins[a.origin] for a in answers) == list(range(len(x)))
        for a in answers:
            np.testing.assert_allclose(a.values, probabilities[origins[a.origin]], atol=1e-5)
        # SIGTERM (what `stop` sends) reaches the forked tier through its supervisor: it drains and exits 0.
        pid, _ = (launcher.workload_dir("keras-tier") / "pid").read_text().split()
        os.kill(int(pid), signal.SIGTERM)

        async def ended() -> bool:
            return any(w.finished for w in await launcher.list())

        await wait_until(ended, timeout=60, what="the forked tier to drain and exit")
        (status,) = await launcher.list()
        assert (status.phase, status.exit_code) == ("succeeded", 0), status.reason
    finally:
        await launcher.stop_all()
        await launcher.close()


# -- configured from the API ---------------------------------------------------------------------------------


async def test_a_tier_is_configured_from_the_api_with_a_verified_model(chain: Chain) -> None:
    tflite = chain.files["edge_tflite"].read_bytes()
    inference = {"id": 7, "status": "running", "input_topic": "in", "output_topic": "out", "input_format": "RAW",
                 "input_config": UINT8_IMAGES, "tiers": [
                     {"index": 0, "result_id": 11, "input_topic": "in", "upper_topic": "fog", "limit": 0.6,
                      "bootstrap_servers": ""},
                     {"index": 1, "result_id": 12, "input_topic": "fog", "upper_topic": None, "limit": 0.8,
                      "bootstrap_servers": "fog-site:9092"}]}
    tampered = {"on": False}

    async def get_inference(request: web.Request) -> web.Response:
        if request.match_info["id"] != "7":
            return web.json_response({"error": {"message": "no inference 8"}}, status=404)
        return web.json_response(inference)

    async def get_model(request: web.Request) -> web.Response:
        if request.query.get("format") == "tflite" and request.match_info["id"] == "12":  # not convertible
            return web.json_response({"error": {"message": "result 12 has no 'tflite' artefact"}}, status=404)
        data = tflite if request.query.get("format") == "tflite" else b"PK\x03\x04keras"
        digest = hashlib.sha256(b"other" if tampered["on"] else data).hexdigest()
        return web.Response(body=data, headers={"X-Sha256": digest})

    api = web.Application()
    api.router.add_get("/inferences/{id}", get_inference)
    api.router.add_get("/results/{id}/model", get_model)
    async with TestServer(api) as server:
        url = str(server.make_url(""))
        config = await config_from_api(url, 7, 0, default_servers="core:9092", engine="litert", port=0)
        assert config.model == tflite and config.engine == "litert"
        assert (config.input_topic, config.upper_topic, config.limit, config.top) == ("in", "fog", 0.6, False)
        assert (config.bootstrap_servers, config.upper_servers) == ("core:9092", "fog-site:9092")
        assert config.input_config == InputConfig.parse(UINT8_IMAGES)
        # No engine asked for: LiteRT where the result has a .tflite, Keras where it has none.
        auto = [await config_from_api(url, 7, k, default_servers="core:9092", engine="auto", port=0) for k in (0, 1)]
        assert [(c.engine, c.model) for c in auto] == [("litert", tflite), ("keras", b"PK\x03\x04keras")]
        with pytest.raises(TierSetupError, match="no inference 8") as missing:
            await config_from_api(url, 8, 0, default_servers="core:9092")
        assert missing.value.exit_code == 2
        tampered["on"] = True
        with pytest.raises(TierSetupError, match="hash to") as corrupt:
            await config_from_api(url, 7, 1, default_servers="core:9092")
        assert corrupt.value.exit_code == 1
    with pytest.raises(TierSetupError, match="cannot reach the tierflow API") as unreachable:
        await config_from_api(f"http://127.0.0.1:{services.free_port()}", 7, 0, default_servers="core:9092")
    assert unreachable.value.exit_code == 1


# -- engines ------------------------------------------------------------------------------------------------


def test_litert_answers_equal_keras_within_tolerance(chain: Chain) -> None:
    keras, lite = chain.engines["edge"], LiteRTEngine.from_path(chain.files["edge_tflite"])
    assert (lite.input_shape, lite.n_outputs) == (keras.input_shape, keras.n_outputs) == ((28, 28, 1), 2)
    x = images(300, seed=8)[..., None]
    for batch in (x[:1], x[:7], x):  # the interpreter is resized to each batch size
        expected, got = keras.predict(batch), lite.predict(batch)
        assert [o.shape for o in got] == [(len(batch), 64), (len(batch), 10)]  # Keras order: tensor, probs
        for e, g in zip(expected, got, strict=True):
            np.testing.assert_allclose(g, e, atol=LITERT_TOLERANCE)


# -- pure parts of the agent ----------------------------------------------------------------------------------


def test_tier_configs_that_cannot_work_are_refused() -> None:
    base: dict[str, Any] = {"inference_id": 1, "tier_index": 0, "top": False, "input_topic": "in",
                            "output_topic": "out", "upper_topic": "up", "limit": 0.5, "bootstrap_servers": "b:9092"}
    TierConfig(**base)
    for change, message in [({"upper_topic": None}, "upper topic"), ({"limit": -0.1}, "limit"),
                            ({"engine": "onnx"}, "engine"), ({"max_batch": 0}, "max_batch"),
                            ({"input_format": "CSV"}, "RAW or AVRO"), ({"bootstrap_servers": ""}, "bootstrap")]:
        with pytest.raises(TierConfigError, match=message):
            TierConfig(**{**base, **change})


def test_avro_inputs_decode_on_a_first_tier(chain: Chain) -> None:
    # Kafka-ML's AvroSink data record (no label) on an entry tier announced with input_format AVRO.
    scheme = {"type": "record", "name": "data", "fields": [{"name": "pixels", "type": {"type": "array",
                                                                                       "items": "float"}}]}
    config = TierConfig(inference_id=1, tier_index=0, top=True, input_topic="in", output_topic="out",
                        upper_topic=None, limit=0.5, bootstrap_servers="b:9092", input_format="AVRO",
                        input_config=InputConfig.parse({"data_scheme": scheme}))
    spec = input_spec(config, chain.engines["edge"])
    pixels = np.linspace(0, 1, 784, dtype=np.float32)
    buf = io.BytesIO()
    schemaless_writer(buf, parse_schema(scheme), {"pixels": pixels.tolist()})
    batch = wire.decode_records([wire.WireRecord("in", 0, 0, buf.getvalue()), wire.WireRecord("in", 0, 1, b"\x07")],
                                spec, now_ms=0.0)
    np.testing.assert_allclose(batch.x.reshape(-1), pixels)
    assert [r.index for r in batch.rejected] == [1] and "not Avro" in batch.rejected[0].reason


def test_an_input_config_that_does_not_fit_the_model_is_a_config_error(chain: Chain) -> None:
    config = TierConfig(inference_id=1, tier_index=0, top=True, input_topic="in", output_topic="out",
                        upper_topic=None, limit=0.5, bootstrap_servers="b:9092",
                        input_config=InputConfig.parse({"data_type": "uint8", "data_reshape": "8 8"}))
    with pytest.raises(TierConfigError, match="does not fit the model"):
        input_spec(config, chain.engines["edge"])


def test_the_tier_process_keeps_freed_batch_memory_where_malloc_is_glibc() -> None:
    # `run_worker` tunes glibc's malloc so that each batch's megabyte buffers reuse the heap instead of
    # fresh pages; where the C library is glibc the tuning must really apply, not fall back silently.
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert keep_freed_memory()


@pytest.mark.parametrize("n", [7, 40])  # one by one (a bisect each), and in one numpy call
def test_the_bulk_histogram_counts_like_prometheus(n: int) -> None:
    values = np.resize(np.array([0.0004, 0.001, 0.003, 0.05, 0.05, 2.0, 100.0]), n)
    buckets = (0.001, 0.01, 0.1, 1.0)
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    histogram = BulkHistogram("lat", "x", buckets)
    histogram.observe_many(values[:3])
    histogram.observe_many(values[3:])

    class Exported(Collector):
        def collect(self) -> Iterable[Metric]:
            yield histogram.family({"tier": "0"})

    ours.register(Exported())
    reference = Histogram("lat", "x", ["tier"], registry=theirs, buckets=buckets).labels("0")
    for v in values:
        reference.observe(v)

    def series(registry: CollectorRegistry) -> list[str]:
        return sorted(line for line in generate_latest(registry).decode().splitlines()
                      if line.startswith("lat_") and "_created" not in line)

    def total(lines: list[str]) -> float:
        return float(next(line for line in lines if line.startswith("lat_sum")).split()[-1])

    # The same buckets and count; the same sum but for the order of the additions (a batch's sum at once).
    assert [x for x in series(ours) if "_sum" not in x] == [x for x in series(theirs) if "_sum" not in x]
    assert total(series(ours)) == pytest.approx(total(series(theirs)), rel=1e-12)
