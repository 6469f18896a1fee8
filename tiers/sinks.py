"""Client SDK: send training data through Kafka and announce it, with Kafka-ML's synchronous API.

Used by users' scripts (as Kafka-ML's `RawSink`/`AvroSink` are), by `tierflow send` (tiers/send_cli.py)
and by the tests. A sink writes one record per sample (RAW: key = label bytes, value = sample bytes,
`ndarray.tobytes()`; AVRO: key = label record, value = data record, schemaless Avro binary) and, on
`close()`, announces the datasource on the control topic in Kafka-ML's format (DESIGN "Wire formats"):
key = the deployment id, big-endian (one byte up to 255, as Kafka-ML sends it), value = JSON
`{topic: "t:partition:start:end[,...]", input_format, input_config, description, validation_rate,
test_rate, total_msg, deployment_id}` with `end` exclusive. The ranges come from the offsets the broker
acknowledged for this sink's own records (lowest and highest + 1 per partition), never from a
seek-to-end lookup, which counts other writers' records and answers too small on Tansu.

Topics: the control topic must exist (the control plane creates it: `tierflow up`). The data topic is
created with `partitions` partitions (default 1) when it does not exist yet, before anything is sent:
otherwise the producer's first metadata request would make a broker with topic auto-creation (Tansu
always) create it with the broker's default count (4 on Tansu). An existing topic is used as it is;
asking for a different partition count than it has is an error. Records are spread over partitions by
the hash of their key (the label), as Kafka-ML's producer does.

The producer is kafka-python's `KafkaProducer` (synchronous; its futures carry the acknowledged
offsets), batched (linger, large batches) and not idempotent (Tansu rejects the idempotent producer).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np
import orjson
from fastavro import parse_schema, schemaless_writer

from tierflow.streams.errors import TierflowError
from tierflow.streams.wire import WireError, parse_dtype, shape_text
from tierflow.tiers.data import DataError, InputConfig, parse_scheme, parse_shape

with warnings.catch_warnings():
    # kafka-python 3 loads its protocol schemas with importlib.resources.read_text, deprecated since
    # Python 3.11: a DeprecationWarning at import that is kafka-python's, not ours (tests turn warnings
    # into errors).
    warnings.simplefilter("ignore", DeprecationWarning)
    from kafka import KafkaAdminClient, KafkaProducer
    from kafka.errors import KafkaError, TopicAlreadyExistsError

log = logging.getLogger("tierflow.sinks")

DEFAULT_CONTROL_TOPIC = "KAFKA_ML_CONTROL_TOPIC"
_DRAIN_EVERY = 20_000  # resolved acknowledgements are folded into the ranges this often (bounded memory)
_TIMEOUT_S = 60.0


class SinkError(TierflowError, RuntimeError):
    """The sink cannot send or announce its data; the message says what to do (fix the call, or start the
    broker and send again)."""


def deployment_key(deployment_id: int) -> bytes:
    """The control message key: the id as a big-endian unsigned integer (one byte up to 255, like Kafka-ML)."""
    return deployment_id.to_bytes(max(1, (deployment_id.bit_length() + 7) // 8), "big")


def _use_fast_crc32c() -> None:
    """Give kafka-python a C CRC-32C when it has none.

    kafka-python checksums every record batch with CRC-32C in pure Python (~6 MB/s, about 8k records/s
    of 784 bytes) unless the optional `crc32c` package is installed; aiokafka, a tierflow dependency, ships
    a C implementation. It is plugged in only after it agrees with kafka-python's on a known vector, so the
    bytes on the wire are the same, about 5x faster.
    """
    from kafka.record import default_records, util

    if getattr(util, "crc32c_c", None) is not None:
        return
    try:
        from aiokafka.record._crecords import crc32c_cython
    except ImportError:  # aiokafka built without its C extensions
        return
    probe = b"123456789"
    if crc32c_cython(probe) == util.calc_crc32c(probe) == 0xE3069283:
        default_records.calc_crc32c = crc32c_cython


def _servers(bootstrap_servers: str | list[str]) -> list[str]:
    items = bootstrap_servers.split(",") if isinstance(bootstrap_servers, str) else bootstrap_servers
    servers = [s.strip() for s in items if s.strip()]
    if not servers:
        raise SinkError("no broker address: pass bootstrap_servers='host:port'")
    return servers


def _rate(value: float, name: str) -> float:
    rate = float(value)
    if not 0 <= rate < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return rate


class _Sink:
    """What RAW and AVRO sinks share: topics, the batched producer, acknowledged ranges, the announcement."""

    input_format = "RAW"

    def __init__(self, bootstrap_servers: str | list[str], topic: str, deployment_id: int, *,
                 validation_rate: float, test_rate: float, description: str, control_topic: str,
                 partitions: int | None, producer_options: Mapping[str, Any] | None) -> None:
        if isinstance(deployment_id, bool) or not isinstance(deployment_id, int) or deployment_id < 1:
            raise ValueError(f"deployment_id must be a positive integer, got {deployment_id!r}")
        self.validation_rate = _rate(validation_rate, "validation_rate")
        self.test_rate = _rate(test_rate, "test_rate")
        if self.validation_rate + self.test_rate >= 1:
            raise ValueError("validation_rate + test_rate must leave some data for training (< 1)")
        if partitions is not None and partitions < 1:
            raise ValueError(f"partitions must be >= 1, got {partitions}")
        if not topic:
            raise ValueError("topic must not be empty")
        self.servers = _servers(bootstrap_servers)
        self.topic = topic
        self.deployment_id = deployment_id
        self.description = description
        self.control_topic = control_topic
        self.sent = 0  # records handed to the producer
        self.acked = 0  # records the broker acknowledged
        self._ranges: dict[int, tuple[int, int]] = {}  # partition -> (lowest, highest) acknowledged offset
        self._pending: deque[Any] = deque()
        self._error: BaseException | None = None
        self._closed = False
        self.announcement: dict[str, Any] | None = None
        self._prepare_topics(partitions)
        _use_fast_crc32c()
        options: dict[str, Any] = {
            "bootstrap_servers": self.servers,
            "client_id": "tierflow-sink",
            "acks": "all",
            "enable_idempotence": False,  # Tansu rejects the idempotent producer (DESIGN: known quirks)
            "linger_ms": 5,
            "batch_size": 512 * 1024,
            "max_request_size": 8 * 1024 * 1024,
            "request_timeout_ms": 30_000,
        }
        options.update(producer_options or {})
        try:
            self._producer = KafkaProducer(**options)
        except KafkaError as exc:
            raise SinkError(f"cannot connect to the broker at {','.join(self.servers)}: {exc}") from None

    # --- topics ---------------------------------------------------------------------------------------

    def _prepare_topics(self, partitions: int | None) -> None:
        where = ",".join(self.servers)
        try:
            admin = KafkaAdminClient(bootstrap_servers=self.servers, client_id="tierflow-sink")
        except KafkaError as exc:
            raise SinkError(f"cannot reach the broker at {where}: {exc}; is it running (tierflow up)?") from None
        try:
            existing = set(admin.list_topics())  # all-topics metadata: names no topic, creates none
            if self.control_topic not in existing:
                raise SinkError(f"the control topic {self.control_topic!r} does not exist on {where}: is tierflow "
                                "running against this broker (tierflow up), with this control topic name?")
            if self.topic not in existing:
                try:
                    admin.create_topics({self.topic: {"num_partitions": partitions or 1, "replication_factor": 1}},
                                        wait_for_metadata=True)
                    log.info("created topic %s with %d partition(s)", self.topic, partitions or 1)
                except TopicAlreadyExistsError:
                    pass  # another sink created it meanwhile
            elif partitions is not None:
                described = admin.describe_topics([self.topic])
                count = len(described[0]["partitions"]) if described else 0
                if count != partitions:
                    raise SinkError(f"topic {self.topic!r} exists with {count} partition(s), not {partitions}: "
                                    "use another topic, or leave the partition count out to use it as it is")
        except KafkaError as exc:
            raise SinkError(f"cannot prepare topic {self.topic!r} on {where}: {exc}") from None
        finally:
            admin.close()

    # --- sending --------------------------------------------------------------------------------------

    def _produce(self, value: bytes, key: bytes | None) -> None:
        if self._closed:
            raise SinkError("the sink is closed")
        try:
            self._pending.append(self._producer.send(self.topic, value=value, key=key))
        except KafkaError as exc:
            raise SinkError(f"cannot send to {self.topic!r}: {exc}") from None
        self.sent += 1
        if len(self._pending) >= _DRAIN_EVERY:
            self._drain(wait=False)

    def _drain(self, *, wait: bool) -> None:
        pending = self._pending
        while pending and (wait or pending[0].is_done):
            future = pending.popleft()
            if not future.is_done:
                with contextlib.suppress(KafkaError):  # a failure is recorded below
                    future.get(timeout=_TIMEOUT_S)
            if not future.is_done:
                self._error = self._error or TimeoutError(f"no acknowledgement within {_TIMEOUT_S:.0f} s")
                continue
            if future.failed():
                self._error = self._error or future.exception
                continue
            md = future.value
            lo_hi = self._ranges.get(md.partition)
            off = int(md.offset)
            self._ranges[md.partition] = (off, off) if lo_hi is None else (min(lo_hi[0], off), max(lo_hi[1], off))
            self.acked += 1

    def flush(self) -> None:
        """Wait until the broker acknowledged every record sent so far."""
        try:
            self._producer.flush(timeout=_TIMEOUT_S)
        except KafkaError as exc:
            self._error = self._error or exc
        self._drain(wait=True)
        if self._error is not None:
            raise SinkError(f"the broker did not acknowledge {self.sent - self.acked} record(s): {self._error}; "
                            "nothing was announced")

    # --- announcing -----------------------------------------------------------------------------------

    def input_config(self) -> dict[str, Any]:
        raise NotImplementedError

    def ranges_text(self) -> str:
        """'t:partition:start:end[,...]' of the acknowledged records (end exclusive)."""
        return ",".join(f"{self.topic}:{p}:{lo}:{hi + 1}" for p, (lo, hi) in sorted(self._ranges.items()))

    def close(self) -> dict[str, Any]:
        """Flush, announce the datasource on the control topic, close; returns the announcement sent."""
        if self._closed:
            if self.announcement is None:
                raise SinkError("the sink was closed without an announcement")
            return self.announcement
        try:
            self.flush()
            if self.acked == 0:
                raise SinkError("nothing was sent: no datasource announced")
            announcement = {
                "topic": self.ranges_text(),
                "input_format": self.input_format,
                "input_config": self.input_config(),
                "description": self.description,
                "validation_rate": self.validation_rate,
                "test_rate": self.test_rate,
                "total_msg": self.acked,
                "deployment_id": self.deployment_id,
            }
            try:
                self._producer.send(self.control_topic, key=deployment_key(self.deployment_id),
                                    value=orjson.dumps(announcement)).get(timeout=_TIMEOUT_S)
            except KafkaError as exc:
                raise SinkError(f"the data is on {self.topic!r} ({self.ranges_text()}) but the announcement on "
                                f"{self.control_topic!r} failed: {exc}") from None
            self.announcement = announcement
            log.info("announced %d records on %s for deployment %d: %s", self.acked, self.topic,
                     self.deployment_id, announcement["topic"])
            return announcement
        finally:
            self._closed = True
            self._producer.close(timeout=_TIMEOUT_S)

    def abort(self) -> None:
        """Close without announcing (what was sent stays on the topic, unannounced)."""
        if not self._closed:
            self._closed = True
            self._producer.close(timeout=_TIMEOUT_S)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class RawSink(_Sink):
    """Numpy samples as RAW records (Kafka-ML's RawSink): key = label bytes, value = sample bytes.

    Types and shapes not given are taken from the first sample and label (`data_type` "uint8",
    `data_reshape` "28 28", ...); later samples are cast to that type and must have as many values.
    `partitions`: create the topic with that many partitions if it does not exist (default 1).
    """

    input_format = "RAW"

    def __init__(self, bootstrap_servers: str | list[str], topic: str, deployment_id: int,
                 data_type: str | None = None, label_type: str | None = None,
                 data_reshape: str | tuple[int, ...] | None = None, label_reshape: str | tuple[int, ...] | None = None,
                 validation_rate: float = 0, test_rate: float = 0, description: str = "",
                 control_topic: str = DEFAULT_CONTROL_TOPIC, *, partitions: int | None = None,
                 producer_options: Mapping[str, Any] | None = None) -> None:
        try:
            self._data_dtype = parse_dtype(data_type, "data_type") if data_type else None
            self._label_dtype = parse_dtype(label_type, "label_type") if label_type else None
            self._data_shape = parse_shape(data_reshape, "data_reshape")
            self._label_shape = parse_shape(label_reshape, "label_reshape")
        except (DataError, WireError) as exc:
            raise ValueError(str(exc)) from None
        if self._data_shape is not None and -1 in self._data_shape:
            raise ValueError("data_reshape must be the exact sample shape (no -1)")
        self._data_type = data_type
        self._label_type = label_type
        self._configured = False
        super().__init__(bootstrap_servers, topic, deployment_id, validation_rate=validation_rate,
                         test_rate=test_rate, description=description, control_topic=control_topic,
                         partitions=partitions, producer_options=producer_options)

    def _configure(self, x: np.ndarray[Any, Any], y: np.ndarray[Any, Any]) -> None:
        """Fill in what was not given from the first sample (Kafka-ML: dtype name, shape as text)."""
        if self._data_dtype is None:
            if x.dtype.kind not in "biuf":
                raise ValueError(f"samples of dtype {x.dtype} cannot be sent as RAW; use a numeric dtype")
            self._data_dtype = parse_dtype(x.dtype.name, "data_type")
            self._data_type = x.dtype.name
        if self._label_dtype is None:
            if y.dtype.kind not in "biuf":
                raise ValueError(f"labels of dtype {y.dtype} cannot be sent as RAW; use a numeric dtype")
            self._label_dtype = parse_dtype(y.dtype.name, "label_type")
            self._label_type = y.dtype.name
        if self._data_shape is None:
            self._data_shape = tuple(int(d) for d in x.shape)
        if self._label_shape is None:
            self._label_shape = tuple(int(d) for d in y.shape)
        self._configured = True

    def _check(self, per_sample: int, per_label: int) -> None:
        assert self._data_shape is not None and self._label_shape is not None
        if per_sample != math.prod(self._data_shape):
            raise ValueError(f"a sample has {per_sample} values; this datasource's samples are "
                             f"{shape_text(self._data_shape)} ({math.prod(self._data_shape)} values)")
        if -1 not in self._label_shape and per_label != math.prod(self._label_shape):
            raise ValueError(f"a label has {per_label} values; this datasource's labels are "
                             f"{shape_text(self._label_shape)} ({math.prod(self._label_shape)} values)")

    def send(self, x: Any, y: Any) -> None:
        """Send one sample with its label (numpy arrays or scalars)."""
        xa, ya = np.asarray(x), np.asarray(y)
        if not self._configured:
            self._configure(xa, ya)
        assert self._data_dtype is not None and self._label_dtype is not None
        self._check(xa.size, ya.size)
        self._produce(np.ascontiguousarray(xa, dtype=self._data_dtype).tobytes(),
                      np.ascontiguousarray(ya, dtype=self._label_dtype).tobytes())

    def send_many(self, xs: Any, ys: Any) -> None:
        """Send samples `xs[i]` with labels `ys[i]`; converted once for the whole batch."""
        xa, ya = np.asarray(xs), np.asarray(ys)
        if len(xa) != len(ya):
            raise ValueError(f"{len(xa)} samples but {len(ya)} labels")
        if len(xa) == 0:
            return
        if not self._configured:
            self._configure(xa[0], ya[0])
        assert self._data_dtype is not None and self._label_dtype is not None
        xa = np.ascontiguousarray(xa, dtype=self._data_dtype)
        ya = np.ascontiguousarray(ya, dtype=self._label_dtype)
        self._check(math.prod(xa.shape[1:]), math.prod(ya.shape[1:]))
        produce = self._produce
        for i in range(len(xa)):
            produce(xa[i].tobytes(), ya[i].tobytes())

    def input_config(self) -> dict[str, Any]:
        return InputConfig(data_type=self._data_type, label_type=self._label_type, data_reshape=self._data_shape,
                           label_reshape=self._label_shape).to_json()


def load_scheme(raw: Mapping[str, Any] | str | Path, what: str) -> dict[str, Any]:
    """An Avro record schema from a dict, its JSON text, or the path of an .avsc file (Kafka-ML takes files)."""
    if isinstance(raw, Path) or (isinstance(raw, str) and not raw.lstrip().startswith("{")):
        path = Path(raw)
        try:
            raw = path.read_text()
        except OSError as exc:
            raise ValueError(f"{what}: cannot read the Avro schema file {path}: {exc.strerror}") from None
    try:
        scheme = parse_scheme(dict(raw) if isinstance(raw, Mapping) else raw, what)
    except DataError as exc:
        raise ValueError(str(exc)) from None
    if scheme is None:
        raise ValueError(f"{what} is empty")
    return scheme


class AvroSink(_Sink):
    """Avro records (Kafka-ML's AvroSink): value = the data record, key = the label record, schemaless binary.

    `data_scheme` / `label_scheme`: Avro record schemas (dicts, JSON text, or .avsc file paths). The
    announcement carries both as JSON text in `input_config`, as Kafka-ML's sink does.
    """

    input_format = "AVRO"

    def __init__(self, bootstrap_servers: str | list[str], topic: str, deployment_id: int,
                 data_scheme: Mapping[str, Any] | str | Path, label_scheme: Mapping[str, Any] | str | Path,
                 validation_rate: float = 0, test_rate: float = 0, description: str = "",
                 control_topic: str = DEFAULT_CONTROL_TOPIC, *, partitions: int | None = None,
                 producer_options: Mapping[str, Any] | None = None) -> None:
        self.data_scheme = load_scheme(data_scheme, "data_scheme")
        self.label_scheme = load_scheme(label_scheme, "label_scheme")
        try:
            self._data_writer = parse_schema(self.data_scheme)
            self._label_writer = parse_schema(self.label_scheme)
        except Exception as exc:  # fastavro raises several types for bad schemas
            raise ValueError(f"invalid Avro schema: {exc}") from None
        self._buf = io.BytesIO()
        super().__init__(bootstrap_servers, topic, deployment_id, validation_rate=validation_rate,
                         test_rate=test_rate, description=description, control_topic=control_topic,
                         partitions=partitions, producer_options=producer_options)

    def _encode(self, schema: Any, record: Mapping[str, Any], what: str) -> bytes:
        buf = self._buf
        buf.seek(0)
        buf.truncate()
        try:
            schemaless_writer(buf, schema, dict(record))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"the {what} record does not match its Avro schema: {exc}") from None
        return buf.getvalue()

    def send(self, data: Mapping[str, Any], label: Mapping[str, Any]) -> None:
        """Send one data record with its label record (dicts matching the schemes)."""
        self._produce(self._encode(self._data_writer, data, "data"),
                      self._encode(self._label_writer, label, "label"))

    send_avro = send  # Kafka-ML's name

    def send_many(self, data: Iterable[Mapping[str, Any]], labels: Iterable[Mapping[str, Any]]) -> None:
        for d, label in zip(data, labels, strict=True):
            self.send(d, label)

    def input_config(self) -> dict[str, Any]:
        return InputConfig(data_scheme=self.data_scheme, label_scheme=self.label_scheme).to_json()
