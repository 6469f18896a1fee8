"""LocalLauncher: the embedded stack's workloads as local subprocesses (the `Launcher` port of streams/launcher.py).

Wired in by deploy/bootstrap.py for `TIERFLOW_LAUNCHER=local`; the orchestrator agent calls it, `tierflow down`
calls `stop_all()`. Each workload runs the command a pod would run (`tierflow <args>`, here
`python -m tierflow.deploy.cli <args>`), in its own session, under a small supervisor started as
`python -m tierflow.deploy.local_launcher run <dir>`. The supervisor detaches (so it outlives a worker
restart), runs the command as its child, forwards SIGTERM/SIGINT/SIGHUP to it, and writes the exit code
atomically when it ends; the child is killed if the supervisor is (PR_SET_PDEATHSIG), so a supervisor killed
with `kill -9` leaves no workload running unseen. Tier workloads (`tier run`) are forked instead from the tier
zygote when the launcher has one (deploy/local_zygote.py), under a supervisor that does the same.

State, one folder per workload: `<state_dir>/<name>/` with `spec.json` (the spec with the names of its env and
secrets but not their values, plus the command and whether it was forked), `pid` (the supervisor's pid and its
start time from /proc, so a reused pid is not mistaken for it), `log` (stdout and stderr), and `exit_code` (the
child's return code; negative = killed by that signal). A new LocalLauncher on the same folder (a restarted
worker) sees the same workloads. One launcher process owns a state folder at a time.

Replicas: local runs ONE process per workload whatever `spec.replicas` says (one machine; a tier scales out
on Kubernetes). `close()` leaves workloads running; `stop_all()` stops them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from tierflow.streams.errors import TemporaryError
from tierflow.streams.launcher import WorkloadPhase, WorkloadRefused, WorkloadSpec, WorkloadStatus
from tierflow.streams.settings import stack_secret_names

log = logging.getLogger("tierflow.launcher.local")

DEFAULT_COMMAND_PREFIX: tuple[str, ...] = (sys.executable, "-m", "tierflow.deploy.cli")
SPEC_FILE, PID_FILE, LOG_FILE, EXIT_FILE = "spec.json", "pid", "log", "exit_code"
LOG_TAIL_LINES = 20
EXIT_CANNOT_START = 127
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}$")
_POLL_S = 0.02
_KILL_WAIT_S = 10.0
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1


class Forker(Protocol):
    """What forks tier workloads from a pre-imported process (deploy/local_zygote.py: TierZygote)."""

    def start(self) -> None:
        """Get ready in the background (idempotent)."""
        ...

    async def launch(self, workload_dir: Path, args: Sequence[str], env: Mapping[str, str]) -> int:
        """Start the workload of `workload_dir` under a supervisor that records DIR/pid; the supervisor's pid.
        Raises an exception when it cannot (the launcher then starts the workload the plain way)."""
        ...

    async def close(self) -> None: ...


def forked(args: Sequence[str]) -> bool:
    """Whether a workload starts from the tier zygote (when there is one): the tiers, `tierflow tier run`."""
    return list(args[:2]) == ["tier", "run"]


def workload_environment(*layers: Mapping[str, str]) -> dict[str, str]:
    """This process's environment with `layers` on top, less the stack's secrets (`stack_secret_names`): what a
    workload inherits, as a pod inherits its image's environment (its own secrets go on top of this)."""
    secret = stack_secret_names()
    return {key: value for source in (os.environ, *layers) for key, value in source.items() if key not in secret}


class LaunchError(TemporaryError):
    """A workload could not be started at all (its supervisor could not be spawned); a later pass tries again."""


# --- processes, from /proc (Linux) --------------------------------------------------------------------

def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, process group, start time in clock ticks since boot) of a process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rfind(")") + 2:].split()  # comm (field 2) may hold spaces and parentheses
    return fields[0], int(fields[2]), int(fields[19])


