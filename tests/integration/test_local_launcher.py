"""LocalLauncher with real subprocesses: launch, list, crash, kill -9, stop, and a restarted worker.

Workloads are small Python scripts (`command_prefix` = `python -c SCRIPT`, `args` = the script's arguments),
plus one run of the real `tierflow` CLI through the default prefix. Every check of "no process left" reads
/proc, the way the launcher itself does.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tierflow.deploy.local_launcher import (
    LocalLauncher,
    _proc_stat,
    describe_returncode,
    group_members,
    is_alive,
    workload_status,
)
from tierflow.streams.launcher import LABEL_RESULTS, WorkloadSpec, WorkloadStatus

SCRIPT = """
import os, signal, sys, time
mode = sys.argv[1]
print(f"workload {mode} pid={os.getpid()} x={os.environ.get('TIERFLOW_X')} y={os.environ.get('TIERFLOW_Y')}",
      flush=True)
if mode == "ok":
    sys.exit(0)
if mode == "crash":
    for i in range(30):
        print(f"step {i}")
    print("ValueError: record 17 has 783 bytes, expected 784", file=sys.stderr)
    sys.exit(3)
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if mode == "child":  # leaves a grandchild in the workload's process group
    import subprocess
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""


def spec(name: str, mode: str, **labels: str) -> WorkloadSpec:
    return WorkloadSpec(name=name, kind="training", args=[mode], env={"TIERFLOW_Y": "from-spec"},
                        labels={LABEL_RESULTS: "1-2", **labels})


@pytest.fixture
async def state_dir(tmp_path: Path) -> AsyncIterator[Path]:
    yield tmp_path / "workloads"
    # Whatever a test left running is stopped, so no test leaks processes into the next.
    await make_launcher(tmp_path / "workloads").stop_all()


def make_launcher(state_dir: Path, grace_s: float = 5.0) -> LocalLauncher:
    return LocalLauncher(state_dir, {"TIERFLOW_X": "from-launcher"},
                         command_prefix=[sys.executable, "-c", SCRIPT], grace_s=grace_s)


async def status_of(launcher: LocalLauncher, name: str) -> WorkloadStatus | None:
    return next((w for w in await launcher.list() if w.name == name), None)


async def wait_phase(launcher: LocalLauncher, name: str, phase: str) -> WorkloadStatus:
    async def reached() -> bool:
        status = await status_of(launcher, name)
        return status is not None and status.phase == phase

    await wait_until(reached, timeout=30, what=f"{name} {phase}")
    status = await status_of(launcher, name)
    assert status is not None
    return status


async def wait_log(launcher: LocalLauncher, name: str, text: str) -> None:
    log = launcher.workload_dir(name) / "log"
    await wait_until(lambda: log.exists() and text in log.read_text(), timeout=30, what=f"{text!r} in {log}")


def supervisor_pid(launcher: LocalLauncher, name: str) -> tuple[int, int]:
    pid, start = (launcher.workload_dir(name) / "pid").read_text().split()
    return int(pid), int(start)


async def test_workload_runs_to_success_and_launch_is_idempotent(state_dir: Path) -> None:
    launcher = make_launcher(state_dir)
    # Launch a workload, then launch it again (a replayed launch): one process, one log.
    await launcher.launch(spec("w-ok", "ok"))
    await launcher.launch(spec("w-ok", "ok"))
    status = await wait_phase(launcher, "w-ok", "succeeded")
    assert status == WorkloadStatus("w-ok", "training", {LABEL_RESULTS: "1-2"}, "succeeded", exit_code=0)
    log = (launcher.workload_dir("w-ok") / "log").read_text()
    assert log.count("workload ok") == 1
    # The launcher's env and the spec's env both reach the workload.
    assert "x=from-launcher y=from-spec" in log
    # Finished and not removed: a further launch still does nothing.
    await launcher.launch(spec("w-ok", "ok"))
    assert (launcher.workload_dir("w-ok") / "log").read_text().count("workload ok") == 1


async def test_running_then_crashed_workload_reports_exit_code_and_log_tail(state_dir: Path) -> None:
    launcher = make_launcher(state_dir)
    await launcher.launch(spec("w-serve", "serve"))
    await wait_log(launcher, "w-serve", "ready")
    assert (await status_of(launcher, "w-serve")) == WorkloadStatus("w-serve", "training", {LABEL_RESULTS: "1-2"},
                                                                     "running")
    await launcher.launch(spec("w-crash", "crash"))
    crashed = await wait_phase(launcher, "w-crash", "failed")
    assert crashed.exit_code == 3
    assert crashed.reason is not None
    assert "exited with code 3" in crashed.reason
    assert "record 17 has 783 bytes" in crashed.reason
    tail = crashed.reason.split("last log lines:\n", 1)[1].splitlines()
    assert len(tail) == 20  # only the last 20 lines: the first steps are not there
    assert "step 29" in tail and "step 5" not in tail
    # kind filter
    assert {w.name for w in await launcher.list("training")} == {"w-serve", "w-crash"}
    assert await launcher.list("inference") == []


