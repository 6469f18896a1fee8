"""The tier agent: one Faust app that serves tier K of an inference (early exit or forward, per sample).

Started by `tierflow tier run` (`tierflow.tiers.tier_cli`), which the orchestrator launches once per tier
and replica (a local process, or a pod of a Kubernetes Deployment), or by hand on a device. Tests and
benchmarks start it in-process with `create_app(...)` + `await app.start()`.

What it does, per batch: take the records available on the input topic (up to `max_batch`, waiting at most
`linger_ms` for more; 0 = never wait for a batch to fill), decode them (`tiers.wire`), run the sub-model
ONCE on all their samples (in the model thread, so the event loop keeps acknowledging and committing),
route each sample (`max(p) >= limit` -> an answer on the output topic, else its tensor -> the upper topic;
the top tier answers everything), produce, and commit a batch's offsets only once every record it
produced (answers, forwards, dead letters) is acknowledged, at most every `commit_interval_ms`:
at-least-once, and a redelivered sample's answer is recognisable by its origin. Records that cannot be
decoded go to the dead-letter topic with the reason; bad input never stops the agent. SIGTERM lets the
in-flight batches finish, their records acknowledged and their offsets committed, before the consumer
leaves its group.

While the model thread computes one batch, the loop decodes the next (already fetched) and produces the
previous one; with nothing in flight a small batch runs on the loop itself (no thread hop), so a light
stream pays neither a batch-filling wait nor a thread switch.

Why a Faust app around an aiokafka consumer, not a Faust stream agent: a Faust agent costs ~150-250 us per
record here (`async for` or `take()`), which bounds a tier fed one sample per record to ~5k records/s, and
its worker consumer hardcodes `fetch_max_wait_ms=1500`, which Tansu turns into 1.5 s per hop. So the Faust
app (worker lifecycle, signals, logging, the web server) runs a service that owns an aiokafka consumer in
the tier's group (`tierflow-inference-<id>-tier-<k>`: replicas share partitions, a restarted agent resumes
from the committed offset), polled with `getmany` and the settings' short fetch wait; the app's own Kafka
consumer and producer are off (`enable_kafka = False`). Measured with `benchmarks/tier_inference.py` (2 cores,
Tansu on the same machine, edge model, 28x28 inputs, half answered and half forwarded): one sample per record
30-55k records/s, 64-sample records 33-47k samples/s, against ~68k samples/s for the model alone (LiteRT or
Keras); the tier process spends 22-30 us of CPU per sample of 64-sample records (uint8 .. float32), the
model ~15 of them. The process keeps freed heap memory for the next batch (`keep_freed_memory`): without it
the megabyte buffers of every fetch touched fresh pages, which cost float32 inputs a third of their rate.

HTTP (the Faust app's web server, on `TierConfig.port`, 0 = a free port): `GET /healthz` (alive),
`GET /readyz` (model loaded and consumer in its group; the body says which part is missing) and
`GET /metrics` (Prometheus: records, samples, answered, forwarded, dead-lettered, batch sizes, latency from
the input to this tier's answer, this tier's processing time, model time).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import math
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import faust
import numpy as np
import orjson
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from faust.app.base import BootStrategy
from mode import Service
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from tierflow.streams import kafka as kio
from tierflow.streams.settings import KafkaSettings
from tierflow.tiers import wire
from tierflow.tiers.data import DataError, InputConfig, parse_dtype
from tierflow.tiers.engines import ENGINES, Engine, EngineError, load_engine

log = logging.getLogger("tierflow.tier")

Array = np.ndarray[Any, Any]
#: getmany timeout when the topic is idle: how soon a stop request is noticed (records return at once).
IDLE_POLL_MS = 200
#: Answers of one batch from which they are produced as whole record batches.
SEND_BATCH_FROM = 8
#: Largest batch run on the event loop itself when nothing else is in flight (see `TierAgent._begin`).
INLINE_SAMPLES = 8
#: Decoded batches queued for the model thread while the loop produces the previous one.
PIPELINE_DEPTH = 2
#: Batches whose records may await acknowledgement while the next batch is processed.
MAX_IN_FLIGHT = 4
#: How long SIGTERM waits for the in-flight batch to be produced, acknowledged and committed.
DRAIN_TIMEOUT_S = 30.0
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
_TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class TierConfigError(ValueError):
    """The tier cannot be served as configured; the message names the setting."""


@dataclass(frozen=True)
class TierConfig:
    """Everything one tier agent needs. Built by `tier_cli` from the API's inference or from flags."""

    inference_id: int
    tier_index: int
    top: bool
    input_topic: str
    output_topic: str
    upper_topic: str | None
    limit: float
    #: The tier's own cluster: input topic, output topic (unless `output_bootstrap_servers`), dead letters.
    bootstrap_servers: str
    #: The NEXT tier's cluster, where forwarded tensors go ("" = `bootstrap_servers`).
    upper_bootstrap_servers: str = ""
    #: Where answers go ("" = `bootstrap_servers`).
    output_bootstrap_servers: str = ""
    #: How header-less records are read on a first tier: RAW (`input_config` data_type/data_reshape) or AVRO
    #: (`input_config` data_scheme). Without an input_config they are float32 of the model's input shape.
    input_format: str = "RAW"
    input_config: InputConfig | None = None
    #: The model artefact: a file path, or its bytes (`.keras`/`.h5` for "keras", `.tflite` for "litert").
    model: Path | bytes = field(default=b"", repr=False)
    engine: str = "keras"
    #: Most records taken per poll, and most samples per model call (bigger polls run in chunks).
    max_batch: int = 256
    #: How long a poll may wait for more records to fill a batch; 0 = take what is there.
    linger_ms: float = 0.0
    port: int = 8000
    host: str = "0.0.0.0"
    #: Consumer group; "" = `tierflow-inference-<inference_id>-tier-<tier_index>`.
    group_id: str = ""
    #: Least time between two offset commits (a commit per batch costs the broker and the tier CPU at light
    #: traffic); acknowledged batches are committed at the latest when the topic goes idle, on a rebalance
    #: and on SIGTERM. After a crash, at most this much of answered input is answered again.
    commit_interval_ms: float = 100.0
    #: Verify each fetched record batch's CRC (Kafka's `check.crcs`). Off, as librdkafka's default, saves ~2-3 us
    #: per float32 28x28 sample on this machine (aiokafka's CRC-32C runs at ~1.6 GB/s on the event loop); the
    #: broker checks CRCs on produce and TCP checksums the wire, so what is left undetected is corruption at
    #: rest on the broker. `tierflow tier run --check-crcs` turns it on.
    check_crcs: bool = False

    def __post_init__(self) -> None:
        if not self.input_topic or not self.output_topic:
            raise TierConfigError("a tier needs an input topic and an output topic")
        if not self.top and not self.upper_topic:
            raise TierConfigError(f"tier {self.tier_index} is not the top tier: it needs an upper topic to forward "
                                  "to (or serve it as the top tier)")
        if not self.bootstrap_servers:
            raise TierConfigError("no bootstrap servers for the tier's input topic")
        if not (math.isfinite(self.limit) and self.limit >= 0):
            raise TierConfigError(f"limit {self.limit} must be a number >= 0 (> 1 forwards every sample)")
        if self.engine not in ENGINES:
            raise TierConfigError(f"engine {self.engine!r} must be one of {', '.join(ENGINES)}")
        if self.max_batch < 1:
            raise TierConfigError(f"max_batch {self.max_batch} must be >= 1")
        if self.linger_ms < 0:
            raise TierConfigError(f"linger_ms {self.linger_ms} must be >= 0")
        if self.commit_interval_ms < 0:
            raise TierConfigError(f"commit_interval_ms {self.commit_interval_ms} must be >= 0")
        if self.input_format.upper() not in ("RAW", "AVRO"):
            raise TierConfigError(f"input_format {self.input_format!r} must be RAW or AVRO")
        if not 0 <= self.port <= 65535:
            raise TierConfigError(f"port {self.port} is not a TCP port")

    @property
    def group(self) -> str:
        return self.group_id or f"tierflow-inference-{self.inference_id}-tier-{self.tier_index}"

    @property
    def upper_servers(self) -> str:
        return self.upper_bootstrap_servers or self.bootstrap_servers

    @property
    def output_servers(self) -> str:
        return self.output_bootstrap_servers or self.bootstrap_servers

    @property
    def name(self) -> str:
        return f"tier {self.tier_index} of inference {self.inference_id}"


