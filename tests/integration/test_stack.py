"""Integration tests of the embedded stack: the Supervisor with real processes, and `tierflow up/status/down`.

The Supervisor tests run small `python -c` / `sh -c` children. The `tierflow up --detach` test starts the
real stack (Tansu, Postgres, worker, API) in a fresh TIERFLOW_HOME and is skipped while the modules it runs
do not exist yet. Every test ends by checking that no process it started is left.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from tierflow.deploy.services import ChildSpec
from tierflow.deploy.supervisor import RestartPolicy, Supervisor, group_members
from tierflow.streams.stack_state import pid_alive, read_stack_state

FAST = RestartPolicy(initial_s=0.05, max_s=0.4, reset_after_s=60.0)


async def until(condition: Callable[[], bool], deadline_s: float = 20.0, what: str = "condition") -> None:
    """Poll `condition` until it holds; fail after `deadline_s`."""
    deadline = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {deadline_s} s")
        await asyncio.sleep(0.02)


def python(code: str, name: str) -> ChildSpec:
    return ChildSpec(name=name, argv=[sys.executable, "-c", code])


def log_says(path: Path, text: str) -> Callable[[subprocess.Popen[bytes]], Awaitable[None]]:
    """A ready check: the child's log contains `text` after the last start marker."""

    async def ready(proc: subprocess.Popen[bytes]) -> None:
        def printed() -> bool:
            content = path.read_text() if path.exists() else ""
            return text in content.rsplit("--- tierflow:", 1)[-1]

        await until(printed, what=f"{path.name} saying {text!r}")

    return ready


def nothing_left(pids: set[int]) -> bool:
    """No process of the given pids (each the leader of its own group) is alive."""
    return not any(pid_alive(pid) or group_members(pid) for pid in pids)


class PidRecorder:
    """The supervisor's change hook: remembers every pid it ever ran."""

    def __init__(self) -> None:
        self.supervisor: Supervisor | None = None
        self.seen: set[int] = set()

    def __call__(self) -> None:
        assert self.supervisor is not None
        self.seen.update(self.supervisor.pids().values())


def supervisor(tmp_path: Path, policy: RestartPolicy = FAST, grace_s: float = 5.0) -> tuple[Supervisor, PidRecorder]:
    recorder = PidRecorder()
    sup = Supervisor(log_dir=tmp_path / "logs", policy=policy, grace_s=grace_s, on_change=recorder)
    recorder.supervisor = sup
    return sup, recorder


async def test_a_crashing_child_is_restarted_with_backoff_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tierflow.stack")
    sup, recorder = supervisor(tmp_path)
    await sup.start(python("import sys; print('boom: no config', flush=True); sys.exit(3)", "crasher"))

    # Check it keeps being restarted, each time with a new process.
    await until(lambda: sup.restarts("crasher") >= 4, what="four restarts")
    await sup.stop()
    assert len(recorder.seen) >= 4

    # Check each restart was logged with the child, the exit code, the attempt, the delay and its output.
    restarts = [r.getMessage() for r in caplog.records if "restart attempt" in r.getMessage()]
    assert len(restarts) >= 4
    for attempt, (message, delay) in enumerate(zip(restarts, ["0.05", "0.10", "0.20", "0.40"], strict=False),
                                               start=1):
        assert message.startswith("crasher (pid ")
        assert "exit code 3" in message
        assert f"restart attempt {attempt} in {delay} s" in message
        assert "boom: no config" in message

    # Check nothing is left.
    assert nothing_left(recorder.seen)


