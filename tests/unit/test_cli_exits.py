"""`tierflow results exits R` and the target side of `tierflow inferences create|show`: pure formatting and
argument-to-body building over the API's JSON (the answer of GET /results/{id}/exits is built here by the
projection's own pure function). No network."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from tests.unit.test_exit_targets import calibration
from tests.unit.test_exits import make_record
from tierflow.deploy import cli_inferences as ci
from tierflow.deploy import cli_resources as cr
from tierflow.projections.queries import chain_exits
from tierflow.streams.statuses import ResultStatus

JSON = dict[str, Any]
NAMES = ("edge", "fog", "cloud")


def answer(record: JSON | None = None, reason: str | None = None) -> JSON:
    found = {r: {"status": ResultStatus.FINISHED, "model_name": NAMES[k],
                 "exits": {"temperature": [1.5, 1.2, 0.9][k], "calibration": calibration(k, [1.5, 1.2, 0.9][k]),
                           "cost_s": [1e-5, 4e-5, 2e-3][k], "frontier": record if k == 2 else None,
                           "reason": reason if k == 2 else None}}
             for k, r in enumerate((11, 12, 13))}
    return chain_exits(12, [11, 12, 13], found)


def test_the_exits_table_shows_t_accuracy_and_ece_before_and_after_per_exit() -> None:
    text = cr.render_exits(answer(make_record()))
    lines = text.splitlines()
    assert lines[0] == "result 12: chain edge -> fog -> cloud"
    assert "fitted on 1000 validation samples" in lines[1] and "1000 test samples" in lines[1]
    header = next(i for i, line in enumerate(lines) if line.startswith("EXIT"))
    assert lines[header].split() == ["EXIT", "RESULT", "MODEL", "T", "ACCURACY", "ECE", "BEFORE", "->", "AFTER",
                                     "COST/SAMPLE"]
    assert lines[header + 1].split() == ["0", "11", "edge", "1.500", "0.9000", "0.0800", "->", "0.0200", "10", "us"]
    assert lines[header + 3].split()[-2:] == ["2.0", "ms"]


def test_the_frontier_listing_shows_each_entrys_points_cheapest_first() -> None:
    text = cr.render_exits(answer(make_record()))
    assert "frontier entering at edge: 5 points on 1000 validation samples (1000 x 1000 candidate limits searched), " \
           "all shown, cheapest first" in text
    assert "entry at cloud: one tier, nothing to trade" in text
    rows = text.split("frontier entering at edge")[1].splitlines()[2:7]
    # P3 of the record never answers early: its limits read "never", its drop is 0.
    assert any(row.startswith("never, never") and "+0.0000" in row for row in rows)
    assert [row.split()[:2] for row in rows] == [["0.5,", "0.5"], ["0.3,", "0.99"], ["0.8,", "0.7"],
                                                 ["0.9,", "0.9"], ["never,", "never"]]


def test_a_chain_without_a_frontier_shows_why() -> None:
    text = cr.render_exits(answer(None, "validation_rate is 0: no validation samples"))
    assert "note: validation_rate is 0: no validation samples" in text and "frontier entering" not in text


def test_the_answer_waits_for_the_whole_chain() -> None:
    found = {11: {"status": ResultStatus.FINISHED, "model_name": "edge", "exits": None},
             12: {"status": ResultStatus.TRAINING, "model_name": "fog", "exits": None}}
    data = chain_exits(11, [11, 12, 13], found)
    assert data["finished"] is False and data["exits"] == []
    assert data["reason"].endswith("result(s) 12 (training), 13 (deleted) have not")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tierflow")
    ci.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(list(argv))


def test_inference_create_takes_a_target_instead_of_limits() -> None:
    args = parse("inferences", "create", "--result", "1", "--input-topic", "in", "--output-topic", "out",
                 "--max-accuracy-drop", "0.01", "--costs-s", '{"3": 0.002}', "--shadow-fraction", "1")
    assert ci.inference_body(args) == {"result_id": 1, "input_topic": "in", "output_topic": "out",
                                       "target": {"max_accuracy_drop": 0.01}, "costs_s": {"3": 0.002},
                                       "shadow_fraction": 1.0}
    both = parse("inferences", "create", "--result", "1", "--input-topic", "in", "--output-topic", "out",
                 "--min-accuracy", "0.9", "--max-top-share", "0.2")
    with pytest.raises(cr.UsageError, match="one of"):
        ci.inference_body(both)


def test_an_inference_view_shows_what_each_tier_compares_and_the_prediction() -> None:
    tiers = [{"index": 0, "model_name": "edge", "limit": 0.8512, "compare": "calibrated", "temperature": 1.5,
              "top": False},
             {"index": 1, "model_name": "cloud", "limit": 1.0, "compare": "calibrated", "temperature": 0.9,
              "top": True}]
    predicted = {"shares": [0.6, 0.4], "accuracy": 0.91, "top_accuracy": 0.915, "accuracy_drop_upper": 0.0098,
                 "confidence": 0.9, "agreement": 0.97, "n": 4000,
                 "test": {"shares": [0.58, 0.42], "accuracy": 0.905, "top_accuracy": 0.91, "n": 4000}}
    text = ci.render_inference({"id": 4, "status": "running", "tiers": tiers, "target": {"max_accuracy_drop": 0.01},
                                "predicted": predicted})
    assert "target      max accuracy drop 0.01" in text
    assert "predicted   shares 60.0% / 40.0%; accuracy 0.9100 (top exit alone 0.9150, drop <= 0.0098 at 90%)" in text
    assert "on test    shares 58.0% / 42.0%; accuracy 0.9050" in text
    assert "0.8512 (calibrated, T 1.50)" in text and " top " in text
    typed = ci.render_inference({"id": 5, "status": "running", "target": None, "predicted": None,
                                 "tiers": [{"index": 0, "limit": 0.8, "compare": "raw", "top": False}]})
    assert "target" not in typed and " 0.8 " in typed + " "