# -- input decoding set-up ----------------------------------------------------------------------------------


def avro_decoder(cfg: InputConfig) -> Callable[[bytes], Array]:
    """One AVRO value (Kafka-ML's AvroSink data record, no label) -> its flattened sample."""
    import io

    from fastavro import parse_schema, schemaless_reader

    from tierflow.tiers.data import _flatten

    if cfg.data_scheme is None:
        raise TierConfigError("input_format AVRO needs input_config.data_scheme")
    schema = parse_schema(cfg.data_scheme)
    fields = [str(f["name"]) for f in cfg.data_scheme["fields"]]
    dtype = parse_dtype(cfg.data_type, "data_type") if cfg.data_type else np.dtype(np.float32)

    def decode(value: bytes) -> Array:
        try:
            record = schemaless_reader(io.BytesIO(value), schema, None)
        except Exception as exc:  # truncated or foreign bytes: fastavro raises EOFError, ValueError, ...
            raise ValueError(f"value is not Avro for data_scheme ({type(exc).__name__}: {exc})") from None
        if not isinstance(record, Mapping):
            raise ValueError("data_scheme must describe a record")
        try:
            return np.asarray(_flatten(record, fields, 0, "data"), dtype=dtype)
        except DataError as exc:
            raise ValueError(str(exc).removeprefix("record 0: ")) from None

    return decode


