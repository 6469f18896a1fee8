"""The data plane's small rules have one implementation each, in streams/wire.py, and the callers use it.

The answer format (written by the tiers, read by the API, the demo, the clients), dtype names, shapes in
messages, the tier's consumer group name and answer-latency percentiles each had two or three copies that
had begun to disagree. These tests read the package's source (its syntax trees, nothing is imported) and
fail when a second implementation appears outside streams/wire.py.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("streams", "projections", "api", "tiers", "deploy")
HOME = "streams/wire.py"


@cache
def modules() -> dict[str, ast.Module]:
    """Every module of the package by its path in the repository."""
    return {str(path.relative_to(REPO)): ast.parse(path.read_text(), str(path))
            for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))}


def _docstrings(tree: ast.Module) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def strings(tree: ast.Module) -> Iterator[str]:
    """The string constants of a module's code (docstrings left out), f-string parts included."""
    docs = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node.value


def where(predicate: str) -> set[str]:
    """The modules whose code holds the string constant `predicate` (a prefix of an f-string's first part
    counts: f"tierflow-inference-{i}" holds "tierflow-inference-")."""
    found = set()
    for path, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr) and node.values:
                head = node.values[0]
                if isinstance(head, ast.Constant) and str(head.value).startswith(predicate):
                    found.add(path)
        if predicate in set(strings(tree)):
            found.add(path)
    return found


def definitions(name: str) -> set[str]:
    return {path for path, tree in modules().items() for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name}


def calls(path: str, function: str, callee: str) -> bool:
    """Whether `function` in module `path` calls something named `callee` (plain or as an attribute)."""
    for node in ast.walk(modules()[path]):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == function:
            for call in ast.walk(node):
                if isinstance(call, ast.Call):
                    target = call.func
                    name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", None)
                    if name == callee:
                        return True
    return False


def test_the_answer_format_is_written_and_read_only_in_wire() -> None:
    # Field names that only the batched answer has: a module spelling them writes or parses the format.
    for field in ("latencies_ms", "confidences"):
        assert where(field) == {HOME}, f"{field!r} outside {HOME}: a second reader or writer of answers"
    assert definitions("read_answers") == definitions("answer_fields") == {HOME}
    # The API lists predictions through the one reader.
    assert calls("api/outputs.py", "flatten_output", "answer_fields")
    assert calls(HOME, "read_answers", "answer_fields")


def test_dtype_names_are_parsed_once() -> None:
    assert definitions("parse_dtype") == {HOME} and not definitions("parse_numeric_dtype")
    # Normalising to little-endian is what a dtype parser does; nobody else does it.
    byteorder = {path for path, tree in modules().items() for node in ast.walk(tree)
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                 and node.func.attr == "newbyteorder" and any(isinstance(a, ast.Constant) and a.value == "<"
                                                              for a in node.args)}
    assert byteorder == {HOME}
    assert calls("tiers/data.py", "_dtype", "parse_dtype")


def test_shapes_in_messages_are_formatted_once() -> None:
    joins = {path for path, tree in modules().items() for node in ast.walk(tree)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "join"
             and isinstance(node.func.value, ast.Constant) and node.func.value.value == "x"}
    assert joins == {HOME}
    assert definitions("shape_text") == {HOME} and not definitions("_describe_shape")


def test_the_tier_consumer_group_is_named_once() -> None:
    assert where("tierflow-inference-") == {HOME}
    assert definitions("tier_group") == {HOME}


def test_answer_latency_percentiles_are_computed_once() -> None:
    assert definitions("percentile") == {HOME}
