"""The model-code validation sandbox: a warm pool of single-use subprocesses that build untrusted Keras code.

Callers: the API (and the decider, through it) validate model code before a RegisterModel / UpdateModel is
accepted: `summary = await pool.validate(code, imports)`. They never import TensorFlow or execute the code
themselves (DESIGN, Principles); this module imports neither at module level either.

Two halves live here:

* the parent side, `SandboxPool`: keeps `pool_size` children started and warm (TensorFlow imported, the
  expensive part), hands each validation to one ready child, enforces the wall-clock timeout, and always
  replaces the used child with a fresh one, so one user's code never shares a process with another's;
* the child program, `python -m tierflow.tiers.sandbox`: cuts its networking, imports TensorFlow, warms
  Keras up, says `{"ready": true}` on its protocol channel, reads ONE request line
  `{"code": ..., "imports": ...}`, applies resource limits, builds the model and answers one line,
  `{"ok": true, "summary": {...}}` or `{"ok": false, "error": "..."}`, then exits.

The protocol channel is a private duplicate of the child's original stdout; fd 1 itself is pointed at stderr
before TensorFlow loads, so neither TensorFlow's log noise nor the user's `print()` can corrupt it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import logging
import math
import os
import resource
import signal
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from tierflow.streams.settings import SandboxSettings

logger = logging.getLogger("tierflow.sandbox")

#: How long a fresh child may take to import TensorFlow and say "ready" (seconds; 2-4 s when idle).
STARTUP_TIMEOUT_S = 120.0
#: After this many failed starts in a row, validate() fails fast instead of waiting for a child.
MAX_START_FAILURES = 3
#: Longest line either side sends (the request carries the code; the API caps bodies well below this).
MAX_LINE_BYTES = 16 * 1024 * 1024
#: How many lines of a child's stderr are kept to explain a crash.
STDERR_TAIL_LINES = 20

_CHILD_MODULE = "tierflow.tiers.sandbox"


class CodeInvalid(Exception):
    """The user's model code is wrong; the message says what and, where known, on which line."""


class SandboxError(Exception):
    """The sandbox itself failed (crashed, killed for memory, timed out, could not start); the code may be fine
    or may be hostile. The message says which, so the user knows whether to simplify the code or retry."""


@dataclass(frozen=True)
class ModelSummary:
    """What validation learned about a model: its single input, its outputs (exits), its size."""

    input_shape: list[int | None]
    output_shapes: list[list[int | None]]
    params: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_shape": list(self.input_shape),
            "output_shapes": [list(shape) for shape in self.output_shapes],
            "params": self.params,
        }

    @classmethod
    def from_dict(cls, data: Any) -> ModelSummary:
        """Parse `to_dict()`'s output; raises ValueError naming the bad field."""
        if not isinstance(data, dict):
            raise ValueError(f"a model summary is a JSON object, not {type(data).__name__}")
        input_shape = _shape(data.get("input_shape"), "input_shape")
        outputs = data.get("output_shapes")
        if not isinstance(outputs, list) or not outputs:
            raise ValueError("output_shapes must be a non-empty list of shapes")
        params = data.get("params")
        if not isinstance(params, int) or isinstance(params, bool) or params < 0:
            raise ValueError(f"params must be a non-negative integer, not {params!r}")
        return cls(
            input_shape=input_shape,
            output_shapes=[_shape(shape, f"output_shapes[{i}]") for i, shape in enumerate(outputs)],
            params=params,
        )


def _shape(value: Any, name: str) -> list[int | None]:
    if not isinstance(value, list) or not all(
        dim is None or (isinstance(dim, int) and not isinstance(dim, bool)) for dim in value
    ):
        raise ValueError(f"{name} must be a list of integers or nulls, not {value!r}")
    return list(value)


