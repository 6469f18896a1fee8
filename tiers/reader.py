"""The training job's reader: exactly the announced offset ranges of a datasource, into numpy arrays.

Called by the training workload (`read_datasource`) and by benchmarks/training_reader.py. A datasource
announcement names `[start, end)` offset ranges per topic/partition; the reader assigns those partitions
(no consumer-group join: slow on Tansu, and the positions are ours), seeks to each start, and pulls large
`getmany` batches until every partition reached its end, dropping anything at or after `end` (records other
writers appended later). RAW batches are copied into the final arrays as they arrive (tiers/data.py:
RawBuilder), so a dataset is never held twice.

The broker may no longer have the data: the embedded broker keeps topics in memory and does not restore
training-data topics after a restart, so a datasource can outlive its records. Before reading, the topic
and partitions are looked up in all-topics metadata (a metadata request naming an unknown topic makes
Tansu auto-create it, empty), and while reading each partition's high-water mark is compared with the
announced end; either way the caller gets a `DataUnavailable` that says so, never a hang or a short read.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import OffsetOutOfRangeError

from tierflow.streams import kafka as kio
from tierflow.streams.errors import TierflowError
from tierflow.streams.ranges import Range  # one offset range of a datasource, as the control bridge names it
from tierflow.streams.settings import KafkaSettings
from tierflow.tiers.data import DataError, InputConfig, RawBuilder, decode

Progress = Callable[[int, int], None]  # (records read so far, records announced)

# Big fetches: a 784-byte record set of 500k records is ~400 MB; 16 MB per partition per fetch keeps the
# number of round trips low without holding much more than one fetch per partition in memory.
FETCH_OPTIONS: dict[str, Any] = {
    "max_partition_fetch_bytes": 16 * 1024 * 1024,
    "fetch_max_bytes": 64 * 1024 * 1024,
    "auto_offset_reset": "none",  # never silently jump to another offset: a gap is an error here
}


class DataUnavailable(TierflowError, RuntimeError):
    """The broker no longer has (or never had) the announced records; the message says what to do.

    Neither permanent nor temporary by itself: the training job reports it as a temporary failure (the
    user may send the data again), as it reports a broker it cannot reach."""


@dataclass
class _Span:
    """What is read from one partition: from the lowest start to the highest end of its ranges.

    Each range owns the slots `base .. base + (end - start)` of the announcement (ranges in announcement
    order, back to back), so a record's slot follows from its offset: `base + offset - start`.
    """

    tp: TopicPartition
    ranges: list[tuple[Range, int]]  # (range, base slot), sorted by start
    start: int = 0
    end: int = 0

    def __post_init__(self) -> None:
        self.ranges.sort(key=lambda rb: rb[0].start)
        self.start = min(r.start for r, _ in self.ranges)
        self.end = max(r.end for r, _ in self.ranges)

    def slots_of(self, offsets: np.ndarray[Any, Any]) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        """(slots, keep): the slot of each offset, and which offsets fall inside one of the ranges."""
        starts = np.array([r.start for r, _ in self.ranges], dtype=np.int64)
        ends = np.array([r.end for r, _ in self.ranges], dtype=np.int64)
        bases = np.array([b for _, b in self.ranges], dtype=np.int64)
        which = np.searchsorted(starts, offsets, side="right") - 1
        keep = (which >= 0) & (offsets < ends[np.maximum(which, 0)])
        which = np.maximum(which, 0)
        return bases[which] + offsets - starts[which], keep


class _Collector(Protocol):
    def add(self, span: _Span, records: list[Any]) -> None: ...


class _Lists:
    """Keeps the records per partition (values, keys, offsets), for `read_records`."""

    def __init__(self) -> None:
        self.got: dict[TopicPartition, tuple[list[bytes], list[bytes | None], list[int]]] = {}

    def add(self, span: _Span, records: list[Any]) -> None:
        values, keys, offsets = self.got.setdefault(span.tp, ([], [], []))
        values += [r.value for r in records]
        keys += [r.key for r in records]
        offsets += [r.offset for r in records]

    def assemble(self, parsed: list[Range]) -> Records:
        values: list[bytes] = []
        keys: list[bytes | None] = []
        origins: list[tuple[Range, Sequence[int]]] = []
        for r in parsed:
            vs, ks, offs = self.got.get(r.tp, ([], [], []))
            if offs and r.start <= offs[0] and offs[-1] < r.end:  # the partition's only range: all of it
                values += vs
                keys += ks
                origins.append((r, offs))
                continue
            idx = [i for i, off in enumerate(offs) if r.start <= off < r.end]
            values += [vs[i] for i in idx]
            keys += [ks[i] for i in idx]
            origins.append((r, [offs[i] for i in idx]))
        return Records(values, keys, origins)


class _Raw:
    """Copies each batch of RAW records straight into the arrays (tiers/data.py: RawBuilder)."""

    def __init__(self, builder: RawBuilder) -> None:
        self.builder = builder

    def add(self, span: _Span, records: list[Any]) -> None:
        values = [r.value for r in records]
        keys = [r.key for r in records]
        first, last = records[0].offset, records[-1].offset
        if len(span.ranges) == 1 and last - first == len(records) - 1:  # the common case: one run of slots
            r, base = span.ranges[0]
            self.builder.put(base + first - r.start, values, keys)
            return
        offsets = np.fromiter((r.offset for r in records), dtype=np.int64, count=len(records))
        slots, keep = span.slots_of(offsets)
        if not keep.all():
            values = [v for v, k in zip(values, keep, strict=True) if k]
            keys = [v for v, k in zip(keys, keep, strict=True) if k]
            slots = slots[keep]
        self.builder.put_at(slots, values, keys)


@dataclass
class Records:
    """Records of the announced ranges, in announcement order, with where each came from."""

    values: list[bytes]
    keys: list[bytes | None]
    origins: list[tuple[Range, Sequence[int]]]  # per range: the offsets of its records

    def locate(self, index: int) -> str:
        """'topic t, partition 0, offset 117' for the index-th record."""
        for r, offsets in self.origins:
            if index < len(offsets):
                return f"topic {r.topic}, partition {r.partition}, offset {offsets[index]}"
            index -= len(offsets)
        return "beyond the records read"


def locate_slot(ranges: list[Range], slot: int) -> str:
    """'topic t, partition 0, offset 117' for a slot of the announcement (ranges back to back)."""
    for r in ranges:
        if slot < r.end - r.start:
            return f"topic {r.topic}, partition {r.partition}, offset {r.start + slot}"
        slot -= r.end - r.start
    return "beyond the announced ranges"


def parse_ranges(ranges: Sequence[Mapping[str, Any]] | str) -> list[Range]:
    """Ranges as the datasource row stores them (a list of objects, or its JSON text)."""
    raw = orjson.loads(ranges) if isinstance(ranges, str) else ranges
    if not isinstance(raw, list):
        raise DataError("ranges must be a list of {topic, partition, start, end}")
    try:
        return [Range.of(r) for r in raw]
    except ValueError as exc:
        raise DataError(str(exc)) from None


_RESTART_HINT = ("the data is gone: the embedded broker keeps topics in memory and does not restore "
                 "training-data topics after a restart (or the topic was deleted); send the dataset again "
                 "(tierflow send ...) and train on the new datasource")


async def _check_available(c: AIOKafkaConsumer, kafka: KafkaSettings, spans: dict[TopicPartition, _Span]) -> None:
    """Topics, partitions and first offsets; the end of each partition is checked while reading (below)."""
    # All-topics metadata: a metadata request naming an unknown topic would make Tansu auto-create it.
    existing = await c.topics()
    for tp in spans:
        if tp.topic not in existing:
            raise DataUnavailable(f"topic {tp.topic!r} does not exist on {kafka.bootstrap_servers}; {_RESTART_HINT}")
        partitions = c.partitions_for_topic(tp.topic)  # known from the bootstrap's all-topics metadata
        if partitions is not None and tp.partition not in partitions:
            raise DataUnavailable(f"topic {tp.topic!r} has no partition {tp.partition} (it has "
                                  f"{len(partitions)}); {_RESTART_HINT}")
    c.assign(list(spans))
    earliest = await c.beginning_offsets(list(spans))
    for tp, span in spans.items():
        first = int(earliest[tp])
        if first > span.start:
            raise DataUnavailable(f"{tp.topic}[{tp.partition}]: offsets {span.start}..{first - 1} were deleted "
                                  "(retention); send the dataset again")


def _spans(parsed: list[Range]) -> dict[TopicPartition, _Span]:
    """The partitions to read, each with its ranges and their base slots (announcement order)."""
    grouped: dict[TopicPartition, list[tuple[Range, int]]] = {}
    base = 0
    for r in parsed:
        grouped.setdefault(r.tp, []).append((r, base))
        base += r.end - r.start
    return {tp: _Span(tp, ranges) for tp, ranges in grouped.items()}


async def _read(kafka: KafkaSettings, parsed: list[Range], collector: _Collector, *, progress: Progress | None,
                stall_timeout_s: float, consumer_options: Mapping[str, Any] | None) -> None:
    spans = _spans(parsed)
    if not spans:
        return
    total = sum(r.end - r.start for r in parsed)
    c = kio.consumer(kafka, **{**FETCH_OPTIONS, **(consumer_options or {})})
    await c.start()
    try:
        await _check_available(c, kafka, spans)
        for tp, span in spans.items():
            c.seek(tp, span.start)
        await _pull(c, kafka, spans, collector, total, progress, stall_timeout_s)
    except OffsetOutOfRangeError as exc:
        raise DataUnavailable(f"the broker no longer has the announced offsets ({exc}); send the dataset again") \
            from None
    finally:
        await c.stop()


async def _pull(c: AIOKafkaConsumer, kafka: KafkaSettings, spans: dict[TopicPartition, _Span],
                collector: _Collector, total: int, progress: Progress | None, stall_timeout_s: float) -> None:
    remaining = dict(spans)
    read = 0
    last_progress = time.monotonic()
    while remaining:
        batch = await c.getmany(timeout_ms=200)  # finished partitions are paused: nothing comes from them
        for tp, span in remaining.items():
            # Every fetch response carries the partition's high-water mark (the end of its log; a "latest
            # offset" lookup can answer too small on Tansu). Below the announced end, once everything up
            # to it was read, the announced records are not on this broker.
            highwater = c.highwater(tp)
            if highwater is not None and highwater < span.end and not batch.get(tp) \
                    and await c.position(tp) >= highwater:
                raise DataUnavailable(f"{tp.topic}[{tp.partition}] ends at offset {highwater} but the datasource "
                                      f"announces records up to {span.end} (broker {kafka.bootstrap_servers}); "
                                      f"{_RESTART_HINT}")
        if not batch:
            if time.monotonic() - last_progress > stall_timeout_s:
                where = ", ".join([f"{tp.topic}[{tp.partition}] at {await c.position(tp)} of {s.end}"
                                   for tp, s in remaining.items()])
                raise DataUnavailable(f"no records for {stall_timeout_s:.0f} s while reading ({where})")
            continue
        last_progress = time.monotonic()
        for tp, records in batch.items():
            span = remaining.get(tp)
            if span is None or not records:
                continue
            if records[-1].offset >= span.end:  # another writer appended after the range: not ours
                records = [r for r in records if r.offset < span.end]
            if records:
                collector.add(span, records)
                read += len(records)
            if await c.position(tp) >= span.end:
                c.pause(tp)  # stop prefetching beyond the range
                del remaining[tp]
        if progress is not None:
            progress(read, total)


def _nonempty(ranges: Sequence[Mapping[str, Any]] | str) -> list[Range]:
    return [r for r in parse_ranges(ranges) if r.end > r.start]


async def read_records(kafka: KafkaSettings, ranges: Sequence[Mapping[str, Any]] | str, *,
                       progress: Progress | None = None, stall_timeout_s: float = 30.0,
                       consumer_options: Mapping[str, Any] | None = None) -> Records:
    """Read exactly the announced ranges; see `read_ranges` (this one also keeps each record's offset)."""
    return await _read_lists(kafka, _nonempty(ranges), progress=progress, stall_timeout_s=stall_timeout_s,
                             consumer_options=consumer_options)


async def _read_lists(kafka: KafkaSettings, parsed: list[Range], *, progress: Progress | None,
                      stall_timeout_s: float, consumer_options: Mapping[str, Any] | None = None) -> Records:
    lists = _Lists()
    await _read(kafka, parsed, lists, progress=progress, stall_timeout_s=stall_timeout_s,
                consumer_options=consumer_options)
    return lists.assemble(parsed)


async def read_ranges(kafka: KafkaSettings, ranges: Sequence[Mapping[str, Any]] | str, *,
                      progress: Progress | None = None) -> tuple[list[bytes], list[bytes | None]]:
    """(values, keys) of exactly the records in the announced `[start, end)` ranges, in announcement order.

    `ranges` is the datasource's list of `{topic, partition, start, end}` (or its JSON text). Raises
    DataUnavailable when the broker no longer has the records, DataError when a range is malformed.
    """
    records = await read_records(kafka, ranges, progress=progress)
    return records.values, records.keys


def _json(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, str | bytes) and value else value


async def read_datasource(kafka: KafkaSettings, datasource: Mapping[str, Any], *, progress: Progress | None = None,
                          stall_timeout_s: float = 30.0) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """(x, y) of a datasource (a `proj.datasources` row or an AnnounceDatasource payload): read + decode.

    RAW records are copied batch by batch into the final arrays while they arrive (no second copy of the
    dataset as Python objects); AVRO records are read, then decoded. A DataError about one record names
    its topic, partition and offset.
    """
    try:
        parsed = _nonempty(_json(datasource["ranges"]))
    except KeyError:
        raise DataError("the datasource has no ranges") from None
    cfg = InputConfig.parse(_json(datasource.get("input_config")) or {})
    fmt = str(datasource.get("input_format") or "RAW").upper()
    if fmt not in ("RAW", "AVRO"):
        raise DataError(f"input_format {datasource.get('input_format')!r} is not RAW or AVRO")
    try:
        if fmt == "RAW":
            builder = RawBuilder(cfg, sum(r.end - r.start for r in parsed))
            await _read(kafka, parsed, _Raw(builder), progress=progress, stall_timeout_s=stall_timeout_s,
                        consumer_options=None)
            return builder.finish()
        records = await _read_lists(kafka, parsed, progress=progress, stall_timeout_s=stall_timeout_s)
    except DataError as exc:
        if exc.index is None:
            raise
        raise DataError(f"{exc} ({locate_slot(parsed, exc.index)})", index=exc.index) from None
    try:
        return decode(fmt, records.values, records.keys, cfg)
    except DataError as exc:
        if exc.index is None:
            raise
        raise DataError(f"{exc} ({records.locate(exc.index)})", index=exc.index) from None


__all__ = ["DataUnavailable", "Range", "Records", "parse_ranges", "read_datasource", "read_ranges",
           "read_records"]
