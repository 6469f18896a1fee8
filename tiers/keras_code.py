"""Model code -> Keras model: the one place that turns a user's model code into a tf-keras model.

Called only where untrusted code may run: the validation sandbox child (`tierflow.tiers.sandbox_child`) and the
training / inference workloads. The API and the Faust worker never import this module's `build_model`
(they ask `SandboxPool` instead), because it executes the user's code and imports TensorFlow.

Model code comes in two forms:

* a Kafka-ML style snippet: Python that uses `tf` and `keras` without importing them, with Keras 2 idioms
  (`keras.Input(shape=64)`, `activation=tf.nn.relu`), and assigns the model to a variable of its choice;
  optional `imports` text runs first in the same namespace;
* a Keras JSON config (a JSON object with "class_name" and "config", as `model.to_json()` writes it).

`keras` is the Keras 2 package `tf_keras`: Keras 3 rejects Kafka-ML's idioms (see DESIGN, TensorFlow facts).
TensorFlow is imported lazily, so the pure helpers (JSON detection, picking the model, locating an error in
the user's code, shaping the summary) import and unit-test without it.
"""

from __future__ import annotations

import ast
import gc
import os
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import orjson

from tierflow.streams.errors import PermanentError

#: Filenames the user's code is compiled under, so tracebacks and SyntaxErrors point into it.
CODE_FILENAME = "<model code>"
IMPORTS_FILENAME = "<model imports>"

#: How much of an exception message an error report keeps (Keras messages can be pages long).
MAX_MESSAGE_CHARS = 2000

_T = TypeVar("_T")
Shape = list[int | None]


class ModelCodeError(PermanentError):
    """The user's model code is wrong; the message says what and, where known, on which line.

    `line` is the 1-based line in the model code (or in the imports text when `where` says so);
    `cause` is the name of the exception the code raised (`"SyntaxError"`, `"MemoryError"`, ...), if any.
    """

    def __init__(self, message: str, *, line: int | None = None, where: str = "model code",
                 cause: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.where = where
        self.cause = cause


# -- pure helpers (no TensorFlow) ------------------------------------------------------------------------


def parse_json_config(code: str) -> dict[str, Any] | None:
    """The Keras JSON config in `code`, or None when `code` is not a JSON object (then it is a snippet).

    A JSON object that is not a Keras config (no "class_name"/"config") is an error, not a snippet: no
    Python snippet parses as a JSON object.
    """
    text = code.strip()
    if not text.startswith("{"):
        return None
    try:
        parsed = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(parsed, dict):
        return None
    missing = [key for key in ("class_name", "config") if key not in parsed]
    if missing:
        raise ModelCodeError(
            f"the model code is a JSON object but not a Keras model config: it lacks {', '.join(missing)} "
            "(expected what `model.to_json()` writes)"
        )
    return parsed


def last_assignments(code: str) -> dict[str, int]:
    """Global name -> line of the last statement that binds it at module level (empty if code won't parse).

    Used to prefer the model "assigned last" when a snippet leaves several top-level models. Bindings inside
    functions, classes, lambdas and comprehensions are local, so they are not followed.
    """
    try:
        tree = ast.parse(code, filename=CODE_FILENAME)
    except SyntaxError:
        return {}
    lines: dict[str, int] = {}
    scoped = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda,
              ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store):
                lines[child.id] = max(lines.get(child.id, 0), child.lineno)
            elif isinstance(child, ast.alias):
                name = child.asname or child.name.split(".")[0]
                lines[name] = max(lines.get(name, 0), child.lineno)
            if isinstance(child, scoped):
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    lines[child.name] = max(lines.get(child.name, 0), child.lineno)
                continue
            visit(child)

    visit(tree)
    return lines


def pick_model(
    candidates: Sequence[tuple[str, _T]],
    contains: Callable[[_T, _T], bool],
    order: Mapping[str, int] | None = None,
) -> tuple[str, _T]:
    """The (name, model) the snippet means, among the models it left in its globals (in namespace order).

    One object bound to several names counts once. A model used as a sub-layer of another candidate
    (`contains(outer, inner)`) is a building block, not the answer. If several remain, the one whose name
    was assigned last (`order`: name -> line, see `last_assignments`) wins, namespace order breaking ties.
    """
    rank = order or {}
    unique: list[tuple[str, _T]] = []
    for name, model in candidates:
        same = [i for i, (_, seen) in enumerate(unique) if seen is model]
        if not same:
            unique.append((name, model))
        elif rank.get(name, -1) > rank.get(unique[same[0]][0], -1):
            unique[same[0]] = (name, model)
    if not unique:
        raise ModelCodeError(
            "the model code defines no Keras model: assign one to a variable, "
            "e.g. `model = keras.Model(inputs=..., outputs=...)` or `model = keras.Sequential([...])`"
        )
    roots = [
        (name, model) for name, model in unique
        if not any(other is not model and contains(other, model) for _, other in unique)
    ]
    # Models that contain each other (cycles) leave no root: fall back to every candidate.
    pool = roots or unique
    indexed = list(enumerate(pool))
    _, best = max(indexed, key=lambda item: (rank.get(item[1][0], -1), item[0]))
    return best


def error_location(exc: BaseException) -> tuple[str, int] | None:
    """(`"model code"` | `"imports"`, line) of the innermost frame of the user's code in `exc`, if any."""
    where = {CODE_FILENAME: "model code", IMPORTS_FILENAME: "imports"}
    if isinstance(exc, SyntaxError) and exc.filename in where and exc.lineno is not None:
        return where[exc.filename], exc.lineno
    found: tuple[str, int] | None = None
    tb = exc.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename in where:
            found = (where[filename], tb.tb_lineno)
        tb = tb.tb_next
    return found


