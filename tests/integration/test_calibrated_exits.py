"""Calibrated early exits end to end on Fashion-MNIST: the thesis chain (tests/fixtures, edge -> fog -> cloud)
trains on a subset, the training job's `calibrate` fits every exit and builds the frontier, the results are
reported to a real control plane (Tansu + Postgres) with those fields, and inferences ask for targets.

The subset (20,000 images: 12,000 to train for 10 epochs, 4,000 validation, 4,000 test) trains in ~25 s on
the 2-core CI machine, long enough for the exits to become over-confident (what temperature scaling
corrects). The same trained chain is then served by three tier agents from an inference asked for with a
target and a shadow fraction of 1.0 (every early answer goes up again as a shadow sample): the client gets
one answer per input, the live agreement equals the offline one, a tier of the earlier release dead-letters
shadow messages. Needs the Debian package `dataset-fashion-mnist` (.ci/run installs it). Model code is checked by
a validator that answers the chain's shapes from a marker (this test is about exits, not the sandbox).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import asyncpg
import numpy as np
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import generate_latest

from tests.conftest import Infra, StackClient, admin_headers, new_plane, start_plane, stop_plane, wait_until
from tests.integration.test_replay import dump
from tests.integration.test_tier_agent import TopicReader, produce, serving
from tierflow.api.app import create_app
from tierflow.deploy.cli_inferences import render_stats
from tierflow.projections.rebuild import rebuild
from tierflow.streams import wire
from tierflow.streams.exits import live_agreement
from tierflow.streams.orchestrator import ensure_inference_topics
from tierflow.streams.settings import Settings
from tierflow.streams.topics import TopicSpec, ensure_topics
from tierflow.tiers import exit_report, frontier, training
from tierflow.tiers.calibration import calibrated_confidence
from tierflow.tiers.datasets import load_fashion_mnist
from tierflow.tiers.engines import KerasEngine
from tierflow.tiers.keras_code import build_model
from tierflow.tiers.tier_agent import TierAgent
from tierflow.tiers.tier_cli import config_from_inference
from tierflow.tiers.tier_config import TierConfig
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
#: Inputs sent to the served chain (half as Kafka-ML single-sample records, half in batched tensor messages).
LIVE_INPUTS = 1000
FLOAT_IMAGES = {"data_type": "float32", "data_reshape": "28 28"}


@dataclass
class Trained:
    exits: list[JSON]  # the `exits` of each result's report, bottom first (what the job sends)
    outputs: ExitSplits  # every exit's probabilities on the validation and test splits
    models: list[Any]  # the trained sub-models, bottom first
    unseen: np.ndarray  # float32 28x28 images outside the subset (inputs of the served chain)


@pytest.fixture(scope="module")
def trained(snippets: dict[str, str]) -> Trained:
    data = load_fashion_mnist()
    order = np.random.default_rng(0).permutation(len(data.x))
    pick = order[:20_000]
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
    return Trained(exits, outputs, models, data.x[order[20_000:20_000 + LIVE_INPUTS]].astype(np.float32) / 255.0)


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
        async with StackClient(settings) as commands:  # the training job's reports, as the API vouches for them
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


# -- served live: shadow samples ------------------------------------------------------------------------------


def offline_cascade(engines: list[KerasEngine], x: np.ndarray, tiers: list[JSON]) -> tuple[np.ndarray, ...]:
    """The chain served as recorded (each tier compares its calibrated confidence with its limit), computed
    offline on `x`: per sample the tier that answers, its class, and the top exit's class."""
    n = len(x)
    tier, cls = np.full(n, -1), np.zeros(n, dtype=np.int64)
    tensor = x[..., None]
    top_cls = np.zeros(n, dtype=np.int64)
    for k, (engine, spec) in enumerate(zip(engines, tiers, strict=True)):
        outputs = engine.predict(tensor)
        probs = outputs[-1]
        if spec["top"]:
            here = tier < 0
            top_cls = probs.argmax(axis=1)
        else:
            confidence = calibrated_confidence(probs, spec["temperature"], spec["eps"])
            here = (tier < 0) & (confidence >= spec["limit"])
            tensor = outputs[0]
        tier[here], cls[here] = k, probs[here].argmax(axis=1)
    return tier, cls, top_cls


