"""Training-data decoding: Kafka-ML's RAW and AVRO records -> numpy arrays (no TensorFlow here).

Called by the training workload (through `tiers/reader.py: read_datasource`) and by the sinks, which
write `InputConfig.to_json()` into their datasource announcement. RAW decoding is vectorised over whole
batches (`RawBuilder`: each batch of values joined once and copied into a preallocated array, sizes
checked with numpy); only AVRO, whose encoding is variable-length, is decoded record by record (fastavro,
compiled schemas).

Wire format (Kafka-ML, see DESIGN "Wire formats"): RAW record key = label bytes, value = sample bytes
(`ndarray.tobytes()`), read back with `input_config = {data_type, label_type, data_reshape: "28 28",
label_reshape: ""}`; AVRO record value = the data record in Avro binary (schemaless), key = the label
record, read back with `input_config = {data_scheme, label_scheme}` (JSON strings or objects).

Every problem with the data raises `DataError` with a message a user can act on, and, when it is about
one record, that record's position in the input (`index`) so the reader can name its topic and offset.
"""

from __future__ import annotations

import io
import math
import mmap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import orjson
from fastavro import parse_schema, schemaless_reader

from tierflow.streams.errors import PermanentError
from tierflow.streams.wire import WireError, parse_dtype, shape_text


class DataError(PermanentError, ValueError):
    """Training data that cannot be decoded as announced; the message says what and where.

    Permanent: the same records fail the same way until the sink sends them differently.

    `index` is the position of the offending record in the decoded list, when one record is at fault.
    """

    def __init__(self, message: str, *, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


def _dtype(name: str, what: str) -> np.dtype[Any]:
    """Kafka-ML's type name read by the one dtype parser (`wire.parse_dtype`), as a DataError when it is bad."""
    try:
        return parse_dtype(name, what)
    except WireError as exc:
        raise DataError(str(exc)) from None


def parse_shape(spec: Any, what: str) -> tuple[int, ...] | None:
    """Kafka-ML's reshape text ("28 28"; "" or None: none) as a tuple; a list of ints is accepted too."""
    if spec is None:
        return None
    if isinstance(spec, str):
        parts = spec.replace(",", " ").split()
    elif isinstance(spec, list | tuple):
        parts = [str(p) for p in spec]
    else:
        raise DataError(f"{what} must be a string like '28 28', got {spec!r}")
    if not parts:
        return None
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise DataError(f"{what} {spec!r} must be whole numbers separated by spaces, like '28 28'") from None
    if any(d == 0 or d < -1 for d in dims) or dims.count(-1) > 1:
        raise DataError(f"{what} {spec!r}: dimensions must be positive (one -1 may stand for 'the rest')")
    return dims


def parse_scheme(raw: Any, what: str) -> dict[str, Any] | None:
    """An Avro record schema from a dict or its JSON text (None for none); DataError names `what`."""
    if raw is None or raw == "":
        return None
    if isinstance(raw, str):
        try:
            raw = orjson.loads(raw)
        except orjson.JSONDecodeError:
            try:  # Kafka-ML's decoder accepts a Python-repr'd dict: str(scheme).replace("'", '"')
                raw = orjson.loads(raw.replace("'", '"'))
            except orjson.JSONDecodeError as exc:
                raise DataError(f"{what} is not a JSON Avro schema: {exc}") from None
    if not isinstance(raw, dict) or raw.get("type") != "record" or not isinstance(raw.get("fields"), list):
        raise DataError(f"{what} must be an Avro record schema ({{'type': 'record', 'fields': [...]}})")
    return cast(dict[str, Any], raw)


@dataclass(frozen=True)
class InputConfig:
    """Kafka-ML's `input_config` of a datasource, parsed once."""

    data_type: str | None = None
    label_type: str | None = None
    data_reshape: tuple[int, ...] | None = None
    label_reshape: tuple[int, ...] | None = None
    data_scheme: dict[str, Any] | None = None
    label_scheme: dict[str, Any] | None = None

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | str | None) -> InputConfig:
        """From the announcement's `input_config` (an object, or the JSON text of one)."""
        if raw is None or raw == "":
            return cls()
        if isinstance(raw, str):
            try:
                raw = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise DataError(f"input_config is not JSON: {exc}") from None
        if not isinstance(raw, Mapping):
            raise DataError("input_config must be a JSON object")
        data_type = raw.get("data_type")
        label_type = raw.get("label_type")
        for name, value in (("data_type", data_type), ("label_type", label_type)):
            if value is not None:
                if not isinstance(value, str):
                    raise DataError(f"input_config.{name} must be a type name like 'uint8', got {value!r}")
                _dtype(value, f"input_config.{name}")
        return cls(
            data_type=data_type or None,
            label_type=label_type or None,
            data_reshape=parse_shape(raw.get("data_reshape"), "input_config.data_reshape"),
            label_reshape=parse_shape(raw.get("label_reshape"), "input_config.label_reshape"),
            data_scheme=parse_scheme(raw.get("data_scheme"), "input_config.data_scheme"),
            label_scheme=parse_scheme(raw.get("label_scheme"), "input_config.label_scheme"),
        )

    def to_json(self) -> dict[str, Any]:
        """Kafka-ML's form: RAW type names and reshapes as space-separated text, or AVRO schemes as JSON text."""
        if self.data_scheme is not None:
            out: dict[str, Any] = {
                "data_scheme": orjson.dumps(self.data_scheme).decode(),
                "label_scheme": orjson.dumps(self.label_scheme).decode() if self.label_scheme else None,
            }
            if self.data_reshape is not None:
                out["data_reshape"] = " ".join(map(str, self.data_reshape))
            return out
        return {
            "data_type": self.data_type,
            "label_type": self.label_type,
            "data_reshape": " ".join(map(str, self.data_reshape or ())),
            "label_reshape": " ".join(map(str, self.label_reshape or ())),
        }


