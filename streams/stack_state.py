"""What `<home>/stack.json` says about a running embedded stack: its format, and the look-ups built on it.

Core knowledge, so that every layer can find the stack without importing the code that runs it: the worker,
the API and `tierflow projections rebuild` fill in the broker and Postgres they were not given
(`with_stack_endpoints`); `tierflow send` and `tierflow tier run` find the broker (`resolve_bootstrap`); the
CLI's API client finds the API URL and its admin token (`resolve_api_token`). The file is mode 0600 (it holds
the token); the stack's secret lives apart, in `<home>/secrets/` (`load_or_create_secret_key`), because it
outlives one `tierflow up`. `tierflow up` (deploy/stack_runtime.py) writes the file while it
supervises the stack, and `tierflow status` / `down` (deploy/stack.py) read it. Starting and stopping the
stack stays in `deploy/`.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tierflow.streams.errors import PermanentError
from tierflow.streams.settings import Settings

log = logging.getLogger("tierflow.stack")


class StackStateError(PermanentError):
    """stack.json exists but cannot be read as a stack state; the message names the problem."""


class StackNotRunning(PermanentError, RuntimeError):
    """No embedded stack runs for a home that a command needs it for; the message says how to start one.

    Also a RuntimeError: the send and tier CLIs turn that into their exit code."""


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:][:1] in ("Z", "X")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists and has not exited (an exited child nobody reaped yet is a zombie).

    It never reaps: reaping a child that a `Popen` owns would hide its exit code from it.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


@dataclass(frozen=True)
class StackState:
    """What `<home>/stack.json` says about a running stack."""

    pid: int  # the supervisor (`tierflow up`)
    api_url: str
    bootstrap_servers: str
    database_url: str
    home: Path
    started_at: datetime
    children: dict[str, int] = field(default_factory=dict)  # name -> pid of its latest process
    token: str = ""  # the API's admin token (this file is mode 0600)

    def alive(self) -> bool:
        """Whether the supervisor process still runs."""
        return pid_alive(self.pid)

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "api_url": self.api_url,
            "bootstrap_servers": self.bootstrap_servers,
            "database_url": self.database_url,
            "home": str(self.home),
            "started_at": self.started_at.isoformat(),
            "children": dict(self.children),
            **({"token": self.token} if self.token else {}),  # older stacks wrote none
        }


def _field(data: Mapping[str, Any], name: str, kind: type) -> Any:
    if name not in data:
        raise StackStateError(f"stack.json lacks {name!r}")
    value = data[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise StackStateError(f"stack.json field {name!r} is {value!r}, not a {kind.__name__}")
    return value


def parse_stack_state(text: str) -> StackState:
    """Parse the content of stack.json (pure; raises StackStateError)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StackStateError(f"stack.json is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise StackStateError("stack.json is not a JSON object")
    children = _field(data, "children", dict)
    for name, pid in children.items():
        if not isinstance(pid, int) or isinstance(pid, bool):
            raise StackStateError(f"stack.json child {name!r} has pid {pid!r}, not an integer")
    started = _field(data, "started_at", str)
    try:
        started_at = datetime.fromisoformat(started)
    except ValueError:
        raise StackStateError(f"stack.json field 'started_at' is {started!r}, not an ISO 8601 time") from None
    token = data.get("token", "")  # absent in the files of older stacks
    if not isinstance(token, str):
        raise StackStateError(f"stack.json field 'token' is {token!r}, not a string")
    return StackState(
        token=token,
        pid=_field(data, "pid", int),
        api_url=_field(data, "api_url", str),
        bootstrap_servers=_field(data, "bootstrap_servers", str),
        database_url=_field(data, "database_url", str),
        home=Path(_field(data, "home", str)),
        started_at=started_at,
        children=dict(children),
    )


def stack_file(home: Path) -> Path:
    return home / "stack.json"


def read_stack_state(home: Path) -> StackState | None:
    """The state of the stack of `home`, or None when it has no (readable) stack.json.

    Does not check that the stack still runs: call `alive()`.
    """
    path = stack_file(home)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except PermissionError:
        # Mode 0600: another user's stack. Its token is not ours to take; --token or TIERFLOW_API_TOKEN is.
        log.warning("cannot read %s (only the user who ran `tierflow up` may): pass --token or set "
                    "TIERFLOW_API_TOKEN and TIERFLOW_API_URL", path)
        return None
    try:
        return parse_stack_state(text)
    except StackStateError as exc:
        log.warning("ignoring %s: %s", path, exc)
        return None


def _write_private(path: Path, text: str) -> None:
    """Replace `path` atomically with a file only its owner can read, from its first byte on."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a leftover tmp file of another mode keeps its mode through O_CREAT
        with os.fdopen(fd, "w") as f:
            f.write(text)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


def write_stack_state(home: Path, state: StackState) -> None:
    """Replace stack.json atomically (a reader never sees half a file), mode 0600: it holds the admin token and
    the database URL with its password."""
    _write_private(stack_file(home), json.dumps(state.to_json(), indent=2) + "\n")


def secrets_dir(home: Path) -> Path:
    """Where the stack keeps what outlives one `tierflow up` and only its owner may read (mode 0700)."""
    return home / "secrets"


def load_or_create_secret_key(home: Path) -> str:
    """The stack's secret (TIERFLOW_SECRET_KEY): read from `<home>/secrets/secret_key` (0600 in a 0700 folder),
    created there on first use. It outlives `down`/`up`, so tokens minted for tiers started by hand stay valid;
    deleting the file (or setting another secret) revokes every workload token."""
    folder = secrets_dir(home)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    folder.chmod(0o700)
    path = folder / "secret_key"
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        text = ""
    if len(text) < 32:
        text = secrets.token_hex(32)
        _write_private(path, text + "\n")
    path.chmod(0o600)
    return text


def resolve_api_token(settings: Settings, flag: str = "") -> str:
    """The token a client sends: `flag` (--token), else TIERFLOW_API_TOKEN, else the running embedded stack's
    (its stack.json is readable by its owner only), else "" (the API will answer 401, saying where to look)."""
    if flag:
        return flag
    if settings.api.token:
        return settings.api.token
    state = read_stack_state(settings.stack.home.expanduser())
    if state is not None and state.alive():
        return state.token
    return ""


def resolve_home(settings: Settings) -> Path:
    return settings.stack.home.expanduser().resolve()


def with_stack_endpoints(settings: Settings) -> Settings | None:
    """`settings` with the running embedded stack's broker and Postgres filled in where the environment gave
    none; None when something is missing and no stack runs (the caller says so and exits 2)."""
    if settings.kafka.bootstrap_servers and settings.database.url:
        return settings
    state = read_stack_state(settings.stack.home)
    if state is None:
        return None
    return settings.with_endpoints(bootstrap_servers=settings.kafka.bootstrap_servers or state.bootstrap_servers,
                                   database_url=settings.database.url or state.database_url)


def resolve_bootstrap(settings: Settings) -> str:
    """KAFKA_BOOTSTRAP_SERVERS, else the running embedded stack's broker; StackNotRunning otherwise."""
    if settings.kafka.bootstrap_servers:
        return settings.kafka.bootstrap_servers
    home = resolve_home(settings)
    state = read_stack_state(home)
    if state is None or not state.alive():
        raise StackNotRunning(f"no broker: the embedded stack of {home} is not running; start it with "
                              "`tierflow up`, or set KAFKA_BOOTSTRAP_SERVERS")
    return state.bootstrap_servers
