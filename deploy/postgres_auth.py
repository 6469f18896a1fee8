"""Who may connect to the embedded Postgres: passwords, the stack's non-superuser role, and the upgrade of a
data directory made before passwords (trust authentication).

Called by the stack's supervisor (deploy/stack_runtime.py): `PostgresCredentials.load_or_create` before initdb
(`services.init_postgres` takes the superuser's password), `secure_postgres` each time the server has started.
The worker and the API connect as `tierflow` (services.PG_USER), which owns the tierflow database and
everything in it and is not a superuser; the superuser `postgres` is used here only. Every connection, over
TCP or the Unix socket, needs its role's password (scram-sha-256), so another local process cannot read or
rewrite the projections and the event archive, nor use a superuser's powers (`COPY ... TO PROGRAM`).

A data directory from before (trust; `tierflow` the bootstrap superuser) is upgraded in place: the bootstrap
superuser is renamed `postgres` and given its password, a new `tierflow` role takes over the database and its
objects, and pg_hba.conf is switched to scram-sha-256. Every step can be redone, so an upgrade interrupted
half-way finishes on the next start.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from tierflow.deploy.services import PG_DATABASE, PG_SUPERUSER, PG_USER, ServiceError

log = logging.getLogger("tierflow.stack")

#: A superuser that exists only while an old data directory is upgraded (the bootstrap superuser cannot rename
#: itself from its own session).
UPGRADE_ROLE = "tierflow_upgrade"
_PASSWORD = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class PostgresCredentials:
    """The passwords of the embedded server, made once per stack home and kept in a file only its user reads."""

    superuser_password: str
    password: str  # services.PG_USER's

    @classmethod
    def load_or_create(cls, path: Path) -> PostgresCredentials:
        if path.exists():
            data = json.loads(path.read_text())
            creds = cls(str(data["superuser_password"]), str(data["password"]))
            if not (_PASSWORD.fullmatch(creds.superuser_password) and _PASSWORD.fullmatch(creds.password)):
                raise ServiceError(f"{path} does not hold two 64-hex-digit passwords; restore it from a backup "
                                   "(the embedded Postgres only takes those passwords)")
            return creds
        creds = cls(secrets.token_hex(32), secrets.token_hex(32))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump({"superuser": PG_SUPERUSER, "superuser_password": creds.superuser_password, "user": PG_USER,
                       "password": creds.password}, out, indent=2)
            out.write("\n")
        return creds


def credentials_file(home: Path) -> Path:
    return home / "postgres-credentials.json"


def trusts(data_dir: Path) -> bool:
    """Whether pg_hba.conf lets anyone in without a password (a data directory from before passwords)."""
    return any(_method(line) == "trust" for line in (data_dir / "pg_hba.conf").read_text().splitlines())


def _rule(line: str) -> tuple[list[str], int] | None:
    """The fields of a pg_hba.conf rule and the index of its method (`local` rules have no address)."""
    fields = line.split("#", 1)[0].split()
    if not fields:
        return None
    index = 3 if fields[0] == "local" else 4
    return (fields, index) if len(fields) > index else None


def _method(line: str) -> str | None:
    rule = _rule(line)
    return None if rule is None else rule[0][rule[1]]


def _require_passwords_in(data_dir: Path) -> None:
    """Rewrite pg_hba.conf so that every rule that trusted asks for a password (scram-sha-256)."""
    path = data_dir / "pg_hba.conf"
    lines = []
    for line in path.read_text().splitlines():
        rule = _rule(line)
        if rule is not None and rule[0][rule[1]] == "trust":
            fields, index = rule
            fields[index] = "scram-sha-256"
            line = "\t".join(fields)
        lines.append(line)
    path.write_text("\n".join(lines) + "\n")  # in place: the file keeps its owner and mode


async def _connect(port: int, user: str, password: str | None, database: str = "postgres", *,
                   deadline_s: float = 20.0) -> asyncpg.Connection:
    """Connect, waiting while the server says it is starting up."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while True:
        try:
            return await asyncpg.connect(host="127.0.0.1", port=port, user=user, password=password, database=database)
        except (asyncpg.CannotConnectNowError, ConnectionError) as exc:
            if loop.time() > deadline:
                raise ServiceError(f"Postgres on port {port} did not accept connections: {exc}") from exc
            await asyncio.sleep(0.05)  # polling interval of a condition with a deadline


async def _role_exists(conn: asyncpg.Connection, name: str) -> bool:
    return bool(await conn.fetchval("SELECT count(*) FROM pg_roles WHERE rolname = $1", name))


