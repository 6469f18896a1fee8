"""Tier inference benchmark: a Kafka-ML style loop vs the tier agent, the model's limit, 3-tier latency.

Run: `python benchmarks/tier_inference.py [--quick] 2>/dev/null` (quick ~1.5 min, full ~5 min on the 2-core
machine; TensorFlow logs to stderr, the figures go to stdout).

Starts its own Tansu broker (as the embedded stack does), builds the fixtures' edge -> fog -> cloud chain
(`tests/fixtures/kafka_ml_models`, seeded random weights: throughput and latency do not need accuracy;
the edge exit's last layer is scaled so that its confidences spread and `--limit` splits the samples
between answers and forwards), saves it as `.keras` and `.tflite`, and measures on 28x28 inputs:

  (a)  baseline, the way Kafka-ML's inference works: one `model.predict` per message, an answer or a
       forward per message, a commit every 16 messages (this process, tf-keras);
  (b1) one first-tier agent process (`tierflow.tiers.tier_cli run`, as the orchestrator launches it) fed one
       sample per record (Kafka-ML's raw bytes);
  (b2) the same agent process fed tierflow tensor messages of `--per-record` samples;
  (c)  the model alone (same engine as b) on pre-decoded batches of `--max-batch` samples (the limit).
b1 and b2 read a topic filled before the agent starts (so the producer does not share the CPU with it),
in rounds b1, b2, b1, b2, ...; a rate is measured between 10% and 90% of a round's samples from the
agent's own counters (`GET /readyz` stats, polled every 25 ms). Each engine (keras, litert) and input dtype
(uint8, float32: float32 is the fixtures' and the training e2e's datasource dtype) gets its own agent.
Then end-to-end latency through three agent processes (edge, fog, cloud; limit 1.01 so every sample climbs
to the top) with Kafka-ML single-sample inputs paced at `--rate` per second: the answer's own latency
(input record timestamp -> answered at the cloud) and the client's (send -> answer read from the output
topic), p50 and p99, with the time each hop took; the baseline is the same traffic through three bare
aiokafka hop processes (consume -> produce, no model, no Faust, on the tiers' event loop: uvloop where
installed): the broker's floor on this machine. Each
engine's run follows its own baseline run on a fresh broker, --latency-runs times (default 3), interleaved;
the medians of the client/bare ratios (p99, and p50 beside it) are the result.
Each agent's and the broker's CPU per sample is printed with the rates: on a shared machine the rates move
with the other load, the CPU per sample much less. Each latency run also prints the share of the machine's CPU
that its hypervisor gave to other guests meanwhile (/proc/stat steal): on a VM with noisy neighbours it reached
25-48% in some runs, and the latencies of such a run are not a quiet machine's.
Tansu's memory storage answers slower as a partition grows (bare hops: p50 17 ms over the first 1,000
inputs at 200/s, 77 ms over the 6th), so the latency runs are short (10 s after a 2 s warm-up, on a fresh
broker) and print their p50 per 1,000 inputs.
Targets (issue 4): (b1)/(a) >= 100, (b2)/(c) >= 0.5, 3-tier p99 <= 50 ms at 200 inputs/s; (issue 12) client p99 /
bare p99 <= 1.2 for each engine, the median of 3 runs of >= 10 s each.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
from aiokafka import TopicPartition

from tierflow.deploy import services
from tierflow.streams import kafka as kio
from tierflow.streams import wire
from tierflow.streams.settings import KafkaSettings
from tierflow.streams.topics import TopicSpec, ensure_topics
from tierflow.tiers import tier_agent, tier_config

SNIPPETS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "kafka_ml_models"
CHAIN = ("edge", "fog", "cloud")
#: Scale of the edge exit's last layer (as the tier tests do): spreads the random model's confidences.
EDGE_SCALE = 6.0
KAFKA_ML_COMMIT_EVERY = 16
POLL_S = 0.025


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# -- the chain ------------------------------------------------------------------------------------------------


def build_chain(folder: Path, seed: int) -> dict[str, Path]:
    """The fixtures' sub-models with seeded random weights, as `<name>.keras` and `<name>.tflite`."""
    from tierflow.tiers.keras_code import build_model, load_keras
    from tierflow.tiers.training import export_keras, export_tflite

    _, keras = load_keras()
    keras.utils.set_random_seed(seed)
    files: dict[str, Path] = {}
    for name in CHAIN:
        model = build_model((SNIPPETS / f"{name}.py").read_text())
        if name == "edge":
            layer = model.get_layer("edge_output")
            weights, bias = layer.get_weights()
            layer.set_weights([weights * EDGE_SCALE, bias])
        files[name] = folder / f"{name}.keras"
        files[name].write_bytes(export_keras(model).data)
        files[f"{name}_tflite"] = folder / f"{name}.tflite"
        files[f"{name}_tflite"].write_bytes(export_tflite(model).data)
    return files


