"""Training-data decoding, reshaping, config parsing, datasets and the sinks' pure parts (no broker)."""

from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from fastavro import parse_schema, schemaless_writer

from tierflow.tiers import datasets
from tierflow.tiers.data import DataError, InputConfig, RawBuilder, decode, decode_avro, decode_raw, reshape_for
from tierflow.tiers.reader import Range, Records, parse_ranges
from tierflow.tiers.send_cli import ProgressBar
from tierflow.tiers.sinks import deployment_key, load_scheme

RAW_28 = InputConfig.parse({"data_type": "uint8", "label_type": "uint8", "data_reshape": "28 28",
                            "label_reshape": ""})

DATA_SCHEME = {"type": "record", "name": "data", "fields": [
    {"name": "x", "type": "float"}, {"name": "pixels", "type": {"type": "array", "items": "float"}},
    {"name": "y", "type": "int"}]}
LABEL_SCHEME = {"type": "record", "name": "label", "fields": [{"name": "label", "type": "int"}]}


def avro(schema: dict[str, Any], record: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    schemaless_writer(buf, parse_schema(schema), record)
    return buf.getvalue()


# --- input config ---------------------------------------------------------------------------------------

def test_input_config_reads_kafka_mls_text_forms() -> None:
    # Kafka-ML's sink sends reshapes as space-separated text; an empty one means "none".
    assert RAW_28.data_reshape == (28, 28)
    assert RAW_28.label_reshape is None
    text = orjson.dumps({"data_type": "float", "label_type": "int64", "data_reshape": [4, 2]}).decode()
    cfg = InputConfig.parse(text)
    assert cfg.data_reshape == (4, 2) and cfg.data_type == "float"
    assert InputConfig.parse(None) == InputConfig()


def test_input_config_round_trips_through_its_json_form() -> None:
    assert InputConfig.parse(RAW_28.to_json()) == RAW_28
    assert RAW_28.to_json() == {"data_type": "uint8", "label_type": "uint8", "data_reshape": "28 28",
                                "label_reshape": ""}
    avro_cfg = InputConfig(data_scheme=DATA_SCHEME, label_scheme=LABEL_SCHEME)
    wire = avro_cfg.to_json()
    assert isinstance(wire["data_scheme"], str)  # JSON text, as Kafka-ML's AvroSink sends the .avsc file
    assert InputConfig.parse(wire) == avro_cfg


def test_input_config_accepts_a_python_repr_scheme_like_kafka_mls_decoder() -> None:
    cfg = InputConfig.parse({"data_scheme": str(DATA_SCHEME), "label_scheme": str(LABEL_SCHEME)})
    assert cfg.data_scheme == DATA_SCHEME


@pytest.mark.parametrize(("config", "message"), [
    ({"data_type": "string"}, "not a numeric type"),
    ({"data_type": "uint7"}, "not a numeric type"),
    ({"data_type": 8}, "type name"),
    ({"data_reshape": "28 x"}, "whole numbers"),
    ({"data_reshape": "0 28"}, "positive"),
    ({"data_scheme": "{not json"}, "JSON Avro schema"),
    ({"data_scheme": {"type": "array", "items": "int"}}, "record schema"),
])
def test_input_config_errors_name_the_field(config: dict[str, Any], message: str) -> None:
    with pytest.raises(DataError, match=message):
        InputConfig.parse(config)


# --- RAW --------------------------------------------------------------------------------------------------

def test_decode_raw_is_one_array_of_the_announced_shape() -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(50, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, size=50, dtype=np.uint8)
    dx, dy = decode_raw([s.tobytes() for s in x], [bytes([v]) for v in y], RAW_28)
    assert dx.shape == (50, 28, 28) and dx.dtype == np.uint8 and np.array_equal(dx, x)
    assert dy.shape == (50,) and np.array_equal(dy, y)
    dx[0, 0, 0] = 7  # writable: the training job may scale in place
    assert decode("raw", [x[0].tobytes()], [b"\x01"], RAW_28)[0].shape == (1, 28, 28)


def test_decode_raw_float_samples_and_vector_labels() -> None:
    x = np.linspace(0, 1, 6 * 8, dtype=np.float32).reshape(6, 8)
    y = np.eye(6, 3, dtype=np.float32)
    cfg = InputConfig.parse({"data_type": "float32", "label_type": "float32", "data_reshape": "2 4",
                             "label_reshape": "3"})
    dx, dy = decode_raw([s.tobytes() for s in x], [s.tobytes() for s in y], cfg)
    assert dx.shape == (6, 2, 4) and np.array_equal(dx.reshape(6, 8), x)
    assert dy.shape == (6, 3) and np.array_equal(dy, y)
    # Without reshapes: flat samples, and k-value labels stay (n, k).
    flat = InputConfig.parse({"data_type": "float32", "label_type": "float32"})
    fx, fy = decode_raw([s.tobytes() for s in x], [s.tobytes() for s in y], flat)
    assert fx.shape == (6, 8) and fy.shape == (6, 3)
    # One -1 stands for the rest.
    wild = InputConfig.parse({"data_type": "float32", "label_type": "float32", "data_reshape": "-1 2"})
    assert decode_raw([s.tobytes() for s in x], [s.tobytes() for s in y], wild)[0].shape == (6, 4, 2)


def test_decode_raw_names_the_first_wrong_record_and_what_was_expected() -> None:
    values = [bytes(784)] * 30
    values[17] = bytes(783)
    values[20] = bytes(785)
    with pytest.raises(DataError) as err:
        decode_raw(values, [b"\x01"] * 30, RAW_28)
    assert str(err.value).startswith("record 17: 783 bytes, expected 784 for uint8 28x28")
    assert err.value.index == 17


def test_raw_builder_fills_batches_in_any_order_and_drops_gaps() -> None:
    # What the reader does: each fetched batch goes to the slots of its offsets, partitions interleaved.
    x = np.arange(6 * 4, dtype=np.float32).reshape(6, 4)
    cfg = InputConfig.parse({"data_type": "float32", "label_type": "int64", "data_reshape": "2 2"})
    builder = RawBuilder(cfg, 6)
    builder.put(3, [x[3].tobytes(), x[4].tobytes(), x[5].tobytes()], [struct.pack("<q", i) for i in (3, 4, 5)])
    builder.put_at(np.array([0, 1]), [x[0].tobytes(), x[1].tobytes()], [struct.pack("<q", i) for i in (0, 1)])
    bx, by = builder.finish()  # slot 2 never came (an offset gap): left out
    assert bx.shape == (5, 2, 2) and np.array_equal(bx.reshape(5, 4), x[[0, 1, 3, 4, 5]])
    assert by.tolist() == [0, 1, 3, 4, 5]
    with pytest.raises(DataError, match="record 4: 3 bytes, expected 16 for float32 2x2") as err:
        builder.put_at(np.array([2, 4]), [x[2].tobytes(), b"abc"], [b"\0" * 8] * 2)
    assert err.value.index == 4


def test_decode_raw_label_errors() -> None:
    with pytest.raises(DataError, match=r"record 2: no label \(key\)") as err:
        decode_raw([bytes(784)] * 3, [b"\x01", b"\x02", None], RAW_28)
    assert err.value.index == 2
    with pytest.raises(DataError, match="record 1: 2 bytes of label"):
        decode_raw([bytes(784)] * 2, [b"\x01", b"\x01\x02"], RAW_28)
    with pytest.raises(DataError, match="no data_type"):
        decode_raw([b"x"], [b"\x01"], InputConfig(label_type="uint8"))
    with pytest.raises(DataError, match="RAW or AVRO"):
        decode("csv", [], [], RAW_28)


def test_decode_raw_of_nothing_keeps_the_shape() -> None:
    x, y = decode_raw([], [], RAW_28)
    assert x.shape == (0, 28, 28) and y.shape == (0,)


def test_decode_raw_reads_little_endian_like_tf_decode_raw() -> None:
    cfg = InputConfig.parse({"data_type": "int32", "label_type": "int64"})
    x, y = decode_raw([struct.pack("<2i", 1, -2)], [struct.pack("<q", 9)], cfg)
    assert x.tolist() == [[1, -2]] and y.tolist() == [9]


# --- AVRO -------------------------------------------------------------------------------------------------

def test_decode_avro_flattens_fields_in_schema_order_with_labels_from_keys() -> None:
    cfg = InputConfig(data_scheme=DATA_SCHEME, label_scheme=LABEL_SCHEME)
    values = [avro(DATA_SCHEME, {"x": 0.5, "pixels": [1.0, 2.0], "y": i}) for i in range(4)]
    keys = [avro(LABEL_SCHEME, {"label": i % 2}) for i in range(4)]
    x, y = decode_avro(values, keys, cfg)
    assert x.dtype == np.float32 and x.shape == (4, 4)
    assert x[3].tolist() == [0.5, 1.0, 2.0, 3.0]
    assert y.tolist() == [0, 1, 0, 1]


def test_decode_avro_takes_the_label_from_the_value_when_records_have_no_key() -> None:
    scheme = {"type": "record", "name": "d", "fields": [{"name": "a", "type": "double"},
                                                        {"name": "label", "type": "int"},
                                                        {"name": "b", "type": "double"}]}
    cfg = InputConfig(data_scheme=scheme, label_scheme=LABEL_SCHEME, data_reshape=(2, 1))
    x, y = decode_avro([avro(scheme, {"a": 1.0, "label": 7, "b": 2.0})], [None], cfg)
    assert x.shape == (1, 2, 1) and x.ravel().tolist() == [1.0, 2.0]  # the label is not a feature
    assert y.tolist() == [7]


def test_decode_avro_errors() -> None:
    cfg = InputConfig(data_scheme=DATA_SCHEME, label_scheme=LABEL_SCHEME)
    good = avro(DATA_SCHEME, {"x": 0.5, "pixels": [1.0], "y": 1})
    with pytest.raises(DataError, match=r"record 1: no key .* no field 'label'") as err:
        decode_avro([good, good], [avro(LABEL_SCHEME, {"label": 1}), None], cfg)
    assert err.value.index == 1
    with pytest.raises(DataError, match="record 0: value is not Avro"):
        decode_avro([b"\x02"], [avro(LABEL_SCHEME, {"label": 1})], cfg)
    ragged = avro(DATA_SCHEME, {"x": 0.5, "pixels": [1.0, 2.0], "y": 1})
    with pytest.raises(DataError, match="record 1: data has 4 values, expected 3"):
        decode_avro([good, ragged], [avro(LABEL_SCHEME, {"label": 1})] * 2, cfg)
    with pytest.raises(DataError, match="no data_scheme"):
        decode_avro([good], [None], InputConfig())


# --- reshape to a model's input -----------------------------------------------------------------------------

def test_one_datasource_feeds_models_with_different_input_shapes() -> None:
    x = np.zeros((5, 28, 28), dtype=np.float32)
    assert reshape_for(x, (None, 28, 28, 1)).shape == (5, 28, 28, 1)
    assert reshape_for(x, (None, 28, 28)).shape == (5, 28, 28)
    assert reshape_for(x, (None, 784)).shape == (5, 784)
    assert reshape_for(x, (28, 28, 1)).shape == (5, 28, 28, 1)  # a sample shape without the batch
    assert reshape_for(x, (None, None, 28)).shape == (5, 28, 28)
    assert reshape_for(x, (None, None, None)) is x


def test_reshape_for_names_both_shapes_when_counts_differ() -> None:
    with pytest.raises(DataError, match=r"28x28 \(784 values\).*32x32x3 \(3072 values\)"):
        reshape_for(np.zeros((2, 28, 28)), (None, 32, 32, 3))


# --- reader (pure parts) ---------------------------------------------------------------------------------

def test_parse_ranges_and_locate() -> None:
    ranges = parse_ranges('[{"topic": "t", "partition": 1, "start": 10, "end": 12}]')
    assert ranges == [Range("t", 1, 10, 12)]
    records = Records([b"a", b"b", b"c"], [None] * 3, [(ranges[0], range(10, 12)),
                                                         (Range("u", 0, 5, 6), [5])])
    assert records.locate(1) == "topic t, partition 1, offset 11"
    assert records.locate(2) == "topic u, partition 0, offset 5"
    with pytest.raises(DataError, match="start <= end"):
        parse_ranges([{"topic": "t", "partition": 0, "start": 5, "end": 2}])
    with pytest.raises(DataError, match="needs topic"):
        parse_ranges([{"topic": "t"}])


# --- sinks (pure parts) ----------------------------------------------------------------------------------

def test_deployment_key_is_big_endian_and_one_byte_like_kafka_ml() -> None:
    assert deployment_key(7) == bytes([7])
    assert deployment_key(255) == b"\xff"
    assert deployment_key(256) == b"\x01\x00"
    assert int.from_bytes(deployment_key(70_000), "big") == 70_000


def test_load_scheme_from_dict_text_or_file(tmp_path: Path) -> None:
    path = tmp_path / "label.avsc"
    path.write_text(orjson.dumps(LABEL_SCHEME).decode())
    assert load_scheme(LABEL_SCHEME, "label_scheme") == LABEL_SCHEME
    assert load_scheme(orjson.dumps(LABEL_SCHEME).decode(), "label_scheme") == LABEL_SCHEME
    assert load_scheme(str(path), "label_scheme") == LABEL_SCHEME
    with pytest.raises(ValueError, match="cannot read"):
        load_scheme(tmp_path / "missing.avsc", "data_scheme")


def test_the_c_crc32c_given_to_kafka_python_computes_the_same_checksums() -> None:
    from kafka.record import _crc32c, default_records

    from tierflow.tiers.sinks import _use_fast_crc32c

    _use_fast_crc32c()
    payload = bytes(range(256)) * 7
    assert default_records.calc_crc32c(payload) == _crc32c.crc(payload)


# --- datasets ---------------------------------------------------------------------------------------------

def write_idx(path: Path, arr: np.ndarray[Any, Any]) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_from_the_debian_packages_idx_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("t10k", 2)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    ds = datasets.load("fashion-mnist", fashion_mnist_dir=tmp_path)
    assert ds.x.shape == (8, 28, 28) and ds.x.dtype == np.uint8
    assert ds.y.tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
    assert len(ds.head(3)) == 3
    with pytest.raises(datasets.DatasetError, match="apt-get install dataset-fashion-mnist"):
        datasets.load("fashion-mnist", fashion_mnist_dir=tmp_path / "nowhere")


def test_digits_are_28x28_float32_in_0_1() -> None:
    ds = datasets.load("digits")
    assert ds.x.shape == (1797, 28, 28) and ds.x.dtype == np.float32
    assert float(ds.x.min()) >= 0.0 and float(ds.x.max()) <= 1.0
    assert sorted(set(ds.y.tolist())) == list(range(10)) and ds.y.dtype == np.uint8


def test_resize_keeps_constant_images_constant() -> None:
    out = datasets.resize_images(np.full((2, 8, 8), 5.0), 28)
    assert out.shape == (2, 28, 28) and np.allclose(out, 5.0)


def test_npz_datasets(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", x=np.zeros((3, 4)), y=np.arange(3))
    np.savez(tmp_path / "b.npz", x_train=np.zeros((3, 4)), y_train=np.arange(3), x_test=np.ones((2, 4)),
             y_test=np.arange(2))
    np.savez(tmp_path / "c.npz", images=np.zeros(2))
    assert len(datasets.load(f"npz:{tmp_path / 'a.npz'}")) == 3
    b = datasets.load(f"npz:{tmp_path / 'b.npz'}")
    assert len(b) == 5 and b.x[-1].tolist() == [1.0] * 4
    with pytest.raises(datasets.DatasetError, match=r"has arrays \['images'\]"):
        datasets.load(f"npz:{tmp_path / 'c.npz'}")
    with pytest.raises(datasets.DatasetError, match="unknown dataset"):
        datasets.load("imagenet")
    assert datasets.slug(f"npz:{tmp_path / 'b.npz'}") == "b"


def test_progress_bar_line() -> None:
    out = io.StringIO()
    bar = ProgressBar(200, stream=out, width=10)
    assert bar.line(50).startswith("[##........] 50/200  25%")
    bar.finish(200)
    assert out.getvalue().startswith("\r[##########] 200/200 100%") and out.getvalue().endswith("\n")
