"""Announced vs used offset ranges: a Kafka-ML datasource announcement made exact on the embedded broker.

Called by the control bridge (`streams/control.py`) when it reads an announcement, so that the decider,
which is pure and cannot fetch, gets both the announced and the used ranges and records them in the event
(a replay gives the same datasource without asking the broker again).

Why: Kafka-ML's sinks compute each partition's range with `seek_to_end` + `position` before and after
sending. Tansu answers that "latest offset" lookup with the first offset of the partition's last record
batch + 1 instead of the batch's end, so after a batched produce the announced end falls short (the smaller
the records, the bigger the batches and the loss), and on a topic that already held data the announced start
falls inside an earlier writer's batch (its records would be taken).

The rule (`resolve_range`, pure): an announced end whose last record (end - 1) lies inside a record batch
but is not that batch's last record moves to the batch's end; an announced start strictly inside a record
batch (not its first offset) moves to the batch's end. Nothing beyond that one batch is taken.

Why it is exact: a latest-offset lookup is meant to answer the log end offset at the time it was made,
and a log always ends at a batch boundary, because a broker appends a producer's batch whole. A correct
broker's answer is therefore a boundary, and the rule leaves it alone. The defective answer is
`base + 1` of the log's last batch at lookup time, so the batch holding `answer - 1` was the last batch
then, and its end is exactly the log end offset the lookup should have answered. For the end lookup
(after the sink flushed) that is the end of the sink's last batch; for the start lookup (before the sink
sent anything) it is the end of the earlier writer's last batch, where the sink's first batch begins. The
used ranges are thus what the same sink announces on Apache Kafka, including its known limit: a record
another producer appends between the sink's flush and its lookup is counted there too.

What still does not match is kept as a warning, as before: records appended after the used end (another
writer, after the announcement) are not taken and the warning says how many; an end beyond the high-water
mark (records not on this broker, e.g. after a restart of the embedded broker) is a real gap.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from tierflow.streams.batches import BatchAt, BatchError, BatchReader, NoSuchPartition, RecordBatch
from tierflow.streams.errors import PermanentError, TemporaryError
from tierflow.streams.settings import KafkaSettings

log = logging.getLogger("tierflow.ranges")

JSON = dict[str, Any]

#: Seconds a whole resolution may take (bootstrap, metadata, probes): the control bridge must go on.
DEFAULT_TIMEOUT_S = 5.0


class UnknownPartition(PermanentError):
    """An announced topic or partition does not exist on the broker: the announcement cannot be used."""


class RangesUnresolved(TemporaryError):
    """The broker did not answer in time (or not at all); the same announcement may resolve later."""


@dataclass(frozen=True)
class Range:
    """One `[start, end)` offset range of a topic partition, as a datasource names it."""

    topic: str
    partition: int
    start: int
    end: int

    @classmethod
    def of(cls, raw: Mapping[str, Any]) -> Range:
        try:
            r = cls(str(raw["topic"]), int(raw["partition"]), int(raw["start"]), int(raw["end"]))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"range {dict(raw)!r} needs topic, partition, start and end") from None
        if not r.topic or r.partition < 0 or r.start < 0 or r.end < r.start:
            raise ValueError(f"range {r.text()} needs a topic, partition >= 0 and 0 <= start <= end")
        return r

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    @property
    def count(self) -> int:
        return self.end - self.start

    def text(self) -> str:
        return f"{self.topic}:{self.partition}:{self.start}:{self.end}"

    def to_json(self) -> JSON:
        return {"topic": self.topic, "partition": self.partition, "start": self.start, "end": self.end}


@dataclass(frozen=True)
class Resolved:
    """An announced range, the range used instead, why they differ, and what still does not match."""

    announced: Range
    used: Range
    reasons: tuple[str, ...] = ()  # why `used` differs from `announced` (empty when they are equal)
    warnings: tuple[str, ...] = ()  # where the broker's data still does not match `used`
    highwater: int | None = None

    def to_json(self) -> JSON:
        return {"announced": self.announced.to_json(), "used": self.used.to_json(), "reasons": list(self.reasons),
                "warnings": list(self.warnings), "highwater": self.highwater}


@dataclass(frozen=True)
class Resolution:
    """All ranges of one announcement."""

    ranges: list[Resolved] = field(default_factory=list)

    @property
    def announced(self) -> list[JSON]:
        return [r.announced.to_json() for r in self.ranges]

    @property
    def used(self) -> list[JSON]:
        return [r.used.to_json() for r in self.ranges]

    @property
    def reasons(self) -> list[str]:
        return [reason for r in self.ranges for reason in r.reasons]

    @property
    def warnings(self) -> list[str]:
        return [warning for r in self.ranges for warning in r.warnings]

    @property
    def changed(self) -> bool:
        return any(r.used != r.announced for r in self.ranges)


# -- the rule (pure) ------------------------------------------------------------------------------------

def resolve_range(announced: Range, at_start: BatchAt | None, at_last: BatchAt | None) -> Resolved:
    """The used range for `announced`, from the batch holding its start and the batch holding `end - 1`.

    `at_start` / `at_last` are what a fetch at `start` / at `end - 1` answered (None: not asked, e.g. an
    empty partition's `end == 0`). The warnings compare with the higher of the two answers' high-water marks.
    """
    where = f"{announced.topic}[{announced.partition}]"
    start, end = announced.start, announced.end
    reasons: list[str] = []
    warnings: list[str] = []

    first = at_start.batch if at_start is not None else None
    if first is not None and first.base < start < first.next:
        reasons.append(f"{where}: start {start} -> {first.next}: the announced start is inside record batch "
                       f"{first.text()}, which an earlier producer wrote whole ({_cause(first, start)}); "
                       "none of that batch is taken")
        start = first.next
    last = at_last.batch if at_last is not None else None
    if last is not None and last.base <= end - 1 < last.next - 1:
        reasons.append(f"{where}: end {end} -> {last.next}: the announced last record {end - 1} is inside "
                       f"record batch {last.text()}, which one producer wrote whole ({_cause(last, end)}); "
                       "the rest of that batch is taken, nothing beyond it")
        end = last.next
    end = max(end, start)  # both endpoints inside one batch move to its end: an empty range stays empty

    for answer, what in ((at_start, "start"), (at_last, "end")):
        if answer is not None and answer.problem is not None:
            warnings.append(f"{where}: the record batch at the announced {what} could not be read "
                            f"({answer.problem}); the announced {what} is used as it is")
    highwater = _highwater(at_start, at_last)
    if highwater is None:
        warnings.append(f"{where}: the broker did not report the partition's high-water mark; the range "
                        "could not be checked against it")
    elif end > highwater and end > start:
        warnings.append(f"{where}: end offset {end} is beyond the high-water mark {highwater}; "
                        f"{end - max(start, highwater)} announced records are not on the broker")
    elif start > highwater:
        warnings.append(f"{where}: the announced offset {start} is beyond the high-water mark {highwater}: "
                        "the partition holds fewer records than when it was announced (a restarted broker?)")
    elif end < highwater and end > start:
        warnings.append(f"{where}: {highwater - end} records after offset {end - 1} (up to the high-water mark "
                        f"{highwater}) are not part of this datasource: another writer appended them after "
                        "the announced records")
    used = Range(announced.topic, announced.partition, start, end)
    return Resolved(announced, used, tuple(reasons), tuple(warnings), highwater)


def _cause(batch: RecordBatch, lookup: int) -> str:
    if lookup == batch.base + 1:
        return "the broker's latest-offset lookup answered the batch's first offset + 1"
    return "not the latest-offset lookup's known answer, the batch's first offset + 1; the batch is still whole"


def _highwater(*answers: BatchAt | None) -> int | None:
    marks = [a.highwater for a in answers if a is not None and a.highwater is not None]
    return max(marks) if marks else None


# -- the shell: ask the broker -------------------------------------------------------------------------

async def resolve_ranges(kafka: KafkaSettings, ranges: Sequence[Mapping[str, Any]], *,
                         timeout_s: float = DEFAULT_TIMEOUT_S) -> Resolution:
    """The used ranges of an announcement, within `timeout_s`.

    Raises UnknownPartition (permanent: the announcement names a topic or partition the broker does not
    have), RangesUnresolved (temporary: no answer from the broker in time), ValueError (a malformed range).
    """
    parsed = [Range.of(r) for r in ranges]
    if not parsed:
        return Resolution([])
    try:
        async with asyncio.timeout(timeout_s):
            return await _resolve(kafka, parsed, timeout_s)
    except TimeoutError:
        raise RangesUnresolved(f"the broker {kafka.bootstrap_servers} did not answer within {timeout_s:g} s "
                               "while the announced ranges were checked", delay_s=timeout_s) from None
    except NoSuchPartition as exc:
        raise UnknownPartition(str(exc)) from None
    except (KafkaError, OSError, BatchError) as exc:
        raise RangesUnresolved(f"the announced ranges could not be checked on {kafka.bootstrap_servers}: "
                               f"{exc!r}") from None


async def _resolve(kafka: KafkaSettings, parsed: list[Range], timeout_s: float) -> Resolution:
    async with BatchReader(kafka, request_timeout_ms=int(timeout_s * 1000)) as reader:
        existing = await reader.partitions()
        for r in parsed:
            parts = existing.get(r.topic)
            if parts is None:
                raise UnknownPartition(f"topic {r.topic!r} of range {r.text()} does not exist on the broker "
                                       f"{kafka.bootstrap_servers}")
            if r.partition not in parts:
                raise UnknownPartition(f"topic {r.topic!r} has no partition {r.partition} (range {r.text()}); "
                                       f"its partitions are {_listing(parts)}")
        # One probe per start and one per `end - 1` (an empty range at offset 0 has no last record).
        probes = list(dict.fromkeys([(r.tp, r.start) for r in parsed]
                                    + [(r.tp, r.end - 1) for r in parsed if r.end > 0]))
        answers = dict(zip(probes, await reader.batches_at(probes), strict=True))
    resolved = [resolve_range(r, answers[(r.tp, r.start)], answers.get((r.tp, r.end - 1))) for r in parsed]
    for one in resolved:
        for reason in one.reasons:
            log.info("announced range %s used as %s: %s", one.announced.text(), one.used.text(), reason)
    return Resolution(resolved)


def _listing(parts: frozenset[int]) -> str:
    ordered = sorted(parts)
    if ordered and ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{ordered[0]}..{ordered[-1]}"
    return ", ".join(map(str, ordered)) or "none"
