"""Joint training of the thesis chain (edge -> fog -> cloud) and a single model, with TensorFlow; no broker.

The Kafka-ML style snippets in tests/fixtures/kafka_ml_models run unchanged. The data is the scikit-learn
digits resized to 28x28 and scaled to float32 in [0, 1] (on raw 0..16 values the chain stays far below
the bar). One module-scoped fixture trains the chain and the single model once (5 epochs, batch 64) and
the tests read what it produced: the CI box has 2 cores. `run_training` is driven end to end through the
fakes of tests/unit/test_training_plan.py; its HTTP adapter runs against a small aiohttp server.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.unit.test_training_plan import SETTINGS, FakeLoader, FakeReporter, datasource, deployment_api
from tierflow.streams.catalogue import parse_result_exits
from tierflow.streams.errors import TemporaryError
from tierflow.tiers import training
from tierflow.tiers.data import InputConfig, decode_raw
from tierflow.tiers.datasets import load_digits
from tierflow.tiers.keras_code import build_model
from tierflow.tiers.train_io import ApiNotFound, HttpTrainingApi
from tierflow.tiers.train_job import run_training
from tierflow.tiers.train_sandbox import train_in_sandbox
from tierflow.tiers.training import Metrics, TrainingOptions

JSON = dict[str, Any]
CHAIN = ("edge", "fog", "cloud")

pytestmark = [
    # TF 2.21 still ships tf.lite.Interpreter (ai-edge-litert is not installed here) and warns on each use.
    pytest.mark.filterwarnings(r"ignore:\s*Warning. tf\.lite\.Interpreter is deprecated:UserWarning"),
]


@dataclass
class RecordingProgress:
    calls: list[tuple[int, int, list[Metrics]]] = field(default_factory=list)

    def progress(self, epoch: int, epochs: int, metrics: list[Metrics]) -> None:
        self.calls.append((epoch, epochs, metrics))


@dataclass
class Trained:
    chain: list[Any]
    single: Any
    chain_results: list[JSON]
    single_results: list[JSON]
    progress: RecordingProgress
    x: np.ndarray[Any, Any]
    y: np.ndarray[Any, Any]
    seconds: float


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """The 1797 scikit-learn digits as `tierflow send --dataset digits` sends them (float32 28x28 in [0, 1]),
    sorted by label as a reader that reads partitions keyed by label would hand them over."""
    data = load_digits()
    order = np.argsort(data.y, kind="stable")
    return data.x[order], data.y[order]


@pytest.fixture(scope="module")
def trained(snippets: dict[str, str], digits: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]) -> Trained:
    x, y = digits
    options = TrainingOptions(batch=64, fit_options={"epochs": 5}, validation_rate=0.1, test_rate=0.1, seed=1,
                              exit_keys=[1, 2, 3])
    started = time.monotonic()
    chain = [build_model(snippets[name]) for name in CHAIN]
    progress = RecordingProgress()
    chain_results = training.train(chain, x, y, options, progress)
    single = build_model(snippets["single"])
    single_results = training.train([single], x, y, TrainingOptions(
        batch=64, fit_options={"epochs": 5}, validation_rate=0.1, test_rate=0.1, seed=1, exit_keys=[4]),
        RecordingProgress())
    seconds = time.monotonic() - started
    print(f"\ntrained chain + single in {seconds:.1f} s; test accuracy per exit: "
          f"{[round(r['test']['accuracy'], 3) for r in chain_results]} + {single_results[0]['test']['accuracy']:.3f}")
    return Trained(chain, single, chain_results, single_results, progress, x, y, seconds)


# -- joint training ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_exit_of_the_chain_and_the_single_model_learns_the_digits(trained: Trained) -> None:
    accuracies = [r["test"]["accuracy"] for r in trained.chain_results + trained.single_results]

    assert len(accuracies) == 4
    assert min(accuracies) >= 0.8, accuracies


@pytest.mark.slow
def test_each_exit_reports_train_validation_and_test_metrics(trained: Trained) -> None:
    for result in trained.chain_results + trained.single_results:
        assert set(result) == {"train", "validation", "test"}
        for part in result.values():
            assert set(part) == {"loss", "accuracy"}


@pytest.mark.slow
def test_progress_is_reported_after_every_epoch_for_every_exit(trained: Trained) -> None:
    assert [(epoch, epochs) for epoch, epochs, _ in trained.progress.calls] == [(e, 5) for e in range(1, 6)]
    for _, _, per_exit in trained.progress.calls:
        assert len(per_exit) == 3
        for metrics in per_exit:
            assert set(metrics) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    last = trained.progress.calls[-1][2]
    assert [m["accuracy"] for m in last] == [r["train"]["accuracy"] for r in trained.chain_results]


@pytest.mark.slow
def test_a_sub_model_output_shapes_match_the_chain(trained: Trained) -> None:
    # Each trained sub-model still runs alone, as a tier agent will run it.
    edge, fog, cloud = trained.chain
    tensor, edge_probs = edge(trained.x[:4, ..., None])
    fog_tensor, fog_probs = fog(tensor)
    cloud_probs = cloud(fog_tensor)

    assert [p.shape for p in (edge_probs, fog_probs, cloud_probs)] == [(4, 10)] * 3


# -- artefacts -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_keras_artefacts_reload_with_identical_outputs(trained: Trained) -> None:
    sample = trained.x[:16]
    for model in [*trained.chain, trained.single]:
        inputs = sample
        if model is not trained.chain[0] and model is not trained.single:
            inputs = trained.chain[0](sample[..., None])[0].numpy()  # fog and cloud take a 64-wide tensor
        artefact = training.export_keras(model)
        reloaded = training.load_keras(artefact.data)

        assert artefact.format == "keras" and artefact.data[:4] == b"PK\x03\x04"  # a .keras zip, not HDF5
        assert artefact.sha256 == training.sha256_hex(artefact.data)
        want, got = _outputs(model, inputs), _outputs(reloaded, inputs)
        assert len(want) == len(got)
        for a, b in zip(want, got, strict=True):
            assert np.array_equal(a, b)


@pytest.mark.slow
def test_tflite_exports_of_every_sub_model_match_keras(trained: Trained) -> None:
    import tensorflow as tf

    edge, fog, cloud = trained.chain
    batch = trained.x[:8, ..., None]
    fog_in = edge(batch)[0].numpy()
    for model, inputs in ((edge, batch), (fog, fog_in), (cloud, fog(fog_in)[0].numpy())):
        started = time.monotonic()
        artefact = training.export_tflite(model)
        seconds = time.monotonic() - started
        print(f"\n{model.name}: LiteRT {artefact.size / 1e6:.2f} MB in {seconds:.2f} s")
        interpreter = tf.lite.Interpreter(model_content=artefact.data)
        [inp] = interpreter.get_input_details()
        interpreter.resize_tensor_input(inp["index"], inputs.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(inp["index"], inputs.astype(np.float32))
        interpreter.invoke()
        # Output tensor names do not follow the Keras output order: match them by shape.
        lite = {tuple(o["shape"]): interpreter.get_tensor(o["index"]) for o in interpreter.get_output_details()}
        # LiteRT's kernels sum in another order than oneDNN's: probabilities agree within 1e-5, and the
        # forwarded tensor (values up to ~15) within 1e-5 relative.
        for expected in _outputs(model, inputs):
            np.testing.assert_allclose(lite[expected.shape], expected, rtol=1e-5, atol=1e-5)


def _outputs(model: Any, inputs: np.ndarray[Any, Any]) -> list[np.ndarray[Any, Any]]:
    out = model(inputs, training=False)
    return [np.asarray(o) for o in (out if isinstance(out, list | tuple) else [out])]


# -- the workload, end to end with fake adapters -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("isolation", ["bwrap", "landlock"])
async def test_run_training_trains_uploads_and_reports_every_result(
        snippets: dict[str, str], digits: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]], isolation: str) -> None:
    # The model code runs in the sandboxed trainer, at both levels that isolate it.
    api = deployment_api({name: snippets[name] for name in CHAIN}, fit_options={"epochs": 2},
                         loss_weights={"1": 1.0, "2": 0.5, "3": 0.5})
    api.datasource_items.append(datasource())
    reporter = FakeReporter()
    x, y = digits
    settings = replace(SETTINGS, sandbox=replace(SETTINGS.sandbox, isolation=isolation))

    code = await run_training(settings, 4, [13, 12, 11], api=api, reporter=reporter,
                              data_loader=FakeLoader(x, y), seed=5)

    assert code == 0
    assert [kind for kind, _ in reporter.sent] == (["ReportTrainingStarted"] + ["ReportTrainingProgress"] * 2
                                                   + ["ReportTrainingResult"] * 3)
    [started] = reporter.of_type("ReportTrainingStarted")
    assert started == {"deployment_id": 4, "result_ids": [11, 12, 13], "seed": 5,
                       "samples": {"train": 1437, "validation": 180, "test": 180,
                                   "classes": {"train": 10, "validation": 10, "test": 10}}}
    progress = reporter.of_type("ReportTrainingProgress")
    assert [p["epoch"] for p in progress] == [1, 2]
    assert all(set(p["metrics"]) == {"11", "12", "13"} for p in progress)
    reports = reporter.of_type("ReportTrainingResult")
    assert [r["result_id"] for r in reports] == [11, 12, 13]
    assert [sorted(r["artefacts"]) for r in reports] == [["keras", "tflite"]] * 3
    for report in reports:
        assert set(report["metrics"]) == {"train", "validation", "test"}
        for kind, ref in report["artefacts"].items():
            data = api.artefacts[ref["sha256"]]
            assert ref["size"] == len(data)
            assert data[:4] == (b"PK\x03\x04" if kind == "keras" else data[:4])
            assert ref.get("format") == ("keras" if kind == "keras" else None)
    cloud = training.load_keras(api.artefacts[reports[2]["artefacts"]["keras"]["sha256"]])
    assert cloud.output_shape == (None, 10)
    # Each result reports its exit's calibration (fitted on the 180 validation samples, measured on the 180
    # test ones) and its sub-model's compute; the top result carries the chain's frontier, as the decider wants.
    exits = [r["exits"] for r in reports]
    assert [parse_result_exits(e) for e in exits] == exits
    assert [(e["calibration"]["n_fit"], e["calibration"]["n_measured"]) for e in exits] == [(180, 180)] * 3
    assert all(e["cost_s"] > 0 for e in exits)
    assert [e["frontier"] is None for e in exits] == [True, True, False]
    assert list(exits[2]["frontier"]["temperatures"]) == [e["temperature"] for e in exits]


@pytest.mark.slow
async def test_two_trainings_with_the_deployment_s_seed_give_the_same_metrics_and_weights(
        snippets: dict[str, str], digits: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]) -> None:
    # The deployment's seed decides the split, the initial weights (the model code is built after seeding),
    # shuffling and dropout (the cloud has a Dropout layer), and TensorFlow runs its deterministic kernels: the
    # same data trains to the same chain, bit for bit, however the two cores schedule the trainer's threads.
    runs = []
    for _ in range(2):
        api = deployment_api({name: snippets[name] for name in CHAIN}, fit_options={"epochs": 2}, seed=11)
        api.datasource_items.append(datasource())
        reporter = FakeReporter()
        assert await run_training(SETTINGS, 4, [11, 12, 13], api=api, reporter=reporter,
                                  data_loader=FakeLoader(*digits)) == 0
        runs.append((api, reporter))

    (first_api, first), (second_api, second) = runs
    assert [r["seed"] for r in first.of_type("ReportTrainingStarted") + second.of_type("ReportTrainingStarted")] \
        == [11, 11]
    assert first.of_type("ReportTrainingProgress") == second.of_type("ReportTrainingProgress")
    reports = list(zip(first.of_type("ReportTrainingResult"), second.of_type("ReportTrainingResult"), strict=True))
    assert len(reports) == 3
    for one, other in reports:
        assert one["metrics"] == other["metrics"]
        weights = [training.load_keras(api.artefacts[report["artefacts"]["keras"]["sha256"]]).get_weights()
                   for api, report in ((first_api, one), (second_api, other))]
        assert [w.shape for w in weights[0]] == [w.shape for w in weights[1]]
        assert all(np.array_equal(a, b) for a, b in zip(*weights, strict=True))
        assert one["artefacts"]["tflite"] == other["artefacts"]["tflite"]
        # The same validation and test probabilities: the same temperatures and calibration (the frontier's
        # costs are measured CPU times, so its record is not compared).
        assert (one["exits"]["temperature"], one["exits"]["calibration"]) == \
            (other["exits"]["temperature"], other["exits"]["calibration"])


@pytest.mark.slow
async def test_bad_model_code_fails_with_the_line_and_exit_code_2(
        snippets: dict[str, str], digits: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]) -> None:
    broken = snippets["fog"].replace("keras.layers.Dense(64", "keras.layers.Dense(units_typo")
    api = deployment_api({"edge": snippets["edge"], "fog": broken, "cloud": snippets["cloud"]})
    api.datasource_items.append(datasource())
    reporter = FakeReporter()

    code = await run_training(SETTINGS, 4, [11, 12, 13], api=api, reporter=reporter,
                              data_loader=FakeLoader(*digits))

    assert code == 2
    [failure] = reporter.of_type("ReportTrainingFailure")
    assert failure["reason"].startswith("model 'fog' (id 2, version 1): line 3 (")
    assert "NameError: name 'units_typo' is not defined" in failure["reason"]


async def test_records_of_the_wrong_size_fail_with_the_record_and_exit_code_2() -> None:
    # What the reader decodes: RAW uint8 28x28 samples, record 17 one byte short.
    values = [bytes(784)] * 40
    values[17] = bytes(783)
    config = InputConfig.parse(datasource()["input_config"])

    class RawLoader:
        async def load(self, source: JSON) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
            return decode_raw(values, [b"\x01"] * len(values), config)

    api = deployment_api()
    api.datasource_items.append(datasource())
    reporter = FakeReporter()

    code = await run_training(SETTINGS, 4, [11, 12, 13], api=api, reporter=reporter, data_loader=RawLoader())

    assert code == 2
    [failure] = reporter.of_type("ReportTrainingFailure")
    assert "record 17: 783 bytes, expected 784 for uint8 28x28" in failure["reason"]


# -- the HTTP adapter ----------------------------------------------------------------------------------------


async def test_the_http_adapter_reads_uploads_and_polls_the_api() -> None:
    stored: dict[str, bytes] = {}
    polls: dict[str, int] = {}

    async def get_deployment(request: web.Request) -> web.Response:
        if request.match_info["id"] != "4":
            return web.json_response({"error": {"code": "not_found", "message": "deployment 9 not found"}},
                                     status=404)
        return web.json_response({"id": 4, "batch": 64})

    async def list_datasources(request: web.Request) -> web.Response:
        assert request.query["deployment_id"] == "4"
        return web.json_response({"items": [datasource(ident=1), datasource(ident=2)], "total": 2})

    async def put_artefact(request: web.Request) -> web.Response:
        body = await request.read()
        sha = training.sha256_hex(body)
        if request.headers["X-Sha256"] != sha:
            return web.json_response({"error": {"code": "invalid", "message": "sha256 mismatch"}}, status=422)
        stored[sha] = body
        return web.json_response({"sha256": sha, "size": len(body)}, status=201)

    async def get_command(request: web.Request) -> web.Response:
        cid = request.match_info["cid"]
        polls[cid] = polls.get(cid, 0) + 1
        if polls[cid] < 2:
            return web.json_response({"command_id": cid, "status": "pending"}, status=202)
        return web.json_response({"command_id": cid, "status": "accepted"})

    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=503, text="down")

    reports: list[dict[str, Any]] = []

    async def post_report(request: web.Request) -> web.Response:
        reports.append(await request.json())
        if len(reports) == 1:  # the first try is lost: the report is sent again with the same command id
            return web.Response(status=503, text="restarting")
        return web.json_response({"command_id": reports[-1]["command_id"], "status": "pending"}, status=202)

    app = web.Application()
    app.router.add_post("/reports", post_report)
    app.router.add_get("/deployments/{id}", get_deployment)
    app.router.add_get("/datasources", list_datasources)
    app.router.add_put("/artefacts", put_artefact)
    app.router.add_get("/commands/{cid}", get_command)
    app.router.add_get("/results/{id}", broken)
    async with TestServer(app) as server, HttpTrainingApi(str(server.make_url("")), backoff_s=0.01) as api:
        assert (await api.deployment(4))["batch"] == 64
        with pytest.raises(ApiNotFound, match="HTTP 404: deployment 9 not found"):
            await api.deployment(9)
        assert [d["id"] for d in await api.datasources(4)] == [1, 2]
        data = b"trained model bytes"
        assert await api.put_artefact(data, training.sha256_hex(data)) == {"sha256": training.sha256_hex(data),
                                                                             "size": len(data)}
        assert stored[training.sha256_hex(data)] == data
        # Reports go to the API, which vouches for them (the decider accepts none straight from Kafka).
        cid = await api.send("ReportTrainingStarted", {"deployment_id": 4, "result_ids": [11]})
        assert [r["command_id"] for r in reports] == [cid, cid]
        assert reports[-1] == {"type": "ReportTrainingStarted", "command_id": cid,
                               "payload": {"deployment_id": 4, "result_ids": [11]}}
        assert await api.command_outcome("c1") is None
        assert (await api.command_outcome("c1"))["status"] == "accepted"  # type: ignore[index]
        with pytest.raises(TemporaryError, match="HTTP 503"):
            await api.result(1)


@pytest.mark.slow
async def test_the_trainer_hands_the_driver_each_exit_s_probabilities_and_cost(
        snippets: dict[str, str], digits: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]) -> None:
    # What the calibration and frontier record is computed from, in the driver: per exit, its probabilities
    # on the validation and test splits (one row per sample, rows summing to 1), and each sub-model's time
    # per sample.
    x, y = digits
    options = TrainingOptions(batch=64, fit_options={"epochs": 1}, validation_rate=0.1, test_rate=0.2, seed=3,
                              exit_keys=[1, 2, 3])
    _, n_val, n_test = training.split_sizes(len(x), 0.1, 0.2)
    versions = [{"name": name, "model_id": i + 1, "version": 1, "code": snippets[name], "imports": ""}
                for i, name in enumerate(CHAIN)]
    epochs: list[int] = []

    output = await train_in_sandbox(SETTINGS.sandbox, versions, x, y, options, {"validation": n_val, "test": n_test},
                                    lambda epoch, total, metrics: epochs.append(epoch))

    assert epochs == [1]
    assert output.isolation["level"] == "bwrap"
    for split, rows in (("validation", n_val), ("test", n_test)):
        assert [p.shape for p in output.probs[split]] == [(rows, 10)] * 3
        for probs in output.probs[split]:
            np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-4)
    assert len(output.seconds_per_sample) == 3 and all(0 < s < 0.01 for s in output.seconds_per_sample)
    assert [sorted(a) for a in output.artefacts] == [["keras", "tflite"]] * 3
