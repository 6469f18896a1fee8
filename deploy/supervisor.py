"""Process supervisor of the embedded stack: start named children, restart the ones that crash, stop all.

Called by `tierflow up` (deploy/stack.py), which starts the broker, Postgres, the worker and the API
through one `Supervisor`, and by the integration tests. Each child is started from a `ChildSpec`
(deploy/services.py) in its own process group, with its output appended to `<log_dir>/<name>.log`.
A child that exits while the stack is not stopping is restarted after an exponential backoff decided
by the pure function `plan_restart`; `stop()` stops the children in reverse start order and waits until
every process of each child's group is gone, so that nothing is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tierflow.deploy.services import ChildSpec, spawn

log = logging.getLogger("tierflow.stack")

#: Called after each start of a child (first start and restarts) with its process; returns when the
#: child is ready (e.g. accepts connections) and raises when it will not become ready.
ReadyCheck = Callable[[subprocess.Popen[bytes]], Awaitable[None]]
#: Called after a restarted child is ready (e.g. restore the broker's topics); raising counts as a crash.
RestartHook = Callable[[], Awaitable[None]]
#: Called whenever the set of child pids changed (start, restart, stop).
ChangeHook = Callable[[], None]

_POLL_S = 0.02  # polling interval where no exit notification exists (fallback, process groups)


# --- restart policy (pure) ----------------------------------------------------------------------------

@dataclass(frozen=True)
class RestartPolicy:
    """Exponential backoff for crashed children."""

    #: First delay (TIERFLOW_RESTART_BACKOFF_S); each further crash in a row doubles it.
    initial_s: float = 0.5
    #: Longest delay between two restarts.
    max_s: float = 30.0
    #: A child that stayed up this long before crashing starts again from `initial_s`.
    reset_after_s: float = 60.0


@dataclass(frozen=True)
class RestartPlan:
    """The decision for one crash: the attempt number (1 = first restart in a row) and its delay."""

    attempt: int
    delay_s: float


def plan_restart(policy: RestartPolicy, *, previous_attempt: int, uptime_s: float) -> RestartPlan:
    """Decide when to restart a child that crashed after `uptime_s` seconds.

    `previous_attempt` is the attempt number of the restart that started the crashed run (0 for the
    first start). A run that lasted `reset_after_s` or more resets the sequence.
    """
    attempt = 1 if uptime_s >= policy.reset_after_s else previous_attempt + 1
    # Cap the exponent: 2.0 ** 1100 overflows, and any exponent past ~64 is far beyond max_s anyway.
    delay = policy.initial_s * 2.0 ** min(attempt - 1, 64)
    return RestartPlan(attempt=attempt, delay_s=max(0.0, min(delay, policy.max_s)))


def describe_exit(code: int) -> str:
    """'exit code 1' or 'signal SIGKILL' (Popen reports a death by signal N as -N)."""
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def tail_lines(path: Path, count: int = 10, max_bytes: int = 8192) -> list[str]:
    """The last `count` lines of a log file (empty when it does not exist)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    if size > max_bytes and lines:
        lines = lines[1:]  # the first line was cut by the seek
    return lines[-count:]


# --- processes ----------------------------------------------------------------------------------------

def group_members(pgid: int) -> list[int]:
    """The live (non-zombie) processes of process group `pgid`."""
    proc = Path("/proc")
    if not proc.is_dir():  # no procfs: fall back to "does the group exist at all"
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            return [pgid]
        return [pgid]
    members: list[int] = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # the process exited while we looked
        fields = stat[stat.rindex(")") + 2:].split()
        # fields[0] is the state, fields[2] the process group (fields 3 and 5 of proc(5)).
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


async def wait_exit(proc: subprocess.Popen[bytes], timeout_s: float | None = None) -> int | None:
    """Wait until `proc` exits and reap it; its exit code, or None when `timeout_s` passed first."""
    if proc.poll() is not None:
        return proc.returncode
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        pidfd = -1
    if pidfd < 0:  # no pidfd (old kernel): poll the exit status against the deadline
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while proc.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                return None
            await asyncio.sleep(_POLL_S)
        return proc.returncode
    exited: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(pidfd, readable)
    try:
        await asyncio.wait_for(exited, timeout_s)
    except TimeoutError:
        return None
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    return proc.wait()  # readable pidfd: it exited, so this reaps without blocking