async def test_shadow_samples_measure_the_live_agreement_and_never_reach_the_client(
        served: Served, trained: Trained) -> None:
    c, settings, chain = served.client, served.settings, served.chains["full"]
    r = await c.post("/inferences", json={
        "result_id": chain[0], "input_topic": "live-in", "output_topic": "live-out", "input_format": "RAW",
        "input_config": FLOAT_IMAGES, "target": {"max_top_share": 0.5}, "shadow_fraction": 1.0})
    assert r.status == 201, await r.text()
    inference = await r.json()
    tiers = inference["tiers"]
    # What the orchestrator creates with the inference's topics (no launcher here: the tiers run in this
    # process), the shadow topic on the top tier's cluster among them.
    shadow_topic = settings.kafka.shadow_topic(inference["id"])
    await ensure_inference_topics(inference, settings.kafka.bootstrap_servers, shadow_topic=shadow_topic)
    kafka = replace(settings.kafka, session_timeout_ms=1000)
    configs = [config_from_inference(inference, k, model=b"", default_servers=kafka.bootstrap_servers, port=0)
               for k in range(3)]
    assert [(cfg.compare, cfg.shadow_fraction) for cfg in configs] == [("calibrated", 1.0)] * 3
    engines = [KerasEngine(m) for m in trained.models]
    x = trained.unseen
    half = LIVE_INPUTS // 2
    async with serving(kafka, configs, engines) as apps:
        singles = [(x[i].tobytes(), None) for i in range(half)]
        batches = [wire.encode_tensor(x[i:i + 50]) for i in range(half, LIVE_INPUTS, 50)]
        sent = await produce(kafka, "live-in", singles + batches)
        origins = {("live-in", p, off, 0): i for i, (p, off) in enumerate(sent[:half])}
        for b, (p, off) in enumerate(sent[half:]):
            origins.update({("live-in", p, off, j): half + 50 * b + j for j in range(50)})
        edge, fog, cloud = (a.tier.stats for a in apps)

        def settled() -> bool:
            early = edge.answered + fog.answered
            return early + cloud.answered == LIVE_INPUTS and cloud.shadow_outcomes == early

        await wait_until(settled, timeout=60, what="every input answered and every early answer's shadow outcome")
        async with TopicReader(kafka, "live-out") as out, TopicReader(kafka, shadow_topic) as side:
            await out.until(lambda r: len(r.answers()) >= LIVE_INPUTS, what="the answers")
            await side.until(lambda r: sum(len(wire.read_shadow_outcomes(v.value)) for v in r.records)
                             >= cloud.shadow_outcomes, what="the shadow outcomes")
            answers = out.answers()
            outcomes = [o for rec in side.records for o in wire.read_shadow_outcomes(rec.value)]
        metrics = generate_latest(apps[2].tier.metrics.registry).decode()
        upper = [tiers[0]["upper_topic"], tiers[1]["upper_topic"]]
        async with TopicReader(kafka, upper[0]) as fog_input:
            await fog_input.until(lambda r: any(dict(rec.headers).get(wire.H_VERSION) == b"2" for rec in r.records),
                                  what="a shadow message in the fog tier's input")
            shadow_record = next(rec for rec in fog_input.records if dict(rec.headers).get(wire.H_VERSION) == b"2")

    # The client gets exactly one answer per input: shadow samples never reach the output topic.
    assert len(answers) == LIVE_INPUTS
    assert Counter(a.origin for a in answers) == Counter(dict.fromkeys(origins, 1))
    # Every early answer went up once as a shadow sample; its outcome names the tier and class it answered with.
    early = {a.origin: a for a in answers if a.tier < 2}
    assert sorted(o.origin for o in outcomes) == sorted(early)
    assert all((o.tier, o.cls) == (early[o.origin].tier, early[o.origin].cls) for o in outcomes)
    # Answers: the raw values, the calibrated confidence the tier compared and the raw one beside it.
    for a in answers:
        spec = tiers[a.tier]
        assert a.raw_confidence == pytest.approx(max(a.values), abs=1e-6)
        expected = calibrated_confidence(np.asarray([a.values]), spec["temperature"], spec["eps"])[0]
        assert a.confidence == pytest.approx(expected, abs=1e-5)
        if a.tier < 2:
            assert a.confidence >= spec["limit"] - 1e-5

    # The live agreement per tier equals the offline agreement of the same inputs with the top exit.
    tier, cls, top_cls = offline_cascade(engines, x, tiers)
    live: dict[int, tuple[int, int]] = {}
    for k in (0, 1):
        mine = [o for o in outcomes if o.tier == k]
        live[k] = (sum(o.agree for o in mine), len(mine))
        answered = tier == k
        offline = float((cls[answered] == top_cls[answered]).mean()) if answered.any() else None
        measured = live[k][0] / live[k][1] if live[k][1] else None
        print(f"\ntier {k}: {live[k][1]} early answers (offline {int(answered.sum())}); live agreement "
              f"{measured}, offline {offline}; predicted {tiers[k]['predicted']}")
        assert abs(live[k][1] - int(answered.sum())) <= 0.01 * LIVE_INPUTS  # a sample near a limit may move
        if offline is not None and measured is not None:
            assert abs(measured - offline) <= 0.05
    assert live[0][1] >= 100, "the edge answers a fair share of the inputs early"
    # The top tier's gauges say the same, its drift flag as the rule judges these counts against the
    # prediction (whether the unseen inputs drift is up to the training run: not asserted here).
    drift = {k: live_agreement(*live[k], tiers[k]["predicted"]["agreement_lower"]).drift for k in (0, 1)}
    for k in (0, 1):
        if live[k][1]:
            labels = f'inference="{inference["id"]}",tier="{k}"'
            assert f"tierflow_live_outcomes_total{{{labels}}} {float(live[k][1])}" in metrics
            assert f"tierflow_live_agreement{{{labels}}} {live[k][0] / live[k][1]}" in metrics
            assert f"tierflow_live_drift{{{labels}}} {float(drift[k])}" in metrics

    # The API shows, per tier, the observed and predicted shares and the live agreement (the UI's fields).
    async def stats() -> JSON:
        body: JSON = await (await c.get(f"/inferences/{inference['id']}/stats")).json()
        return body

    await wait_until(lambda: _shows(stats(), len(outcomes)), timeout=15, what="the stats over every outcome")
    shown = await stats()
    for k, entry in enumerate(shown["tiers"]):
        assert entry["observed_share"] == sum(a.tier == k for a in answers) / LIVE_INPUTS
        assert entry["predicted"] == {key: tiers[k]["predicted"][key] for key in ("share", "agreement",
                                                                                   "agreement_lower")}
        if k < 2:
            agreeing, n = live[k]
            assert entry["live"]["n"] == n and entry["live"]["drift"] is drift[k]
            assert entry["live"]["agreement"] == (agreeing / n if n else None)
        else:
            assert entry["live"] is None
    assert "LIVE AGREEMENT" in render_stats(shown)

    # A tier of the earlier release (it reads tensor messages of version 1 only) dead-letters a shadow
    # message instead of answering it a second time.
    await _an_old_tier_dead_letters(kafka, configs[1], engines[1], shadow_record)