def images(n: int, dtype: str, seed: int) -> np.ndarray:
    """28x28 inputs: uint8 pixels, or float32 in [0, 1] scaled by a per-image contrast."""
    rng = np.random.default_rng(seed)
    if dtype == "uint8":
        return (rng.integers(0, 256, (n, 28, 28)) // rng.integers(1, 16, (n, 1, 1))).astype(np.uint8)
    return (rng.random((n, 28, 28)) * rng.uniform(0.2, 1.0, (n, 1, 1))).astype(np.float32)


def limit_for(files: dict[str, Path], dtype: str, share: float) -> float:
    """The edge limit at which about `share` of such inputs are answered at the edge (the rest forwarded)."""
    from tierflow.tiers.engines import KerasEngine

    probs = KerasEngine.from_path(files["edge"]).predict(images(4000, dtype, seed=99).astype(np.float32)[..., None])[1]
    return float(np.quantile(probs.max(axis=1), 1 - share))


def input_config(dtype: str) -> dict[str, str]:
    return {"data_type": dtype, "data_reshape": "28 28"}


# -- broker helpers -------------------------------------------------------------------------------------------


async def make_topics(kafka: KafkaSettings, *names: str, partitions: int = 1) -> None:
    await ensure_topics(kafka, extra=[TopicSpec(n, partitions, -1) for n in names])


def read_from_start(consumer: Any, topic: str, partitions: int) -> list[TopicPartition]:
    """Assign every partition of `topic` to a group-less consumer, from offset 0."""
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer.assign(tps)
    for tp in tps:
        consumer.seek(tp, 0)
    return tps


async def fill(kafka: KafkaSettings, topic: str, items: list[tuple[bytes, list[tuple[str, bytes]] | None]]) -> None:
    producer = kio.producer(kafka, max_batch_size=1024 * 1024, linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, value, headers=headers, partition=0) for value, headers in items]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


# -- (a) the Kafka-ML style loop ------------------------------------------------------------------------------


async def kafka_ml_loop(kafka: KafkaSettings, model_file: Path, dtype: str, n: int, limit: float,
                        topics: dict[str, str]) -> float:
    """Kafka-ML's inference, as written there: per message decode, `model.predict`, an answer (JSON values)
    or a forward (the raw float32 tensor), and a commit every 16 messages. Messages per second."""
    from tierflow.tiers.training import load_keras

    model = load_keras(model_file.read_bytes())
    x = images(n, dtype, seed=1)
    await fill(kafka, topics["in"], [(x[i].tobytes(), None) for i in range(n)])
    consumer = kio.consumer(kafka, group_id=f"kafka-ml-{topics['in']}", session_timeout_ms=1000,
                            heartbeat_interval_ms=300)
    producer = kio.producer(kafka)
    await consumer.start()
    await producer.start()
    consumer.subscribe([topics["in"]])
    np_dtype = np.dtype(dtype)
    try:
        model.predict(np.zeros((1, 28, 28, 1), np.float32), verbose=0)  # first-call set-up, not measured
        pending: list[Any] = []
        started = 0.0
        for i in range(n):
            msg = await consumer.getone()
            if i == 0:
                started = time.perf_counter()
            sample = np.frombuffer(msg.value, dtype=np_dtype).reshape(1, 28, 28, 1).astype(np.float32)
            tensor, probs = model.predict(sample, verbose=0)
            if float(probs.max()) >= limit:
                pending.append(await producer.send(topics["out"], orjson.dumps({"values": probs[0].tolist()})))
            else:
                pending.append(await producer.send(topics["up"], tensor[0].astype(np.float32).tobytes()))
            if (i + 1) % KAFKA_ML_COMMIT_EVERY == 0:
                await asyncio.gather(*pending)
                pending.clear()
                await consumer.commit()
        await asyncio.gather(*pending)
        await consumer.commit()
        # The first message is not timed (it starts the clock): n - 1 messages in the window.
        return (n - 1) / (time.perf_counter() - started)
    finally:
        await consumer.stop()
        await producer.stop()


# -- (c) the model alone -------------------------------------------------------------------------------------


def model_alone(engine_kind: str, files: dict[str, Path], batch: int, seconds: float) -> float:
    """Samples per second of `engine.predict` on pre-decoded float32 batches of `batch` samples."""
    from tierflow.tiers.engines import load_engine

    engine = load_engine(engine_kind, files["edge"] if engine_kind == "keras" else files["edge_tflite"])
    x = images(batch * 8, "float32", seed=2)[..., None]
    chunks = [x[i:i + batch] for i in range(0, len(x), batch)]
    for c in chunks[:2]:
        engine.predict(c)
    done, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        for c in chunks:
            engine.predict(c)
            done += len(c)
    return done / elapsed