async def wait_group_gone(pgid: int, timeout_s: float) -> bool:
    """Poll until process group `pgid` has no live member; False when `timeout_s` passed first."""
    deadline = time.monotonic() + timeout_s
    while group_members(pgid):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(_POLL_S)
    return True


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def terminate(proc: subprocess.Popen[bytes], *, name: str, sig: int = signal.SIGTERM,
                    grace_s: float = 10.0) -> int:
    """Signal the child's process group, SIGKILL it after `grace_s`; wait until the whole group is gone."""
    pgid = proc.pid  # spawn() starts each child in a new session: its pid is its group id
    if proc.poll() is None or group_members(pgid):  # a dead leader's group may still hold processes
        _signal_group(pgid, sig)
    deadline = time.monotonic() + grace_s
    code = await wait_exit(proc, grace_s)
    gone = code is not None and await wait_group_gone(pgid, max(0.0, deadline - time.monotonic()))
    if not gone:
        log.warning("%s (pid %d) did not stop within %.0f s after %s: killing its process group",
                    name, proc.pid, grace_s, signal.Signals(sig).name)
        _signal_group(pgid, signal.SIGKILL)
        code = await wait_exit(proc)
        if not await wait_group_gone(pgid, 5.0):
            log.error("processes %s of %s's group survived SIGKILL", group_members(pgid), name)
    assert code is not None
    return code


# --- supervisor ---------------------------------------------------------------------------------------

@dataclass
class _Child:
    spec: ChildSpec
    log_path: Path
    ready: ReadyCheck | None
    on_restarted: RestartHook | None
    stop_signal: int
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    attempt: int = 0
    restarts: int = 0
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)


