"""Integration tests for the validation sandbox: a real zygote with TensorFlow under bubblewrap, real runners.

The slow tests share one warm pool per module (pool_size 2); the few that need other settings (a short
timeout, a broken interpreter, no isolation) start their own. The attacks live in tests/security.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from tests.conftest import wait_until
from tests.fixtures import model_code
from tierflow.streams.settings import SandboxSettings
from tierflow.tiers.sandbox import CodeInvalid, ModelSummary, SandboxError, SandboxPool, describe_exit

EXPECTED = {
    "edge": ModelSummary([None, 28, 28, 1], [[None, 64], [None, 10]], 303842),
    "fog": ModelSummary([None, 64], [[None, 64], [None, 10]], 4810),
    "cloud": ModelSummary([None, 64], [[None, 10]], 9610),
    "single": ModelSummary([None, 28, 28], [[None, 10]], 101770),
}

SEQUENTIAL_CONFIG = orjson.dumps({
    "class_name": "Sequential",
    "config": {
        "name": "from_json",
        "layers": [
            {"class_name": "InputLayer", "config": {"batch_input_shape": [None, 64], "dtype": "float32",
                                                     "name": "json_input"}},
            {"class_name": "Dense", "config": {"name": "json_hidden", "units": 32, "activation": "relu"}},
            {"class_name": "Dense", "config": {"name": "json_output", "units": 10, "activation": "softmax"}},
        ],
    },
}).decode()


def snippet(name: str) -> str:
    return model_code(name)


def runner_pids(pool: SandboxPool) -> list[int]:
    """Host pids of the pool's runners: each is PID 1 of a pid namespace of its own, two levels below the host."""
    found = []
    for pid in pool.pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:  # ended while we looked
            continue
        nspid = next(line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:"))
        if len(nspid) == 3 and nspid[-1] == "1" and "State:\tZ" not in status:
            found.append(pid)
    return found


def distinct_models(count: int) -> list[tuple[str, int]]:
    """`count` different small models in Kafka-ML's style (the fog fixture at other widths), with their params."""
    base = snippet("fog")
    return [(base.replace("Dense(64,", f"Dense({8 + 4 * i},"), 64 * (8 + 4 * i) + (8 + 4 * i) + (8 + 4 * i) * 10 + 10)
            for i in range(count)]


def wait_until_dead(pid: int, timeout_s: float = 10.0) -> None:
    """Block until `pid` is a zombie or gone (the kernel's part of a kill; asyncio reaps it later)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            stat = Path(f"/proc/{pid}/stat").read_bytes()
        except FileNotFoundError:
            return
        if stat[stat.rfind(b")") + 2:][:1] in (b"Z", b"X"):
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"process {pid} still alive after {timeout_s} s")
        time.sleep(0.01)


@pytest.fixture(scope="module")
async def pool() -> AsyncIterator[SandboxPool]:
    async with SandboxPool(SandboxSettings(pool_size=2, timeout_s=60.0, memory_mb=1024)) as warm_pool:
        yield warm_pool


# -- fast: the parent side alone -------------------------------------------------------------------------


def test_a_summary_round_trips_through_a_dict() -> None:
    summary = EXPECTED["edge"]

    assert ModelSummary.from_dict(orjson.loads(orjson.dumps(summary.to_dict()))) == summary


@pytest.mark.parametrize("data", [[], {"input_shape": [None, "x"], "output_shapes": [[None]], "params": 1},
                                  {"input_shape": [None, 4], "output_shapes": [], "params": 1},
                                  {"input_shape": [None, 4], "output_shapes": [[None, 2]], "params": True}])
def test_a_malformed_summary_is_rejected(data: object) -> None:
    with pytest.raises(ValueError):
        ModelSummary.from_dict(data)


def test_exit_descriptions_say_what_to_do() -> None:
    assert "memory" in describe_exit(-signal.SIGKILL, 1024)
    assert "memory" in describe_exit(-signal.SIGABRT, 1024)
    assert "os._exit" in describe_exit(3, 1024)
    assert "while starting" in describe_exit(1, 1024, starting=True)


def test_the_parent_side_does_not_import_tensorflow() -> None:
    probe = (
        "import sys, tierflow.tiers.sandbox\n"
        "heavy = [m for m in ('tensorflow', 'tf_keras', 'keras') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )

    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)

    assert out.stdout.strip() == ""


async def test_a_pool_that_cannot_start_sandboxes_fails_instead_of_hanging() -> None:
    async with SandboxPool(SandboxSettings(pool_size=1), python="/nonexistent/python") as broken:
        with pytest.raises(SandboxError, match="failing to start"):
            await broken.validate(snippet("fog"))


# -- slow: real sandboxes --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
async def test_the_kafka_ml_snippets_validate_unchanged(pool: SandboxPool, name: str) -> None:
    assert await pool.validate(snippet(name)) == EXPECTED[name]


@pytest.mark.slow
async def test_a_keras_json_config_validates(pool: SandboxPool) -> None:
    summary = await pool.validate(SEQUENTIAL_CONFIG)

    assert summary == ModelSummary([None, 64], [[None, 10]], 64 * 32 + 32 + 32 * 10 + 10)


@pytest.mark.slow
async def test_the_config_a_snippet_saves_validates_like_the_snippet(pool: SandboxPool) -> None:
    # Check a `model.to_json()` of a snippet using tf.nn activations builds back to the same model.
    dump = (
        "import sys\n"
        "from tierflow.tiers.keras_code import build_model\n"
        "print(build_model(sys.stdin.read()).to_json())\n"
    )
    out = await asyncio.create_subprocess_exec(
        sys.executable, "-c", dump,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    config, _ = await out.communicate(snippet("edge").encode())
    assert out.returncode == 0

    assert await pool.validate(config.decode()) == EXPECTED["edge"]


@pytest.mark.slow
async def test_imports_are_available_to_the_code(pool: SandboxPool) -> None:
    code = "width = int(np.prod([8, 8]))\nmodel = keras.Sequential([keras.Input(shape=width), keras.layers.Dense(2)])\n"

    summary = await pool.validate(code, imports="import numpy as np")

    assert summary == ModelSummary([None, 64], [[None, 2]], 130)


@pytest.mark.slow
async def test_printing_does_not_disturb_the_protocol(pool: SandboxPool) -> None:
    code = 'print(\'{"ok": false, "error": "forged"}\')\n' + snippet("cloud")

    assert await pool.validate(code) == EXPECTED["cloud"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("inputs = keras.Input(shape=64)\nx = keras.layers.Dense(10(inputs)\n", r"^line 2 .*SyntaxError"),
        ("inputs = keras.Input(shape=64)\noutputs = keras.layers.Dense(10)(inputs)\n", "defines no Keras model"),
        ("inputs = keras.Input(shape=64)\n\nx = keras.layers.Dense(10, activation=tf.nn.nope)(inputs)\n",
         r"^line 3 .*AttributeError"),
        ("a = keras.Input(shape=4)\nb = keras.Input(shape=8)\n"
         "model = keras.Model([a, b], keras.layers.Dense(2)(keras.layers.Concatenate()([a, b])))\n",
         "2 inputs"),
        ("model = keras.Sequential([keras.layers.Dense(10)])\n", "no defined input shape"),
        ('{"class_name": "NoSuchLayer", "config": {}}', "not a valid Keras model config: class_name 'NoSuch"),
        ('{"class_name": "Dense", "config": {"units": 3}}', "gives a Dense, not a model"),
        ('{"class_name": "Sequential", "config": {"layers": 3}}', "not a valid Keras model config: ValueError"),
    ],
    ids=["syntax-error", "no-model", "runtime-error", "two-inputs", "unbuilt", "unknown-class", "layer-json",
         "broken-json"],
)
async def test_invalid_code_is_reported_with_what_and_where(pool: SandboxPool, code: str, expected: str) -> None:
    with pytest.raises(CodeInvalid, match=expected):
        await pool.validate(code)


@pytest.mark.slow
async def test_a_memory_bomb_is_stopped_and_named(pool: SandboxPool) -> None:
    with pytest.raises((CodeInvalid, SandboxError)) as caught:
        await pool.validate("x = bytearray(10**11)\n" + snippet("fog"))

    assert "memory" in str(caught.value).lower()


@pytest.mark.slow
async def test_the_network_is_cut(pool: SandboxPool) -> None:
    await pool.validate(snippet("fog"))
    assert pool.isolation["network"].startswith("none")
    code = "import socket\nsocket.create_connection(('192.0.2.1', 9), timeout=2)\n"

    with pytest.raises(CodeInvalid, match="Network is unreachable"):
        await pool.validate(code)


@pytest.mark.slow
async def test_the_pool_refills_and_serves_concurrent_validations(pool: SandboxPool) -> None:
    await pool.wait_warm()
    used = runner_pids(pool)
    names = ["edge", "fog", "cloud", "single", "fog"]

    summaries = await asyncio.gather(*(pool.validate(snippet(name)) for name in names))

    assert summaries == [EXPECTED[name] for name in names]
    await pool.wait_warm()
    assert pool.ready_count == 2
    # Used runners were replaced, not kept: two fresh ones are there, none of those that served.
    fresh = runner_pids(pool)
    assert len(fresh) == 2
    assert not set(fresh) & set(used)


@pytest.mark.slow
async def test_a_burst_of_distinct_models_is_served_by_forks_of_one_zygote(pool: SandboxPool) -> None:
    await pool.wait_warm()
    before = pool.pids[:3]  # bwrap, its init and the zygote: started once

    for code, params in distinct_models(10):
        assert (await pool.validate(code)).params == params

    await pool.wait_warm()
    assert pool.pids[:3] == before
    # Issue 12's budget for the pool's idle memory (shared pages counted once, split among their users).
    assert pool.memory_bytes() <= 2 * 1024**3


@pytest.mark.slow
async def test_a_sandbox_killed_while_idle_is_replaced(pool: SandboxPool) -> None:
    await pool.wait_warm()
    victim = runner_pids(pool)[0]

    os.kill(victim, signal.SIGKILL)
    wait_until_dead(victim)

    # Check the dead one is skipped (not blamed on the code) and replaced.
    assert await pool.validate(snippet("fog")) == EXPECTED["fog"]
    await pool.wait_warm()
    assert victim not in runner_pids(pool)
    assert len(runner_pids(pool)) == 2


@pytest.mark.slow
async def test_without_isolation_the_pool_still_works_and_says_so() -> None:
    async with SandboxPool(SandboxSettings(pool_size=1, isolation="none")) as bare:
        assert await bare.validate(snippet("fog")) == EXPECTED["fog"]

        assert bare.isolation["level"] == "none"
        assert "without isolation" in bare.isolation["warning"]


@pytest.mark.slow
async def test_an_endless_loop_times_out() -> None:
    async with SandboxPool(SandboxSettings(pool_size=1, timeout_s=2.0)) as short:
        await short.wait_warm()
        with pytest.raises(SandboxError, match="took longer than 2 s"):
            await short.validate("while True:\n    pass\n")


@pytest.mark.slow
async def test_close_leaves_no_sandbox_behind() -> None:
    own = SandboxPool(SandboxSettings(pool_size=2, timeout_s=30.0))
    await own.wait_warm()
    busy = asyncio.create_task(own.validate("while True:\n    pass\n"))
    await wait_until(lambda: own.ready_count < 2, what="a validation to take a sandbox")
    pids = own.pids
    assert len(runner_pids(own)) >= 1

    await own.close()

    with pytest.raises(SandboxError, match="closed"):
        await busy
    for pid in pids:
        wait_until_dead(pid, timeout_s=0.0)
    assert own.pids == []
    with pytest.raises(SandboxError, match="closed"):
        await own.validate(snippet("fog"))
