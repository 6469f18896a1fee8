"""The README keeps its promises: the two set-up commands, and every environment variable Settings reads."""

from __future__ import annotations

import re
from pathlib import Path

from tierflow.streams.settings import env_names

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_the_readme_has_the_demo_and_the_test_commands() -> None:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    setup = [b.strip() for b in blocks if b.startswith("python3 -m venv .venv")]
    assert setup == ["python3 -m venv .venv && .venv/bin/pip install -e '.[dev]' && .venv/bin/tierflow demo",
                     "python3 -m venv .venv && .venv/bin/pip install -e '.[dev]' && .venv/bin/pytest"]


def test_every_setting_is_documented() -> None:
    names = set(env_names())
    assert len(names) > 25
    missing = sorted(n for n in names if f"`{n}`" not in README)
    assert not missing, f"README's configuration table lacks {missing}"