class Supervisor:
    """Runs named children, restarts crashed ones with backoff, and stops them all in reverse order."""

    def __init__(self, *, log_dir: Path, policy: RestartPolicy | None = None, grace_s: float = 10.0,
                 on_change: ChangeHook | None = None) -> None:
        self.log_dir = log_dir
        self.policy = policy or RestartPolicy()
        self.grace_s = grace_s
        self.on_change = on_change
        self._children: dict[str, _Child] = {}  # insertion order = start order
        self._stopping = False

    # -- queries

    def pids(self) -> dict[str, int]:
        """Pid of each child's latest process (running, or exited and waiting for its restart), in start order."""
        return {name: c.proc.pid for name, c in self._children.items() if c.proc is not None}

    def running(self, name: str) -> bool:
        """Whether child `name` has a process that has not exited (as far as the watcher has seen)."""
        proc = self._children[name].proc
        return proc is not None and proc.returncode is None

    def restarts(self, name: str) -> int:
        """How many times child `name` was restarted after a crash."""
        return self._children[name].restarts

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def __contains__(self, name: object) -> bool:
        return name in self._children

    # -- commands

    async def start(self, spec: ChildSpec, *, ready: ReadyCheck | None = None,
                    on_restarted: RestartHook | None = None, stop_signal: int = signal.SIGTERM) -> int:
        """Start child `spec.name`, wait for `ready`, then watch it; returns its pid.

        A failing `ready` on this first start stops the child and propagates (the caller decides);
        on later restarts it counts as a crash.
        """
        if self._stopping:
            raise RuntimeError("the supervisor is stopping")
        if spec.name in self._children:
            raise ValueError(f"a child named {spec.name!r} is already supervised")
        child = _Child(spec=spec, log_path=self.log_path(spec.name), ready=ready, on_restarted=on_restarted,
                       stop_signal=stop_signal)
        self._children[spec.name] = child
        proc = self._spawn(child, "start")
        try:
            if ready is not None:
                await ready(proc)
        except BaseException:
            await terminate(proc, name=spec.name, sig=stop_signal, grace_s=self.grace_s)
            raise
        self._watch_in_background(child)
        return proc.pid

    async def restart(self, name: str) -> int:
        """Stop child `name` and start it again now (a deliberate restart, not a crash); returns its pid."""
        child = self._children[name]
        await self._cancel_watcher(child)
        if child.proc is not None:
            await terminate(child.proc, name=name, sig=child.stop_signal, grace_s=self.grace_s)
        if self._stopping:
            raise RuntimeError("the supervisor is stopping")
        log.info("restarting %s", name)
        child.attempt = 0
        proc = self._spawn(child, "restart")
        self._watch_in_background(child, check_ready=True)
        return proc.pid

    async def stop(self) -> None:
        """Stop every child in reverse start order; no restart happens once this is called."""
        self._stopping = True
        children = list(self._children.values())
        for child in children:
            await self._cancel_watcher(child)
        for child in reversed(children):
            if child.proc is not None:
                code = await terminate(child.proc, name=child.spec.name, sig=child.stop_signal,
                                       grace_s=self.grace_s)
                log.info("stopped %s (pid %d, %s)", child.spec.name, child.proc.pid, describe_exit(code))
        self._changed()

    # -- internals

    def _spawn(self, child: _Child, why: str) -> subprocess.Popen[bytes]:
        child.log_path.parent.mkdir(parents=True, exist_ok=True)
        with child.log_path.open("a") as f:  # a marker, so a log shows where each run begins
            f.write(f"--- tierflow: {why} {child.spec.name} at {datetime.now(UTC).isoformat()} ---\n")
        proc = spawn(child.spec, child.log_path)
        child.proc = proc
        child.started_at = time.monotonic()
        self._changed()
        return proc

    def _watch_in_background(self, child: _Child, *, check_ready: bool = False) -> None:
        task = asyncio.create_task(self._watch(child, check_ready=check_ready), name=f"supervise-{child.spec.name}")
        task.add_done_callback(lambda t: self._watch_ended(child, t))
        child.watcher = task

    def _watch_ended(self, child: _Child, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("supervising %s failed: it will not be restarted any more", child.spec.name,
                      exc_info=task.exception())

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    async def _cancel_watcher(self, child: _Child) -> None:
        task, child.watcher = child.watcher, None
        if task is None or task is asyncio.current_task():
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # we are being cancelled ourselves, not just the watcher

    async def _watch(self, child: _Child, *, check_ready: bool = False) -> None:
        """Wait for the child to exit and restart it, forever (until cancelled by stop/restart)."""
        name = child.spec.name
        while True:
            assert child.proc is not None
            if check_ready:
                check_ready = False
                await self._became_ready(child)  # on failure the run is stopped: handled as a crash
            code = await wait_exit(child.proc)
            assert code is not None
            if self._stopping:
                return
            uptime = time.monotonic() - child.started_at
            # The leader is gone; whatever it left in its group would be an orphan.
            await terminate(child.proc, name=name, sig=child.stop_signal, grace_s=self.grace_s)
            plan = plan_restart(self.policy, previous_attempt=child.attempt, uptime_s=uptime)
            child.attempt = plan.attempt
            child.restarts += 1
            lines = tail_lines(child.log_path)
            log.warning(
                "%s (pid %d) exited with %s after %.1f s; restart attempt %d in %.2f s. Last lines of %s:\n%s",
                name, child.proc.pid, describe_exit(code), uptime, plan.attempt, plan.delay_s,
                child.log_path, "\n".join(f"  | {line}" for line in lines) or "  (empty)",
            )
            self._changed()
            await asyncio.sleep(plan.delay_s)  # the backoff delay itself, not a synchronisation
            if not await self._respawn(child, plan):
                return
            if await self._became_ready(child) and child.on_restarted is not None:
                try:
                    await child.on_restarted()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    if self._stopping:
                        return
                    log.exception("%s restarted, but its after-restart step failed: stopping it to retry", name)
                    await terminate(child.proc, name=name, sig=child.stop_signal, grace_s=self.grace_s)

    async def _respawn(self, child: _Child, plan: RestartPlan) -> bool:
        """Start the next run of a crashed child, retrying with backoff while it cannot even be spawned.

        False when the supervisor is stopping.
        """
        while not self._stopping:
            try:
                self._spawn(child, f"restart (attempt {plan.attempt})")
                return True
            except OSError as exc:  # e.g. its binary was removed: say so and keep trying
                plan = plan_restart(self.policy, previous_attempt=plan.attempt, uptime_s=0.0)
                child.attempt = plan.attempt
                log.error("could not start %s: %s; restart attempt %d in %.2f s", child.spec.name, exc,
                          plan.attempt, plan.delay_s)
                await asyncio.sleep(plan.delay_s)  # the backoff delay itself
        return False

    async def _became_ready(self, child: _Child) -> bool:
        """Run the ready check after a restart; on failure stop the run (the watch loop restarts it)."""
        assert child.proc is not None
        if child.ready is None:
            return True
        try:
            await child.ready(child.proc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("%s did not become ready after a restart: %s", child.spec.name, exc)
            await terminate(child.proc, name=child.spec.name, sig=child.stop_signal, grace_s=self.grace_s)
            return False
        return True
