"""The command and event catalogue: names, schema versions, and field-level parsing of command payloads.

Pure code. The API parses request bodies with these functions to answer 422 naming the field before a
command is even sent; the decider's rules (streams/domain/) parse every command again (commands may be
produced straight to Kafka) and reject what does not parse, then check what needs the state (ids that
exist, limits naming the inference's tiers). docs/commands.md documents the same shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import orjson

from tierflow.streams.envelope import JSON, Upcasters
from tierflow.streams.errors import PermanentError
from tierflow.streams.exits import DEFAULT_EPS, ExitsError, Target, parse_frontier, parse_target
from tierflow.streams.settings import KafkaSettings


class Invalid(PermanentError, ValueError):
    """A command field is wrong. `code` says what the API answers: invalid -> 422, not_found -> 404,
    conflict -> 409. (Still a ValueError, as parsers that wrap `int()` and friends expect.)"""

    def __init__(self, message: str, field: str | None = None, code: str = "invalid") -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.code = code

    def to_json(self) -> JSON:
        return {"code": self.code, "message": self.message, "field": self.field}


# --- names --------------------------------------------------------------------------------------------

#: Each command produces exactly one event: the accepted one named here, or CommandRejected.
COMMAND_EVENTS: dict[str, str] = {
    "RegisterModel": "ModelCreated",
    "UpdateModel": "ModelUpdated",
    "DeleteModel": "ModelDeleted",
    "CreateConfiguration": "ConfigurationCreated",
    "UpdateConfiguration": "ConfigurationUpdated",
    "DeleteConfiguration": "ConfigurationDeleted",
    "RequestDeployment": "DeploymentRequested",
    "DeleteDeployment": "DeploymentDeleted",
    "AnnounceDatasource": "DatasourceAnnounced",
    "SendDatasource": "DatasourceAnnounced",
    "ReportTrainingLaunched": "TrainingLaunched",
    "ReportTrainingStarted": "TrainingStarted",
    "ReportTrainingProgress": "TrainingProgressed",
    "ReportTrainingResult": "TrainingResultReported",
    "ReportTrainingFailure": "TrainingFailed",
    "StopTraining": "TrainingStopped",
    "DeleteResult": "ResultDeleted",
    "RequestInference": "InferenceRequested",
    "StopInference": "InferenceStopped",
    "DeleteInference": "InferenceDeleted",
}
EVENT_TYPES: frozenset[str] = frozenset([*COMMAND_EVENTS.values(), "CommandRejected"])

#: Events that can change what the orchestrator reconciles: the results a training workload trains (their
#: deployment, data, status) and the inferences it serves. The projector's notification says whether a batch
#: held one (`projections.schema.notify_payload`); the orchestrator plans again only then (and on its timer),
#: not on each epoch's progress report, model or configuration change.
WORKLOAD_EVENTS: frozenset[str] = frozenset({
    "DeploymentRequested", "DeploymentDeleted", "DatasourceAnnounced", "TrainingLaunched", "TrainingStarted",
    "TrainingResultReported", "TrainingFailed", "TrainingStopped", "ResultDeleted", "InferenceRequested",
    "InferenceStopped", "InferenceDeleted",
})

#: Commands whose model code is built in the validation sandbox before the decider decides them.
CODE_COMMANDS: frozenset[str] = frozenset({"RegisterModel", "UpdateModel"})

NAME_MAX = 64
CODE_MAX = 1024 * 1024

FIT_OPTION_KEYS: frozenset[str] = frozenset(
    {"epochs", "shuffle", "class_weight", "initial_epoch", "steps_per_epoch", "validation_steps",
     "validation_freq", "verbose"}
)
EVAL_OPTION_KEYS: frozenset[str] = frozenset({"steps", "verbose"})
OPTIMIZERS: frozenset[str] = frozenset(
    {"adam", "adamw", "sgd", "rmsprop", "adagrad", "adadelta", "adamax", "nadam", "ftrl"}
)
#: A deployment's `seed` is below this (31 bits: what numpy, TensorFlow and a drawn seed all take).
SEED_LIMIT = 2**31
DEFAULT_OPTIMIZER = "adam"
DEFAULT_LOSS = "sparse_categorical_crossentropy"
DEFAULT_METRICS: tuple[str, ...] = ("accuracy",)


#: The schema version the decider writes, per event type (1 unless named here); `upcasters()` lifts every
#: older version to it when an event is read.
EVENT_VERSIONS: dict[str, int] = {"CommandRejected": 2, "DatasourceAnnounced": 2, "TrainingResultReported": 2,
                                   "InferenceRequested": 2}

#: What a result trained before calibration existed says about its exits (TrainingResultReported v1).
UNCALIBRATED_REASON = ("trained before tierflow calibrated exits: its confidence is the raw max(p) (temperature "
                       "1) and it has no exit frontier; serve it with typed limits, or train it again")


def event_version(event_type: str) -> int:
    return EVENT_VERSIONS.get(event_type, 1)


def upcasters() -> Upcasters:
    """The upcasting chain of every event type (v1 is the first version unless declared otherwise)."""
    ups = Upcasters()

    @ups.register("DatasourceAnnounced", 1)
    def _announced_and_used_ranges(payload: JSON) -> JSON:
        # v1 recorded the announced ranges only, and used them as they were; v2 records both (the control
        # bridge may make an announcement exact, streams/ranges.py) and why they differ.
        out = dict(payload)
        out.setdefault("announced_ranges", out.get("ranges"))
        out.setdefault("range_reasons", [])
        out.setdefault("warnings", [])
        return out

    @ups.register("CommandRejected", 1)
    def _reason_as_object(payload: JSON) -> JSON:
        # v1 carried the reason as a plain string; v2 names the error code and the field.
        out = dict(payload)
        reason = out.get("reason")
        if isinstance(reason, str):
            out["reason"] = {"code": "invalid", "message": reason, "field": None}
        return out

    @ups.register("TrainingResultReported", 1)
    def _uncalibrated(payload: JSON) -> JSON:
        # v2 carries the exit's calibration and (on a chain's top result) the chain's exit frontier; a result
        # reported before has neither: it compares the raw max(p), i.e. temperature 1.
        return {**payload, "exits": uncalibrated_exits(UNCALIBRATED_REASON)}

    @ups.register("InferenceRequested", 1)
    def _typed_limits(payload: JSON) -> JSON:
        # v2 says per tier what its limit is compared with; every v1 inference had typed limits on the raw
        # max(p), and sent no shadow samples.
        tiers = [{**t, "compare": "raw", "temperature": 1.0, "eps": DEFAULT_EPS, "predicted": None}
                 for t in payload.get("tiers") or []]
        return {**payload, "tiers": tiers, "shadow_fraction": 0.0, "target": None, "predicted": None}

    for event_type, version in EVENT_VERSIONS.items():
        if ups.current(event_type) != version:
            raise AssertionError(f"{event_type}: the decider writes v{version}, upcasters reach v"
                                 f"{ups.current(event_type)}")
    return ups


# --- field parsers ------------------------------------------------------------------------------------

def _obj(payload: Any) -> JSON:
    if not isinstance(payload, dict):
        raise Invalid("the body must be a JSON object", None)
    return payload


def req_id(payload: JSON, name: str) -> int:
    value = payload.get(name)
    if value is None:
        raise Invalid(f"'{name}' is required", name)
    return as_id(value, name)


def as_id(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise Invalid(f"'{name}' must be a positive integer id, got {value!r}", name)
    return value


def opt_id(payload: JSON, name: str) -> int | None:
    value = payload.get(name)
    return None if value is None else as_id(value, name)


def name_field(payload: JSON, name: str = "name", required: bool = True) -> str | None:
    value = payload.get(name)
    if value is None:
        if required:
            raise Invalid(f"'{name}' is required", name)
        return None
    if not isinstance(value, str):
        raise Invalid(f"'{name}' must be a string", name)
    value = value.strip()
    if not 1 <= len(value) <= NAME_MAX:
        raise Invalid(f"'{name}' must be 1 to {NAME_MAX} characters (got {len(value)})", name)
    return value


def text_field(payload: JSON, name: str, default: str | None = "", limit: int = 100_000) -> str | None:
    value = payload.get(name, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise Invalid(f"'{name}' must be a string", name)
    if len(value) > limit:
        raise Invalid(f"'{name}' is longer than {limit} characters", name)
    return value


def bool_field(payload: JSON, name: str, default: bool | None) -> bool | None:
    value = payload.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise Invalid(f"'{name}' must be true or false", name)
    return value


def expected_version(payload: JSON) -> int | None:
    value = payload.get("expected_version")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise Invalid("'expected_version' must be a positive integer", "expected_version")
    return value


# --- models -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelFields:
    name: str | None
    description: str | None
    imports: str | None
    code: str | None
    distributed: bool | None
    upper_id: int | None
    upper_id_given: bool


def parse_model(payload: Any, *, partial: bool) -> ModelFields:
    p = _obj(payload)
    code = text_field(p, "code", None, CODE_MAX)
    if not partial and (code is None or not code.strip()):
        raise Invalid("'code' is required: Keras model code (a Python snippet or a Keras JSON config)", "code")
    if code is not None and not code.strip():
        raise Invalid("'code' must not be empty", "code")
    imports = text_field(p, "imports", None if partial else "", 100_000)
    if partial and imports is not None and code is None:
        raise Invalid("changing 'imports' needs the model 'code' in the same request (both are built together)",
                      "imports")
    distributed = bool_field(p, "distributed", None if partial else False)
    upper_given = "upper_id" in p
    upper_id = opt_id(p, "upper_id")
    return ModelFields(
        name=name_field(p, required=not partial),
        description=text_field(p, "description", None if partial else ""),
        imports=imports,
        code=code,
        distributed=distributed,
        upper_id=upper_id,
        upper_id_given=upper_given,
    )


# --- configurations -----------------------------------------------------------------------------------

def parse_model_ids(payload: JSON, required: bool) -> list[int] | None:
    value = payload.get("model_ids")
    if value is None:
        if required:
            raise Invalid("'model_ids' is required: at least one model id", "model_ids")
        return None
    if not isinstance(value, list) or not value:
        raise Invalid("'model_ids' must be a non-empty list of model ids", "model_ids")
    ids = [as_id(v, "model_ids") for v in value]
    return list(dict.fromkeys(ids))


# --- deployments --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeploymentFields:
    configuration_id: int
    batch: int
    fit_options: JSON
    eval_options: JSON
    optimizer: str
    learning_rate: float | None
    loss: str
    metrics: list[str]
    loss_weights: list[float] | dict[str, float] | None
    #: The training's seed when the user wants it reproducible (tiers/train_plan.py `choose_seed`); None: drawn.
    seed: int | None = None

    def to_json(self) -> JSON:
        fields = {
            "configuration_id": self.configuration_id,
            "batch": self.batch,
            "fit_options": self.fit_options,
            "eval_options": self.eval_options,
            "optimizer": self.optimizer,
            "learning_rate": self.learning_rate,
            "loss": self.loss,
            "metrics": self.metrics,
            "loss_weights": self.loss_weights,
        }
        # Absent when not asked for: such a deployment's event is what it was before seeds could be asked for.
        return fields if self.seed is None else fields | {"seed": self.seed}


def _options(p: JSON, name: str, allowed: frozenset[str]) -> JSON:
    value = p.get(name)
    if value is None:
        return {}
    if isinstance(value, str):
        raise Invalid(
            f"'{name}' must be a JSON object such as {{\"epochs\": 5}}, not a string (strings are never evaluated)",
            name,
        )
    if not isinstance(value, dict):
        raise Invalid(f"'{name}' must be a JSON object", name)
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise Invalid(
            f"'{name}' has keys tierflow does not pass to Keras: {', '.join(unknown)} "
            f"(allowed: {', '.join(sorted(allowed))})",
            f"{name}.{unknown[0]}",
        )
    for key in ("epochs", "initial_epoch", "steps_per_epoch", "validation_steps", "validation_freq", "steps"):
        if key in value:
            v = value[key]
            low = 0 if key == "initial_epoch" else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise Invalid(f"'{name}.{key}' must be an integer >= {low}", f"{name}.{key}")
    if "shuffle" in value and not isinstance(value["shuffle"], bool):
        raise Invalid(f"'{name}.shuffle' must be true or false", f"{name}.shuffle")
    if "verbose" in value and value["verbose"] not in (0, 1, 2):
        raise Invalid(f"'{name}.verbose' must be 0, 1 or 2", f"{name}.verbose")
    if "class_weight" in value:
        cw = value["class_weight"]
        if not isinstance(cw, dict) or not all(_is_number(w) for w in cw.values()):
            raise Invalid(f"'{name}.class_weight' must map class labels to numbers", f"{name}.class_weight")
    return dict(value)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def parse_deployment(payload: Any) -> DeploymentFields:
    p = _obj(payload)
    configuration_id = req_id(p, "configuration_id")
    batch = p.get("batch", 32)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise Invalid(f"'batch' must be an integer >= 1, got {batch!r}", "batch")
    optimizer = p.get("optimizer")
    optimizer = DEFAULT_OPTIMIZER if optimizer is None else optimizer
    if not isinstance(optimizer, str) or optimizer.lower() not in OPTIMIZERS:
        raise Invalid(f"'optimizer' must be one of {', '.join(sorted(OPTIMIZERS))}, got {optimizer!r}", "optimizer")
    lr = p.get("learning_rate")
    if lr is not None and (not _is_number(lr) or lr <= 0 or lr > 10):
        raise Invalid(f"'learning_rate' must be a number in (0, 10], got {lr!r}", "learning_rate")
    loss = p.get("loss")
    loss = DEFAULT_LOSS if loss is None else loss
    if not isinstance(loss, str) or not loss.replace("_", "").isalnum():
        raise Invalid("'loss' must be the name of a Keras loss, e.g. sparse_categorical_crossentropy", "loss")
    metrics = p.get("metrics")
    if metrics is None:
        metrics = list(DEFAULT_METRICS)
    if isinstance(metrics, str):
        metrics = [metrics]
    if not isinstance(metrics, list) or not all(isinstance(m, str) and m.replace("_", "").isalnum()
                                                for m in metrics):
        raise Invalid("'metrics' must be a list of Keras metric names, e.g. [\"accuracy\"]", "metrics")
    weights = p.get("loss_weights")
    loss_weights: list[float] | dict[str, float] | None
    if weights is None:
        loss_weights = None
    elif isinstance(weights, list) and weights and all(_is_number(w) and w >= 0 for w in weights):
        loss_weights = [float(w) for w in weights]
    elif isinstance(weights, dict) and weights and all(_is_number(w) and w >= 0 for w in weights.values()):
        for key in weights:
            try:
                as_id(int(key), "loss_weights")
            except ValueError:
                raise Invalid(f"'loss_weights' keys must be model ids, got {key!r}", "loss_weights") from None
        loss_weights = {str(int(k)): float(w) for k, w in weights.items()}
        if len(loss_weights) != len(weights):
            raise Invalid("'loss_weights' names the same model twice", "loss_weights")
    else:
        raise Invalid("'loss_weights' must be a list of non-negative numbers (one per exit) "
                      "or an object {model_id: weight}", "loss_weights")
    seed = p.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT):
        raise Invalid(f"'seed' must be an integer in [0, {SEED_LIMIT}), got {seed!r}", "seed")
    return DeploymentFields(
        configuration_id=configuration_id,
        batch=batch,
        fit_options=_options(p, "fit_options", FIT_OPTION_KEYS),
        eval_options=_options(p, "eval_options", EVAL_OPTION_KEYS),
        optimizer=optimizer.lower(),
        learning_rate=float(lr) if lr is not None else None,
        loss=loss,
        metrics=list(metrics),
        loss_weights=loss_weights,
        seed=seed,
    )


# --- training reports (sent by the orchestrator and the training workloads) ---------------------------

def parse_workload(payload: JSON) -> str:
    workload = payload.get("workload")
    if not isinstance(workload, str) or not workload:
        raise Invalid("'workload' must name the launched workload", "workload")
    return workload


def parse_training_started(payload: JSON) -> tuple[int | None, JSON]:
    """The seed and the sample counts a training workload starts with."""
    samples = payload.get("samples") or {}
    seed = payload.get("seed")
    if not isinstance(samples, dict) or (seed is not None and not isinstance(seed, int)):
        raise Invalid("'samples' must be an object and 'seed' an integer", "samples")
    return seed, samples


def metrics_object(value: Any, field_name: str) -> JSON:
    if not isinstance(value, dict):
        raise Invalid(f"'{field_name}' must be an object of metrics", field_name)
    return value


def parse_progress(payload: JSON) -> tuple[int, int | None, JSON]:
    """The epoch, the epochs planned and the metrics (by result id) of a progress report."""
    epoch, epochs = payload.get("epoch"), payload.get("epochs")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
        raise Invalid("'epoch' must be an integer >= 1", "epoch")
    if epochs is not None and (not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < epoch):
        raise Invalid("'epochs' must be an integer >= epoch", "epochs")
    return epoch, epochs, metrics_object(payload.get("metrics"), "metrics")


def parse_trained(payload: JSON) -> tuple[JSON, JSON]:
    """The metrics and the artefact references (each with its sha256; `keras` required) of a trained result."""
    metrics = metrics_object(payload.get("metrics"), "metrics")
    artefacts = metrics_object(payload.get("artefacts") or {}, "artefacts")
    for kind, ref in artefacts.items():
        sha = ref.get("sha256") if isinstance(ref, dict) else None
        if not isinstance(sha, str) or len(sha) != 64 or any(ch not in "0123456789abcdef" for ch in sha):
            raise Invalid(f"artefact '{kind}' needs a sha256 (64 lowercase hex digits)", f"artefacts.{kind}")
    if "keras" not in artefacts:
        raise Invalid("a trained result needs its 'keras' artefact", "artefacts")
    return metrics, artefacts


#: The keys of one exit's calibration (tiers/calibration.py `ExitCalibration`, plus the split it was measured on).
CALIBRATION_KEYS: frozenset[str] = frozenset(
    {"exit", "temperature", "accuracy", "ece_before", "ece_after", "nll_before", "nll_after", "n_fit",
     "n_measured", "n_bins", "measured_on"})
#: The most JSON an `exits` field may take in a report (the writer stays well under: tiers/exit_report.py).
EXITS_MAX_BYTES = 900_000


def uncalibrated_exits(reason: str) -> JSON:
    """The `exits` field of a result that has no calibration and no frontier, saying why."""
    return {"temperature": 1.0, "calibration": None, "cost_s": None, "frontier": None, "reason": reason}


def _exits_number(value: Any, field_name: str, lo: float, hi: float) -> float:
    if not _is_number(value) or not lo <= value <= hi:
        raise Invalid(f"'{field_name}' must be a number in [{lo:g}, {hi:g}], got {value!r}", field_name)
    return float(value)


def parse_result_exits(value: Any) -> JSON:
    """The `exits` field of a ReportTrainingResult (absent: the result is uncalibrated, see docs/commands.md):
    `{temperature, calibration: {...} | null, cost_s | null, frontier: record | null, reason | null}`.

    Checks each field (a frontier record with streams/exits.py `parse_frontier`) and returns the field as the
    TrainingResultReported event holds it; what needs the result's chain is checked by the decider."""
    if value is None:
        return uncalibrated_exits("the training workload reported no calibration for this result")
    if not isinstance(value, dict):
        raise Invalid("'exits' must be an object {temperature, calibration, cost_s, frontier, reason}", "exits")
    unknown = sorted(set(value) - {"temperature", "calibration", "cost_s", "frontier", "reason"})
    if unknown:
        raise Invalid(f"'exits' has unknown keys: {', '.join(unknown)}", f"exits.{unknown[0]}")
    temperature = _exits_number(value.get("temperature", 1.0), "exits.temperature", 1e-6, 1e6)
    cal = value.get("calibration")
    if cal is not None:
        if not isinstance(cal, dict) or set(cal) != CALIBRATION_KEYS:
            raise Invalid(f"'exits.calibration' must be an object with exactly {', '.join(sorted(CALIBRATION_KEYS))}",
                          "exits.calibration")
        for key in ("accuracy", "ece_before", "ece_after"):
            _exits_number(cal[key], f"exits.calibration.{key}", 0.0, 1.0)
        for key in ("nll_before", "nll_after"):
            _exits_number(cal[key], f"exits.calibration.{key}", 0.0, 1e6)
        for key in ("exit", "n_fit", "n_measured", "n_bins"):
            v = cal[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "exit" else 1):
                raise Invalid(f"'exits.calibration.{key}' must be a {'non-negative' if key == 'exit' else 'positive'} "
                              f"integer, got {v!r}", f"exits.calibration.{key}")
        if cal["measured_on"] not in ("test", "validation"):
            raise Invalid("'exits.calibration.measured_on' must be test or validation", "exits.calibration.measured_on")
        if cal["temperature"] != temperature:
            raise Invalid("'exits.calibration.temperature' differs from 'exits.temperature'", "exits.temperature")
    cost = value.get("cost_s")
    if cost is not None:
        cost = _exits_number(cost, "exits.cost_s", 0.0, 1e6)
    reason = value.get("reason")
    if reason is not None and (not isinstance(reason, str) or not reason.strip()):
        raise Invalid("'exits.reason' must say why there is no calibration or frontier", "exits.reason")
    frontier = value.get("frontier")
    if frontier is not None:
        if len(orjson.dumps(frontier)) > EXITS_MAX_BYTES:
            raise Invalid(f"'exits.frontier' is larger than {EXITS_MAX_BYTES} bytes of JSON", "exits.frontier")
        try:
            parse_frontier(frontier)
        except ExitsError as exc:
            raise Invalid(exc.message, f"exits.frontier.{exc.field}" if exc.field else "exits.frontier") from None
    if cal is None and reason is None:
        raise Invalid("'exits.reason' must say why the result has no calibration", "exits.reason")
    return {"temperature": temperature, "calibration": None if cal is None else dict(cal), "cost_s": cost,
            "frontier": frontier, "reason": None if reason is None else reason[:2000]}