async def test_stop_stops_children_in_reverse_order_and_leaves_no_process(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tierflow.stack")
    sup, recorder = supervisor(tmp_path, grace_s=1.0)
    # A child with a grandchild in its group, and a child that ignores SIGTERM.
    await sup.start(ChildSpec(name="first", argv=["sh", "-c", "sleep 300 & echo started; wait"]),
                    ready=log_says(sup.log_path("first"), "started"))
    stubborn = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "print('ignoring SIGTERM', flush=True); time.sleep(300)")
    await sup.start(python(stubborn, "second"), ready=log_says(sup.log_path("second"), "ignoring SIGTERM"))
    first_pid = sup.pids()["first"]
    assert len(group_members(first_pid)) == 2  # sh and its sleep

    await sup.stop()

    stopped = [r.getMessage().split()[1] for r in caplog.records if r.getMessage().startswith("stopped ")]
    assert stopped == ["second", "first"]
    assert any("did not stop within" in r.getMessage() and "second" in r.getMessage() for r in caplog.records)
    assert nothing_left(recorder.seen)
    assert not sup.running("first") and not sup.running("second")


async def test_a_crash_kills_what_the_child_left_in_its_group_before_restarting(tmp_path: Path) -> None:
    sup, recorder = supervisor(tmp_path, policy=RestartPolicy(initial_s=0.05, max_s=60.0))
    # The child starts a grandchild and crashes: the grandchild would be an orphan.
    await sup.start(ChildSpec(name="leaky", argv=["sh", "-c", "sleep 300 & sleep 0.2; exit 1"]))
    first = sup.pids()["leaky"]
    await until(lambda: sup.restarts("leaky") >= 1, what="a restart")
    await until(lambda: not group_members(first), deadline_s=10.0, what="the first run's group gone")
    await sup.stop()
    assert nothing_left(recorder.seen)


async def test_a_deliberate_restart_replaces_the_process_and_runs_the_hook_after_crashes(tmp_path: Path) -> None:
    sup, recorder = supervisor(tmp_path)
    hooks: list[int] = []

    async def after_restart() -> None:
        hooks.append(sup.pids()["flaky"])

    # `flaky` crashes once (it finds no marker file), then stays up.
    marker = tmp_path / "ran-once"
    code = (f"import pathlib, sys, time; m = pathlib.Path({str(marker)!r})\n"
            "if not m.exists(): m.touch(); sys.exit(1)\n"
            "time.sleep(300)")
    await sup.start(python(code, "flaky"), on_restarted=after_restart)
    await sup.start(python("import time; time.sleep(300)", "steady"))
    await until(lambda: len(hooks) == 1, what="the after-restart hook")
    assert hooks == [sup.pids()["flaky"]]

    before = sup.pids()["steady"]
    after = await sup.restart("steady")
    assert after != before and sup.pids()["steady"] == after
    await until(lambda: not pid_alive(before), what="the old steady process gone")
    assert sup.restarts("steady") == 0  # a deliberate restart is not a crash

    await sup.stop()
    assert nothing_left(recorder.seen)


async def test_a_child_that_cannot_be_spawned_any_more_is_retried_until_it_can(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="tierflow.stack")
    sup, recorder = supervisor(tmp_path)
    program = tmp_path / "program.sh"
    program.write_text("#!/bin/sh\nexit 1\n")
    program.chmod(0o755)
    await sup.start(ChildSpec(name="vanishing", argv=[str(program)]))

    # Remove the program: the restarts fail to spawn, and say why.
    program.unlink()
    await until(lambda: any("could not start vanishing" in r.getMessage() for r in caplog.records),
                what="a failed spawn logged")

    # Put it back, as a program that stays up: the child runs again.
    program.write_text("#!/bin/sh\nexec sleep 300\n")
    program.chmod(0o755)
    await until(lambda: sup.running("vanishing") and pid_alive(sup.pids()["vanishing"]), what="the child back")
    await sup.stop()
    assert nothing_left(recorder.seen)


async def test_a_child_that_never_gets_ready_is_stopped_and_the_error_propagates(tmp_path: Path) -> None:
    sup, recorder = supervisor(tmp_path)

    async def never(proc: subprocess.Popen[bytes]) -> None:
        raise RuntimeError(f"pid {proc.pid} is not ready")

    with pytest.raises(RuntimeError, match="is not ready"):
        await sup.start(python("import time; time.sleep(300)", "hopeless"), ready=never)
    await sup.stop()
    assert recorder.seen and nothing_left(recorder.seen)


# --- the whole stack ----------------------------------------------------------------------------------