def describe_error(exc: BaseException, source: Mapping[str, str]) -> ModelCodeError:
    """A readable `ModelCodeError` for an exception the user's code raised.

    `source` maps "model code" / "imports" to the text, to quote the offending line:
    `line 3 (x = keras.layers.Dense(...)): NameError: name 'Dense' is not defined`.
    """
    location = error_location(exc)
    message = exc.msg if isinstance(exc, SyntaxError) else str(exc)
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + " [...]"
    kind = type(exc).__name__
    text = f"{kind}: {message}" if message else kind
    if location is None:
        return ModelCodeError(text, cause=kind)
    where, line = location
    lines = source.get(where, "").splitlines()
    quoted = lines[line - 1].strip() if 0 < line <= len(lines) else ""
    if len(quoted) > 120:
        quoted = quoted[:117] + "..."
    prefix = "line" if where == "model code" else "imports line"
    head = f"{prefix} {line} ({quoted})" if quoted else f"{prefix} {line}"
    return ModelCodeError(f"{head}: {text}", line=line, where=where, cause=kind)


def run_snippet(code: str, imports: str, namespace: dict[str, Any]) -> dict[str, Any]:
    """Execute `imports` then `code` in `namespace` (the deliberate exec of untrusted code) and return it.

    Any exception, `SystemExit` included, becomes a `ModelCodeError` naming the line.
    """
    sources = {"model code": code, "imports": imports}
    try:
        if imports.strip():
            exec(compile(imports, IMPORTS_FILENAME, "exec"), namespace)
        exec(compile(code, CODE_FILENAME, "exec"), namespace)
    except (Exception, SystemExit) as exc:  # the user's code failed in some way: say how and where
        raise describe_error(exc, sources) from exc
    return namespace


def shape_list(shape: Sequence[int | None] | None) -> Shape:
    """A shape as a JSON-able list, None for unknown (batch) dimensions."""
    if shape is None:
        raise ModelCodeError("the model has an input or output of unknown rank")
    return [None if dim is None else int(dim) for dim in shape]


def summary_dict(input_shapes: Sequence[Shape], output_shapes: Sequence[Shape], params: int) -> dict[str, Any]:
    """`{"input_shape", "output_shapes", "params"}` for a model with exactly one input (tierflow sub-models)."""
    if len(input_shapes) != 1:
        raise ModelCodeError(
            f"the model has {len(input_shapes)} inputs; a tierflow (sub-)model takes exactly one input tensor"
        )
    if not output_shapes:
        raise ModelCodeError("the model has no outputs")
    return {
        "input_shape": list(input_shapes[0]),
        "output_shapes": [list(shape) for shape in output_shapes],
        "params": int(params),
    }


# -- TensorFlow side -------------------------------------------------------------------------------------


def load_keras() -> tuple[types.ModuleType, types.ModuleType]:
    """(tensorflow, tf_keras), with `tf.keras` resolving to Keras 2 as Kafka-ML code expects.

    TF_USE_LEGACY_KERAS must be set before TensorFlow is first imported; it is process bootstrap for the
    workloads that call this, not a setting.

    The first call imports with the cyclic garbage collector paused: the import makes millions of objects,
    and each collection it triggers walks all of them again (measured on the 2-core machine: 4.9 -> 4.2 CPU s
    of the ~5 s import, paired runs). The collector's state is restored whatever the import does.
    """
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    pause = "tf_keras" not in sys.modules and gc.isenabled()
    if pause:
        gc.disable()
    try:
        import tensorflow as tf
        import tf_keras
    finally:
        if pause:
            gc.enable()
    return tf, tf_keras


def _contains(outer: Any, inner: Any) -> bool:
    return any(sub is inner for sub in getattr(outer, "submodules", ()))


def build_model(code: str, imports: str = "") -> Any:
    """The tf-keras model that `code` (a snippet or a Keras JSON config) describes.

    Raises `ModelCodeError` when the code fails, defines no model, or is not a valid config.
    """
    tf, keras = load_keras()
    config = parse_json_config(code)
    if config is not None:
        bad = "the JSON model config is not a valid Keras model config"
        try:
            built = keras.models.model_from_json(code)
        except Exception as exc:  # Keras raises many types for a bad config; all mean "bad config"
            raise ModelCodeError(f"{bad}: {type(exc).__name__}: {exc}"[:MAX_MESSAGE_CHARS],
                                 cause=type(exc).__name__) from exc
        if not isinstance(built, keras.Model):
            # Keras returns an unknown class_name as a plain string, and builds a layer for a layer config.
            raise ModelCodeError(
                f"{bad}: class_name {str(config['class_name'])[:100]!r} gives a {type(built).__name__}, not a "
                "model (expected Functional, Sequential or Model, as `model.to_json()` writes)"
            )
        return built
    namespace: dict[str, Any] = {"__name__": "__model__", "tf": tf, "keras": keras}
    run_snippet(code, imports, namespace)
    candidates = [(name, value) for name, value in namespace.items() if isinstance(value, keras.Model)]
    _, model = pick_model(candidates, _contains, last_assignments(code))
    return model


def summarize(model: Any) -> dict[str, Any]:
    """`{"input_shape": [None, 28, 28, 1], "output_shapes": [[None, 64], [None, 10]], "params": 303842}`."""
    inputs = getattr(model, "inputs", None)
    outputs = getattr(model, "outputs", None)
    if not inputs or not outputs:
        raise ModelCodeError(
            "the model has no defined input shape: start it with `keras.Input(shape=...)` or give its first "
            "layer `input_shape=...`"
        )
    return summary_dict(
        [shape_list(t.shape.as_list()) for t in inputs],
        [shape_list(t.shape.as_list()) for t in outputs],
        int(model.count_params()),
    )