# --- RAW ----------------------------------------------------------------------------------------------

def _values(count: int) -> str:
    return f"({count} value{'' if count == 1 else 's'})"


_PLAIN_PAGES_FROM = 32 * 1024 * 1024


def alloc_bytes(rows: int, width: int) -> np.ndarray[Any, Any]:
    """An uninitialised (rows, width) uint8 array for a whole dataset.

    Large ones are anonymous mmaps with ordinary pages, populated at once: numpy madvises big arrays as
    transparent huge pages, and on a VM whose host reclaims freed guest memory (virtio-balloon free page
    reporting, as on this project's machines) every fresh huge page costs a compaction and a host fault.
    Measured here for 392 MB: 1.0 s with np.empty, 0.25 s this way.
    """
    nbytes = rows * width
    if nbytes < _PLAIN_PAGES_FROM or not hasattr(mmap, "MAP_ANONYMOUS"):
        return np.empty((rows, width), dtype=np.uint8)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    return np.frombuffer(mmap.mmap(-1, nbytes, flags=flags), dtype=np.uint8).reshape(rows, width)


class _Part:
    """One side of a RAW record (the sample in the value, or the label in the key) and its buffer."""

    def __init__(self, dtype: np.dtype[Any], shape: tuple[int, ...] | None, what: str) -> None:
        self.dtype = dtype
        self.shape = shape  # as announced; None: flat, -1: the rest
        self.what = what
        self.nbytes: int | None = None if shape is None or -1 in shape else math.prod(shape) * dtype.itemsize
        self.buf: np.ndarray[Any, Any] | None = None

    def size_from(self, first: bytes, slot: int) -> None:
        """Announced without a full shape: the first record read decides the size, which must fit the type."""
        known = math.prod(d for d in self.shape if d != -1) if self.shape is not None else 1
        unit = known * self.dtype.itemsize
        if len(first) == 0 or len(first) % unit:
            raise DataError(f"record {slot}: {self.noun} has {len(first)} bytes, not a whole number of "
                            f"{self.dtype.name} {shape_text(self.shape)} values ({unit} bytes each)", index=slot)
        self.nbytes = len(first)

    @property
    def noun(self) -> str:
        return "value" if self.what == "value" else "label (key)"

    def final_shape(self) -> tuple[int, ...]:
        count = (self.nbytes or 0) // self.dtype.itemsize
        if self.shape is None:
            return (count,)
        if -1 in self.shape:
            rest = count // math.prod(d for d in self.shape if d != -1)
            return tuple(rest if d == -1 else d for d in self.shape)
        return self.shape

    def check(self, chunks: Sequence[bytes | None], slot_of: Callable[[int], int]) -> None:
        expected = self.nbytes
        try:
            lengths = np.fromiter(map(len, chunks), dtype=np.int64, count=len(chunks))  # type: ignore[arg-type]
        except TypeError:  # a None among them (a record without a key): -1 marks it
            lengths = np.fromiter((-1 if c is None else len(c) for c in chunks), dtype=np.int64, count=len(chunks))
        bad = np.flatnonzero(lengths != expected)
        if not bad.size:
            return
        i = int(bad[0])
        slot = slot_of(i)
        if lengths[i] < 0:
            raise DataError(f"record {slot}: no {self.noun}; RAW records carry the label in the record key "
                            "(as Kafka-ML's RawSink writes them)", index=slot)
        noun = "bytes" if self.what == "value" else "bytes of label (key)"
        count = (expected or 0) // self.dtype.itemsize
        announced = shape_text(self.shape) if self.shape is not None else _values(count)
        raise DataError(f"record {slot}: {int(lengths[i])} {noun}, expected {expected} for {self.dtype.name} "
                        f"{announced}", index=slot)


