"""TensorFlow costs seconds and ~600 MB per process: the API, the worker and the CLI must never import it."""

from __future__ import annotations

import subprocess
import sys


def test_api_worker_and_cli_do_not_import_tensorflow() -> None:
    code = (
        "import sys\n"
        "import tierflow.api.app, tierflow.streams.worker, tierflow.deploy.cli, tierflow.deploy.stack\n"
        "import tierflow.streams.orchestrator, tierflow.tiers.sandbox\n"
        "tierflow.deploy.cli.build_parser()\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tf_keras', 'keras'))\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "", done.stdout
