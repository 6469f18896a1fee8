"""The embedded stack's token and secret: kept where only their owner reads them, found by clients unasked.

Attack: another local user (or a process of another user) reads the stack's state and takes the admin token or
the secret every workload token is signed with. Defences (streams/stack_state.py): `stack.json`, which now
holds the admin token, is written mode 0600 from its first byte; the secret lives in `<home>/secrets/` (0700)
in a 0600 file and survives `down`/`up`, so tokens minted for hand-started tiers stay valid. Clients take the
token from `--token`, then TIERFLOW_API_TOKEN, then the running stack's state, so a newcomer types nothing;
`tierflow status --json` prints `api_url` and `token` for scripts.
"""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tierflow.deploy.client import client_for
from tierflow.deploy.stack import status
from tierflow.streams.settings import Settings
from tierflow.streams.stack_state import (
    StackState,
    load_or_create_secret_key,
    read_stack_state,
    resolve_api_token,
    stack_file,
    write_stack_state,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def running_stack(home: Path, token: str = "stack-admin-token") -> StackState:
    state = StackState(pid=os.getpid(), api_url="http://127.0.0.1:18080", bootstrap_servers="127.0.0.1:9092",
                       database_url="postgresql://tierflow:pw@127.0.0.1:5432/tierflow", home=home,
                       started_at=datetime.now(UTC), token=token)
    write_stack_state(home, state)
    return state


def test_the_state_file_is_private_from_its_first_byte(tmp_path: Path) -> None:
    os.umask(0o022)  # a usual umask: a plainly created file would be world-readable
    running_stack(tmp_path)
    assert mode(stack_file(tmp_path)) == 0o600
    assert read_stack_state(tmp_path) is not None
    assert read_stack_state(tmp_path).token == "stack-admin-token"  # type: ignore[union-attr]
    # Rewritten (a child restarted), it stays private.
    stack_file(tmp_path).chmod(0o644)
    running_stack(tmp_path)
    assert mode(stack_file(tmp_path)) == 0o600


def test_the_secret_is_private_and_survives_restarts(tmp_path: Path) -> None:
    os.umask(0o022)
    first = load_or_create_secret_key(tmp_path)
    assert len(first) >= 64
    assert load_or_create_secret_key(tmp_path) == first
    [key_file] = (tmp_path / "secrets").iterdir()
    assert mode(tmp_path / "secrets") == 0o700 and mode(key_file) == 0o600
    other = tmp_path / "other"
    assert load_or_create_secret_key(other) != first


def test_clients_take_the_flag_then_the_environment_then_the_running_stack(tmp_path: Path) -> None:
    running_stack(tmp_path)
    from_stack = Settings.from_env({"TIERFLOW_HOME": str(tmp_path)})
    assert resolve_api_token(from_stack) == "stack-admin-token"
    assert client_for(from_stack).token == "stack-admin-token"
    assert client_for(from_stack).base_url == "http://127.0.0.1:18080"
    from_env = Settings.from_env({"TIERFLOW_HOME": str(tmp_path), "TIERFLOW_API_TOKEN": "env-token"})
    assert resolve_api_token(from_env) == "env-token"
    assert client_for(from_env, token="flag-token").token == "flag-token"
    # A stack that no longer runs lends nothing.
    (tmp_path / "dead").mkdir()
    dead = running_stack(tmp_path / "dead")
    write_stack_state(tmp_path / "dead", StackState(**{**dead.__dict__, "pid": 2**22 + 1}))
    assert resolve_api_token(Settings.from_env({"TIERFLOW_HOME": str(tmp_path / "dead")})) == ""


def test_status_json_prints_the_url_and_the_token_for_scripts(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    running_stack(tmp_path)
    assert status(Settings.from_env({"TIERFLOW_HOME": str(tmp_path)}), as_json=True) == 0
    body = json.loads(capsys.readouterr().out)
    assert (body["api_url"], body["token"]) == ("http://127.0.0.1:18080", "stack-admin-token")
