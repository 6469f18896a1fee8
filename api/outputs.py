"""Reading an inference's output topic for the API: the latest predictions and the per-tier statistics.

Called by the inference routes (`GET /inferences/{id}/predictions` and `/stats`). Outputs are JSON records
written by the tier agents: Kafka-ML's `{"values": [...]}` plus tierflow's fields, one sample or a batch per
record. They are read by the one reader of that format (`streams/wire.py: answer_fields`) and shown here as
one entry per sample, each field as the record holds it (null where it has none). Statistics are computed
over the latest outputs (a window), so they describe recent traffic: exit distribution per tier,
throughput, and latency percentiles; each section is one function, so a new one slots into `statistics`.

The live agreement of the tiers' early answers comes from the inference's shadow topic (the top tier's
outcomes of shadow samples, streams/wire.py), read the same way (`flatten_shadow`), and is set beside the
prediction the inference recorded when its limits were chosen from a target (`predicted_section`,
`live_section`; the drift rule is streams/exits.py `live_agreement`).

Every request of the API process shares one `OutputReader` (opened lazily, closed with the app): per Kafka
cluster one long-lived consumer (fetches) and one client (metadata, offsets, a tier group's committed
offsets), and a short-lived cache of answers. A page polling `/stats`, or a script in a loop, therefore
opens no Kafka connection per request (it used to open four clients per call), and a window is bounded in
records (`limit` per partition at most) and in bytes (`window_bytes`), read newest first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.client import AIOKafkaClient, ConnectionGroup, CoordinationType
from aiokafka.errors import KafkaError, for_code
from aiokafka.protocol.commit import OffsetFetchRequest

from tierflow.streams import kafka as kio
from tierflow.streams import wire
from tierflow.streams.exits import live_agreement
from tierflow.streams.settings import KafkaSettings
from tierflow.streams.wire import percentile

log = logging.getLogger("tierflow.api.outputs")

JSON = dict[str, Any]
T = TypeVar("T")

#: Errors that say a cluster cannot answer now (reported per cluster as `unreachable`, never a 500).
READ_ERRORS = (KafkaError, OSError, TimeoutError)


# --- samples and statistics (pure) -------------------------------------------------------------------------

def flatten_output(value: bytes, timestamp_ms: int | None, limit: int | None = None) -> list[JSON]:
    """One entry per sample (at most `limit`): {tier, class, confidence, raw_confidence, values, origin,
    latency_ms, timestamp_ms}; none for a record that is not an output record. `raw_confidence` is null where
    the tier compared the raw max(p) (its `confidence` is then the raw one)."""
    try:
        samples = wire.answer_fields(value)
    except wire.WireError:
        return []
    return [{"tier": s.tier, "class": s.cls, "confidence": s.confidence, "raw_confidence": s.raw_confidence,
             "values": s.values, "origin": s.origin, "latency_ms": s.latency_ms, "timestamp_ms": timestamp_ms}
            for s in samples[:limit]]


def flatten_shadow(value: bytes, timestamp_ms: int | None, limit: int | None = None) -> list[JSON]:
    """One entry per shadow outcome (at most `limit`): {tier, class, top_class, agree, timestamp_ms}; none for
    a record that is not a shadow outcome record."""
    try:
        outcomes = wire.read_shadow_outcomes(value)
    except wire.WireError:
        return []
    return [{"tier": o.tier, "class": o.cls, "top_class": o.top_cls, "agree": o.agree, "timestamp_ms": timestamp_ms}
            for o in outcomes[:limit]]


Flatten = Callable[[bytes, int | None, int | None], list[JSON]]


def _latencies(samples: list[JSON], tier: int | None = None) -> list[float]:
    return sorted(float(s["latency_ms"]) for s in samples
                  if isinstance(s.get("latency_ms"), int | float) and (tier is None or s.get("tier") == tier))


def exit_distribution(samples: list[JSON], tiers: int) -> list[JSON]:
    """Per tier: the answers it gave in the window, their share, and their latency percentiles."""
    counts = [0] * tiers
    for s in samples:
        t = s.get("tier")
        if isinstance(t, int) and 0 <= t < tiers:
            counts[t] += 1
    total = sum(counts)
    out: list[JSON] = []
    for t in range(tiers):
        lat = _latencies(samples, t)
        share = counts[t] / total if total else 0.0
        out.append({"index": t, "answered": counts[t], "share": share, "observed_share": share,
                    "latency_ms": {"p50": percentile(lat, 0.5), "p99": percentile(lat, 0.99)}})
    return out


def predicted_section(tier_specs: list[JSON]) -> list[JSON | None]:
    """Per tier, what the inference recorded when its limits were chosen from a target: {share, agreement,
    agreement_lower} (agreement and its bound null on the top tier); None with typed limits."""
    out: list[JSON | None] = []
    for spec in tier_specs:
        p = spec.get("predicted")
        out.append({"share": p.get("share"), "agreement": p.get("agreement"),
                    "agreement_lower": p.get("agreement_lower")} if isinstance(p, dict) else None)
    return out


def live_section(outcomes: list[JSON], predicted: list[JSON | None]) -> list[JSON | None]:
    """Per tier below the top, the live agreement of its early answers with the top exit over the window of
    shadow outcomes: {agreement, n, agreement_lower, drift} (streams/exits.py `live_agreement`: drift is
    judged against the predicted lower bound, never without a prediction); None for the top tier."""
    counts: dict[int, list[int]] = {}
    for o in outcomes:
        if isinstance(o.get("tier"), int):
            c = counts.setdefault(o["tier"], [0, 0])
            c[0] += bool(o.get("agree"))
            c[1] += 1
    out: list[JSON | None] = []
    for t, p in enumerate(predicted):
        if t == len(predicted) - 1:
            out.append(None)
            continue
        agreeing, n = counts.get(t, [0, 0])
        lower = p.get("agreement_lower") if p else None
        out.append(live_agreement(agreeing, n, float(lower) if isinstance(lower, int | float) else None).to_json())
    return out


def throughput(samples: list[JSON], answered: int) -> float | None:
    """Answers per second over the window's time span (None for fewer than two timestamps)."""
    stamps = [s["timestamp_ms"] for s in samples if isinstance(s.get("timestamp_ms"), int)]
    span_s = (max(stamps) - min(stamps)) / 1000 if len(stamps) > 1 else 0.0
    return answered / span_s if span_s > 0 else None