def input_spec(config: TierConfig, engine: Engine) -> wire.InputSpec:
    """How this tier reads its input, from its config and its model's input."""
    shape = engine.input_shape
    count = math.prod(shape)
    cfg = config.input_config
    try:
        if config.input_format.upper() == "AVRO":
            if cfg is None:
                raise TierConfigError("input_format AVRO needs an input_config with data_scheme")
            return wire.InputSpec(shape, dtype=engine.input_dtype, plain=avro_decoder(cfg))
        if cfg is None or cfg.data_type is None:
            return wire.InputSpec(shape, dtype=engine.input_dtype)
        raw_shape = cfg.data_reshape
        if raw_shape is not None and -1 in raw_shape:
            known = math.prod(d for d in raw_shape if d != -1)
            raw_shape = tuple(count // known if d == -1 else d for d in raw_shape)
        return wire.InputSpec(shape, dtype=engine.input_dtype, raw_dtype=parse_dtype(cfg.data_type, "data_type"),
                              raw_shape=raw_shape)
    except (wire.WireError, DataError) as exc:
        raise TierConfigError(f"input_config does not fit the model of {config.name}: {exc}") from exc


# -- metrics -------------------------------------------------------------------------------------------------


class BulkHistogram(Collector):
    """A Prometheus histogram fed a numpy array at a time (a `Histogram.observe` per sample costs ~3 us, as
    much as routing the sample)."""

    def __init__(self, name: str, doc: str, labels: Mapping[str, str], buckets: tuple[float, ...],
                 registry: CollectorRegistry) -> None:
        self.name, self.doc, self.labels = name, doc, dict(labels)
        self._bounds = np.asarray(buckets, dtype=np.float64)
        self._counts = np.zeros(len(buckets) + 1, dtype=np.int64)
        self.sum = 0.0
        registry.register(self)

    def observe_many(self, values: Array) -> None:
        if len(values):
            # Bucket `le=b` counts values <= b: the first bound >= the value.
            self._counts += np.bincount(np.searchsorted(self._bounds, values, side="left"),
                                        minlength=len(self._counts))
            self.sum += float(np.sum(values))

    @property
    def count(self) -> int:
        return int(self._counts.sum())

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self.name, self.doc, labels=list(self.labels))
        cumulative = np.cumsum(self._counts).tolist()
        buckets = [(repr(b), c) for b, c in zip(self._bounds.tolist(), cumulative[:-1], strict=True)]
        family.add_metric(list(self.labels.values()), [*buckets, ("+Inf", cumulative[-1])], self.sum)
        yield family


