"""The resource CLI's pure parts: shapes, tables, key/value views, argument-to-body building, and the
client's settling of 202 answers over a fake transport. No network, no files, no API."""

from __future__ import annotations

import argparse
import json
from typing import Any

import pytest

from tierflow.deploy import cli_resources as cr
from tierflow.deploy.client import (
    ApiClient,
    ApiClientError,
    ApiUnreachable,
    HttpRequest,
    HttpResponse,
    parse_aggregate,
    with_query,
)

EDGE: dict[str, Any] = {
    "id": 3, "name": "edge", "description": "", "imports": "", "code": "edge_model = keras.Model(...)\n",
    "distributed": True, "upper_id": 2, "lower_id": None, "version": 1, "input_shape": [None, 28, 28, 1],
    "output_shapes": [[None, 64], [None, 10]], "params": 309450, "created_at": "2024-05-01T12:00:00.123456Z",
    "updated_at": "2024-05-01T12:00:01Z",
}


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tierflow")
    cr.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(list(argv))


def files(**contents: str) -> cr.Reader:
    def read(path: str) -> str:
        if path not in contents:
            raise cr.UsageError(f"cannot read {path}: No such file or directory")
        return contents[path]

    return read


# --- formatting -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("shape", "text"), [
    ([None, 28, 28, 1], "(28, 28, 1)"),
    ([None, 64], "(64,)"),
    ([None, None, 3], "(None, 3)"),
    ([5, 2], "(5, 2)"),
    ([None], "()"),
    (None, "-"),
])
def test_shapes_drop_the_batch_axis_and_read_as_python_tuples(shape: list[int | None] | None, text: str) -> None:
    assert cr.format_shape(shape) == text


def test_several_outputs_and_timestamps() -> None:
    assert cr.format_shapes([[None, 64], [None, 10]]) == "(64,), (10,)"
    assert cr.format_shapes([]) == "-"
    assert cr.format_time("2024-05-01T12:00:00.123456Z") == "2024-05-01 12:00:00"
    assert cr.format_time(None) == "-"


def test_cells() -> None:
    values: list[Any] = [None, "", True, False, 7, {"epochs": 5}, [], "adam"]
    assert [cr.cell(v) for v in values] == [
        "-", "-", "yes", "no", "7", '{"epochs": 5}', "-", "adam"]
    assert cr.format_count(309450) == "309,450"


def test_table_columns_align_without_trailing_blanks() -> None:
    text = cr.format_table(("ID", "NAME", "X"), [["1", "edge", ""], ["12", "a-long-name", "y"]])
    assert text.splitlines() == [
        "ID  NAME         X",
        "1   edge",
        "12  a-long-name  y",
    ]


def test_models_table() -> None:
    cloud = EDGE | {"id": 1, "name": "cloud", "upper_id": None, "lower_id": 2, "input_shape": [None, 64],
                    "params": 9610}
    lines = cr.render_list(cr.MODELS, {"items": [cloud, EDGE], "total": 2}).splitlines()
    assert lines[0].split() == ["ID", "NAME", "DISTRIBUTED", "UPPER", "LOWER", "VERSION", "PARAMS", "INPUT"]
    assert lines[1].split() == ["1", "cloud", "yes", "-", "2", "1", "9,610", "(64,)"]
    assert lines[2].endswith("(28, 28, 1)")
    # Every column starts at the same place on every line.
    assert lines[0].index("PARAMS") == lines[1].index("9,610") == lines[2].index("309,450")


def test_lists_say_when_empty_or_truncated() -> None:
    assert cr.render_list(cr.RESULTS, {"items": [], "total": 0}) == "no results"
    text = cr.render_list(cr.CONFIGURATIONS, {"items": [{"id": 1, "name": "c", "model_ids": [3, 2, 1],
                                                          "version": 1, "updated_at": None}], "total": 5})
    assert text.splitlines()[1].split() == ["1", "c", "3,2,1", "1", "-"]
    assert text.endswith("(1 of 5 shown; page with --limit and --offset)")


