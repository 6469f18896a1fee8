"""The resource CLI (`tierflow models|configurations|deployments|results`) against the real API.

A real worker (decider, validator with real TensorFlow sandboxes, projector) runs on the session's Tansu
broker and Postgres; the API is the real aiohttp app on a local port, guarded by a bearer token. The CLI
is synchronous, so each `tierflow ...` runs `cli.main` in a thread, as a user's shell would run it.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import Infra, new_plane, start_plane, stop_plane
from tierflow.api.app import create_app
from tierflow.deploy.bootstrap import sandbox_validate
from tierflow.deploy.cli import main
from tierflow.deploy.client import DEFAULT_API_URL, resolve_api_url
from tierflow.streams.settings import Settings

TOKEN = "cli-test-token"


@dataclass(frozen=True)
class Apis:
    url: str  # answers a write when its outcome is known (the usual case)
    slow_url: str  # the same plane with a command timeout too short for any outcome: every write answers 202


@pytest.fixture(scope="module")
async def apis(infra: Infra, sandbox_pool: Any) -> AsyncIterator[Apis]:
    settings = await new_plane(infra, "cli")
    settings = replace(settings, api=replace(settings.api, token=TOKEN))
    impatient = replace(settings, api=replace(settings.api, command_timeout_s=0.001))
    running = await start_plane(settings, sandbox_validate(sandbox_pool))
    async with TestServer(create_app(settings)) as server, TestServer(create_app(impatient)) as slow:
        yield Apis(str(server.make_url("/")).rstrip("/"), str(slow.make_url("/")).rstrip("/"))
    await stop_plane(running)


class Shell:
    """Runs `tierflow ...` the way a user would, and keeps what it printed."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    async def __call__(self, *argv: str | int | Path) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = await asyncio.to_thread(main, [str(a) for a in argv])
        out, err = self.capsys.readouterr()
        return code, out, err

    async def ok(self, *argv: str | int | Path) -> str:
        code, out, err = await self(*argv)
        assert code == 0, (argv, out, err)
        assert err == "", err
        return out

    async def json(self, *argv: str | int | Path) -> Any:
        return json.loads(await self.ok(*argv, "--json"))