class RawBuilder:
    """(x, y) from RAW records that arrive in batches, copied straight into two preallocated arrays.

    Used by `decode_raw` (one batch) and by the reader, which puts each fetched batch at the slots of its
    offsets, so a dataset never exists twice in memory as records and arrays. `slots` is the number of
    records announced; a slot that no record filled (an offset gap) is left out of the result.
    Sizes are checked per batch: a wrong one raises DataError naming the record's slot (its position in
    the announcement, which the reader maps back to a topic, partition and offset).
    """

    def __init__(self, cfg: InputConfig, slots: int) -> None:
        if cfg.data_type is None:
            raise DataError("input_config has no data_type: the sink must say how to read the samples (e.g. uint8)")
        if cfg.label_type is None:
            raise DataError("input_config has no label_type: the sink must say how to read the labels (e.g. uint8)")
        self.x = _Part(_dtype(cfg.data_type, "data_type"), cfg.data_reshape, "value")
        self.y = _Part(_dtype(cfg.label_type, "label_type"), cfg.label_reshape, "label")
        self.slots = slots
        self.filled = np.zeros(slots, dtype=bool)

    def _prepare(self, values: Sequence[bytes | None], keys: Sequence[bytes | None],
                 slot_of: Callable[[int], int]) -> None:
        if len(values) != len(keys):
            raise DataError(f"{len(values)} values but {len(keys)} keys")
        for part, chunks in ((self.x, values), (self.y, keys)):
            if part.buf is None:
                if part.nbytes is None and chunks:
                    first = chunks[0]
                    if first is None:
                        part.check(chunks[:1], slot_of)
                    part.size_from(cast(bytes, first), slot_of(0))
                part.buf = alloc_bytes(self.slots, part.nbytes or 0)
            part.check(chunks, slot_of)

    def put(self, start: int, values: Sequence[bytes | None], keys: Sequence[bytes | None]) -> None:
        """Records for the consecutive slots start, start + 1, ..."""
        n = len(values)
        if not n:
            return
        self._prepare(values, keys, lambda i: start + i)
        for part, chunks in ((self.x, values), (self.y, keys)):
            assert part.buf is not None
            part.buf[start:start + n] = np.frombuffer(b"".join(cast(Sequence[bytes], chunks)),
                                                      dtype=np.uint8).reshape(n, -1)
        self.filled[start:start + n] = True

    def put_at(self, slots: np.ndarray[Any, Any], values: Sequence[bytes | None],
               keys: Sequence[bytes | None]) -> None:
        """Records for the given slots (an integer array as long as values)."""
        n = len(values)
        if not n:
            return
        self._prepare(values, keys, lambda i: int(slots[i]))
        for part, chunks in ((self.x, values), (self.y, keys)):
            assert part.buf is not None
            part.buf[slots] = np.frombuffer(b"".join(cast(Sequence[bytes], chunks)), dtype=np.uint8).reshape(n, -1)
        self.filled[slots] = True

    def finish(self) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        """The arrays: views of the buffers when every slot was filled (no copy), else the filled rows."""
        complete = bool(self.filled.all())
        out = []
        for part in (self.x, self.y):
            buf = part.buf if part.buf is not None else np.empty((self.slots, part.nbytes or 0), dtype=np.uint8)
            rows = buf if complete else buf[self.filled]
            out.append(rows.view(part.dtype).reshape((len(rows), *part.final_shape())))
        x, y = out
        if self.y.shape is None and (y.shape[1:] == (1,) or not self.slots):
            y = y.reshape(len(y))  # one value per label: (n,), what sparse categorical losses expect
        return x, y