STACK_MODULES = ["tierflow.api.app", "tierflow.streams.worker", "tierflow.projections.migrate",
                 "tierflow.streams.archive", "tierflow.deploy.cli_resources"]


def _missing_modules() -> list[str]:
    missing = []
    for name in STACK_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(name)
    return missing


@pytest.fixture
def stack_home() -> Iterator[Path]:
    """A TIERFLOW_HOME under /tmp that the `postgres` user can traverse (Postgres runs as it under root)."""
    home = Path(tempfile.mkdtemp(prefix="tierflow-stack-test-", dir="/tmp"))
    home.chmod(0o755)
    try:
        yield home
    finally:
        state = read_stack_state(home)
        if state is not None and state.alive():  # a failed test must not leave a stack running
            os.kill(state.pid, signal.SIGTERM)
        shutil.rmtree(home, ignore_errors=True)


def tierflow(home: Path, *args: str, timeout_s: float = 240.0) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TIERFLOW_") and k not in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL")}
    env.update(TIERFLOW_HOME=str(home), TIERFLOW_API_PORT="0", TIERFLOW_RESTART_BACKOFF_S="0.2")
    return subprocess.run([sys.executable, "-m", "tierflow.deploy.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout_s, check=False)


@pytest.mark.slow
def test_up_detach_status_down_leave_nothing_behind(stack_home: Path) -> None:
    missing = _missing_modules()
    if missing:
        pytest.skip(f"the stack's modules do not exist yet: {', '.join(missing)}")

    # Nothing runs yet.
    assert tierflow(stack_home, "status").returncode == 3
    assert "no tierflow stack is running" in tierflow(stack_home, "down").stdout

    # Start the stack in the background: it returns once the API is healthy.
    up = tierflow(stack_home, "up", "--detach")
    assert up.returncode == 0, up.stdout + up.stderr + _stack_log(stack_home)
    assert "API:" in up.stdout and "broker:" in up.stdout and "Postgres:" in up.stdout
    state = read_stack_state(stack_home)
    assert state is not None and state.alive()
    assert set(state.children) == {"broker", "postgres", "worker", "api"}
    assert state.home == stack_home.resolve()
    assert "restored 0 events" in _stack_log(stack_home)

    # Check a second `up` for the same home refuses.
    again = tierflow(stack_home, "up", "--detach")
    assert again.returncode == 1 and "already running" in again.stderr

    # Check status, as a table and as JSON.
    table = tierflow(stack_home, "status")
    assert table.returncode == 0, table.stdout + table.stderr
    assert "healthy" in table.stdout and state.api_url in table.stdout
    as_json = tierflow(stack_home, "status", "--json")
    assert as_json.returncode == 0
    body = json.loads(as_json.stdout)
    assert body["running"] is True and body["api_url"] == state.api_url
    # Secure by default: a token the API requires (reads too), kept private, found by the CLI by itself, and
    # the UI's one-time address printed.
    assert body["token"] == state.token and len(state.token) >= 32
    assert f"/ui/?token={state.token}" in up.stdout
    assert stat.S_IMODE((stack_home / "stack.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((stack_home / "secrets" / "secret_key").stat().st_mode) == 0o600
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(f"{state.api_url}/models", timeout=10)
    assert refused.value.code == 401
    refused.value.close()
    listed = tierflow(stack_home, "models", "list")
    assert listed.returncode == 0 and listed.stdout == "no models\n", listed.stdout + listed.stderr
    assert {c["component"]: c["state"] for c in body["components"]} == {
        "supervisor": "running", "broker": "running", "postgres": "running", "worker": "running",
        "api": "healthy",
    }

    # Stop it: the supervisor and every child are gone, and so is stack.json.
    down = tierflow(stack_home, "down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert not (stack_home / "stack.json").exists()
    assert not pid_alive(state.pid)
    assert nothing_left(set(state.children.values()))
    assert tierflow(stack_home, "status").returncode == 3


def _stack_log(home: Path) -> str:
    path = home / "logs" / "stack.log"
    return path.read_text() if path.exists() else ""
