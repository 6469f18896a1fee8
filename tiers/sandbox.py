"""The model-code validation sandbox, parent side: warm, single-use sandboxes forked from one zygote.

Callers: the validator agent (streams/validator.py, `sandbox_validate`) builds model code before a
RegisterModel / UpdateModel is decided: `summary = await pool.validate(code, imports)`. Neither it nor this
module imports TensorFlow or executes the code (DESIGN, Principles).

The pool starts one **zygote** (tiers/sandbox_child.py: the child side, security-critical, reads on its own)
under bubblewrap (tiers/sandbox_bwrap.py: what the sandbox sees) with a scrubbed environment. The zygote imports
TensorFlow once; for each sandbox the pool asks it to fork a fresh **runner** that enters namespaces of its own,
warms up and waits, so `pool_size` runners are always ready. A validation goes to one ready runner, which builds
that one piece of code and exits; a new runner is forked to replace it (tens of milliseconds plus a warm-up,
where a fresh TensorFlow process takes seconds), so one user's code never shares a process with another's.

Protocol: the pool and the zygote talk over a SOCK_SEQPACKET pair, one JSON object per packet: the pool sends
`{"fork": id}` with the runner's socket attached (SCM_RIGHTS) and `{"kill": id}`; the zygote says
`{"ready": true, "isolation": {...}}` once, or `{"error": "..."}` when it refuses to run (isolation missing),
and `{"exited": id, "returncode": n}` for each runner. Each runner talks to the pool on its own stream socket:
`{"ready": true, "isolation": {...}}` (or `{"error": ...}`), then one request line `{"code", "imports"}`,
`{"accepted": true}` before any of the code runs (so a runner that died idle is told apart from code that
killed it), one answer line `{"ok": true, "summary": {...}}` or `{"ok": false, "error": "..."}`. The zygote
never sees code.

Isolation levels (TIERFLOW_SANDBOX_ISOLATION): `bwrap` (the default: namespaces, see sandbox_bwrap), `landlock`
(where namespaces are refused, e.g. a `restricted` Kubernetes pod: no bwrap, the zygote and each runner
confine themselves with Landlock and seccomp before TensorFlow loads, see sandbox_confine; the runners' scratch
directories live under a private folder the pool makes), `none` (no isolation: code you trust only).

Fails closed: a missing or failing bwrap, Landlock or seccomp, or a sandbox whose checks find root,
capabilities, a network interface or a socket it could open, refuses to run code and says how to get the
isolation; `pool.isolation` says which level is in force (for /readyz and the UI).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from tierflow.streams.settings import SandboxSettings
from tierflow.tiers import sandbox_confine
from tierflow.tiers.sandbox_bwrap import (
    HOW_TO_GET_IT,
    SANDBOX_UID,
    BwrapMissing,
    bwrap_argv,
    find_bwrap,
    installation_paths,
    system_roots,
)

logger = logging.getLogger("tierflow.sandbox")

#: How long the zygote may take to import TensorFlow, and a runner to warm up (seconds; 2-6 s when idle).
STARTUP_TIMEOUT_S = 120.0
#: After this many failed starts in a row, validate() fails fast instead of waiting for a sandbox.
MAX_START_FAILURES = 3
#: Longest line either side sends (the request carries the code; the API caps bodies well below this).
MAX_LINE_BYTES = 16 * 1024 * 1024
#: How many lines of the zygote's stderr are kept to explain a failed start.
STDERR_TAIL_LINES = 20

_CHILD_MODULE = "tierflow.tiers.sandbox_child"

#: The sandbox's whole environment (nothing of the caller's: its secrets stay out). Process bootstrap for
#: TensorFlow, not settings: validation only needs shapes, so no GPU, one BLAS thread (the zygote must stay
#: single-threaded to fork safely), Keras 2 for Kafka-ML's idioms.
CHILD_ENV = {
    "PATH": "/usr/bin:/bin",
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONNOUSERSITE": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "CUDA_VISIBLE_DEVICES": "-1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "TF_USE_LEGACY_KERAS": "1",
}

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




def how_to_get(isolation: str) -> str:
    """What to do when the isolation level `isolation` is missing."""
    return sandbox_confine.HOW_TO_GET_IT if isolation == "landlock" else HOW_TO_GET_IT


class _RunnerLost(Exception):
    """A runner ended before it took the request (killed while idle, even if its death had not shown yet)."""


def scrub(text: str, secrets: tuple[str, ...]) -> str:
    """`text` with every known secret value replaced (defence in depth: the sandbox cannot read them)."""
    for secret in secrets:
        if len(secret) >= 4:
            text = text.replace(secret, "[redacted]")
    return text


# -- parent side -----------------------------------------------------------------------------------------

_State = Literal["starting", "ready", "busy", "gone"]


@dataclass(eq=False)
class _Runner:
    """One single-use sandbox, as the pool sees it: its socket and, once the zygote reports it, its exit."""

    id: int
    exited: asyncio.Future[int]
    sock: socket.socket
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    state: _State = "starting"

    def gone(self) -> bool:
        """Whether the runner is known dead or its socket is at EOF (it died before the zygote could say so)."""
        if self.exited.done() or self.sock.fileno() < 0:
            return True
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def close(self) -> None:
        if self.writer is not None:
            if not self.writer.is_closing():
                self.writer.close()
        else:
            self.sock.close()


@dataclass(eq=False)
class _Zygote:
    """The pool's zygote process (bwrap's tree when isolated) and its control socket."""

    proc: asyncio.subprocess.Process
    control: socket.socket
    hello: asyncio.Future[dict[str, Any]]
    runners: dict[int, _Runner] = field(default_factory=dict)
    stderr_tail: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=STDERR_TAIL_LINES)
    )
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    dead: bool = False
    #: The pool stopped it (its death needs no explaining).
    stopped: bool = False
    #: The landlock level's folder of runner scratch directories (removed with the zygote).
    scratch_root: str = ""

    def tail(self) -> str:
        return " | ".join(line for line in self.stderr_tail if line.strip())

    async def send(self, message: dict[str, Any], fd: int | None = None) -> None:
        """One packet to the zygote (with `fd` attached); waits while the socket is full."""
        data = orjson.dumps(message)
        loop = asyncio.get_running_loop()
        while True:
            try:
                socket.send_fds(self.control, [data], [fd] if fd is not None else [])
                return
            except BlockingIOError:
                writable = loop.create_future()
                loop.add_writer(self.control, writable.set_result, None)
                try:
                    await writable
                finally:
                    loop.remove_writer(self.control)


def _log_task_failure(task: asyncio.Task[None]) -> None:
    """Background tasks have no caller to raise to: a failure (a bug) is logged, never lost."""
    if not task.cancelled() and task.exception() is not None:
        logger.error("sandbox pool task %s failed", task.get_name(), exc_info=task.exception())


def _descendants(root: int) -> list[int]:
    """`root` and every process below it (host pids)."""
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo.extend(int(child) for child in f.read().split())
    return found


class SandboxPool:
    """A warm pool of single-use validation sandboxes.

    `await pool.start()` starts the zygote and forks `settings.pool_size` runners in the background;
    `await pool.validate(code)` waits for a ready one (at most `pool_size` validations run at once; the rest
    queue), returns a `ModelSummary` or raises `CodeInvalid` / `SandboxError`, and forks a replacement;
    `await pool.close()` kills every sandbox. Also an async context manager.
    """

    def __init__(self, settings: SandboxSettings, python: str = sys.executable, *,
                 startup_timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        self._settings = settings
        self._python = python
        self._startup_timeout_s = startup_timeout_s
        self._ready: collections.deque[_Runner] = collections.deque()
        self._spawners: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(settings.pool_size)
        self._changed = asyncio.Condition()
        self._zygote: _Zygote | None = None
        self._runners: set[_Runner] = set()
        self._zygote_lock = asyncio.Lock()
        self._ids = itertools.count(1)
        self._start_failures = 0
        self._last_start_failure = ""
        self._started = False
        self._closed = False
        #: The isolation in force: "level" (bwrap | none) and what the sandboxes reported; for /readyz and the UI.
        self.isolation: dict[str, str] = {"level": settings.isolation}

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
        """Host process ids of the whole sandbox tree (bwrap, zygote, every runner and what they forked)."""
        zygote = self._zygote
        if zygote is None or zygote.proc.returncode is not None:
            return []
        return sorted(_descendants(zygote.proc.pid))

    def memory_bytes(self) -> int:
        """Proportional set size of the whole sandbox tree (shared pages split among the processes sharing them)."""
        total = 0
        for pid in self.pids:
            with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        return total

    async def start(self) -> None:
        """Start the zygote and the runners in the background; returns at once (see `wait_warm`)."""
        if self._started:
            return
        if self._closed:
            raise SandboxError("the sandbox pool is closed")
        self._started = True
        for _ in range(self._settings.pool_size):
            self._spawn_soon()

    async def wait_warm(self, timeout_s: float | None = None) -> None:
        """Wait until `pool_size` runners are ready (for readiness checks, tests and benchmarks)."""
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
            for _ in range(MAX_START_FAILURES):
                runner = await self._acquire()
                try:
                    return await self._run(runner, code, imports)
                except _RunnerLost:
                    continue  # it died idle, before taking the code: the code is not to blame, try another
                finally:
                    await self._retire(runner)
                    self._spawn_soon()
            raise SandboxError(f"{MAX_START_FAILURES} sandboxes in a row died before taking the code")

    async def close(self) -> None:
        """Kill every sandbox (and anything it forked) and stop refilling; idempotent."""
        self._closed = True
        spawners = list(self._spawners)
        for task in spawners:
            task.cancel()
        await asyncio.gather(*spawners, return_exceptions=True)
        if self._zygote is not None:
            await self._stop_zygote(self._zygote)
        self._ready.clear()
        async with self._changed:
            self._changed.notify_all()

    # -- internals ---------------------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        return scrub(text, self._settings.secrets)

    def _raise_if_broken(self) -> None:
        if self._closed:
            raise SandboxError("the sandbox pool is closed")
        if self._start_failures >= MAX_START_FAILURES and not self._ready:
            raise SandboxError(
                f"sandboxes keep failing to start ({self._start_failures} times in a row); "
                f"last failure: {self._last_start_failure}"
            )

    async def _acquire(self) -> _Runner:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._startup_timeout_s
        async with self._changed:
            while True:
                while self._ready:
                    runner = self._ready.popleft()
                    if not runner.gone():
                        runner.state = "busy"
                        return runner
                    self._forget_idle_death(runner, runner.exited.result() if runner.exited.done() else None)
                self._raise_if_broken()
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise SandboxError(f"no sandbox became ready within {self._startup_timeout_s:g} s")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await self._changed.wait()

    async def _run(self, runner: _Runner, code: str, imports: str) -> ModelSummary:
        assert runner.reader is not None and runner.writer is not None
        request = orjson.dumps({"code": code, "imports": imports}) + b"\n"
        timeout_s = self._settings.timeout_s
        line = b""
        accepted = False
        try:
            async with asyncio.timeout(timeout_s):
                runner.writer.write(request)
                await runner.writer.drain()
                # The runner says it took the request before it runs anything of it (see _RunnerLost).
                first = await runner.reader.readline()
                if not first:
                    raise _RunnerLost
                if first.rstrip() != b'{"accepted":true}':
                    raise SandboxError(f"the sandbox said {first[:200]!r} instead of accepting the code")
                accepted = True
                line = await runner.reader.readline()
        except TimeoutError:
            logger.warning("sandbox %d: model code ran past the %g s timeout; killing it", runner.id, timeout_s)
            raise SandboxError(
                f"building the model took longer than {timeout_s:g} s (an endless loop, or too much work "
                "while defining the model?); the sandbox was stopped"
            ) from None
        except (BrokenPipeError, ConnectionResetError):
            if not accepted:
                raise _RunnerLost from None
            line = b""  # it died building the model: explained by its exit status below
        except ValueError as exc:  # the answer line overran MAX_LINE_BYTES
            raise SandboxError(f"the sandbox sent an oversized answer: {exc}") from None
        if not line:
            returncode = await self._exit_status(runner)
            if self._closed:
                raise SandboxError("the sandbox pool was closed during the validation")
            reason = describe_exit(returncode, self._settings.memory_mb)
            logger.warning("sandbox %d %s", runner.id, reason)
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
            logger.error("sandbox %d sent an unreadable answer %r: %s", runner.id, line[:200], exc)
            raise SandboxError(self._scrub(f"the sandbox sent an unreadable answer: {exc}")) from None
        raise CodeInvalid(self._scrub(str(response.get("error") or "the model code is invalid (no reason given)")))

    def _note_isolation(self, report: dict[str, str]) -> None:
        merged = {**self.isolation, **report}
        if merged != self.isolation:
            # Said at INFO when it changes (the operator wants to know what holds); limits vary per runner.
            level = logging.DEBUG if set(merged) == set(self.isolation) else logging.INFO
            logger.log(level, "sandbox isolation: %s", ", ".join(f"{k}: {v}" for k, v in sorted(merged.items())))
        self.isolation = merged

    async def _exit_status(self, runner: _Runner) -> int:
        """How a runner that closed its socket ended (the zygote reports it); killed if it lingers."""
        for attempt in range(2):
            try:
                async with asyncio.timeout(5.0):
                    return await asyncio.shield(runner.exited)
            except TimeoutError:
                if attempt == 0:
                    await self._kill(runner)
        return -signal.SIGKILL

    async def _kill(self, runner: _Runner) -> None:
        zygote = self._zygote
        if zygote is not None and not zygote.dead and not runner.exited.done():
            with contextlib.suppress(OSError):
                await zygote.send({"kill": runner.id})

    async def _retire(self, runner: _Runner) -> None:
        """A used runner goes, whatever it did: killing its keeper takes its whole pid namespace down."""
        runner.state = "gone"
        runner.close()
        self._runners.discard(runner)
        await self._kill(runner)

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
            runner = await self._start_runner()
        except SandboxError as exc:
            self._start_failures += 1
            self._last_start_failure = self._scrub(str(exc))
            self.isolation["error"] = self._last_start_failure
            backoff = min(0.5 * 2 ** (self._start_failures - 1), 30.0)
            logger.error("sandbox failed to start (%d in a row), retrying in %.1f s: %s",
                         self._start_failures, backoff, exc)
            async with self._changed:
                self._changed.notify_all()
            self._spawn_soon(backoff)
            return
        self._start_failures = 0
        self.isolation.pop("error", None)
        runner.state = "ready"
        self._ready.append(runner)
        async with self._changed:
            self._changed.notify_all()

    async def _start_runner(self) -> _Runner:
        zygote = await self._running_zygote()
        started = asyncio.get_running_loop().time()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        runner = _Runner(next(self._ids), asyncio.get_running_loop().create_future(), ours)
        zygote.runners[runner.id] = runner
        self._runners.add(runner)
        try:
            try:
                await zygote.send({"fork": runner.id}, theirs.fileno())
            finally:
                theirs.close()
            runner.reader, runner.writer = await asyncio.open_unix_connection(sock=ours, limit=MAX_LINE_BYTES)
        except OSError as exc:
            await self._retire(runner)
            raise SandboxError(f"cannot ask the sandbox zygote for a sandbox: {exc}") from exc
        try:
            async with asyncio.timeout(self._startup_timeout_s):
                line = await runner.reader.readline()
        except TimeoutError:
            await self._retire(runner)
            raise SandboxError(f"a sandbox did not become ready within {self._startup_timeout_s:g} s") from None
        if not line:
            returncode = await self._exit_status(runner)
            await self._retire(runner)
            raise SandboxError(f"a sandbox {describe_exit(returncode, self._settings.memory_mb, starting=True)}")
        try:
            hello = orjson.loads(line)
        except orjson.JSONDecodeError:
            hello = None
        if not isinstance(hello, dict) or hello.get("ready") is not True:
            await self._retire(runner)
            if isinstance(hello, dict) and "error" in hello:
                raise SandboxError(f"a sandbox refused to start: {hello['error']}; "
                                   f"{how_to_get(self._settings.isolation)}")
            raise SandboxError(f"a sandbox said {line[:200]!r} instead of ready")
        if isinstance(hello.get("isolation"), dict):
            self._note_isolation({str(k): str(v) for k, v in hello["isolation"].items()})
        logger.debug("sandbox %d ready in %.2f s", runner.id, asyncio.get_running_loop().time() - started)
        return runner

    async def _running_zygote(self) -> _Zygote:
        async with self._zygote_lock:
            if self._closed:
                raise SandboxError("the sandbox pool is closed")
            zygote = self._zygote
            if zygote is None or zygote.dead:
                if zygote is not None:
                    await self._stop_zygote(zygote)
                zygote = self._zygote = await self._start_zygote()
            return zygote

    async def _start_zygote(self) -> _Zygote:
        settings = self._settings
        command = [self._python, "-m", _CHILD_MODULE, "--isolation", settings.isolation,
                   "--memory-mb", str(settings.memory_mb), "--timeout-s", str(settings.timeout_s)]
        isolated = settings.isolation != "none"
        how = how_to_get(settings.isolation)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        command += ["--control-fd", str(theirs.fileno())]
        argv = command
        as_root = os.geteuid() == 0
        scratch_root = ""
        if settings.isolation == "bwrap":
            try:
                bwrap = find_bwrap(settings.bwrap)
                readonly = installation_paths()
            except BwrapMissing as exc:
                ours.close()
                theirs.close()
                self._start_failures = MAX_START_FAILURES  # not there: retrying will not make it appear
                raise SandboxError(str(exc)) from None
            self.isolation["tool"] = bwrap
            if as_root:
                command += ["--drop-to", str(SANDBOX_UID)]
            argv = bwrap_argv(bwrap, command, readonly=readonly, as_root=as_root, system=system_roots())
        elif settings.isolation == "landlock":
            self.isolation["tool"] = "landlock + seccomp"
            # The runners' scratch directories: a private folder (0700) of the sandbox's user (this one's).
            scratch_root = tempfile.mkdtemp(prefix="tierflow-sandbox-")
            command += ["--scratch-root", scratch_root]
        else:
            self.isolation["warning"] = ("model code runs without isolation (TIERFLOW_SANDBOX_ISOLATION=none): "
                                         "only its environment is scrubbed and its resources limited")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE, env=CHILD_ENV, pass_fds=(theirs.fileno(),),
                limit=MAX_LINE_BYTES,
                # Its own process group: closing the pool kills the whole tree at once.
                start_new_session=True,
            )
        except OSError as exc:
            ours.close()
            if scratch_root:
                shutil.rmtree(scratch_root, ignore_errors=True)
            raise SandboxError(f"cannot run {argv[0]}: {exc}" + (f"; {how}" if isolated else "")) from exc
        finally:
            theirs.close()
        ours.setblocking(False)
        zygote = _Zygote(proc, ours, asyncio.get_running_loop().create_future(), scratch_root=scratch_root)
        loop = asyncio.get_running_loop()
        for coro, name in ((self._drain_stderr(zygote), "stderr"), (self._read_control(zygote), "control")):
            task = loop.create_task(coro, name=f"tierflow-sandbox-{name}-{proc.pid}")
            task.add_done_callback(_log_task_failure)
            zygote.tasks.append(task)
        try:
            async with asyncio.timeout(self._startup_timeout_s):
                hello = await asyncio.shield(zygote.hello)
        except TimeoutError:
            await self._stop_zygote(zygote)
            raise SandboxError(f"the sandbox zygote did not start within {self._startup_timeout_s:g} s") from None
        except SandboxError:
            await self._stop_zygote(zygote)
            raise
        if isinstance(hello.get("isolation"), dict):
            self._note_isolation({str(k): str(v) for k, v in hello["isolation"].items()})
        logger.info("sandbox zygote %d ready (isolation %s)", proc.pid, settings.isolation)
        return zygote

    async def _read_control(self, zygote: _Zygote) -> None:
        """Dispatch the zygote's packets: its hello, then runner exits; on EOF the zygote is gone."""
        loop = asyncio.get_running_loop()
        isolated = self._settings.isolation != "none"
        how = how_to_get(self._settings.isolation)
        while True:
            try:
                data = await loop.sock_recv(zygote.control, 65536)
            except OSError:
                data = b""
            if not data:
                break
            try:
                message = orjson.loads(data)
                if message.get("ready") is True and not zygote.hello.done():
                    zygote.hello.set_result(message)
                elif "error" in message and not zygote.hello.done():
                    zygote.hello.set_exception(SandboxError(
                        f"the sandbox refused to start: {message['error']}" + (f"; {how}" if isolated else "")
                    ))
                elif "exited" in message:
                    runner = zygote.runners.pop(int(message["exited"]), None)
                    if runner is not None:
                        self._note_exit(runner, int(message["returncode"]))
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                # The zygote never says this: treat it as broken and start another.
                logger.error("sandbox zygote %d sent %r (%s); stopping it", zygote.proc.pid, data[:200], exc)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(zygote.proc.pid, signal.SIGKILL)
                break
        zygote.dead = True
        returncode = await zygote.proc.wait()
        if not zygote.hello.done():
            # Let the stderr reader catch the last lines, to explain the exit.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await asyncio.shield(zygote.tasks[0])
            what = describe_exit(returncode, self._settings.memory_mb, starting=True)
            tool = f"the isolation tool ({self.isolation.get('tool')}) or " if isolated else ""
            zygote.hello.set_exception(SandboxError(
                f"{tool}the sandbox zygote {what}; stderr: {zygote.tail() or '(empty)'}"
                + (f"; {how}" if isolated else "")
            ))
        elif not zygote.stopped:
            logger.warning("sandbox zygote %d %s; stderr: %s", zygote.proc.pid,
                           describe_exit(returncode, self._settings.memory_mb), zygote.tail() or "(empty)")
        for runner in list(zygote.runners.values()):
            self._note_exit(runner, -signal.SIGKILL)
        zygote.runners.clear()

    def _note_exit(self, runner: _Runner, returncode: int) -> None:
        if not runner.exited.done():
            runner.exited.set_result(returncode)
        if runner.state == "ready":
            self._forget_idle_death(runner, returncode)

    def _forget_idle_death(self, runner: _Runner, returncode: int | None) -> None:
        """A ready runner died before it was used (killed from outside, OOM killer): replace it."""
        runner.state = "gone"
        runner.close()
        self._runners.discard(runner)
        with contextlib.suppress(ValueError):
            self._ready.remove(runner)
        if self._closed:
            return
        reason = describe_exit(returncode, self._settings.memory_mb) if returncode is not None else "died"
        logger.warning("idle sandbox %d %s; starting another", runner.id, reason)
        self._spawn_soon()

    async def _drain_stderr(self, zygote: _Zygote) -> None:
        """Read the sandbox's stderr to its end (a full pipe would block it); keep the tail to explain a failed
        start. Runners share it, so it never goes into an answer (it may hold another user's output)."""
        stream = zygote.proc.stderr
        assert stream is not None
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line longer than MAX_LINE_BYTES: keep going with what is buffered
                raw = await stream.read(MAX_LINE_BYTES)
            if not raw:
                break
            text = self._scrub(raw.decode("utf-8", "replace").rstrip())
            zygote.stderr_tail.append(text)
            logger.debug("sandbox %d: %s", zygote.proc.pid, text)

    async def _stop_zygote(self, zygote: _Zygote) -> None:
        """Kill the zygote's whole tree (bwrap takes its sandbox down with it), reap it, and wait until the
        kernel has finished the processes inside (they are not our children)."""
        zygote.dead = zygote.stopped = True
        tree = _descendants(zygote.proc.pid) if zygote.proc.returncode is None else []
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(zygote.proc.pid, signal.SIGKILL)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        await zygote.proc.wait()
        for runner in zygote.runners.values():
            runner.close()
        if self._closed:
            for runner in self._runners:
                runner.close()
            self._runners.clear()
        # Both readers end at EOF; waiting for them leaves no transport open.
        await asyncio.gather(*zygote.tasks, return_exceptions=True)
        zygote.control.close()
        await _wait_ended(tree, timeout_s=5.0)
        if zygote.scratch_root:
            shutil.rmtree(zygote.scratch_root, ignore_errors=True)
        if self._zygote is zygote and self._closed:
            self._zygote = None


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _wait_ended(pids: list[int], timeout_s: float) -> None:
    """Wait until every process in `pids` has ended (a pidfd turns readable when its process exits)."""
    loop = asyncio.get_running_loop()
    waits: list[tuple[int, asyncio.Future[None]]] = []
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except OSError:  # gone already
            continue
        ended: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, _settle, ended)
        waits.append((fd, ended))
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(*(ended for _, ended in waits))
    finally:
        for fd, _ in waits:
            loop.remove_reader(fd)
            os.close(fd)