class TierMetrics:
    """The tier's Prometheus metrics, in their own registry (several agents may share a process)."""

    def __init__(self, config: TierConfig, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        names = ("inference", "tier")
        values = (str(config.inference_id), str(config.tier_index))

        def counter(name: str, doc: str) -> Any:
            return Counter(name, doc, names, registry=self.registry).labels(*values)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(name, doc, names, registry=self.registry, buckets=buckets).labels(*values)

        self.records = counter("tierflow_tier_records", "Input records consumed")
        self.samples = counter("tierflow_tier_samples", "Input samples decoded")
        self.answered = counter("tierflow_tier_answered", "Samples answered by this tier's exit")
        self.forwarded = counter("tierflow_tier_forwarded", "Samples forwarded to the upper tier")
        self.deadlettered = counter("tierflow_tier_deadlettered", "Records sent to the dead-letter topic")
        self.batch_records = histogram("tierflow_tier_batch_records", "Records per consumed batch", _SIZE_BUCKETS)
        self.batch_samples = histogram("tierflow_tier_batch_samples", "Samples per model call batch", _SIZE_BUCKETS)
        self.latency = BulkHistogram("tierflow_tier_latency_seconds",
                                     "From a sample's original input timestamp to this tier's answer",
                                     dict(zip(names, values, strict=True)), _TIME_BUCKETS, self.registry)
        self.processing = histogram("tierflow_tier_processing_seconds",
                                    "From a batch's arrival to the acknowledgement of all it produced", _TIME_BUCKETS)
        self.model = histogram("tierflow_tier_model_seconds", "Model time per batch", _TIME_BUCKETS)


@dataclass
class TierStats:
    """Plain counters of what the agent did (tests, logs); the same numbers as the metrics."""

    records: int = 0
    samples: int = 0
    answered: int = 0
    forwarded: int = 0
    deadlettered: int = 0
    batches: int = 0
    #: Records whose offsets were committed (after every record produced for them was acknowledged).
    committed: int = 0


# -- the agent -----------------------------------------------------------------------------------------------


@dataclass
class _Inflight:
    """A decoded batch whose samples are in (or queued for) the model thread."""

    records: list[Any]
    batch: wire.DecodedBatch
    prediction: asyncio.Future[tuple[list[Array], float]] | None
    acks: list[asyncio.Future[Any]]
    arrived: float


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, agent: TierAgent) -> None:
        self.agent = agent

    async def on_partitions_revoked(self, revoked: Any) -> None:
        # Commit what was already answered before another replica takes the partitions over.
        await self.agent.settle_all(quiet=True)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.agent.assignment = {(tp.topic, tp.partition) for tp in assigned}
        self.agent.joined = True
        log.info("%s assigned %s", self.agent.config.name,
                 ", ".join(f"{t}[{p}]" for t, p in sorted(self.agent.assignment)) or "no partitions")