def parse_failure_reason(payload: JSON) -> str:
    reason = payload.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise Invalid("'reason' must say why the training failed", "reason")
    return reason[:20_000]


# --- datasources --------------------------------------------------------------------------------------

def input_format_field(value: Any) -> str:
    if value not in ("RAW", "AVRO"):
        raise Invalid(f"'input_format' must be RAW or AVRO, got {value!r}", "input_format")
    return str(value)


#: The most ranges one announcement may name (a sink names one per partition of its topic): the control bridge
#: checks each one on the broker within a time bound, so an announcement cannot be made arbitrarily long.
MAX_RANGES = 1024


def _range_list(value: Any, name: str, reserved: frozenset[str] | None) -> list[JSON]:
    if not isinstance(value, list) or not value or not all(
            isinstance(r, dict) and isinstance(r.get("topic"), str) and r["topic"]
            and all(isinstance(r.get(k), int) and not isinstance(r.get(k), bool) and r[k] >= 0
                    for k in ("partition", "start", "end")) and r["start"] <= r["end"] for r in value):
        raise Invalid(f"'{name}' must list {{topic, partition, start, end}} with 0 <= start <= end", name)
    if len(value) > MAX_RANGES:
        raise Invalid(f"'{name}' names {len(value)} ranges; at most {MAX_RANGES} are accepted", name)
    for i, r in enumerate(value):
        topic_name(r["topic"], f"{name}[{i}].topic", reserved)
    return [{"topic": r["topic"], "partition": r["partition"], "start": r["start"], "end": r["end"]} for r in value]


