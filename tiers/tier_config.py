"""What one tier serves: its `TierConfig` (topics, limit, clusters, batching, model) and how it reads its input.

Built by `tierflow tier run` (`tierflow.tiers.tier_cli`, from the API's inference or from flags) and by tests
and benchmarks; read by the batching loop (`tierflow.tiers.tier_agent`) and the Faust app around it
(`tierflow.tiers.tier_app`). `input_spec` turns the config and the loaded model's input into the decoder
settings of `tierflow.streams.wire` (RAW per the datasource's input_config, AVRO, or float32 tensors); a
config or input_config that cannot work is a `TierConfigError` that names the setting.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastavro import parse_schema, schemaless_reader

from tierflow.streams import wire
from tierflow.streams.errors import PermanentError
from tierflow.tiers.data import DataError, InputConfig, flatten_record
from tierflow.tiers.engines import ENGINES, Engine

Array = np.ndarray[Any, Any]


#: What a tier's limit may be compared with (see `TierConfig.compare`).
COMPARES = ("raw", "calibrated")


class TierConfigError(PermanentError, ValueError):
    """The tier cannot be served as configured; the message names the setting (a restart cannot help)."""


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
    #: The model artefact: a file path, or its bytes (`.keras` for "keras", `.tflite` for "litert"; `.h5` is refused).
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
    #: What `limit` is compared with (docs/commands.md, "Limits from a target"): "raw", the sub-model's max(p)
    #: as in Kafka-ML (typed limits), or "calibrated", max(softmax(log(clip(p, eps, 1)) / temperature)) as
    #: tiers/calibration.py `calibrated_confidence` computes it (limits chosen from a target).
    compare: str = "raw"
    temperature: float = 1.0
    eps: float = 1e-12
    #: Share of the inputs it answers that a non-top tier also sends up as shadow samples (0: none).
    shadow_fraction: float = 0.0
    #: With limits chosen from a target: the target ({kind: value}), this tier's prediction {share, agreement,
    #: agreement_lower} and the inference's {shares, accuracy, agreement, ...}; None with typed limits.
    target: dict[str, Any] | None = field(default=None, compare=False)
    predicted: dict[str, Any] | None = field(default=None, compare=False)
    predicted_chain: dict[str, Any] | None = field(default=None, compare=False)

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
        if self.compare not in COMPARES:
            raise TierConfigError(f"compare {self.compare!r} must be one of {', '.join(COMPARES)}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise TierConfigError(f"temperature {self.temperature} must be a positive number")
        if not 0 < self.eps < 0.5:
            raise TierConfigError(f"eps {self.eps} must be in (0, 0.5)")
        if not 0 <= self.shadow_fraction <= 1:
            raise TierConfigError(f"shadow_fraction {self.shadow_fraction} must be in [0, 1]")

    @property
    def group(self) -> str:
        return self.group_id or wire.tier_group(self.inference_id, self.tier_index)

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
    if cfg.data_scheme is None:
        raise TierConfigError("input_format AVRO needs input_config.data_scheme")
    schema = parse_schema(cfg.data_scheme)
    fields = [str(f["name"]) for f in cfg.data_scheme["fields"]]
    dtype = wire.parse_dtype(cfg.data_type, "data_type") if cfg.data_type else np.dtype(np.float32)

    def decode(value: bytes) -> Array:
        try:
            record = schemaless_reader(io.BytesIO(value), schema, None)
        except Exception as exc:  # truncated or foreign bytes: fastavro raises EOFError, ValueError, ...
            raise ValueError(f"value is not Avro for data_scheme ({type(exc).__name__}: {exc})") from None
        if not isinstance(record, Mapping):
            raise ValueError("data_scheme must describe a record")
        try:
            return np.asarray(flatten_record(record, fields, 0, "data"), dtype=dtype)
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
        return wire.InputSpec(shape, dtype=engine.input_dtype, raw_dtype=wire.parse_dtype(cfg.data_type, "data_type"),
                              raw_shape=raw_shape)
    except (wire.WireError, DataError) as exc:
        raise TierConfigError(f"input_config does not fit the model of {config.name}: {exc}") from exc

