"""Limits chosen from an accuracy target: what a RequestInference with a `target` records on each tier.

Called by the inference rules (streams/domain/inferences.py) while deciding a RequestInference. Pure: the
chain's exit frontier is the record the training job reported with the chain's top result (folded into
`State.exits` by streams/domain/state.py); `streams.exits.choose_limits` picks the point, and this module
turns the choice into the fields of InferenceRequested (docs/commands.md, "Limits from a target"):

- per tier: `limit`, `compare` ("calibrated": the tier compares `max(softmax(log p / T))` with its limit),
  `temperature` (the tier's T), `eps` (the record's clipping) and `predicted` {share, agreement,
  agreement_lower} (the share of inputs it answers, and the share of its answers with the top exit's class
  with its one-sided lower bound: the floor the live drift signal watches; null on the top tier);
- per inference: `target` and `predicted` (the chosen point on the validation split, with its bounds, and the
  same limits on the test split when the record has one).

Typed limits (`limit`, `limits`, `tiers[].limit`) keep Kafka-ML's behaviour: `compare` "raw" (the raw
max(p)), temperature 1, no prediction.
"""

from __future__ import annotations

from dataclasses import dataclass

from tierflow.streams.catalogue import InferenceFields, Invalid
from tierflow.streams.domain.state import State
from tierflow.streams.envelope import JSON
from tierflow.streams.exits import DEFAULT_EPS, ExitChoice, ExitsError, SplitCounts, choose_limits, parse_frontier

NO_FRONTIER = "the training workload reported no calibration for this chain"


@dataclass(frozen=True)
class TierPlan:
    """What one tier of an inference compares, from the entry up."""

    limit: float | None  # None: the typed limit (or the top's 1.0) stays
    compare: str  # "raw" | "calibrated"
    temperature: float
    eps: float
    predicted: JSON | None

    def fields(self) -> JSON:
        return {"compare": self.compare, "temperature": self.temperature, "eps": self.eps,
                "predicted": self.predicted}


@dataclass(frozen=True)
class InferencePlan:
    tiers: list[TierPlan]
    target: JSON | None
    predicted: JSON | None


def typed(n_tiers: int) -> InferencePlan:
    """Typed limits: every tier compares the raw max(p), exactly as Kafka-ML does."""
    return InferencePlan([TierPlan(None, "raw", 1.0, DEFAULT_EPS, None) for _ in range(n_tiers)], None, None)


def _split_prediction(v: SplitCounts, point: int) -> JSON:
    answered, agreeing = v.answered[point], v.agreeing[point]
    return {"n": v.n, "shares": [a / v.n for a in answered], "accuracy": sum(v.correct[point]) / v.n,
            "top_accuracy": v.top_correct / v.n, "agreement": (sum(agreeing) + answered[-1]) / v.n,
            "tier_agreement": [g / a if a else None for g, a in zip(agreeing, answered, strict=False)]}


def from_target(state: State, chain: list[int], entry_id: int, f: InferenceFields) -> InferencePlan:
    """The limits that meet `f.target` on the frontier of `chain` entered at `entry_id`; `Invalid` (422 on
    `target`) when the chain has no frontier, when no limits meet the target, or when the validation split
    is too small to certify it (the message names the best reachable value)."""
    assert f.target is not None
    top = chain[-1]
    exits = state.exits.get(top) or {}
    raw = exits.get("frontier")
    if raw is None:
        reason = exits.get("reason") or NO_FRONTIER
        raise Invalid(f"result {entry_id}'s chain has no exit frontier to choose limits from a target: {reason}",
                      "target")
    try:
        record = parse_frontier(raw)
    except ExitsError as exc:  # checked when reported: only a decider older than the record gets here
        raise Invalid(f"result {top}'s exit frontier cannot be read: {exc.message}", "target") from None
    entry = chain.index(entry_id)
    costs = {chain.index(rid): seconds for rid, seconds in (f.costs_s or {}).items()}
    try:
        choice: ExitChoice = choose_limits(record, f.target, entry=entry, costs_s=costs)
    except ExitsError as exc:
        raise Invalid(exc.message, "target") from None
    frontier = record.entry(entry)
    n_tiers = len(chain) - entry
    tiers = []
    for k in range(n_tiers):
        top_tier = k == n_tiers - 1
        predicted = {"share": choice.shares[k],
                     "agreement": None if top_tier else choice.tier_agreement[k],
                     "agreement_lower": None if top_tier else choice.tier_agreement_lower[k]}
        tiers.append(TierPlan(None if top_tier else choice.limits[k], "calibrated",
                              record.temperatures[entry + k], record.eps, predicted))
    chosen: JSON = {key: value for key, value in choice.to_json().items() if key != "target"}
    chosen["split"] = "validation"
    chosen["test"] = None if frontier.test is None else _split_prediction(frontier.test, choice.point)
    return InferencePlan(tiers, f.target.to_json(), chosen)
