"""The embedded stack: `tierflow up`, `tierflow status`, `tierflow down`.

Called by the front door (deploy/cli.py calls `register(subparsers)`), and by the CLI's API client,
which finds the API URL with `read_stack_state` when TIERFLOW_API_URL is unset. `up` resolves the
broker and Postgres (external ones from KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL, else a private Tansu
and Postgres), prepares them (topics, schema, events restored from the Postgres archive) before any
agent runs, then starts the worker and the API and supervises all of them (deploy/supervisor.py).
While it runs, `<home>/stack.json` says where everything is; `<home>/stack.lock` is held by the
running supervisor so that two `up` for one home never race.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tierflow.deploy.services import (
    ChildSpec,
    ServiceError,
    choose_port,
    ensure_database,
    free_port,
    init_postgres,
    port_is_free,
    postgres_data_dir,
    postgres_spec,
    postgres_url,
    tansu_spec,
)
from tierflow.deploy.supervisor import RestartPolicy, Supervisor, group_members
from tierflow.streams.cli_args import positive_seconds
from tierflow.streams.settings import Settings
from tierflow.streams.stack_state import (
    StackState,
    pid_alive,
    read_stack_state,
    resolve_home,
    stack_file,
    write_stack_state,
)

log = logging.getLogger("tierflow.stack")

EXIT_NOT_RUNNING = 3
_POLL_S = 0.1  # polling interval of conditions with a deadline
_PORT_DEADLINE_S = 30.0


# --- small helpers ------------------------------------------------------------------------------------

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


def _groups_alive(pids: Mapping[str, int]) -> list[str]:
    """Children (by name) of which some process is still alive (each child leads its own group)."""
    return [name for name, pid in pids.items() if pid_alive(pid) or group_members(pid)]


def _stop_signal(name: str) -> int:
    # SIGINT is Postgres's fast shutdown (SIGTERM waits for every client to disconnect).
    return signal.SIGINT if name == "postgres" else signal.SIGTERM


def _kill_leftovers(state: StackState, sig: int | None = None) -> list[str]:
    """Signal the process group of each child of a stack whose supervisor is gone; returns their names.

    `sig` None sends each child its own stop signal.
    """
    signalled: list[str] = []
    for name, pid in state.children.items():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            # Only a group this child leads: a reused pid of an unrelated process is not a group leader.
            if group_members(pid) or (pid_alive(pid) and os.getpgid(pid) == pid):
                os.killpg(pid, _stop_signal(name) if sig is None else sig)
                signalled.append(name)
    return signalled


def _wait_until(condition: Callable[[], bool], deadline_s: float) -> bool:
    deadline = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)  # polling interval of a condition with a deadline
    return True


def _clean_stale(home: Path, state: StackState) -> None:
    """A stack.json whose supervisor died (e.g. SIGKILL): stop its orphaned children, remove the file."""
    leftovers = _kill_leftovers(state)
    if leftovers and not _wait_until(lambda: not _groups_alive(state.children), 15.0):
        _kill_leftovers(state, signal.SIGKILL)
        _wait_until(lambda: not _groups_alive(state.children), 5.0)
    if leftovers:
        print(f"stopped {', '.join(leftovers)} left behind by a dead supervisor (pid {state.pid})", flush=True)
    stack_file(home).unlink(missing_ok=True)


@contextlib.contextmanager
def _stack_lock(home: Path) -> Iterator[bool]:
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


def _starting_pid(home: Path) -> int | None:
    """The pid of a `tierflow up` for `home` that holds the lock but has not written stack.json yet."""
    try:
        text = (home / "stack.lock").read_text().strip()
    except FileNotFoundError:
        return None
    pid = int(text) if text.isdigit() else 0
    return pid if pid_alive(pid) else None


# --- the supervisor process (`tierflow up` in the foreground) ------------------------------------------

async def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str,
                     deadline_s: float = _PORT_DEADLINE_S) -> None:
    deadline = time.monotonic() + deadline_s
    while True:
        if proc.poll() is not None:
            raise ServiceError(f"the {what} exited with code {proc.returncode} before accepting connections "
                               f"(see its log)")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise ServiceError(f"the {what} did not accept connections on 127.0.0.1:{port} "
                                   f"within {deadline_s:.0f} s (see its log)") from None
            await asyncio.sleep(0.05)  # polling interval of a condition with a deadline
            continue
        writer.close()
        await writer.wait_closed()
        return


async def _wait_healthy(api_url: str, proc: subprocess.Popen[bytes], deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while not await asyncio.to_thread(healthy, api_url, timeout_s=1.0):
        if proc.poll() is not None:
            raise ServiceError(f"the API exited with code {proc.returncode} before answering {api_url}/healthz "
                               "(see its log)")
        if time.monotonic() > deadline:
            raise ServiceError(f"the API did not answer {api_url}/healthz with 200 within {deadline_s:.0f} s "
                               "(see its log)")
        await asyncio.sleep(_POLL_S)  # polling interval of a condition with a deadline


def _api_address(settings: Settings) -> tuple[int, str, str | None]:
    """The API port, its URL and a note when the wanted port was busy."""
    host = settings.api.host
    wanted = settings.api.port
    note = None
    if wanted == 0:
        port = free_port()
    elif port_is_free(wanted, host):
        port = wanted
    else:
        port = free_port()
        note = f"port {wanted} for the API is busy: the API uses {port} (set TIERFLOW_API_PORT to choose)"
    url_host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
    return port, f"http://{url_host}:{port}", note


class _Stack:
    """One run of the embedded stack inside the supervisor process."""

    def __init__(self, settings: Settings, home: Path, health_timeout_s: float) -> None:
        self.settings = settings
        self.home = home
        self.health_timeout_s = health_timeout_s
        self.supervisor = Supervisor(
            log_dir=home / "logs",
            policy=RestartPolicy(initial_s=settings.stack.restart_backoff_s),
            on_change=self._publish,
        )
        self.published = False
        self.prepared = False  # topics exist and the events are restored: a broker restart must redo it
        self.started_at = datetime.now(UTC)
        self.api_url = ""

    def _publish(self) -> None:
        """(Re)write stack.json once the stack is up, e.g. after a child restarted with a new pid."""
        if self.published:
            write_stack_state(self.home, self.state())

    async def _start_broker(self) -> str:
        port = choose_port(self.settings.stack.broker_port, "broker", "TIERFLOW_BROKER_PORT")
        print(f"starting the broker (Tansu, memory storage) on 127.0.0.1:{port} ...", flush=True)

        async def ready(proc: subprocess.Popen[bytes]) -> None:
            await _wait_port(port, proc, "broker")

        await self.supervisor.start(tansu_spec(port), ready=ready, on_restarted=self._after_broker_restart)
        return f"127.0.0.1:{port}"

    async def _after_broker_restart(self) -> None:
        """The restarted memory broker lost its log: restore it before the agents go on."""
        from tierflow.streams.archive import restore_events
        from tierflow.streams.topics import ensure_topics

        if not self.prepared:
            return  # still starting: `start` creates the topics and restores the events next
        await ensure_topics(self.settings.kafka)
        restored = await restore_events(self.settings)
        log.warning("the broker restarted with an empty log: restored %d events into %s; restarting the worker",
                    restored, self.settings.kafka.events_topic)
        if "worker" in self.supervisor:
            await self.supervisor.restart("worker")

    async def _start_postgres(self) -> str:
        data_dir = postgres_data_dir(self.home)
        await asyncio.to_thread(init_postgres, data_dir)
        port = choose_port(self.settings.stack.postgres_port, "Postgres", "TIERFLOW_POSTGRES_PORT")
        print(f"starting Postgres on 127.0.0.1:{port} (data in {data_dir}) ...", flush=True)

        async def ready(proc: subprocess.Popen[bytes]) -> None:
            await _wait_port(port, proc, "Postgres")
            await asyncio.to_thread(ensure_database, port)

        await self.supervisor.start(postgres_spec(data_dir, port), ready=ready, stop_signal=_stop_signal("postgres"))
        return postgres_url(port)

    async def start(self) -> None:
        from tierflow.projections.migrate import migrate
        from tierflow.streams.archive import restore_events
        from tierflow.streams.topics import ensure_topics

        external_broker = self.settings.kafka.bootstrap_servers
        bootstrap = external_broker or await self._start_broker()
        external_db = self.settings.database.url
        database_url = external_db or await self._start_postgres()
        api_port, self.api_url, note = _api_address(self.settings)
        if note:
            print(note, flush=True)
        settings = self.settings.with_endpoints(bootstrap_servers=bootstrap, database_url=database_url,
                                                api_url=self.api_url)
        self.settings = replace(settings, api=replace(settings.api, port=api_port),
                                stack=replace(settings.stack, home=self.home))

        print("creating topics and migrating the schema ...", flush=True)
        await ensure_topics(self.settings.kafka)
        await migrate(database_url)
        restored = await restore_events(self.settings)
        print(f"restored {restored} events from the Postgres archive into {self.settings.kafka.events_topic}",
              flush=True)
        self.prepared = True

        env = {**self.settings.to_env(), "PYTHONUNBUFFERED": "1"}
        entry = [sys.executable, "-m", "tierflow.deploy.cli"]
        await self.supervisor.start(ChildSpec(name="worker", argv=[*entry, "worker"], env=env))

        async def api_ready(proc: subprocess.Popen[bytes]) -> None:
            await _wait_healthy(self.api_url, proc, self.health_timeout_s)

        print(f"starting the worker and the API on {self.api_url} ...", flush=True)
        await self.supervisor.start(ChildSpec(name="api", argv=[*entry, "api"], env=env), ready=api_ready)

        self.published = True
        self._publish()
        print(_summary(self.state(), external_broker=bool(external_broker), external_db=bool(external_db)),
              flush=True)
        print("supervising; press Ctrl-C (or run `tierflow down`) to stop", flush=True)

    def state(self) -> StackState:
        return StackState(pid=os.getpid(), api_url=self.api_url,
                          bootstrap_servers=self.settings.kafka.bootstrap_servers,
                          database_url=self.settings.database.url, home=self.home, started_at=self.started_at,
                          children=self.supervisor.pids())


def _summary(state: StackState, *, external_broker: bool, external_db: bool) -> str:
    return "\n".join([
        f"tierflow stack is up (supervisor pid {state.pid})",
        f"  API:      {state.api_url}",
        f"  broker:   {state.bootstrap_servers}{' (external)' if external_broker else ''}",
        f"  Postgres: {redact(state.database_url)}{' (external)' if external_db else ''}",
        f"  logs:     {state.home / 'logs'}",
    ])


async def _serve(settings: Settings, home: Path, health_timeout_s: float) -> int:
    """Start the stack and supervise it until SIGINT/SIGTERM; stop every child before returning."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stack = _Stack(settings, home, health_timeout_s)
    startup = asyncio.create_task(stack.start(), name="stack-start")
    stopped = asyncio.create_task(stop.wait(), name="stack-stop")
    code = 0
    try:
        await asyncio.wait({startup, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if startup.done():
            startup.result()  # raises what made the start-up fail
            await stopped
        else:
            print("interrupted while starting", flush=True)
    except ServiceError as exc:
        print(f"tierflow up: {exc}", file=sys.stderr, flush=True)
        code = 1
    except Exception as exc:
        log.exception("the stack failed to start")
        print(f"tierflow up: the stack failed to start: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        for task in (startup, stopped):
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        print("stopping the stack ...", flush=True)
        stack.published = False
        await stack.supervisor.stop()
        stack_file(home).unlink(missing_ok=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        print("stopped", flush=True)
    return code


def _refuse_if_running(home: Path) -> bool:
    """Print and return True when a stack runs for `home`; clean a stale stack.json otherwise."""
    state = read_stack_state(home)
    if state is None:
        return False
    if state.alive():
        print(f"tierflow up: a stack is already running for {home} (supervisor pid {state.pid}, "
              f"API {state.api_url}); run `tierflow down` first", file=sys.stderr)
        return True
    _clean_stale(home, state)
    return False


def _up_foreground(settings: Settings, home: Path, health_timeout_s: float) -> int:
    if _refuse_if_running(home):
        return 1
    with _stack_lock(home) as locked:
        if not locked:
            print(f"tierflow up: another `tierflow up` is starting or running for {home} "
                  f"(it holds {home / 'stack.lock'})", file=sys.stderr)
            return 1
        return asyncio.run(_serve(settings, home, health_timeout_s))


def _spawn_detached(home: Path, log_path: Path) -> int:
    """Start `tierflow up` in a new session with its output appended to `log_path`; returns its pid."""
    argv = [sys.executable, "-m", "tierflow.deploy.cli", "up"]
    # The detached supervisor gets this process's environment, as if the user had run `up` here.
    env = {**os.environ, "TIERFLOW_HOME": str(home)}
    return os.posix_spawn(sys.executable, argv, env, setsid=True, file_actions=[
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(log_path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ])


def _exited(pid: int) -> int | None:
    """The exit code of our child `pid` when it has exited (and reap it), else None."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return -1
    return None if done == 0 else os.waitstatus_to_exitcode(status)


def _print_log_since(log_path: Path, offset: int) -> None:
    lines: list[str] = []
    with contextlib.suppress(FileNotFoundError), log_path.open("rb") as f:
        f.seek(offset)
        lines = f.read().decode("utf-8", errors="replace").splitlines()
    print("\n".join(f"  | {line}" for line in lines[-30:]) or "  (no output)", file=sys.stderr)


def _up_detached(settings: Settings, home: Path, timeout_s: float) -> int:
    if _refuse_if_running(home):
        return 1
    log_path = home / "logs" / "stack.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    offset = log_path.stat().st_size if log_path.exists() else 0
    pid = _spawn_detached(home, log_path)
    print(f"starting the stack in the background (supervisor pid {pid}, output in {log_path}) ...", flush=True)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            state = read_stack_state(home)
            if state is not None and state.pid == pid and healthy(state.api_url):
                print(_summary(state, external_broker=bool(settings.kafka.bootstrap_servers),
                               external_db=bool(settings.database.url)), flush=True)
                print("stop it with `tierflow down`", flush=True)
                return 0
            code = _exited(pid)
            if code is not None:
                print(f"tierflow up: the stack exited with code {code} while starting; "
                      f"last lines of {log_path}:", file=sys.stderr)
                _print_log_since(log_path, offset)
                return 1
            if time.monotonic() > deadline:
                print(f"tierflow up: the stack was not healthy within {timeout_s:.0f} s; stopping it. "
                      f"Last lines of {log_path}:", file=sys.stderr)
                _print_log_since(log_path, offset)
                _stop_spawned(pid)
                return 1
            time.sleep(_POLL_S)  # polling interval of a condition with a deadline
    except KeyboardInterrupt:
        print("interrupted: stopping the stack", file=sys.stderr)
        _stop_spawned(pid)
        return 130


def _stop_spawned(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not _wait_until(lambda: _exited(pid) is not None, 60.0):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def _up(args: argparse.Namespace, settings: Settings) -> int:
    home = resolve_home(settings)
    if args.detach:
        return _up_detached(settings, home, args.timeout)
    return _up_foreground(settings, home, args.timeout)


# --- status and down ----------------------------------------------------------------------------------

def _component_rows(state: StackState) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [
        {"component": "supervisor", "pid": state.pid, "state": "running" if state.alive() else "down",
         "address": str(state.home)},
    ]
    addresses = {"broker": state.bootstrap_servers, "postgres": redact(state.database_url),
                 "worker": "", "api": state.api_url}
    for name in ("broker", "postgres", "worker", "api"):
        pid = state.children.get(name)
        if pid is None:
            rows.append({"component": name, "pid": None, "state": "external", "address": addresses[name]})
            continue
        alive = pid_alive(pid)
        status = "running" if alive else "down"
        if name == "api" and alive:
            status = "healthy" if healthy(state.api_url) else "unhealthy"
        rows.append({"component": name, "pid": pid, "state": status, "address": addresses[name]})
    for name, pid in state.children.items():  # children this version does not know by name
        if name not in addresses:
            rows.append({"component": name, "pid": pid, "state": "running" if pid_alive(pid) else "down",
                         "address": ""})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ("COMPONENT", "PID", "STATE", "ADDRESS")
    cells = [header] + [(str(r["component"]), "-" if r["pid"] is None else str(r["pid"]), str(r["state"]),
                         str(r["address"]) or "-") for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:3])) + "  " + row[3] for row in cells
    )


def _status(args: argparse.Namespace, settings: Settings) -> int:
    home = resolve_home(settings)
    state = read_stack_state(home)
    running = state is not None and state.alive()
    if args.json:
        body: dict[str, Any] = {"running": running, "home": str(home)}
        if state is not None:
            body.update(state.to_json(), running=running, components=_component_rows(state))
        print(json.dumps(body, indent=2))
    elif state is None and (starting := _starting_pid(home)) is not None:
        print(f"a tierflow stack is starting for {home} (supervisor pid {starting}); "
              f"its output is in {home / 'logs'}")
    elif state is None:
        print(f"no tierflow stack is running for {home} (start one with `tierflow up`)")
    elif not running:
        print(f"no tierflow stack is running for {home}: its supervisor (pid {state.pid}) is gone; "
              "`tierflow down` cleans up what it left")
    else:
        print(f"tierflow stack for {home}, up since {state.started_at.isoformat(timespec='seconds')}")
        print(format_table(_component_rows(state)))
    return 0 if running else EXIT_NOT_RUNNING


def _down(args: argparse.Namespace, settings: Settings) -> int:
    home = resolve_home(settings)
    state = read_stack_state(home)
    if state is None:
        starting = _starting_pid(home)
        if starting is None:
            print(f"no tierflow stack is running for {home}")
            return 0
        # Still starting: its supervisor stops what it started on SIGTERM.
        print(f"stopping the stack of {home}, which is still starting (supervisor pid {starting}) ...", flush=True)
        os.kill(starting, signal.SIGTERM)
        if _wait_until(lambda: not pid_alive(starting), args.timeout):
            print("stopped")
            return 0
        print(f"tierflow down: the supervisor (pid {starting}) did not stop within {args.timeout:.0f} s",
              file=sys.stderr)
        return 1
    if not state.alive():
        print(f"the supervisor of {home} (pid {state.pid}) is already gone; cleaning up", flush=True)
        _clean_stale(home, state)
        return 0
    print(f"stopping the stack of {home} (supervisor pid {state.pid}) ...", flush=True)
    with contextlib.suppress(ProcessLookupError):
        os.kill(state.pid, signal.SIGTERM)

    def gone() -> bool:
        return not pid_alive(state.pid) and not _groups_alive(state.children)

    if _wait_until(gone, args.timeout):
        stack_file(home).unlink(missing_ok=True)  # normally removed by the supervisor itself
        print("stopped")
        return 0
    left = _groups_alive(state.children)
    print(f"tierflow down: the stack did not stop within {args.timeout:.0f} s "
          f"(still running: {', '.join(['supervisor', *left] if pid_alive(state.pid) else left)}); killing it",
          file=sys.stderr)
    with contextlib.suppress(ProcessLookupError):
        os.kill(state.pid, signal.SIGKILL)
    _kill_leftovers(state, signal.SIGKILL)
    killed = _wait_until(gone, 10.0)
    stack_file(home).unlink(missing_ok=True)
    if not killed:
        print("tierflow down: some processes survived SIGKILL: " + ", ".join(_groups_alive(state.children)),
              file=sys.stderr)
    return 1


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `up`, `status` and `down` to the front door."""
    up = subparsers.add_parser("up", help="run the embedded stack (broker, Postgres, worker, API)")
    mode = up.add_mutually_exclusive_group()
    mode.add_argument("--foreground", action="store_true",
                      help="supervise in this terminal until Ctrl-C (the default)")
    mode.add_argument("--detach", action="store_true",
                      help="supervise in the background (output in <home>/logs/stack.log); return once healthy")
    up.add_argument("--timeout", type=positive_seconds, default=180.0, metavar="SECONDS",
                    help="how long to wait for the API to become healthy (default 180)")
    up.set_defaults(func=_up)

    status = subparsers.add_parser("status", help="show the embedded stack's components (exit 3: not running)")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.set_defaults(func=_status)

    down = subparsers.add_parser("down", help="stop the embedded stack started by `tierflow up`")
    down.add_argument("--timeout", type=positive_seconds, default=60.0, metavar="SECONDS",
                      help="how long to wait for every process to exit before killing them (default 60)")
    down.set_defaults(func=_down)



def up_detached(settings: Settings, *, timeout_s: float = 180.0) -> int:
    """`tierflow up --detach` for other commands (the demo): start the stack in the background, wait until
    healthy; the exit code."""
    return _up_detached(settings, resolve_home(settings), timeout_s)


def down(settings: Settings, *, timeout_s: float = 60.0) -> int:
    """`tierflow down` for other commands; the exit code."""
    return _down(argparse.Namespace(timeout=timeout_s), settings)
