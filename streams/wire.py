"""Data-plane wire formats of the tiers: decoding inputs, routing samples, encoding answers and forwards.

Pure functions over numpy and orjson (no Kafka client, no TensorFlow, no Faust); a core module that imports
nothing of tierflow but `streams.errors`. Called by the tier agent (`tierflow.tiers.tier_agent`) on every
consumed batch; by tierflow's clients, the demo and the benchmarks to build batched inputs and read answers
(`encode_tensor`, `read_answers`); by the API, which lists answers and their statistics from the output
topic (`answer_fields`, `percentile`) and a tier's backlog from its consumer group (`tier_group`); and by
the unit tests. It is also the one home of the codecs' small rules: dtype names (`parse_dtype`, which
Kafka-ML's input_config in `tiers/data.py` and the sinks use too) and shapes in messages (`shape_text`).

Inputs a tier accepts (any mix within one batch)
------------------------------------------------
* **tierflow tensor message**: value = the C-order bytes of a batch of `n` samples; headers
  - `tierflow.v` = `1`;
  - `tierflow.dtype`: numpy type name (`float32`, `uint8`, ...), little-endian;
  - `tierflow.shape`: the shape of ONE sample, comma-separated (`28,28,1`; empty for a scalar); `n` is the
    value's length divided by the sample size;
  - `tierflow.origins` (optional): JSON list, one `[topic, partition, offset, index]` per sample: the record
    the sample ORIGINALLY entered the chain in and its position in that record. Carried unchanged across
    hops, so an answer (and a duplicate after a redelivery) is recognisable by it. Absent on a client's
    batched input: the tier takes the consumed record's own position, `index` = the sample's position;
  - `tierflow.ts` (optional): JSON list, one entry per sample: `[t_input, t_fwd_0, t_fwd_1, ...]` in ms
    since the epoch: the original input record's timestamp, then the wall-clock time at which each tier
    forwarded the sample (a bare number is read as `[t_input]`). Absent: the record's timestamp. The answer
    carries them, so a reader gets the end-to-end latency and the time spent at each tier.
  - `tierflow.single` = `1`: every sample of the record was alone in its ORIGINAL input record, so its answer
    is a single-sample output record (otherwise it joins its original record's batched answer).
  - `tierflow.shadow` (version 2 only): see "Shadow samples" below.
* **Kafka-ML raw sample** (no headers): one sample's bytes in the tier's raw dtype: on a first tier the
  datasource's `input_config` (`data_type`, `data_reshape`), e.g. `x_test[i].tobytes()`; on a non-first tier
  Kafka-ML's forwarded float32 tensor of the tier model's input shape. Single-sample.
* **JSON-list tensor** (2020 thesis, no headers): a JSON array of numbers, nested or flat, holding exactly one
  sample's values. Single-sample.
The samples are reshaped to the model's input shape when the element counts agree (`28,28` feeds a
`28,28,1` model) and cast to the model's dtype. A record that cannot be decoded (empty, wrong size, unknown
dtype, bad JSON, inconsistent headers) is reported in `DecodedBatch.rejected` with a reason and left out;
the agent dead-letters it.

Routing
-------
`answered_mask`: a sample is answered where its confidence `>= limit`; the top tier answers everything. The
confidence is the raw `max(probabilities)` (typed limits, as Kafka-ML), or the calibrated one the tier
computed and passed in (limits chosen from a target: tiers/calibration.py `calibrated_confidence`).

Outputs (the output topic; JSON, no key)
----------------------------------------
Answers mirror inputs. A sample that was alone in its original record gets one record::

    {"values": [p0, ..., p9],            # Kafka-ML's field: the probabilities
     "tier": 1, "exit": 1,               # the tier index that answered (exit k is tier k's classifier)
     "class": 3, "confidence": 0.97,     # argmax and max of values
     "origin": {"topic": "in", "partition": 0, "offset": 42, "index": 0},
     "timestamps": {"input": 1700000000000, "forwarded": [1700000000003.2], "answered": 1700000000005.9},
     "latency_ms": 5.9}                  # answered - input

The samples a tier answers out of one batched original record (same origin topic/partition/offset) go in
ONE record, per-sample fields as parallel lists::

    {"values": [[...], [...]], "classes": [3, 7], "confidences": [0.97, 0.91],
     "origins": [{"topic": "in", "partition": 0, "offset": 7, "index": 0}, {..., "index": 5}],
     "timestamps": [{"input": ..., "forwarded": [...], "answered": ...}, ...], "latencies_ms": [5.9, 6.1],
     "tier": 1, "exit": 1}

A tier that compares calibrated confidences writes that confidence as `confidence` (`confidences`) and the
raw `max(values)` beside it as `raw_confidence` (`raw_confidences`); `values` stay the raw probabilities. A
tier comparing the raw max(p) writes no `raw_confidence`: its `confidence` is the raw one (its answers are
byte for byte what they were before calibration existed).

`answer_fields` is the one reader of both forms: one `AnswerFields` per sample, each field as the record
holds it (None where it has none: Kafka-ML's own outputs carry only `values`); `read_answers` types them
as one `Answer` per sample and refuses a record that lacks what a tier's answer carries.

Forwards (the upper topic)
--------------------------
The samples a tier does not answer go up as ONE tensor message (the model's tensor output, float32) with
their origins and timestamps (this tier's forward time appended); when a batch mixes samples of
single-sample and batched original records, those two groups travel as two messages so `tierflow.single`
stays one flag per record.

Shadow samples (watching a chain's early answers live)
------------------------------------------------------
A non-top tier also sends a share (`shadow_fraction`) of the samples it ANSWERED up the chain, so that the top
exit's class can be compared with its early answer. They travel as a tensor message of **version 2**
(`tierflow.v` = `2`): a version-1 message plus `tierflow.shadow`, a JSON list with one
`[tier, class, confidence]` per sample (the tier that answered it, its class and the confidence it compared).
Only shadow samples use version 2: a tier of an earlier release reads version 1 alone, so it dead-letters a
shadow message instead of answering it a second time (ordinary forwards stay version 1, readable by it).
An intermediate tier runs its model on a shadow sample and passes it up, tag unchanged, as version 2 again;
it never answers it. The top tier computes its class and writes the outcome to the inference's shadow topic
(`KafkaSettings.shadow_topic`), never to the output topic: the client gets exactly one answer per input::

    {"inference": 7, "top_tier": 2, "answered_ms": 1700000000005.9,
     "outcomes": [{"tier": 0, "class": 3, "confidence": 0.97, "top_class": 3, "agree": true,
                   "origin": {"topic": "in", "partition": 0, "offset": 42, "index": 0}}, ...]}

`encode_shadow_outcomes` writes one such record per batch; `read_shadow_outcomes` is its one reader (the API's
live agreement).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import orjson

from tierflow.streams.errors import PermanentError

Array = npt.NDArray[Any]
Headers = list[tuple[str, bytes]]
#: Where a sample originally entered the chain: (topic, partition, offset, index in that record).
SampleOrigin = tuple[str, int, int, int]

#: Version of ordinary tensor messages (a client's batched input, a tier's forwards).
WIRE_VERSION = 1
#: Version of shadow messages: version 1 plus `tierflow.shadow` (a reader of version 1 alone refuses them).
SHADOW_VERSION = 2
#: The tensor message versions this release reads.
READ_VERSIONS: tuple[int, ...] = (WIRE_VERSION, SHADOW_VERSION)
H_VERSION = "tierflow.v"
H_DTYPE = "tierflow.dtype"
H_SHAPE = "tierflow.shape"
H_ORIGINS = "tierflow.origins"
H_TS = "tierflow.ts"
H_SINGLE = "tierflow.single"
H_SHADOW = "tierflow.shadow"
_PREFIX = "tierflow."
_NUMPY = orjson.OPT_SERIALIZE_NUMPY
#: Types a wrong-size raw record is compared with, to hint at a producer sending the wrong dtype.
_HINT_DTYPES = ("float32", "float64", "float16", "uint8", "int32", "int64")
#: TensorFlow's names that numpy reads differently (Kafka-ML decodes with tf.io.decode_raw: "float" is float32).
_TF_ALIASES = {"float": "float32", "half": "float16", "double": "float64"}


class WireError(PermanentError, ValueError):
    """A record (or an argument) that does not follow the wire format; the message says what is wrong.

    Permanent: the record is dead-lettered, never retried."""


class RecordLike(Protocol):
    """What the decoder reads of a consumed record (aiokafka's `ConsumerRecord` has these attributes)."""

    @property
    def topic(self) -> str: ...

    @property
    def partition(self) -> int: ...

    @property
    def offset(self) -> int: ...

    @property
    def timestamp(self) -> int: ...

    @property
    def value(self) -> bytes | None: ...

    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


@dataclass(frozen=True)
class WireRecord:
    """A plain `RecordLike` (tests, benchmarks, offline replays)."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    headers: Sequence[tuple[str, bytes]] = ()
    timestamp: int = -1


@functools.lru_cache(maxsize=64)  # every tensor message names its dtype: parsed once per name
def parse_dtype(name: str, what: str = "dtype") -> np.dtype[Any]:
    """A numeric little-endian dtype (as tf.io.decode_raw reads) from its numpy or TensorFlow name.

    The one parser of dtype names: tensor message headers, Kafka-ML's input_config (`tiers/data.py`), the
    sinks' arguments. WireError naming `what` for a name that is not a numeric type.
    """
    text = name.strip().lower()
    text = _TF_ALIASES.get(text, text)
    try:
        dtype = np.dtype(text)
    except TypeError:
        raise WireError(f"{what} {name!r} is not a numeric type (e.g. uint8, int64, float32)") from None
    if dtype.kind not in "biuf":
        raise WireError(f"{what} {name!r} is not numeric (e.g. uint8, int64, float32)")
    return dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype


def shape_text(shape: Sequence[int | None] | None) -> str:
    """A shape as messages show it: 28x28; ? for a dimension not known (None, or -1 in a reshape); "scalar"
    for (); "(any shape)" for None."""
    if shape is None:
        return "(any shape)"
    return "x".join("?" if d is None or d == -1 else str(d) for d in shape) or "scalar"


def tier_group(inference_id: int, tier_index: int) -> str:
    """The consumer group of tier `tier_index` of inference `inference_id`: the tier's replicas share its
    input partitions in it, a restarted tier resumes from its commits, and the API reads its backlog from it."""
    return f"tierflow-inference-{inference_id}-tier-{tier_index}"


@dataclass(frozen=True)
class InputSpec:
    """How one tier reads its input.

    `sample_shape`/`dtype`: the model's input (one sample, no batch dimension), what decoded samples become.
    `raw_dtype`/`raw_shape`: header-less raw records (the datasource's input_config on a first tier, float32
    of the model's input elsewhere); `raw_shape` must hold as many values as `sample_shape`.
    `plain`: a decoder of header-less records that replaces raw/JSON (e.g. AVRO on a first tier); it returns
    one sample and raises ValueError with a reason.
    """

    sample_shape: tuple[int, ...]
    dtype: np.dtype[Any] = field(default_factory=lambda: np.dtype(np.float32))
    raw_dtype: np.dtype[Any] = field(default_factory=lambda: np.dtype(np.float32))
    raw_shape: tuple[int, ...] | None = None
    plain: Callable[[bytes], Array] | None = None

    def __post_init__(self) -> None:
        if self.raw_shape is not None and math.prod(self.raw_shape) != self.sample_count:
            raise WireError(f"raw samples of shape {shape_text(self.raw_shape)} ({math.prod(self.raw_shape)} "
                            f"values) cannot feed a model whose input is {shape_text(self.sample_shape)} "
                            f"({self.sample_count} values)")

    @property
    def sample_count(self) -> int:
        return math.prod(self.sample_shape)

    @property
    def raw_nbytes(self) -> int:
        return self.sample_count * self.raw_dtype.itemsize

    def describe_raw(self) -> str:
        return f"{self.raw_nbytes} bytes of {self.raw_dtype.name} {shape_text(self.raw_shape or self.sample_shape)}"


@dataclass(frozen=True)
class Rejection:
    """A record left out of a batch: its position in the batch and why."""

    index: int
    reason: str


@dataclass(frozen=True)
class ShadowTag:
    """What the tier that answered a shadow sample early said about it (carried up in `tierflow.shadow`)."""

    tier: int
    cls: int
    confidence: float  # the confidence that tier compared with its limit

    def to_json(self) -> list[Any]:
        return [self.tier, self.cls, self.confidence]


@dataclass
class DecodedBatch:
    """The decodable samples of a batch of records, in record order, and the records that were not."""

    x: Array  # (N, *sample_shape), the model's dtype
    origins: list[SampleOrigin]  # per sample
    ts: list[list[float]]  # per sample: [t_input, t_fwd_0, ...] (ms)
    single: npt.NDArray[np.bool_]  # per sample: alone in its original record
    record: npt.NDArray[np.int64]  # per sample: index of the consumed record it came from
    rejected: list[Rejection]
    #: The shadow samples of the batch (sample index -> its early answer); empty for most batches.
    shadow: dict[int, ShadowTag] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.origins)

    def shadow_mask(self) -> npt.NDArray[np.bool_]:
        """Per sample: a shadow sample (never answered, only passed up or compared at the top)."""
        mask = np.zeros(len(self), dtype=bool)
        mask[list(self.shadow)] = True
        return mask


# -- decoding ------------------------------------------------------------------------------------------------


def _tierflow_headers(headers: Sequence[tuple[str, bytes | None]]) -> dict[str, bytes] | None:
    found: dict[str, bytes] = {}
    for k, v in headers:
        if k.startswith(_PREFIX):
            if v is None:  # Kafka headers may carry no value at all
                raise WireError(f"header {k} has no value")
            found[k] = v
    return found or None


def _size_hint(nbytes: int, spec: InputSpec) -> str:
    names = [name for name in _HINT_DTYPES
             if np.dtype(name) != spec.raw_dtype and nbytes == spec.sample_count * np.dtype(name).itemsize]
    if not names:
        return ""
    return f" ({nbytes} bytes is one {' or '.join(names)} sample: is the producer sending {names[0]}?)"


def _parse_json_list(raw: bytes, what: str) -> Any:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise WireError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, list):
        raise WireError(f"{what} must be a JSON list")
    return value


def _decode_json_sample(value: bytes, spec: InputSpec) -> Array:
    data = _parse_json_list(value, "the JSON tensor")
    try:
        arr = np.asarray(data, dtype=np.float64)
    except (ValueError, TypeError):
        raise WireError("the JSON tensor must be a (nested) list of numbers") from None
    if arr.size != spec.sample_count:
        raise WireError(f"the JSON tensor holds {arr.size} numbers, expected {spec.sample_count} for one sample of "
                        f"shape {shape_text(spec.sample_shape)}")
    return arr.reshape(1, *spec.sample_shape).astype(spec.dtype)


def _looks_like_json(value: bytes) -> bool:
    return value[:1] == b"[" and value.rstrip()[-1:] == b"]"


def _origins_from(meta: dict[str, bytes], n: int, rec: RecordLike) -> list[SampleOrigin]:
    raw = meta.get(H_ORIGINS)
    if raw is None:
        return [(rec.topic, rec.partition, rec.offset, j) for j in range(n)]
    items = _parse_json_list(raw, H_ORIGINS)
    if len(items) != n:
        raise WireError(f"{H_ORIGINS} lists {len(items)} samples but the value holds {n}")
    out: list[SampleOrigin] = []
    for item in items:
        if (not isinstance(item, list) or len(item) != 4 or not isinstance(item[0], str)
                or not all(isinstance(v, int) for v in item[1:])):
            raise WireError(f"{H_ORIGINS} entries must be [topic, partition, offset, index], got {item!r:.80}")
        out.append((item[0], item[1], item[2], item[3]))
    return out


def _ts_from(meta: dict[str, bytes], n: int, t_record: float) -> list[list[float]]:
    raw = meta.get(H_TS)
    if raw is None:
        return [[t_record] for _ in range(n)]
    items = _parse_json_list(raw, H_TS)
    if len(items) != n:
        raise WireError(f"{H_TS} lists {len(items)} samples but the value holds {n}")
    out: list[list[float]] = []
    for item in items:
        if isinstance(item, int | float):
            out.append([float(item)])
        elif isinstance(item, list) and item and all(isinstance(v, int | float) for v in item):
            out.append([float(v) for v in item])
        else:
            raise WireError(f"{H_TS} entries must be [t_input, t_fwd...] in ms, got {item!r:.80}")
    return out


def _shadow_from(meta: dict[str, bytes], n: int) -> list[ShadowTag]:
    raw = meta.get(H_SHADOW)
    if raw is None:
        raise WireError(f"a version {SHADOW_VERSION} (shadow) tensor message needs the header {H_SHADOW}")
    items = _parse_json_list(raw, H_SHADOW)
    if len(items) != n:
        raise WireError(f"{H_SHADOW} lists {len(items)} samples but the value holds {n}")
    out: list[ShadowTag] = []
    for item in items:
        if (not isinstance(item, list) or len(item) != 3 or not all(type(v) is int and v >= 0 for v in item[:2])
                or not isinstance(item[2], int | float) or isinstance(item[2], bool)):
            raise WireError(f"{H_SHADOW} entries must be [tier, class, confidence], got {item!r:.80}")
        out.append(ShadowTag(item[0], item[1], float(item[2])))
    return out


@functools.lru_cache(maxsize=64)  # a stream's messages carry one shape: parsed once
def _parse_shape_header(raw: bytes) -> tuple[int, ...]:
    shape_raw = raw.decode("ascii", "replace").strip()
    try:
        shape = tuple(int(p) for p in shape_raw.split(",") if p.strip())
    except ValueError:
        raise WireError(f"{H_SHAPE}={shape_raw!r} must be comma-separated whole numbers") from None
    if any(d < 1 for d in shape):
        raise WireError(f"{H_SHAPE}={shape_raw!r}: dimensions must be positive")
    return shape


def _decode_tensor(rec: RecordLike, value: bytes, meta: dict[str, bytes], spec: InputSpec, t_record: float,
                   versions: tuple[int, ...] = READ_VERSIONS
                   ) -> tuple[Array, list[SampleOrigin], list[list[float]], bool, list[ShadowTag] | None]:
    raw_version = meta.get(H_VERSION)
    version = next((v for v in versions if raw_version == str(v).encode()), None)
    if version is None:
        raise WireError(f"{H_VERSION}={raw_version!r}: this tier reads tierflow tensor messages of version "
                        f"{' or '.join(map(str, versions))}")
    if version == WIRE_VERSION and H_SHADOW in meta:
        raise WireError(f"{H_SHADOW} is only allowed in a version {SHADOW_VERSION} tensor message (a reader of "
                        f"version {WIRE_VERSION} would answer the shadow samples)")
    if H_DTYPE not in meta or H_SHAPE not in meta:
        raise WireError(f"a tierflow tensor message needs the headers {H_DTYPE} and {H_SHAPE}")
    dtype = parse_dtype(meta[H_DTYPE].decode("ascii", "replace"))
    shape = _parse_shape_header(meta[H_SHAPE])
    per = math.prod(shape)
    if per != spec.sample_count:
        raise WireError(f"samples of shape {shape_text(shape)} ({per} values) cannot feed this tier's model, whose "
                        f"input is {shape_text(spec.sample_shape)} ({spec.sample_count} values)")
    unit = per * dtype.itemsize
    if len(value) % unit:
        raise WireError(f"a value of {len(value)} bytes is not a whole number of {dtype.name} "
                        f"{shape_text(shape)} samples ({unit} bytes each)")
    n = len(value) // unit
    x = np.frombuffer(value, dtype=dtype).reshape(n, *spec.sample_shape).astype(spec.dtype, copy=False)
    origins = _origins_from(meta, n, rec)
    ts = _ts_from(meta, n, t_record)
    shadow = _shadow_from(meta, n) if version == SHADOW_VERSION else None
    return x, origins, ts, meta.get(H_SINGLE) == b"1", shadow


def decode_records(records: Sequence[RecordLike], spec: InputSpec, *, now_ms: float,
                   versions: tuple[int, ...] = READ_VERSIONS) -> DecodedBatch:
    """Decode a consumed batch into one (N, *sample_shape) array plus per-sample origin/timestamps/record.

    `now_ms` stands in for records without a timestamp. Consecutive header-less raw records are decoded
    with one `np.frombuffer` (the common Kafka-ML case costs a few microseconds per record). `versions`: the
    tensor message versions read (a reader of `(WIRE_VERSION,)` is what a tier of an earlier release was:
    it refuses shadow messages). The batch's `single` and `record` arrays are read-only.
    """
    if len(records) == 1:
        one = _decode_one(records[0], spec, now_ms, versions)
        if one is not None:
            return one
    return _decode_all(records, spec, now_ms=now_ms, versions=versions)


def _decode_all(records: Sequence[RecordLike], spec: InputSpec, *, now_ms: float,
                versions: tuple[int, ...]) -> DecodedBatch:
    parts: list[Array] = []
    origins: list[SampleOrigin] = []
    ts: list[list[float]] = []
    single: list[bool] = []
    record_of: list[int] = []
    rejected: list[Rejection] = []
    shadow: dict[int, ShadowTag] = {}
    run: list[bytes] = []  # consecutive raw records, decoded together

    def flush_run() -> None:
        if run:
            joined = np.frombuffer(b"".join(run), dtype=spec.raw_dtype)
            parts.append(joined.reshape(len(run), *spec.sample_shape).astype(spec.dtype, copy=False))
            run.clear()

    for i, rec in enumerate(records):
        value = rec.value
        t_record = float(rec.timestamp) if rec.timestamp is not None and rec.timestamp > 0 else now_ms
        if not value:
            rejected.append(Rejection(i, f"empty value: an inference input holds one sample ({spec.describe_raw()}) "
                                         "or a tierflow tensor message"))
            continue
        try:
            meta = _tierflow_headers(rec.headers) if rec.headers else None
            if meta is not None:
                x, o, t, s, tags = _decode_tensor(rec, value, meta, spec, t_record, versions)
        except WireError as exc:
            rejected.append(Rejection(i, f"bad tierflow tensor message: {exc}"))
            continue
        except Exception as exc:  # whatever else hostile headers make numpy or JSON raise: the record's fault
            rejected.append(Rejection(i, f"bad tierflow tensor message: {type(exc).__name__}: {exc}"))
            continue
        if meta is not None:
            flush_run()
            if tags is not None:
                shadow.update(zip(range(len(origins), len(origins) + len(tags)), tags, strict=True))
            parts.append(x)
            origins.extend(o)
            ts.extend(t)
            single.extend([s] * len(o))
            record_of.extend([i] * len(o))
            continue
        origin = (rec.topic, rec.partition, rec.offset, 0)
        if spec.plain is not None:
            try:
                sample = np.asarray(spec.plain(value)).reshape(1, *spec.sample_shape).astype(spec.dtype)
            except ValueError as exc:
                rejected.append(Rejection(i, str(exc)))
                continue
            except Exception as exc:  # a decoder (Avro) reading garbage raises EOFError, IndexError, ...
                rejected.append(Rejection(i, f"cannot decode the record: {type(exc).__name__}: {exc}"))
                continue
            flush_run()
            parts.append(sample)
        elif len(value) == spec.raw_nbytes and not (_looks_like_json(value) and _is_json_sample(value, spec)):
            run.append(value)
        elif _looks_like_json(value):
            try:
                sample = _decode_json_sample(value, spec)
            except WireError as exc:
                rejected.append(Rejection(i, str(exc)))
                continue
            flush_run()
            parts.append(sample)
        else:
            rejected.append(Rejection(i, f"{len(value)} bytes, expected {spec.describe_raw()} for one sample"
                                         f"{_size_hint(len(value), spec)}"))
            continue
        origins.append(origin)
        ts.append([t_record])
        single.append(True)
        record_of.append(i)
    flush_run()
    x = np.concatenate(parts) if len(parts) > 1 else (parts[0] if parts else
                                                     np.empty((0, *spec.sample_shape), dtype=spec.dtype))
    single_flags, records_of = np.asarray(single, dtype=bool), np.asarray(record_of, dtype=np.int64)
    single_flags.flags.writeable = records_of.flags.writeable = False
    return DecodedBatch(x=x, origins=origins, ts=ts, single=single_flags, record=records_of, rejected=rejected,
                        shadow=shadow)


def _constant(values: list[Any], dtype: type) -> npt.NDArray[Any]:
    array: npt.NDArray[Any] = np.asarray(values, dtype=dtype)
    array.flags.writeable = False
    return array


#: What a batch of one sample shares (read-only): whether it was alone in its record, and its record.
_ONE_SINGLE = {True: _constant([True], bool), False: _constant([False], bool)}
_ONE_RECORD = _constant([0], np.int64)
#: The mask of a batch of one sample that picks it (read-only).
ONE_OF_ONE = _ONE_SINGLE[True]


def _decode_one(rec: RecordLike, spec: InputSpec, now_ms: float, versions: tuple[int, ...]) -> DecodedBatch | None:
    """`decode_records` of one record holding one sample, the usual batch at a light stream's pace, with as few
    numpy calls as it takes (each costs tens of microseconds when the process wakes up cold); None for
    anything else (rejected, shadow, JSON, several samples, a `plain` decoder), which the general path
    decodes. Its result equals the general path's."""
    value = rec.value
    if not value:
        return None
    t_record = float(rec.timestamp) if rec.timestamp is not None and rec.timestamp > 0 else now_ms
    try:
        meta = _tierflow_headers(rec.headers) if rec.headers else None
    except WireError:
        return None
    if meta is None:
        if spec.plain is not None or len(value) != spec.raw_nbytes or _looks_like_json(value):
            return None
        x = np.frombuffer(value, dtype=spec.raw_dtype).reshape(1, *spec.sample_shape).astype(spec.dtype, copy=False)
        return DecodedBatch(x=x, origins=[(rec.topic, rec.partition, rec.offset, 0)], ts=[[t_record]],
                            single=_ONE_SINGLE[True], record=_ONE_RECORD, rejected=[])
    try:
        x, origins, ts, single, tags = _decode_tensor(rec, value, meta, spec, t_record, versions)
    except Exception:  # the general path says why
        return None
    if tags is not None or len(origins) != 1:
        return None
    return DecodedBatch(x=x, origins=origins, ts=ts, single=_ONE_SINGLE[single], record=_ONE_RECORD, rejected=[])


def _is_json_sample(value: bytes, spec: InputSpec) -> bool:
    """A raw-sized value that also parses as a JSON sample (vanishingly rare for real raw bytes)."""
    try:
        _decode_json_sample(value, spec)
    except WireError:
        return False
    return True


# -- routing -------------------------------------------------------------------------------------------------


def answered_mask(probs: Array, limit: float, *, top: bool = False,
                  confidence: Array | None = None) -> npt.NDArray[np.bool_]:
    """Which samples this tier answers: `max(p) >= limit`, or `confidence >= limit` when the tier compares
    another confidence (the calibrated one, one per sample), or all of them at the top tier. A mask of one
    sample is read-only."""
    n = len(probs)
    if top:
        return _ONE_SINGLE[True] if n == 1 else np.ones(n, dtype=bool)
    if n == 0:
        return np.zeros(0, dtype=bool)
    if n == 1 and confidence is None:
        row = probs.reshape(-1).tolist() if isinstance(probs, np.ndarray) else np.asarray(probs).reshape(-1).tolist()
        # NaN never answers (numpy's max of a row with a NaN is NaN), and numpy compares a float32 row with the
        # limit cast to float32
        if row and all(v == v for v in row):
            return _ONE_SINGLE[max(row) >= _limit_as(np.asarray(probs).dtype, limit)]
    if confidence is not None:
        compared: npt.NDArray[np.bool_] = np.asarray(confidence).reshape(n) >= limit
        return compared
    mask: npt.NDArray[np.bool_] = np.asarray(probs).reshape(n, -1).max(axis=1) >= limit
    return mask


@functools.lru_cache(maxsize=64)
def _limit_as(dtype: np.dtype[Any], limit: float) -> float:
    """`limit` as numpy compares it with an array of `dtype` (a Python float is cast to a float array's dtype)."""
    return float(dtype.type(limit)) if dtype.kind == "f" else float(limit)


# -- encoding ------------------------------------------------------------------------------------------------


def _origin_json(o: SampleOrigin) -> dict[str, Any]:
    return {"topic": o[0], "partition": o[1], "offset": o[2], "index": o[3]}


def _timestamps(ts: list[float], answered_ms: float) -> dict[str, Any]:
    return {"input": ts[0], "forwarded": ts[1:], "answered": answered_ms}


def encode_answers(batch: DecodedBatch, probs: Array, answered: npt.NDArray[np.bool_], *, tier: int,
                   answered_ms: float, confidence: Array | None = None) -> list[bytes]:
    """The output records for the answered samples of `batch`: one per single-sample original record, one
    batched record per batched original record (see the module docstring), in order of first sample.

    `confidence`: what the tier compared when it is not the raw max(p) (one per sample): written as the
    answer's `confidence`, with the raw max(p) beside it as `raw_confidence`."""
    probs = np.ascontiguousarray(np.asarray(probs, dtype=np.float32).reshape(len(probs), -1))
    if len(probs) == 1 and confidence is None and answered[0] and batch.single[0]:
        one = _encode_one_answer(batch, probs[0], tier=tier, answered_ms=answered_ms)
        if one is not None:
            return one
    return _encode_all_answers(batch, probs, answered, tier=tier, answered_ms=answered_ms, confidence=confidence)


def _encode_all_answers(batch: DecodedBatch, probs: Array, answered: npt.NDArray[np.bool_], *, tier: int,
                        answered_ms: float, confidence: Array | None) -> list[bytes]:
    classes = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=np.int64)
    raw = probs.max(axis=1) if len(probs) else np.zeros(0, dtype=np.float32)
    confidences = raw if confidence is None else np.asarray(confidence, dtype=np.float64).reshape(len(probs))
    answered_ms = round(answered_ms, 3)
    groups: dict[tuple[str, int, int], list[int]] = {}
    order: list[int | tuple[str, int, int]] = []
    for i in np.flatnonzero(answered).tolist():
        if batch.single[i]:
            order.append(i)
            continue
        o = batch.origins[i]
        key = (o[0], o[1], o[2])
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(i)
    out: list[bytes] = []
    for item in order:
        if isinstance(item, int):
            t = batch.ts[item]
            doc: dict[str, Any] = {
                "values": probs[item], "tier": tier, "exit": tier, "class": int(classes[item]),
                "confidence": confidences[item], "origin": _origin_json(batch.origins[item]),
                "timestamps": _timestamps(t, answered_ms), "latency_ms": round(answered_ms - t[0], 3),
            }
            if confidence is not None:
                doc["raw_confidence"] = raw[item]
        else:
            idx = groups[item]
            doc = {
                "values": probs[idx], "classes": classes[idx], "confidences": confidences[idx],
                "origins": [_origin_json(batch.origins[i]) for i in idx],
                "timestamps": [_timestamps(batch.ts[i], answered_ms) for i in idx],
                "latencies_ms": [round(answered_ms - batch.ts[i][0], 3) for i in idx],
                "tier": tier, "exit": tier,
            }
            if confidence is not None:
                doc["raw_confidences"] = raw[idx]
        out.append(orjson.dumps(doc, option=_NUMPY))
    return out


def _encode_one_answer(batch: DecodedBatch, row: Array, *, tier: int, answered_ms: float) -> list[bytes] | None:
    """`encode_answers` of a batch of one single-sample record answered with the raw max(p), without numpy
    reductions (see `_decode_one`); None for a row with a NaN (numpy's argmax picks the NaN). Equal output."""
    values = row.tolist()
    if not values or not all(v == v for v in values):
        return None
    cls = values.index(max(values))  # the first maximum, as argmax
    t = batch.ts[0]
    answered_ms = round(answered_ms, 3)
    doc = {
        "values": row, "tier": tier, "exit": tier, "class": cls, "confidence": row[cls],
        "origin": _origin_json(batch.origins[0]), "timestamps": _timestamps(t, answered_ms),
        "latency_ms": round(answered_ms - t[0], 3),
    }
    return [orjson.dumps(doc, option=_NUMPY)]


_VERSION_HEADERS = {False: str(WIRE_VERSION).encode(), True: str(SHADOW_VERSION).encode()}


@functools.lru_cache(maxsize=64)
def _wire_dtype(dtype: np.dtype[Any]) -> tuple[np.dtype[Any], bytes]:
    """The dtype a tensor of `dtype` is sent as, and its header value (a tier sends one dtype all its life)."""
    wire_dtype = parse_dtype(dtype.name)
    return wire_dtype, wire_dtype.name.encode()


@functools.lru_cache(maxsize=64)
def _shape_header(sample_shape: tuple[int, ...]) -> bytes:
    return ",".join(map(str, sample_shape)).encode()


def encode_tensor(x: Array, *, origins: Sequence[SampleOrigin] | None = None,
                  ts: Sequence[Sequence[float]] | None = None, single: bool = False,
                  shadow: Sequence[ShadowTag] | None = None) -> tuple[bytes, Headers]:
    """A tierflow tensor message (value, headers) for the batch `x` of shape (n, *sample_shape).

    Clients sending batched inputs leave `origins`/`ts` out (the first tier takes the record's position and
    timestamp); tiers forwarding samples pass them. `shadow` (one tag per sample) makes it a version-2
    shadow message (see the module docstring).
    """
    arr = np.asarray(x)
    if arr.ndim < 1 or len(arr) == 0:
        raise WireError("a tensor message holds at least one sample: x must have shape (n, ...) with n >= 1")
    if arr.dtype.kind not in "biuf":
        raise WireError(f"dtype {arr.dtype} is not numeric")
    dtype, dtype_header = _wire_dtype(arr.dtype)
    arr = np.ascontiguousarray(arr, dtype=dtype)
    headers: Headers = [
        (H_VERSION, _VERSION_HEADERS[shadow is not None]),
        (H_DTYPE, dtype_header),
        (H_SHAPE, _shape_header(arr.shape[1:])),
    ]
    if origins is not None:
        if len(origins) != len(arr):
            raise WireError(f"{len(origins)} origins for {len(arr)} samples")
        headers.append((H_ORIGINS, orjson.dumps(list(origins))))
    if ts is not None:
        if len(ts) != len(arr):
            raise WireError(f"{len(ts)} timestamps for {len(arr)} samples")
        headers.append((H_TS, orjson.dumps([list(t) for t in ts])))
    if single:
        headers.append((H_SINGLE, b"1"))
    if shadow is not None:
        if len(shadow) != len(arr):
            raise WireError(f"{len(shadow)} shadow tags for {len(arr)} samples")
        headers.append((H_SHADOW, orjson.dumps([tag.to_json() for tag in shadow])))
    return arr.tobytes(), headers


def encode_forwards(batch: DecodedBatch, tensor: Array, forwarded: npt.NDArray[np.bool_], *,
                    forwarded_ms: float) -> list[tuple[bytes, Headers]]:
    """Tensor messages for the upper tier with the forwarded samples: one, or two when single-sample and
    batched original records are mixed (so `tierflow.single` stays one flag per record)."""
    if len(forwarded) == 1:  # one sample: no index arrays (see `_decode_one`)
        if not forwarded[0]:
            return []
        tensor = np.asarray(tensor)
        return [encode_tensor(tensor if len(tensor) == 1 else tensor[:1], origins=batch.origins[:1],
                              ts=[[*batch.ts[0], round(forwarded_ms, 3)]], single=bool(batch.single[0]))]
    idx = np.flatnonzero(forwarded)
    if not len(idx):
        return []
    forwarded_ms = round(forwarded_ms, 3)
    out: list[tuple[bytes, Headers]] = []
    is_single = batch.single[idx]
    for flag in (True, False):
        group = idx[is_single == flag]
        if not len(group):
            continue
        rows = group.tolist()
        out.append(encode_tensor(np.asarray(tensor)[group], origins=[batch.origins[i] for i in rows],
                                 ts=[[*batch.ts[i], forwarded_ms] for i in rows], single=flag))
    return out


# -- shadow samples -------------------------------------------------------------------------------------------


def encode_shadows(batch: DecodedBatch, tensor: Array, rows: Sequence[int], tags: Sequence[ShadowTag], *,
                   forwarded_ms: float) -> list[tuple[bytes, Headers]]:
    """The shadow message (version 2) for the upper tier with the samples `rows` of `batch` (their tensors in
    `tensor`, the model's tensor output) and one tag each; none for no rows."""
    if not len(rows):
        return []
    forwarded_ms = round(forwarded_ms, 3)
    picked = np.asarray(rows, dtype=np.int64)
    return [encode_tensor(np.asarray(tensor)[picked], origins=[batch.origins[i] for i in rows],
                          ts=[[*batch.ts[i], forwarded_ms] for i in rows], shadow=tags)]


@dataclass(frozen=True)
class ShadowOutcome:
    """One shadow sample at the top: the early answer (tier, class, confidence) next to the top exit's class."""

    tier: int
    cls: int
    confidence: float
    top_cls: int
    origin: SampleOrigin

    @property
    def agree(self) -> bool:
        return self.cls == self.top_cls


def encode_shadow_outcomes(batch: DecodedBatch, rows: Sequence[int], top_classes: Sequence[int], *,
                           inference: int, top_tier: int, answered_ms: float) -> bytes:
    """One record of the shadow topic with the outcomes of the shadow samples `rows` of `batch`."""
    outcomes = []
    for i, top_cls in zip(rows, top_classes, strict=True):
        tag = batch.shadow[i]
        outcomes.append({"tier": tag.tier, "class": tag.cls, "confidence": tag.confidence, "top_class": int(top_cls),
                         "agree": tag.cls == int(top_cls), "origin": _origin_json(batch.origins[i])})
    return orjson.dumps({"inference": inference, "top_tier": top_tier, "answered_ms": round(answered_ms, 3),
                         "outcomes": outcomes})


def read_shadow_outcomes(value: bytes) -> list[ShadowOutcome]:
    """The outcomes in one record of a shadow topic; WireError when it is not one."""
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise WireError(f"a shadow outcome record is not JSON: {exc}") from None
    items = doc.get("outcomes") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise WireError("a shadow outcome record is a JSON object with 'outcomes'")
    out: list[ShadowOutcome] = []
    for item in items:
        try:
            o = item["origin"]
            out.append(ShadowOutcome(int(item["tier"]), int(item["class"]), float(item["confidence"]),
                                     int(item["top_class"]), (str(o["topic"]), int(o["partition"]),
                                                              int(o["offset"]), int(o.get("index", 0)))))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise WireError(f"a shadow outcome lacks a field ({type(exc).__name__}: {exc})") from None
    return out


# -- reading answers (clients, the API, the demo, tests) -----------------------------------------------------


@dataclass(frozen=True)
class AnswerFields:
    """One sample's fields as an output record holds them (JSON values; None where the record has none)."""

    values: Any
    tier: Any  # `tier`, else `exit`
    cls: Any
    confidence: Any
    origin: Any
    timestamps: Any
    latency_ms: Any
    batched: bool
    #: The raw max(p) beside a calibrated `confidence`; None where the record has none (its confidence is raw).
    raw_confidence: Any = None


#: A batched record's per-sample lists, by the field a single-sample record gives them.
_BATCHED_FIELDS = {"values": "values", "confidence": "confidences", "origin": "origins",
                   "timestamps": "timestamps", "latency_ms": "latencies_ms", "raw_confidence": "raw_confidences"}


def answer_fields(value: bytes) -> list[AnswerFields]:
    """The samples of one output record, single-sample or batched (`classes` is a list), as the record
    holds them; WireError when the record is not a JSON object with `values`."""
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise WireError(f"an output record is not JSON: {exc}") from None
    if not isinstance(doc, dict) or "values" not in doc:
        raise WireError("an output record is a JSON object with 'values'")
    tier = doc.get("tier", doc.get("exit"))
    classes = doc.get("classes")
    if not isinstance(classes, list):
        return [AnswerFields(doc["values"], tier, doc.get("class"), doc.get("confidence"), doc.get("origin"),
                             doc.get("timestamps"), doc.get("latency_ms"), batched=False,
                             raw_confidence=doc.get("raw_confidence"))]

    def at(field: str, i: int) -> Any:
        seq = doc.get(_BATCHED_FIELDS[field])
        return seq[i] if isinstance(seq, list) and i < len(seq) else None

    return [AnswerFields(at("values", i), tier, cls, at("confidence", i), at("origin", i), at("timestamps", i),
                         at("latency_ms", i), batched=True, raw_confidence=at("raw_confidence", i))
            for i, cls in enumerate(classes)]


@dataclass(frozen=True)
class Answer:
    """One sample's answer, whichever output form carried it."""

    origin: SampleOrigin
    tier: int
    cls: int
    confidence: float
    values: list[float]
    timestamps: dict[str, Any]
    latency_ms: float
    batched: bool
    #: The raw max(p): `raw_confidence` where the record has one, else its `confidence` (then the raw one).
    raw_confidence: float


def read_answers(value: bytes) -> list[Answer]:
    """The answers in one output record (single-sample or batched form); WireError if it is neither, or if it
    lacks what a tier's answer carries (an origin, a class, a confidence)."""
    answers: list[Answer] = []
    for f in answer_fields(value):
        try:
            o = f.origin
            origin = (str(o["topic"]), int(o["partition"]), int(o["offset"]), int(o.get("index", 0)))
            confidence = float(f.confidence)
            answers.append(Answer(origin, -1 if f.tier is None else int(f.tier), int(f.cls), confidence,
                                  list(f.values), dict(f.timestamps or {}),
                                  0.0 if f.latency_ms is None else float(f.latency_ms), f.batched,
                                  confidence if f.raw_confidence is None else float(f.raw_confidence)))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise WireError(f"an output record lacks what a tier's answer carries ({type(exc).__name__}: {exc})") \
                from None
    return answers


def percentile(sorted_values: list[float], q: float) -> float | None:
    """The `q` quantile (0..1) of ascending values, interpolated linearly; None for none (answer latencies)."""
    if not sorted_values:
        return None
    k = (len(sorted_values) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)