def _texts(value: Any, name: str) -> list[str]:
    texts = value or []
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise Invalid(f"'{name}' must be a list of strings", name)
    return list(texts)


def parse_ranges_used(payload: JSON, reserved: frozenset[str] | None = None) -> JSON:
    """`ranges` (the ones used), `announced_ranges`, `range_reasons` and `warnings` of an announcement.

    The control bridge may use other ranges than the sink announced (streams/ranges.py): each used range
    names the same partition as the announced one at its index, moves its ends only forward, and a
    difference needs a reason. Without `announced_ranges`, the ranges are used as announced.
    """
    used = _range_list(payload.get("ranges"), "ranges", reserved)
    announced = used if payload.get("announced_ranges") is None else _range_list(
        payload.get("announced_ranges"), "announced_ranges", reserved)
    reasons = _texts(payload.get("range_reasons"), "range_reasons")
    if len(announced) != len(used):
        raise Invalid(f"'announced_ranges' has {len(announced)} ranges and 'ranges' {len(used)}; each used range "
                      "is one announced range", "announced_ranges")
    for i, (a, u) in enumerate(zip(announced, used, strict=True)):
        if (a["topic"], a["partition"]) != (u["topic"], u["partition"]):
            raise Invalid(f"ranges[{i}] names {u['topic']}[{u['partition']}], announced_ranges[{i}] "
                          f"{a['topic']}[{a['partition']}]: a used range reads the partition announced", f"ranges[{i}]")
        if u["start"] < a["start"] or u["end"] < a["end"]:
            raise Invalid(f"ranges[{i}] starts or ends before the announced range: a used range only moves its "
                          "ends forward (to a record batch's end)", f"ranges[{i}]")
    if announced != used and not reasons:
        raise Invalid("'ranges' differs from 'announced_ranges' without a reason in 'range_reasons'", "range_reasons")
    return {"ranges": used, "announced_ranges": announced, "range_reasons": reasons,
            "warnings": _texts(payload.get("warnings"), "warnings")}