async def _upgrade_from_trust(data_dir: Path, port: int, creds: PostgresCredentials) -> None:
    """A data directory from before passwords: name its superuser `postgres` with a password, then ask every
    connection for a password."""
    log.warning("the Postgres data in %s lets any local process in as a superuser (trust): switching it to "
                "passwords and a non-superuser role for the stack", data_dir)
    # Under trust, any superuser will do: the old bootstrap one (`tierflow`), or what an interrupted upgrade left.
    conn: asyncpg.Connection | None = None
    for user in (PG_SUPERUSER, UPGRADE_ROLE, PG_USER):
        try:
            candidate = await _connect(port, user, None)
        except asyncpg.InvalidAuthorizationSpecificationError:
            continue  # no such role (any more)
        if await candidate.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
            conn = candidate
            break
        await candidate.close()
    if conn is None:
        raise ServiceError(f"cannot upgrade the Postgres data in {data_dir}: it trusts local connections but has no "
                           f"superuser named {PG_SUPERUSER}, {UPGRADE_ROLE} or {PG_USER}")
    try:
        if not await _role_exists(conn, PG_SUPERUSER):
            # The bootstrap superuser is named like the stack's role: rename it (from another superuser's session).
            if not await _role_exists(conn, UPGRADE_ROLE):
                await conn.execute(f'CREATE ROLE "{UPGRADE_ROLE}" SUPERUSER LOGIN')
            await conn.close()
            conn = await _connect(port, UPGRADE_ROLE, None)
            await conn.execute(f'ALTER ROLE "{PG_USER}" RENAME TO "{PG_SUPERUSER}"')
        await conn.execute(f"ALTER ROLE \"{PG_SUPERUSER}\" WITH LOGIN PASSWORD '{creds.superuser_password}'")
        _require_passwords_in(data_dir)
        await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()


async def secure_postgres(data_dir: Path, port: int, creds: PostgresCredentials) -> None:
    """Make sure the running server asks for passwords and that `tierflow`, not a superuser, owns the tierflow
    database and everything in it (every start: cheap, and it finishes an interrupted upgrade)."""
    for secret in (creds.superuser_password, creds.password):
        if not _PASSWORD.fullmatch(secret):  # they are spelled into SQL below
            raise ServiceError("the embedded Postgres passwords must be 64 hex digits")
    if trusts(data_dir):
        await _upgrade_from_trust(data_dir, port, creds)
    conn = await _connect(port, PG_SUPERUSER, creds.superuser_password)
    try:
        if await _role_exists(conn, UPGRADE_ROLE):
            await conn.execute(f'DROP ROLE "{UPGRADE_ROLE}"')
        if not await _role_exists(conn, PG_USER):
            await conn.execute(f'CREATE ROLE "{PG_USER}"')
        await conn.execute(f"ALTER ROLE \"{PG_USER}\" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION "
                           f"NOBYPASSRLS PASSWORD '{creds.password}'")
        if not await conn.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", PG_DATABASE):
            await conn.execute(f'CREATE DATABASE "{PG_DATABASE}" OWNER "{PG_USER}"')
        await conn.execute(f'ALTER DATABASE "{PG_DATABASE}" OWNER TO "{PG_USER}"')
    finally:
        await conn.close()
    conn = await _connect(port, PG_SUPERUSER, creds.superuser_password, PG_DATABASE)
    try:
        await _hand_over(conn)
    finally:
        await conn.close()


async def _hand_over(conn: asyncpg.Connection) -> None:
    """Give `tierflow` every schema and relation of the database that another role owns (an upgraded data
    directory's tables belong to the old superuser). Tables first: indexes and the sequences of their columns
    follow them (such a sequence cannot be given away on its own); then what is left."""
    schemas = await conn.fetch(
        "SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema' "
        "AND nspowner <> $1::regrole AND nspowner <> 'pg_database_owner'::regrole", PG_USER)
    for row in schemas:
        await conn.execute(f'ALTER SCHEMA "{row["nspname"]}" OWNER TO "{PG_USER}"')
    for kinds, statement in [(["r", "p", "f"], "TABLE"), (["v"], "VIEW"), (["m"], "MATERIALIZED VIEW"),
                             (["S"], "SEQUENCE")]:
        relations = await conn.fetch(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema' "
            "AND c.relowner <> $1::regrole AND c.relkind::text = ANY($2::text[])", PG_USER, kinds)
        for row in relations:
            await conn.execute(f'ALTER {statement} "{row["nspname"]}"."{row["relname"]}" OWNER TO "{PG_USER}"')
