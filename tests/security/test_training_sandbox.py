"""Attacks by model code on the training job, one test per attack, run through the real job (`run_training`).

The job is driven as the launcher runs it: its environment holds the stack's secrets (an API token, a database
URL with a password), and its settings come from that environment. The deployment is one model whose code
tries what an attacker would (read the secrets, write into the installation, reach the network) and reports
what it managed through the only channel it has: the failure reason of its training, which the job reports
(`ReportTrainingFailure`). The job's ports are the in-memory fakes of tests/unit/test_training_plan.py.

Each attack runs at both isolation levels that run model code: `bwrap` (the default) and `landlock` (cluster
mode, where namespaces are refused). A trainer costs seconds of TensorFlow start-up on the 2-core CI machine,
so one training per level tries every attack (`ATTACKS`) and each test reads its part of the report.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.security.test_sandbox import (
    FIND_SECRETS,
    PASSWORD,
    PROBE_TAIL,
    READ_PATHS,
    SECRET_ENV,
    TCP_AND_DNS,
    TOKEN,
    WRITE_TARGETS,
    attack_targets,
    refused_outside_scratch,
    stack_state,
)
from tests.unit.test_training_plan import FakeApi, FakeLoader, FakeReporter, datasource, version
from tierflow.streams.errors import PermanentError
from tierflow.streams.settings import Settings
from tierflow.tiers.train_job import run_training
from tierflow.tiers.train_sandbox import read_output

pytestmark = pytest.mark.slow

LEVELS = ["bwrap", "landlock"]


def single_model_api(code: str) -> FakeApi:
    """Deployment 5 training one model (id 9, result 21) whose code is `code`."""
    api = FakeApi()
    api.deployments[5] = {"id": 5, "configuration_id": 1, "batch": 16, "fit_options": {"epochs": 1},
                          "eval_options": {}, "optimizer": "adam", "learning_rate": None,
                          "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"], "loss_weights": None,
                          "model_versions": {"9": 1}, "result_ids": [21]}
    api.results[21] = {"id": 21, "deployment_id": 5, "model_id": 9, "model_version": 1, "status": "deployed"}
    api.versions[(9, 1)] = version(9, "probe", None, code)
    api.datasource_items.append(datasource(5))
    return api


def attack_code() -> str:
    """Model code that tries every attack (the validation sandbox's probes, all at once), fills `report`, and
    fails with it."""
    return ("report = {}\n" + FIND_SECRETS + READ_PATHS + WRITE_TARGETS + TCP_AND_DNS + """
# Who it runs as.
import os
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
report["uid"] = os.getuid()
report["caps"] = int(status["CapEff"].strip(), 16)
report["no_new_privs"] = status["NoNewPrivs"].strip()
""" + PROBE_TAIL)


@dataclass
class Attempt:
    """What one training's model code managed, and what is there to see from outside."""

    level: str
    report: dict[str, Any]
    state_files: list[Path]
    targets: list[Path]
    written: list[Path]
    connected: bool


@pytest.fixture(scope="module", params=LEVELS)
async def attempt(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                  ) -> AsyncIterator[Attempt]:
    """One training at the level `request.param` whose model code tries every attack; its report.

    Its environment is the job's as the local launcher gives it (the stack's secrets in it), the stack's
    state is beside the code (stack.json, mode 0600), and a service-account token is where a pod has one
    (made here when the machine has none)."""
    level = request.param
    targets = attack_targets(tmp_path_factory.mktemp("host-tmp"))
    with stack_state() as state:
        try:
            with pytest.MonkeyPatch.context() as patch, socket.create_server(("127.0.0.1", 0)) as listener:
                for key, value in SECRET_ENV.items():
                    patch.setenv(key, value)
                listener.setblocking(False)
                settings = Settings.from_env({**os.environ, "TIERFLOW_SANDBOX_ISOLATION": level})
                head = "".join(f"{key} = {value!r}\n" for key, value in (
                    ("SECRETS", [TOKEN, PASSWORD]), ("KNOWN_PIDS", [os.getpid(), 1]),
                    ("PATHS", [str(path) for path in state]),
                    ("TARGETS", [str(t) for t in targets]), ("TCP_PORT", listener.getsockname()[1])))
                reporter = FakeReporter()
                rng = np.random.default_rng(0)
                loader = FakeLoader(rng.random((40, 28, 28), dtype=np.float32),
                                    rng.integers(0, 10, 40).astype(np.uint8))

                code = await run_training(settings, 5, [21], api=single_model_api(head + attack_code()),
                                          reporter=reporter, data_loader=loader, seed=1)

                try:
                    listener.accept()[0].close()
                    connected = True
                except BlockingIOError:
                    connected = False
            assert code == 2, reporter.sent
            [failure] = reporter.of_type("ReportTrainingFailure")
            found = re.search(r"PROBE(\{.*\})END", failure["reason"], re.S)
            assert found, f"the probe did not report: {failure['reason']}"
            yield Attempt(level, json.loads(found.group(1)), state, targets,
                          [t for t in targets if t.exists()], connected)
        finally:
            for target in targets:
                target.unlink(missing_ok=True)


def test_training_code_cannot_read_the_stack_secrets_in_its_environment_or_proc(attempt: Attempt) -> None:
    assert attempt.report["hits"] == [], attempt.report["hits"]
    assert "DATABASE_URL" not in attempt.report["environ"]
    assert "TIERFLOW_API_TOKEN" not in attempt.report["environ"]


def test_training_code_cannot_read_the_stack_state_nor_a_service_account_token(attempt: Attempt) -> None:
    for path in attempt.state_files:
        assert attempt.report["read"][str(path)] in ("FileNotFoundError", "PermissionError"), attempt.report["read"]


def test_training_code_cannot_write_outside_its_scratch(attempt: Attempt) -> None:
    assert refused_outside_scratch(attempt.report["wrote"]), attempt.report["wrote"]
    assert attempt.written == []
    assert attempt.report["scratch"] == "mine"


def test_the_trainer_has_no_network(attempt: Attempt) -> None:
    assert attempt.report["tcp"] != "connected", attempt.report
    assert attempt.report["dns"] != "resolved", attempt.report
    assert not attempt.connected


def test_training_code_runs_with_no_privilege(attempt: Attempt) -> None:
    assert attempt.report["caps"] == 0 and attempt.report["no_new_privs"] == "1", attempt.report
    if attempt.level == "bwrap":
        assert attempt.report["uid"] != 0


# -- what the trainer hands back -----------------------------------------------------------------------------


def _result(tmp: Path, **files: bytes) -> int:
    """An exchange directory holding a valid result for one exit whose Keras artefact is `model_0.keras`."""
    (tmp / "result.json").write_text(json.dumps({
        "metrics": [{"train": {"loss": 0.5}, "validation": {}, "test": {}}],
        "artefacts": [{"keras": "model_0.keras"}], "seconds_per_sample": [1e-5]}))
    for split in ("validation", "test"):
        np.save(tmp / f"probs_{split}_0.npy", np.full((2, 3), 1 / 3, dtype=np.float32))
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    return os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)