def describe_exit(returncode: int, memory_mb: int, *, starting: bool = False) -> str:
    """Why a child that did not answer went away, in words a user can act on.

    `starting`: it went before it was ready (a broken installation rather than the user's code).
    """
    if returncode >= 0:
        if starting:
            return f"exited with code {returncode} while starting"
        return f"exited with code {returncode} without answering (did the model code call os._exit()?)"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    if name == "SIGKILL":
        return (f"was killed (SIGKILL), most likely because it ran out of memory: model code may use "
                f"{memory_mb} MB on top of TensorFlow")
    if name in ("SIGABRT", "SIGSEGV", "SIGBUS"):
        return (f"crashed ({name}), typically a failed allocation under the sandbox's memory limit of "
                f"{memory_mb} MB on top of TensorFlow")
    if name == "SIGXCPU":
        return "used up its CPU time limit"
    return f"was killed by {name}"


# -- parent side -----------------------------------------------------------------------------------------

_State = Literal["starting", "ready", "busy", "gone"]


@dataclass(eq=False)
class _Child:
    proc: asyncio.subprocess.Process
    state: _State = "starting"
    stderr_tail: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=STDERR_TAIL_LINES)
    )
    drain: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self) -> str:
        return " | ".join(line for line in self.stderr_tail if line.strip())


def _log_task_failure(task: asyncio.Task[None]) -> None:
    """Background tasks have no caller to raise to: a failure (a bug) is logged, never lost."""
    if not task.cancelled() and task.exception() is not None:
        logger.error("sandbox pool task %s failed", task.get_name(), exc_info=task.exception())


