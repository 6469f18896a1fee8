"""Nothing is lost across `tierflow down` / `tierflow up`: write, down, up, write again, read both.

The embedded broker keeps its log in memory; the accepted events come back from the Postgres archive before
any agent starts, and ids, command ids and positions of the new commands log never clash with the old.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures import model_code
from tests.integration.test_stack import _missing_modules, _stack_log, nothing_left, stack_home, tierflow
from tierflow.deploy.client import ApiClient
from tierflow.streams.stack_state import pid_alive, read_stack_state

__all__ = ["stack_home"]

pytestmark = pytest.mark.slow


def test_write_down_up_write_again_read_both(stack_home: Path) -> None:
    missing = _missing_modules()
    if missing:
        pytest.skip(f"the stack's modules do not exist yet: {', '.join(missing)}")
    up = tierflow(stack_home, "up", "--detach")
    assert up.returncode == 0, up.stdout + up.stderr + _stack_log(stack_home)
    state = read_stack_state(stack_home)
    assert state is not None
    api = ApiClient(state.api_url, state.token)  # what the CLI takes from the running stack
    status, model = api.post("/models", {"name": "single", "code": model_code("single")})
    assert status == 201, model
    status, first = api.post("/configurations", {"name": "before", "model_ids": [model["id"]]})
    assert status == 201 and first["id"] == 1

    down = tierflow(stack_home, "down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert nothing_left(set(state.children.values())) and not pid_alive(state.pid)

    up = tierflow(stack_home, "up", "--detach")
    assert up.returncode == 0, up.stdout + up.stderr + _stack_log(stack_home)
    assert "restored 2 events" in _stack_log(stack_home)
    state = read_stack_state(stack_home)
    assert state is not None
    api = ApiClient(state.api_url, state.token)  # what the CLI takes from the running stack
    # What was written before is there; new writes get new ids and are decided (not mistaken for old ones).
    status, second = api.post("/configurations", {"name": "after", "model_ids": [model["id"]]})
    assert status == 201 and second["id"] == 2
    status, dep = api.post("/deployments", {"configuration_id": 1, "batch": 8})
    assert status == 201 and dep["id"] == 1
    status, confs = api.get("/configurations")
    assert [c["name"] for c in confs["items"]] == ["before", "after"]
    status, models = api.get("/models")
    assert [m["name"] for m in models["items"]] == ["single"]
    down = tierflow(stack_home, "down")
    assert down.returncode == 0
    assert nothing_left(set(state.children.values()))
