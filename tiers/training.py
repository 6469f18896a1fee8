"""Joint training of a chain of sub-models (edge -> fog -> cloud, or one plain model), and its artefacts.

Called by the training workload (`tierflow.tiers.train_job`); the tier agents call `load_keras` to load a
trained sub-model. Two halves:

* pure planning (no TensorFlow): the seeded train/validation/test split, the options a deployment asks for
  mapped onto Keras arguments, the loss weight of each exit, and Keras' metric names mapped back to exits.
  The unit tests import these without TensorFlow.
* the TensorFlow side, imported lazily through `keras_code.load_keras()` (TF_USE_LEGACY_KERAS must be set
  before TensorFlow is first imported): chaining the sub-models into one global model whose outputs are
  every exit's probabilities, compiling it with one loss per exit, `fit` / `evaluate`, and exporting each
  trained sub-model as a `.keras` file and (non-top sub-models, for devices) a LiteRT flatbuffer.

The global model shares its layers with the sub-models, so training it trains them: each sub-model is
exported as it was written, with its own input and outputs.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from tierflow.streams.errors import PermanentError
from tierflow.streams.wire import shape_text
from tierflow.tiers.data import reshape_for
from tierflow.tiers.engines import H5_REFUSED, HDF5_MAGIC
from tierflow.tiers.keras_code import load_keras as _tf_and_keras

JSON = dict[str, Any]
#: One exit's metrics as Keras names them (`loss`, `accuracy`, `val_loss`, `val_accuracy`, ...).
Metrics = dict[str, float]
Indices = npt.NDArray[np.int64]

#: Name of the identity layer that marks exit i of the global model; Keras prefixes the exit's metrics with it.
EXIT_PREFIX = "tierflow_exit_"
#: Format recorded for the Keras artefact: `.keras` reloads under tf-keras with identical outputs even with
#: `tf.nn.*` activations (measured; see tests/integration/test_training.py); `.h5` is neither written nor read
#: (`load_keras`).
KERAS_FORMAT = "keras"

#: Optimizer names a deployment may give (streams/catalogue.py OPTIMIZERS) -> tf-keras class names.
#: `keras.optimizers.get("adamw")` does not know AdamW, so the classes are named explicitly.
OPTIMIZER_CLASSES: dict[str, str] = {
    "adam": "Adam", "adamw": "AdamW", "sgd": "SGD", "rmsprop": "RMSprop", "adagrad": "Adagrad",
    "adadelta": "Adadelta", "adamax": "Adamax", "nadam": "Nadam", "ftrl": "Ftrl",
}
#: fit_options passed to `fit` as they are (class_weight is turned into sample weights: Keras refuses
#: class_weight for models with several outputs).
FIT_PASSTHROUGH = ("epochs", "shuffle", "initial_epoch", "steps_per_epoch", "validation_steps",
                   "validation_freq", "verbose")
EVAL_PASSTHROUGH = ("steps", "verbose")
_ZIP_MAGIC = b"PK\x03\x04"
#: How much of a TensorFlow error message a failure reason keeps.
MAX_REASON_CHARS = 1000


class TrainingSetupError(PermanentError, ValueError):
    """The models, the data and the deployment's options cannot train together; the message says what to change.

    Permanent: retrying the same training fails the same way.
    """


# -- pure planning ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingOptions:
    """Everything `train` needs besides the models and the data (from the deployment and the datasource)."""

    batch: int = 32
    fit_options: JSON = field(default_factory=dict)
    eval_options: JSON = field(default_factory=dict)
    optimizer: str = "adam"
    learning_rate: float | None = None
    loss: str = "sparse_categorical_crossentropy"
    metrics: list[str] = field(default_factory=lambda: ["accuracy"])
    loss_weights: list[float] | dict[str, float] | None = None
    #: The key of each exit (bottom first) in a `loss_weights` object: the deployment keys it by model id.
    exit_keys: list[int] = field(default_factory=list)
    validation_rate: float = 0.0
    test_rate: float = 0.0
    #: Seeds the split, the weights' initialisation, per-epoch shuffling and dropout (`seed_randomness`).
    seed: int = 0
    #: TensorFlow's deterministic kernels too: set when someone asked for this seed, so that a second training
    #: gives the same weights bit for bit. Its price, measured on 2 cores with the demo's chain (5 epochs, CPU
    #: time of `train`): +0.4 s (+21%) on the digits' 1,438 samples, +0.5 s (+7.5%) on 14,380.
    deterministic: bool = False

    @property
    def epochs(self) -> int:
        return int(self.fit_options.get("epochs", 1))

    @classmethod
    def from_deployment(cls, deployment: Mapping[str, Any], datasource: Mapping[str, Any], *,
                        exit_keys: Sequence[int], seed: int, deterministic: bool = False) -> TrainingOptions:
        """The options of `GET /deployments/{id}` and `GET /datasources` items, with the defaults of Kafka-ML."""
        validation_rate = _rate(datasource.get("validation_rate"), "validation_rate")
        test_rate = _rate(datasource.get("test_rate"), "test_rate")
        if validation_rate + test_rate >= 1:
            raise TrainingSetupError(
                f"the datasource's validation_rate ({validation_rate:g}) and test_rate ({test_rate:g}) leave no "
                "samples to train on; announce rates that sum to less than 1"
            )
        metrics = deployment.get("metrics")
        return cls(
            batch=int(deployment.get("batch") or 32),
            fit_options=dict(deployment.get("fit_options") or {}),
            eval_options=dict(deployment.get("eval_options") or {}),
            optimizer=str(deployment.get("optimizer") or "adam").lower(),
            learning_rate=None if deployment.get("learning_rate") is None else float(deployment["learning_rate"]),
            loss=str(deployment.get("loss") or "sparse_categorical_crossentropy"),
            metrics=["accuracy"] if metrics is None else [str(m) for m in metrics],
            loss_weights=deployment.get("loss_weights"),
            exit_keys=[int(k) for k in exit_keys],
            validation_rate=validation_rate,
            test_rate=test_rate,
            seed=int(seed),
            deterministic=deterministic,
        )


def _rate(value: Any, name: str) -> float:
    rate = 0.0 if value is None else float(value)
    if not 0 <= rate < 1:
        raise TrainingSetupError(f"the datasource's {name} is {rate:g}; it must be in [0, 1)")
    return rate


def split_sizes(n: int, validation_rate: float, test_rate: float) -> tuple[int, int, int]:
    """(train, validation, test) sample counts; a positive rate always gets at least one sample."""

    def count(rate: float) -> int:
        return 0 if rate <= 0 else max(1, round(n * rate))

    n_val, n_test = count(validation_rate), count(test_rate)
    n_train = n - n_val - n_test
    if n_train < 1:
        raise TrainingSetupError(
            f"{n} sample(s) with validation_rate {validation_rate:g} and test_rate {test_rate:g} leave none to "
            "train on; send more data"
        )
    return n_train, n_val, n_test


def split(n: int, validation_rate: float, test_rate: float, seed: int) -> tuple[Indices, Indices, Indices]:
    """(train_idx, val_idx, test_idx): a seeded permutation of range(n) cut by the rates.

    Shuffling comes before the cut because records arrive grouped by class (keyed by label, read
    partition by partition); the seed is recorded with the result so the split can be reproduced.
    """
    _, n_val, n_test = split_sizes(n, validation_rate, test_rate)
    order = np.random.default_rng(seed).permutation(n).astype(np.int64)
    return order[n_val + n_test:], order[n_test:n_test + n_val], order[:n_test]


def exit_loss_weights(loss_weights: list[float] | Mapping[str, float] | None,
                      exit_keys: Sequence[int]) -> list[float] | None:
    """The loss weight of each exit, bottom first, or None for Keras' default (all 1).

    A list gives one weight per exit; an object maps an exit's key (`exit_keys`, the model id in a
    deployment) to its weight, and exits it does not name weigh 1. One exit needs no weight: a list of
    another length is then ignored (a deployment's list is sized for its chains, not its single models).
    """
    if loss_weights is None:
        return None
    if isinstance(loss_weights, Mapping):
        return [float(loss_weights.get(str(key), 1.0)) for key in exit_keys]
    weights = [float(w) for w in loss_weights]
    if len(weights) == len(exit_keys):
        return weights
    if len(exit_keys) == 1:
        return None
    raise TrainingSetupError(
        f"loss_weights gives {len(weights)} weight(s) but the chain has {len(exit_keys)} exits (models "
        f"{', '.join(map(str, exit_keys))}, bottom first); give one weight per exit or an object "
        "{model_id: weight}"
    )


def fit_arguments(options: TrainingOptions) -> JSON:
    """Keyword arguments of `fit` for the deployment's fit_options and batch (silent unless asked)."""
    kwargs: JSON = {"batch_size": options.batch, "epochs": 1, "verbose": 0}
    kwargs.update({k: options.fit_options[k] for k in FIT_PASSTHROUGH if k in options.fit_options})
    return kwargs


def evaluate_arguments(options: TrainingOptions) -> JSON:
    kwargs: JSON = {"batch_size": options.batch, "verbose": 0}
    kwargs.update({k: options.eval_options[k] for k in EVAL_PASSTHROUGH if k in options.eval_options})
    return kwargs


def class_sample_weights(y: npt.NDArray[Any], class_weight: Mapping[str, float] | None) -> npt.NDArray[Any] | None:
    """Per-sample weights for `fit_options.class_weight` ({label: weight}; JSON keys are strings)."""
    if not class_weight:
        return None
    labels = np.asarray(y).reshape(len(y), -1)
    if labels.shape[1] != 1:
        # One-hot labels: the class is the argmax.
        labels = labels.argmax(axis=1).reshape(-1, 1)
    table = {str(int(k)) if _is_int_like(k) else str(k): float(w) for k, w in class_weight.items()}
    return np.array([table.get(str(int(v)), 1.0) for v in labels[:, 0]], dtype=np.float32)


def _is_int_like(key: Any) -> bool:
    try:
        int(key)
    except (TypeError, ValueError):
        return False
    return True


def exit_name(index: int) -> str:
    return f"{EXIT_PREFIX}{index}"


def metrics_per_exit(logs: Mapping[str, Any], n_exits: int) -> list[Metrics]:
    """Keras' logs (`tierflow_exit_1_accuracy`, `val_tierflow_exit_1_loss`, `loss`, ...) -> one dict per exit.

    With one output Keras does not prefix the names, so every metric belongs to the only exit. With several,
    the global `loss` / `val_loss` (the weighted sum) belong to no exit and are left out.
    """
    per_exit: list[Metrics] = [{} for _ in range(n_exits)]
    for key, value in logs.items():
        val = key.startswith("val_")
        name = key[4:] if val else key
        for i in range(n_exits):
            prefix = exit_name(i) + "_"
            if name.startswith(prefix):
                per_exit[i][("val_" if val else "") + name[len(prefix):]] = float(value)
                break
        else:
            if n_exits == 1:
                per_exit[0][key] = float(value)
    return per_exit


def split_validation(metrics: Mapping[str, float]) -> tuple[Metrics, Metrics]:
    """({"loss", "accuracy"}, {"loss", "accuracy"} of the validation data) from one exit's epoch metrics."""
    train = {k: v for k, v in metrics.items() if not k.startswith("val_")}
    validation = {k[4:]: v for k, v in metrics.items() if k.startswith("val_")}
    return train, validation


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Artefact:
    """A trained sub-model's file: `format` is "keras" or "tflite"."""

    data: bytes
    format: str

    @property
    def sha256(self) -> str:
        return sha256_hex(self.data)

    @property
    def size(self) -> int:
        return len(self.data)

    def describe(self) -> JSON:
        """The artefact reference of a ReportTrainingResult (the bytes travel by `PUT /artefacts`)."""
        ref: JSON = {"sha256": self.sha256, "size": self.size}
        if self.format != "tflite":
            ref["format"] = self.format
        return ref


class ProgressReporter(Protocol):
    """Told after every epoch; `epoch` counts from 1; `metrics` has one dict per exit, bottom first."""

    def progress(self, epoch: int, epochs: int, metrics: list[Metrics]) -> None: ...


def short_message(exc: BaseException) -> str:
    """An exception as one readable line: TensorFlow appends graph node dumps that a user cannot act on."""
    text = str(getattr(exc, "message", None) or exc)
    for marker in ("\n\t [[", "\n\t[[", " [[{{node", "\n\nCall arguments received"):
        text = text.split(marker, 1)[0]
    text = " ".join(text.split())
    if len(text) > MAX_REASON_CHARS:
        text = text[:MAX_REASON_CHARS] + " [...]"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- TensorFlow side -------------------------------------------------------------------------------------


def _shape(shape: Any) -> tuple[int | None, ...]:
    return tuple(None if d is None else int(d) for d in shape)


def _outputs(model: Any, tensors: Any) -> list[Any]:
    return list(tensors) if isinstance(tensors, list | tuple) else [tensors]


def seed_randomness(options: TrainingOptions) -> None:
    """Seed every generator a training draws from with `options.seed`: Python's, numpy's and TensorFlow's
    (`keras.utils.set_random_seed`), and with `options.deterministic` make TensorFlow pick deterministic
    kernels (`enable_op_determinism`: no thread-order-dependent reductions; an op without such a kernel raises).

    Called by the trainer before it builds the model code, so that the weights' initialisation follows the
    seed too, not only the split and `fit` (which `train` seeds again, whatever the model code drew)."""
    tf, keras = _tf_and_keras()
    keras.utils.set_random_seed(options.seed)
    if options.deterministic:
        tf.config.experimental.enable_op_determinism()


def build_global_model(sub_models: Sequence[Any]) -> Any:
    """One Keras model that chains `sub_models` (bottom first) and outputs every exit's probabilities.

    Each non-top sub-model's first output (the tensor to the next tier) feeds the next sub-model; each
    sub-model's last output is its exit. The exits pass through identity layers named `tierflow_exit_<i>`
    so Keras' metric names say which exit they belong to.
    """
    if not sub_models:
        raise TrainingSetupError("nothing to train: no sub-models")
    _, keras = _tf_and_keras()
    for model in sub_models:
        if not getattr(model, "inputs", None):
            raise TrainingSetupError(
                f"sub-model '{model.name}' has no defined input shape: start it with `keras.Input(shape=...)` or "
                "give its first layer `input_shape=...`"
            )
    names = [str(m.name) for m in sub_models]
    for i, model in enumerate(sub_models):
        if names.count(names[i]) > 1:
            # Keras needs unique layer names in one model; the sub-model's own name only labels it.
            model._name = f"{names[i]}_{i}"
    first = sub_models[0]
    inputs = keras.Input(shape=_shape(first.inputs[0].shape)[1:], name="tierflow_input")
    tensor = inputs
    exits = []
    for i, model in enumerate(sub_models):
        outs = _outputs(model, model(tensor))
        top = i == len(sub_models) - 1
        if not top:
            if len(outs) < 2:
                raise TrainingSetupError(
                    f"sub-model {i + 1} ('{model.name}') has {len(outs)} output but is not the top of the chain: a "
                    "non-top sub-model outputs [tensor_to_upper, probabilities]"
                )
            wanted = _shape(sub_models[i + 1].inputs[0].shape)[1:]
            given = _shape(outs[0].shape)[1:]
            if wanted != given:
                raise TrainingSetupError(
                    f"sub-model '{model.name}' forwards a {shape_text(given)} tensor but its upper model "
                    f"'{sub_models[i + 1].name}' takes {shape_text(wanted)}"
                )
            tensor = outs[0]
        exits.append(keras.layers.Identity(name=exit_name(i))(outs[-1]))
    return keras.Model(inputs=inputs, outputs=exits, name="tierflow_global")


def make_optimizer(name: str, learning_rate: float | None) -> Any:
    _, keras = _tf_and_keras()
    cls_name = OPTIMIZER_CLASSES.get(name.lower())
    if cls_name is None:
        raise TrainingSetupError(f"unknown optimizer {name!r}; use one of {', '.join(sorted(OPTIMIZER_CLASSES))}")
    cls = getattr(keras.optimizers, cls_name)
    return cls() if learning_rate is None else cls(learning_rate=learning_rate)


def compile_global(model: Any, *, optimizer: str, learning_rate: float | None, loss: str, metrics: list[str],
                   loss_weights: list[float] | dict[str, float] | None, exit_result_ids: list[int]) -> None:
    """Compile the global model: the named optimizer at `learning_rate`, one `loss` and `metrics` per exit.

    `exit_result_ids` are the keys of the exits, bottom first, in a `loss_weights` object (a deployment keys
    it by model id, so the training job passes the model id of each exit).
    """
    names = [exit_name(i) for i in range(len(model.outputs))]
    if len(exit_result_ids) != len(names):
        raise TrainingSetupError(f"{len(exit_result_ids)} exit keys for a model with {len(names)} exits")
    weights = exit_loss_weights(loss_weights, exit_result_ids)
    try:
        model.compile(
            optimizer=make_optimizer(optimizer, learning_rate),
            loss={name: loss for name in names},
            loss_weights=None if weights is None else dict(zip(names, weights, strict=True)),
            metrics={name: list(metrics) for name in names},
        )
    except ValueError as exc:  # an unknown loss or metric name
        raise TrainingSetupError(f"cannot compile the model: {short_message(exc)}") from exc


def _progress_callback(keras: Any, reporter: ProgressReporter, n_exits: int, epochs: int,
                       last: list[Metrics]) -> Any:
    class _Progress(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
            per_exit = metrics_per_exit(logs or {}, n_exits)
            for i, metrics in enumerate(per_exit):
                last[i].update(metrics)  # keeps the last validation figures when validation_freq > 1
            reporter.progress(epoch + 1, epochs, per_exit)

    return _Progress()


def train(models: Sequence[Any], x: npt.NDArray[Any], y: npt.NDArray[Any], options: TrainingOptions,
          reporter: ProgressReporter) -> list[JSON]:
    """Train the chain `models` (bottom first) jointly on (x, y); returns per exit, bottom first,
    `{"train": {...last epoch...}, "validation": {...}, "test": {...}}`.

    The data stays in memory for every epoch; samples are reshaped to the bottom model's input when the
    element counts agree (`tiers.data.reshape_for`, a `DataError` otherwise). The split is
    `split(len(x), ..., options.seed)`; validation runs when validation_rate > 0 and the test split is
    evaluated once after training (empty dicts when a split is empty). Keras errors the user can fix
    (labels out of range, a wrong loss for the labels) become `TrainingSetupError`.
    """
    tf, keras = _tf_and_keras()
    if len(x) != len(y):
        raise TrainingSetupError(f"{len(x)} samples but {len(y)} labels")
    exit_keys = options.exit_keys or list(range(len(models)))
    model = build_global_model(models)
    n_exits = len(model.outputs)
    x = reshape_for(x, _shape(model.inputs[0].shape))
    train_idx, val_idx, test_idx = split(len(x), options.validation_rate, options.test_rate, options.seed)
    compile_global(model, optimizer=options.optimizer, learning_rate=options.learning_rate, loss=options.loss,
                   metrics=options.metrics, loss_weights=options.loss_weights, exit_result_ids=exit_keys)
    names = [exit_name(i) for i in range(n_exits)]

    def targets(idx: Indices) -> dict[str, Any]:
        labels = y[idx]
        return {name: labels for name in names}

    fit_kwargs = fit_arguments(options)
    weights = class_sample_weights(y[train_idx], options.fit_options.get("class_weight"))
    if weights is not None:
        fit_kwargs["sample_weight"] = {name: weights for name in names}
    if len(val_idx):
        fit_kwargs["validation_data"] = (x[val_idx], targets(val_idx))
    last: list[Metrics] = [{} for _ in range(n_exits)]
    callback = _progress_callback(keras, reporter, n_exits, int(fit_kwargs["epochs"]), last)
    tf.random.set_seed(options.seed)  # dropout and per-epoch shuffling follow the recorded seed too
    try:
        model.fit(x[train_idx], targets(train_idx), callbacks=[callback], **fit_kwargs)
        tested = (model.evaluate(x[test_idx], targets(test_idx), return_dict=True, **evaluate_arguments(options))
                  if len(test_idx) else {})
    except (ValueError, TypeError, tf.errors.InvalidArgumentError) as exc:
        raise TrainingSetupError(f"training failed: {short_message(exc)}") from exc
    test_per_exit = metrics_per_exit(tested, n_exits) if tested else [{} for _ in range(n_exits)]
    results: list[JSON] = []
    for i in range(n_exits):
        trained, validation = split_validation(last[i])
        results.append({"train": trained, "validation": validation, "test": test_per_exit[i]})
    return results


@dataclass(frozen=True)
class ExitSplits:
    """Every exit's softmax outputs on the validation and test splits of a training (lowest tier first), the
    splits' labels, and each sub-model's measured compute per sample (CPU seconds)."""

    val_probs: list[npt.NDArray[np.float32]]
    val_labels: npt.NDArray[Any]
    test_probs: list[npt.NDArray[np.float32]]
    test_labels: npt.NDArray[Any]
    costs_s: list[float]


def exit_probabilities(models: Sequence[Any], x: npt.NDArray[Any], y: npt.NDArray[Any], options: TrainingOptions,
                       batch: int = 256) -> ExitSplits:
    """Run the trained chain `models` (bottom first) sub-model by sub-model over the validation and test
    splits of `train` (same reshape, same seeded split) and keep each exit's probabilities.

    Each sub-model is called directly in batches of `batch` (as a tier runs it; `predict` costs ~40 ms a
    call here), after one warm-up call, and its cost is the process CPU time of its calls divided by the
    samples: CPU time, because the machine is shared and wall time would measure the neighbours; the
    frontier only needs the costs relative to each other, and a user overrides them for their devices."""
    x = reshape_for(x, _shape(models[0].inputs[0].shape))
    _, val_idx, test_idx = split(len(x), options.validation_rate, options.test_rate, options.seed)
    k_exits = len(models)
    spent = [0.0] * k_exits
    samples = 0

    def run(idx: Indices) -> list[npt.NDArray[np.float32]]:
        nonlocal samples
        per_exit: list[list[npt.NDArray[np.float32]]] = [[] for _ in range(k_exits)]
        for start in range(0, len(idx), batch):
            tensor: Any = x[idx[start:start + batch]]
            for k, model in enumerate(models):
                began = time.process_time()
                outs = _outputs(model, model(tensor, training=False))
                probs = np.asarray(outs[-1], dtype=np.float32)
                tensor = outs[0] if k < k_exits - 1 else None
                spent[k] += time.process_time() - began
                per_exit[k].append(probs)
            samples += min(batch, len(idx) - start)
        return [np.concatenate(parts) if parts else np.zeros((0, 0), np.float32) for parts in per_exit]

    if len(val_idx) or len(test_idx):
        warm = x[(val_idx if len(val_idx) else test_idx)[:1]]
        for model in models:  # the first call of a Keras model builds its graph: not part of its cost
            warm = _outputs(model, model(warm, training=False))[0]
    val_probs, test_probs = run(val_idx), run(test_idx)
    costs = [t / samples for t in spent] if samples else [0.0] * k_exits
    return ExitSplits(val_probs, y[val_idx], test_probs, y[test_idx], costs)


def export_keras(sub_model: Any) -> Artefact:
    """The sub-model as a `.keras` file (it reloads with `load_keras` under tf-keras with identical outputs)."""
    with tempfile.TemporaryDirectory(prefix="tierflow-export-") as tmp:
        path = Path(tmp) / "model.keras"
        # "keras_v3", not the suffix: tf-keras decides by a thread-local flag that its own save/load leave
        # False in any thread but the main one, and then writes HDF5 under a .keras name.
        sub_model.save(str(path), save_format="keras_v3")
        data = path.read_bytes()
    if data[:4] != _ZIP_MAGIC:
        raise RuntimeError("tf-keras did not write the .keras (zip) format")
    return Artefact(data, KERAS_FORMAT)


def export_tflite(sub_model: Any) -> Artefact:
    """The sub-model converted to a LiteRT flatbuffer (`.tflite`) for devices."""
    tf, _ = _tf_and_keras()
    converter = tf.lite.TFLiteConverter.from_keras_model(sub_model)
    return Artefact(bytes(converter.convert()), "tflite")


def load_keras(data: bytes) -> Any:
    """A trained sub-model from the bytes of its `.keras` artefact, loaded with `safe_mode=True` (no Lambda
    bytecode, no arbitrary class). ValueError for anything else, `.h5` included (H5_REFUSED)."""
    _, keras = _tf_and_keras()
    if data[:8] == HDF5_MAGIC:
        raise ValueError(H5_REFUSED)
    if data[:4] != _ZIP_MAGIC:
        raise ValueError("not a Keras artefact: a .keras model is a zip file")
    with tempfile.TemporaryDirectory(prefix="tierflow-load-") as tmp:
        path = Path(tmp) / "model.keras"
        path.write_bytes(data)
        return keras.models.load_model(path, compile=False, safe_mode=True)
