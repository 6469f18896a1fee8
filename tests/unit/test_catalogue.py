"""Unit tests of `tierflow.streams.catalogue`: the field parsers the API and the decider share, and the
event upcasting chain. Every rejection must name its field and carry the code the API answers with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from tierflow.streams.catalogue import (
    CODE_COMMANDS,
    CODE_MAX,
    COMMAND_EVENTS,
    DEFAULT_LOSS,
    DEFAULT_OPTIMIZER,
    EVAL_OPTION_KEYS,
    EVENT_TYPES,
    EVENT_VERSIONS,
    FIT_OPTION_KEYS,
    MAX_RANGES,
    NAME_MAX,
    Invalid,
    event_version,
    expected_version,
    name_field,
    opt_id,
    parse_deployment,
    parse_model,
    parse_model_ids,
    parse_ranges_used,
    req_id,
    topic_name,
    upcasters,
)
from tierflow.streams.envelope import JSON, EnvelopeError, decode_event, event_id_for


def invalid(fn: Any, *args: Any, **kwargs: Any) -> Invalid:
    """Call a parser that must reject its input; return the rejection for inspection."""
    with pytest.raises(Invalid) as err:
        fn(*args, **kwargs)
    return err.value


def deployment(**fields: Any) -> JSON:
    return {"configuration_id": 1} | fields


# -- the catalogue itself ------------------------------------------------------------------------------

def test_every_command_names_one_catalogued_event() -> None:
    assert set(COMMAND_EVENTS.values()) <= EVENT_TYPES
    assert "CommandRejected" in EVENT_TYPES
    # Model code is validated in the sandbox for exactly the two commands that carry it.
    assert sorted(CODE_COMMANDS) == ["RegisterModel", "UpdateModel"]
    assert CODE_COMMANDS.issubset(COMMAND_EVENTS)


def test_an_invalid_field_serialises_as_code_message_field() -> None:
    exc = Invalid("'batch' must be an integer >= 1, got 0", "batch")
    assert exc.to_json() == {"code": "invalid", "message": "'batch' must be an integer >= 1, got 0", "field": "batch"}
    assert str(exc) == exc.message
    assert Invalid("x", "id", "not_found").to_json()["code"] == "not_found"


# -- ids and versions ----------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [0, -1, True, "1", 1.0, [1]])
def test_an_id_must_be_a_positive_integer(value: Any) -> None:
    err = invalid(req_id, {"id": value}, "id")
    assert (err.field, err.code) == ("id", "invalid")
    assert "positive integer id" in err.message


def test_a_required_id_names_itself_when_missing() -> None:
    err = invalid(req_id, {}, "configuration_id")
    assert (err.field, err.message) == ("configuration_id", "'configuration_id' is required")
    assert req_id({"id": 7}, "id") == 7


def test_an_optional_id_may_be_absent_or_null() -> None:
    assert opt_id({}, "upper_id") is None
    assert opt_id({"upper_id": None}, "upper_id") is None
    assert opt_id({"upper_id": 3}, "upper_id") == 3
    assert invalid(opt_id, {"upper_id": "3"}, "upper_id").field == "upper_id"


def test_expected_version_is_optional_and_positive() -> None:
    assert expected_version({}) is None
    assert expected_version({"expected_version": None}) is None
    assert expected_version({"expected_version": 4}) == 4


@pytest.mark.parametrize("value", [0, -2, True, False, "1", 1.5])
def test_a_bad_expected_version_names_the_field(value: Any) -> None:
    err = invalid(expected_version, {"expected_version": value})
    assert (err.field, err.code) == ("expected_version", "invalid")


# -- names ---------------------------------------------------------------------------------------------

def test_names_are_stripped_and_may_be_64_characters() -> None:
    assert name_field({"name": "  edge  "}) == "edge"
    assert name_field({"name": "n" * NAME_MAX}) == "n" * NAME_MAX
    assert NAME_MAX == 64


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({}, "'name' is required"),
        ({"name": None}, "'name' is required"),
        ({"name": 5}, "'name' must be a string"),
        ({"name": ""}, "must be 1 to 64 characters (got 0)"),
        ({"name": "   "}, "must be 1 to 64 characters (got 0)"),
        ({"name": "n" * 65}, "must be 1 to 64 characters (got 65)"),
    ],
    ids=["missing", "null", "int", "empty", "blank", "too-long"],
)
def test_a_bad_name_is_rejected_naming_the_field(payload: JSON, fragment: str) -> None:
    err = invalid(name_field, payload)
    assert (err.field, err.code) == ("name", "invalid")
    assert fragment in err.message


def test_an_optional_name_may_be_absent_but_not_wrong() -> None:
    assert name_field({}, required=False) is None
    err = invalid(name_field, {"title": ""}, "title", required=False)
    assert err.field == "title"


# -- models --------------------------------------------------------------------------------------------

def test_a_full_model_gets_defaults() -> None:
    f = parse_model({"name": " edge ", "code": "model = 1"}, partial=False)
    assert (f.name, f.code, f.description, f.imports) == ("edge", "model = 1", "", "")
    assert (f.distributed, f.upper_id, f.upper_id_given) == (False, None, False)


def test_a_distributed_model_names_its_upper() -> None:
    f = parse_model({"name": "fog", "code": "c", "distributed": True, "upper_id": 1}, partial=False)
    assert (f.distributed, f.upper_id, f.upper_id_given) == (True, 1, True)


def test_a_partial_model_leaves_unset_fields_none() -> None:
    # An update changes only what it names; "upper_id": null is a request to drop the link.
    f = parse_model({}, partial=True)
    assert (f.name, f.code, f.description, f.imports, f.distributed, f.upper_id_given) == (
        None, None, None, None, None, False)
    dropped = parse_model({"upper_id": None}, partial=True)
    assert (dropped.upper_id, dropped.upper_id_given) == (None, True)


@pytest.mark.parametrize(
    ("payload", "partial", "field", "fragment"),
    [
        ([], False, None, "the body must be a JSON object"),
        ("{}", True, None, "the body must be a JSON object"),
        ({"name": "m"}, False, "code", "'code' is required"),
        ({"name": "m", "code": "  \n"}, False, "code", "'code' is required"),
        ({"code": " "}, True, "code", "'code' must not be empty"),
        ({"name": "m", "code": 3}, False, "code", "'code' must be a string"),
        ({"name": "m", "code": "c" * (CODE_MAX + 1)}, False, "code", "longer than"),
        ({"code": "c"}, False, "name", "'name' is required"),
        ({"name": "n" * 65, "code": "c"}, False, "name", "1 to 64"),
        ({"name": "m", "code": "c", "distributed": "yes"}, False, "distributed", "true or false"),
        ({"name": "m", "code": "c", "upper_id": 0}, False, "upper_id", "positive integer id"),
        ({"name": "m", "code": "c", "upper_id": True}, False, "upper_id", "positive integer id"),
        ({"name": "m", "code": "c", "description": 1}, False, "description", "must be a string"),
        ({"name": "m", "code": "c", "imports": ["numpy"]}, False, "imports", "must be a string"),
    ],
    ids=["list-body", "string-body", "no-code", "blank-code", "blank-code-partial", "int-code", "huge-code",
         "no-name", "long-name", "text-distributed", "zero-upper", "bool-upper", "int-description",
         "list-imports"],
)
def test_a_bad_model_is_rejected_naming_the_field(payload: Any, partial: bool, field: str | None,
                                                  fragment: str) -> None:
    err = invalid(parse_model, payload, partial=partial)
    assert (err.field, err.code) == (field, "invalid")
    assert fragment in err.message


# -- configurations ------------------------------------------------------------------------------------

def test_model_ids_keep_their_order_without_duplicates() -> None:
    assert parse_model_ids({"model_ids": [3, 1, 3, 2, 1]}, required=True) == [3, 1, 2]
    assert parse_model_ids({}, required=False) is None


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({}, "'model_ids' is required"),
        ({"model_ids": []}, "non-empty list"),
        ({"model_ids": 1}, "non-empty list"),
        ({"model_ids": "1,2"}, "non-empty list"),
        ({"model_ids": [1, 0]}, "positive integer id"),
        ({"model_ids": [1, "2"]}, "positive integer id"),
        ({"model_ids": [True]}, "positive integer id"),
    ],
    ids=["missing", "empty", "int", "string", "zero", "text-id", "bool-id"],
)
def test_bad_model_ids_are_rejected_naming_the_field(payload: JSON, fragment: str) -> None:
    err = invalid(parse_model_ids, payload, required=True)
    assert (err.field, err.code) == ("model_ids", "invalid")
    assert fragment in err.message


# -- deployments ---------------------------------------------------------------------------------------

def test_a_minimal_deployment_gets_kafka_ml_defaults() -> None:
    f = parse_deployment({"configuration_id": 4})
    assert f.to_json() == {
        "configuration_id": 4, "batch": 32, "fit_options": {}, "eval_options": {},
        "optimizer": DEFAULT_OPTIMIZER, "learning_rate": None, "loss": DEFAULT_LOSS,
        "metrics": ["accuracy"], "loss_weights": None,
    }


def test_a_full_deployment_is_kept_as_given() -> None:
    f = parse_deployment(deployment(
        batch=64, optimizer="SGD", learning_rate=1, loss="mse", metrics="mae",
        fit_options={"epochs": 5, "shuffle": False, "initial_epoch": 0, "class_weight": {"0": 1, "1": 2.5},
                     "verbose": 2},
        eval_options={"steps": 3, "verbose": 0},
    ))
    # The optimizer is normalised; a single metric becomes a list; the learning rate a float.
    assert (f.batch, f.optimizer, f.learning_rate, f.loss, f.metrics) == (64, "sgd", 1.0, "mse", ["mae"])
    assert f.fit_options["epochs"] == 5
    assert f.eval_options == {"steps": 3, "verbose": 0}
    assert isinstance(f.learning_rate, float)


def test_a_seed_is_kept_when_asked_for_and_absent_otherwise() -> None:
    # Absent, not null: an unseeded deployment's event is the one it was before seeds could be asked for.
    assert "seed" not in parse_deployment(deployment()).to_json()
    assert parse_deployment(deployment(seed=None)).seed is None
    assert parse_deployment(deployment(seed=7)).to_json()["seed"] == 7
    assert parse_deployment(deployment(seed=0)).seed == 0
    assert parse_deployment(deployment(seed=2**31 - 1)).seed == 2**31 - 1


@pytest.mark.parametrize("seed", [-1, 2**31, 1.5, "7", True, [7]])
def test_a_seed_that_is_not_a_31_bit_integer_is_rejected(seed: Any) -> None:
    err = invalid(parse_deployment, deployment(seed=seed))
    assert err.field == "seed"
    assert "[0, 2147483648)" in err.message


def test_options_are_copied_not_shared() -> None:
    opts = {"epochs": 2}
    f = parse_deployment(deployment(fit_options=opts))
    f.fit_options["epochs"] = 9
    assert opts == {"epochs": 2}


@pytest.mark.parametrize("key", ["x", "y", "batch_size", "callbacks", "validation_data"])
def test_fit_options_tierflow_owns_are_rejected(key: str) -> None:
    # tierflow feeds the data and the batches itself: these keys never reach Keras.
    err = invalid(parse_deployment, deployment(fit_options={"epochs": 1, key: 1}))
    assert (err.field, err.code) == (f"fit_options.{key}", "invalid")
    assert "does not pass to Keras" in err.message
    assert "allowed: " + ", ".join(sorted(FIT_OPTION_KEYS)) in err.message


def test_eval_options_allow_only_steps_and_verbose() -> None:
    assert sorted(EVAL_OPTION_KEYS) == ["steps", "verbose"]
    err = invalid(parse_deployment, deployment(eval_options={"epochs": 3}))
    assert err.field == "eval_options.epochs"
    err = invalid(parse_deployment, deployment(eval_options={"x": 1, "callbacks": []}))
    # The first unknown key (sorted) names the field; the message lists them all.
    assert err.field == "eval_options.callbacks"
    assert "callbacks, x" in err.message


@pytest.mark.parametrize("name", ["fit_options", "eval_options"])
def test_option_strings_are_never_evaluated(name: str) -> None:
    # Kafka-ML eval()s "epochs=5"-style strings; tierflow refuses them and says why.
    err = invalid(parse_deployment, deployment(**{name: "dict(epochs=5)"}))
    assert err.field == name
    assert "never evaluated" in err.message
    assert '{"epochs": 5}' in err.message


@pytest.mark.parametrize("name", ["fit_options", "eval_options"])
def test_options_must_be_an_object(name: str) -> None:
    err = invalid(parse_deployment, deployment(**{name: [["epochs", 5]]}))
    assert (err.field, err.message) == (name, f"'{name}' must be a JSON object")


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"epochs": 0}, "fit_options.epochs"),
        ({"epochs": True}, "fit_options.epochs"),
        ({"epochs": 2.0}, "fit_options.epochs"),
        ({"initial_epoch": -1}, "fit_options.initial_epoch"),
        ({"steps_per_epoch": 0}, "fit_options.steps_per_epoch"),
        ({"validation_steps": "5"}, "fit_options.validation_steps"),
        ({"validation_freq": 0}, "fit_options.validation_freq"),
        ({"shuffle": "true"}, "fit_options.shuffle"),
        ({"verbose": 3}, "fit_options.verbose"),
        ({"class_weight": [1, 2]}, "fit_options.class_weight"),
        ({"class_weight": {"0": "heavy"}}, "fit_options.class_weight"),
        ({"class_weight": {"0": True}}, "fit_options.class_weight"),
    ],
    ids=["zero-epochs", "bool-epochs", "float-epochs", "negative-initial", "zero-steps", "text-steps",
         "zero-freq", "text-shuffle", "verbose-3", "list-class-weight", "text-weight", "bool-weight"],
)
def test_bad_fit_option_values_name_the_option(options: JSON, field: str) -> None:
    err = invalid(parse_deployment, deployment(fit_options=options))
    assert (err.field, err.code) == (field, "invalid")


def test_eval_steps_must_be_positive() -> None:
    assert invalid(parse_deployment, deployment(eval_options={"steps": 0})).field == "eval_options.steps"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"configuration_id": None}, "configuration_id"),
        ({"configuration_id": "1"}, "configuration_id"),
        ({"configuration_id": 0}, "configuration_id"),
        ({"batch": 0}, "batch"),
        ({"batch": 8.0}, "batch"),
        ({"batch": True}, "batch"),
        ({"batch": "32"}, "batch"),
        ({"optimizer": "lbfgs"}, "optimizer"),
        ({"optimizer": 3}, "optimizer"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"learning_rate": -0.1}, "learning_rate"),
        ({"learning_rate": 10.5}, "learning_rate"),
        ({"learning_rate": "0.1"}, "learning_rate"),
        ({"learning_rate": True}, "learning_rate"),
        ({"loss": "categorical-crossentropy"}, "loss"),
        ({"loss": "__import__('os')"}, "loss"),
        ({"loss": 5}, "loss"),
        ({"metrics": ["accuracy", "top-5"]}, "metrics"),
        ({"metrics": [1]}, "metrics"),
        ({"metrics": {"accuracy": 1}}, "metrics"),
    ],
    ids=["null-conf", "text-conf", "zero-conf", "zero-batch", "float-batch", "bool-batch", "text-batch",
         "unknown-optimizer", "int-optimizer", "zero-lr", "negative-lr", "huge-lr", "text-lr", "bool-lr",
         "dashed-loss", "code-loss", "int-loss", "dashed-metric", "int-metric", "object-metrics"],
)
def test_bad_deployment_fields_are_rejected_naming_the_field(fields: JSON, field: str) -> None:
    err = invalid(parse_deployment, deployment(**fields))
    assert (err.field, err.code) == (field, "invalid")


def test_the_learning_rate_may_be_as_large_as_ten() -> None:
    assert parse_deployment(deployment(learning_rate=10)).learning_rate == 10.0
    assert parse_deployment(deployment(learning_rate=1e-5)).learning_rate == 1e-5


def test_a_deployment_body_must_be_an_object() -> None:
    err = invalid(parse_deployment, [1])
    assert err.field is None


# -- loss weights: one per exit (list) or one per model (object) ---------------------------------------

def test_loss_weights_as_a_list_are_floats_per_exit() -> None:
    assert parse_deployment(deployment(loss_weights=[1, 0.5, 0])).loss_weights == [1.0, 0.5, 0.0]


def test_loss_weights_as_an_object_are_keyed_by_model_id() -> None:
    # JSON keys are strings; they are normalised to canonical id strings.
    f = parse_deployment(deployment(loss_weights={"3": 1, "7": 0.25}))
    assert f.loss_weights == {"3": 1.0, "7": 0.25}
    assert orjson.loads(orjson.dumps(f.to_json()))["loss_weights"] == {"3": 1.0, "7": 0.25}


@pytest.mark.parametrize(
    "weights",
    [[], {}, [1, -1], [1, "2"], [True], {"3": -0.5}, {"3": "1"}, "1,1", 1.0],
    ids=["empty-list", "empty-object", "negative", "text", "bool", "negative-value", "text-value", "string",
         "number"],
)
def test_bad_loss_weights_are_rejected(weights: Any) -> None:
    err = invalid(parse_deployment, deployment(loss_weights=weights))
    assert (err.field, err.code) == ("loss_weights", "invalid")
    assert "one per exit" in err.message


@pytest.mark.parametrize("key", ["edge", "0", "-1", "1.5"])
def test_loss_weight_keys_must_be_model_ids(key: str) -> None:
    err = invalid(parse_deployment, deployment(loss_weights={key: 1}))
    assert err.field == "loss_weights"
    assert f"keys must be model ids, got {key!r}" in err.message


def test_two_spellings_of_one_model_id_are_not_silently_merged() -> None:
    with pytest.raises(Invalid) as err:
        parse_deployment(deployment(loss_weights={"1": 1, "01": 2}))
    assert err.value.field == "loss_weights"


@pytest.mark.parametrize(("field", "value"), [("optimizer", False), ("optimizer", 0), ("optimizer", []),
                                              ("loss", False), ("loss", 0), ("loss", {})])
def test_a_falsy_non_string_optimizer_or_loss_is_rejected(field: str, value: Any) -> None:
    err = invalid(parse_deployment, deployment(**{field: value}))
    assert err.field == field


# -- upcasters -----------------------------------------------------------------------------------------

def test_the_upcasters_reach_the_version_the_decider_writes() -> None:
    # CommandRejected v2 (reason as an object), DatasourceAnnounced v2 (announced and used ranges),
    # TrainingResultReported v2 (exits), InferenceRequested v2 (what each tier compares); every other event is v1.
    ups = upcasters()
    assert EVENT_VERSIONS == {"CommandRejected": 2, "DatasourceAnnounced": 2, "TrainingResultReported": 2,
                              "InferenceRequested": 2}
    for event_type in [*COMMAND_EVENTS.values(), "CommandRejected"]:
        assert ups.current(event_type) == event_version(event_type) == EVENT_VERSIONS.get(event_type, 1)


def test_a_v1_datasource_used_its_ranges_as_announced() -> None:
    # v1 recorded the announced ranges only (and training read them as they were): used = announced, no reason.
    ranges = [{"topic": "t", "partition": 0, "start": 0, "end": 9}]
    v1 = {"id": 1, "deployment_id": 2, "ranges": ranges, "input_format": "RAW", "warnings": ["w"]}
    version, payload = upcasters().upcast("DatasourceAnnounced", 1, v1)
    assert version == 2
    assert payload == v1 | {"announced_ranges": ranges, "range_reasons": []}
    # The oldest v1 events had no warnings either.
    assert upcasters().upcast("DatasourceAnnounced", 1, {"ranges": ranges})[1]["warnings"] == []


def test_a_v1_rejection_reason_becomes_an_object() -> None:
    # v1 wrote the reason as a plain string; readers of v2 expect {code, message, field}.
    v1 = {"command_id": "c", "command_type": "DeleteModel", "reason": "model 3 does not exist"}
    version, payload = upcasters().upcast("CommandRejected", 1, v1)
    assert version == 2
    assert payload["reason"] == {"code": "invalid", "message": "model 3 does not exist", "field": None}
    assert payload["command_type"] == "DeleteModel"
    # The event as stored is untouched.
    assert v1["reason"] == "model 3 does not exist"


def test_a_v2_rejection_passes_unchanged() -> None:
    v2 = {"command_id": "c", "reason": {"code": "conflict", "message": "m", "field": "id"}}
    assert upcasters().upcast("CommandRejected", 2, v2) == (2, v2)


def test_a_v1_rejection_whose_reason_is_already_an_object_is_kept() -> None:
    reason = {"code": "not_found", "message": "m", "field": "id"}
    assert upcasters().upcast("CommandRejected", 1, {"reason": reason}) == (2, {"reason": reason})


def test_reading_a_v1_rejection_from_the_log_upcasts_it() -> None:
    record = orjson.dumps({
        "id": event_id_for("c"), "seq": 3, "type": "CommandRejected", "version": 1, "aggregate": "command:c",
        "aggregate_version": 1, "command_id": "c", "occurred_at": "t", "payload": {"reason": "bad"},
    })
    event = decode_event(record, upcasters())
    assert event.version == 2
    assert event.payload["reason"]["message"] == "bad"


def test_a_rejection_from_a_newer_tierflow_is_refused() -> None:
    with pytest.raises(EnvelopeError, match="newer"):
        upcasters().upcast("CommandRejected", 3, {})


# -- topic names ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [None, "", "   ", "a b", "tab\there", "x" * 250, 7])
def test_a_topic_name_is_1_to_249_characters_without_spaces(bad: Any) -> None:
    err = invalid(topic_name, bad, "output_topic")
    assert (err.field, err.code) == ("output_topic", "invalid")
    assert "Kafka topic name" in err.message


def test_a_topic_name_may_be_absent_where_it_is_optional() -> None:
    assert topic_name(None, "tiers[0].upper_topic", required=False) is None
    assert topic_name("x" * 249, "input_topic") == "x" * 249


def test_topic_names_are_checked_in_one_place() -> None:
    # The API and the decider both call topic_name; a second check (the API's used to be looser) would drift.
    root = Path(__file__).resolve().parents[2]
    sources = [p for name in ("streams", "api", "projections", "tiers", "deploy") for p in (root / name).rglob("*.py")]
    checking = sorted(str(p.relative_to(root)) for p in sources if "a Kafka topic name" in p.read_text())
    assert checking == ["streams/catalogue.py"]


# -- datasource ranges: announced and used ---------------------------------------------------------------

def rng(start: int, end: int, partition: int = 0, topic: str = "t") -> JSON:
    return {"topic": topic, "partition": partition, "start": start, "end": end}


def test_ranges_without_an_announcement_of_their_own_are_used_as_announced() -> None:
    assert parse_ranges_used({"ranges": [rng(0, 9)]}) == {
        "ranges": [rng(0, 9)], "announced_ranges": [rng(0, 9)], "range_reasons": [], "warnings": []}


def test_used_ranges_that_moved_forward_with_a_reason_are_recorded_beside_the_announced_ones() -> None:
    fields = parse_ranges_used({"ranges": [rng(3, 12), rng(0, 5, 1)], "announced_ranges": [rng(1, 10), rng(0, 5, 1)],
                                "range_reasons": ["t[0]: start 1 -> 3: ...", "t[0]: end 10 -> 12: ..."],
                                "warnings": ["t[1]: 2 records after offset 4 ..."]})
    assert fields["ranges"] == [rng(3, 12), rng(0, 5, 1)]
    assert fields["announced_ranges"] == [rng(1, 10), rng(0, 5, 1)]
    assert len(fields["range_reasons"]) == 2 and len(fields["warnings"]) == 1


@pytest.mark.parametrize(("payload", "field", "message"), [
    ({"ranges": [rng(0, 12)], "announced_ranges": [rng(0, 10)]}, "range_reasons", "without a reason"),
    ({"ranges": [rng(0, 9)], "announced_ranges": [rng(0, 9), rng(0, 9, 1)], "range_reasons": ["r"]},
     "announced_ranges", "each used range is one announced range"),
    ({"ranges": [rng(0, 9, 1)], "announced_ranges": [rng(0, 9)], "range_reasons": ["r"]}, "ranges[0]",
     "reads the partition announced"),
    ({"ranges": [rng(0, 9, 0, "u")], "announced_ranges": [rng(0, 9)], "range_reasons": ["r"]}, "ranges[0]",
     "reads the partition announced"),
    ({"ranges": [rng(0, 8)], "announced_ranges": [rng(0, 9)], "range_reasons": ["r"]}, "ranges[0]",
     "only moves its ends forward"),
    ({"ranges": [rng(0, 9)], "announced_ranges": [rng(1, 9)], "range_reasons": ["r"]}, "ranges[0]",
     "only moves its ends forward"),
    ({"ranges": [rng(0, 9)], "announced_ranges": [{"topic": "t"}]}, "announced_ranges", "must list"),
    ({"ranges": [rng(0, 9)], "range_reasons": "moved"}, "range_reasons", "list of strings"),
    ({"ranges": [rng(0, 9)], "warnings": [3]}, "warnings", "list of strings"),
    ({"ranges": [rng(0, 9)] * (MAX_RANGES + 1)}, "ranges", f"at most {MAX_RANGES}"),
    ({"ranges": [rng(0, 9)], "announced_ranges": [rng(0, 9, 0, "tierflow.events")]}, "announced_ranges[0].topic",
     "reserved"),
])
def test_used_ranges_must_match_the_announced_ones(payload: JSON, field: str, message: str) -> None:
    err = invalid(parse_ranges_used, payload)
    assert err.field == field and message in err.message, err.to_json()
