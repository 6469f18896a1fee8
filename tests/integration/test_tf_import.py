"""TensorFlow's import, as every process that needs it does it (`keras_code.load_keras`): run in a fresh
interpreter each, since this one may have imported TensorFlow already.

The import makes millions of objects; the cyclic collector stays paused while it runs and is restored after,
and ml_dtypes stays below 0.7 (pyproject.toml: 0.7.0 adds 1.2 CPU s to every TensorFlow process).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CHILD = """
import gc, json, sys
collections = []
gc.callbacks.append(lambda phase, info: phase == "start" and collections.append(info["generation"]))
{before}
from tierflow.tiers import keras_code
collections.clear()
tf, keras = keras_code.load_keras()
during = len(collections)
again = keras_code.load_keras()
import ml_dtypes
print(json.dumps({{"during": during, "enabled": gc.isenabled(), "legacy": keras.__name__,
                  "same": again[0] is tf and again[1] is keras, "ml_dtypes": ml_dtypes.__version__}}))
"""


def run_child(before: str) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-c", CHILD.format(before=before)], capture_output=True, text=True,
                          timeout=180, env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.timeout(240)
def test_import_pauses_the_collector_and_restores_it() -> None:
    result = run_child("")
    # One may start as the collector is switched back on (it owes one); without the pause, hundreds run.
    assert result["during"] <= 1, f"{result['during']} collections ran during TensorFlow's import"
    assert result["enabled"] is True
    assert result["legacy"] == "tf_keras" and result["same"] is True


@pytest.mark.timeout(240)
def test_a_paused_collector_stays_paused() -> None:
    result = run_child("gc.disable()")
    assert result["enabled"] is False


@pytest.mark.timeout(240)
def test_ml_dtypes_is_below_the_slow_release() -> None:
    version = str(run_child("")["ml_dtypes"])
    major, minor = (int(part) for part in version.split(".")[:2])
    assert (major, minor) < (0, 7), f"ml_dtypes {version}: 0.7 adds 1.2 CPU s to TensorFlow's import"