async def _shows(stats: Any, outcomes: int) -> bool:
    return bool((await stats)["shadow_window"] == outcomes)


class _EarlierReleaseTier(TierAgent):
    READ_VERSIONS = (wire.WIRE_VERSION,)


async def _an_old_tier_dead_letters(kafka: Any, fog: Any, engine: KerasEngine, shadow: Any) -> None:
    old_kafka = replace(kafka, topic_prefix=f"old-{uuid.uuid4().hex[:8]}")
    names = {n: f"{old_kafka.topic_prefix}.{n}" for n in ("in", "out", "up")}
    await ensure_topics(old_kafka, extra=[TopicSpec(name, 1, -1) for name in names.values()])
    config = replace(fog, inference_id=99, input_topic=names["in"], output_topic=names["out"],
                     upper_topic=names["up"], shadow_fraction=0.0, group_id=f"old-{uuid.uuid4().hex[:8]}")
    agent = _EarlierReleaseTier(config, old_kafka, engine=engine)
    task = asyncio.create_task(agent.run())
    try:
        await wait_until(lambda: agent.ready or task.done(), timeout=30, what="the old tier ready")
        await produce(old_kafka, names["in"], [(shadow.value, list(shadow.headers))])
        async with TopicReader(old_kafka, old_kafka.deadletter_topic) as dead:
            await dead.until(lambda r: len(r.records) >= 1, what="the shadow message dead-lettered")
            letter = orjson.loads(dead.records[0].value)
        assert "tierflow.v=b'2'" in letter["reason"] and "version 1" in letter["reason"], letter
        await wait_until(lambda: agent.stats.deadlettered == 1, what="counted")
        assert (agent.stats.answered, agent.stats.forwarded, agent.stats.shadow_passed) == (0, 0, 0)
    finally:
        agent.request_stop()
        await asyncio.wait_for(task, 30)