def test_model_view_ends_with_its_code() -> None:
    text = cr.render_model(EDGE | {"imports": "import numpy as np\n"})
    lines = text.splitlines()
    assert lines[0] == "id           3"
    assert "input        (28, 28, 1)" in lines
    assert "outputs      (64,), (10,)" in lines
    assert "description  -" in lines
    assert text.endswith("\n\nimports:\nimport numpy as np\n\ncode:\nedge_model = keras.Model(...)")
    assert "code:" not in cr.render_created(cr.MODELS, EDGE, "created")
    assert cr.render_created(cr.MODELS, EDGE, "created").startswith("created model 3\nid")


def test_multiline_values_continue_under_their_first_line() -> None:
    assert cr.format_kv([("a", "x\ny"), ("long", "z")]) == "a     x\n      y\nlong  z"


def test_deployment_and_result_views() -> None:
    dep = {"id": 4, "configuration_id": 1, "batch": 64, "fit_options": {"epochs": 5}, "eval_options": {},
           "optimizer": "adam", "learning_rate": None, "loss": "sparse_categorical_crossentropy",
           "metrics": ["accuracy"], "loss_weights": None, "model_versions": {"3": 1, "2": 2},
           "result_ids": [7, 8], "created_at": "2024-05-01T12:00:00Z"}
    view = cr.render_deployment(dep)
    assert "models         3 (v1), 2 (v2)" in view.splitlines()
    assert "fit options    {\"epochs\": 5}" in view.splitlines()
    assert "results        7,8" in view.splitlines()
    row = cr.deployment_row(dep)
    assert row[:8] == ["4", "1", "64", "5", "adam", "sparse_categorical_crossentropy", "2", "2024-05-01 12:00:00"]
    res = {"id": 7, "deployment_id": 4, "model_id": 3, "model_name": None, "model_version": 1, "status": "created",
           "created_at": None, "updated_at": None}
    assert cr.result_row(res) == ["7", "4", "3", "-", "1", "created", "-"]
    assert "status         created" in cr.render_result(res).splitlines()


#: A Kafka-ML sink's datasource whose end on partition 0 the control bridge moved to its record batch's end.
DATASOURCE: dict[str, Any] = {
    "id": 2, "deployment_id": 1, "input_format": "RAW",
    "input_config": {"data_type": "uint8", "label_type": "uint8", "data_reshape": "28 28"},
    "description": "digits", "validation_rate": 0.1, "test_rate": 0.1, "total_msg": 1902,
    "ranges": [{"topic": "digits", "partition": 0, "start": 0, "end": 1000},
               {"topic": "digits", "partition": 1, "start": 0, "end": 1000}],
    "announced_ranges": [{"topic": "digits", "partition": 0, "start": 0, "end": 902},
                         {"topic": "digits", "partition": 1, "start": 0, "end": 1000}],
    "range_reasons": ["digits[0]: end 902 -> 1000: the announced last record 901 is inside record batch 901..999"],
    "warnings": ["digits[1]: 7 records after offset 999 (up to the high-water mark 1007) are not part of this "
                 "datasource: another writer appended them after the announced records"],
    "origin": {"topic": "KAFKA_ML_CONTROL_TOPIC", "partition": 0, "offset": 4},
    "created_at": "2024-05-01T12:00:00.5Z",
}


def test_a_datasource_row_counts_used_and_announced_records() -> None:
    lines = cr.render_list(cr.DATASOURCES, {"items": [DATASOURCE], "total": 1}).splitlines()
    assert lines[0].split() == ["ID", "DEPLOYMENT", "FORMAT", "TOPIC", "RECORDS", "ANNOUNCED", "NOTES", "CREATED"]
    assert lines[1].split() == ["2", "1", "RAW", "digits", "2,000", "1,902", "1", "reason,", "1", "warning",
                                "2024-05-01", "12:00:00"]
    # A v1 datasource (or one used as announced): the same count twice, nothing to note.
    plain = DATASOURCE | {"announced_ranges": DATASOURCE["ranges"], "range_reasons": [], "warnings": []}
    assert cr.datasource_row(plain)[4:7] == ["2,000", "2,000", "-"]