def test_the_driver_uploads_no_file_the_trainer_linked_to(tmp_path: Path) -> None:
    # A trainer that could write its exchange directory plants links to a file only the driver can read (the
    # stack's state); the driver would upload it as an artefact and report its hash.
    secret = tmp_path / "stack.json"
    secret.write_bytes(b"PK\x03\x04" + TOKEN.encode())
    for how in ("symlink", "hardlink"):
        exchange = tmp_path / how
        exchange.mkdir()
        directory = _result(exchange)
        try:
            if how == "symlink":
                (exchange / "model_0.keras").symlink_to(secret)
            else:
                os.link(secret, exchange / "model_0.keras")

            with pytest.raises(PermanentError, match=r"model_0\.keras"):
                read_output(directory, 1, {"validation": 2, "test": 2})
        finally:
            os.close(directory)


def test_the_driver_refuses_malformed_outputs(tmp_path: Path) -> None:
    directory = _result(tmp_path, **{"model_0.keras": b"PK\x03\x04 a keras zip"})
    try:
        output = read_output(directory, 1, {"validation": 2, "test": 2})
        assert output.artefacts[0]["keras"].data.startswith(b"PK")
        assert [p.shape for p in output.probs["test"]] == [(2, 3)]
        # An array that would need pickle to load, and probabilities for the wrong number of samples.
        np.save(tmp_path / "probs_test_0.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
        with pytest.raises(PermanentError, match=r"probs_test_0\.npy"):
            read_output(directory, 1, {"validation": 2, "test": 2})
        np.save(tmp_path / "probs_test_0.npy", np.zeros((5, 3), dtype=np.float32))
        with pytest.raises(PermanentError, match=r"probs_test_0\.npy"):
            read_output(directory, 1, {"validation": 2, "test": 2})
        (tmp_path / "model_0.keras").write_bytes(b"not a zip")
        with pytest.raises(PermanentError, match="not a keras file"):
            read_output(directory, 1, {"validation": 2, "test": 2})
    finally:
        os.close(directory)
