"""Inference engines: one trained sub-model behind `predict(batch) -> outputs in Keras order`.

Called by the tier agent (`tierflow.tiers.tier_agent`), which runs `predict` once per consumed batch in
its model thread, and by the benchmarks. Two engines:

* `KerasEngine`: the `.keras` artefact loaded with tf-keras and `safe_mode=True` (`tiers.training.load_keras`;
  an `.h5` file is refused: tf-keras would load it without safe_mode, running a Lambda layer's code) and called
  through the concrete function of one `tf.function` whose input signature leaves the batch dimension free,
  so a new batch size never retraces. Measured here on the edge model (2 cores): the graph call costs 1.1 ms
  at batch 1 and 7.4 ms at batch 256 (29 us per sample), against 3.2 ms / 16 ms for an eager `model(x)` call
  and ~40 ms for `model.predict` (which tierflow never calls per message). Calling the concrete function
  directly skips the `tf.function`'s per-call dispatch, and TensorFlow's thread pools limited to one thread
  each (`set_threads`, what `tierflow tier run` does by default: several tiers share a small machine) stop
  it from waking threads for a small batch: the demo's edge model at batch 1 went from 813 to 380 us (776
  to 306 us of CPU), at batch 64 from 1.76 to 1.37 ms, same outputs to the bit.
* `LiteRTEngine`: the `.tflite` flatbuffer run by the LiteRT interpreter (`ai_edge_litert`; falls back to
  `tf.lite.Interpreter` when only TensorFlow is installed). The input is resized (`resize_tensor_input` +
  `allocate_tensors`) only when the batch size changes: 34 us at batch 1, 4.3 ms at batch 256 (17 us per
  sample); a resize costs ~40 us. Its outputs do not come in Keras order (the converter sorts them by
  output-layer name, and tensor names are `StatefulPartitionedCall:<n>`), so they are mapped by what
  produces them: the probabilities are the output of a SOFTMAX (or LOGISTIC) operator, else the output whose
  rows sum to 1 on a probe batch; the other output is the tensor for the next tier.

A device installs `tierflow[edge]` (numpy, aiokafka, faust, ai-edge-litert; no TensorFlow): this module
imports TensorFlow only inside `KerasEngine` and as the LiteRT fallback.

Output order (the `Engine` contract, as the sub-models are written): a non-top sub-model gives
`[tensor_to_upper, probabilities]`, the top one `[probabilities]`; probabilities are (n, classes) float32.
"""

from __future__ import annotations

import importlib
import logging
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from tierflow.streams.errors import PermanentError

log = logging.getLogger("tierflow.engines")

Array = npt.NDArray[Any]
#: The engines a tier can be served with (`--engine`).
ENGINES = ("keras", "litert")
#: HDF5's signature: a legacy `.h5` Keras model.
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
#: Why an `.h5` artefact is refused (tier hosts load artefacts that anyone able to report a result chose).
H5_REFUSED = ("an .h5 (HDF5) Keras model is refused: tf-keras loads HDF5 without safe_mode, so a Lambda layer in "
              "it would run its code on the tier host; serve a .keras model (tierflow's training writes those) or "
              "a .tflite one")
#: TFLite operators whose output is a probability distribution.
_PROBABILITY_OPS = frozenset({"SOFTMAX", "LOGISTIC"})
#: Threads a model of this process may use (`set_threads`); None: each engine's own default.
_threads: int | None = None


def set_threads(threads: int | None) -> None:
    """How many threads the models this process loads may use: TensorFlow's intra- and inter-op pools (process
    wide, so only before TensorFlow runs its first operation) and each LiteRT interpreter. None or 0: the
    engines' defaults (TensorFlow: one per core). Called by `tierflow tier run` before its model loads."""
    global _threads
    _threads = threads or None


def _limit_tensorflow_threads(tf: Any) -> None:
    if _threads is None:
        return
    try:
        tf.config.threading.set_intra_op_parallelism_threads(_threads)
        tf.config.threading.set_inter_op_parallelism_threads(_threads)
    except RuntimeError:  # TensorFlow already ran an operation in this process: its pools keep their size
        log.info("TensorFlow is already initialised: its thread pools keep their size")