def test_a_datasource_view_shows_announced_vs_used_ranges_and_why() -> None:
    text = cr.render_datasource(DATASOURCE)
    lines = text.splitlines()
    assert "records       2,000 (1,902 announced)" in lines
    assert "split         validation 10%, test 10%" in lines
    assert "origin        KAFKA_ML_CONTROL_TOPIC[0] offset 4" in lines
    table = lines[lines.index("ranges (used: what training reads):") + 1:][:3]
    assert [row.split() for row in table] == [
        ["TOPIC", "PARTITION", "ANNOUNCED", "USED", "RECORDS"],
        ["digits", "0", "[0,", "902)", "[0,", "1000)", "1,000", "(+98)"],
        ["digits", "1", "[0,", "1000)", "[0,", "1000)", "1,000"]]
    assert "why the used ranges differ from the announced ones:\n- digits[0]: end 902 -> 1000: " in text
    assert text.endswith("warnings:\n- " + DATASOURCE["warnings"][0])
    plain = cr.render_datasource(DATASOURCE | {"announced_ranges": DATASOURCE["ranges"], "range_reasons": [],
                                               "warnings": [], "origin": {"datasource_id": 1}})
    assert "used as announced" in plain and "warnings" not in plain
    assert "origin        sent from datasource 1" in plain.splitlines()


def test_errors_name_the_field() -> None:
    exc = ApiClientError(409, "conflict", "a model named 'fog' already exists", "name")
    assert cr.format_error(exc) == "tierflow: a model named 'fog' already exists (field: name)"
    assert cr.format_error(ApiClientError(404, "not_found", "model 9 does not exist")) == \
        "tierflow: model 9 does not exist"


# --- arguments to bodies --------------------------------------------------------------------------------

def test_model_create_from_a_snippet_file() -> None:
    args = parse("models", "create", "--name", "fog", "--code-file", "fog.py", "--distributed", "--upper-id", "1",
                 "--imports-file", "imp.py")
    body = cr.model_create_body(args, files(**{"fog.py": "fog_model = ...", "imp.py": "import math"}))
    assert body == {"name": "fog", "code": "fog_model = ...", "imports": "import math", "distributed": True,
                    "upper_id": 1}
    assert args.func is not None and args.json is False


def test_model_create_from_a_spec_file_with_flag_overrides() -> None:
    spec = json.dumps({"name": "old", "code": "m = 1", "distributed": True})
    args = parse("models", "create", "--file", "s.json", "--name", "new")
    body = cr.model_create_body(args, files(**{"s.json": spec}))
    assert body == {"name": "new", "code": "m = 1", "distributed": True}


def test_model_create_needs_name_and_code() -> None:
    with pytest.raises(cr.UsageError, match="--code-file or --code"):
        cr.model_create_body(parse("models", "create", "--name", "x"), files())
    with pytest.raises(cr.UsageError, match="not valid JSON"):
        cr.model_create_body(parse("models", "create", "--file", "s.json"), files(**{"s.json": "{nope"}))
    with pytest.raises(cr.UsageError, match="must be a JSON object"):
        cr.model_create_body(parse("models", "create", "--file", "s.json"), files(**{"s.json": "[1]"}))
    with pytest.raises(SystemExit):  # argparse: --code and --code-file exclude each other
        parse("models", "create", "--code", "a", "--code-file", "b")


