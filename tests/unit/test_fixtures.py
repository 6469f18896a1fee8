"""The tests and benchmarks need nothing outside the repository (a user's clone has nothing beside it)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.fixtures import MODEL_NAMES, REPO, FixtureError, all_model_code, inside_repository, model_code


def test_every_model_fixture_is_in_the_repository() -> None:
    code = all_model_code()
    assert sorted(code) == sorted(MODEL_NAMES)
    assert all("keras." in text and not re.search(r"^\s*(import|from) ", text, re.M) for text in code.values())


def test_a_missing_fixture_is_an_error_not_an_empty_result() -> None:
    with pytest.raises(FixtureError, match="missing fixture"):
        model_code("no-such-model")


@pytest.mark.parametrize("path", [REPO.parent / "shared" / "fixtures" / "edge.py", Path("/etc/passwd"),
                                  REPO / ".." / "elsewhere.py"])
def test_a_path_outside_the_repository_is_refused(path: Path) -> None:
    with pytest.raises(FixtureError, match="outside the repository"):
        inside_repository(path)


def test_a_path_inside_the_repository_is_accepted() -> None:
    assert inside_repository(REPO / "tests" / "fixtures" / "kafka_ml_models" / "edge.py").is_file()


#: Ways a file could reach beside the repository: `../shared`, `parents[N].parent / ...`, `REPO.parent`.
OUTSIDE = re.compile(r"\.\./shared|parents\[\d\]\.parent\b|REPO\.parent\s*/|\"shared\"\s*/\s*\"fixtures\"")


def test_no_tracked_file_reads_beside_the_repository() -> None:
    files = subprocess.run(["git", "ls-files", "*.py", "*.sh", "*.toml", ".ci/*"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    this = Path(__file__).resolve()
    offenders = [f for f in files if (REPO / f).resolve() != this and (REPO / f).is_file()
                 and OUTSIDE.search((REPO / f).read_text(errors="replace"))]
    assert offenders == []
