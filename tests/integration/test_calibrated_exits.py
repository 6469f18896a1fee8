"""Calibrated early exits end to end on Fashion-MNIST: the thesis chain (tests/fixtures, edge -> fog -> cloud)
trains on a subset, the training job's `calibrate` fits every exit and builds the frontier, the results are
reported to a real control plane (Tansu + Postgres) with those fields, and inferences ask for targets.

The subset (20,000 images: 12,000 to train for 10 epochs, 4,000 validation, 4,000 test) trains in ~25 s on
the 2-core CI machine, long enough for the exits to become over-confident (what temperature scaling
corrects). Needs the Debian package `dataset-fashion-mnist` (.ci/run installs it). Model code is checked by
a validator that answers the chain's shapes from a marker (this test is about exits, not the sandbox).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import numpy as np
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.conftest import Infra, admin_headers, new_plane, start_plane, stop_plane, wait_until
from tests.integration.test_replay import dump
from tierflow.api.app import create_app
from tierflow.projections.rebuild import rebuild
from tierflow.streams.client import CommandClient
from tierflow.streams.settings import Settings
from tierflow.tiers import exit_report, frontier, training
from tierflow.tiers.datasets import load_fashion_mnist
from tierflow.tiers.keras_code import build_model
from tierflow.tiers.train_job import calibrate
from tierflow.tiers.train_sandbox import TrainerOutput
from tierflow.tiers.training import ExitSplits, TrainingOptions

JSON = dict[str, Any]
CHAIN = ("edge", "fog", "cloud")
SHAPES = {
    "edge": {"input_shape": [None, 28, 28, 1], "output_shapes": [[None, 64], [None, 10]], "params": 305_000},
    "fog": {"input_shape": [None, 64], "output_shapes": [[None, 64], [None, 10]], "params": 4810},
    "cloud": {"input_shape": [None, 64], "output_shapes": [[None, 10]], "params": 9610},
}

pytestmark = [pytest.mark.slow]


@dataclass
class Trained:
    exits: list[JSON]  # the `exits` of each result's report, bottom first (what the job sends)
    outputs: ExitSplits  # every exit's probabilities on the validation and test splits


@pytest.fixture(scope="module")
def trained(snippets: dict[str, str]) -> Trained:
    data = load_fashion_mnist()
    pick = np.random.default_rng(0).permutation(len(data.x))[:20_000]
    x, y = data.x[pick].astype(np.float32) / 255.0, data.y[pick]
    options = TrainingOptions(batch=64, fit_options={"epochs": 10}, validation_rate=0.2, test_rate=0.2, seed=1,
                              exit_keys=[1, 2, 3])
    models = [build_model(snippets[name]) for name in CHAIN]
    training.train(models, x, y, options, _Quiet())
    # What the sandboxed trainer hands the driver, and what the driver makes of it (tiers/train_job.calibrate).
    outputs = training.exit_probabilities(models, x, y, options)
    handed = TrainerOutput(metrics=[{} for _ in CHAIN], artefacts=[{} for _ in CHAIN],
                           probs={"validation": outputs.val_probs, "test": outputs.test_probs},
                           seconds_per_sample=outputs.costs_s)
    exits = calibrate(handed, y, training.split(len(x), options.validation_rate, options.test_rate, options.seed))
    print("\n" + "\n".join(f"exit {k}: T {e['temperature']:.3f}, test accuracy {e['calibration']['accuracy']:.4f}, "
                           f"ECE {e['calibration']['ece_before']:.4f} -> {e['calibration']['ece_after']:.4f}"
                           for k, e in enumerate(exits)))
    return Trained(exits, outputs)


class _Quiet:
    def progress(self, epoch: int, epochs: int, metrics: list[Any]) -> None:
        pass


def test_every_exit_is_better_calibrated_on_the_test_split(trained: Trained) -> None:
    for e in trained.exits:
        cal = e["calibration"]
        assert (cal["measured_on"], cal["n_fit"], cal["n_measured"]) == ("test", 4000, 4000)
        assert cal["ece_after"] < cal["ece_before"], cal


def test_the_frontier_travels_once_and_well_under_a_megabyte(trained: Trained) -> None:
    sizes = [len(orjson.dumps(e)) for e in trained.exits]
    print(f"\nexits fields: {sizes} bytes of JSON; frontier points per entry "
          f"{[len(entry['limits']) for entry in trained.exits[-1]['frontier']['entries']]}")
    assert [e["frontier"] is None for e in trained.exits] == [True, True, False]
    assert sizes[-1] < exit_report.MAX_RECORD_BYTES < 1_000_000 and max(sizes[:-1]) < 1000


# -- the control plane ----------------------------------------------------------------------------------------


async def shapes(code: str, imports: str) -> JSON:
    for name, summary in SHAPES.items():
        if f"# {name}" in code:
            return {"ok": True, "summary": summary}
    return {"ok": False, "error": "SyntaxError: line 1"}


@dataclass
class Served:
    client: TestClient[Any, Any]
    settings: Settings
    chains: dict[str, list[int]]  # deployment kind -> its results, bottom first


@pytest.fixture(scope="module")
async def served(infra: Infra, trained: Trained) -> AsyncIterator[Served]:
    """Three deployments of the chain, reported with the job's fields: `full` (4,000 validation samples),
    `small` (the same chain calibrated on only 100 of them) and `none` (validation_rate 0)."""
    settings = await new_plane(infra, "exits")
    running = await start_plane(settings, shapes)
    out = trained.outputs
    small = exit_report.chain_exits([p[:100] for p in out.val_probs], out.val_labels[:100], out.test_probs,
                                    out.test_labels, out.costs_s)
    none = exit_report.chain_exits([p[:0] for p in out.val_probs], out.val_labels[:0], out.test_probs,
                                   out.test_labels, out.costs_s)
    async with TestClient(TestServer(create_app(settings)), headers=admin_headers(settings)) as c:
        cloud = await (await c.post("/models", json={"name": "cloud", "code": "# cloud", "distributed": True})).json()
        fog = await (await c.post("/models", json={"name": "fog", "code": "# fog", "distributed": True,
                                                   "upper_id": cloud["id"]})).json()
        edge = await (await c.post("/models", json={"name": "edge", "code": "# edge", "distributed": True,
                                                    "upper_id": fog["id"]})).json()
        conf = await (await c.post("/configurations", json={"name": "thesis", "model_ids": [cloud["id"]]})).json()
        chains: dict[str, list[int]] = {}
        async with CommandClient(settings.kafka) as commands:
            for kind, fields in (("full", trained.exits), ("small", small), ("none", none)):
                dep = await (await c.post("/deployments", json={"configuration_id": conf["id"], "batch": 64})).json()
                by_model = {r["model_id"]: r["id"] for r in
                            (await (await c.get(f"/deployments/{dep['id']}/results")).json())["items"]}
                chains[kind] = [by_model[m["id"]] for m in (edge, fog, cloud)]
                for rid, exits in zip(chains[kind], fields, strict=True):
                    event = await commands.wait(await commands.send("ReportTrainingResult", {
                        "result_id": rid, "metrics": {}, "artefacts": {"keras": {"sha256": "a" * 64, "size": 1}},
                        "exits": exits}))
                    assert event.type == "TrainingResultReported", event.payload

        async def projected() -> bool:
            items = (await (await c.get("/results?limit=1000")).json())["items"]
            return len(items) == 9 and all(i["status"] == "finished" for i in items)

        await wait_until(projected, what="the reported results projected")
        yield Served(c, settings, chains)
    await stop_plane(running)


def body(entry: int, **extra: Any) -> JSON:
    return {"result_id": entry, "input_topic": f"in-{entry}", "output_topic": f"out-{entry}", **extra}


async def test_a_one_percent_drop_target_keeps_accuracy_and_answers_more_below_the_top(
        served: Served, trained: Trained) -> None:
    c, chain = served.client, served.chains["full"]
    r = await c.post("/inferences", json=body(chain[0], target={"max_accuracy_drop": 0.01}))
    assert r.status == 201, await r.text()
    inference = await r.json()
    tiers = inference["tiers"]
    assert [t["compare"] for t in tiers] == ["calibrated"] * 3
    assert [t["temperature"] for t in tiers] == [e["temperature"] for e in trained.exits]
    limits = [t["limit"] for t in tiers[:-1]]
    predicted = inference["predicted"]
    assert predicted["limits"] == limits and predicted["accuracy_drop_upper"] <= 0.01

    # The recorded limits and temperatures, applied to the test split, give the record's test evaluation.
    out = trained.outputs
    labels = out.test_labels.astype(np.int64)
    calibrated = [frontier.exit_outputs(p, t["temperature"]) for p, t in zip(out.test_probs, tiers, strict=True)]
    on_test = frontier.evaluate_limits(calibrated, labels, [limits])
    test = predicted["test"]
    assert test["shares"] == [a / on_test.n for a in on_test.answered[0].tolist()]
    cascade, top = int(on_test.correct[0].sum()) / on_test.n, on_test.top_correct / on_test.n
    assert test["accuracy"] == cascade and test["top_accuracy"] == top
    assert cascade >= top - 0.02, (cascade, top)
    # Kafka-ML's way: one hand-typed limit of 0.99 on the raw max(p) of every tier.
    raw = [frontier.exit_outputs(p, 1.0) for p in out.test_probs]
    uniform = frontier.evaluate_limits(raw, labels, [[0.99, 0.99]])
    below_top = on_test.n - int(on_test.answered[0, -1])
    assert below_top > on_test.n - int(uniform.answered[0, -1]), (on_test.answered, uniform.answered)
    print(f"\nmax_accuracy_drop 0.01: limits {limits}, test shares {test['shares']}, accuracy {cascade:.4f} (top "
          f"{top:.4f}); uniform 0.99: shares {(uniform.answered[0] / uniform.n).tolist()}")


async def test_any_result_of_the_chain_serves_its_calibration_and_frontier(served: Served, trained: Trained) -> None:
    c, chain = served.client, served.chains["full"]
    r = await c.get(f"/results/{chain[1]}/exits")
    assert r.status == 200, await r.text()
    found = await r.json()
    assert found["chain"] == chain and found["reason"] is None
    assert [e["calibration"] for e in found["exits"]] == [e["calibration"] for e in trained.exits]
    assert found["frontier"] == trained.exits[-1]["frontier"]


async def test_an_unreachable_target_is_a_422_naming_the_best_reachable_value(served: Served) -> None:
    r = await served.client.post("/inferences", json=body(served.chains["full"][0], target={"min_accuracy": 0.999}))
    assert r.status == 422
    error = (await r.json())["error"]
    assert error["field"] == "target"
    assert "no limits reach a cascade accuracy of at least 0.999: the best any limits reach is" in error["message"]


async def test_a_target_too_tight_for_a_small_validation_split_is_a_422_saying_so(served: Served) -> None:
    r = await served.client.post("/inferences", json=body(served.chains["small"][0],
                                                           target={"max_accuracy_drop": 0.01}))
    assert r.status == 422
    error = (await r.json())["error"]
    assert error["field"] == "target"
    assert "the validation split (100 samples) is too small to certify" in error["message"]


async def test_a_chain_without_validation_samples_has_no_frontier_and_says_why(served: Served) -> None:
    c, chain = served.client, served.chains["none"]
    r = await c.get(f"/results/{chain[2]}/exits")
    assert r.status == 409
    assert "validation_rate is 0" in (await r.json())["error"]["message"]
    r = await c.post("/inferences", json=body(chain[0], target={"max_accuracy_drop": 0.01}))
    assert r.status == 422
    assert "validation_rate is 0" in (await r.json())["error"]["message"]
    # Typed limits serve it as before: the raw max(p).
    r = await c.post("/inferences", json=body(chain[0], limit=0.9))
    assert r.status == 201
    assert [(t["compare"], t["temperature"]) for t in (await r.json())["tiers"]] == [("raw", 1.0)] * 3


async def test_replaying_the_events_rebuilds_the_exits_and_the_inferences_targets(served: Served) -> None:
    entry = served.chains["full"][1]
    r = await served.client.post("/inferences", json=body(entry, target={"max_top_share": 0.5}))
    assert r.status == 201, await r.text()
    conn = await asyncpg.connect(served.settings.database.url)
    try:
        before = await dump(conn)
        assert len(before["result_exits"]) == 9
        assert any(b"max_top_share" in row and b"calibrated" in row for row in before["inferences"])
        await rebuild(served.settings)
        assert await dump(conn) == before
    finally:
        await conn.close()