# -- the tier agent processes --------------------------------------------------------------------------------


@dataclass
class Agent:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    http: aiohttp.ClientSession = field(repr=False)

    async def stats(self) -> dict[str, Any] | None:
        try:
            async with self.http.get(f"http://127.0.0.1:{self.port}/readyz") as resp:
                body: dict[str, Any] = await resp.json()
                return body
        except (aiohttp.ClientError, ValueError):
            return None

    async def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent {self.name} exited {self.proc.returncode}: "
                                   f"{self.log.read_text()[-3000:]}")
            body = await self.stats()
            if body is not None and body.get("status") == "ready":
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"agent {self.name} not ready in {timeout} s; log {self.log}")

    def stop(self) -> int:
        return services.stop(self.proc, grace_s=30)


def spawn_agent(name: str, http: aiohttp.ClientSession, home: Path, kafka: KafkaSettings, args: argparse.Namespace,
                *, model: Path, engine: str, input_topic: str, output_topic: str, upper_topic: str | None,
                limit: float, tier_index: int, config: dict[str, str] | None) -> Agent:
    port = services.free_port()
    argv = [sys.executable, "-m", "tierflow.tiers.tier_cli", "run", "--model", str(model), "--engine", engine,
            "--input-topic", input_topic, "--output-topic", output_topic, "--limit", str(limit),
            "--tier-index", str(tier_index), "--bootstrap-servers", kafka.bootstrap_servers,
            "--port", str(port), "--max-batch", str(args.max_batch), "--linger-ms", str(args.linger_ms),
            "--group", f"bench-{input_topic}"]
    argv += ["--upper-topic", upper_topic] if upper_topic else ["--top"]
    argv += ["--check-crcs"] if args.check_crcs else []
    if config:
        argv += ["--input-config", orjson.dumps(config).decode()]
    env = {**os.environ, "TIERFLOW_FETCH_MAX_WAIT_MS": str(args.fetch_wait_ms), "TIERFLOW_SESSION_TIMEOUT_MS": "1000",
           "TIERFLOW_TOPIC_PREFIX": kafka.topic_prefix, "TIERFLOW_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"}
    log = home / f"agent-{name}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    if args.py_spy:  # profile the agent until it exits (collapsed stacks, one file per agent)
        subprocess.Popen([args.py_spy, "record", "--pid", str(proc.pid), "--rate", "250", "--format", "raw",
                          "--output", str(home / f"profile-{name}.txt")], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    return Agent(name, proc, port, log, http)


async def agent_rounds(kafka: KafkaSettings, http: aiohttp.ClientSession, home: Path, args: argparse.Namespace,
                       files: dict[str, Path], engine: str, dtype: str, limit: float, tag: str,
                       broker_pid: int) -> tuple[list[Rate], list[Rate], float]:
    """(b1 rates, b2 rates, answered fraction): rounds of one-sample and batched records through one agent."""
    topics = {k: f"{kafka.topic_prefix}.{tag}.{k}" for k in ("in", "out", "up")}
    await make_topics(kafka, *topics.values())
    rounds: list[tuple[str, int]] = []  # (kind, samples)
    items: list[tuple[bytes, list[tuple[str, bytes]] | None]] = []
    for r in range(args.repeats):
        x1 = images(args.b1_records, dtype, seed=10 + r)
        items += [(x1[i].tobytes(), None) for i in range(len(x1))]
        rounds.append(("b1", len(x1)))
        x2 = images(args.b2_samples, dtype, seed=20 + r)
        k = args.per_record
        items += [wire.encode_tensor(x2[i:i + k]) for i in range(0, len(x2), k)]
        rounds.append(("b2", len(x2)))
    await fill(kafka, topics["in"], items)
    del items
    model = files["edge"] if engine == "keras" else files["edge_tflite"]
    agent = spawn_agent(f"{tag}", http, home, kafka, args, model=model, engine=engine, input_topic=topics["in"],
                        output_topic=topics["out"], upper_topic=topics["up"], limit=limit, tier_index=0,
                        config=input_config(dtype))
    total = sum(n for _, n in rounds)
    timeline: list[tuple[float, int]] = []
    cpu: list[tuple[float, float]] = []  # (agent, broker) CPU seconds at each timeline point
    answered = 0
    try:
        deadline = time.monotonic() + 180
        while True:
            if agent.proc.poll() is not None:
                raise RuntimeError(f"agent {tag} exited: {agent.log.read_text()[-3000:]}")
            body = await agent.stats()
            if body is not None:
                s = body["stats"]
                done = int(s["answered"]) + int(s["forwarded"])
                timeline.append((time.perf_counter(), done))
                cpu.append((cpu_seconds(agent.proc.pid), cpu_seconds(broker_pid)))
                answered = int(s["answered"])
                if done >= total:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"agent {tag} did not finish; log {agent.log}")
            await asyncio.sleep(POLL_S)
    finally:
        code = agent.stop()
    if code != 0:
        raise RuntimeError(f"agent {tag} exited {code} on SIGTERM; log {agent.log}")
    rates: dict[str, list[Rate]] = {"b1": [], "b2": []}
    start = 0
    for kind, n in rounds:
        lo, hi = _crossing(timeline, cpu, start + 0.1 * n), _crossing(timeline, cpu, start + 0.9 * n)
        samples = 0.8 * n
        rates[kind].append(Rate(samples / (hi[0] - lo[0]), (hi[1] - lo[1]) / samples * 1e6,
                                (hi[2] - lo[2]) / samples * 1e6))
        start += n
    return rates["b1"], rates["b2"], answered / total