def test_model_update_is_partial() -> None:
    body = cr.model_update_body(parse("models", "update", "3", "--description", "v2", "--no-distributed",
                                      "--expected-version", "1"), files())
    assert body == {"description": "v2", "distributed": False, "expected_version": 1}
    assert cr.model_update_body(parse("models", "update", "3", "--no-upper"), files()) == {"upper_id": None}
    with pytest.raises(cr.UsageError, match="nothing to update"):
        cr.model_update_body(parse("models", "update", "3", "--expected-version", "2"), files())


def test_configuration_body() -> None:
    args = parse("configurations", "create", "--name", "thesis", "--model", "3", "--model", "4")
    assert cr.configuration_create_body(args, files()) == {"name": "thesis", "model_ids": [3, 4]}
    with pytest.raises(cr.UsageError, match="--model"):
        cr.configuration_create_body(parse("configurations", "create", "--name", "x"), files())


def test_deployment_body_parses_json_options_and_never_evaluates_them() -> None:
    args = parse("deployments", "create", "--configuration", "1", "--batch", "64", "--epochs", "5",
                 "--fit-options", '{"shuffle": true, "epochs": 2}', "--metric", "accuracy", "--metric", "mse",
                 "--learning-rate", "0.001", "--loss-weights", '{"3": 1.0}', "--optimizer", "sgd")
    assert cr.deployment_create_body(args, files()) == {
        "configuration_id": 1, "batch": 64, "fit_options": {"shuffle": True, "epochs": 5},
        "metrics": ["accuracy", "mse"], "learning_rate": 0.001, "loss_weights": {"3": 1.0}, "optimizer": "sgd"}
    with pytest.raises(cr.UsageError, match="--fit-options is not valid JSON"):
        cr.deployment_create_body(parse("deployments", "create", "--configuration", "1", "--batch", "1",
                                        "--fit-options", "{'epochs': 5}"), files())
    with pytest.raises(cr.UsageError, match="--batch, --epochs"):
        cr.deployment_create_body(parse("deployments", "create", "--configuration", "1"), files())
    spec = json.dumps({"configuration_id": 2, "batch": 8})
    assert cr.deployment_create_body(parse("deployments", "create", "--file", "d.json"),
                                     files(**{"d.json": spec})) == {"configuration_id": 2, "batch": 8}


def test_deployment_body_asks_for_a_seed_only_when_given() -> None:
    base = ("deployments", "create", "--configuration", "1", "--batch", "8", "--epochs", "2")
    assert cr.deployment_create_body(parse(*base, "--seed", "7"), files())["seed"] == 7
    assert "seed" not in cr.deployment_create_body(parse(*base), files())


def test_paths() -> None:
    assert cr.list_path(cr.MODELS, parse("models", "list", "--distributed", "--name", "fo")) == \
        "/models?distributed=true&name=fo"
    assert cr.list_path(cr.RESULTS, parse("results", "list", "--deployment", "4", "--limit", "5")) == \
        "/deployments/4/results?limit=5"
    assert cr.list_path(cr.CONFIGURATIONS, parse("configurations", "list")) == "/configurations"
    assert cr.list_path(cr.DATASOURCES, parse("datasources", "list", "--deployment", "2")) == \
        "/datasources?deployment_id=2"
    assert parse("datasources", "show", "5", "--json").id == 5
    assert cr.delete_path(cr.MODELS, 3, 2) == "/models/3?expected_version=2"
    assert cr.delete_path(cr.DEPLOYMENTS, 3) == "/deployments/3"
    assert with_query("/x", {"a": None, "b": False}) == "/x?b=false"


# --- the client over a fake transport -------------------------------------------------------------------

class FakeApi:
    """Answers requests from a script of (method, path) -> responses; records what it was asked."""

    def __init__(self, answers: dict[tuple[str, str], list[tuple[int, Any]]]) -> None:
        self.answers = answers
        self.seen: list[HttpRequest] = []

    def __call__(self, request: HttpRequest) -> HttpResponse:
        self.seen.append(request)
        key = (request.method, request.url.removeprefix("http://api"))
        status, data = self.answers[key].pop(0) if len(self.answers[key]) > 1 else self.answers[key][0]
        return HttpResponse(status, json.dumps(data).encode())


