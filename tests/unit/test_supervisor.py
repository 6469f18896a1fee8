"""Unit tests of the embedded stack's pure parts: the restart policy and stack.json (no processes, no files)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tierflow.deploy.stack import format_table
from tierflow.deploy.stack_processes import redact
from tierflow.deploy.supervisor import RestartPlan, RestartPolicy, describe_exit, plan_restart
from tierflow.streams.stack_state import StackState, StackStateError, parse_stack_state

POLICY = RestartPolicy(initial_s=0.5, max_s=30.0, reset_after_s=60.0)


def crash_loop(policy: RestartPolicy, uptimes: list[float]) -> list[tuple[int, float]]:
    """Feed a sequence of crashes (each after `uptime` seconds) through the policy."""
    attempt = 0
    plans: list[tuple[int, float]] = []
    for uptime in uptimes:
        plan = plan_restart(policy, previous_attempt=attempt, uptime_s=uptime)
        attempt = plan.attempt
        plans.append((plan.attempt, plan.delay_s))
    return plans


def test_backoff_starts_at_the_initial_delay_and_doubles() -> None:
    plans = crash_loop(POLICY, [0.1, 0.1, 0.1, 0.1])
    assert plans == [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0)]


def test_backoff_is_capped_at_max() -> None:
    plans = crash_loop(POLICY, [1.0] * 10)
    assert [delay for _, delay in plans][-4:] == [30.0, 30.0, 30.0, 30.0]
    assert max(delay for _, delay in plans) == 30.0


def test_a_child_that_stayed_up_long_enough_starts_over() -> None:
    # Three quick crashes, then a run of 60 s: the sequence resets to the first delay.
    plans = crash_loop(POLICY, [1.0, 1.0, 1.0, 60.0, 1.0])
    assert plans == [(1, 0.5), (2, 1.0), (3, 2.0), (1, 0.5), (2, 1.0)]


def test_a_run_just_shorter_than_the_reset_window_keeps_backing_off() -> None:
    assert plan_restart(POLICY, previous_attempt=3, uptime_s=59.9).attempt == 4


def test_a_very_long_crash_loop_does_not_overflow() -> None:
    assert plan_restart(POLICY, previous_attempt=5000, uptime_s=0.0) == RestartPlan(attempt=5001, delay_s=30.0)


def test_a_zero_initial_delay_restarts_at_once() -> None:
    assert crash_loop(RestartPolicy(initial_s=0.0), [0.0, 0.0]) == [(1, 0.0), (2, 0.0)]


def test_exit_descriptions_name_the_signal() -> None:
    assert describe_exit(1) == "exit code 1"
    assert describe_exit(-9) == "signal SIGKILL"
    assert describe_exit(-15) == "signal SIGTERM"


STACK_JSON = {
    "pid": 4242,
    "api_url": "http://127.0.0.1:8080",
    "bootstrap_servers": "127.0.0.1:39092",
    "database_url": "postgresql://tierflow@127.0.0.1:35432/tierflow",
    "home": "/tmp/tierflow-home",
    "started_at": "2025-01-02T03:04:05+00:00",
    "children": {"broker": 4243, "postgres": 4244, "worker": 4245, "api": 4246},
}


def test_stack_json_parses_into_a_state() -> None:
    state = parse_stack_state(json.dumps(STACK_JSON))
    assert state == StackState(
        pid=4242,
        api_url="http://127.0.0.1:8080",
        bootstrap_servers="127.0.0.1:39092",
        database_url="postgresql://tierflow@127.0.0.1:35432/tierflow",
        home=Path("/tmp/tierflow-home"),
        started_at=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
        children={"broker": 4243, "postgres": 4244, "worker": 4245, "api": 4246},
    )


def test_stack_json_round_trips() -> None:
    state = parse_stack_state(json.dumps(STACK_JSON))
    assert state.to_json() == STACK_JSON
    assert parse_stack_state(json.dumps(state.to_json())) == state


def test_an_external_broker_and_database_leave_no_child() -> None:
    state = parse_stack_state(json.dumps({**STACK_JSON, "children": {"worker": 1, "api": 2}}))
    assert set(state.children) == {"worker", "api"}


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        (json.dumps({k: v for k, v in STACK_JSON.items() if k != "api_url"}), "lacks 'api_url'"),
        (json.dumps({**STACK_JSON, "pid": "4242"}), "'pid'"),
        (json.dumps({**STACK_JSON, "pid": True}), "'pid'"),
        (json.dumps({**STACK_JSON, "children": {"api": "x"}}), "child 'api'"),
        (json.dumps({**STACK_JSON, "children": []}), "'children'"),
        (json.dumps({**STACK_JSON, "started_at": "yesterday"}), "ISO 8601"),
    ],
)
def test_a_broken_stack_json_is_reported_with_its_problem(content: str, problem: str) -> None:
    with pytest.raises(StackStateError, match=problem):
        parse_stack_state(content)


def test_passwords_are_redacted_for_printing() -> None:
    assert redact("postgresql://u:s3cret@db:5432/x") == "postgresql://u:***@db:5432/x"
    assert redact("postgresql://tierflow@127.0.0.1:5432/tierflow") == "postgresql://tierflow@127.0.0.1:5432/tierflow"


def test_status_table_lines_up_its_columns() -> None:
    table = format_table([
        {"component": "supervisor", "pid": 1, "state": "running", "address": "/home"},
        {"component": "broker", "pid": None, "state": "external", "address": "kafka:9092"},
        {"component": "worker", "pid": 12345, "state": "down", "address": ""},
    ])
    lines = table.splitlines()
    assert lines[0].split() == ["COMPONENT", "PID", "STATE", "ADDRESS"]
    assert lines[2].split() == ["broker", "-", "external", "kafka:9092"]
    assert lines[3].split() == ["worker", "12345", "down", "-"]
    assert len({line.index(line.split()[2]) for line in lines}) == 1  # the STATE column is aligned