async def test_kill_9_of_the_supervisor_fails_the_workload_and_leaves_nothing(state_dir: Path) -> None:
    launcher = make_launcher(state_dir)
    await launcher.launch(spec("w-killed", "serve"))
    await wait_log(launcher, "w-killed", "ready")
    pid, _ = supervisor_pid(launcher, "w-killed")
    assert len(group_members(pid)) == 2  # the supervisor and the workload
    os.kill(pid, signal.SIGKILL)
    status = await wait_phase(launcher, "w-killed", "failed")
    assert status.exit_code is None
    assert status.reason is not None and "killed (e.g. kill -9)" in status.reason
    # The workload died with its supervisor (PR_SET_PDEATHSIG): nothing runs unseen.
    await wait_until(lambda: not group_members(pid), timeout=10, what="the workload's processes to end")
    await launcher.stop("w-killed")
    assert not launcher.workload_dir("w-killed").exists()


async def test_stop_terminates_the_whole_group_and_removes_the_workload(state_dir: Path) -> None:
    launcher = make_launcher(state_dir)
    await launcher.launch(spec("w-child", "child"))
    await wait_log(launcher, "w-child", "ready")
    pid, start = supervisor_pid(launcher, "w-child")
    await wait_until(lambda: len(group_members(pid)) == 3, timeout=10, what="supervisor, workload, grandchild")
    await launcher.stop("w-child")
    assert not group_members(pid)
    assert not is_alive(pid, start)
    assert not launcher.workload_dir("w-child").exists()
    assert await status_of(launcher, "w-child") is None
    # Stopping a missing workload is a success too.
    await launcher.stop("w-child")
    await launcher.stop("never-launched")


async def test_stop_kills_a_workload_that_ignores_sigterm_after_the_grace_period(state_dir: Path) -> None:
    launcher = make_launcher(state_dir, grace_s=0.3)
    await launcher.launch(spec("w-stubborn", "stubborn"))
    await wait_log(launcher, "w-stubborn", "ready")
    pid, _ = supervisor_pid(launcher, "w-stubborn")
    await launcher.stop("w-stubborn")
    assert not group_members(pid)
    assert not launcher.workload_dir("w-stubborn").exists()


async def test_a_restarted_worker_finds_the_same_workloads(state_dir: Path) -> None:
    first = make_launcher(state_dir)
    await first.launch(spec("w-long", "serve"))
    await first.launch(spec("w-done", "ok"))
    await wait_log(first, "w-long", "ready")
    await wait_phase(first, "w-done", "succeeded")
    await first.close()  # the worker goes away; its workloads keep running
    pid, start = supervisor_pid(first, "w-long")
    assert is_alive(pid, start)

    second = make_launcher(state_dir)
    statuses = {w.name: w.phase for w in await second.list()}
    assert statuses == {"w-long": "running", "w-done": "succeeded"}
    await second.launch(spec("w-long", "serve"))  # the reconciler's relaunch finds it there
    assert supervisor_pid(second, "w-long") == (pid, start)
    await second.stop_all()
    assert await second.list() == []
    assert not group_members(pid)


async def test_the_default_command_is_the_tierflow_cli(tmp_path: Path) -> None:
    launcher = LocalLauncher(tmp_path / "workloads", {})
    await launcher.launch(WorkloadSpec(name="cli-help", kind="training", args=["--help"]))
    status = await wait_phase(launcher, "cli-help", "succeeded")
    assert status.exit_code == 0
    assert "usage: tierflow" in (launcher.workload_dir("cli-help") / "log").read_text()
    await launcher.stop_all()


async def test_a_missing_program_fails_with_127(tmp_path: Path) -> None:
    launcher = LocalLauncher(tmp_path / "workloads", {}, command_prefix=["/nonexistent/tierflow"])
    await launcher.launch(WorkloadSpec(name="no-program", kind="training", args=["train"]))
    status = await wait_phase(launcher, "no-program", "failed")
    assert status.exit_code == 127
    assert status.reason is not None and "cannot run '/nonexistent/tierflow'" in status.reason
    await launcher.stop_all()


async def test_names_that_are_not_folder_names_are_refused(tmp_path: Path) -> None:
    launcher = LocalLauncher(tmp_path / "workloads", {})
    for bad in ["../escape", "a/b", "", ".hidden"]:
        with pytest.raises(ValueError, match="folder name"):
            await launcher.launch(WorkloadSpec(name=bad, kind="training", args=[]))


def test_status_words_for_return_codes() -> None:
    assert describe_returncode(0) == (0, "exited with code 0")
    assert describe_returncode(-signal.SIGKILL) == (137, "killed by SIGKILL (exit code 137)")
    killed = workload_status({"name": "w", "kind": "training", "labels": {}}, returncode=-15, pid=1, alive=False,
                             tail=["last words"])
    assert (killed.phase, killed.exit_code) == ("failed", 143)
    assert killed.reason == "workload w killed by SIGTERM (exit code 143)\nlast log lines:\nlast words"


def test_a_reused_pid_is_not_taken_for_the_supervisor() -> None:
    stat = _proc_stat(os.getpid())
    assert stat is not None
    assert is_alive(os.getpid(), stat[2])
    assert not is_alive(os.getpid(), stat[2] + 1)  # same pid, another start time: another process