def parse_announcement(payload: JSON, reserved: frozenset[str] | None = None) -> JSON:
    """The fields of the DatasourceAnnounced event (v2) for an announcement, as the decider records them.

    `reserved`: the topics no range may read (`reserved_topics`; the default stack's when None).
    """
    p = payload
    ranges = parse_ranges_used(p, reserved)
    input_format_field(p.get("input_format"))
    if not isinstance(p.get("input_config", {}), dict):
        raise Invalid("'input_config' must be a JSON object", "input_config")
    for rate in ("validation_rate", "test_rate"):
        value = p.get(rate, 0) or 0
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
            raise Invalid(f"'{rate}' must be a number in [0, 1), got {value!r}", rate)
    if (p.get("validation_rate") or 0) + (p.get("test_rate") or 0) >= 1:
        raise Invalid("validation_rate + test_rate must leave data for training (< 1)", "test_rate")
    if not isinstance(p.get("description", ""), str):
        raise Invalid("'description' must be a string", "description")
    return ranges | {k: p.get(k) for k in ("input_format", "total_msg", "origin")} | {
        "input_config": p.get("input_config") or {}, "description": p.get("description") or "",
        "validation_rate": float(p.get("validation_rate") or 0), "test_rate": float(p.get("test_rate") or 0),
    }