class EngineError(PermanentError, RuntimeError):
    """The model cannot be served: the message says what is wrong with it and what to do (a restart cannot help)."""


class Engine(Protocol):
    """A loaded sub-model. `predict` is called from one thread at a time (the agent's model thread)."""

    @property
    def kind(self) -> str:
        """"keras" or "litert"."""
        ...

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input sample (no batch dimension)."""
        ...

    @property
    def input_dtype(self) -> np.dtype[Any]:
        ...

    @property
    def n_outputs(self) -> int:
        """2 for a non-top sub-model ([tensor, probabilities]), 1 for a top one ([probabilities])."""
        ...

    def predict(self, x: Array) -> list[Array]:
        """Outputs for the batch `x` of shape (n, *input_shape), in Keras order, each with n rows."""
        ...


def _sample_shape(shape: Sequence[Any], what: str) -> tuple[int, ...]:
    dims = list(shape)[1:]
    if any(d is None or int(d) < 0 for d in dims):
        raise EngineError(f"{what} has an input of shape {list(shape)}: a tier needs every dimension but the batch "
                          "one fixed")
    return tuple(int(d) for d in dims)


# -- Keras ---------------------------------------------------------------------------------------------------


class KerasEngine:
    """A tf-keras sub-model called directly on whole batches, through one batch-polymorphic `tf.function`."""

    kind = "keras"

    def __init__(self, model: Any) -> None:
        from tierflow.tiers.keras_code import load_keras

        tf, _ = load_keras()
        _limit_tensorflow_threads(tf)
        inputs = getattr(model, "inputs", None)
        if not inputs or len(inputs) != 1:
            raise EngineError(f"model '{getattr(model, 'name', '?')}' must take exactly one input tensor, it takes "
                              f"{len(inputs or [])}")
        self.model = model
        self.input_shape = _sample_shape(inputs[0].shape.as_list(), f"model '{model.name}'")
        self.input_dtype: np.dtype[Any] = np.dtype(inputs[0].dtype.as_numpy_dtype)
        self.n_outputs = len(model.outputs)
        spec = tf.TensorSpec([None, *self.input_shape], inputs[0].dtype)
        # One trace for every batch size: a relaxed batch dimension in the signature; its concrete function is
        # called directly (no per-call dispatch of the tf.function).
        self._call = tf.function(lambda x: model(x, training=False), input_signature=[spec]).get_concrete_function()
        self.predict(np.zeros((1, *self.input_shape), dtype=self.input_dtype))  # trace now, not on traffic

    @classmethod
    def from_artefact(cls, data: bytes) -> KerasEngine:
        from tierflow.tiers.keras_code import load_keras as import_keras
        from tierflow.tiers.training import load_keras

        _limit_tensorflow_threads(import_keras()[0])  # before loading the model runs TensorFlow's first operation
        try:
            model = load_keras(data)
        except (ValueError, OSError) as exc:
            raise EngineError(f"cannot load the Keras artefact: {exc}") from exc
        return cls(model)

    @classmethod
    def from_path(cls, path: Path | str) -> KerasEngine:
        return cls.from_artefact(Path(path).read_bytes())

    def predict(self, x: Array) -> list[Array]:
        out = self._call(np.asarray(x, dtype=self.input_dtype))  # a concrete function takes its own dtype only
        tensors = list(out) if isinstance(out, list | tuple) else [out]
        return [np.asarray(t.numpy()) for t in tensors]


# -- LiteRT --------------------------------------------------------------------------------------------------


def _interpreter_class() -> Any:
    """LiteRT's Interpreter; TensorFlow's (deprecated, same API) where only TensorFlow is installed."""
    try:
        return importlib.import_module("ai_edge_litert.interpreter").Interpreter
    except ImportError:
        pass
    try:
        from tierflow.tiers.keras_code import load_keras

        tf, _ = load_keras()
    except ImportError:
        raise EngineError("the LiteRT engine needs the ai-edge-litert package (pip install 'tierflow[edge]') "
                          "or TensorFlow") from None
    log.info("ai-edge-litert is not installed: using tf.lite.Interpreter")
    return tf.lite.Interpreter


class LiteRTEngine:
    """A `.tflite` sub-model run by the LiteRT interpreter, resized to each new batch size."""

    kind = "litert"

    def __init__(self, model_content: bytes, *, num_threads: int | None = None) -> None:
        interpreter_cls = _interpreter_class()
        num_threads = num_threads or _threads
        with warnings.catch_warnings():
            # tf.lite.Interpreter warns that it is deprecated in favour of LiteRT (the fallback says so above).
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                self._it = interpreter_cls(model_content=model_content, num_threads=num_threads)
            except ValueError as exc:
                raise EngineError(f"not a LiteRT (.tflite) model: {exc}") from exc
        inputs = self._it.get_input_details()
        if len(inputs) != 1:
            raise EngineError(f"the LiteRT model takes {len(inputs)} inputs; a tier sub-model takes exactly one")
        signature = inputs[0].get("shape_signature", inputs[0]["shape"])
        self._input_index = int(inputs[0]["index"])
        self.input_shape = _sample_shape([int(d) for d in signature], "the LiteRT model")
        self.input_dtype: np.dtype[Any] = np.dtype(inputs[0]["dtype"])
        details = self._it.get_output_details()
        if not 1 <= len(details) <= 2:
            raise EngineError(f"the LiteRT model has {len(details)} outputs; a tier sub-model has 1 (top) or 2 "
                              "([tensor, probabilities])")
        self._batch = -1
        self._lock = threading.Lock()
        self._outputs = self._keras_order([int(d["index"]) for d in details])

    @classmethod
    def from_path(cls, path: Path | str, *, num_threads: int | None = None) -> LiteRTEngine:
        return cls(Path(path).read_bytes(), num_threads=num_threads)

    @property
    def n_outputs(self) -> int:
        return len(self._outputs)

    def _keras_order(self, outputs: list[int]) -> list[int]:
        """Output tensor indices as [tensor, probabilities] (or [probabilities])."""
        if len(outputs) == 1:
            return outputs
        produced_by: dict[int, str] = {}
        for op in self._it._get_ops_details():  # the only place TFLite says which operator made a tensor
            for index in op.get("outputs", ()):
                produced_by[int(index)] = str(op.get("op_name", ""))
        probs = [i for i in outputs if produced_by.get(i) in _PROBABILITY_OPS]
        if len(probs) != 1:
            probs = self._rows_summing_to_one(outputs)
        if len(probs) != 1:
            raise EngineError("cannot tell which output of the LiteRT model is the probabilities (neither comes "
                              "from a softmax); serve this tier with the Keras engine")
        return [next(i for i in outputs if i != probs[0]), probs[0]]

    def _rows_summing_to_one(self, outputs: list[int]) -> list[int]:
        rng = np.random.default_rng(0)
        probe = rng.random((4, *self.input_shape)).astype(self.input_dtype)
        values = self._run(probe, outputs)
        found = []
        for index, value in zip(outputs, values, strict=True):
            rows = value.reshape(len(value), -1)
            if rows.min() >= 0 and np.allclose(rows.sum(axis=1), 1.0, atol=1e-3):
                found.append(index)
        return found

    def _run(self, x: Array, outputs: list[int]) -> list[Array]:
        with self._lock:
            if len(x) != self._batch:
                self._it.resize_tensor_input(self._input_index, [len(x), *self.input_shape])
                self._it.allocate_tensors()
                self._batch = len(x)
            self._it.set_tensor(self._input_index, np.ascontiguousarray(x, dtype=self.input_dtype))
            self._it.invoke()
            # get_tensor copies: the next invoke reuses the interpreter's buffers.
            return [np.asarray(self._it.get_tensor(i)) for i in outputs]

    def predict(self, x: Array) -> list[Array]:
        return self._run(x, self._outputs)


# -- loading -------------------------------------------------------------------------------------------------


def load_engine(kind: str, model: bytes | Path | str) -> Engine:
    """The engine `kind` ("keras" | "litert") for a model artefact given as bytes or a file path."""
    data = model if isinstance(model, bytes) else Path(model).read_bytes()
    if kind == "keras":
        return KerasEngine.from_artefact(data)
    if kind == "litert":
        return LiteRTEngine(data)
    raise EngineError(f"unknown engine {kind!r}; use one of {', '.join(ENGINES)}")