class TierAgent:
    """The data-plane loop of one tier: poll, decode, predict once, route, produce, commit after acks."""

    def __init__(self, config: TierConfig, kafka: KafkaSettings, *, engine: Engine | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        self.config = config
        #: The tier's cluster (input, dead letters) with the settings' fetch wait and session timeout.
        self.kafka = replace(kafka, bootstrap_servers=config.bootstrap_servers)
        self.engine = engine
        self.metrics = TierMetrics(config, registry)
        self.stats = TierStats()
        self.joined = False
        self.assignment: set[tuple[str, int]] = set()
        self.failure: str | None = None
        self.failure_permanent = False
        self.started = asyncio.Event()
        self._stopping = asyncio.Event()
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tierflow-model")
        self._consumer: AIOKafkaConsumer | None = None
        self._producers: dict[str, AIOKafkaProducer] = {}
        self._pending: list[asyncio.Task[None]] = []
        self._spec: wire.InputSpec | None = None
        self._round_robin = 0
        self._acked: dict[TopicPartition, int] = {}
        self._acked_records = 0
        self._last_commit = 0.0
        self._commit_lock = asyncio.Lock()

    # -- state ---------------------------------------------------------------------------------------------

    @property
    def model_loaded(self) -> bool:
        return self._spec is not None

    @property
    def ready(self) -> bool:
        return self.model_loaded and self.joined and self.failure is None and not self._stopping.is_set()

    def status(self) -> dict[str, Any]:
        return {
            "status": ("failed" if self.failure else "stopping" if self._stopping.is_set()
                       else "ready" if self.ready else "starting"),
            "tier": self.config.tier_index, "inference": self.config.inference_id,
            "engine": self.config.engine, "model_loaded": self.model_loaded, "consumer_joined": self.joined,
            "partitions": sorted(f"{t}[{p}]" for t, p in self.assignment),
            "tensorflow_loaded": "tensorflow" in sys.modules, "error": self.failure,
            "stats": vars(self.stats),
        }

    def request_stop(self) -> None:
        self._stopping.set()

    # -- lifecycle -----------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until `request_stop()`; then drain the in-flight batch and leave the group.

        Raises (and records `failure`) when the model cannot be loaded or produced records are not
        acknowledged: the process should exit and be restarted, resuming from the committed offsets.
        """
        cfg = self.config
        loop = asyncio.get_running_loop()
        try:
            if self.engine is None:
                log.info("%s: loading the %s model", cfg.name, cfg.engine)
                self.engine = await loop.run_in_executor(self._model_thread, load_engine, cfg.engine, cfg.model)
            self._check_engine(self.engine)
            spec = input_spec(cfg, self.engine)
            for servers in {cfg.bootstrap_servers, cfg.output_servers, cfg.upper_servers}:
                producer = kio.producer(replace(self.kafka, bootstrap_servers=servers), max_batch_size=1024 * 1024)
                self._producers[servers] = producer
                await producer.start()
            self._consumer = kio.consumer(
                self.kafka, group_id=cfg.group, max_poll_records=cfg.max_batch, check_crcs=cfg.check_crcs,
                session_timeout_ms=self.kafka.session_timeout_ms,
                heartbeat_interval_ms=max(100, self.kafka.session_timeout_ms // 3),
            )
            await self._consumer.start()
            self._consumer.subscribe([cfg.input_topic], listener=_Rebalance(self))
            self._spec = spec
            # Move what start-up made (TensorFlow's object graph: millions of objects) out of the collector's
            # sight: the per-sample lists of every batch trigger collections that otherwise walk it all
            # (measured: decoding 64-sample records went from 5.6 to 1.8 us per sample).
            gc.freeze()
            self.started.set()
            log.info("%s: serving %s (engine %s, limit %g, %s), answers -> %s%s", cfg.name, cfg.input_topic,
                     cfg.engine, cfg.limit, "top" if cfg.top else "forwards", cfg.output_topic,
                     "" if cfg.top else f", forwards -> {cfg.upper_topic}")
            # A pipeline: while the model thread computes batch i, the loop decodes and submits the batches
            # already fetched (up to PIPELINE_DEPTH in the model's queue), then encodes and produces batch i.
            # With nothing in flight it waits for records; with batches in flight it only takes what is
            # already there, so a light stream never waits for a batch to fill.
            inflight: deque[_Inflight] = deque()
            while not self._stopping.is_set():
                records = await self._poll(self._consumer, wait=not inflight)
                if records:
                    inflight.append(self._begin(records, spec, inline=not inflight))
                elif not inflight and self._acked and not self._pending:
                    await self.commit()  # idle: commit what the last batches left uncommitted
                if inflight and (not records or len(inflight) >= PIPELINE_DEPTH):
                    await self._finish(inflight.popleft())
                self._raise_settle_failure()
            while inflight:
                await self._finish(inflight.popleft())
            await self.settle_all()
        except Exception as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            # A model or config the tier cannot serve fails again on restart; anything else (the broker) may not.
            self.failure_permanent = isinstance(exc, EngineError | TierConfigError)
            raise
        finally:
            self.started.set()
            await self._close()

    async def _close(self) -> None:
        for task in self._pending:
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)
        self._pending.clear()
        if self._consumer is not None:
            with contextlib.suppress(KafkaError):
                await self._consumer.stop()  # leaves the group: the others rebalance at once
        for producer in self._producers.values():
            with contextlib.suppress(KafkaError):
                await producer.stop()
        self._model_thread.shutdown(wait=False)

    def _check_engine(self, engine: Engine) -> None:
        if not self.config.top and engine.n_outputs < 2:
            raise TierConfigError(f"{self.config.name} is not the top tier but its model has {engine.n_outputs} "
                                  "output: a forwarding sub-model outputs [tensor_to_upper, probabilities]")

    # -- one batch -----------------------------------------------------------------------------------------

    async def _poll(self, consumer: AIOKafkaConsumer, *, wait: bool) -> list[Any]:
        cfg = self.config
        batch = await consumer.getmany(timeout_ms=IDLE_POLL_MS if wait else 0, max_records=cfg.max_batch)
        records = [r for part in batch.values() for r in part]
        if cfg.linger_ms and records and len(records) < cfg.max_batch:
            deadline = time.monotonic() + cfg.linger_ms / 1000
            while len(records) < cfg.max_batch and (left := deadline - time.monotonic()) > 0:
                more = await consumer.getmany(timeout_ms=max(1, int(left * 1000)),
                                              max_records=cfg.max_batch - len(records))
                records.extend(r for part in more.values() for r in part)
        return records

    def _predict(self, x: Array) -> tuple[list[Array], float]:
        assert self.engine is not None
        started = time.perf_counter()
        step = self.config.max_batch
        if len(x) <= step:
            outputs = self.engine.predict(x)
        else:
            chunks = [self.engine.predict(x[i:i + step]) for i in range(0, len(x), step)]
            outputs = [np.concatenate([c[k] for c in chunks]) for k in range(len(chunks[0]))]
        return outputs, time.perf_counter() - started

    def _begin(self, records: list[Any], spec: wire.InputSpec, *, inline: bool) -> _Inflight:
        """Decode a batch, dead-letter what cannot be decoded, and hand the samples to the model thread.

        A small batch with nothing else in flight (light traffic) runs on the loop instead: there is nothing
        to overlap, and the thread hop costs more than the model (measured at 200 records/s: 0.8 ms from
        decode to result for a 40 us LiteRT call).
        """
        arrived = time.time()
        batch = wire.decode_records(records, spec, now_ms=arrived * 1000)
        m, s = self.metrics, self.stats
        m.records.inc(len(records))
        m.batch_records.observe(len(records))
        s.records += len(records)
        s.batches += 1
        acks: list[asyncio.Future[Any]] = []
        if batch.rejected:
            acks.append(asyncio.ensure_future(self._deadletter(records, batch.rejected)))
        prediction: asyncio.Future[tuple[list[Array], float]] | None = None
        if len(batch):
            m.samples.inc(len(batch))
            m.batch_samples.observe(len(batch))
            s.samples += len(batch)
            loop = asyncio.get_running_loop()
            if inline and len(batch) <= INLINE_SAMPLES:
                prediction = loop.create_future()
                try:
                    prediction.set_result(self._predict(batch.x))
                except Exception as exc:  # raised where the thread's result would be: in _finish
                    prediction.set_exception(exc)
            else:
                prediction = loop.run_in_executor(self._model_thread, self._predict, batch.x)
        return _Inflight(records, batch, prediction, acks, arrived)

    async def _finish(self, job: _Inflight) -> None:
        """Route the batch's samples, produce answers and forwards, and queue its commit after the acks."""
        cfg = self.config
        batch, acks = job.batch, job.acks
        if job.prediction is not None:
            outputs, model_s = await job.prediction
            m, s = self.metrics, self.stats
            m.model.observe(model_s)
            probs = outputs[-1]
            answered = wire.answered_mask(probs, cfg.limit, top=cfg.top)
            now_ms = time.time() * 1000
            answers = wire.encode_answers(batch, probs, answered, tier=cfg.tier_index, answered_ms=now_ms)
            acks.extend(await self._send_all(self._producers[cfg.output_servers], cfg.output_topic, answers))
            n_answered = int(answered.sum())
            if n_answered < len(batch):
                assert cfg.upper_topic is not None
                upper = self._producers[cfg.upper_servers]
                for value, headers in wire.encode_forwards(batch, outputs[0], ~answered, forwarded_ms=now_ms):
                    acks.append(await upper.send(cfg.upper_topic, value, headers=headers))
            m.answered.inc(n_answered)
            m.forwarded.inc(len(batch) - n_answered)
            s.answered += n_answered
            s.forwarded += len(batch) - n_answered
            first = np.fromiter((batch.ts[i][0] for i in np.flatnonzero(answered).tolist()), dtype=np.float64,
                                count=n_answered)
            m.latency.observe_many(np.maximum(0.0, (now_ms - first) / 1000))
        offsets: dict[TopicPartition, int] = {}
        for r in job.records:
            tp = TopicPartition(r.topic, r.partition)
            offsets[tp] = max(offsets.get(tp, 0), r.offset + 1)
        previous = self._pending[-1] if self._pending else None
        self._pending.append(asyncio.ensure_future(
            self._settle(previous, acks, offsets, job.arrived, len(job.records))))
        while len(self._pending) > MAX_IN_FLIGHT:
            await asyncio.wait({self._pending[0]})
            self._raise_settle_failure()

    async def _send_all(self, producer: AIOKafkaProducer, topic: str, values: list[bytes]) -> list[Any]:
        """Produce `values` (no key, no headers); many at once go as whole record batches (~6 us per record
        instead of ~20 us through `send`), to one partition per batch, round robin."""
        if len(values) < SEND_BATCH_FROM:
            return [await producer.send(topic, value) for value in values]
        partitions = sorted(await producer.partitions_for(topic))
        futures: list[Any] = []
        builder = producer.create_batch()
        for value in values:
            if builder.append(key=None, value=value, timestamp=None) is None:
                if builder.record_count():
                    futures.append(await self._send_batch(producer, builder, topic, partitions))
                    builder = producer.create_batch()
                if builder.append(key=None, value=value, timestamp=None) is None:  # larger than a batch
                    futures.append(await producer.send(topic, value))
        if builder.record_count():
            futures.append(await self._send_batch(producer, builder, topic, partitions))
        return futures

    async def _send_batch(self, producer: AIOKafkaProducer, builder: Any, topic: str, partitions: list[int]) -> Any:
        self._round_robin += 1
        return await producer.send_batch(builder, topic, partition=partitions[self._round_robin % len(partitions)])

    async def _deadletter(self, records: list[Any], rejected: list[wire.Rejection]) -> None:
        producer = self._producers[self.config.bootstrap_servers]
        await asyncio.gather(*(kio.send_deadletter(producer, self.kafka, records[r.index], r.reason,
                                                   agent=f"tier-{self.config.tier_index}") for r in rejected))
        self.metrics.deadlettered.inc(len(rejected))
        self.stats.deadlettered += len(rejected)

    async def _settle(self, previous: asyncio.Task[None] | None, acks: list[asyncio.Future[Any]],
                      offsets: dict[TopicPartition, int], arrived: float, n_records: int) -> None:
        """Wait for the batch's acknowledgements (after the previous batch's), then mark its offsets
        committable; commit when `commit_interval_ms` has passed since the last commit."""
        if previous is not None:
            await asyncio.shield(previous)
        await asyncio.gather(*acks)
        self.metrics.processing.observe(time.time() - arrived)
        for tp, offset in offsets.items():
            self._acked[tp] = max(self._acked.get(tp, 0), offset)
        self._acked_records += n_records
        if time.monotonic() - self._last_commit >= self.config.commit_interval_ms / 1000:
            await self.commit()

    async def commit(self) -> None:
        """Commit the offsets of every acknowledged batch (of the partitions this replica still owns)."""
        async with self._commit_lock:
            acked, records = self._acked, self._acked_records
            self._acked, self._acked_records = {}, 0
            self._last_commit = time.monotonic()
            mine = {tp: off for tp, off in acked.items() if (tp.topic, tp.partition) in self.assignment}
            if not mine or self._consumer is None:
                return  # the partitions moved to another replica, which resumes from the last commit
            try:
                await self._consumer.commit(mine)
            except KafkaError as exc:
                # A rebalance raced the commit: the records are answered; the new owner answers them again.
                log.warning("%s: offsets %s not committed (%s); they will be answered again", self.config.name,
                            {f"{tp.topic}[{tp.partition}]": o for tp, o in mine.items()}, exc)
                return
            self.stats.committed += records

    def _raise_settle_failure(self) -> None:
        while self._pending and self._pending[0].done():
            task = self._pending.pop(0)
            exc = task.exception()
            if exc is not None:
                raise RuntimeError(f"records produced for a batch were not acknowledged: {exc}") from exc

    async def settle_all(self, *, quiet: bool = False) -> None:
        """Wait until every produced batch is acknowledged, then commit."""
        while self._pending:
            task = self._pending[0]
            await asyncio.wait({task})
            if quiet and task.exception() is not None:
                return  # the main loop raises it
            self._raise_settle_failure()
        await self.commit()


# -- the Faust app -------------------------------------------------------------------------------------------


class _TierBoot(BootStrategy):
    #: The agent owns its aiokafka clients (its group, `getmany`, short fetch waits); Faust's stay off.
    enable_kafka = False


class TierApp(faust.App):
    """The Faust app of one tier; `tier` is its `TierAgent`."""

    BootStrategy = _TierBoot
    tier: TierAgent


class TierService(Service):
    """Runs the agent with the app; on stop (SIGTERM) lets it drain; on failure stops the worker."""

    def __init__(self, agent: TierAgent, on_failure: Callable[[BaseException], None] | None = None,
                 datadir: Path | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.agent = agent
        self.on_failure = on_failure
        self.datadir = datadir
        self._task: asyncio.Task[None] | None = None

    async def on_start(self) -> None:
        self._task = asyncio.ensure_future(self._serve())

    async def _serve(self) -> None:
        try:
            await self.agent.run()
        except Exception as exc:
            if self.agent.failure_permanent:
                log.error("%s cannot be served: %s", self.agent.config.name, exc)
            else:
                log.exception("%s failed: %s", self.agent.config.name, exc)
            if self.on_failure is not None:
                self.on_failure(exc)

    async def on_stop(self) -> None:
        self.agent.request_stop()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), DRAIN_TIMEOUT_S)
            except TimeoutError:
                log.error("%s did not drain within %.0f s", self.agent.config.name, DRAIN_TIMEOUT_S)
                self._task.cancel()
        if self.datadir is not None:
            shutil.rmtree(self.datadir, ignore_errors=True)


