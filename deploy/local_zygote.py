"""The local launcher's tier zygote: one process that imports the tier agent, Faust, LiteRT and (for Keras tiers)
TensorFlow once, and forks every local tier workload from there instead of starting a fresh interpreter for it.

Why: a Keras tier spends most of its start importing TensorFlow (3.5-4 CPU s on the 2-core reference machine),
and the tiers of an inference start together, so on two cores their first answers waited 10-17 s, most of it
for several copies of one import. Forked from a process that holds the import already, a tier pays only for its
own work: its download, its consumer's join, its model's load.

What a forked workload gets is what `python -m tierflow.deploy.local_launcher run DIR` gives one (see
local_launcher): a supervisor in a session of its own (forked from the zygote, so it outlives the worker) that
appends the workload's output to DIR/log, runs the workload as its child (forked again; it dies with the
supervisor: PR_SET_PDEATHSIG), forwards SIGTERM/SIGINT/SIGHUP to it and writes DIR/exit_code when it ends.
The workload's environment replaces the zygote's entirely (the zygote's own is the workloads' common one, less
the stack's secrets, so nothing it holds is secret); the workload runs the `tierflow` front door in-process
(`tierflow.deploy.cli.main(args)`), with default signal handlers and a fresh event loop.

Protocol, over a SOCK_SEQPACKET socket pair (one JSON message per datagram; the launcher holds the other end):

* zygote -> launcher, once: `{"ready": true, "pid": P, "seconds": S}` when its imports are done, or
  `{"error": "..."}` (then it exits);
* launcher -> zygote: `{"launch": DIR, "args": [...]}` with one descriptor attached (SCM_RIGHTS): the read end of
  a pipe holding the workload's environment as JSON. The zygote hands it to the forked supervisor unread, so
  no workload's secret (its API token) ever passes through the zygote's memory into another workload's copy;
* zygote -> launcher: `{"launched": DIR, "pid": P}` once it wrote DIR/pid, or `{"failed": DIR, "error": "..."}`.

The zygote exits when the launcher's end closes (the worker stopped, or died: the kernel closes it then).

Forking is safe only from a single-threaded process: fork() copies the calling thread alone, and a lock another
thread held stays held in the child forever. The zygote checks that it runs one thread after its imports
(OpenBLAS starts a pool at numpy's import unless OPENBLAS_NUM_THREADS=1, which the zygote runs with) and that
no asyncio event loop exists yet (children would share its epoll descriptor). TensorFlow creates its thread
pools at its first operation, in each child, so a tier's `--threads` still applies.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import fcntl
import gc
import importlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from tierflow.deploy.local_launcher import (
    _FORWARDED,
    LOG_FILE,
    PID_FILE,
    CannotStart,
    _die_with_parent,
    _proc_stat,
    _read_pid,
    _write_atomic,
    is_alive,
    supervise,
    workload_environment,
)
from tierflow.tiers.sandbox_child import thread_count

log = logging.getLogger("tierflow.launcher.zygote")

#: What the zygote imports before it forks anything: the tier agent and its Faust app, the front door's parser
#: and the LiteRT interpreter; `module:function` calls the function once (without arguments), and a module that
#: is not installed is skipped.
BASE_PRELOAD: tuple[str, ...] = (
    "tierflow.deploy.cli:build_parser",
    "tierflow.tiers.tier_app",
    "ai_edge_litert.interpreter",
)
#: What Keras tiers need too: TensorFlow with tf-keras. With it, three LiteRT tiers and their zygote held 507 MiB
#: (PSS, measured) instead of 146 MiB, so it is preloaded only where tiers serve with Keras (`preload_for`).
KERAS_PRELOAD: tuple[str, ...] = ("tierflow.tiers.keras_code:load_keras",)
DEFAULT_PRELOAD = BASE_PRELOAD + KERAS_PRELOAD
#: What a forked workload runs: `function(args) -> exit code`.
DEFAULT_ENTRY = "tierflow.deploy.cli:main"
#: Set for the zygote only: numpy's OpenBLAS would otherwise start a thread pool at import.
ZYGOTE_ENV = {"OPENBLAS_NUM_THREADS": "1"}
#: Where the zygote's own output goes, in the launcher's state folder (a file: `LocalLauncher.list` skips it).
ZYGOTE_LOG = ".tier-zygote.log"
#: A pipe's default capacity on Linux; a larger workload environment grows its pipe (up to pipe-max-size).
_PIPE_BYTES = 1 << 16
_MAX_MESSAGE = 1 << 16
#: The byte that lets a forked supervisor go on once the zygote recorded it (without it, it exits unseen).
_GO = b"g"


def preload_for(engine: str) -> tuple[str, ...]:
    """What to preload for the stack's tier engine (TIERFLOW_TIER_ENGINE): TensorFlow only for "keras". With
    "auto" a tier serves the `.tflite` every trained result has (a result without one still serves with Keras:
    its tier imports TensorFlow itself, as a fresh interpreter would)."""
    return DEFAULT_PRELOAD if engine == "keras" else BASE_PRELOAD


class ZygoteUnavailable(Exception):
    """The zygote cannot fork this workload (it failed to start, died, or refused): start it the plain way."""


# --- the zygote process ---------------------------------------------------------------------------------------


def _resolve(spec: str) -> tuple[Any, str]:
    """(module, function name or "") of a `module[:function]` spec."""
    module_name, _, function = spec.partition(":")
    return importlib.import_module(module_name), function


def preload(specs: Sequence[str]) -> list[str]:
    """Import (and call) each spec; the ones skipped because a module is not installed."""
    skipped = []
    for spec in specs:
        try:
            module, function = _resolve(spec)
        except ModuleNotFoundError as exc:
            skipped.append(f"{spec} ({exc})")
            continue
        if function:
            getattr(module, function)()
    return skipped


def check_forkable() -> None:
    """Raise unless forking this process is safe: one thread, no asyncio event loop."""
    threads = thread_count()
    if threads != 1:
        raise RuntimeError(f"the zygote runs {threads} threads after its imports; forking it is unsafe")
    policy: Any = asyncio.get_event_loop_policy()
    local = getattr(policy, "_local", None)
    if getattr(local, "_loop", None) is not None:
        raise RuntimeError("an asyncio event loop exists after the zygote's imports; its children would share it")


def _exit_code(value: object) -> int:
    """The exit code of an entry's return value or of a SystemExit's code, as the interpreter would exit."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    print(value, file=sys.stderr)
    return 1