def latency(samples: list[JSON]) -> JSON:
    lat = _latencies(samples)
    return {"p50": percentile(lat, 0.5), "p95": percentile(lat, 0.95), "p99": percentile(lat, 0.99),
            "max": lat[-1] if lat else None}


def statistics(samples: list[JSON], tiers: int, *, tier_specs: list[JSON] | None = None,
               outcomes: list[JSON] | None = None) -> JSON:
    """Exit distribution per tier, throughput and latency percentiles of a window of answered samples; per tier
    also its `predicted` share and agreement (from `tier_specs`, the inference's tiers) and its `live`
    agreement (from `outcomes`, a window of shadow outcomes)."""
    per_tier = exit_distribution(samples, tiers)
    answered = sum(t["answered"] for t in per_tier)
    predicted = predicted_section(tier_specs or [{} for _ in range(tiers)])
    for tier, p, live in zip(per_tier, predicted, live_section(outcomes or [], predicted), strict=True):
        tier["predicted"] = p
        tier["live"] = live
    return {"window": answered, "tiers": per_tier, "throughput_per_s": throughput(samples, answered),
            "latency_ms": latency(samples), "shadow_window": len(outcomes or [])}


# --- one cluster's long-lived clients ----------------------------------------------------------------------

class ClusterReader:
    """A cluster's consumer (fetches; reassigned per read, under `lock`) and client (metadata, offsets)."""

    #: a fetch answers at most this much per partition, so reading a window backwards re-reads little
    FETCH_BYTES = 256 * 1024
    #: the step of waiting for a fetch response (the broker answers within its fetch wait, 5 ms by default)
    POLL_MS = 10

    def __init__(self, kafka: KafkaSettings, metadata_ttl_s: float) -> None:
        self.kafka = kafka
        self.metadata_ttl_s = metadata_ttl_s
        self.lock = asyncio.Lock()
        # With this process's Kafka credentials (a Kafka that authenticates: kio.security_options).
        self.client = AIOKafkaClient(**kio.security_options(kafka), bootstrap_servers=kafka.bootstrap_servers,
                                     request_timeout_ms=10000)
        self.consumer: AIOKafkaConsumer = kio.consumer(kafka, max_partition_fetch_bytes=self.FETCH_BYTES,
                                                       fetch_max_bytes=4 * self.FETCH_BYTES)
        self._metadata: Any = None
        self._metadata_at = float("-inf")

    async def start(self) -> None:
        try:
            await self.client.bootstrap()
            await self.consumer.start()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        async with self.lock:
            with contextlib.suppress(*READ_ERRORS):
                await self.consumer.stop()
            with contextlib.suppress(*READ_ERRORS):
                await self.client.close()

    async def partitions(self, topic: str) -> list[int] | None:
        """The topic's partitions, None when it does not exist. Asks for every topic's metadata: naming a
        missing topic in a metadata request creates it on brokers that auto-create topics (Tansu does)."""
        now = asyncio.get_running_loop().time()
        if now - self._metadata_at > self.metadata_ttl_s:
            self._metadata = await self.client.fetch_all_metadata()
            self._metadata_at = now
        found = self._metadata.partitions_for_topic(topic)
        return None if found is None else sorted(found)

    async def latest(self, topic: str, limit: int, window_bytes: int, flatten: Flatten = flatten_output
                     ) -> list[JSON]:
        """The newest `limit` samples of `topic` (entries made by `flatten`: answers, or shadow outcomes),
        newest first, reading at most `limit` records and about `window_bytes` of values per read (shared out
        among the partitions)."""
        partitions = await self.partitions(topic)
        if not partitions:
            return []
        budget = max(1, window_bytes // len(partitions))
        samples: list[JSON] = []
        async with self.lock:
            try:
                for p in partitions:
                    tp = TopicPartition(topic, p)
                    self.consumer.assign([tp])
                    low = int((await self.consumer.beginning_offsets([tp]))[tp])
                    samples += await self._tail(tp, low, await self._highwater(tp), limit, budget, flatten)
            finally:
                self.consumer.unsubscribe()  # the topic is no longer tracked: no metadata asks for it later
        samples.sort(key=lambda s: s.get("timestamp_ms") or 0, reverse=True)
        return samples[:limit]

    async def lag(self, group: str, topic: str) -> int | None:
        """Records of `topic` that consumer group `group` has not committed yet (a tier's backlog); None when
        the topic does not exist. A group that never committed is behind by everything the topic holds."""
        partitions = await self.partitions(topic)
        if partitions is None:
            return None
        if not partitions:
            return 0
        tps = [TopicPartition(topic, p) for p in partitions]
        committed = await self._committed(group, topic, partitions)
        total = 0
        async with self.lock:
            try:
                self.consumer.assign(tps)
                lows = await self.consumer.beginning_offsets(tps)
                for tp in tps:
                    low = int(lows[tp])
                    done = committed.get(tp)
                    total += max(0, await self._highwater(tp) - max(low if done is None else done, low))
            finally:
                self.consumer.unsubscribe()
        return total

    async def _highwater(self, tp: TopicPartition, timeout_s: float = 2.0) -> int:
        """The partition's high-water mark, from a fetch response: the "latest offset" answer can be too small
        on Tansu, so the fetch starts there and its response reports the real mark. Polled in short steps: a
        `getmany` with nothing to return waits its whole timeout although the (empty) response came at once."""
        end = int((await self.consumer.end_offsets([tp]))[tp])
        self.consumer.seek(tp, end)
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            await self.consumer.getmany(tp, timeout_ms=self.POLL_MS, max_records=1)
            mark = self.consumer.highwater(tp)
            if mark is not None:
                return max(int(mark), end)
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"no fetch response for {tp.topic}[{tp.partition}] within {timeout_s} s")

    async def _tail(self, tp: TopicPartition, low: int, high: int, limit: int, budget: int,
                    flatten: Flatten = flatten_output) -> list[JSON]:
        """The newest samples of one partition, reading backwards from `high` in ranges sized from the
        records seen so far, until `limit` samples or records, `budget` bytes, or the partition's start."""
        out: list[JSON] = []
        end, scanned, used, span = high, 0, 0, 1  # the first range is the newest record alone: it sizes the rest
        while end > low and len(out) < limit and scanned < limit:
            start = max(low, end - min(span, limit - scanned))
            records = await self._read(tp, start, end)
            scanned += end - start
            end = start
            for timestamp, value in reversed(records):
                if used + len(value) > budget:
                    return out
                used += len(value)
                out += flatten(value, timestamp, limit - len(out))
                if len(out) >= limit:
                    return out
            average = max(1, used // max(1, scanned))
            span = max(1, min(1000, (budget - used) // average))
        return out

    async def _read(self, tp: TopicPartition, start: int, end: int) -> list[tuple[int, bytes]]:
        """(timestamp, value) of the records in [start, end), oldest first."""
        self.consumer.seek(tp, start)
        records: list[tuple[int, bytes]] = []
        while int(await self.consumer.position(tp)) < end:
            position = int(await self.consumer.position(tp))
            batch = await self.consumer.getmany(tp, timeout_ms=1000, max_records=end - position)
            got = batch.get(tp, [])
            if not got:
                break  # nothing within a second: the range is gone (retention) or the broker is slow
            records += [(r.timestamp, r.value or b"") for r in got if r.offset < end]
        return records

    async def _committed(self, group: str, topic: str, partitions: list[int]) -> dict[TopicPartition, int]:
        """A group's committed offsets, asked of its coordinator without joining the group (the tiers' own
        consumers would rebalance). aiokafka's admin `list_consumer_group_offsets` cannot decode Tansu's
        OffsetFetch answer; this is the request its consumers send."""
        coordinator = await self.client.coordinator_lookup(CoordinationType.GROUP, group)
        response = await self.client.send(coordinator, OffsetFetchRequest(group, [(topic, partitions)]),
                                          group=ConnectionGroup.COORDINATION)
        found: dict[TopicPartition, int] = {}
        for name, entries in response.topics:
            for entry in entries:
                partition, offset, error = entry[0], entry[1], entry[-1]
                if error:
                    raise for_code(error)(f"committed offsets of {group} on {name}[{partition}]")
                if offset >= 0:  # -1: nothing committed
                    found[TopicPartition(name, partition)] = int(offset)
        return found


# --- the process's shared reader ---------------------------------------------------------------------------

@dataclass
class _Entry:
    task: asyncio.Task[Any]
    done_at: float = float("inf")


class OutputReader:
    """The API process's one reader of output topics and tier backlogs, shared by every request.

    Answers are cached for `ttl_s` (a failure for `failure_ttl_s`, so an unreachable cluster costs one attempt
    per period, not a connection timeout per request); concurrent requests for the same answer share one
    read. At most `max_clusters` clusters keep open clients (tiers may name other clusters), the least
    recently used is closed first."""

    def __init__(self, kafka: KafkaSettings, *, ttl_s: float = 1.0, failure_ttl_s: float = 10.0,
                 window_bytes: int = 16 * 1024 * 1024, timeout_s: float = 15.0, max_clusters: int = 8,
                 max_entries: int = 256) -> None:
        self.kafka = kafka
        self.ttl_s = ttl_s
        self.failure_ttl_s = failure_ttl_s
        self.window_bytes = window_bytes
        self.timeout_s = timeout_s
        self.max_clusters = max_clusters
        self.max_entries = max_entries
        self._clusters: OrderedDict[str, ClusterReader] = OrderedDict()
        self._starting: dict[str, asyncio.Task[ClusterReader]] = {}
        self._cache: OrderedDict[tuple[Any, ...], _Entry] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()

    async def latest(self, servers: str, topic: str, limit: int) -> list[JSON]:
        """The newest `limit` samples of `topic` on cluster `servers`, newest first."""
        async def read() -> list[JSON]:
            return await (await self._cluster(servers)).latest(topic, limit, self.window_bytes)

        return await self._cached(("latest", servers, topic, limit), read)

    async def shadow_outcomes(self, servers: str, topic: str, limit: int) -> list[JSON]:
        """The newest `limit` shadow outcomes of an inference's shadow `topic` on cluster `servers`."""
        async def read() -> list[JSON]:
            return await (await self._cluster(servers)).latest(topic, limit, self.window_bytes, flatten_shadow)

        return await self._cached(("shadow", servers, topic, limit), read)

    async def lag(self, servers: str, group: str, topic: str) -> int | None:
        """A tier's backlog: records of `topic` its consumer group `group` has not committed."""
        async def read() -> int | None:
            return await (await self._cluster(servers)).lag(group, topic)

        return await self._cached(("lag", servers, group, topic), read)

    async def close(self) -> None:
        for entry in self._cache.values():
            entry.task.cancel()
        for starting in self._starting.values():
            starting.cancel()
        clusters, self._clusters = list(self._clusters.values()), OrderedDict()
        for cluster in clusters:
            await cluster.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def _cached(self, key: tuple[Any, ...], read: Callable[[], Awaitable[T]]) -> T:
        loop = asyncio.get_running_loop()
        entry = self._cache.get(key)
        if entry is not None:
            failed = entry.task.done() and (entry.task.cancelled() or entry.task.exception() is not None)
            fresh_for = self.failure_ttl_s if failed else self.ttl_s
            if not entry.task.done() or loop.time() - entry.done_at < fresh_for:
                self._cache.move_to_end(key)
                result: T = await asyncio.shield(entry.task)
                return result
        task = asyncio.ensure_future(asyncio.wait_for(read(), self.timeout_s))
        new = _Entry(task)

        def finished(t: asyncio.Task[Any]) -> None:
            new.done_at = loop.time()
            if not t.cancelled():
                t.exception()  # retrieved here: a failure nobody waits for any more is not an asyncio warning

        task.add_done_callback(finished)
        self._cache[key] = new
        while len(self._cache) > self.max_entries:
            oldest_key, oldest = next(iter(self._cache.items()))
            if not oldest.task.done():
                break
            del self._cache[oldest_key]
        result = await asyncio.shield(task)
        return result

    async def _cluster(self, servers: str) -> ClusterReader:
        found = self._clusters.get(servers)
        if found is not None:
            self._clusters.move_to_end(servers)
            return found
        starting = self._starting.get(servers)
        if starting is None:
            starting = asyncio.ensure_future(self._open(servers))
            self._starting[servers] = starting
            starting.add_done_callback(lambda _: self._starting.pop(servers, None))
        return await asyncio.shield(starting)

    async def _open(self, servers: str) -> ClusterReader:
        cluster = ClusterReader(replace(self.kafka, bootstrap_servers=servers), metadata_ttl_s=self.ttl_s)
        await cluster.start()
        log.info("output reader: opened clients for cluster %s", servers)
        self._clusters[servers] = cluster
        while len(self._clusters) > self.max_clusters:
            _, evicted = self._clusters.popitem(last=False)
            closing = asyncio.ensure_future(evicted.close())  # waits for its lock: a read in progress finishes
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
        return cluster
