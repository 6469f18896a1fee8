"""The embedded stack's commands: `tierflow up`, `tierflow status`, `tierflow down`.

Registered into the front door by deploy/cli.py (`register(subparsers)`); each handler calls a plain function
(`up`, `status`, `down`, `up_detached`) that the demo (deploy/demo.py) calls too. `up` runs the supervisor
process (deploy/stack_runtime.py) here or detached; `status` and `down` read `<home>/stack.json`
(streams/stack_state.py) and act on the processes it names (deploy/stack_processes.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from typing import Any

from tierflow.deploy.stack_processes import (
    POLL_S,
    clean_stale,
    exited,
    groups_alive,
    healthy,
    kill_leftovers,
    print_log_since,
    redact,
    refuse_if_running,
    spawn_detached,
    starting_pid,
    stop_spawned,
    up_summary,
    wait_until,
)
from tierflow.deploy.stack_runtime import up_foreground
from tierflow.streams.cli_args import positive_seconds
from tierflow.streams.settings import Settings
from tierflow.streams.stack_state import StackState, pid_alive, read_stack_state, resolve_home, stack_file

EXIT_NOT_RUNNING = 3


def up_detached(settings: Settings, *, timeout_s: float = 180.0) -> int:
    """`tierflow up --detach`, also for other commands (the demo): start the stack in the background and wait
    until it is healthy; the exit code."""
    home = resolve_home(settings)
    if refuse_if_running(home):
        return 1
    log_path = home / "logs" / "stack.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    offset = log_path.stat().st_size if log_path.exists() else 0
    pid = spawn_detached(home, log_path)
    print(f"starting the stack in the background (supervisor pid {pid}, output in {log_path}) ...", flush=True)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            state = read_stack_state(home)
            if state is not None and state.pid == pid and healthy(state.api_url):
                print(up_summary(state, external_broker=bool(settings.kafka.bootstrap_servers),
                                 external_db=bool(settings.database.url)), flush=True)
                print("stop it with `tierflow down`", flush=True)
                return 0
            code = exited(pid)
            if code is not None:
                print(f"tierflow up: the stack exited with code {code} while starting; "
                      f"last lines of {log_path}:", file=sys.stderr)
                print_log_since(log_path, offset)
                return 1
            if time.monotonic() > deadline:
                print(f"tierflow up: the stack was not healthy within {timeout_s:.0f} s; stopping it. "
                      f"Last lines of {log_path}:", file=sys.stderr)
                print_log_since(log_path, offset)
                stop_spawned(pid)
                return 1
            time.sleep(POLL_S)  # polling interval of a condition with a deadline
    except KeyboardInterrupt:
        print("interrupted: stopping the stack", file=sys.stderr)
        stop_spawned(pid)
        return 130


def up(settings: Settings, *, detach: bool = False, timeout_s: float = 180.0) -> int:
    """`tierflow up`: supervise the stack in this process until Ctrl-C, or start it in the background."""
    if detach:
        return up_detached(settings, timeout_s=timeout_s)
    return up_foreground(settings, resolve_home(settings), timeout_s)


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


def status(settings: Settings, *, as_json: bool = False) -> int:
    """`tierflow status`: print the stack's components; 0 when it runs, EXIT_NOT_RUNNING otherwise."""
    home = resolve_home(settings)
    state = read_stack_state(home)
    running = state is not None and state.alive()
    if as_json:
        body: dict[str, Any] = {"running": running, "home": str(home)}
        if state is not None:
            # `api_url` and `token` are what a script needs to call the API (this output is for the user only).
            body.update(state.to_json(), running=running, token=state.token, components=_component_rows(state))
        print(json.dumps(body, indent=2))
    elif state is None and (starting := starting_pid(home)) is not None:
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


def down(settings: Settings, *, timeout_s: float = 60.0) -> int:
    """`tierflow down`, also for other commands (the demo): stop the stack of the settings' home and everything
    it started, killing what does not stop within `timeout_s`; the exit code."""
    home = resolve_home(settings)
    state = read_stack_state(home)
    if state is None:
        starting = starting_pid(home)
        if starting is None:
            print(f"no tierflow stack is running for {home}")
            return 0
        # Still starting: its supervisor stops what it started on SIGTERM.
        print(f"stopping the stack of {home}, which is still starting (supervisor pid {starting}) ...", flush=True)
        os.kill(starting, signal.SIGTERM)
        if wait_until(lambda: not pid_alive(starting), timeout_s):
            print("stopped")
            return 0
        print(f"tierflow down: the supervisor (pid {starting}) did not stop within {timeout_s:.0f} s",
              file=sys.stderr)
        return 1
    if not state.alive():
        print(f"the supervisor of {home} (pid {state.pid}) is already gone; cleaning up", flush=True)
        clean_stale(home, state)
        return 0
    print(f"stopping the stack of {home} (supervisor pid {state.pid}) ...", flush=True)
    with contextlib.suppress(ProcessLookupError):
        os.kill(state.pid, signal.SIGTERM)

    def gone() -> bool:
        return not pid_alive(state.pid) and not groups_alive(state.children)

    if wait_until(gone, timeout_s):
        stack_file(home).unlink(missing_ok=True)  # normally removed by the supervisor itself
        print("stopped")
        return 0
    left = groups_alive(state.children)
    print(f"tierflow down: the stack did not stop within {timeout_s:.0f} s "
          f"(still running: {', '.join(['supervisor', *left] if pid_alive(state.pid) else left)}); killing it",
          file=sys.stderr)
    with contextlib.suppress(ProcessLookupError):
        os.kill(state.pid, signal.SIGKILL)
    kill_leftovers(state, signal.SIGKILL)
    killed = wait_until(gone, 10.0)
    stack_file(home).unlink(missing_ok=True)
    if not killed:
        print("tierflow down: some processes survived SIGKILL: " + ", ".join(groups_alive(state.children)),
              file=sys.stderr)
    return 1


def _up(args: argparse.Namespace, settings: Settings) -> int:
    return up(settings, detach=args.detach, timeout_s=args.timeout)


def _status(args: argparse.Namespace, settings: Settings) -> int:
    return status(settings, as_json=args.json)


def _down(args: argparse.Namespace, settings: Settings) -> int:
    return down(settings, timeout_s=args.timeout)


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