# --- inferences ---------------------------------------------------------------------------------------

#: Kafka keeps topics whose names start with this for itself (`__consumer_offsets`, `__transaction_state`).
KAFKA_INTERNAL_PREFIX = "__"


def reserved_topics(kafka: KafkaSettings) -> frozenset[str]:
    """The topics no user-supplied topic name may be: the control plane's commands, events and dead letters,
    the datasource control topic and the stem of the inferences' shadow topics, for these settings and for the
    defaults (another stack on the same broker may use those). Names starting with `KAFKA_INTERNAL_PREFIX`,
    and a reserved name followed by `.<number>` (an inference's shadow topic, `<prefix>.shadow.<id>`), are
    refused as well."""
    names: set[str] = set()
    for k in (kafka, KafkaSettings()):
        names |= {k.commands_topic, k.events_topic, k.deadletter_topic, k.control_topic, k.shadow_topics}
    return frozenset(names)


def _is_reserved(value: str, reserved: frozenset[str]) -> bool:
    stem, _, number = value.rpartition(".")
    return (value in reserved or value.startswith(KAFKA_INTERNAL_PREFIX)
            or (number.isascii() and number.isdigit() and stem in reserved))


#: The reserved topics of a stack with the default settings (what a caller that passes none gets).
DEFAULT_RESERVED: frozenset[str] = reserved_topics(KafkaSettings())


