"""The command and event catalogue: names, schema versions, and field-level parsing of command payloads.

Pure code. The API parses request bodies with these functions to answer 422 naming the field before a
command is even sent; the decider parses every command again (commands may be produced straight to
Kafka) and rejects what does not parse. docs/commands.md documents the same shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tierflow.streams.envelope import JSON, Upcasters


class Invalid(ValueError):
    """A command field is wrong. `code` says what the API answers: invalid -> 422, not_found -> 404,
    conflict -> 409."""

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
DEFAULT_OPTIMIZER = "adam"
DEFAULT_LOSS = "sparse_categorical_crossentropy"
DEFAULT_METRICS: tuple[str, ...] = ("accuracy",)


def upcasters() -> Upcasters:
    """The upcasting chain of every event type (v1 is the first version unless declared otherwise)."""
    ups = Upcasters()

    @ups.register("CommandRejected", 1)
    def _reason_as_object(payload: JSON) -> JSON:
        # v1 carried the reason as a plain string; v2 names the error code and the field.
        out = dict(payload)
        reason = out.get("reason")
        if isinstance(reason, str):
            out["reason"] = {"code": "invalid", "message": reason, "field": None}
        return out

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

    def to_json(self) -> JSON:
        return {
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
    )