def run_entry(entry: Callable[[list[str]], object], args: list[str]) -> int:
    """Run the workload's entry point as a fresh interpreter would run `tierflow <args>`, then its exit handlers."""
    try:
        code = _exit_code(entry(args))
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:
        traceback.print_exc()
        code = 1
    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()
    if code == -signal.SIGINT:  # as an interpreter does after an uncaught KeyboardInterrupt: die by SIGINT
        _flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        code = 130
    return code


class Forked:
    """A workload forked by its supervisor (local_launcher.Child)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def send_signal(self, signum: int, /) -> None:
        if self.returncode is None:  # once reaped, its pid may be another process's
            os.kill(self.pid, signum)

    def wait(self) -> int:
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def fork_workload(entry: Callable[[list[str]], object], args: list[str]) -> Forked:
    """Fork the workload from its supervisor: it dies with the supervisor, with default signal handlers."""
    die_with_supervisor = _die_with_parent(os.getpid())
    # A stop signal that arrives around the fork waits, blocked, until each side has its handlers: the supervisor
    # then forwards it (or queues it until it knows the child), the workload takes it with the default action.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)
    try:
        pid = os.fork()
    except OSError as exc:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        raise CannotStart(f"cannot fork the workload: {exc}") from exc
    if pid != 0:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        return Forked(pid)
    code = 1
    try:
        die_with_supervisor()
        for sig in _FORWARDED:
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        sys.argv = ["tierflow", *args]
        code = run_entry(entry, args)
    finally:
        _flush()
        os._exit(code)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _redirect_output(log_path: Path) -> None:
    _flush()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    out = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)


def supervisor(workload_dir: Path, args: list[str], env_fd: int, entry: Callable[[list[str]], object]) -> int:
    """The forked supervisor: its own session and output, the workload's environment, then `supervise`."""
    os.setsid()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the zygote ignores it; a supervisor waits for its child
    _redirect_output(workload_dir / LOG_FILE)
    env = orjson.loads(_read_all(env_fd))
    os.close(env_fd)
    os.environ.clear()
    os.environ.update(env)
    return supervise(workload_dir, lambda: fork_workload(entry, args))


