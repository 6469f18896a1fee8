"""The training job's driver side of the sandboxed trainer: start it, feed it, read back what it made.

Called by `tierflow.tiers.train_job.run_training` (the trusted driver: it reads the data from Kafka, holds the
workload's token, reports and uploads) once the data is loaded: `await train_in_sandbox(...)` writes the job,
the samples and the labels into a fresh exchange directory, runs the trainer (tiers/trainer.py) under the
isolation level of the settings, passes each epoch's metrics to `on_progress` as they come, and returns a
`TrainerOutput`: metrics per exit, the artefacts' bytes, each exit's probabilities on the validation and test
splits and each sub-model's time per sample (for the calibration and frontier record the driver computes with
numpy). The exchange directory is removed afterwards, and whatever the trainer started is killed.

Nothing the trainer writes is trusted: every file is opened without following links and must be a regular file
with one link (a trainer that planted a link to a file of the driver's gets a refusal, not an upload), of a
bounded size; artefacts must carry their format's magic bytes; probabilities are plain float arrays
(allow_pickle=False) with one row per sample of their split; metrics are numbers. A trainer that breaks these
rules, dies, or says nothing fails the training with a reason.

Isolation (TIERFLOW_SANDBOX_ISOLATION, as for validation): `bwrap` runs the trainer in bubblewrap with the
exchange directory as its only writable folder (bound at /exchange) and no network; `landlock` runs it as a
plain child that confines itself (Landlock, seccomp; the driver turns itself non-dumpable first, so nothing
of the same user can read its memory or environment); `none` runs it unconfined (code you trust only). A
missing tool fails the training with what to install, and no model code runs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import dataclasses
import logging
import math
import os
import shutil
import signal
import stat
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from tierflow.streams.errors import PermanentError, TemporaryError
from tierflow.streams.settings import SandboxSettings
from tierflow.tiers import sandbox_bwrap, trainer
from tierflow.tiers.sandbox import CHILD_ENV, describe_exit, how_to_get, scrub
from tierflow.tiers.sandbox_bwrap import SANDBOX_UID, BwrapMissing
from tierflow.tiers.training import Artefact, Metrics, TrainingOptions

log = logging.getLogger(__name__)

JSON = dict[str, Any]
Array = npt.NDArray[Any]
#: The trainer's environment: nothing of the driver's (its token stays out). Training wants the cores, so
#: unlike the validation sandbox's, the thread pools are left to TensorFlow; malloc arenas are capped so the
#: address-space limit measures memory, not per-thread reservations.
TRAINER_ENV = {
    **{k: v for k, v in CHILD_ENV.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")},
    "MALLOC_ARENA_MAX": "4",
    "PYTHONUNBUFFERED": "1",
}
#: Longest line the trainer may send (an epoch's metrics for every exit).
MAX_LINE_BYTES = 1 << 20
#: Lines of the trainer's stderr kept to explain its death.
STDERR_TAIL_LINES = 5
MAX_RESULT_BYTES = 1 << 20
MAX_PROBS_BYTES = 1 << 30
MAX_METRICS = 64
_MAGIC = {"keras": (0, b"PK\x03\x04"), "tflite": (4, b"TFL3")}
_TRAINER_MODULE = "tierflow.tiers.trainer"
_SPLITS = ("validation", "test")


class TrainerFailed(Exception):
    """Base of the trainer's failures (the job reports them as PermanentError or TemporaryError)."""


@dataclass
class TrainerOutput:
    """What the trainer made, checked: per exit (bottom first) its metrics and artefacts, and for the
    calibration and frontier record each exit's probabilities per split and each sub-model's time per sample."""

    metrics: list[JSON]
    artefacts: list[dict[str, Artefact]]
    probs: dict[str, list[Array]] = field(default_factory=dict)
    seconds_per_sample: list[float] = field(default_factory=list)
    isolation: dict[str, str] = field(default_factory=dict)


# -- reading what the trainer wrote -------------------------------------------------------------------------