def is_alive(pid: int, start_time: int) -> bool:
    """Whether the process recorded as (pid, start_time) still runs (a zombie has ended; a pid reused by
    another process has a different start time)."""
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X") and stat[2] == start_time


def group_members(pgid: int) -> list[int]:
    """The live (non-zombie) processes of a process group."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None and stat[1] == pgid and stat[0] not in ("Z", "X"):
                members.append(int(entry.name))
    return members


async def _wait_for(condition: Callable[[], bool], timeout_s: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(_POLL_S)
    return True


# --- files ---------------------------------------------------------------------------------------------

def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last `lines` lines of a log (read from its end: logs of long trainings grow)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            data = f.read()
    except FileNotFoundError:
        return []
    return data.decode("utf-8", errors="replace").splitlines()[-lines:]


def _read_pid(workload_dir: Path) -> tuple[int, int] | None:
    text = _read(workload_dir / PID_FILE)
    if text is None:
        return None
    pid, start = text.split()
    return int(pid), int(start)


# --- status (pure) -------------------------------------------------------------------------------------

def describe_returncode(returncode: int) -> tuple[int, str]:
    """(exit code as a shell reports it, words) for a return code (negative = killed by that signal)."""
    if returncode >= 0:
        return returncode, f"exited with code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return 128 - returncode, f"killed by {name} (exit code {128 - returncode})"


def workload_status(spec: Mapping[str, Any], *, returncode: int | None, pid: int | None, alive: bool,
                    tail: Sequence[str]) -> WorkloadStatus:
    """The status of one workload from what its folder and /proc say."""
    name, kind, labels = spec["name"], spec["kind"], dict(spec["labels"])
    if returncode is None and alive:
        return WorkloadStatus(name, kind, labels, WorkloadPhase.RUNNING)
    if returncode == 0:
        return WorkloadStatus(name, kind, labels, WorkloadPhase.SUCCEEDED, exit_code=0)
    if returncode is not None:
        exit_code, what = describe_returncode(returncode)
    elif pid is None:
        exit_code, what = None, "was never started (its launcher stopped while starting it)"
    else:
        exit_code, what = None, (f"ended without an exit code: its supervisor (pid {pid}) was killed (e.g. kill -9) "
                                 "or the machine restarted, and the workload was killed with it")
    log_part = "\nlast log lines:\n" + "\n".join(tail) if tail else "\n(empty log)"
    return WorkloadStatus(name, kind, labels, WorkloadPhase.FAILED, exit_code=exit_code,
                          reason=f"workload {name} {what}{log_part}")


# --- the supervisor (runs detached, in the workload's own session) ---------------------------------------

def _die_with_parent(parent: int) -> Callable[[], None]:
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:  # runs in the child right after fork (before exec, if any)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


class Child(Protocol):
    """A supervised workload process: a `subprocess.Popen`, or a process forked from the tier zygote."""

    def send_signal(self, signal: int, /) -> None: ...

    def wait(self) -> int:
        """Wait for it to end and reap it; its return code (negative = killed by that signal)."""
        ...


def _exec_command(workload_dir: Path) -> Child:
    """The workload's command from its spec, as a child that dies with this supervisor."""
    command: list[str] = json.loads((workload_dir / SPEC_FILE).read_text())["command"]
    try:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent(os.getpid()))  # safe: single-threaded
    except OSError as exc:
        raise CannotStart(f"cannot run {command[0]!r}: {exc}") from exc


class CannotStart(Exception):
    """The workload's process could not be created (its supervisor records EXIT_CANNOT_START)."""


def supervise(workload_dir: Path, start: Callable[[], Child] | None = None) -> int:
    """Run the workload as a child (`start`; default: its spec's command), forward stop signals to it, record its
    return code."""
    child: Child | None = None
    pending: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        if child is None:
            pending.append(signum)
        else:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    for sig in _FORWARDED:
        signal.signal(sig, forward)
    try:
        child = start() if start is not None else _exec_command(workload_dir)
    except CannotStart as exc:
        print(f"tierflow launcher: {exc}", file=sys.stderr, flush=True)
        _write_atomic(workload_dir / EXIT_FILE, f"{EXIT_CANNOT_START}\n")
        return 0
    for signum in pending:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)
    returncode = child.wait()
    _write_atomic(workload_dir / EXIT_FILE, f"{returncode}\n")
    return 0