def topic_name(value: Any, field_name: str, reserved: frozenset[str] | None = None,
               required: bool = True) -> str | None:
    """A Kafka topic a user names (the one check of topic names: the API and the decider both call it).

    An answer written to tierflow's event log stops the control plane for good, so the reserved topics
    (`reserved_topics`; the default stack's when `reserved` is None) and Kafka's internal ones are refused.
    """
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > 249 or any(c.isspace() for c in value):
        raise Invalid(f"'{field_name}' must be a Kafka topic name (1-249 characters, no spaces)", field_name)
    if _is_reserved(value, DEFAULT_RESERVED if reserved is None else reserved):
        raise Invalid(f"'{field_name}' is {value!r}, a reserved topic: tierflow's commands, events and dead letters, "
                      "the datasource control topic, the inferences' shadow topics and Kafka's internal topics "
                      f"('{KAFKA_INTERNAL_PREFIX}...') cannot be named; choose another topic", field_name)
    return value


#: Default share of its answers a non-top tier also sends up as shadow samples (the live agreement check).
DEFAULT_SHADOW_FRACTION = 0.02


def limit_field(value: Any, field_name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 2:
        raise Invalid(f"'{field_name}' must be a number in [0, 2] (> 1 sends every sample to the top tier)",
                      field_name)
    return float(value)


def replicas_field(value: Any, field_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
        raise Invalid(f"'{field_name}' must be an integer from 1 to 64", field_name)
    return value


@dataclass(frozen=True)
class TierFields:
    limit: float
    upper_topic: str | None  # None: the top tier, or the name the decider gives it
    bootstrap_servers: str | None
    replicas: int


@dataclass(frozen=True)
class InferenceFields:
    input_topic: str
    output_topic: str
    limit: float
    #: result id (as the JSON key) -> limit, as sent
    limits: JSON
    #: result id -> its tier's overrides {result_id, bootstrap_servers?, replicas?, limit?, upper_topic?}
    overrides: dict[int, JSON]
    replicas: int
    bootstrap_servers: str | None
    #: Limits chosen from this target instead of typed ones (the decider picks them from the frontier)
    target: Target | None = None
    #: result id -> a cost per sample overriding the measured one (only with a target)
    costs_s: dict[int, float] | None = None
    #: share of the inputs a non-top tier answered that it also sends up as shadow samples
    shadow_fraction: float = DEFAULT_SHADOW_FRACTION

    def tier(self, k: int, result_id: int, *, top: bool, reserved: frozenset[str] | None = None) -> TierFields:
        """The settings of tier `k` (serving `result_id`): its override, else the inference's defaults."""
        o = self.overrides.get(result_id, {})
        limit = limit_field(o["limit"], f"tiers[{k}].limit") if "limit" in o else (
            float(self.limits[str(result_id)]) if str(result_id) in self.limits else self.limit)
        upper = None if top else topic_name(o.get("upper_topic"), f"tiers[{k}].upper_topic", reserved,
                                            required=False)
        servers = o.get("bootstrap_servers", self.bootstrap_servers)
        if servers is not None and not isinstance(servers, str):
            raise Invalid(f"'tiers[{k}].bootstrap_servers' must be a string", f"tiers[{k}].bootstrap_servers")
        replicas = replicas_field(o.get("replicas", self.replicas), f"tiers[{k}].replicas")
        return TierFields(limit=limit, upper_topic=upper, bootstrap_servers=servers, replicas=replicas)


def shadow_fraction_field(value: Any) -> float:
    if value is None:
        return DEFAULT_SHADOW_FRACTION
    if not _is_number(value) or not 0 <= value <= 1:
        raise Invalid(f"'shadow_fraction' must be a number in [0, 1], got {value!r}", "shadow_fraction")
    return float(value)


def target_field(value: Any) -> Target:
    """The `target` of a RequestInference (streams/exits.py `parse_target`), as a catalogue error."""
    try:
        return parse_target(value)
    except ExitsError as exc:
        raise Invalid(exc.message, exc.field or "target") from None


def _costs_field(p: JSON, overrides: list[JSON], tier_ids: list[int]) -> dict[int, float]:
    """`costs_s: {"<result id>": seconds}` and `tiers[i].cost_s`, by result id."""
    raw = p.get("costs_s") or {}
    if not isinstance(raw, dict):
        raise Invalid("'costs_s' must map result ids to seconds per sample", "costs_s")
    costs: dict[int, float] = {}
    for key, value in raw.items():
        if not str(key).isdigit() or int(key) not in tier_ids:
            raise Invalid(f"'costs_s' names result {key}, which is not a tier of this inference ({tier_ids})",
                          "costs_s")
        costs[int(key)] = _cost(value, f"costs_s.{key}")
    for i, o in enumerate(overrides):  # result ids already checked
        if "cost_s" in o:
            costs[int(o["result_id"])] = _cost(o["cost_s"], f"tiers[{i}].cost_s")
    return costs


def _cost(value: Any, field_name: str) -> float:
    if not _is_number(value) or value < 0:
        raise Invalid(f"'{field_name}' must be a non-negative number of seconds per sample, got {value!r}",
                      field_name)
    return float(value)


def parse_inference(payload: JSON, tier_ids: list[int], reserved: frozenset[str] | None = None) -> InferenceFields:
    """The topics, limits (or target), replicas and per-tier overrides of a RequestInference.

    `tier_ids`: the results the inference serves, entry first (the decider resolves them from the entry
    result's chain); limits and overrides may name only those. `reserved`: the topics none may name.
    A `target` replaces `limit`/`limits`/`tiers[].limit` (giving both is refused); `costs_s` only goes with it.
    """
    p = payload
    input_topic = topic_name(p.get("input_topic"), "input_topic", reserved)
    output_topic = topic_name(p.get("output_topic"), "output_topic", reserved)
    assert input_topic is not None and output_topic is not None
    target = None if p.get("target") is None else target_field(p["target"])
    default_limit = limit_field(p.get("limit", 0.8), "limit")
    limits = p.get("limits") or {}
    if not isinstance(limits, dict):
        raise Invalid("'limits' must map result ids to limits", "limits")
    for key, value in limits.items():
        if not str(key).isdigit() or int(key) not in tier_ids:
            raise Invalid(f"'limits' names result {key}, which is not a tier of this inference ({tier_ids})",
                          "limits")
        limit_field(value, f"limits.{key}")
    overrides = p.get("tiers") or []
    if not isinstance(overrides, list) or not all(isinstance(o, dict) for o in overrides):
        raise Invalid("'tiers' must be a list of objects {result_id, bootstrap_servers?, replicas?, limit?, "
                      "upper_topic?, cost_s?}", "tiers")
    by_result: dict[int, JSON] = {}
    for i, o in enumerate(overrides):
        rid = as_id(o.get("result_id"), f"tiers[{i}].result_id")
        if rid not in tier_ids:
            raise Invalid(f"'tiers[{i}]' names result {rid}, which is not a tier of this inference ({tier_ids})",
                          f"tiers[{i}].result_id")
        by_result[rid] = o
    default_replicas = replicas_field(p.get("replicas", 1), "replicas")
    default_servers = p.get("bootstrap_servers")
    if default_servers is not None and not isinstance(default_servers, str):
        raise Invalid("'bootstrap_servers' must be a string host:port[,host:port]", "bootstrap_servers")
    costs = _costs_field(p, overrides, tier_ids)
    if target is not None:
        typed = [name for name in ("limit", "limits") if p.get(name) is not None] + [
            f"tiers[{i}].limit" for i, o in enumerate(overrides) if "limit" in o]
        if typed:
            raise Invalid(f"give either a 'target' or typed limits, not both (this request has 'target' and "
                          f"'{typed[0]}')", "target")
    elif costs:
        raise Invalid("cost overrides ('costs_s', 'tiers[].cost_s') only apply to limits chosen from a 'target'",
                      "costs_s")
    return InferenceFields(input_topic=input_topic, output_topic=output_topic, limit=default_limit, limits=limits,
                           overrides=by_result, replicas=default_replicas, bootstrap_servers=default_servers,
                           target=target, costs_s=costs or None,
                           shadow_fraction=shadow_fraction_field(p.get("shadow_fraction")))
