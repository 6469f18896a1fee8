"""The import contract (pyproject.toml [tool.importlinter], run by .ci/imports) holds on the tree and catches what
it is there to catch: an upward import at module level or inside a function, an import between the sibling
layers, a device tier reaching a server-only package, and a new streams module that no layer names.

Each case lays the five packages out as the installed `tierflow.*` package in a temporary folder (links to the
real folders; the one package that gets an injected import is a copy) and runs lint-imports there with the
repository's contract.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("streams", "api", "projections", "tiers", "deploy")
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(tmp_path: Path, changed: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """lint-imports on the tree with `changed` ({path relative to the repository: new text}) applied to a copy."""
    changed = changed or {}
    tree = tmp_path / "tree" / "tierflow"
    tree.mkdir(parents=True)
    copied = {path.split("/")[0] for path in changed}
    for package in PACKAGES:
        if package in copied:
            shutil.copytree(REPO / package, tree / package, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (tree / package).symlink_to(REPO / package)
    for path, text in changed.items():
        (tree / path).write_text(text)
    return subprocess.run([str(LINT_IMPORTS), str(REPO / "pyproject.toml"), "--no-cache"],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tree.parent), "COLUMNS": "300"},
                          capture_output=True, text=True, timeout=120, check=False)


def verdicts(report: str) -> dict[str, str]:
    """KEPT or BROKEN per contract, by the start of its name."""
    found = {}
    for line in report.splitlines():
        verdict = re.search(r" (KEPT|BROKEN)\b", line)
        for start in ("Layers", "Every module", "A device tier"):
            if line.startswith(start) and verdict:
                found[start] = verdict.group(1)
    return found


def with_import(path: str, statement: str, *, inside_function: bool) -> tuple[str, int]:
    """The text of `path` with `statement` added below its `from __future__` line, at module level or in the body
    of a new function; and the line number of the statement."""
    lines = (REPO / path).read_text().splitlines()
    at = lines.index("from __future__ import annotations") + 1
    added = ["", "def _injected() -> None:", f"    {statement}"] if inside_function else [statement]
    lines[at:at] = added
    return "\n".join(lines) + "\n", at + len(added)


def test_the_tree_keeps_every_contract(tmp_path: Path) -> None:
    run = lint_imports(tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert verdicts(run.stdout) == {"Layers": "KEPT", "Every module": "KEPT", "A device tier": "KEPT"}


@pytest.mark.parametrize(("path", "imported", "inside_function"), [
    ("streams/envelope.py", "tierflow.deploy.cli", False),  # the core may not import the front door
    ("streams/worker.py", "tierflow.tiers.sandbox", True),  # the worker is handed its sandbox instead
    ("projections/queries.py", "tierflow.streams.orchestrator", True),  # projections sit below the agents
    ("tiers/data.py", "tierflow.api.outputs", True),  # the API and the tiers are siblings: neither imports
    ("api/outputs.py", "tierflow.tiers.data", False),  # the other
])
def test_an_upward_import_breaks_the_layers(tmp_path: Path, path: str, imported: str, inside_function: bool) -> None:
    text, line = with_import(path, f"import {imported}", inside_function=inside_function)
    run = lint_imports(tmp_path, {path: text})
    assert run.returncode == 1, run.stdout + run.stderr
    importer = "tierflow." + path.removesuffix(".py").replace("/", ".")
    assert f"- {importer} -> {imported} (l.{line})" in run.stdout, run.stdout
    assert verdicts(run.stdout)["Layers"] == "BROKEN"


def test_a_device_tier_reaching_a_server_only_package_breaks_the_device_contract(tmp_path: Path) -> None:
    # streams/wire.py is run by every tier agent; asyncpg comes only with the server extra.
    text, line = with_import("streams/wire.py", "import asyncpg", inside_function=True)
    run = lint_imports(tmp_path, {"streams/wire.py": text})
    assert run.returncode == 1, run.stdout + run.stderr
    assert verdicts(run.stdout) == {"Layers": "KEPT", "Every module": "KEPT", "A device tier": "BROKEN"}
    assert "tierflow.tiers.tier_agent is not allowed to import asyncpg" in run.stdout
    assert f"tierflow.streams.wire -> asyncpg (l.{line})" in run.stdout


def test_a_new_streams_module_must_be_placed_in_a_layer(tmp_path: Path) -> None:
    run = lint_imports(tmp_path, {"streams/novelty.py": '"""A module no layer names yet."""\n'})
    assert run.returncode == 1, run.stdout + run.stderr
    assert verdicts(run.stdout) == {"Layers": "KEPT", "Every module": "BROKEN", "A device tier": "KEPT"}
    assert "- tierflow.streams.novelty" in run.stdout and "not listed as layers" in run.stdout


def test_both_layer_contracts_split_streams_the_same_way() -> None:
    contracts = {c["id"]: c for c in tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
                 ["contracts"]}

    def streams_layers(layers: list[str], prefix: str) -> list[set[str]]:
        named = [{m.strip().removeprefix(prefix) for m in layer.split(":")} for layer in layers]
        return [layer for layer in named if "." not in "".join(layer) and "|" not in "".join(layer)]

    whole = streams_layers(contracts["layers"]["layers"], "tierflow.streams.")
    split = streams_layers(contracts["streams-split"]["layers"], "")
    assert whole == split
    on_disk = {p.stem for p in (REPO / "streams").glob("*.py") if p.stem != "__init__"}
    on_disk |= {p.parent.name for p in (REPO / "streams").glob("*/__init__.py")}  # packages such as domain/
    assert set().union(*split) == on_disk
