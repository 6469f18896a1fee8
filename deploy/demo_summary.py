"""The demo's numbers (pure): the answers it read, what they add up to, and how it prints them.

Called by the demo's lifecycle (deploy/demo_lifecycle.py: `Answered`, `served`, `best_reachable`, `summarize`)
and command (deploy/demo.py: `format_summary`, `where_next`); tested without a stack in tests/unit/test_demo.py.

The chain is served from a target by default: the summary puts what the chosen limits were predicted to do
(the inference's `predicted`: shares per tier and cascade accuracy on the validation split, docs/exits.md)
next to what the demo observed on its own held-out stream.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tierflow.streams.exits import ExitsError, SplitTooSmall, Target, TargetUnreachable, choose_limits, parse_frontier
from tierflow.streams.wire import percentile

JSON = dict[str, Any]


@dataclass
class Answered:
    """The first answer per input (by its input position: partition and offset), and how many more arrived
    (at-least-once duplicates)."""

    #: (partition, offset) of the input -> (tier, class, latency ms)
    by_offset: dict[tuple[int, int], tuple[int, int, float]] = field(default_factory=dict)
    duplicates: int = 0
    first_at: float | None = None
    last_at: float | None = None

    def add(self, offset: tuple[int, int], tier: int, cls: int, latency_ms: float, now: float) -> None:
        if offset in self.by_offset:
            self.duplicates += 1
            return
        self.by_offset[offset] = (tier, cls, latency_ms)
        self.first_at = now if self.first_at is None else self.first_at
        self.last_at = now


#: Decimals of a relaxed target (`best_reachable`).
RELAXED_DIGITS = 4


def best_reachable(record: JSON, target: Target, entry: int = 0) -> float | None:
    """When the decider refuses `target` (no limits meet it, or the validation split is too small to certify
    it), the strictest target of the same kind it would accept: the best bound any point of the frontier
    reaches (streams/exits.py names it), rounded outwards to `RELAXED_DIGITS` decimals. The target itself
    when it is met; None when the record cannot be read or no point can answer early."""
    try:
        choose_limits(parse_frontier(record), target, entry=entry)
        return target.value
    except (SplitTooSmall, TargetUnreachable) as exc:
        best = exc.best
    except ExitsError:
        return None
    if not math.isfinite(best):
        return None
    scale = 10**RELAXED_DIGITS
    lower = target.kind == "min_accuracy"  # a floor: relax it downwards
    value = round((math.floor(best * scale) if lower else math.ceil(best * scale)) / scale, RELAXED_DIGITS)
    if (value > best) if lower else (value < best):  # the float of the rounded value fell on the wrong side
        value = round(value + (-1 if lower else 1) / scale, RELAXED_DIGITS)
    valid = {"max_accuracy_drop": 0 <= value < 1, "min_accuracy": 0 < value <= 1, "max_top_share": 0 <= value <= 1}
    return value if valid[target.kind] else None


def served(inference: JSON, requested: JSON | None = None) -> JSON:
    """How an inference serves the chain: its `target` (and the one the user `requested`, when the demo had
    to relax it), the limit of each non-top tier and what it compares, and what the chosen point predicts
    (the inference's `predicted`: on the validation split, and the same limits on the test split)."""
    tiers = inference.get("tiers") or []
    target = inference.get("target")
    out: JSON = {"target": target, "requested_target": requested if requested and requested != target else None,
                 "limits": [t.get("limit") for t in tiers if not t.get("top")],
                 "compare": (tiers[0].get("compare") if tiers else None) or "raw", "predicted": None}
    p = inference.get("predicted")
    if isinstance(p, dict):
        keep = ("n", "point", "shares", "accuracy", "accuracy_lower", "top_accuracy", "accuracy_drop",
                "accuracy_drop_upper", "top_share_upper", "cost_s", "confidence")
        out["predicted"] = {k: p.get(k) for k in keep}
        test = p.get("test")
        out["predicted"]["test"] = None if not isinstance(test, dict) else {
            k: test.get(k) for k in ("n", "shares", "accuracy", "top_accuracy")}
    return out


def summarize(*, exits: Sequence[tuple[str, float | None]], single: tuple[str, float | None] | None,
              offsets: Sequence[tuple[int, int]], labels: Sequence[int], answered: Answered, started_at: float,
              tiers: int, serving: JSON | None = None) -> JSON:
    """The demo's numbers: test accuracy per exit (from training), and of the cascade, share and accuracy
    per answering tier, latency percentiles and throughput of the inference run; with `serving` (`served`),
    the target, the chosen limits and the predicted shares and accuracy beside the observed ones."""
    per_tier: list[dict[str, Any]] = [{"tier": t, "answered": 0, "correct": 0} for t in range(tiers)]
    latencies: list[float] = []
    correct = 0
    for offset, label in zip(offsets, labels, strict=True):
        got = answered.by_offset.get(offset)
        if got is None:
            continue
        tier, cls, latency = got
        latencies.append(latency)
        per_tier[tier]["answered"] += 1
        if cls == label:
            correct += 1
            per_tier[tier]["correct"] += 1
    n_answered = sum(t["answered"] for t in per_tier)
    for t in per_tier:
        t["share"] = t["answered"] / n_answered if n_answered else 0.0
        t["accuracy"] = t.pop("correct") / t["answered"] if t["answered"] else None
    span = (answered.last_at or started_at) - started_at
    serving = serving or {"target": None, "requested_target": None, "limits": [], "compare": "raw",
                          "predicted": None}
    predicted = serving["predicted"]
    shares = (predicted or {}).get("shares") or []
    for t in per_tier:
        t["predicted_share"] = shares[t["tier"]] if t["tier"] < len(shares) else None
    return {
        "target": serving["target"],
        "requested_target": serving["requested_target"],
        "limits": serving["limits"],
        "compare": serving["compare"],
        "predicted": predicted,
        "observed": {"n": n_answered, "shares": [t["share"] for t in per_tier],
                     "accuracy": correct / n_answered if n_answered else None},
        "exits": [{"name": name, "test_accuracy": acc} for name, acc in exits],
        "single": None if single is None else {"name": single[0], "test_accuracy": single[1]},
        "inputs": len(offsets),
        "answered": n_answered,
        "unanswered": len(offsets) - n_answered,
        "duplicates": answered.duplicates,
        "cascade_accuracy": correct / n_answered if n_answered else None,
        "tiers": per_tier,
        "latency_ms": {"p50": percentile(sorted(latencies), 0.5), "p99": percentile(sorted(latencies), 0.99),
                       "max": max(latencies) if latencies else None},
        "throughput_per_s": n_answered / span if span > 0 else None,
    }


def number(value: float | None, fmt: str = ".3f", none: str = "-") -> str:
    return none if value is None else format(value, fmt)


def format_summary(summary: JSON) -> str:
    lines = ["accuracy on the training's test split, per exit:"]
    for e in summary["exits"]:
        lines.append(f"  {e['name']:<8} {number(e['test_accuracy'])}")
    if summary.get("single"):
        lines.append(f"  {summary['single']['name']:<8} {number(summary['single']['test_accuracy'])}  "
                     "(the non-distributed model)")
    names = [e["name"] for e in summary["exits"]]
    lines += _serving_lines(summary, names)
    lines.append(f"inference on {summary['inputs']:,} held-out inputs: {summary['answered']:,} answered, "
                 f"{summary['unanswered']} unanswered, {summary['duplicates']} duplicates")
    predicted = summary.get("predicted")
    if predicted:
        lines += _predicted_vs_observed(summary, predicted, names)
    else:
        lines.append(f"  cascade accuracy {number(summary['cascade_accuracy'])}")
        for t in summary["tiers"]:
            label = f"tier {t['tier']} ({_name(names, t['tier'])})"
            lines.append(f"  {label:<16} answered {t['share']:6.1%}  accuracy {number(t['accuracy'])}")
    lat = summary["latency_ms"]
    lines.append(f"  latency p50 {number(lat['p50'], '.1f')} ms, p99 {number(lat['p99'], '.1f')} ms; "
                 f"throughput {number(summary['throughput_per_s'], ',.0f')} answers/s")
    return "\n".join(lines)


def _name(names: Sequence[str], tier: int) -> str:
    return names[tier] if tier < len(names) else f"tier {tier}"


def _target_text(target: JSON | None) -> str:
    return ", ".join(f"{kind} {value:g}" for kind, value in (target or {}).items())


def _serving_lines(summary: JSON, names: Sequence[str]) -> list[str]:
    limits = summary.get("limits") or []
    pairs = ", ".join(f"{_name(names, k)} {limit:g}" + (" (never answers)" if limit > 1 else "")
                      for k, limit in enumerate(limits))
    if not summary.get("target"):
        return [f"served with typed limits ({pairs}) on the raw max(p), as Kafka-ML"] if limits else []
    lines = [f"served from the target {_target_text(summary['target'])}"]
    if summary.get("requested_target"):
        lines.append(f"  (asked for {_target_text(summary['requested_target'])}: refused; this is the strictest "
                     "target of that kind the chain's frontier certifies)")
    lines.append(f"  chosen limits on the calibrated confidence: {pairs}")
    return lines


def _cell(value: float | None, fmt: str, width: int) -> str:
    return f"{number(value, fmt):>{width}}"


def _predicted_vs_observed(summary: JSON, predicted: JSON, names: Sequence[str]) -> list[str]:
    """Per tier the share it answers, predicted (validation split), on the test split and observed, and the
    cascade accuracy the same three ways."""
    test = predicted.get("test") or {}
    test_shares = test.get("shares") or []
    lines = [f"  {'':<16} {'predicted':>9} {'test split':>10} {'observed':>9}"]
    for t in summary["tiers"]:
        label = f"tier {t['tier']} ({_name(names, t['tier'])})"
        in_test = test_shares[t["tier"]] if t["tier"] < len(test_shares) else None
        lines.append(f"  {label:<16} {_cell(t['predicted_share'], '.1%', 9)} {_cell(in_test, '.1%', 10)} "
                     f"{_cell(t['share'], '.1%', 9)}  answered (observed accuracy {number(t['accuracy'])})")
    lines.append(f"  {'cascade accuracy':<16} {_cell(predicted.get('accuracy'), '.3f', 9)} "
                 f"{_cell(test.get('accuracy'), '.3f', 10)} {_cell(summary['cascade_accuracy'], '.3f', 9)}")
    lines.append(f"  predicted:  the chosen point on {predicted.get('n')} validation samples (accuracy >= "
                 f"{number(predicted.get('accuracy_lower'))} with 90% confidence,")
    lines.append(f"              drop against the top exit <= {number(predicted.get('accuracy_drop_upper'), '.4f')}; "
                 f"the top exit alone {number(predicted.get('top_accuracy'))})")
    lines.append(f"  test split: the same limits on the training's {test.get('n') or 0} test samples")
    lines.append(f"  observed:   the {summary['answered']:,} held-out inputs the demo streamed through the tiers")
    return lines


def where_next(api_url: str, summary: JSON, *, ui: str = "") -> str:
    """Where to look after `--keep`; `ui` is the web UI's address (with its one-time token)."""
    inf = summary["inference_id"]
    return "\n".join([
        "where to look next:",
        f"  web UI            {ui or api_url + '/ui/'}",
        f"  API               {api_url}/openapi.json",
        f"  inputs / answers  {summary['input_topic']} -> {summary['output_topic']}",
        f"  CLI               tierflow deployments results {summary['deployment_id']}",
        *([f"                    tierflow results exits {summary['entry_result_id']}"]
          if summary.get("entry_result_id") else []),
        f"                    tierflow inferences stats {inf}",
        f"                    tierflow inferences predictions {inf}",
        f"                    tierflow inferences stop {inf}",
    ])
