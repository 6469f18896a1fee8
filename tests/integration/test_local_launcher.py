"""LocalLauncher with real subprocesses: launch, list, crash, kill -9, stop, and a restarted worker.

Workloads are small Python scripts (tests/integration/launcher_script.py), each run both ways a workload starts:
`exec` (`command_prefix` = `python -c SCRIPT`, `args` = the script's arguments) and `forked` from the tier zygote
(deploy/local_zygote.py, whose entry point runs the same script in-process), plus runs of the real `tierflow`
CLI through the default prefix and through a zygote that preloads TensorFlow. Every check of "no process left"
reads /proc, the way the launcher itself does.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tests.integration.launcher_script import SCRIPT
from tierflow.deploy.local_launcher import (
    LocalLauncher,
    _proc_stat,
    describe_returncode,
    forked,
    group_members,
    is_alive,
    workload_status,
)
from tierflow.deploy.local_zygote import BASE_PRELOAD, ZYGOTE_LOG, TierZygote
from tierflow.streams.launcher import LABEL_RESULTS, WorkloadSpec, WorkloadStatus

REPOSITORY = Path(__file__).resolve().parents[2]
#: How the tests' launchers start workloads: set per test by the `way` fixture.
WAYS = ("exec", "forked")
_way = {"now": "exec"}
_zygotes: list[TierZygote] = []


def spec(name: str, mode: str, **labels: str) -> WorkloadSpec:
    # `tier run` is what the zygote forks (the tiers); the exec'd script reads only its last argument.
    return WorkloadSpec(name=name, kind="training", args=["tier", "run", mode], env={"TIERFLOW_Y": "from-spec"},
                        labels={LABEL_RESULTS: "1-2", **labels})


@pytest.fixture(params=WAYS)
def way(request: pytest.FixtureRequest) -> str:
    _way["now"] = request.param
    return str(request.param)


@pytest.fixture
async def state_dir(tmp_path: Path, way: str) -> AsyncIterator[Path]:
    yield tmp_path / "workloads"
    await _clean_up(tmp_path / "workloads")


async def _clean_up(state_dir: Path) -> None:
    # Whatever a test left running is stopped, so no test leaks processes into the next.
    await LocalLauncher(state_dir, {}).stop_all()
    while _zygotes:
        await _zygotes.pop().close()


@pytest.fixture
async def forked_dir(tmp_path: Path) -> AsyncIterator[Path]:
    _way["now"] = "forked"
    yield tmp_path / "workloads"
    await _clean_up(tmp_path / "workloads")


def memory_holds(pid: int, needle: bytes) -> bool:
    """Whether `needle` is anywhere in the writable memory of process `pid` (its heap, stacks, anonymous maps)."""
    found = False
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            if "w" not in fields[1]:
                continue
            start, end = (int(part, 16) for part in fields[0].split("-"))
            try:
                mem.seek(start)
                found = found or needle in mem.read(end - start)
            except OSError:  # e.g. [vvar]: not readable through /proc/<pid>/mem
                continue
    return found


def scripted_zygote(state_dir: Path, **kwargs: object) -> TierZygote:
    """A zygote with nothing preloaded whose entry runs SCRIPT (the tests package importable from it)."""
    options: dict[str, object] = {"preload": [], "entry": "tests.integration.launcher_script:main", **kwargs}
    zygote = TierZygote({**os.environ, "PYTHONPATH": str(REPOSITORY)}, state_dir / ZYGOTE_LOG,
                        **options)  # type: ignore[arg-type]
    _zygotes.append(zygote)
    return zygote


def make_launcher(state_dir: Path, grace_s: float = 5.0) -> LocalLauncher:
    zygote = scripted_zygote(state_dir) if _way["now"] == "forked" else None
    return LocalLauncher(state_dir, {"TIERFLOW_X": "from-launcher"},
                         command_prefix=[sys.executable, "-c", SCRIPT], grace_s=grace_s, zygote=zygote)


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


# --- both ways: what a workload's end looks like ----------------------------------------------------------------


async def test_sigterm_reaches_the_workload_and_an_uncaught_exception_fails_it(state_dir: Path) -> None:
    launcher = make_launcher(state_dir)
    await launcher.launch(spec("w-polite", "polite"))
    await launcher.launch(spec("w-raise", "raise"))
    await wait_log(launcher, "w-polite", "ready")
    pid, _ = supervisor_pid(launcher, "w-polite")
    os.kill(pid, signal.SIGTERM)  # what `stop` sends: the supervisor forwards it, the workload drains
    stopped = await wait_phase(launcher, "w-polite", "succeeded")
    assert stopped.exit_code == 0
    assert "got SIGTERM, draining" in (launcher.workload_dir("w-polite") / "log").read_text()
    raised = await wait_phase(launcher, "w-raise", "failed")
    assert raised.exit_code == 1
    assert raised.reason is not None and "ValueError: an exception nobody caught" in raised.reason
    # An uncaught KeyboardInterrupt ends an interpreter by SIGINT, so a forked workload too.
    await launcher.launch(spec("w-interrupt", "interrupt"))
    interrupted = await wait_phase(launcher, "w-interrupt", "failed")
    assert interrupted.exit_code == 130
    assert interrupted.reason is not None and "killed by SIGINT" in interrupted.reason


# --- forked from the tier zygote ---------------------------------------------------------------------------------


def test_only_tier_workloads_are_forked() -> None:
    assert forked(["tier", "run", "--inference", "7", "--tier", "0"])
    assert not forked(["train", "--deployment", "3"])
    assert not forked(["tier"]) and not forked([])


async def test_a_forked_workload_gets_its_token_which_the_zygote_never_holds(forked_dir: Path) -> None:
    zygote = scripted_zygote(forked_dir)
    launcher = LocalLauncher(forked_dir, {"TIERFLOW_X": "from-launcher", "DATABASE_URL": "postgres://s3cret"},
                             zygote=zygote)
    token = "workload-token-7f3a"
    await launcher.launch(WorkloadSpec(name="t-0", kind="inference", args=["tier", "run", "serve"],
                                       env={"TIERFLOW_Y": "from-spec"}, secrets={"TIERFLOW_API_TOKEN": token}))
    await wait_log(launcher, "t-0", "ready")
    log = (launcher.workload_dir("t-0") / "log").read_text()
    # Its environment is the launcher's, the spec's and its secret, less the stack's secrets.
    assert f"x=from-launcher y=from-spec token={token} db=None" in log
    assert zygote.pid is not None
    pid, _ = supervisor_pid(launcher, "t-0")
    assert os.getsid(pid) == pid and pid != zygote.pid  # a session of its own, not the zygote's
    # The token went from the launcher to the workload through a pipe the zygote never read: it is in neither the
    # zygote's environment nor anywhere in its memory, so no tier forked later inherits a copy of it.
    assert token.encode() not in Path(f"/proc/{zygote.pid}/environ").read_bytes()
    assert not memory_holds(zygote.pid, token.encode())
    record = (launcher.workload_dir("t-0") / "spec.json").read_text()
    assert '"forked": true' in record and token not in record
    # A training is never forked, even with a zygote.
    await launcher.launch(WorkloadSpec(name="job", kind="training", args=["ok"]))
    await wait_phase(launcher, "job", "failed")  # the default prefix: `tierflow ok` is no command
    assert '"forked": false' in (launcher.workload_dir("job") / "spec.json").read_text()


async def test_without_its_zygote_a_tier_starts_the_plain_way(forked_dir: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    launcher = make_launcher(forked_dir)
    await launcher.launch(spec("first", "serve"))
    await wait_log(launcher, "first", "ready")
    zygote = launcher.zygote
    assert isinstance(zygote, TierZygote) and zygote.pid is not None
    os.kill(zygote.pid, signal.SIGKILL)
    await launcher.launch(spec("second", "serve"))
    await wait_log(launcher, "second", "ready")
    pid, _ = supervisor_pid(launcher, "second")
    assert b"tierflow.deploy.local_launcher" in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert '"forked": false' in (launcher.workload_dir("second") / "spec.json").read_text()
    assert "starts a fresh interpreter" in caplog.text
    # The workload forked before the zygote died runs on.
    first, start = supervisor_pid(launcher, "first")
    assert is_alive(first, start)


async def test_a_zygote_that_cannot_fork_safely_is_not_used(forked_dir: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    zygote = scripted_zygote(forked_dir, preload=["tests.integration.launcher_script:start_a_thread"])
    launcher = LocalLauncher(forked_dir, {}, command_prefix=[sys.executable, "-c", SCRIPT], zygote=zygote)
    await launcher.launch(spec("t-0", "ok"))
    await wait_phase(launcher, "t-0", "succeeded")
    assert "runs 2 threads after its imports" in caplog.text
    pid, _ = supervisor_pid(launcher, "t-0")
    assert zygote.pid is not None and pid != zygote.pid


async def test_the_real_zygote_preloads_tensorflow_and_runs_the_cli(forked_dir: Path) -> None:
    zygote = TierZygote({**os.environ}, forked_dir / ZYGOTE_LOG)
    _zygotes.append(zygote)
    launcher = LocalLauncher(forked_dir, {}, zygote=zygote)
    await launcher.launch(WorkloadSpec(name="t-help", kind="inference", args=["tier", "run", "--help"]))
    status = await wait_phase(launcher, "t-help", "succeeded")
    assert status.exit_code == 0
    assert "usage: tierflow tier run" in (launcher.workload_dir("t-help") / "log").read_text()
    assert zygote.pid is not None
    maps = Path(f"/proc/{zygote.pid}/maps").read_text()
    assert "_pywrap_tensorflow_internal" in maps  # TensorFlow is imported once, there
    assert "tflite_runtime" in maps or "ai_edge_litert" in maps


def test_the_stacks_zygote_holds_none_of_its_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tierflow.deploy.bootstrap import make_launcher as stack_launcher
    from tierflow.streams.settings import Settings, stack_secret_names

    monkeypatch.setenv("TIERFLOW_HOME", str(tmp_path))
    for name in stack_secret_names():
        monkeypatch.setenv(name, f"secret-of-{name}")
    launcher = stack_launcher(Settings.from_env())
    assert isinstance(launcher, LocalLauncher) and isinstance(launcher.zygote, TierZygote)
    assert not stack_secret_names() & set(launcher.zygote.env)
    assert launcher.zygote.env["OPENBLAS_NUM_THREADS"] == "1"
    # TensorFlow is preloaded where tiers serve with Keras; LiteRT tiers (auto: trained results have a .tflite)
    # need none of it.
    assert launcher.zygote.preload == BASE_PRELOAD
    monkeypatch.setenv("TIERFLOW_TIER_ENGINE", "keras")
    keras = stack_launcher(Settings.from_env())
    assert isinstance(keras, LocalLauncher) and isinstance(keras.zygote, TierZygote)
    assert keras.zygote.preload is not None and "tierflow.tiers.keras_code:load_keras" in keras.zygote.preload
    monkeypatch.setenv("TIERFLOW_TIER_ZYGOTE", "0")
    plain = stack_launcher(Settings.from_env())
    assert isinstance(plain, LocalLauncher) and plain.zygote is None