def decode_raw(values: Sequence[bytes | None], keys: Sequence[bytes | None],
               cfg: InputConfig) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """RAW records -> (x of shape (n, *data_reshape), y of shape (n,) or (n, *label_reshape)).

    Without a data_reshape every sample is a flat vector; without a label_reshape a one-value label
    gives y of shape (n,) (what sparse categorical losses expect), a k-value label (n, k). Vectorised:
    the values are joined once and read with one `np.frombuffer`. The arrays are writable.
    """
    if len(values) != len(keys):
        raise DataError(f"{len(values)} values but {len(keys)} keys")
    builder = RawBuilder(cfg, len(values))
    builder.put(0, values, keys)
    return builder.finish()


# --- AVRO ---------------------------------------------------------------------------------------------

def flatten_record(record: Mapping[str, Any], fields: Sequence[str], index: int, what: str) -> list[Any]:
    """The numbers of an Avro record's `fields`, in order, as one flat list (also the tiers' AVRO input)."""
    out: list[Any] = []
    for name in fields:
        _append(out, record.get(name), name, index, what)
    return out


def _append(out: list[Any], value: Any, field: str, index: int, what: str) -> None:
    if isinstance(value, bool | int | float):
        out.append(value)
    elif isinstance(value, list | tuple):
        if all(isinstance(v, int | float) for v in value):
            out.extend(value)
        else:
            for v in value:
                _append(out, v, field, index, what)
    elif isinstance(value, bytes | bytearray):
        out.extend(value)  # Avro bytes/fixed: one uint8 value per byte
    elif isinstance(value, Mapping):
        for v in value.values():
            _append(out, v, field, index, what)
    elif value is None:
        raise DataError(f"record {index}: {what} field {field!r} is null; every field must hold numbers",
                        index=index)
    else:
        raise DataError(f"record {index}: {what} field {field!r} holds {type(value).__name__} "
                        f"{str(value)[:40]!r}; only numbers can feed a model", index=index)


def _rows_to_array(rows: list[list[Any]], type_name: str | None, what: str) -> np.ndarray[Any, Any]:
    if not rows:
        return np.empty((0, 0), dtype=np.float32 if type_name is None else _dtype(type_name, what))
    width = len(rows[0])
    for i, row in enumerate(rows):
        if len(row) != width:
            raise DataError(f"record {i}: {what} has {len(row)} values, expected {width} like record 0",
                            index=i)
    arr = np.asarray(rows)
    if type_name is not None:
        return arr.astype(_dtype(type_name, f"{what} type"), copy=False)
    if arr.dtype.kind == "f":
        return arr.astype(np.float32, copy=False)  # Keras' default float
    return arr


def _field_names(scheme: Mapping[str, Any]) -> list[str]:
    return [str(f["name"]) for f in scheme["fields"]]


def _reader(scheme: dict[str, Any]) -> Any:
    try:
        return parse_schema(scheme)
    except Exception as exc:  # fastavro raises several types for bad schemas
        raise DataError(f"invalid Avro schema {scheme.get('name', '')!r}: {exc}") from None