async def test_a_tier_agreeing_less_than_predicted_is_flagged_as_drifting(served: Served, trained: Trained) -> None:
    # The edge answers every input (limit 0) while its inference predicts it agrees with the top exit at least
    # 99% of the time; half the inputs are inverted images, unlike anything it was validated on (the edge
    # agrees with the top on ~95% of plain inputs alone). The top tier's drift gauge rises.
    kafka = replace(served.settings.kafka, topic_prefix=f"drift-{uuid.uuid4().hex[:8]}", session_timeout_ms=1000)
    names = {n: f"{kafka.topic_prefix}.{n}" for n in ("in", "fog", "cloud", "out")}
    shadow_topic = kafka.shadow_topic(77)
    await ensure_topics(kafka, extra=[TopicSpec(name, 1, -1) for name in [*names.values(), shadow_topic]])
    common: JSON = {"inference_id": 77, "output_topic": names["out"], "bootstrap_servers": kafka.bootstrap_servers,
                    "port": 0, "compare": "calibrated", "shadow_fraction": 1.0}
    temperatures = [e["temperature"] for e in trained.exits]
    configs = [TierConfig(tier_index=0, top=False, input_topic=names["in"], upper_topic=names["fog"], limit=0.0,
                          temperature=temperatures[0], **common),
               TierConfig(tier_index=1, top=False, input_topic=names["fog"], upper_topic=names["cloud"], limit=1.01,
                          temperature=temperatures[1], **common),
               TierConfig(tier_index=2, top=True, input_topic=names["cloud"], upper_topic=None, limit=1.0,
                          temperature=temperatures[2], predicted_chain={"tier_agreement_lower": [0.99, None]},
                          **common)]
    x = np.concatenate([trained.unseen[:150], 1.0 - trained.unseen[150:300]])
    async with serving(kafka, configs, [KerasEngine(m) for m in trained.models]) as apps:
        await produce(kafka, names["in"], [wire.encode_tensor(x[i:i + 30]) for i in range(0, 300, 30)])
        top = apps[2].tier
        await wait_until(lambda: top.stats.shadow_outcomes == 300, timeout=30, what="300 shadow outcomes")
        metrics = generate_latest(top.metrics.registry).decode()
        live = top.status()["live"]["0"]
    print(f"\nlive agreement of the edge on plain and inverted inputs: {live}")
    assert live["n"] == 300 and live["drift"] is True, live
    assert 'tierflow_live_drift{inference="77",tier="0"} 1.0' in metrics
    assert 'tierflow_live_agreement_predicted_lower{inference="77",tier="0"} 0.99' in metrics
    # The client got the edge's answers only; the fog passed every shadow sample up.
    assert [a.tier.stats.answered for a in apps] == [300, 0, 0] and apps[1].tier.stats.shadow_passed == 300
