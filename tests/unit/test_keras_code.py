"""Unit tests for the pure half of `tierflow.tiers.keras_code`: no TensorFlow, no I/O.

The TensorFlow half (`build_model`, `summarize`) runs inside sandbox children and is covered by
tests/integration/test_sandbox.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from tierflow.tiers.keras_code import (
    CODE_FILENAME,
    MAX_MESSAGE_CHARS,
    ModelCodeError,
    describe_error,
    error_location,
    last_assignments,
    parse_json_config,
    pick_model,
    run_snippet,
    shape_list,
    summary_dict,
)


@dataclass(eq=False)
class FakeModel:
    """Stands in for a Keras model: `parts` are the models it uses as sub-layers."""

    name: str
    parts: list[FakeModel] = field(default_factory=list)


def contains(outer: FakeModel, inner: FakeModel) -> bool:
    return any(part is inner or contains(part, inner) for part in outer.parts)


# -- JSON config or snippet ------------------------------------------------------------------------------


def test_a_snippet_is_not_a_json_config() -> None:
    assert parse_json_config("model = keras.Sequential([])\n") is None


def test_a_keras_json_config_is_detected() -> None:
    config = parse_json_config('  {"class_name": "Sequential", "config": {"name": "s", "layers": []}}\n')

    assert config is not None
    assert config["class_name"] == "Sequential"


def test_a_json_object_that_is_not_a_keras_config_says_what_is_missing() -> None:
    with pytest.raises(ModelCodeError, match="lacks config"):
        parse_json_config('{"class_name": "Sequential"}')


@pytest.mark.parametrize("code", ["[1, 2]", "{broken", '"text"', "{'class_name': 'Sequential'}"])
def test_text_that_is_not_a_json_object_is_treated_as_a_snippet(code: str) -> None:
    assert parse_json_config(code) is None


# -- which global is the model ---------------------------------------------------------------------------


def test_last_assignments_records_the_last_binding_line_of_each_global() -> None:
    code = (
        "import numpy as np\n"          # 1
        "model = 1\n"                    # 2
        "if True:\n"                     # 3
        "    other = 2\n"                # 4
        "def build():\n"                 # 5
        "    hidden = 3\n"               # 6
        "    return hidden\n"            # 7
        "model = build()\n"              # 8
        "squares = [i * i for i in range(3)]\n"  # 9
    )

    lines = last_assignments(code)

    assert lines == {"np": 1, "model": 8, "other": 4, "build": 5, "squares": 9}


def test_last_assignments_of_code_that_does_not_parse_is_empty() -> None:
    assert last_assignments("x = (") == {}


def test_the_only_model_is_picked() -> None:
    edge = FakeModel("edge")

    assert pick_model([("edge_model", edge)], contains) == ("edge_model", edge)


def test_no_model_is_a_clear_error() -> None:
    with pytest.raises(ModelCodeError, match="defines no Keras model"):
        pick_model([], contains)


def test_a_model_used_as_a_sub_layer_is_not_the_answer() -> None:
    # Check a backbone defined last but used inside the classifier is skipped.
    backbone = FakeModel("backbone")
    classifier = FakeModel("classifier", parts=[backbone])

    name, model = pick_model([("classifier", classifier), ("backbone", backbone)], contains,
                             {"classifier": 5, "backbone": 9})

    assert (name, model) == ("classifier", classifier)


def test_among_independent_models_the_one_assigned_last_wins() -> None:
    first, second = FakeModel("first"), FakeModel("second")
    # Namespace order is first-binding order: `b` was rebound to `second` on line 7, after `a` on line 4.
    candidates = [("b", second), ("a", first)]

    assert pick_model(candidates, contains, {"b": 7, "a": 4}) == ("b", second)
    assert pick_model(candidates, contains, {"b": 2, "a": 4}) == ("a", first)


def test_without_line_information_namespace_order_decides() -> None:
    first, second = FakeModel("first"), FakeModel("second")

    assert pick_model([("a", first), ("b", second)], contains) == ("b", second)


def test_one_model_bound_to_two_names_counts_once() -> None:
    model = FakeModel("m")

    assert pick_model([("model", model), ("alias", model)], contains, {"model": 1, "alias": 2}) == (
        "alias",
        model,
    )


# -- errors in the user's code ---------------------------------------------------------------------------


def test_a_syntax_error_names_its_line() -> None:
    with pytest.raises(ModelCodeError) as caught:
        run_snippet("a = 1\nb = (\n", "", {})

    assert caught.value.line == 2
    assert caught.value.cause == "SyntaxError"
    assert str(caught.value).startswith("line 2")
    assert "SyntaxError" in str(caught.value)


def test_a_runtime_error_names_its_line_and_quotes_it() -> None:
    code = "a = 1\n\nb = undefined_name + a\n"

    with pytest.raises(ModelCodeError) as caught:
        run_snippet(code, "", {})

    assert caught.value.line == 3
    assert str(caught.value) == (
        "line 3 (b = undefined_name + a): NameError: name 'undefined_name' is not defined"
    )


def test_an_error_inside_a_function_of_the_snippet_points_at_the_innermost_user_line() -> None:
    code = "def make():\n    return 1 / 0\n\nmodel = make()\n"

    with pytest.raises(ModelCodeError) as caught:
        run_snippet(code, "", {})

    assert caught.value.line == 2
    assert "ZeroDivisionError" in str(caught.value)


def test_an_error_in_the_imports_text_says_so() -> None:
    with pytest.raises(ModelCodeError) as caught:
        run_snippet("x = 1\n", "import os\nfrom os import no_such_name\n", {})

    assert caught.value.where == "imports"
    assert str(caught.value).startswith("imports line 2")
    assert "ImportError" in str(caught.value)


def test_imports_run_first_in_the_same_namespace() -> None:
    namespace = run_snippet("y = math.floor(2.5)\n", "import math\n", {})

    assert namespace["y"] == 2


def test_exit_in_the_snippet_is_reported_not_obeyed() -> None:
    with pytest.raises(ModelCodeError, match=r"line 2 \(raise SystemExit\(3\)\): SystemExit: 3"):
        run_snippet("x = 1\nraise SystemExit(3)\n", "", {})


def test_long_messages_are_cut() -> None:
    error = describe_error(ValueError("x" * (MAX_MESSAGE_CHARS * 2)), {})

    assert len(str(error)) < MAX_MESSAGE_CHARS + 50
    assert str(error).endswith("[...]")


def test_an_exception_from_outside_the_users_code_has_no_location() -> None:
    assert error_location(ValueError("no traceback")) is None
    assert describe_error(ValueError("boom"), {}).line is None


def test_a_syntax_error_location_comes_from_the_error_itself() -> None:
    error = SyntaxError("invalid syntax", (CODE_FILENAME, 4, 1, "x = (", 4, 2))

    assert error_location(error) == ("model code", 4)


# -- summary ---------------------------------------------------------------------------------------------


def test_shapes_become_lists_with_none_for_batch_dimensions() -> None:
    assert shape_list((None, 28, 28, 1)) == [None, 28, 28, 1]


def test_a_shape_of_unknown_rank_is_an_error() -> None:
    with pytest.raises(ModelCodeError, match="unknown rank"):
        shape_list(None)


def test_summary_of_a_two_exit_sub_model() -> None:
    summary = summary_dict([[None, 28, 28, 1]], [[None, 64], [None, 10]], 303842)

    assert summary == {"input_shape": [None, 28, 28, 1], "output_shapes": [[None, 64], [None, 10]],
                       "params": 303842}


def test_a_model_with_two_inputs_is_rejected() -> None:
    with pytest.raises(ModelCodeError, match="2 inputs"):
        summary_dict([[None, 4], [None, 8]], [[None, 10]], 10)
