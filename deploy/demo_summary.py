"""The demo's numbers (pure): the answers it read, what they add up to, and how it prints them.

Called by the demo's lifecycle (deploy/demo_lifecycle.py: `Answered`, `summarize`) and command (deploy/demo.py:
`format_summary`, `where_next`); tested without a stack in tests/unit/test_demo.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

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


def summarize(*, exits: Sequence[tuple[str, float | None]], single: tuple[str, float | None] | None,
              offsets: Sequence[tuple[int, int]], labels: Sequence[int], answered: Answered, started_at: float,
              tiers: int) -> JSON:
    """The demo's numbers: test accuracy per exit (from training), and of the cascade, share and accuracy
    per answering tier, latency percentiles and throughput of the inference run."""
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
    return {
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
    lines.append(f"inference on {summary['inputs']:,} held-out inputs: {summary['answered']:,} answered, "
                 f"{summary['unanswered']} unanswered, {summary['duplicates']} duplicates")
    lines.append(f"  cascade accuracy {number(summary['cascade_accuracy'])}")
    for t in summary["tiers"]:
        name = summary["exits"][t["tier"]]["name"] if t["tier"] < len(summary["exits"]) else f"tier {t['tier']}"
        label = f"tier {t['tier']} ({name})"
        lines.append(f"  {label:<16} answered {t['share']:6.1%}  accuracy {number(t['accuracy'])}")
    lat = summary["latency_ms"]
    lines.append(f"  latency p50 {number(lat['p50'], '.1f')} ms, p99 {number(lat['p99'], '.1f')} ms; "
                 f"throughput {number(summary['throughput_per_s'], ',.0f')} answers/s")
    return "\n".join(lines)


def where_next(api_url: str, summary: JSON, *, ui: str = "") -> str:
    """Where to look after `--keep`; `ui` is the web UI's address (with its one-time token)."""
    inf = summary["inference_id"]
    return "\n".join([
        "where to look next:",
        f"  web UI            {ui or api_url + '/ui/'}",
        f"  API               {api_url}/openapi.json",
        f"  inputs / answers  {summary['input_topic']} -> {summary['output_topic']}",
        f"  CLI               tierflow deployments results {summary['deployment_id']}",
        f"                    tierflow inferences stats {inf}",
        f"                    tierflow inferences predictions {inf}",
        f"                    tierflow inferences stop {inf}",
    ])