class TierWeb(Service):
    """The app's web server (registered with `app.web_server`): health, readiness, metrics."""

    def __init__(self, agent: TierAgent, host: str, port: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.agent = agent
        self.host = host
        self.port = port
        self.bound_port: int | None = None
        self._runner: web.AppRunner | None = None

    async def on_start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        addresses = self._runner.addresses
        self.bound_port = int(addresses[0][1]) if addresses else self.port
        log.info("%s: HTTP on %s:%d (/healthz, /readyz, /metrics)", self.agent.config.name, self.host,
                 self.bound_port)

    async def on_stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        body = {"status": "failed" if self.agent.failure else "ok", "error": self.agent.failure}
        return web.json_response(body, status=500 if self.agent.failure else 200, dumps=_dumps)

    async def _readyz(self, request: web.Request) -> web.Response:
        return web.json_response(self.agent.status(), status=200 if self.agent.ready else 503, dumps=_dumps)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.agent.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def create_app(config: TierConfig, kafka: KafkaSettings, *, engine: Engine | None = None,
               loop: asyncio.AbstractEventLoop | None = None,
               on_failure: Callable[[BaseException], None] | None = None) -> TierApp:
    """The Faust app serving `config` (start it with `await app.start()` or a `faust.Worker`).

    `kafka` gives the fetch wait, session timeout and dead-letter topic (its bootstrap servers are replaced
    by the tier's); `engine` injects a loaded model (tests); `on_failure` is told when the agent dies.
    """
    # Faust wants a data directory (tables would live there; a tier has none): a private one, removed on stop.
    datadir = Path(tempfile.mkdtemp(prefix=f"{config.group}-", suffix="-faust"))
    app = TierApp(config.group, broker=f"kafka://{config.bootstrap_servers.split(',')[0]}", datadir=str(datadir),
                  web_enabled=True, loop=loop)
    agent = TierAgent(config, kafka, engine=engine)
    app.tier = agent
    app.web_server(TierWeb(agent, config.host, config.port, loop=loop))
    # Faust starts an instance as well as a class (App._prepare_subservice); only the decorator's type says class.
    cast(Any, app.service)(TierService(agent, on_failure, datadir=datadir, loop=loop))
    return app


def web_port(app: TierApp) -> int | None:
    """The port the app's web server bound (useful with port 0), once started."""
    service = app._web_server_service
    return service.bound_port if isinstance(service, TierWeb) else None


#: glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Blocks up to this size come from the heap, not from their own mmap (glibc's largest allowed value).
MALLOC_MMAP_THRESHOLD = 32 * 1024 * 1024
#: Freed heap memory the process keeps for the next batches before giving any back to the system.
MALLOC_TRIM_THRESHOLD = 256 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory of freed batch buffers for the next batch (True if it could).

    Every batch allocates and frees buffers of megabytes: aiokafka reads each fetch response into a
    bytearray that grows by 256 KB reads (about 6 MB per response with 64-sample float32 records), the
    decoded batch, the model's outputs. With glibc's defaults those blocks are mmapped and unmapped, so each
    batch touches fresh pages, and on this VM a first touch costs up to ~2.5 ms per MB. Measured: reading a
    6 MB response through asyncio's StreamReader, as aiokafka does, took 8.8-15 ms per response, 3.4 ms with
    the heap kept. Process-wide, so only the tier's own process (`run_worker`) calls it; a no-op off glibc.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter is linked with
    except (OSError, AttributeError):  # not glibc: musl and macOS have no mallopt
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD))


def run_worker(config: TierConfig, kafka: KafkaSettings, *, loglevel: str = "INFO") -> int:
    """Run the tier as a Faust worker until SIGTERM/SIGINT; the process exit code: 0 after a drain, 2 when the
    model or config cannot be served, 1 when the agent failed otherwise (e.g. records not acknowledged)."""
    if not keep_freed_memory():
        log.info("malloc is not glibc's: freed batch buffers go back to the system (slower on some VMs)")
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    worker: Any = None

    def failed(exc: BaseException) -> None:
        if worker is not None:
            loop.call_soon(lambda: asyncio.ensure_future(worker.stop()))

    app = create_app(config, kafka, loop=loop, on_failure=failed)
    worker = faust.Worker(app, loop=loop, loglevel=loglevel, redirect_stdouts=False, override_logging=False,
                          quiet=True)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    else:  # pragma: no cover - execute_from_commandline always raises SystemExit
        code = 0
    if app.tier.failure:
        return 2 if app.tier.failure_permanent else 1
    return code