def read_file(directory: int, name: str, max_bytes: int) -> bytes:
    """The bytes of `name` in the exchange directory (its fd): a regular file with one link, not a symlink,
    at most `max_bytes`; PermanentError otherwise."""
    if "/" in name or name in ("", ".", ".."):
        raise PermanentError(f"the trainer named an output {name!r} outside its exchange directory")
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=directory)
    except FileNotFoundError:
        raise PermanentError(f"the trainer did not write {name}") from None
    except OSError as exc:  # ELOOP: a symbolic link
        raise PermanentError(f"the trainer's {name} cannot be read as a plain file ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            raise PermanentError(f"the trainer's {name} is not a plain file of its own (a link?): refused")
        if info.st_size > max_bytes:
            raise PermanentError(f"the trainer's {name} has {info.st_size} bytes, more than {max_bytes}")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise PermanentError(f"the trainer's {name} grew past {max_bytes} bytes")
    return data


def _number(value: Any) -> float | None:
    if value is None:  # NaN and infinities travel as null
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{value!r} is not a number")
    return float(value)


def check_metrics(value: Any, n_exits: int) -> list[Metrics]:
    """One epoch's metrics from the trainer: per exit, names to numbers; ValueError otherwise."""
    if not isinstance(value, list) or len(value) != n_exits:
        raise ValueError(f"metrics must list {n_exits} exit(s)")
    out: list[Metrics] = []
    for per_exit in value:
        if not isinstance(per_exit, dict) or len(per_exit) > MAX_METRICS:
            raise ValueError("each exit's metrics must be an object of at most 64 names")
        checked: Metrics = {}
        for name, number in per_exit.items():
            if not isinstance(name, str) or len(name) > 200:
                raise ValueError(f"metric name {name!r}")
            as_float = _number(number)
            checked[name] = math.nan if as_float is None else as_float
        out.append(checked)
    return out


def check_result_metrics(value: Any, n_exits: int) -> list[JSON]:
    if not isinstance(value, list) or len(value) != n_exits:
        raise ValueError(f"result metrics must list {n_exits} exit(s)")
    out: list[JSON] = []
    for per_exit in value:
        if not isinstance(per_exit, dict) or set(per_exit) - {"train", "validation", "test"}:
            raise ValueError("each exit's result metrics are {train, validation, test}")
        part: JSON = {}
        for key, metrics in per_exit.items():
            [checked] = check_metrics([metrics], 1)
            part[key] = {k: (None if math.isnan(v) else v) for k, v in checked.items()}
        out.append(part)
    return out


def read_output(directory: int, n_exits: int, split_sizes: Mapping[str, int]) -> TrainerOutput:
    """The trainer's outputs in the exchange directory (its fd), checked; PermanentError naming the problem."""
    try:
        result = orjson.loads(read_file(directory, trainer.RESULT, MAX_RESULT_BYTES))
        if not isinstance(result, dict):
            raise ValueError("result.json is not an object")
        metrics = check_result_metrics(result.get("metrics"), n_exits)
        files = result.get("artefacts")
        if not isinstance(files, list) or len(files) != n_exits:
            raise ValueError(f"artefacts must list {n_exits} sub-model(s)")
        costs = result.get("seconds_per_sample")
        if not isinstance(costs, list) or len(costs) != n_exits:
            raise ValueError(f"seconds_per_sample must list {n_exits} sub-model(s)")
        seconds = [_number(c) for c in costs]
        if any(s is None or not math.isfinite(s) or s < 0 for s in seconds):
            raise ValueError("seconds_per_sample must be finite non-negative numbers")
    except (orjson.JSONDecodeError, ValueError) as exc:
        raise PermanentError(f"the trainer's result is malformed: {exc}") from None
    artefacts: list[dict[str, Artefact]] = []
    for i, entry in enumerate(files):
        if not isinstance(entry, dict) or "keras" not in entry or set(entry) - set(_MAGIC):
            raise PermanentError(f"the trainer's artefacts of sub-model {i} are not {{keras[, tflite]}}")
        kinds: dict[str, Artefact] = {}
        for kind, name in entry.items():
            data = read_file(directory, str(name), trainer.MAX_FILE_BYTES)
            offset, magic = _MAGIC[kind]
            if data[offset:offset + len(magic)] != magic:
                raise PermanentError(f"the trainer's {name} is not a {kind} file")
            kinds[kind] = Artefact(data, "keras" if kind == "keras" else "tflite")
        artefacts.append(kinds)
    probs: dict[str, list[Array]] = {}
    for split in _SPLITS:
        probs[split] = [read_probs(directory, trainer.probs_name(split, i), split_sizes[split])
                        for i in range(n_exits)]
    return TrainerOutput(metrics, artefacts, probs, [float(s) for s in seconds if s is not None])


def read_probs(directory: int, name: str, rows: int) -> Array:
    """One exit's probabilities on a split: a float array of `rows` rows (allow_pickle=False)."""
    import io

    data = read_file(directory, name, MAX_PROBS_BYTES)
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        raise PermanentError(f"the trainer's {name} is not a plain array: {exc}") from None
    if array.dtype.kind != "f" or array.ndim != 2 or array.shape[0] != rows:
        raise PermanentError(f"the trainer's {name} is a {array.dtype} array of shape {array.shape}, not {rows} "
                             "rows of probabilities")
    return np.asarray(array)


# -- running the trainer ------------------------------------------------------------------------------------


def _kill_tree(pid: int) -> None:
    """SIGKILL the trainer and everything under it (bwrap's tree: its pid namespace goes with it)."""
    todo, seen = [pid], []
    while todo:
        current = todo.pop()
        seen.append(current)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{current}/task/{task}/children") as f:
                    todo.extend(int(child) for child in f.read().split())
    for target in seen:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(target, signal.SIGKILL)


def _set_dumpable(dumpable: bool) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(4, int(dumpable), 0, 0, 0)


def _write_job(exchange: Path, versions: Sequence[JSON], options: TrainingOptions, x: Array, y: Array) -> None:
    job = {"versions": [{k: v.get(k) for k in ("name", "model_id", "version", "code", "imports")}
                        for v in versions],
           "options": dataclasses.asdict(options)}
    (exchange / trainer.JOB).write_bytes(orjson.dumps(job))
    np.save(exchange / trainer.X, np.ascontiguousarray(x), allow_pickle=False)
    np.save(exchange / trainer.Y, np.ascontiguousarray(y), allow_pickle=False)


def _command(settings: SandboxSettings, exchange: Path, channel_fd: int) -> list[str]:
    """The trainer's command line, under bwrap when that is the level (BwrapMissing when it is not there)."""
    isolation = settings.isolation
    inside = trainer.EXCHANGE if isolation == "bwrap" else str(exchange)
    command = [sys.executable, "-m", _TRAINER_MODULE, "--exchange", inside, "--channel-fd", str(channel_fd),
               "--isolation", isolation, "--memory-mb", str(settings.training_memory_mb)]
    if isolation != "bwrap":
        return command
    bwrap = sandbox_bwrap.find_bwrap(settings.bwrap)
    as_root = os.geteuid() == 0
    if as_root:
        command += ["--drop-to", str(SANDBOX_UID)]
    return sandbox_bwrap.bwrap_argv(bwrap, command, readonly=sandbox_bwrap.installation_paths(), as_root=as_root,
                                    system=sandbox_bwrap.system_roots(), writable=[(str(exchange), trainer.EXCHANGE)])


async def train_in_sandbox(settings: SandboxSettings, versions: Sequence[JSON], x: Array, y: Array,
                           options: TrainingOptions, split_sizes: Mapping[str, int],
                           on_progress: Callable[[int, int, list[Metrics]], None]) -> TrainerOutput:
    """Train the chain `versions` (bottom first) on (x, y) in the sandboxed trainer; raises PermanentError
    (the code, the data or the options; or isolation missing) or TemporaryError (the trainer crashed)."""
    exchange = Path(tempfile.mkdtemp(prefix="tierflow-train-"))
    try:
        _write_job(exchange, versions, options, x, y)
        if os.geteuid() == 0 and settings.isolation == "bwrap":
            os.chown(exchange, SANDBOX_UID, SANDBOX_UID)  # the trainer drops root; its folder goes with it
        directory = os.open(exchange, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            isolation = await _run(settings, exchange, len(versions), on_progress)
            output = read_output(directory, len(versions), split_sizes)
        finally:
            os.close(directory)
        output.isolation = isolation
        return output
    finally:
        shutil.rmtree(exchange, ignore_errors=True)


async def _run(settings: SandboxSettings, exchange: Path, n_exits: int,
               on_progress: Callable[[int, int, list[Metrics]], None]) -> dict[str, str]:
    """Run the trainer to its end; its isolation report. Raises PermanentError / TemporaryError."""
    read_end, write_end = os.pipe()
    try:
        command = _command(settings, exchange, write_end)
    except BwrapMissing as exc:
        os.close(read_end)
        os.close(write_end)
        raise PermanentError(f"the trainer cannot run: {exc}") from None
    if settings.isolation == "landlock":
        _set_dumpable(False)  # the trainer runs as this user: it must not read this process's memory or env
    try:
        proc = await asyncio.create_subprocess_exec(*command, stdin=asyncio.subprocess.DEVNULL, env=TRAINER_ENV,
                                                    stderr=asyncio.subprocess.PIPE, pass_fds=(write_end,),
                                                    limit=MAX_LINE_BYTES)
    except OSError as exc:
        os.close(read_end)
        raise PermanentError(f"the trainer cannot run: {exc}; {how_to_get(settings.isolation)}") from exc
    finally:
        os.close(write_end)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE_BYTES, loop=loop)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader, loop=loop),
                                                os.fdopen(read_end, "rb", buffering=0))
    final: JSON | None = None
    isolation: dict[str, str] = {}
    tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
    relay = loop.create_task(_relay_stderr(proc, tail, settings))
    try:
        while final is None:
            try:
                line = await reader.readline()
            except ValueError:
                raise PermanentError("the trainer sent a line longer than 1 MiB") from None
            if not line:
                break
            message = _parse(line, settings)
            if "progress" in message:
                progress = message["progress"]
                try:
                    epoch, epochs = int(progress["epoch"]), int(progress["epochs"])
                    metrics = check_metrics(progress["metrics"], n_exits)
                except (KeyError, TypeError, ValueError) as exc:
                    raise PermanentError(f"the trainer sent malformed progress: {exc}") from None
                on_progress(epoch, epochs, metrics)
            elif message.get("ready") is True:
                report = message.get("isolation")
                if isinstance(report, dict):
                    isolation = {str(k): str(v)[:500] for k, v in report.items()}
                    log.info("trainer isolation: %s", ", ".join(f"{k}: {v}" for k, v in sorted(isolation.items())))
            elif "done" in message or "error" in message:
                final = message
        returncode = await proc.wait()
    finally:
        transport.close()
        if proc.returncode is None:
            # Nothing outlives the trainer: under bwrap its pid namespace goes with it; confined by Landlock
            # it can start no process (sandbox_confine.no_new_processes).
            _kill_tree(proc.pid)
            await proc.wait()
        await relay
    if final is None:
        what = describe_exit(returncode, settings.training_memory_mb, starting=not isolation)
        if tail:
            what += "; its last words: " + " | ".join(tail)
        if returncode < 0 and -returncode in (signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS):
            # Out of memory, most likely: the same training fails the same way.
            raise PermanentError(f"the trainer {what} (TIERFLOW_SANDBOX_TRAINING_MEMORY_MB sets that limit)")
        raise TemporaryError(f"the trainer {what}")
    if "error" in final:
        reason = scrub(str(final["error"])[:4000], settings.secrets)
        if final.get("isolation"):
            raise PermanentError(f"the trainer refused to run model code: {reason}; "
                                 f"{how_to_get(settings.isolation)}")
        raise (PermanentError if final.get("permanent") is True else TemporaryError)(reason)
    return isolation


async def _relay_stderr(proc: asyncio.subprocess.Process, tail: collections.deque[str],
                        settings: SandboxSettings) -> None:
    """Pass the trainer's stderr on to the job's log (TensorFlow's and the model code's output), keeping its
    last lines to explain a trainer that dies without saying why."""
    stream = proc.stderr
    assert stream is not None
    while True:
        try:
            raw = await stream.readline()
        except ValueError:  # a line longer than the limit: what is buffered
            raw = await stream.read(MAX_LINE_BYTES)
        if not raw:
            return
        text = scrub(raw.decode("utf-8", "replace").rstrip(), settings.secrets)
        print(text, file=sys.stderr, flush=True)
        text = text.strip()
        if text and not text.startswith(("I0000", "W0000", "WARNING: All log messages")):
            tail.append(text[:500])


def _parse(line: bytes, settings: SandboxSettings) -> JSON:
    try:
        message = orjson.loads(line)
    except orjson.JSONDecodeError:
        message = None
    if not isinstance(message, dict):
        raise PermanentError(scrub(f"the trainer sent {line[:200]!r} instead of a JSON object", settings.secrets))
    return message
