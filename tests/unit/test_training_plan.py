"""Unit tests for the pure half of the training workload: no TensorFlow, no broker, no HTTP.

Covers the seeded split, the chain order from `upper_id` links, loss weights per exit, the deployment's
options mapped onto Keras arguments, Keras' metric names mapped back to exits, and `run_training`'s
failure paths that end before TensorFlow is needed (driven through the fakes defined here, which
tests/integration/test_training.py reuses).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from tierflow.streams.errors import PermanentError, TemporaryError
from tierflow.streams.settings import Settings
from tierflow.streams.statuses import FINAL_STATUSES, ResultStatus
from tierflow.tiers import train_plan
from tierflow.tiers.data import DataError
from tierflow.tiers.keras_code import ModelCodeError
from tierflow.tiers.train_io import ApiNotFound
from tierflow.tiers.train_job import classify, parse_ids, register, run_cli, run_training
from tierflow.tiers.train_plan import chain_order, describe_progress, latest_datasource, make_plan, progress_payload
from tierflow.tiers.training import (
    Artefact,
    TrainingOptions,
    TrainingSetupError,
    class_sample_weights,
    evaluate_arguments,
    exit_loss_weights,
    fit_arguments,
    metrics_per_exit,
    sha256_hex,
    short_message,
    split,
    split_sizes,
    split_validation,
)

JSON = dict[str, Any]


# -- fakes of the training job's ports (reused by tests/integration/test_training.py) -----------------------


@dataclass
class FakeApi:
    """The API as the training job sees it, in memory. Every command is accepted unless `decide` says not."""

    deployments: dict[int, JSON] = field(default_factory=dict)
    results: dict[int, JSON] = field(default_factory=dict)
    versions: dict[tuple[int, int], JSON] = field(default_factory=dict)
    datasource_items: list[JSON] = field(default_factory=list)
    artefacts: dict[str, bytes] = field(default_factory=dict)
    decide: Callable[[str], JSON | None] = lambda cid: {"command_id": cid, "status": "accepted"}

    async def deployment(self, deployment_id: int) -> JSON:
        if deployment_id not in self.deployments:
            raise ApiNotFound(f"GET /deployments/{deployment_id} answered HTTP 404: deployment not found")
        return self.deployments[deployment_id]

    async def result(self, result_id: int) -> JSON:
        if result_id not in self.results:
            raise ApiNotFound(f"GET /results/{result_id} answered HTTP 404: result not found")
        return self.results[result_id]

    async def model_version(self, model_id: int, version: int) -> JSON:
        return self.versions[(model_id, version)]

    async def datasources(self, deployment_id: int) -> list[JSON]:
        return [d for d in self.datasource_items if d["deployment_id"] == deployment_id]

    async def put_artefact(self, data: bytes, sha256: str) -> JSON:
        assert sha256_hex(data) == sha256
        self.artefacts[sha256] = data
        return {"sha256": sha256, "size": len(data)}

    async def command_outcome(self, command_id: str) -> JSON | None:
        return self.decide(command_id)


@dataclass
class FakeReporter:
    """Records the commands the job produces, in order."""

    sent: list[tuple[str, JSON]] = field(default_factory=list)

    async def send(self, command_type: str, payload: JSON) -> str:
        self.sent.append((command_type, payload))
        return str(uuid.uuid4())

    def of_type(self, command_type: str) -> list[JSON]:
        return [payload for kind, payload in self.sent if kind == command_type]


@dataclass
class FakeLoader:
    """Hands out fixed arrays, or raises what the reader would raise."""

    x: np.ndarray[Any, Any] | None = None
    y: np.ndarray[Any, Any] | None = None
    error: Exception | None = None
    loaded: list[JSON] = field(default_factory=list)

    async def load(self, datasource: JSON) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        self.loaded.append(datasource)
        if self.error is not None:
            raise self.error
        assert self.x is not None and self.y is not None
        return self.x, self.y


def version(model_id: int, name: str, upper_id: int | None, code: str = "", ver: int = 1) -> JSON:
    return {"model_id": model_id, "version": ver, "name": name, "imports": "", "code": code,
            "distributed": upper_id is not None, "upper_id": upper_id}


def deployment_api(codes: dict[str, str] | None = None, *, deployment_id: int = 4, **options: Any) -> FakeApi:
    """Deployment 4 with the chain edge (model 1) -> fog (2) -> cloud (3) as results 11, 12, 13."""
    codes = codes or {}
    chain = [(1, "edge", 2), (2, "fog", 3), (3, "cloud", None)]
    api = FakeApi()
    api.deployments[deployment_id] = {
        "id": deployment_id, "configuration_id": 1, "batch": 64, "fit_options": {"epochs": 1}, "eval_options": {},
        "optimizer": "adam", "learning_rate": None, "loss": "sparse_categorical_crossentropy",
        "metrics": ["accuracy"], "loss_weights": None, "model_versions": {"1": 1, "2": 1, "3": 1},
        "result_ids": [11, 12, 13], **options,
    }
    for mid, name, upper in chain:
        api.results[10 + mid] = {"id": 10 + mid, "deployment_id": deployment_id, "model_id": mid,
                                 "model_version": 1, "status": "deployed"}
        api.versions[(mid, 1)] = version(mid, name, upper, codes.get(name, ""))
    return api


def datasource(deployment_id: int = 4, ident: int = 1, **extra: Any) -> JSON:
    return {"id": ident, "deployment_id": deployment_id, "ranges": [{"topic": "t", "partition": 0, "start": 0,
                                                                     "end": 10}],
            "input_format": "RAW", "input_config": {"data_type": "uint8", "label_type": "uint8",
                                                    "data_reshape": "28 28", "label_reshape": ""},
            "validation_rate": 0.1, "test_rate": 0.1, "total_msg": 10, **extra}


SETTINGS = Settings.from_env({})


# -- the split -------------------------------------------------------------------------------------------------


def test_the_split_is_disjoint_and_covers_every_sample() -> None:
    train, val, test = split(1000, 0.1, 0.2, seed=7)

    assert (len(train), len(val), len(test)) == (700, 100, 200)
    everything = np.concatenate([train, val, test])
    assert sorted(everything.tolist()) == list(range(1000))


def test_the_same_seed_gives_the_same_split_and_another_seed_another() -> None:
    first = split(500, 0.1, 0.1, seed=42)
    again = split(500, 0.1, 0.1, seed=42)
    other = split(500, 0.1, 0.1, seed=43)

    for a, b in zip(first, again, strict=True):
        assert np.array_equal(a, b)
    assert not np.array_equal(first[0], other[0])


def test_data_grouped_by_class_still_gives_every_split_every_class() -> None:
    # Records keyed by label land in partitions by label and are read partition by partition.
    labels = np.repeat(np.arange(10), 180)

    for seed in range(20):
        train, val, test = split(len(labels), 0.1, 0.1, seed)
        for part in (train, val, test):
            assert set(labels[part].tolist()) == set(range(10))


def test_a_positive_rate_always_gets_a_sample_and_zero_gets_none() -> None:
    assert split_sizes(5, 0.01, 0.0) == (4, 1, 0)
    assert split_sizes(10, 0, 0) == (10, 0, 0)


def test_rates_that_leave_nothing_to_train_on_say_so() -> None:
    with pytest.raises(TrainingSetupError, match="leave none to train on"):
        split_sizes(2, 0.5, 0.5)


# -- the chain -------------------------------------------------------------------------------------------------


def test_the_chain_is_ordered_bottom_first_by_upper_links() -> None:
    versions = {3: version(3, "cloud", None), 1: version(1, "edge", 2), 2: version(2, "fog", 3)}

    assert chain_order(versions) == [1, 2, 3]


def test_a_non_distributed_model_is_a_chain_of_one() -> None:
    assert chain_order({9: version(9, "single", None)}) == [9]


def test_a_model_whose_upper_is_not_trained_here_is_refused() -> None:
    with pytest.raises(PermanentError, match="forwards to model 3, which this training job does not train"):
        chain_order({1: version(1, "edge", 2), 2: version(2, "fog", 3)})


def test_two_models_that_are_not_linked_are_not_one_chain() -> None:
    with pytest.raises(PermanentError, match="do not form one chain"):
        chain_order({1: version(1, "a", None), 2: version(2, "b", None)})


def test_two_lower_models_of_one_upper_are_refused() -> None:
    with pytest.raises(PermanentError, match="both forward to model 'cloud'"):
        chain_order({1: version(1, "a", 3), 2: version(2, "b", 3), 3: version(3, "cloud", None)})


def test_upper_links_that_form_a_cycle_are_refused() -> None:
    with pytest.raises(PermanentError, match="cycle"):
        chain_order({1: version(1, "a", 2), 2: version(2, "b", 1)})


def test_the_plan_orders_results_like_their_models() -> None:
    api = deployment_api()
    results = [api.results[13], api.results[11], api.results[12]]
    versions = {mid: v for (mid, _), v in api.versions.items()}

    plan = make_plan(api.deployments[4], results, versions)

    assert plan.result_ids == [11, 12, 13]
    assert plan.model_ids == [1, 2, 3]


def test_the_plan_refuses_a_result_that_already_ended() -> None:
    api = deployment_api()
    api.results[12]["status"] = "finished"
    versions = {mid: v for (mid, _), v in api.versions.items()}

    with pytest.raises(PermanentError, match="result 12 already ended"):
        make_plan(api.deployments[4], list(api.results.values()), versions)


def test_the_plan_ends_where_the_domain_says_a_result_ended() -> None:
    # One definition of "final": the plan refuses exactly the statuses the domain never changes again.
    assert train_plan.FINAL_STATUSES is FINAL_STATUSES
    versions = {mid: v for (mid, _), v in deployment_api().versions.items()}
    for status in ResultStatus:
        api = deployment_api()
        api.results[12]["status"] = str(status)
        if status in FINAL_STATUSES:
            with pytest.raises(PermanentError, match="result 12 already ended"):
                make_plan(api.deployments[4], list(api.results.values()), versions)
        else:
            assert make_plan(api.deployments[4], list(api.results.values()), versions).result_ids == [11, 12, 13]


def test_the_plan_refuses_a_result_of_another_deployment() -> None:
    api = deployment_api()
    api.results[11]["deployment_id"] = 5
    versions = {mid: v for (mid, _), v in api.versions.items()}

    with pytest.raises(PermanentError, match="belongs to deployment 5, not 4"):
        make_plan(api.deployments[4], list(api.results.values()), versions)


# -- loss weights and options ----------------------------------------------------------------------------------


def test_loss_weights_as_a_list_are_one_per_exit() -> None:
    assert exit_loss_weights([1.0, 0.5, 0.25], [1, 2, 3]) == [1.0, 0.5, 0.25]
    assert exit_loss_weights(None, [1, 2, 3]) is None


def test_loss_weights_as_an_object_are_keyed_by_the_exit_key_and_default_to_one() -> None:
    assert exit_loss_weights({"2": 0.3, "3": 2}, [1, 2, 3]) == [1.0, 0.3, 2.0]


def test_a_list_of_the_wrong_length_names_the_exits() -> None:
    with pytest.raises(TrainingSetupError, match=r"gives 2 weight\(s\) but the chain has 3 exits"):
        exit_loss_weights([1, 2], [1, 2, 3])


def test_one_exit_ignores_a_list_sized_for_the_deployments_chains() -> None:
    assert exit_loss_weights([1, 0.5, 0.2], [9]) is None


def test_options_come_from_the_deployment_and_the_datasource() -> None:
    dep = {"batch": 64, "fit_options": {"epochs": 5, "shuffle": False}, "eval_options": {"steps": 3},
           "optimizer": "SGD", "learning_rate": 0.01, "loss": "sparse_categorical_crossentropy",
           "metrics": ["accuracy"], "loss_weights": {"1": 0.5}}

    options = TrainingOptions.from_deployment(dep, datasource(), exit_keys=[1, 2, 3], seed=99)

    assert options.batch == 64 and options.epochs == 5
    assert options.optimizer == "sgd" and options.learning_rate == 0.01
    assert options.validation_rate == 0.1 and options.test_rate == 0.1
    assert options.exit_keys == [1, 2, 3] and options.seed == 99
    assert fit_arguments(options) == {"batch_size": 64, "epochs": 5, "verbose": 0, "shuffle": False}
    assert evaluate_arguments(options) == {"batch_size": 64, "verbose": 0, "steps": 3}


def test_the_seed_is_the_jobs_flag_else_the_deployments_else_drawn() -> None:
    def draw() -> int:
        return 123

    # A seed someone asked for (the job's --seed, else the deployment's) makes the training reproducible; a
    # drawn one is reported as before and buys no deterministic kernels.
    assert train_plan.choose_seed(5, {"seed": 7}, draw) == (5, True)
    assert train_plan.choose_seed(None, {"seed": 7}, draw) == (7, True)
    assert train_plan.choose_seed(None, {"seed": 0}, draw) == (0, True)
    assert train_plan.choose_seed(None, {"seed": None}, draw) == (123, False)
    assert train_plan.choose_seed(None, {}, draw) == (123, False)
    options = TrainingOptions.from_deployment({}, {}, exit_keys=[1], seed=7, deterministic=True)
    assert (options.seed, options.deterministic) == (7, True)
    assert not TrainingOptions.from_deployment({}, {}, exit_keys=[1], seed=7).deterministic


def test_missing_options_take_kafka_mls_defaults() -> None:
    options = TrainingOptions.from_deployment({"id": 1}, {"id": 1}, exit_keys=[1], seed=0)

    assert (options.batch, options.epochs, options.optimizer, options.learning_rate) == (32, 1, "adam", None)
    assert options.loss == "sparse_categorical_crossentropy" and options.metrics == ["accuracy"]
    assert (options.validation_rate, options.test_rate) == (0.0, 0.0)


def test_class_weight_is_not_passed_to_fit_but_becomes_sample_weights() -> None:
    options = TrainingOptions(fit_options={"epochs": 2, "class_weight": {"0": 1.0, "1": 3.0}})

    assert "class_weight" not in fit_arguments(options)
    weights = class_sample_weights(np.array([0, 1, 1, 2]), options.fit_options["class_weight"])
    assert weights is not None and weights.tolist() == [1.0, 3.0, 3.0, 1.0]
    assert class_sample_weights(np.array([0, 1]), None) is None


def test_rates_outside_zero_one_are_refused() -> None:
    with pytest.raises(TrainingSetupError, match=r"validation_rate is 1\.5"):
        TrainingOptions.from_deployment({}, {"validation_rate": 1.5}, exit_keys=[1], seed=0)
    with pytest.raises(TrainingSetupError, match="leave no samples"):
        TrainingOptions.from_deployment({}, {"validation_rate": 0.5, "test_rate": 0.5}, exit_keys=[1], seed=0)


# -- metrics ---------------------------------------------------------------------------------------------------


def test_keras_metric_names_map_back_to_each_exit() -> None:
    logs = {"loss": 3.0, "tierflow_exit_0_loss": 1.0, "tierflow_exit_0_accuracy": 0.5,
            "tierflow_exit_1_loss": 2.0, "val_loss": 4.0, "val_tierflow_exit_1_accuracy": 0.75}

    per_exit = metrics_per_exit(logs, 2)

    assert per_exit == [{"loss": 1.0, "accuracy": 0.5}, {"loss": 2.0, "val_accuracy": 0.75}]


def test_exit_one_does_not_take_the_metrics_of_exit_ten() -> None:
    per_exit = metrics_per_exit({"tierflow_exit_10_loss": 1.0, "tierflow_exit_1_loss": 2.0}, 11)

    assert per_exit[1] == {"loss": 2.0} and per_exit[10] == {"loss": 1.0}


def test_one_exit_keeps_keras_unprefixed_names() -> None:
    assert metrics_per_exit({"loss": 1, "accuracy": 0.5, "val_loss": 2}, 1) == [
        {"loss": 1.0, "accuracy": 0.5, "val_loss": 2.0}]


def test_validation_metrics_split_from_training_metrics() -> None:
    assert split_validation({"loss": 1.0, "val_loss": 2.0, "val_accuracy": 0.5}) == (
        {"loss": 1.0}, {"loss": 2.0, "accuracy": 0.5})


def test_progress_payload_keys_metrics_by_result() -> None:
    api = deployment_api()
    versions = {mid: v for (mid, _), v in api.versions.items()}
    plan = make_plan(api.deployments[4], list(api.results.values()), versions)

    payload = progress_payload(plan, 2, 5, [{"loss": 1.0}, {"loss": 2.0}, {"loss": 3.0}])

    assert payload == {"deployment_id": 4, "result_ids": [11, 12, 13], "epoch": 2, "epochs": 5,
                       "metrics": {"11": {"loss": 1.0}, "12": {"loss": 2.0}, "13": {"loss": 3.0}}}
    assert describe_progress(2, 5, ["edge"], [{"loss": 0.5}]) == "epoch 2/5: edge loss 0.5"


# -- small helpers ---------------------------------------------------------------------------------------------


def test_result_ids_parse_from_a_comma_separated_list() -> None:
    assert parse_ids("7,8, 9") == [7, 8, 9]
    for bad in ("", "a,b", "0"):
        with pytest.raises(argparse.ArgumentTypeError, match="result id"):
            parse_ids(bad)


def test_the_latest_datasource_is_the_one_announced_last() -> None:
    assert latest_datasource([datasource(ident=3), datasource(ident=5), datasource(ident=4)])["id"] == 5  # type: ignore[index]
    assert latest_datasource([]) is None


def test_tensorflow_graph_dumps_are_cut_from_reasons() -> None:
    exc = ValueError("Received a label value of 12 which is outside the valid range of [0, 10).\n\t [[{{node x}}]]")

    assert short_message(exc) == ("ValueError: Received a label value of 12 which is outside the valid range of "
                                  "[0, 10).")


def test_artefact_references_carry_hash_size_and_format() -> None:
    keras_file = Artefact(b"PK\x03\x04...", "keras")

    assert keras_file.describe() == {"sha256": sha256_hex(b"PK\x03\x04..."), "size": 7, "format": "keras"}
    assert set(Artefact(b"tfl3", "tflite").describe()) == {"sha256", "size"}


def test_errors_are_classified_by_what_happens_next() -> None:
    assert isinstance(classify(DataError("record 3: 5 bytes"), "reading"), PermanentError)
    assert isinstance(classify(ModelCodeError("line 1: NameError"), "building"), PermanentError)
    assert isinstance(classify(TrainingSetupError("bad"), "training"), PermanentError)
    temporary = classify(ConnectionError("broker down"), "reading datasource 1")
    assert isinstance(temporary, TemporaryError)
    assert str(temporary) == "reading datasource 1: ConnectionError: broker down"


def test_the_pure_core_imports_without_tensorflow() -> None:
    code = ("import sys, tierflow.tiers.training, tierflow.tiers.train_job; "
            "assert 'tensorflow' not in sys.modules, 'TensorFlow imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_train_subcommand_parses_its_arguments() -> None:
    parser = argparse.ArgumentParser(prog="tierflow")
    register(parser.add_subparsers(dest="command"))

    args = parser.parse_args(["train", "--deployment", "4", "--results", "11,12,13", "--api", "http://api:8080"])

    assert (args.deployment, args.results, args.api, args.seed) == (4, [11, 12, 13], "http://api:8080", None)
    assert args.func is run_cli


def test_the_train_subcommand_needs_an_api_url() -> None:
    parser = argparse.ArgumentParser(prog="tierflow")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--deployment", "4", "--results", "11"])

    assert run_cli(args, SETTINGS) == 2


# -- run_training, up to the point where TensorFlow would start ------------------------------------------------


async def test_bad_records_end_as_an_actionable_failure_with_exit_code_2() -> None:
    api = deployment_api()
    api.datasource_items.append(datasource())
    reporter = FakeReporter()
    loader = FakeLoader(error=DataError("record 17: 783 bytes, expected 784 for uint8 28x28 (topic t, partition "
                                        "0, offset 17)"))

    code = await run_training(SETTINGS, 4, [13, 11, 12], api=api, reporter=reporter, data_loader=loader)

    assert code == 2
    [(kind, payload)] = reporter.sent
    assert kind == "ReportTrainingFailure"
    assert payload["deployment_id"] == 4 and payload["result_ids"] == [11, 12, 13]
    assert "record 17: 783 bytes, expected 784 for uint8 28x28" in payload["reason"]


async def test_an_unknown_deployment_is_a_permanent_failure() -> None:
    reporter = FakeReporter()

    code = await run_training(SETTINGS, 99, [1], api=FakeApi(), reporter=reporter, data_loader=FakeLoader())

    assert code == 2
    assert "deployment not found" in reporter.of_type("ReportTrainingFailure")[0]["reason"]


async def test_no_datasource_before_the_deadline_is_a_temporary_failure_that_says_what_to_do() -> None:
    reporter = FakeReporter()

    code = await run_training(SETTINGS, 4, [11, 12, 13], api=deployment_api(), reporter=reporter,
                              data_loader=FakeLoader(), datasource_timeout_s=0.05, poll_interval_s=0.01)

    assert code == 1
    assert "tierflow send --deployment 4" in reporter.of_type("ReportTrainingFailure")[0]["reason"]


async def test_the_latest_datasource_is_read_once_it_is_announced() -> None:
    api = deployment_api()
    loader = FakeLoader(error=DataError("stop here"))
    polls = 0
    plain = api.datasources

    async def announced_on_third_poll(deployment_id: int) -> list[JSON]:
        nonlocal polls
        polls += 1
        if polls == 3:
            api.datasource_items.extend([datasource(ident=2), datasource(ident=7), datasource(5, ident=9)])
        return await plain(deployment_id)

    api.datasources = announced_on_third_poll  # type: ignore[method-assign]

    await run_training(SETTINGS, 4, [11, 12, 13], api=api, reporter=FakeReporter(), data_loader=loader,
                       poll_interval_s=0.01)

    assert [d["id"] for d in loader.loaded] == [7]


async def test_a_failure_report_without_an_outcome_exits_1() -> None:
    api = deployment_api()
    api.decide = lambda cid: None  # the worker never decides

    code = await run_training(SETTINGS, 4, [11], api=api, reporter=FakeReporter(), data_loader=FakeLoader(),
                              ack_timeout_s=0.05, poll_interval_s=0.01)

    assert code == 1
