"""Unit tests of the range rule, `tierflow.streams.ranges.resolve_range`: no broker, batches written by hand.

The story: a partition holds an earlier writer's batch 0..99, then a sink's batches 100..149 and 150..199.
Tansu answers a latest-offset lookup with the last batch's first offset + 1, so a Kafka-ML sink announces
101..151 instead of 100..200. The rule gives back 100..200; on a correct broker the rule changes nothing.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest

from tierflow.streams.batches import BatchAt, RecordBatch
from tierflow.streams.catalogue import MAX_RANGES
from tierflow.streams.control import ControlBridge, ControlMessageError, Stopping, parse_control_message
from tierflow.streams.envelope import JSON
from tierflow.streams.ranges import Range, RangesUnresolved, Resolution, resolve_range
from tierflow.streams.settings import KafkaSettings

EARLIER = RecordBatch(0, 100)
FIRST = RecordBatch(100, 150)
LAST = RecordBatch(150, 200)


def at(batch: RecordBatch | None, highwater: int | None = 200, problem: str | None = None) -> BatchAt:
    return BatchAt(batch, highwater, problem)


def announced(start: int, end: int) -> Range:
    return Range("data", 2, start, end)


def test_the_lookups_defect_is_undone_at_both_ends() -> None:
    # The start lookup answered inside the earlier writer's batch, the end lookup inside the sink's last.
    r = resolve_range(announced(1, 151), at(EARLIER), at(LAST))
    assert (r.used.start, r.used.end) == (100, 200)
    assert r.announced == announced(1, 151)
    assert len(r.reasons) == 2
    assert "start 1 -> 100" in r.reasons[0] and "0..99" in r.reasons[0]
    assert "end 151 -> 200" in r.reasons[1] and "150..199" in r.reasons[1] and "nothing beyond it" in r.reasons[1]
    assert "first offset + 1" in r.reasons[1]
    assert r.warnings == ()


def test_a_correct_brokers_answers_are_left_alone() -> None:
    # Exact lookups answer batch boundaries: the start is a batch's first offset, end - 1 a batch's last.
    r = resolve_range(announced(100, 200), at(FIRST), at(LAST))
    assert r.used == r.announced and r.reasons == () and r.warnings == ()
    # An empty topic: start 0 has no batch yet at lookup time; end 0 has no last record to look at.
    r = resolve_range(announced(0, 0), at(None, highwater=0), None)
    assert r.used == announced(0, 0) and r.reasons == () and r.warnings == ()


def test_nothing_beyond_the_batch_of_the_last_record_is_taken() -> None:
    # The end lookup answered inside FIRST (151 was not written yet): LAST is someone else's, not taken.
    r = resolve_range(announced(100, 101), at(FIRST), at(FIRST))
    assert (r.used.start, r.used.end) == (100, 150)
    assert any("50 records after offset 149" in w and "another writer" in w for w in r.warnings)


def test_an_empty_announcement_inside_an_earlier_batch_stays_empty() -> None:
    # A partition the sink sent nothing to: both lookups answered 1 (inside EARLIER).
    r = resolve_range(announced(1, 1), at(EARLIER, highwater=100), at(EARLIER, highwater=100))
    assert (r.used.start, r.used.end) == (100, 100) and r.used.count == 0
    assert r.warnings == ()


def test_a_boundary_inside_a_one_record_batch_or_a_gap_is_not_moved() -> None:
    single = RecordBatch(150, 151)  # a one-record batch: the defective answer (151) is already exact
    r = resolve_range(announced(100, 151), at(FIRST), at(single, highwater=151))
    assert r.used == r.announced and r.reasons == ()
    # A compacted log may answer a later batch than the offset asked for: the offset is not inside it.
    r = resolve_range(announced(90, 95), at(FIRST), at(FIRST))
    assert r.used == r.announced


def test_an_endpoint_that_is_not_the_lookups_signature_still_takes_the_whole_batch_and_says_so() -> None:
    r = resolve_range(announced(100, 170), at(FIRST), at(LAST))
    assert (r.used.start, r.used.end) == (100, 200)
    assert "not the latest-offset lookup's known answer" in r.reasons[0]


@pytest.mark.parametrize(("highwater", "expected"), [
    (150, "end offset 200 is beyond the high-water mark 150; 50 announced records are not on the broker"),
    (None, "did not report the partition's high-water mark"),
])
def test_data_that_still_does_not_match_is_a_warning(highwater: int | None, expected: str) -> None:
    r = resolve_range(announced(100, 200), at(FIRST, highwater), at(None, highwater))
    assert r.used == r.announced
    assert any(expected in w for w in r.warnings), r.warnings


def test_a_batch_that_could_not_be_read_keeps_the_announced_offset_with_a_warning() -> None:
    r = resolve_range(announced(1, 151), at(EARLIER), at(None, problem="a fetch at offset 150 failed: X"))
    assert (r.used.start, r.used.end) == (100, 151)
    assert any("record batch at the announced end could not be read" in w for w in r.warnings)


def test_a_resolution_lists_announced_and_used_ranges_in_order() -> None:
    a = resolve_range(announced(1, 151), at(EARLIER), at(LAST))
    b = resolve_range(Range("data", 3, 0, 10), at(RecordBatch(0, 10), 10), at(RecordBatch(0, 10), 10))
    res = Resolution([a, b])
    assert res.announced == [announced(1, 151).to_json(), Range("data", 3, 0, 10).to_json()]
    assert res.used == [{"topic": "data", "partition": 2, "start": 100, "end": 200},
                        {"topic": "data", "partition": 3, "start": 0, "end": 10}]
    assert res.changed and len(res.reasons) == 2 and res.warnings == []


@pytest.mark.parametrize("raw", [{"topic": "t", "partition": 0, "start": 5, "end": 4},
                                 {"topic": "", "partition": 0, "start": 0, "end": 1},
                                 {"topic": "t", "partition": -1, "start": 0, "end": 1},
                                 {"topic": "t", "start": 0, "end": 1}])
def test_a_malformed_range_is_refused(raw: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="range"):
        Range.of(raw)


# -- the control bridge's side: what it sends the broker at all, and how it waits ------------------------

def test_an_announcement_naming_too_many_ranges_is_refused_before_the_broker_is_asked() -> None:
    spec = ",".join(f"t:{p}:0:1" for p in range(MAX_RANGES + 1))
    with pytest.raises(ControlMessageError, match=f"names {MAX_RANGES + 1} ranges; at most {MAX_RANGES}"):
        parse_control_message(b"\x01", orjson.dumps({"topic": spec}))
    assert len(parse_control_message(b"\x01", orjson.dumps({"topic": spec.rsplit(",", 1)[0]}))["ranges"]) == MAX_RANGES


async def test_a_bridge_waiting_for_the_broker_stops_at_once_without_recording_the_message() -> None:
    asked = asyncio.Event()

    async def silent(kafka: KafkaSettings, ranges: list[JSON]) -> Resolution:
        asked.set()
        raise RangesUnresolved("no answer", delay_s=60)

    bridge = ControlBridge(KafkaSettings(), "postgresql://unused", resolve=silent)
    stopping = asyncio.Event()
    waiting = asyncio.create_task(bridge._resolve([{"topic": "t", "partition": 0, "start": 0, "end": 1}], stopping))
    await asyncio.wait_for(asked.wait(), timeout=1)
    stopping.set()
    # Raised (not returned): the reader records no position, so the next start reads this message again.
    with pytest.raises(Stopping):
        await asyncio.wait_for(waiting, timeout=1)