class Zygote:
    """The zygote's loop: one fork per request, until the launcher's end closes."""

    def __init__(self, control: socket.socket, entry: Callable[[list[str]], object]) -> None:
        self.control = control
        self.entry = entry

    def send(self, message: Mapping[str, Any]) -> None:
        self.control.send(orjson.dumps(message))

    def serve(self) -> int:
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.control, _MAX_MESSAGE, 1)
            except ConnectionError:
                return 0
            if not data:
                return 0  # the launcher's end closed
            workload = "?"
            try:
                request = orjson.loads(data)
                workload = str(request["launch"])
                if len(fds) != 1:
                    raise ValueError("a launch request carries exactly one descriptor (its environment)")
                pid = self.launch(Path(workload), [str(a) for a in request["args"]], fds[0])
            except Exception as exc:  # one bad request must not stop the zygote
                self.send({"failed": workload, "error": f"{type(exc).__name__}: {exc}"})
            else:
                self.send({"launched": workload, "pid": pid})
            finally:
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)

    def launch(self, workload_dir: Path, args: list[str], env_fd: int) -> int:
        """Fork the workload's supervisor, record its pid and start time in DIR/pid, then let it go on."""
        gate_read, gate_write = os.pipe()
        try:
            pid = os.fork()
        except OSError:
            os.close(gate_read)
            os.close(gate_write)
            raise
        if pid == 0:
            code = 1
            try:
                self.control.close()
                os.close(gate_write)
                # It goes on once the zygote recorded it; if the zygote gave up on it (or died), it exits unseen.
                recorded = os.read(gate_read, 1) == _GO
                os.close(gate_read)
                code = supervisor(workload_dir, args, env_fd, self.entry) if recorded else 0
            except BaseException:
                traceback.print_exc()
            finally:
                _flush()
                os._exit(code)
        os.close(gate_read)
        try:
            stat = _proc_stat(pid)  # it waits at the gate, so it is there
            if stat is None:
                raise RuntimeError(f"the supervisor (pid {pid}) vanished before it was recorded")
            _write_atomic(workload_dir / PID_FILE, f"{pid} {stat[2]}\n")
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            raise
        else:
            os.write(gate_write, _GO)
        finally:
            os.close(gate_write)
        return pid


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tierflow.deploy.local_zygote",
                                     description="the local launcher's tier zygote (see tierflow.deploy.local_zygote)")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--preload", action="append", default=None, metavar="MODULE[:FUNCTION]",
                        help="what to import before forking (repeatable; default: DEFAULT_PRELOAD)")
    parser.add_argument("--no-preload", action="store_true", help="import nothing but the entry point")
    parser.add_argument("--entry", default=DEFAULT_ENTRY, metavar="MODULE:FUNCTION")
    args = parser.parse_args(argv)
    control = socket.socket(fileno=args.control_fd)
    started = time.monotonic()
    try:
        skipped = preload(() if args.no_preload else args.preload or DEFAULT_PRELOAD)
        module, function = _resolve(args.entry)
        entry = getattr(module, function)
        # Park what the imports made in the permanent generation: the children's collections skip those millions
        # of objects and leave their pages shared with the zygote.
        gc.collect()
        gc.freeze()
        # A workload configures logging itself (`basicConfig` does nothing where the root logger has a handler
        # already, as when a preload logged something): it starts from what a fresh interpreter has.
        logging.root.handlers.clear()
        check_forkable()
    except Exception as exc:
        control.send(orjson.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 3
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # its supervisors are reaped by the kernel
    control.send(orjson.dumps({"ready": True, "pid": os.getpid(), "seconds": round(time.monotonic() - started, 3),
                               "skipped": skipped}))
    return Zygote(control, entry).serve()


# --- the launcher's side --------------------------------------------------------------------------------------


class TierZygote:
    """The worker's handle on its zygote (local_launcher.Forker): start it, fork workloads from it, close it.

    `env`: the zygote's environment (the workloads' common one, less every secret); `log_path`: its output.
    `preload` and `entry`: as `main`'s flags (tests pass small ones). `start()` returns at once; `launch`
    waits up to `ready_timeout_s` for the imports and `reply_timeout_s` for a fork, and raises ZygoteUnavailable
    when the zygote cannot fork the workload (then it is stopped and never used again).
    """

    def __init__(self, env: Mapping[str, str], log_path: Path, *, preload: Sequence[str] | None = None,
                 entry: str = DEFAULT_ENTRY, ready_timeout_s: float = 120.0, reply_timeout_s: float = 30.0) -> None:
        self.env = {**env, **ZYGOTE_ENV}
        self.log_path = log_path
        self.preload = preload
        self.entry = entry
        self.ready_timeout_s = ready_timeout_s
        self.reply_timeout_s = reply_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._socket: socket.socket | None = None
        self._ready: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._broken: str | None = None

    @classmethod
    def for_workloads(cls, workload_env: Mapping[str, str], state_dir: Path, engine: str) -> TierZygote:
        """The zygote of a local launcher whose workloads get `workload_env` on top of this process's environment:
        its own environment is theirs less every secret (each forked workload gets its whole environment, its own
        token included, from the launcher through a pipe); its log is in `state_dir`; it preloads what tiers of
        `engine` need."""
        return cls(workload_environment(workload_env), state_dir / ZYGOTE_LOG, preload=preload_for(engine))

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start the zygote in the background (idempotent; needs a running event loop)."""
        if self._ready is None and self._broken is None:
            self._ready = asyncio.get_running_loop().create_task(self._start())

    async def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        command = [sys.executable, "-m", "tierflow.deploy.local_zygote", "--control-fd", str(theirs.fileno()),
                   "--entry", self.entry]
        if self.preload is not None:
            command += [arg for spec in self.preload for arg in ("--preload", spec)] or ["--no-preload"]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self.log_path.open("ab") as out:
                self._proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                              env=self.env, pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()
        ours.setblocking(False)
        self._socket = ours
        message = orjson.loads(await asyncio.get_running_loop().sock_recv(ours, _MAX_MESSAGE) or b'{"error": '
                               b'"it exited before it was ready"}')
        if "error" in message:
            raise ZygoteUnavailable(f"the tier zygote did not start: {message['error']} (see {self.log_path})")
        log.info("tier zygote ready (pid %s) after %.1f s of imports%s", message.get("pid"), message.get("seconds"),
                 f"; skipped {message['skipped']}" if message.get("skipped") else "")

    async def _wait_ready(self) -> socket.socket:
        if self._broken is not None:
            raise ZygoteUnavailable(self._broken)
        self.start()
        assert self._ready is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), self.ready_timeout_s)
        except TimeoutError:
            self._break(f"the tier zygote was not ready within {self.ready_timeout_s:.0f} s")
            raise ZygoteUnavailable(self._broken or "") from None
        except ZygoteUnavailable as exc:
            self._break(str(exc))
            raise
        except OSError as exc:
            self._break(f"the tier zygote did not start: {exc}")
            raise ZygoteUnavailable(self._broken or str(exc)) from exc
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._ready.cancelled() and task is not None and not task.cancelling():
                raise ZygoteUnavailable("the launcher closed its tier zygote") from None  # close(), not us
            raise
        if self._socket is None:
            raise ZygoteUnavailable(self._broken or "the tier zygote is gone")
        return self._socket

    def _break(self, why: str) -> None:
        """Stop using the zygote (and stop it: its channel can no longer be trusted); every later workload starts
        the plain way. The workloads it forked run on: each has a session of its own."""
        if self._broken is None:
            self._broken = why
            log.warning("%s; tier workloads start fresh interpreters from now on", why)
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()

    async def launch(self, workload_dir: Path, args: Sequence[str], env: Mapping[str, str]) -> int:
        """Fork the workload of `workload_dir` (its spec is there); its supervisor's pid (also in DIR/pid)."""
        data = orjson.dumps(dict(env))
        async with self._lock:
            control = await self._wait_ready()
            env_read = _env_pipe(data)
            sent = False
            try:
                socket.send_fds(control, [orjson.dumps({"launch": str(workload_dir), "args": list(args)})],
                                [env_read])
                sent = True
                reply = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(control, _MAX_MESSAGE),
                                               self.reply_timeout_s)
            except (OSError, TimeoutError) as exc:
                self._break(f"the tier zygote stopped answering: {exc or type(exc).__name__}")
                if sent:
                    return self._recorded(workload_dir)
                raise ZygoteUnavailable(self._broken or "") from exc
            except BaseException:
                if sent:  # cancelled while the zygote forks: its reply would be taken for the next request's
                    self._break("a launch was cancelled while the tier zygote answered it")
                raise
            finally:
                os.close(env_read)
            if not reply:
                self._break(f"the tier zygote exited (see {self.log_path})")
                return self._recorded(workload_dir)
        message = orjson.loads(reply)
        if message.get("launched", message.get("failed")) != str(workload_dir):
            self._break(f"the tier zygote answered for another workload: {message}")
            return self._recorded(workload_dir)
        if "launched" not in message:
            raise ZygoteUnavailable(f"the tier zygote could not fork {workload_dir.name}: {message.get('error')}")
        pid: int = message["pid"]
        return pid

    @staticmethod
    def _recorded(workload_dir: Path) -> int:
        """After the zygote failed mid-request: the supervisor's pid if the zygote forked and recorded it and it
        runs; else (it never forked, or its supervisor exited unseen at the gate) ZygoteUnavailable."""
        recorded = _read_pid(workload_dir)
        if recorded is not None and is_alive(*recorded):
            return recorded[0]
        (workload_dir / PID_FILE).unlink(missing_ok=True)
        raise ZygoteUnavailable("the tier zygote failed before the workload started")

    async def close(self) -> None:
        """Stop the zygote (the workloads it forked keep running); idempotent."""
        self._broken = self._broken or "the launcher closed"
        if self._ready is not None and not self._ready.done():
            self._ready.cancel()
            with contextlib.suppress(BaseException):
                await self._ready
        async with self._lock:  # a launch in flight ends first
            if self._socket is not None:
                self._socket.close()  # the zygote exits at the end of its channel
                self._socket = None
            proc, self._proc = self._proc, None
        if proc is not None:
            try:
                await asyncio.wait_for(asyncio.to_thread(proc.wait), 10.0)
            except TimeoutError:
                proc.kill()
                await asyncio.to_thread(proc.wait)


def _env_pipe(data: bytes) -> int:
    """The read end of a pipe that holds `data` whole (grown to fit it: nobody reads it before the fork)."""
    read_end, write_end = os.pipe()
    try:
        if len(data) > _PIPE_BYTES:
            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, len(data))
        os.set_blocking(write_end, False)
        if os.write(write_end, data) != len(data):
            raise OSError("the pipe took part of it")
    except OSError as exc:
        os.close(read_end)
        raise ZygoteUnavailable(f"the workload's environment ({len(data)} bytes) cannot be handed over: {exc}") from exc
    finally:
        os.close(write_end)
    return read_end


if __name__ == "__main__":
    raise SystemExit(main())