def detach(workload_dir: Path) -> int:
    """Fork the supervisor into its own session, record its pid and start time, and return at once."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setsid()
            code = supervise(workload_dir)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)  # never unwind into the caller's stack in the forked child
    stat = _proc_stat(pid)  # the child is not reaped before we exit, so its /proc entry is there
    if stat is None:
        raise RuntimeError(f"the supervisor (pid {pid}) vanished before it was recorded")
    _write_atomic(workload_dir / PID_FILE, f"{pid} {stat[2]}\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tierflow.deploy.local_launcher")
    sub = parser.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="start the workload described in DIR/spec.json under a detached supervisor")
    run.add_argument("dir", type=Path)
    args = parser.parse_args(argv)
    return detach(args.dir.resolve())


# --- the launcher --------------------------------------------------------------------------------------

def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise WorkloadRefused(f"workload name {name!r} is not usable as a folder name: use letters, digits, '.', '_', "
                              "'-'")


class LocalLauncher:
    """Workloads as detached local subprocesses with their state under `state_dir`.

    `env`: variables set for every workload on top of the environment this process inherited (the
    settings' `workload_env()`); `spec.env` goes on top, then `spec.secrets`. The stack's secrets
    (`stack_secret_names`) are dropped from all but `spec.secrets`, wherever they come from.
    `command_prefix`: what runs `args` (default: the `tierflow` CLI of this interpreter; tests run small scripts).
    `grace_s`: how long `stop` waits after SIGTERM before it kills the workload's whole process group.
    `zygote`: where tier workloads are forked from (deploy/local_zygote.py); it starts with the first launch of any
    workload (a training comes before its tiers), and a tier it cannot fork starts the plain way.
    """

    def __init__(self, state_dir: Path, env: Mapping[str, str], *, command_prefix: Sequence[str] | None = None,
                 grace_s: float = 10.0, zygote: Forker | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.env = dict(env)
        self.command_prefix = list(command_prefix if command_prefix is not None else DEFAULT_COMMAND_PREFIX)
        self.grace_s = grace_s
        self.zygote = zygote
        self._starting: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}

    def _lock(self, name: str) -> asyncio.Lock:
        """Launch and stop of one workload never interleave (the orchestrator may do both in one pass)."""
        return self._locks.setdefault(name, asyncio.Lock())

    def workload_dir(self, name: str) -> Path:
        _check_name(name)
        return self.state_dir / name

    async def launch(self, spec: WorkloadSpec) -> None:
        final = self.workload_dir(spec.name)
        if self.zygote is not None:
            self.zygote.start()
        async with self._lock(spec.name):
            if final.exists():
                return  # running, or finished and not yet removed: launched already
            if spec.replicas > 1:
                log.warning("workload %s asks for %d replicas; the local launcher runs one", spec.name, spec.replicas)
            self.state_dir.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", dir=self.state_dir))
            record = {**asdict(spec), "env": sorted(spec.env), "secrets": sorted(spec.secrets),
                      "command": [*self.command_prefix, *spec.args],
                      "forked": self.zygote is not None and forked(spec.args)}
            (staging / SPEC_FILE).write_text(json.dumps(record, indent=2))
            try:
                staging.rename(final)  # the folder appears whole, with its spec, or not at all
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)
                if final.exists():
                    return
                raise
            self._starting.add(spec.name)
            try:
                await self._spawn(final, spec)
            finally:
                self._starting.discard(spec.name)

    async def _spawn(self, final: Path, spec: WorkloadSpec) -> None:
        # The workload inherits this process's environment (as a pod inherits its image's) and working
        # directory (settings may hold relative paths, e.g. TIERFLOW_HOME=.tierflow), less the stack's secrets,
        # which this process (the worker) holds and a workload must not: it gets its own token in spec.secrets.
        env = workload_environment(self.env, spec.env)
        env.update(spec.secrets)
        if self.zygote is not None and forked(spec.args):
            try:
                pid = await self.zygote.launch(final, spec.args, env)
            except Exception as exc:
                log.warning("workload %s starts a fresh interpreter: %s", spec.name, exc)
                record = json.loads((final / SPEC_FILE).read_text())
                _write_atomic(final / SPEC_FILE, json.dumps({**record, "forked": False}, indent=2))
            else:
                log.info("workload %s forked from the tier zygote: supervisor pid %d", spec.name, pid)
                return
        with (final / LOG_FILE).open("ab") as log_file:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "tierflow.deploy.local_launcher", "run", str(final.resolve())],
                    stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, env=env,
                )
            except OSError as exc:
                shutil.rmtree(final, ignore_errors=True)
                raise LaunchError(f"cannot start the supervisor of workload {spec.name}: {exc}") from exc
        code = await asyncio.to_thread(proc.wait)  # it forks the supervisor and exits at once
        if code != 0:
            log.error("the supervisor of workload %s did not start (exit code %s); see %s", spec.name, code,
                      final / LOG_FILE)

    async def stop(self, name: str) -> None:
        workload_dir = self.workload_dir(name)
        async with self._lock(name):
            if not workload_dir.exists():
                return
            record = _read_pid(workload_dir)
            if record is not None:
                pid, start = record
                if is_alive(pid, start):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)  # the supervisor forwards it to the workload
                    await _wait_for(lambda: not is_alive(pid, start), self.grace_s)
                await self._kill_group(name, pid, start)
            shutil.rmtree(workload_dir, ignore_errors=True)

    async def _kill_group(self, name: str, pgid: int, start: int) -> None:
        """Kill what is left of the workload's session: the supervisor's group id is its pid."""
        stat = _proc_stat(pgid)
        if stat is not None and stat[2] != start:
            return  # the pid was reused, so our group is empty (a pid in use as a group id is never reused)
        if not group_members(pgid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        if not await _wait_for(lambda: not group_members(pgid), _KILL_WAIT_S):
            raise TemporaryError(f"processes {group_members(pgid)} of workload {name} survived SIGKILL")

    async def list(self, kind: str | None = None) -> list[WorkloadStatus]:
        if not self.state_dir.exists():
            return []
        statuses = []
        for workload_dir in sorted(self.state_dir.iterdir()):
            if workload_dir.name.startswith(".") or not workload_dir.is_dir():
                continue  # staging folders of launches in progress
            spec_text = _read(workload_dir / SPEC_FILE)
            if spec_text is None:
                continue  # removed by a concurrent stop
            spec = json.loads(spec_text)
            if kind is None or spec["kind"] == kind:
                statuses.append(self._status(workload_dir, spec))
        return statuses

    def _status(self, workload_dir: Path, spec: Mapping[str, Any]) -> WorkloadStatus:
        exit_text = _read(workload_dir / EXIT_FILE)
        returncode = int(exit_text) if exit_text is not None else None
        record = _read_pid(workload_dir)
        alive = workload_dir.name in self._starting or (record is not None and is_alive(*record))
        finished = returncode is not None or not alive
        tail = log_tail(workload_dir / LOG_FILE) if finished and returncode != 0 else []
        return workload_status(spec, returncode=returncode, pid=record[0] if record else None, alive=alive,
                               tail=tail)

    async def stop_all(self) -> None:
        """Stop every workload of this state folder (`tierflow down`)."""
        await asyncio.gather(*(self.stop(w.name) for w in await self.list()))

    async def close(self) -> None:
        """Stop the tier zygote; workloads keep running, and a restarted launcher finds them."""
        if self.zygote is not None:
            await self.zygote.close()


if __name__ == "__main__":
    raise SystemExit(main())