@pytest.mark.slow
async def test_catalogue_from_the_command_line(apis: Apis, snippets: dict[str, str], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    sh = Shell(capsys)
    monkeypatch.setenv("TIERFLOW_API_URL", apis.url)
    monkeypatch.delenv("TIERFLOW_API_TOKEN", raising=False)
    for stem, text in snippets.items():
        (tmp_path / f"{stem}.py").write_text(text)

    # Without a token (no --token, no TIERFLOW_API_TOKEN, no running stack to take it from) reads are refused
    # too, with the server's message saying where to find one; --token, then the variable, are used.
    monkeypatch.setenv("TIERFLOW_HOME", str(tmp_path / "no-stack"))
    code, out, err = await sh("models", "list")
    assert code == 1 and out == ""
    assert err.startswith("tierflow: this API needs 'Authorization: Bearer") and "tierflow status --json" in err
    code, out, err = await sh("models", "create", "--name", "cloud", "--code-file", tmp_path / "cloud.py")
    assert code == 1 and out == ""
    assert await sh.ok("models", "list", "--token", TOKEN) == "no models\n"
    monkeypatch.setenv("TIERFLOW_API_TOKEN", TOKEN)

    # The thesis chain, top-down, from the snippet files.
    cloud = await sh.json("models", "create", "--name", "cloud", "--code-file", tmp_path / "cloud.py", "--distributed")
    assert cloud["input_shape"] == [None, 64] and cloud["version"] == 1
    fog = await sh.json("models", "create", "--name", "fog", "--code-file", tmp_path / "fog.py", "--distributed",
                        "--upper-id", cloud["id"])
    out = await sh.ok("models", "create", "--name", "edge", "--code-file", tmp_path / "edge.py", "--distributed",
                      "--upper-id", fog["id"], "--description", "first tier")
    lines = out.splitlines()
    assert lines[0].startswith("created model ")
    edge_id = int(lines[0].split()[-1])
    assert "input        (28, 28, 1)" in lines and "outputs      (64,), (10,)" in lines
    assert f"upper        {fog['id']}" in lines and "code:" not in out
    # A whole body from --file: the non-distributed model.
    (tmp_path / "single.json").write_text(json.dumps({"name": "single", "code": snippets["single"],
                                                      "description": "no tiers"}))
    single = await sh.json("models", "create", "--file", tmp_path / "single.json")
    assert single["distributed"] is False and single["description"] == "no tiers"

    # Listing: an aligned table, and the raw JSON for scripts.
    table = (await sh.ok("models", "list")).splitlines()
    assert table[0].split() == ["ID", "NAME", "DISTRIBUTED", "UPPER", "LOWER", "VERSION", "PARAMS", "INPUT"]
    rows = {line.split()[1]: line for line in table[1:]}
    assert set(rows) == {"cloud", "fog", "edge", "single"}
    assert rows["edge"].split()[:6] == [str(edge_id), "edge", "yes", str(fog["id"]), "-", "1"]
    assert rows["edge"].endswith("(28, 28, 1)") and rows["single"].endswith("(28, 28)")
    assert rows["cloud"].split()[3:5] == ["-", str(fog["id"])]
    assert {len(line[: table[0].index("PARAMS")]) for line in table} == {table[0].index("PARAMS")}
    listed = await sh.json("models", "list")
    assert listed["total"] == 4 and [m["name"] for m in listed["items"]] == ["cloud", "fog", "edge", "single"]
    only_fog = await sh.json("models", "list", "--distributed", "--name", "fo")
    assert [m["name"] for m in only_fog["items"]] == ["fog"]

    # Show: key/value view with the code at the end; --json is the API's resource.
    shown = await sh.ok("models", "show", edge_id)
    assert shown.splitlines()[1] == "name         edge"
    assert shown.rstrip("\n").endswith("code:\n" + snippets["edge"].rstrip())
    assert (await sh.json("models", "show", edge_id))["lower_id"] is None

    # A duplicate name: exit 1 with the server's message and field.
    code, out, err = await sh("models", "create", "--name", "fog", "--code-file", tmp_path / "fog.py")
    assert (code, out) == (1, "")
    assert err.startswith("tierflow: ") and "already exists" in err and err.endswith(" (field: name)\n")

    # Updates are partial and honour the expected version.
    updated = await sh.json("models", "update", single["id"], "--description", "v2", "--expected-version", 1)
    assert updated["version"] == 2 and updated["description"] == "v2" and updated["code"] == snippets["single"]
    code, _, err = await sh("models", "update", single["id"], "--description", "v3", "--expected-version", 1)
    assert code == 1 and "version 2" in err and err.endswith("(field: expected_version)\n")

    # When the API cannot wait for an outcome it answers 202; the CLI polls the command and ends up
    # printing what the direct answer would have been (the resource, the deletion, or the rejection).
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        r = await http.post(f"{apis.slow_url}/models", json={"name": "fog", "code": snippets["fog"]})
        assert r.status == 202 and r.headers["Location"].startswith("/commands/")
    monkeypatch.setenv("TIERFLOW_API_URL", apis.slow_url)
    code, out, err = await sh("models", "create", "--name", "fog", "--code-file", tmp_path / "fog.py")
    assert code == 1 and "already exists" in err and err.endswith(" (field: name)\n")
    extra = await sh.json("models", "create", "--name", "extra", "--code-file", tmp_path / "single.py")
    assert extra["name"] == "extra" and extra["input_shape"] == [None, 28, 28]
    updated = await sh.json("models", "update", single["id"], "--description", "v3")
    assert updated["version"] == 3 and updated["description"] == "v3"
    assert await sh.ok("models", "delete", extra["id"]) == f"deleted model {extra['id']}\n"
    monkeypatch.setenv("TIERFLOW_API_URL", apis.url)

    # A configuration naming the chain's top brings the lower tiers.
    conf = await sh.json("configurations", "create", "--name", "thesis", "--model", cloud["id"],
                         "--model", single["id"])
    chain = [edge_id, fog["id"], cloud["id"], single["id"]]
    assert conf["model_ids"] == chain
    table = (await sh.ok("configurations", "list")).splitlines()
    assert table[1].split()[:4] == [str(conf["id"]), "thesis", ",".join(map(str, chain)), "1"]
    assert f"models       {','.join(map(str, chain))}" in (await sh.ok("configurations", "show", conf["id"]))

    # A deployment trains the configuration: one result per model, versions pinned.
    code, _, err = await sh("deployments", "create", "--configuration", conf["id"], "--batch", 32)
    assert code == 2 and err == "tierflow: deployments create needs --epochs (or --file with a JSON body)\n"
    dep = await sh.json("deployments", "create", "--configuration", conf["id"], "--batch", 32, "--epochs", 2,
                        "--metric", "accuracy", "--fit-options", '{"shuffle": true}')
    assert dep["fit_options"] == {"shuffle": True, "epochs": 2} and len(dep["result_ids"]) == 4
    assert dep["model_versions"][str(single["id"])] == 3
    table = (await sh.ok("deployments", "list")).splitlines()
    assert table[0].split() == ["ID", "CONFIGURATION", "BATCH", "EPOCHS", "OPTIMIZER", "LOSS", "RESULTS", "CREATED"]
    assert table[1].split()[:7] == [str(dep["id"]), str(conf["id"]), "32", "2", "adam",
                                    "sparse_categorical_crossentropy", "4"]
    assert "batch          32" in (await sh.ok("deployments", "show", dep["id"])).splitlines()

    # Results: everywhere, per deployment, one by one.
    table = (await sh.ok("results", "list")).splitlines()
    assert table[0].split() == ["ID", "DEPLOYMENT", "MODEL", "NAME", "VERSION", "STATUS", "UPDATED"]
    assert [int(line.split()[0]) for line in table[1:]] == dep["result_ids"]
    assert [line.split()[2] for line in table[1:]] == [str(i) for i in chain]
    per_dep = await sh.json("deployments", "results", dep["id"])
    assert per_dep["total"] == 4 and {r["deployment_id"] for r in per_dep["items"]} == {dep["id"]}
    assert (await sh.json("results", "list", "--deployment", dep["id"], "--limit", 2))["total"] == 4
    first = await sh.ok("results", "show", dep["result_ids"][0])
    assert "model name     edge" in first.splitlines()

    # Deleting: the server's rules hold (a used configuration stays), then bottom-up everything goes.
    code, _, err = await sh("configurations", "delete", conf["id"])
    assert code == 1 and str(dep["id"]) in err and err.endswith("(field: id)\n")
    assert await sh.ok("deployments", "delete", dep["id"]) == f"deleted deployment {dep['id']}\n"
    code, _, err = await sh("results", "show", dep["result_ids"][0])
    assert code == 1 and "does not exist" in err
    assert (await sh.json("configurations", "delete", conf["id"]))["deleted"] is True
    assert await sh.ok("models", "delete", single["id"], "--expected-version", 3) == \
        f"deleted model {single['id']}\n"
    for ident in (edge_id, fog["id"], cloud["id"]):
        await sh.ok("models", "delete", ident)
    assert await sh.ok("models", "list") == "no models\n"
    assert (await sh.json("deployments", "list"))["total"] == 0


async def test_an_unreachable_api_says_what_to_do(capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("TIERFLOW_API_URL", f"http://127.0.0.1:{port}")
    code, out, err = await Shell(capsys)("models", "list")
    assert (code, out) == (1, "")
    assert err.startswith(f"tierflow: cannot reach the tierflow API at http://127.0.0.1:{port}: ")
    assert "`tierflow up`" in err and "TIERFLOW_API_URL" in err


def test_the_api_url_comes_from_the_setting_then_the_running_stack(tmp_path: Path) -> None:
    from tierflow.streams.stack_state import StackState, write_stack_state

    env = {"TIERFLOW_HOME": str(tmp_path)}
    assert resolve_api_url(Settings.from_env(env)) == DEFAULT_API_URL
    write_stack_state(tmp_path, StackState(pid=os.getpid(), api_url="http://127.0.0.1:9191",
                                           bootstrap_servers="127.0.0.1:9092", database_url="postgresql://x/y",
                                           home=tmp_path, started_at=datetime.now(UTC)))
    assert resolve_api_url(Settings.from_env(env)) == "http://127.0.0.1:9191"
    assert resolve_api_url(Settings.from_env(env | {"TIERFLOW_API_URL": "http://api:80/"})) == "http://api:80"
