"""Attack: any local process connects to the embedded Postgres as a superuser, without a password.

`tierflow up` ran its private Postgres with `trust` authentication and the stack's own role as the bootstrap
superuser: any process of any user on the machine (model code in a sandbox that kept the network, a training
workload, another user's script) could connect to 127.0.0.1:<port> as `tierflow`, rewrite the projections and
the event archive (which `tierflow up` restores into the log), or, as a superuser, run `COPY ... TO PROGRAM`:
a shell as the Postgres server's user.

Defence (deploy/services.py): the embedded Postgres authenticates every connection with a password
(scram-sha-256), generated once per stack home (`postgres-credentials.json`, mode 0600, like `stack.json`
that holds the URL); the worker and the API connect as `tierflow`, a role that owns the tierflow database and
is not a superuser; the superuser `postgres` is used only to set that up. A data directory made before (trust,
`tierflow` its superuser) is upgraded in place on the next `tierflow up`, its data kept.
"""

from __future__ import annotations

import asyncio
import stat
import subprocess
from pathlib import Path

import asyncpg
import pytest

from tests.integration.test_stack import _missing_modules, _stack_log, stack_home, tierflow
from tierflow.deploy import services
from tierflow.deploy.client import ApiClient, ApiClientError
from tierflow.streams.stack_state import read_stack_state

__all__ = ["stack_home"]

pytestmark = pytest.mark.slow


def make_stack_data_the_old_way(data_dir: Path) -> None:
    """A data directory as `tierflow up` made it before: initdb with trust, `tierflow` the bootstrap superuser,
    the tierflow database with tables and rows that role owns."""
    argv = services._as_postgres_user([str(services.postgres_bindir() / "initdb"), "-D", str(data_dir), "-U",
                                       "tierflow", "--auth=trust", "--encoding=UTF8", "--no-sync"])
    data_dir.mkdir(parents=True, exist_ok=True)
    if services._is_root():
        import pwd

        pg = pwd.getpwnam("postgres")
        import os

        os.chown(data_dir, pg.pw_uid, pg.pw_gid)
    data_dir.chmod(0o700)
    subprocess.run(argv, check=True, capture_output=True)
    port = services.free_port()
    proc = services.spawn(services.postgres_spec(data_dir, port))
    try:
        services.wait_for_port(port, deadline_s=30, proc=proc, what="Postgres")

        async def fill() -> None:
            conn = await _connect(port, "tierflow", None, "postgres")
            await conn.execute('CREATE DATABASE "tierflow"')
            await conn.close()
            conn = await _connect(port, "tierflow", None, "tierflow")
            await conn.execute("CREATE TABLE public.kept (note text); INSERT INTO public.kept VALUES ('from before')")
            await conn.close()

        asyncio.run(fill())
    finally:
        services.stop(proc)


async def _connect(port: int, user: str, password: str | None, database: str,
                   host: str = "127.0.0.1") -> asyncpg.Connection:
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        try:
            return await asyncpg.connect(host=host, port=port, user=user, password=password, database=database)
        except asyncpg.CannotConnectNowError:  # "the database system is starting up"
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)


async def refused_without_password(port: int, user: str, host: str = "127.0.0.1") -> str:
    try:
        conn = await asyncpg.connect(host=host, port=port, user=user, database="postgres")
    except (asyncpg.InvalidAuthorizationSpecificationError, asyncpg.InvalidPasswordError) as exc:
        return str(exc)
    await conn.close()
    raise AssertionError(f"{user}@{host}:{port} connected without a password")


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "data-dir-from-before"])
def test_the_stacks_postgres_wants_a_password_and_the_stack_is_no_superuser(stack_home: Path,
                                                                           existing: bool) -> None:
    missing = _missing_modules()
    if missing:
        pytest.skip(f"the stack's modules do not exist yet: {', '.join(missing)}")
    data_dir = services.postgres_data_dir(stack_home)
    if existing:
        make_stack_data_the_old_way(data_dir)
    up = tierflow(stack_home, "up", "--detach")
    try:
        assert up.returncode == 0, up.stdout + up.stderr + _stack_log(stack_home)
        state = read_stack_state(stack_home)
        assert state is not None
        port = int(state.database_url.rsplit(":", 1)[1].split("/")[0])

        async def check() -> None:
            conn = await asyncpg.connect(state.database_url)
            try:
                role = await conn.fetchrow("SELECT rolname, rolsuper, rolcreaterole, rolcreatedb, rolbypassrls "
                                           "FROM pg_roles WHERE rolname = current_user")
                assert role is not None and role["rolname"] == "tierflow"
                assert not (role["rolsuper"] or role["rolcreaterole"] or role["rolcreatedb"] or role["rolbypassrls"])
                # It owns what the stack needs (the migrations ran as it, the agents work with it).
                assert await conn.fetchval("SELECT pg_get_userbyid(datdba) FROM pg_database "
                                           "WHERE datname = 'tierflow'") == "tierflow"
                owners = await conn.fetch("SELECT DISTINCT pg_get_userbyid(relowner) AS owner FROM pg_class c "
                                          "JOIN pg_namespace n ON n.oid = c.relnamespace "
                                          "WHERE n.nspname IN ('public', 'proj')")
                assert {r["owner"] for r in owners} == {"tierflow"}
                if existing:  # upgraded, not rebuilt: what was there is still there
                    assert await conn.fetchval("SELECT note FROM public.kept") == "from before"
                # Nobody connects without the password: not as the stack's role, not as a superuser, not over
                # TCP and not over the Unix socket in the data directory.
                for user in ("tierflow", "postgres"):
                    assert "password" in await refused_without_password(port, user)
                    assert "password" in await refused_without_password(port, user, host=str(data_dir))
            finally:
                await conn.close()

        asyncio.run(check())
        # The URL the stack hands its worker and API carries a password: stack.json is for its user alone, and
        # so are the generated credentials.
        for secret_file in ("stack.json", "postgres-credentials.json"):
            assert stat.S_IMODE((stack_home / secret_file).stat().st_mode) == 0o600, secret_file
        # The whole stack runs on that role: a write goes through the decider and the projector.
        with pytest.raises(ApiClientError) as refused:
            ApiClient(state.api_url, state.token).post("/configurations", {"name": "c", "model_ids": [1]})
        assert refused.value.status == 422 and "model 1 does not exist" in refused.value.message
    finally:
        tierflow(stack_home, "down")