def client(fake: FakeApi, **kw: Any) -> ApiClient:
    return ApiClient("http://api/", "s3cret", transport=fake, sleep=lambda s: None, **kw)


CID = "6f1c0c36-2f59-4a4e-9d51-3d6a1e0f8c11"
PENDING = (202, {"command_id": CID, "status": "pending"})


def test_a_202_is_settled_by_polling_the_command_and_reading_the_resource() -> None:
    fake = FakeApi({
        ("POST", "/models"): [PENDING],
        ("GET", f"/commands/{CID}"): [PENDING, PENDING,
                                      (200, {"status": "accepted", "aggregate": "model:3",
                                             "event_type": "ModelCreated"})],
        ("GET", "/models/3"): [(200, EDGE)],
    })
    assert client(fake).post("/models", {"name": "edge"}) == (201, EDGE)
    assert [r.url for r in fake.seen].count(f"http://api/commands/{CID}") == 3
    assert all(r.headers["Authorization"] == "Bearer s3cret" for r in fake.seen)
    assert json.loads(fake.seen[0].data or b"") == {"name": "edge"}


def test_a_settled_delete_and_a_settled_rejection() -> None:
    fake = FakeApi({
        ("DELETE", "/models/3"): [PENDING],
        ("GET", f"/commands/{CID}"): [(200, {"status": "accepted", "aggregate": "model:3",
                                             "event_type": "ModelDeleted"})],
    })
    assert client(fake).delete("/models/3") == (200, {"id": 3, "deleted": True, "command_id": CID})
    fake = FakeApi({
        ("POST", "/models"): [PENDING],
        ("GET", f"/commands/{CID}"): [(200, {"status": "rejected", "aggregate": f"command:{CID}", "reason": {
            "code": "conflict", "message": "a model named 'fog' already exists", "field": "name"}})],
    })
    with pytest.raises(ApiClientError) as info:
        client(fake).post("/models", {})
    assert (info.value.status, info.value.code, info.value.field) == (409, "conflict", "name")


def test_a_command_without_outcome_gives_up_at_the_deadline() -> None:
    fake = FakeApi({("POST", "/models"): [PENDING], ("GET", f"/commands/{CID}"): [PENDING]})
    ticks = iter(range(1000))
    api = ApiClient("http://api", transport=fake, sleep=lambda s: None, clock=lambda: float(next(ticks)),
                    command_deadline_s=5)
    with pytest.raises(ApiClientError, match=f"GET /commands/{CID}") as info:
        api.post("/models", {})
    assert info.value.code == "pending"


def test_error_answers_and_failures_to_connect() -> None:
    fake = FakeApi({("GET", "/models/9"): [(404, {"error": {"code": "not_found", "message": "model 9 does not exist",
                                                            "field": None}})],
                    ("GET", "/html"): [(502, "<html>")]})
    with pytest.raises(ApiClientError, match="model 9 does not exist") as info:
        client(fake).get("/models/9")
    assert (info.value.status, info.value.field) == (404, None)
    with pytest.raises(ApiClientError, match="HTTP 502"):
        client(fake).get("/html")

    def refuse(request: HttpRequest) -> HttpResponse:
        raise ConnectionRefusedError(111, "Connection refused")

    with pytest.raises(ApiUnreachable, match=r"cannot reach the tierflow API at http://api: .*TIERFLOW_API_URL"):
        ApiClient("http://api", transport=refuse).get("/models")


def test_aggregates() -> None:
    assert parse_aggregate("model:3") == ("model", 3)
    assert parse_aggregate("deployment:12") == ("deployment", 12)
    assert parse_aggregate("command:abc") is None
