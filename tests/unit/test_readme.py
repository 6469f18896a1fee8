"""The README keeps its promises: the two set-up commands, and every environment variable Settings reads."""

from __future__ import annotations

import re
from pathlib import Path

from tierflow.streams.settings import env_names

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_the_readme_has_the_demo_and_the_test_commands() -> None:
    blocks = [b.strip() for b in re.findall(r"```bash\n(.*?)```", README, flags=re.S)]
    setup = [b for b in blocks if b.startswith("python3 -m venv .venv") or b == "bash .ci/run"]
    assert setup == ["python3 -m venv .venv && .venv/bin/pip install -e '.[dev]' && .venv/bin/tierflow demo",
                     "bash .ci/run"]


def test_the_test_command_sets_up_what_the_tests_need_and_runs_them_all() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    # A fresh machine lacks the browser and the data set; the script installs both, then the project.
    assert "chromium" in script and "dataset-fashion-mnist" in script
    assert "pip install -q -e '.[dev]'" in script
    assert script.rstrip().splitlines()[-2].strip() == ".venv/bin/pytest"
    assert "total:" in script.rstrip().splitlines()[-1]


def test_every_setting_is_documented() -> None:
    names = set(env_names())
    assert len(names) > 25
    missing = sorted(n for n in names if f"`{n}`" not in README)
    assert not missing, f"README's configuration table lacks {missing}"