@dataclass(frozen=True)
class Rate:
    """Samples per second of a round, and the CPU the agent process and the broker spent per sample (us)."""

    per_s: float
    agent_us: float
    broker_us: float

    def __str__(self) -> str:
        return f"{self.per_s:,.0f}/s (cpu/sample: agent {self.agent_us:.1f} us, broker {self.broker_us:.1f} us)"


def machine_ticks() -> tuple[int, int]:
    """(stolen, all) CPU ticks of the whole machine so far (/proc/stat; (0, 0) where there is none): the share
    a hypervisor gave to other guests says whether a run's latencies were measured on a quiet machine."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_text(before: tuple[int, int], after: tuple[int, int]) -> str:
    stolen, ticks = after[0] - before[0], after[1] - before[1]
    return f"CPU stolen by the hypervisor {stolen / ticks:.0%}" if ticks > 0 else "CPU steal unknown"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _crossing(timeline: list[tuple[float, int]], cpu: list[tuple[float, float]],
              level: float) -> tuple[float, float, float]:
    """When the processed count reached `level`, and the agent's and the broker's CPU seconds then (linear
    between two polls)."""
    for i, ((t0, v0), (t1, v1)) in enumerate(itertools.pairwise(timeline)):
        if v0 < level <= v1:
            f = (level - v0) / (v1 - v0)
            (a0, b0), (a1, b1) = cpu[i], cpu[i + 1]
            return t0 + (t1 - t0) * f, a0 + (a1 - a0) * f, b0 + (b1 - b0) * f
    raise ValueError(f"level {level} not reached")


# -- end-to-end latency through three tiers ---------------------------------------------------------------------


async def forward(servers: str, source: str, target: str, fetch_wait_ms: int, partitions: int) -> None:
    """A bare hop (`--hop`, in its own process): aiokafka consume -> produce, record by record, no model."""
    kafka = KafkaSettings(bootstrap_servers=servers, fetch_max_wait_ms=fetch_wait_ms)
    consumer, producer = kio.consumer(kafka), kio.producer(kafka)
    await consumer.start()
    await producer.start()
    read_from_start(consumer, source, partitions)
    print("ready", flush=True)
    while True:
        batch = await consumer.getmany(timeout_ms=200)
        for records in batch.values():
            for r in records:
                await producer.send(target, r.value, key=r.key)


async def bare_hops_latency(kafka: KafkaSettings, home: Path, args: argparse.Namespace, broker_pid: int
                            ) -> tuple[list[float], list[float]]:
    """Client latencies (ms) of the same traffic through three bare hop processes: the broker's floor; and the
    CPU per input (us) of each hop process and of the broker over the traffic."""
    t = [f"{kafka.topic_prefix}.bare.{k}" for k in ("in", "h1", "h2", "out")]
    await make_topics(kafka, *t, partitions=args.partitions)
    hops = []
    try:
        for source, target in itertools.pairwise(t):
            proc = subprocess.Popen([sys.executable, __file__, "--hop", kafka.bootstrap_servers, source, target,
                                     "--fetch-wait-ms", str(args.fetch_wait_ms), "--partitions",
                                     str(args.partitions)], stdout=subprocess.PIPE,
                                    stderr=(home / "hops.log").open("ab"), start_new_session=True)
            hops.append(proc)
            assert proc.stdout is not None
            line = await asyncio.to_thread(proc.stdout.readline)
            if line.strip() != b"ready":
                raise RuntimeError(f"a bare hop did not start; see {home / 'hops.log'}")
        pids = [proc.pid for proc in hops] + [broker_pid]
        before = [cpu_seconds(pid) for pid in pids]
        latencies = await paced_round_trips(kafka, t[0], t[-1], args, lambda value: int(value))
        n = len(latencies) + int(args.rate * args.warmup_s)
        return latencies, [(cpu_seconds(pid) - b) / n * 1e6 for pid, b in zip(pids, before, strict=True)]
    finally:
        for proc in hops:
            services.stop(proc)


async def paced_round_trips(kafka: KafkaSettings, source: str, sink: str, args: argparse.Namespace,
                            ident: Any) -> list[float]:
    """Send `--rate` inputs/s (value = the input's number, as text) and time each until `ident(value)` comes
    back on `sink`; the latencies after the warm-up, in ms."""
    producer, consumer = kio.producer(kafka), kio.consumer(kafka)
    await producer.start()
    await consumer.start()
    read_from_start(consumer, sink, args.partitions)
    warm = int(args.rate * args.warmup_s)
    n = warm + int(args.rate * args.latency_s)
    sent: dict[int, float] = {}
    received: dict[int, float] = {}

    async def read() -> None:
        while len(received) < n:
            batch = await consumer.getmany(timeout_ms=100)
            now = time.perf_counter()
            for r in itertools.chain.from_iterable(batch.values()):
                received.setdefault(ident(r.value), now)

    reader = asyncio.create_task(read())
    try:
        started = time.perf_counter()
        for i in range(n):
            await asyncio.sleep(max(0.0, started + i / args.rate - time.perf_counter()))
            sent[i] = time.perf_counter()
            await producer.send(source, str(i).encode())
        await asyncio.wait_for(reader, 30)
    finally:
        reader.cancel()
        await producer.stop()
        await consumer.stop()
    return [(received[i] - sent[i]) * 1000 for i in range(warm, n)]


async def three_tier_latency(kafka: KafkaSettings, http: aiohttp.ClientSession, home: Path, args: argparse.Namespace,
                             files: dict[str, Path], engine: str, broker_pid: int
                             ) -> tuple[list[float], list[float], list[list[float]], list[float]]:
    """(answer latencies, client latencies, per-hop times: to the edge's forward, the fog's forward, the cloud's
    answer, the client's read) in ms for Kafka-ML single-sample float32 inputs at `--rate`/s; and the CPU per
    input (us) of each agent and of the broker over the traffic."""
    tag = f"lat-{engine}"
    t = {k: f"{kafka.topic_prefix}.{tag}.{k}" for k in ("in", "fog", "cloud", "out")}
    await make_topics(kafka, *t.values(), partitions=args.partitions)
    suffix = "" if engine == "keras" else "_tflite"
    agents = [
        spawn_agent(f"{tag}-{name}", http, home, kafka, args, model=files[name + suffix], engine=engine,
                    input_topic=t["in"] if k == 0 else t[name], output_topic=t["out"],
                    upper_topic=t[CHAIN[k + 1]] if k < 2 else None, limit=1.01, tier_index=k,
                    config=input_config("float32") if k == 0 else None)
        for k, name in enumerate(CHAIN)
    ]
    try:
        for agent in agents:
            await agent.wait_ready()
        producer = kio.producer(kafka)
        consumer = kio.consumer(kafka)
        await producer.start()
        await consumer.start()
        read_from_start(consumer, t["out"], args.partitions)
        sent: dict[tuple[int, int], float] = {}  # (partition, offset) of the input -> when it was sent
        received: dict[tuple[int, int], float] = {}
        answer_ms: dict[tuple[int, int], float] = {}
        hops: dict[tuple[int, int], list[float]] = {}
        warm = int(args.rate * args.warmup_s)
        n = warm + int(args.rate * args.latency_s)
        x = images(n, "float32", seed=3)
        stop = asyncio.Event()

        async def read() -> None:
            while not stop.is_set() or len(received) < n:
                batch = await consumer.getmany(timeout_ms=100)
                now = time.time() * 1000
                for r in itertools.chain.from_iterable(batch.values()):
                    for a in wire.read_answers(r.value):
                        key = (a.origin[1], a.origin[2])
                        received.setdefault(key, now)
                        answer_ms.setdefault(key, a.latency_ms)
                        marks = [a.timestamps["input"], *a.timestamps["forwarded"], a.timestamps["answered"], now]
                        hops.setdefault(key, [b - a for a, b in itertools.pairwise(marks)])
                if stop.is_set() and time.monotonic() > give_up:
                    raise TimeoutError(f"{n - len(received)} answers missing")

        give_up = float("inf")
        pids = [agent.proc.pid for agent in agents] + [broker_pid]
        cpu_before = [cpu_seconds(pid) for pid in pids]
        reader = asyncio.create_task(read())
        try:
            started = time.perf_counter()
            delivered: list[asyncio.Future[Any]] = []
            sent_at: list[float] = []
            for i in range(n):
                await asyncio.sleep(max(0.0, started + i / args.rate - time.perf_counter()))
                t_send = time.time() * 1000
                # Not awaited here, as the baseline's client does not: the input's (partition, offset), which
                # its answer names, is read from the acknowledgements after the last send.
                delivery = await producer.send(t["in"], x[i].tobytes(), timestamp_ms=int(t_send))
                delivered.append(delivery)
                sent_at.append(t_send)
            for delivery, at in zip(await asyncio.gather(*delivered), sent_at, strict=True):
                sent[(delivery.partition, delivery.offset)] = at  # in the order they were sent
            give_up = time.monotonic() + 30
            stop.set()
            await reader
            cpu_us = [(cpu_seconds(pid) - b) / n * 1e6 for pid, b in zip(pids, cpu_before, strict=True)]
        finally:
            reader.cancel()
            await producer.stop()
            await consumer.stop()
        offsets = list(sent)[warm:]  # in the order they were sent
        return ([answer_ms[o] for o in offsets], [received[o] - sent[o] for o in offsets],
                [hops[o] for o in offsets], cpu_us)
    finally:
        for agent in agents:
            agent.stop()


# -- main ---------------------------------------------------------------------------------------------------------


async def throughput(http: aiohttp.ClientSession, home: Path, args: argparse.Namespace, files: dict[str, Path],
                     limits: dict[str, float], baseline: dict[str, float]) -> bool:
    """(b1), (b2) and (c) per engine and dtype, the table with (a), and whether the targets are met."""
    rows: list[tuple[str, str, float, float, float, float]] = []
    for engine in args.engines:
        c = model_alone(engine, files, args.max_batch, args.c_seconds)
        print(f"(c) {engine} model alone, batches of {args.max_batch}: {c:,.0f} samples/s", flush=True)
        for dtype in args.dtypes:
            with fresh_broker(home, args, f"b-{engine}-{dtype}") as (kafka, broker_pid):
                b1, b2, share = await agent_rounds(kafka, http, home, args, files, engine, dtype, limits[dtype],
                                                   f"b-{engine}-{dtype}", broker_pid)
            c_after = model_alone(engine, files, args.max_batch, args.c_seconds)
            print(f"  {engine} {dtype} ({share:.0%} answered at the edge, the rest forwarded):\n"
                  + "".join(f"    b1 round {i + 1}: {r}\n" for i, r in enumerate(b1))
                  + "".join(f"    b2 round {i + 1}: {r}\n" for i, r in enumerate(b2))
                  + f"    c again: {c_after:,.0f} samples/s", flush=True)
            rows.append((engine, dtype, baseline[dtype], statistics.median(r.per_s for r in b1),
                         statistics.median(r.per_s for r in b2), statistics.median([c, c_after])))
            c = c_after
    print("\nthroughput (samples/s; b: medians of the rounds; c: median of the runs before and after b):")
    print(f"  {'engine':<7} {'dtype':<8} {'(a)':>8} {'(b1)':>9} {'(b2)':>9} {'(c)':>9} {'b1/a':>8} {'b2/c':>6}")
    ok = True
    for engine, dtype, a, one, batched, limit in rows:
        ok &= one / a >= 100 and batched / limit >= 0.5
        print(f"  {engine:<7} {dtype:<8} {a:>8,.1f} {one:>9,.0f} {batched:>9,.0f} {limit:>9,.0f} {one / a:>8,.0f} "
              f"{batched / limit:>6.2f}")
    print("  targets: b1/a >= 100, b2/c >= 0.5", flush=True)
    return ok


def trend(latencies: list[float], window: int = 1000) -> str:
    """Client p50 per `window` inputs: Tansu's memory storage answers slower as a partition grows (measured:
    bare hops p50 17 ms over the first 1,000 inputs at 200/s, 77 ms over the 6th), so long runs measure it."""
    parts = [latencies[i:i + window] for i in range(0, len(latencies), window)]
    return "p50 per 1,000 inputs: " + " ".join(f"{pct(p, .5):.0f}" for p in parts if len(p) >= window // 2)


async def latency(http: aiohttp.ClientSession, home: Path, args: argparse.Namespace, files: dict[str, Path]
                  ) -> bool:
    """Per engine, --latency-runs pairs of (bare hops, the engine's three agents), each pair on a fresh broker and
    interleaved (run 1: bare, keras, bare, litert; run 2: ...), so each engine's figure has a baseline measured
    right before it under the same conditions; the ratios' medians over the runs are the result."""
    print(f"\n3-tier latency (edge -> fog -> cloud, limit 1.01, {args.rate:g} Kafka-ML float32 inputs/s for "
          f"{args.latency_s:g} s after {args.warmup_s:g} s warm-up; answer = input timestamp -> answered at the "
          f"cloud, client = send -> read from the output topic), {args.latency_runs} runs, each engine right after "
          "its baseline (three bare aiokafka hop processes: consume -> produce, no model) on a fresh broker:")
    # This process's client paces and times the inputs: keep its collector off the objects the earlier parts
    # left (TensorFlow, models, the fills), or a full collection pauses the client for tens of ms.
    gc.collect()
    gc.freeze()
    ok = True
    ratios: dict[str, list[tuple[float, float]]] = {engine: [] for engine in args.engines}
    p99s: dict[str, list[float]] = {engine: [] for engine in args.engines}
    for run in range(args.latency_runs):
        for engine in args.engines:
            with fresh_broker(home, args, f"latency-{run}-{engine}") as (kafka, broker_pid):
                ticks = [machine_ticks()]
                bare, bare_cpu = await bare_hops_latency(kafka, home, args, broker_pid)
                ticks.append(machine_ticks())
                answer, client, hops, cpu = await three_tier_latency(kafka, http, home, args, files, engine,
                                                                     broker_pid)
                ticks.append(machine_ticks())
            r99, r50 = pct(client, .99) / pct(bare, .99), pct(client, .5) / pct(bare, .5)
            ratios[engine].append((r99, r50))
            p99s[engine].append(pct(client, .99))
            print(f"  run {run + 1} bare    client p50 {pct(bare, .5):5.1f} ms p99 {pct(bare, .99):5.1f} ms max "
                  f"{max(bare):6.1f} ms ({len(bare)} inputs); {trend(bare)}; {cpu_text(bare_cpu, 'hops')}; "
                  f"{steal_text(ticks[0], ticks[1])}",
                  flush=True)
            print(f"  run {run + 1} {engine:<7} answer p50 {pct(answer, .5):5.1f} ms p99 {pct(answer, .99):5.1f} ms | "
                  f"client p50 {pct(client, .5):5.1f} ms p99 {pct(client, .99):5.1f} ms max {max(client):6.1f} ms "
                  f"({len(client)} inputs); client / bare: p99 {r99:.2f}, p50 {r50:.2f}; {trend(client)}; "
                  f"{cpu_text(cpu, 'agents')}; {steal_text(ticks[1], ticks[2])}", flush=True)
            names = ("input -> edge forward", "-> fog forward", "-> cloud answer", "-> client read")
            print("          hops: " + "; ".join(f"{name} p50 {pct(list(h), .5):.1f} p99 {pct(list(h), .99):.1f}"
                                                for name, h in zip(names, zip(*hops, strict=True), strict=True)),
                  flush=True)
    print(f"  medians over the {args.latency_runs} runs (client / bare of the same run):")
    for engine in args.engines:
        r99 = statistics.median(r for r, _ in ratios[engine])
        r50 = statistics.median(r for _, r in ratios[engine])
        p99 = statistics.median(p99s[engine])
        ok &= r99 <= 1.2 and p99 <= 50
        print(f"    {engine:<7} p99 ratio {r99:.2f} (target <= 1.2; runs "
              + ", ".join(f"{r:.2f}" for r, _ in ratios[engine]) + f"), p50 ratio {r50:.2f}; client p99 {p99:.1f} ms "
              "(target <= 50 ms)")
    return ok


def cpu_text(cpu_us: list[float], what: str) -> str:
    """CPU per input of the three processes (then the broker), which other load on the machine moves little."""
    *procs, broker = cpu_us
    return f"CPU per input: {what} " + " + ".join(f"{c:.0f}" for c in procs) + f" us, broker {broker:.0f} us"


@contextlib.contextmanager
def fresh_broker(home: Path, args: argparse.Namespace, name: str) -> Iterator[tuple[KafkaSettings, int]]:
    """A Tansu broker of its own for one part (its memory storage keeps every record: a broker holding the
    gigabytes of the throughput rounds answers later requests slower); its settings and process id."""
    port = services.free_port()
    broker = services.spawn(services.tansu_spec(port), home / f"tansu-{name}.log")
    try:
        services.wait_for_port(port, deadline_s=20, proc=broker, what="Tansu broker")
        yield KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}", topic_prefix="bench",
                            fetch_max_wait_ms=args.fetch_wait_ms), broker.pid
    finally:
        services.stop(broker)


