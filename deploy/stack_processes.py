"""The processes of an embedded stack seen from outside: is it healthy, stop what a dead supervisor left, spawn
`tierflow up` in the background, and the lock that keeps two `up` for one home apart.

Used by the `up` / `status` / `down` commands (deploy/stack.py) and the supervisor process they start
(deploy/stack_runtime.py). What stack.json says is the core's (streams/stack_state.py); starting and restarting
the children is deploy/supervisor.py's.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from urllib.parse import urlencode, urlsplit, urlunsplit

from tierflow.deploy.supervisor import group_members
from tierflow.streams.stack_state import StackState, pid_alive, read_stack_state, stack_file

POLL_S = 0.1  # polling interval of conditions with a deadline


def healthy(api_url: str, *, timeout_s: float = 2.0) -> bool:
    """Whether `GET <api_url>/healthz` answers 200."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an HTTP(S)_PROXY
    try:
        with opener.open(f"{api_url.rstrip('/')}/healthz", timeout=timeout_s) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def redact(url: str) -> str:
    """A URL with its password replaced by ***, for printing."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def groups_alive(pids: Mapping[str, int]) -> list[str]:
    """Children (by name) of which some process is still alive (each child leads its own group)."""
    return [name for name, pid in pids.items() if pid_alive(pid) or group_members(pid)]


def stop_signal(name: str) -> int:
    # SIGINT is Postgres's fast shutdown (SIGTERM waits for every client to disconnect).
    return signal.SIGINT if name == "postgres" else signal.SIGTERM


def kill_leftovers(state: StackState, sig: int | None = None) -> list[str]:
    """Signal the process group of each child of a stack whose supervisor is gone; returns their names.

    `sig` None sends each child its own stop signal.
    """
    signalled: list[str] = []
    for name, pid in state.children.items():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            # Only a group this child leads: a reused pid of an unrelated process is not a group leader.
            if group_members(pid) or (pid_alive(pid) and os.getpgid(pid) == pid):
                os.killpg(pid, stop_signal(name) if sig is None else sig)
                signalled.append(name)
    return signalled


def wait_until(condition: Callable[[], bool], deadline_s: float) -> bool:
    deadline = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)  # polling interval of a condition with a deadline
    return True


def clean_stale(home: Path, state: StackState) -> None:
    """A stack.json whose supervisor died (e.g. SIGKILL): stop its orphaned children, remove the file."""
    leftovers = kill_leftovers(state)
    if leftovers and not wait_until(lambda: not groups_alive(state.children), 15.0):
        kill_leftovers(state, signal.SIGKILL)
        wait_until(lambda: not groups_alive(state.children), 5.0)
    if leftovers:
        print(f"stopped {', '.join(leftovers)} left behind by a dead supervisor (pid {state.pid})", flush=True)
    stack_file(home).unlink(missing_ok=True)


@contextlib.contextmanager
def stack_lock(home: Path) -> Iterator[bool]:
    """Hold `<home>/stack.lock` for the supervisor's lifetime; yields False when another holds it."""
    home.mkdir(parents=True, exist_ok=True)
    with (home / "stack.lock").open("a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")  # read by `status`/`down` while no stack.json exists yet
        f.flush()
        try:
            yield True
        finally:
            f.truncate(0)


def starting_pid(home: Path) -> int | None:
    """The pid of a `tierflow up` for `home` that holds the lock but has not written stack.json yet."""
    try:
        text = (home / "stack.lock").read_text().strip()
    except FileNotFoundError:
        return None
    pid = int(text) if text.isdigit() else 0
    return pid if pid_alive(pid) else None


def refuse_if_running(home: Path) -> bool:
    """Print and return True when a stack runs for `home`; clean a stale stack.json otherwise."""
    state = read_stack_state(home)
    if state is None:
        return False
    if state.alive():
        print(f"tierflow up: a stack is already running for {home} (supervisor pid {state.pid}, "
              f"API {state.api_url}); run `tierflow down` first", file=sys.stderr)
        return True
    clean_stale(home, state)
    return False


def ui_url(api_url: str, token: str) -> str:
    """The web UI's one-time address: the page keeps the token for its tab and drops it from the address bar."""
    base = f"{api_url.rstrip('/')}/ui/"
    return f"{base}?{urlencode({'token': token})}" if token else base


def up_summary(state: StackState, *, external_broker: bool, external_db: bool) -> str:
    return "\n".join([
        f"tierflow stack is up (supervisor pid {state.pid})",
        f"  web UI:   {ui_url(state.api_url, state.token)}",
        f"  API:      {state.api_url} (the CLI finds the token; scripts: `tierflow status --json`)",
        f"  broker:   {state.bootstrap_servers}{' (external)' if external_broker else ''}",
        f"  Postgres: {redact(state.database_url)}{' (external)' if external_db else ''}",
        f"  logs:     {state.home / 'logs'}",
    ])


def spawn_detached(home: Path, log_path: Path) -> int:
    """Start `tierflow up` in a new session with its output appended to `log_path`; returns its pid."""
    argv = [sys.executable, "-m", "tierflow.deploy.cli", "up"]
    # The detached supervisor gets this process's environment, as if the user had run `up` here.
    env = {**os.environ, "TIERFLOW_HOME": str(home)}
    # The log gets the UI's address with the token in it: only its owner may read it.
    log_path.touch(mode=0o600)
    log_path.chmod(0o600)
    return os.posix_spawn(sys.executable, argv, env, setsid=True, file_actions=[
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(log_path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ])


def exited(pid: int) -> int | None:
    """The exit code of our child `pid` when it has exited (and reap it), else None."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return -1
    return None if done == 0 else os.waitstatus_to_exitcode(status)


def print_log_since(log_path: Path, offset: int) -> None:
    lines: list[str] = []
    with contextlib.suppress(FileNotFoundError), log_path.open("rb") as f:
        f.seek(offset)
        lines = f.read().decode("utf-8", errors="replace").splitlines()
    print("\n".join(f"  | {line}" for line in lines[-30:]) or "  (no output)", file=sys.stderr)


def stop_spawned(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not wait_until(lambda: exited(pid) is not None, 60.0):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