def decode_avro(values: Sequence[bytes | None], keys: Sequence[bytes | None],
                cfg: InputConfig) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """AVRO records -> (x, y), as Kafka-ML's AvroSink writes them.

    Each value is the data record (schemaless Avro binary, `data_scheme`); its fields, in schema order,
    are flattened into one numeric vector (arrays are spread out), then reshaped by `data_reshape` when
    the config has one. The label comes from the key (the `label_scheme` record, fields flattened
    the same way); records without keys take it from the value instead when the data scheme carries the
    label scheme's fields (or a field named "label" when there is no label scheme), and those fields are
    then left out of x. A one-value label gives y of shape (n,).
    """
    if cfg.data_scheme is None:
        raise DataError("input_config has no data_scheme: AVRO datasources need the Avro schema of the data")
    if len(values) != len(keys):
        raise DataError(f"{len(values)} values but {len(keys)} keys")
    data_fields = _field_names(cfg.data_scheme)
    label_fields = _field_names(cfg.label_scheme) if cfg.label_scheme is not None else ["label"]
    keyed = bool(keys) and all(k for k in keys)
    in_value = not keyed and all(f in data_fields for f in label_fields)
    if keys and not keyed and not in_value:
        i = next(i for i, k in enumerate(keys) if not k)
        raise DataError(f"record {i}: no key (label) and the data scheme has no field "
                        f"{', '.join(repr(f) for f in label_fields)} to take the label from", index=i)
    if keyed and cfg.label_scheme is None:
        raise DataError("input_config has no label_scheme: the record keys (labels) cannot be decoded")
    x_fields = [f for f in data_fields if f not in label_fields] if in_value else data_fields
    data_schema = _reader(cfg.data_scheme)
    label_schema: Any = _reader(cfg.label_scheme) if keyed and cfg.label_scheme is not None else None
    xs: list[list[Any]] = []
    ys: list[list[Any]] = []
    for i, value in enumerate(values):
        if value is None:
            raise DataError(f"record {i}: empty value (no data record)", index=i)
        try:
            record = schemaless_reader(io.BytesIO(value), data_schema, None)
        except Exception as exc:  # truncated or foreign bytes: fastavro raises EOFError, ValueError, ...
            raise DataError(f"record {i}: value is not Avro for data_scheme ({type(exc).__name__}: {exc})",
                            index=i) from None
        if not isinstance(record, Mapping):
            raise DataError(f"record {i}: data_scheme must describe a record", index=i)
        xs.append(flatten_record(record, x_fields, i, "data"))
        if in_value:
            ys.append(flatten_record(record, label_fields, i, "label"))
        else:
            try:
                label = schemaless_reader(io.BytesIO(cast(bytes, keys[i])), label_schema, None)
            except Exception as exc:
                raise DataError(f"record {i}: key is not Avro for label_scheme ({type(exc).__name__}: {exc})",
                                index=i) from None
            ys.append(flatten_record(cast(Mapping[str, Any], label), label_fields, i, "label"))
    x = _rows_to_array(xs, cfg.data_type, "data")
    y = _rows_to_array(ys, cfg.label_type, "label")
    if cfg.data_reshape is not None:
        x = _reshape_rows(x, cfg.data_reshape, "data_reshape")
    if cfg.label_reshape is not None:
        y = _reshape_rows(y, cfg.label_reshape, "label_reshape")
    elif y.ndim == 2 and y.shape[1] == 1:
        y = y.reshape(len(y))
    return x, y


def _reshape_rows(a: np.ndarray[Any, Any], shape: tuple[int, ...], what: str) -> np.ndarray[Any, Any]:
    per = math.prod(a.shape[1:])
    known = math.prod(d for d in shape if d != -1)
    if (-1 in shape and per % known) or (-1 not in shape and per != known):
        raise DataError(f"{what} {shape_text(shape)} does not fit records of {per} values")
    return a.reshape((len(a), *shape))


def decode(input_format: str, values: Sequence[bytes | None], keys: Sequence[bytes | None],
           cfg: InputConfig) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Dispatch on the announcement's input_format (RAW or AVRO)."""
    fmt = input_format.upper()
    if fmt == "RAW":
        return decode_raw(values, keys, cfg)
    if fmt == "AVRO":
        return decode_avro(values, keys, cfg)
    raise DataError(f"input_format {input_format!r} is not RAW or AVRO")


# --- shapes -------------------------------------------------------------------------------------------

def reshape_for(x: np.ndarray[Any, Any], input_shape: Sequence[int | None]) -> np.ndarray[Any, Any]:
    """Samples reshaped to a model's input when the element counts agree.

    `input_shape` is Keras' `model.input_shape` (a leading None is the batch dimension) or a sample
    shape. One datasource announced as "28 28" thus feeds a (None, 28, 28, 1) model and a (None, 28, 28)
    one. One other None dimension is inferred; otherwise a mismatch raises DataError naming both shapes.
    """
    dims = list(input_shape)
    if dims and dims[0] is None:
        dims = dims[1:]
    sample = tuple(int(d) for d in x.shape[1:])
    per = math.prod(sample)
    free = [i for i, d in enumerate(dims) if d is None]
    known = math.prod(int(d) for d in dims if d is not None)
    if len(free) > 1:
        fits = len(dims) == len(sample) and all(d is None or d == s for d, s in zip(dims, sample, strict=True))
        if fits:
            return x
    elif (free and known and per % known == 0) or (not free and known == per):
        target = tuple(-1 if d is None else int(d) for d in dims)
        return x.reshape((len(x), *target))
    raise DataError(f"samples of shape {shape_text(sample)} ({per} values) cannot feed a model whose input is "
                    f"{shape_text(dims)} ({'?' if free else known} values); announce the datasource with a "
                    "data_reshape whose element count matches the model's input")
