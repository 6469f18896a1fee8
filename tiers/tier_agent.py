"""The tier's batching loop (`TierAgent`): one tier of an inference, early exit or forward, per sample.

Run by the tier's Faust app (`tierflow.tiers.tier_app`, whose service calls `run()` and, on SIGTERM,
`request_stop()`); its config comes from `tierflow.tiers.tier_config`, its numbers go to
`tierflow.tiers.tier_metrics`, its records are read and written by `tierflow.streams.wire`.

What it does, per batch: take the records available on the input topic (up to `max_batch`, waiting at most
`linger_ms` for more; 0 = never wait for a batch to fill), decode them (`streams.wire`), run the sub-model
ONCE on all their samples (in the model thread, so the event loop keeps acknowledging and committing),
route each sample (confidence `>= limit` -> an answer on the output topic, else its tensor -> the upper
topic; the top tier answers everything), produce, and commit a batch's offsets only once every record it
produced (answers, forwards, dead letters) is acknowledged, at most every `commit_interval_ms`:
at-least-once, and a redelivered sample's answer is recognisable by its origin. Records that cannot be
decoded go to the dead-letter topic with the reason; bad input never stops the agent. A stop request lets
the in-flight batches finish, their records acknowledged and their offsets committed, before the consumer
leaves its group.

What a tier compares (`_compared_confidence`): the raw max(p) with a typed limit, exactly as Kafka-ML (the
answer's `confidence` is that max); the calibrated confidence (tiers/calibration.py `calibrated_confidence`
with the tier's T and eps) with a limit chosen from a target (the answer's `confidence` is the calibrated one,
`raw_confidence` beside it). Shadow samples (`_send_shadows`, `_record_shadow_outcomes`; streams/wire.py):
a non-top tier sends a random share `shadow_fraction` of the samples it answered up the chain again, as a
version-2 tensor message, and passes up those of the tiers below; the top tier writes each one's outcome
(its class against the early answer) to the inference's shadow topic and its live agreement and drift
gauges (streams/exits.py `live_agreement`); a shadow sample is never answered on the output topic.

While the model thread computes one batch, the loop decodes the next (already fetched) and produces the
previous one; with nothing in flight a small batch runs on the loop itself (no thread hop) and is produced
at once, so a light stream pays neither a batch-filling wait nor a thread switch. A light stream's usual batch
(one record, one sample) takes `streams.wire`'s one-sample paths, which avoid numpy's index arrays and
reductions: at 200 inputs/s every wake-up runs with cold caches, where one numpy reduction on one row costs
~100 us (10 us warm). A produced batch settles through its acknowledgements' callbacks (`_acknowledged`,
`_advance`): its offsets become committable, in order, with no task per batch.

The consumer is the tier's own aiokafka consumer in the tier's group (`tierflow-inference-<id>-tier-<k>`:
replicas share partitions, a restarted agent resumes from the committed offset), polled with `getmany` and
the settings' short fetch wait (why not a Faust stream agent: see `tier_app`). Measured with
`benchmarks/tier_inference.py` (2 cores, Tansu on the same machine, edge model, 28x28 inputs, half answered
and half forwarded): one sample per record 30-55k records/s, 64-sample records 33-47k samples/s, against
~68k samples/s for the model alone (LiteRT or Keras); the tier process spends 22-30 us of CPU per sample of
64-sample records (uint8 .. float32), the model ~15 of them. The process keeps freed heap memory for the
next batch (`tier_app.keep_freed_memory`): without it the megabyte buffers of every fetch touched fresh
pages, which cost float32 inputs a third of their rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry

from tierflow.streams import kafka as kio
from tierflow.streams import wire
from tierflow.streams.errors import PermanentError
from tierflow.streams.exits import LiveAgreement, live_agreement
from tierflow.streams.settings import KafkaSettings
from tierflow.tiers.calibration import calibrated_confidence
from tierflow.tiers.engines import Engine, load_engine
from tierflow.tiers.tier_config import TierConfig, TierConfigError, input_spec
from tierflow.tiers.tier_metrics import TierMetrics, TierStats

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


@dataclass
class _Inflight:
    """A decoded batch whose samples are in (or queued for) the model thread."""

    records: list[Any]
    batch: wire.DecodedBatch
    prediction: asyncio.Future[tuple[list[Array], float]] | None
    acks: list[asyncio.Future[Any]]
    arrived: float
    #: Predicted on the event loop (a small batch with nothing else in flight): produced at once.
    inline: bool = False


@dataclass(eq=False)
class _Settling:
    """A produced batch waiting for its records' acknowledgements; its offsets become committable once every
    batch before it has settled too (`TierAgent._advance`)."""

    offsets: dict[TopicPartition, int]
    arrived: float
    n_records: int
    #: Acknowledgements still awaited.
    waiting: int
    failed: bool = False


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

    #: The tensor message versions this agent reads; a message of another version is dead-lettered. A tier of
    #: the release before shadow samples read `(wire.WIRE_VERSION,)` alone (the tests emulate it with that).
    READ_VERSIONS: tuple[int, ...] = wire.READ_VERSIONS

    def __init__(self, config: TierConfig, kafka: KafkaSettings, *, engine: Engine | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        self.config = config
        #: The tier's cluster (input, dead letters) with the settings' fetch wait and session timeout.
        self.kafka = replace(kafka, bootstrap_servers=config.bootstrap_servers)
        self.engine = engine
        self.stats = TierStats()
        self.metrics = TierMetrics(config, self.stats, registry)
        self.joined = False
        self.assignment: set[tuple[str, int]] = set()
        self.failure: str | None = None
        #: The failure is a PermanentError (a model or config the tier cannot serve fails again on restart);
        #: anything else (the broker, unacknowledged records) may not.
        self.failure_permanent = False
        self.started = asyncio.Event()
        self._stopping = asyncio.Event()
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tierflow-model")
        self._consumer: AIOKafkaConsumer | None = None
        self._producers: dict[str, AIOKafkaProducer] = {}
        #: Produced batches in order, until their acknowledgements are in (callbacks: no task per batch).
        self._settling: deque[_Settling] = deque()
        #: Set whenever the head of `_settling` moves or fails (what `_wait_settling` waits on).
        self._settled = asyncio.Event()
        self._commit_task: asyncio.Task[None] | None = None
        #: The first failed acknowledgement (the agent stops: that batch and the later ones stay uncommitted).
        self._settle_failure: BaseException | None = None
        self._spec: wire.InputSpec | None = None
        self._round_robin = 0
        self._acked: dict[TopicPartition, int] = {}
        self._acked_records = 0
        self._last_commit = 0.0
        self._commit_lock = asyncio.Lock()
        #: Picks the answered samples sent up as shadow samples (a share `shadow_fraction` of them).
        self._shadow_rng = np.random.default_rng()
        #: At the top tier: per lower tier, [agreeing, outcomes] of the shadow samples seen since the start.
        self.live: dict[int, list[int]] = {}

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
            "live": {str(k): self._live(k).to_json() for k in sorted(self.live)},
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
            # The model loads in the model thread while the clients start and the consumer joins its group (a
            # join takes half the session timeout on Tansu): start-up costs the longer of the two, not both.
            loading = None
            if self.engine is None:
                log.info("%s: loading the %s model", cfg.name, cfg.engine)
                loading = loop.run_in_executor(self._model_thread, load_engine, cfg.engine, cfg.model)
                loading.add_done_callback(lambda f: f.cancelled() or f.exception())  # read even if start-up failed
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
            if loading is not None:
                self.engine = await loading
            assert self.engine is not None
            self._check_engine(self.engine)
            spec = input_spec(cfg, self.engine)
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
                    job = self._begin(records, spec, inline=not inflight)
                    if job.inline:  # predicted already, nothing else in flight: produce it now
                        await self._finish(job)
                    else:
                        inflight.append(job)
                elif not inflight and self._acked and not self._settling:
                    await self.commit()  # idle: commit what the last batches left uncommitted
                if inflight and (not records or len(inflight) >= PIPELINE_DEPTH):
                    await self._finish(inflight.popleft())
                self._raise_settle_failure()
            while inflight:
                await self._finish(inflight.popleft())
            await self.settle_all()
        except Exception as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            self.failure_permanent = isinstance(exc, PermanentError)
            raise
        finally:
            self.started.set()
            await self._close()

    async def _close(self) -> None:
        self._settling.clear()
        if self._commit_task is not None and not self._commit_task.done():
            self._commit_task.cancel()
            await asyncio.gather(self._commit_task, return_exceptions=True)
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
        batch = wire.decode_records(records, spec, now_ms=arrived * 1000, versions=self.READ_VERSIONS)
        m, s = self.metrics, self.stats
        m.batch_records.observe(len(records))
        s.records += len(records)
        s.batches += 1
        acks: list[asyncio.Future[Any]] = []
        if batch.rejected:
            acks.append(asyncio.ensure_future(self._deadletter(records, batch.rejected)))
        prediction: asyncio.Future[tuple[list[Array], float]] | None = None
        inline = inline and len(batch) <= INLINE_SAMPLES
        if len(batch):
            m.batch_samples.observe(len(batch))
            s.samples += len(batch)
            loop = asyncio.get_running_loop()
            if inline:
                prediction = loop.create_future()
                try:
                    prediction.set_result(self._predict(batch.x))
                except Exception as exc:  # raised where the thread's result would be: in _finish
                    prediction.set_exception(exc)
            else:
                prediction = loop.run_in_executor(self._model_thread, self._predict, batch.x)
        return _Inflight(records, batch, prediction, acks, arrived, inline)

    async def _finish(self, job: _Inflight) -> None:
        """Route the batch's samples, produce answers and forwards, and queue its commit after the acks."""
        cfg = self.config
        batch, acks = job.batch, job.acks
        if job.prediction is not None:
            outputs, model_s = await job.prediction
            m, s = self.metrics, self.stats
            m.model.observe(model_s)
            probs = outputs[-1]
            confidence = self._compared_confidence(probs)
            answered = wire.answered_mask(probs, cfg.limit, top=cfg.top, confidence=confidence)
            shadows = batch.shadow_mask() if batch.shadow else None
            if shadows is not None:
                answered = answered & ~shadows  # answered below already: a shadow sample is never answered again
            now_ms = time.time() * 1000
            n_answered = int(answered[0]) if len(answered) == 1 else int(np.count_nonzero(answered))
            if n_answered:  # a batch it only forwards (the usual one of a lower tier) encodes no answer at all
                answers = wire.encode_answers(batch, probs, answered, tier=cfg.tier_index, answered_ms=now_ms,
                                              confidence=confidence)
                acks.extend(await self._send_all(self._producers[cfg.output_servers], cfg.output_topic, answers))
            n_forwarded = len(batch) - n_answered - len(batch.shadow)
            if n_forwarded:
                assert cfg.upper_topic is not None
                forwarded = (wire.ONE_OF_ONE if len(batch) == 1 and shadows is None  # its only sample
                             else ~answered if shadows is None else ~(answered | shadows))
                upper = self._producers[cfg.upper_servers]
                for value, headers in wire.encode_forwards(batch, outputs[0], forwarded, forwarded_ms=now_ms):
                    acks.append(await upper.send(cfg.upper_topic, value, headers=headers))
            if cfg.top and batch.shadow:
                acks.append(await self._record_shadow_outcomes(batch, probs, now_ms))
            elif not cfg.top and (batch.shadow or (cfg.shadow_fraction > 0 and n_answered)):
                acks.extend(await self._send_shadows(batch, outputs[0], probs, confidence, answered, now_ms))
            s.answered += n_answered
            s.forwarded += n_forwarded
            if n_answered == 1 and len(batch) == 1:
                m.latency.observe(max(0.0, (now_ms - batch.ts[0][0]) / 1000))
            elif n_answered:
                first = np.fromiter((batch.ts[i][0] for i in np.flatnonzero(answered).tolist()), dtype=np.float64,
                                    count=n_answered)
                m.latency.observe_many(np.maximum(0.0, (now_ms - first) / 1000))
        offsets: dict[TopicPartition, int] = {}
        for r in job.records:
            tp = TopicPartition(r.topic, r.partition)
            offsets[tp] = max(offsets.get(tp, 0), r.offset + 1)
        entry = _Settling(offsets, job.arrived, len(job.records), len(acks))
        self._settling.append(entry)
        if acks:
            settled = functools.partial(self._acknowledged, entry)
            for ack in acks:
                ack.add_done_callback(settled)
        else:
            self._advance()
        while len(self._settling) > MAX_IN_FLIGHT:
            await self._wait_settling()
            self._raise_settle_failure()

    # -- what the tier compares, and its shadow samples ----------------------------------------------------

    def _compared_confidence(self, probs: Array) -> Array | None:
        """The calibrated confidence per sample when the tier compares it (limits chosen from a target), with
        the function and the T, eps the limits were chosen with; None when it compares the raw max(p) (typed
        limits: `answered_mask` and the answers then use max(p), exactly as before calibration existed).
        Rows that are not finite (a diverged model) get NaN: never answered below the top, as with max(p)."""
        cfg = self.config
        if cfg.compare != "calibrated":
            return None
        p = np.asarray(probs, dtype=np.float64).reshape(len(probs), -1)
        finite = np.isfinite(p).all(axis=1)
        if finite.all():
            return calibrated_confidence(p, cfg.temperature, cfg.eps)
        confidence = np.full(len(p), np.nan)
        if finite.any():
            confidence[finite] = calibrated_confidence(p[finite], cfg.temperature, cfg.eps)
        return confidence

    def _pick_shadows(self, answered: Array) -> Array:
        """Indices of the answered samples that also go up as shadow samples: each with probability
        `shadow_fraction`, independently (so the live agreement is an unbiased sample of the tier's answers)."""
        fraction = self.config.shadow_fraction
        idx = np.flatnonzero(answered)
        if fraction <= 0 or not len(idx) or fraction >= 1:
            return idx if fraction >= 1 else idx[:0]
        picked: Array = idx[self._shadow_rng.random(len(idx)) < fraction]
        return picked

    async def _send_shadows(self, batch: wire.DecodedBatch, tensor: Array, probs: Array, confidence: Array | None,
                            answered: Array, now_ms: float) -> list[asyncio.Future[Any]]:
        """A non-top tier: pass the batch's shadow samples up (their tags unchanged) and send a share of the
        samples it answered up as new ones, tagged with this tier's answer, in one version-2 message."""
        cfg = self.config
        assert cfg.upper_topic is not None
        rows = sorted(batch.shadow)
        tags = [batch.shadow[i] for i in rows]
        picked = self._pick_shadows(answered).tolist()
        if picked:
            flat = np.asarray(probs).reshape(len(probs), -1)
            compared = flat.max(axis=1) if confidence is None else confidence
            tags += [wire.ShadowTag(cfg.tier_index, int(flat[i].argmax()), float(compared[i])) for i in picked]
            rows += picked
        upper = self._producers[cfg.upper_servers]
        acks = [await upper.send(cfg.upper_topic, value, headers=headers)
                for value, headers in wire.encode_shadows(batch, tensor, rows, tags, forwarded_ms=now_ms)]
        self.stats.shadowed += len(picked)
        self.stats.shadow_passed += len(batch.shadow)
        return acks

    async def _record_shadow_outcomes(self, batch: wire.DecodedBatch, probs: Array,
                                      now_ms: float) -> asyncio.Future[Any]:
        """The top tier: compare the top exit's class of each shadow sample with its early answer, write the
        outcomes to the inference's shadow topic (never the output topic) and update the live gauges."""
        cfg = self.config
        rows = sorted(batch.shadow)
        top_classes = np.asarray(probs).reshape(len(probs), -1)[rows].argmax(axis=1).tolist()
        value = wire.encode_shadow_outcomes(batch, rows, top_classes, inference=cfg.inference_id,
                                            top_tier=cfg.tier_index, answered_ms=now_ms)
        ack: asyncio.Future[Any] = await self._producers[cfg.bootstrap_servers].send(
            self.kafka.shadow_topic(cfg.inference_id), value)
        new: dict[int, list[int]] = {}
        for i, top_cls in zip(rows, top_classes, strict=True):
            tag = batch.shadow[i]
            counts = new.setdefault(tag.tier, [0, 0])
            counts[0] += int(tag.cls == top_cls)
            counts[1] += 1
        for tier, (agreeing, n) in new.items():
            total = self.live.setdefault(tier, [0, 0])
            total[0] += agreeing
            total[1] += n
            self.metrics.observe_live(tier, n, agreeing, self._live(tier))
        self.stats.shadow_outcomes += len(rows)
        return ack

    def _live(self, tier: int) -> LiveAgreement:
        """Lower tier `tier`'s live agreement so far, against the inference's predicted lower bound for it."""
        agreeing, n = self.live.get(tier, [0, 0])
        return live_agreement(agreeing, n, predicted_agreement_lower(self.config.predicted_chain, tier))

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
        sent = await asyncio.gather(*(kio.send_deadletter(producer, self.kafka, records[r.index], r.reason,
                                                          agent=f"tier-{self.config.tier_index}") for r in rejected))
        # A dead letter that could not be sent is logged and counted, never fatal: the record stays at its
        # origin, and failing here would restart the tier at the same record forever.
        self.stats.deadletter_failures += sent.count(False)
        self.stats.deadlettered += len(rejected)

    def _acknowledged(self, entry: _Settling, ack: asyncio.Future[Any]) -> None:
        """One acknowledgement of `entry`'s records is in (or failed)."""
        entry.waiting -= 1
        if ack.cancelled() or ack.exception() is not None:
            entry.failed = True
            if self._settle_failure is None:
                self._settle_failure = asyncio.CancelledError() if ack.cancelled() else ack.exception()
            self._settled.set()
        if entry.waiting == 0:
            self._advance()

    def _advance(self) -> None:
        """Mark the offsets of the settled batches at the head committable, in order (a batch never before the
        ones produced earlier); commit when `commit_interval_ms` has passed since the last commit."""
        moved = False
        while self._settling and self._settling[0].waiting == 0 and not self._settling[0].failed:
            entry = self._settling.popleft()
            self.metrics.processing.observe(time.time() - entry.arrived)
            for tp, offset in entry.offsets.items():
                if offset > self._acked.get(tp, 0):
                    self._acked[tp] = offset
            self._acked_records += entry.n_records
            moved = True
        if moved:
            self._settled.set()
            if (time.monotonic() - self._last_commit >= self.config.commit_interval_ms / 1000
                    and (self._commit_task is None or self._commit_task.done())):
                self._commit_task = asyncio.ensure_future(self.commit())

    async def _wait_settling(self) -> None:
        """Until the head of the produced batches settles or fails."""
        self._settled.clear()
        await self._settled.wait()

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
        exc = self._settle_failure
        if exc is not None:
            raise RuntimeError(f"records produced for a batch were not acknowledged: {exc}") from exc

    async def settle_all(self, *, quiet: bool = False) -> None:
        """Wait until every produced batch is acknowledged, then commit."""
        while self._settling:
            if self._settle_failure is not None:
                if quiet:
                    return  # the main loop raises it
                self._raise_settle_failure()
            await self._wait_settling()
        await self.commit()


def predicted_agreement_lower(predicted_chain: dict[str, Any] | None, tier: int) -> float | None:
    """The predicted lower bound of tier `tier`'s agreement with the top exit (the inference's `predicted`
    `tier_agreement_lower`, indexed from the entry tier); None with typed limits or for a tier that answers
    nothing."""
    lowers = (predicted_chain or {}).get("tier_agreement_lower")
    if not isinstance(lowers, list) or not 0 <= tier < len(lowers):
        return None
    value = lowers[tier]
    return float(value) if isinstance(value, int | float) else None