async def main(args: argparse.Namespace) -> int:
    home = Path(tempfile.mkdtemp(prefix="tierflow-bench-tiers-"))
    ok = True
    try:
        t0 = time.perf_counter()
        files = build_chain(home, seed=7)
        print(f"chain built and exported (.keras, .tflite) in {time.perf_counter() - t0:.1f} s", flush=True)
        print(f"settings: max_batch {args.max_batch}, linger_ms {args.linger_ms:g}, fetch_max_wait_ms "
              f"{args.fetch_wait_ms} (agents and clients), commit_interval_ms "
              f"{tier_config.TierConfig.commit_interval_ms:g}, check_crcs {'on' if args.check_crcs else 'off'}, "
              f"inline up to {tier_agent.INLINE_SAMPLES} samples, "
              f"{args.per_record} samples per batched record; a fresh broker for (a), for each agent of (b) and "
              "for the latency runs", flush=True)
        limits = {d: args.limit if args.limit is not None else limit_for(files, d, args.answered) for d in args.dtypes}
        print("edge limits: " + ", ".join(f"{d} {v:.4f}" for d, v in limits.items()) + " (about "
              f"{args.answered:.0%} of the inputs answered at the edge, the rest forwarded)", flush=True)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            if "throughput" in args.parts:
                baseline: dict[str, float] = {}
                with fresh_broker(home, args, "a") as (kafka, _):
                    for dtype in args.dtypes:
                        t = {k: f"{kafka.topic_prefix}.a-{dtype}.{k}" for k in ("in", "out", "up")}
                        await make_topics(kafka, *t.values())
                        baseline[dtype] = await kafka_ml_loop(kafka, files["edge"], dtype, args.a_messages,
                                                              limits[dtype], t)
                        print(f"(a) Kafka-ML loop, {dtype}, {args.a_messages} messages: {baseline[dtype]:,.1f} "
                              "messages/s", flush=True)
                ok &= await throughput(http, home, args, files, limits, baseline)
            if "latency" in args.parts:
                ok &= await latency(http, home, args, files)
        print(f"\nall targets {'met' if ok else 'NOT met'}")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
        else:
            print(f"logs kept in {home}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (~1-2 min)")
    parser.add_argument("--engines", nargs="+", choices=("keras", "litert"), default=["keras", "litert"])
    parser.add_argument("--dtypes", nargs="+", choices=("uint8", "float32"), default=["uint8", "float32"])
    parser.add_argument("--a-messages", type=int, help="messages through the Kafka-ML loop (default 150; quick 50)")
    parser.add_argument("--b1-records", type=int, help="one-sample records per b1 round (default 30000; quick 15000)")
    parser.add_argument("--b2-samples", type=int, help="samples per b2 round (default 96000; quick 48000)")
    parser.add_argument("--per-record", type=int, default=64, help="samples per batched record (b2)")
    parser.add_argument("--repeats", type=int, help="b1, b2 rounds per agent (default 3; quick 1)")
    parser.add_argument("--c-seconds", type=float, help="seconds of (c) per measurement (default 2; quick 1)")
    parser.add_argument("--max-batch", type=int, default=256, help="the agents' --max-batch")
    parser.add_argument("--linger-ms", type=float, default=0.0, help="the agents' --linger-ms")
    parser.add_argument("--fetch-wait-ms", type=int, default=5, help="TIERFLOW_FETCH_MAX_WAIT_MS of agents/clients")
    parser.add_argument("--check-crcs", action="store_true", help="agents verify fetched batches' CRCs (default off)")
    parser.add_argument("--limit", type=float, help="the edge limit for (a), (b1), (b2) (default: see --answered)")
    parser.add_argument("--answered", type=float, default=0.5,
                        help="share of the inputs answered at the edge, the limit chosen to match (default 0.5)")
    parser.add_argument("--rate", type=float, default=200.0, help="inputs per second of the latency run")
    parser.add_argument("--latency-s", type=float,
                        help="measured seconds per engine (default 10: a Tansu partition answers slower as it "
                             "grows, see the printed p50 per 1,000 inputs)")
    parser.add_argument("--warmup-s", type=float, default=2.0, help="latency warm-up, not measured")
    parser.add_argument("--latency-runs", type=int, default=3,
                        help="latency runs, each engine after its own baseline (default 3; the medians count)")
    parser.add_argument("--partitions", type=int, default=8,
                        help="partitions of the latency runs' topics (default 8: each grows 8x slower, see "
                             "--latency-s)")
    parser.add_argument("--parts", nargs="+", choices=("throughput", "latency"), default=["throughput", "latency"])
    parser.add_argument("--keep", action="store_true", help="keep the agents' logs (and profiles)")
    parser.add_argument("--py-spy", metavar="PATH", help="profile each agent with this py-spy (implies --keep)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.keep = args.keep or bool(args.py_spy)
    for name, full, small in (("a_messages", 150, 50), ("b1_records", 30000, 15000), ("b2_samples", 96000, 48000),
                              ("repeats", 3, 1), ("c_seconds", 2.0, 1.0), ("latency_s", 10.0, 10.0)):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    return args


if __name__ == "__main__":
    if sys.argv[1:2] == ["--hop"]:  # a bare hop process of the latency baseline
        hop = argparse.ArgumentParser()
        hop.add_argument("--hop", nargs=3, metavar=("SERVERS", "SOURCE", "TARGET"))
        hop.add_argument("--fetch-wait-ms", type=int, default=5)
        hop.add_argument("--partitions", type=int, default=1)
        hop_args = hop.parse_args()
        servers, source, target = hop_args.hop
        # The tiers' event loop (kio.new_event_loop): the floor is what the same client stack does without a model.
        with asyncio.Runner(loop_factory=kio.new_event_loop) as runner:
            runner.run(forward(servers, source, target, hop_args.fetch_wait_ms, hop_args.partitions))
    else:
        sys.exit(asyncio.run(main(parse_args())))