def _exited(proc: asyncio.subprocess.Process) -> bool:
    """Whether a child is gone, even before asyncio's child watcher has reaped it (a zombie)."""
    if proc.returncode is not None:
        return True
    try:
        with open(f"/proc/{proc.pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:  # reaped, asyncio not told yet
        return True
    # The state letter follows the parenthesised command name, which may itself contain ") ".
    return stat[stat.rfind(b")") + 2:][:1] in (b"Z", b"X")


class SandboxPool:
    """A warm pool of single-use validation sandboxes.

    `await pool.start()` spawns `settings.pool_size` children in the background; `await pool.validate(code)`
    waits for a ready one (at most `pool_size` validations run at once; the rest queue), returns a
    `ModelSummary` or raises `CodeInvalid` / `SandboxError`, and replaces the used child; `await pool.close()`
    kills every child. Also an async context manager.
    """

    def __init__(self, settings: SandboxSettings, python: str = sys.executable, *,
                 startup_timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        self._settings = settings
        self._python = python
        self._startup_timeout_s = startup_timeout_s
        self._ready: collections.deque[_Child] = collections.deque()
        self._children: set[_Child] = set()
        self._spawners: set[asyncio.Task[None]] = set()
        self._drains: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(settings.pool_size)
        self._changed = asyncio.Condition()
        self._start_failures = 0
        self._last_start_failure = ""
        self._started = False
        self._closed = False
        #: What the last child reported about its isolation (network, rlimits); for logs and health checks.
        self.isolation: dict[str, str] = {}

    async def __aenter__(self) -> SandboxPool:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def ready_count(self) -> int:
        return len(self._ready)

    @property
    def pids(self) -> list[int]:
        """Process ids of every child alive now (starting, ready or busy)."""
        return sorted(child.pid for child in self._children)

    async def start(self) -> None:
        """Spawn the children in the background; returns at once (see `wait_warm`)."""
        if self._started:
            return
        if self._closed:
            raise SandboxError("the sandbox pool is closed")
        self._started = True
        for _ in range(self._settings.pool_size):
            self._spawn_soon()

    async def wait_warm(self, timeout_s: float | None = None) -> None:
        """Wait until `pool_size` children are ready (for readiness checks, tests and benchmarks)."""
        await self.start()
        limit = self._startup_timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(limit), self._changed:
                await self._changed.wait_for(
                    lambda: self._closed or self._start_failures >= MAX_START_FAILURES
                    or len(self._ready) >= self._settings.pool_size
                )
        except TimeoutError:
            raise SandboxError(
                f"the sandbox pool was not warm within {limit:g} s ({len(self._ready)} of "
                f"{self._settings.pool_size} ready)"
            ) from None
        self._raise_if_broken()

    async def validate(self, code: str, imports: str = "") -> ModelSummary:
        """Build `code` in a fresh sandbox and summarize the model; raises CodeInvalid or SandboxError."""
        await self.start()
        async with self._slots:
            child = await self._acquire()
            try:
                return await self._run(child, code, imports)
            finally:
                await self._kill(child)
                self._spawn_soon()

    async def close(self) -> None:
        """Kill every child (and anything it forked) and stop refilling; idempotent."""
        self._closed = True
        spawners = list(self._spawners)
        for task in spawners:
            task.cancel()
        await asyncio.gather(*spawners, return_exceptions=True)
        await asyncio.gather(*(self._kill(child) for child in list(self._children)))
        # Their stderr readers end at EOF; waiting for them leaves no pipe transport open.
        await asyncio.gather(*self._drains, return_exceptions=True)
        self._ready.clear()
        async with self._changed:
            self._changed.notify_all()

    # -- internals ---------------------------------------------------------------------------------------

    def _raise_if_broken(self) -> None:
        if self._closed:
            raise SandboxError("the sandbox pool is closed")
        if self._start_failures >= MAX_START_FAILURES and not self._ready:
            raise SandboxError(
                f"sandboxes keep failing to start ({self._start_failures} times in a row); "
                f"last failure: {self._last_start_failure}"
            )

    async def _acquire(self) -> _Child:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._startup_timeout_s
        async with self._changed:
            while True:
                while self._ready:
                    child = self._ready.popleft()
                    if not _exited(child.proc):
                        child.state = "busy"
                        return child
                    self._forget_idle_death(child)
                self._raise_if_broken()
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise SandboxError(f"no sandbox became ready within {self._startup_timeout_s:g} s")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await self._changed.wait()

    async def _run(self, child: _Child, code: str, imports: str) -> ModelSummary:
        proc = child.proc
        assert proc.stdin is not None and proc.stdout is not None
        request = orjson.dumps({"code": code, "imports": imports}) + b"\n"
        timeout_s = self._settings.timeout_s
        line = b""
        try:
            async with asyncio.timeout(timeout_s):
                proc.stdin.write(request)
                await proc.stdin.drain()
                proc.stdin.close()
                line = await proc.stdout.readline()
        except TimeoutError:
            logger.warning("sandbox %d: model code ran past the %g s timeout; killing it", child.pid, timeout_s)
            raise SandboxError(
                f"building the model took longer than {timeout_s:g} s (an endless loop, or too much work "
                "while defining the model?); the sandbox was stopped"
            ) from None
        except (BrokenPipeError, ConnectionResetError):
            line = b""  # the child died before reading: explained by its exit status below
        except ValueError as exc:  # the answer line overran MAX_LINE_BYTES
            raise SandboxError(f"the sandbox sent an oversized answer: {exc}") from None
        if line:
            # Let the child finish its own exit (milliseconds) rather than killing it mid-way.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await proc.wait()
        else:
            returncode = await self._reap(child)
            if self._closed:
                raise SandboxError("the sandbox pool was closed during the validation")
            reason = describe_exit(returncode, self._settings.memory_mb)
            logger.warning("sandbox %d %s; stderr: %s", child.pid, reason, child.tail() or "(empty)")
            raise SandboxError(f"the sandbox {reason}")
        try:
            response = orjson.loads(line)
            if not isinstance(response, dict):
                raise ValueError(f"expected a JSON object, got {type(response).__name__}")
            isolation = response.get("isolation")
            if isinstance(isolation, dict):
                self._note_isolation({str(k): str(v) for k, v in isolation.items()})
            if response.get("ok") is True:
                return ModelSummary.from_dict(response.get("summary"))
        except ValueError as exc:
            logger.error("sandbox %d sent an unreadable answer %r: %s", child.pid, line[:200], exc)
            raise SandboxError(f"the sandbox sent an unreadable answer: {exc}") from None
        raise CodeInvalid(str(response.get("error") or "the model code is invalid (no reason given)"))

    def _note_isolation(self, isolation: dict[str, str]) -> None:
        # Said once at INFO (the operator wants to know whether the network is cut); limits vary per child.
        level = logging.DEBUG if self.isolation.get("network") == isolation.get("network") else logging.INFO
        logger.log(level, "sandbox isolation: %s", ", ".join(f"{k}: {v}" for k, v in sorted(isolation.items())))
        self.isolation = isolation

    async def _reap(self, child: _Child) -> int:
        """Wait briefly for a child that closed its protocol channel to exit; kill it if it lingers."""
        try:
            async with asyncio.timeout(5.0):
                returncode = await child.proc.wait()
        except TimeoutError:
            await self._kill(child)
            returncode = await child.proc.wait()
        if child.drain is not None:
            # Let the stderr reader catch the last lines, to explain the exit.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await asyncio.shield(child.drain)
        return returncode

    def _spawn_soon(self, delay_s: float = 0.0) -> None:
        if self._closed:
            return
        task = asyncio.get_running_loop().create_task(self._spawn(delay_s), name="tierflow-sandbox-spawn")
        self._spawners.add(task)
        task.add_done_callback(self._spawners.discard)
        task.add_done_callback(_log_task_failure)

    async def _spawn(self, delay_s: float) -> None:
        if delay_s:
            await asyncio.sleep(delay_s)
        try:
            child = await self._start_child()
        except SandboxError as exc:
            self._start_failures += 1
            self._last_start_failure = str(exc)
            backoff = min(0.5 * 2 ** (self._start_failures - 1), 30.0)
            logger.error("sandbox failed to start (%d in a row), retrying in %.1f s: %s",
                         self._start_failures, backoff, exc)
            async with self._changed:
                self._changed.notify_all()
            self._spawn_soon(backoff)
            return
        self._start_failures = 0
        child.state = "ready"
        self._ready.append(child)
        async with self._changed:
            self._changed.notify_all()

    async def _start_child(self) -> _Child:
        try:
            proc = await asyncio.create_subprocess_exec(
                self._python, "-m", _CHILD_MODULE,
                "--memory-mb", str(self._settings.memory_mb),
                "--timeout-s", str(self._settings.timeout_s),
                "--parent-pid", str(os.getpid()),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                limit=MAX_LINE_BYTES,
                # Its own process group, so a kill also takes down whatever the user's code forked.
                start_new_session=True,
            )
        except OSError as exc:
            raise SandboxError(f"cannot run {self._python} -m {_CHILD_MODULE}: {exc}") from exc
        child = _Child(proc)
        self._children.add(child)
        child.drain = asyncio.get_running_loop().create_task(
            self._drain_stderr(child), name=f"tierflow-sandbox-stderr-{proc.pid}"
        )
        self._drains.add(child.drain)
        child.drain.add_done_callback(self._drains.discard)
        child.drain.add_done_callback(_log_task_failure)
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(self._startup_timeout_s):
                line = await proc.stdout.readline()
        except TimeoutError:
            await self._kill(child)
            raise SandboxError(f"a sandbox did not become ready within {self._startup_timeout_s:g} s") from None
        if not line:
            returncode = await self._reap(child)
            reason = describe_exit(returncode, self._settings.memory_mb, starting=True)
            raise SandboxError(f"a sandbox {reason}; stderr: {child.tail() or '(empty)'}")
        try:
            hello = orjson.loads(line)
        except orjson.JSONDecodeError:
            hello = None
        if not isinstance(hello, dict) or hello.get("ready") is not True:
            await self._kill(child)
            raise SandboxError(f"a sandbox said {line[:200]!r} instead of ready")
        logger.debug("sandbox %d ready", proc.pid)
        return child

    async def _drain_stderr(self, child: _Child) -> None:
        """Read a child's stderr to its end (a full pipe would block it) and keep the tail for crash reports."""
        stream = child.proc.stderr
        assert stream is not None
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line longer than MAX_LINE_BYTES: keep going with what is buffered
                raw = await stream.read(MAX_LINE_BYTES)
            if not raw:
                break
            text = raw.decode("utf-8", "replace").rstrip()
            child.stderr_tail.append(text)
            logger.debug("sandbox %d: %s", child.pid, text)
        returncode = await child.proc.wait()
        if child.state == "ready":
            self._forget_idle_death(child, returncode)

    def _forget_idle_death(self, child: _Child, returncode: int | None = None) -> None:
        """A ready child died before it was used (killed from outside, OOM killer): replace it."""
        if child.state == "gone":
            return
        child.state = "gone"
        with contextlib.suppress(ValueError):
            self._ready.remove(child)
        self._children.discard(child)
        code = child.proc.returncode if returncode is None else returncode
        reason = describe_exit(code, self._settings.memory_mb) if code is not None else "died"
        logger.warning("idle sandbox %d %s; starting another; stderr: %s", child.pid, reason,
                       child.tail() or "(empty)")
        self._spawn_soon()

    async def _kill(self, child: _Child) -> None:
        """Kill a child and its process group (anything it forked), then reap it."""
        child.state = "gone"
        with contextlib.suppress(ValueError):
            self._ready.remove(child)
        proc = child.proc
        if proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.close()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()
        self._children.discard(child)


# -- child side ------------------------------------------------------------------------------------------

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
#: Files the user's code may write (bytes); beyond it a write fails with EFBIG instead of filling the disk.
_FSIZE_LIMIT = 8 * 1024 * 1024
#: Processes/threads the user's code may add (the per-user count is global, so leave room for others).
_NPROC_MARGIN = 64

_WARMUP_CODE = "warmup_in = keras.Input(shape=4)\nwarmup = keras.Model(warmup_in, keras.layers.Dense(2)(warmup_in))\n"


class _Channel:
    """The protocol channel: a private dup of the real stdout, with fd 1 re-pointed at stderr."""

    def __init__(self) -> None:
        self._fd = os.dup(1)
        os.dup2(2, 1)

    def send(self, message: dict[str, Any]) -> None:
        data = memoryview(orjson.dumps(message) + b"\n")
        while data:
            data = data[os.write(self._fd, data):]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this child when the parent goes (prctl); exit now if it already went."""
    if _libc().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        print(f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
    if os.getppid() != parent_pid:
        raise SystemExit(1)


def _cut_network() -> str:
    """Move this process into an empty network namespace; say which way worked, or why none did.

    Done at start, while the process is still single-threaded: CLONE_NEWUSER needs that, and a namespace
    change applies to the calling thread only, so threads TensorFlow starts later inherit it.
    """
    libc = _libc()
    attempts = [(_CLONE_NEWNET, "unshare(CLONE_NEWNET)")]
    attempts.append((_CLONE_NEWUSER | _CLONE_NEWNET, "unshare(CLONE_NEWUSER|CLONE_NEWNET)"))
    failures = []
    for flags, name in attempts:
        if libc.unshare(flags) == 0:
            interfaces = _interfaces()
            if interfaces - {"lo"}:
                return f"{name} succeeded but interfaces remain: {sorted(interfaces)}"
            return f"isolated ({name})"
        failures.append(f"{name}: {os.strerror(ctypes.get_errno())}")
    return "not isolated (" + "; ".join(failures) + ")"


def _interfaces() -> set[str]:
    with open("/proc/self/net/dev") as f:
        return {line.split(":", 1)[0].strip() for line in f.readlines()[2:]}


def _proc_status(pid: str) -> dict[str, str]:
    status: dict[str, str] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, sep, value = line.partition(":")
            if sep:
                status[key] = value.strip()
    return status


def _tasks_of_user(uid: int) -> int:
    count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            status = _proc_status(entry.name)
        except OSError:  # the process ended while we looked
            continue
        if int(status.get("Uid", "-1").split()[0]) == uid:
            count += int(status.get("Threads", "1"))
    return count


def _lower_limit(kind: int, value: int) -> int:
    _, hard = resource.getrlimit(kind)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(kind, (value, value))
    return value


def _apply_limits(memory_mb: int, timeout_s: float) -> dict[str, str]:
    """Resource limits for the user's code; returns what was set (or why not) per limit."""
    notes: dict[str, str] = {}
    vm_bytes = int(_proc_status("self")["VmSize"].split()[0]) * 1024
    limits: list[tuple[str, int, int]] = [
        # TensorFlow already reserved its address space (imported and warmed up): only the user's code's
        # growth counts against memory_mb.
        ("RLIMIT_AS", resource.RLIMIT_AS, vm_bytes + memory_mb * 1024 * 1024),
        ("RLIMIT_FSIZE", resource.RLIMIT_FSIZE, _FSIZE_LIMIT),
        ("RLIMIT_CORE", resource.RLIMIT_CORE, 0),
    ]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_budget = math.ceil(usage.ru_utime + usage.ru_stime + timeout_s * (os.cpu_count() or 1)) + 5
    limits.append(("RLIMIT_CPU", resource.RLIMIT_CPU, cpu_budget))
    if os.geteuid() == 0:
        notes["RLIMIT_NPROC"] = "not enforced for root"
    else:
        limits.append(("RLIMIT_NPROC", resource.RLIMIT_NPROC, _tasks_of_user(os.getuid()) + _NPROC_MARGIN))
    # A write past RLIMIT_FSIZE then fails with EFBIG (an exception in the user's code), not a signal.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    for name, kind, value in limits:
        try:
            notes[name] = str(_lower_limit(kind, value))
        except (ValueError, OSError) as exc:
            notes[name] = f"not set: {exc}"
    return notes


def _bootstrap_environment() -> None:
    # Process bootstrap, not settings: TensorFlow reads these at import. Validation only needs shapes, so
    # it never touches a GPU; INFO/WARNING log lines go nowhere useful.
    os.environ["CUDA_VISIBLE_DEVICES"] = "-1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _child_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {_CHILD_MODULE}",
                                     description="one-shot model-code validation sandbox (see SandboxPool)")
    parser.add_argument("--memory-mb", type=int, required=True)
    parser.add_argument("--timeout-s", type=float, required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args(argv)

    channel = _Channel()
    _die_with_parent(args.parent_pid)
    isolation = {"network": _cut_network()}
    _bootstrap_environment()

    from tierflow.tiers import keras_code

    tf, _ = keras_code.load_keras()
    # Building a model needs little compute; one thread each keeps pool children light on small machines.
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    # Warm Keras up (eager context, layer code paths, JSON loading) before measuring the address space.
    warm = keras_code.build_model(_WARMUP_CODE)
    keras_code.summarize(keras_code.build_model(warm.to_json()))
    channel.send({"ready": True, "pid": os.getpid()})

    line = sys.stdin.buffer.readline()
    if not line:
        return 0  # the pool closed before using this child
    try:
        request = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        print(f"unreadable request: {exc}", file=sys.stderr)
        return 2
    code = request.get("code") if isinstance(request, dict) else None
    imports = request.get("imports", "") if isinstance(request, dict) else None
    if not isinstance(code, str) or not isinstance(imports, str):
        print("a request is {\"code\": str, \"imports\": str}", file=sys.stderr)
        return 2

    isolation.update(_apply_limits(args.memory_mb, args.timeout_s))
    response: dict[str, Any]
    try:
        summary = keras_code.summarize(keras_code.build_model(code, imports))
        response = {"ok": True, "summary": summary}
    except keras_code.ModelCodeError as exc:
        message = exc.message
        if exc.cause in ("MemoryError", "ResourceExhaustedError"):
            message += f" (out of memory: model code may use {args.memory_mb} MB on top of TensorFlow)"
        response = {"ok": False, "error": message}
    except MemoryError:
        response = {"ok": False, "error": f"MemoryError: the model needs more than the {args.memory_mb} MB "
                                          "the sandbox allows on top of TensorFlow"}
    except Exception as exc:  # Keras failing on the built model (e.g. while summarizing): the code's fault
        response = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[: keras_code.MAX_MESSAGE_CHARS]}
    response["isolation"] = isolation
    channel.send(response)
    sys.stderr.flush()
    # Skip interpreter shutdown: it would wait for threads and atexit hooks the user's code may have left.
    os._exit(0)


if __name__ == "__main__":
    raise SystemExit(_child_main(sys.argv[1:]))
