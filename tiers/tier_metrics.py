"""A tier's numbers: its Prometheus metrics (`TierMetrics`) and the same counts as plain `TierStats`.

Fed by the batching loop (`tierflow.tiers.tier_agent`) once per batch, never per sample: the latency of
every answered sample goes into a `BulkHistogram` in one numpy call. Served as `GET /metrics` by the tier's
web server (`tierflow.tiers.tier_app`); each agent has its own registry, so several tiers may share a
process (tests, benchmarks).

The live agreement of the chain's early answers (shadow samples, streams/wire.py) is exported by the TOP
tier, labelled with the lower tier whose answers it measures: the counters `tierflow_live_outcomes_total`
and `tierflow_live_agreeing_total` (shadow outcomes, and those where the tier's class is the top exit's),
and the gauges `tierflow_live_agreement` (their ratio since the top tier started),
`tierflow_live_agreement_predicted_lower` (the inference's predicted lower bound, when its limits were
chosen from a target) and `tierflow_live_drift` (1 while streams/exits.py `live_agreement` flags the tier
as drifting below it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from tierflow.streams.exits import LiveAgreement
from tierflow.tiers.tier_config import TierConfig

Array = np.ndarray[Any, Any]
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
_TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class BulkHistogram(Collector):
    """A Prometheus histogram fed a numpy array at a time (a `Histogram.observe` per sample costs ~3 us, as
    much as routing the sample)."""

    def __init__(self, name: str, doc: str, labels: Mapping[str, str], buckets: tuple[float, ...],
                 registry: CollectorRegistry) -> None:
        self.name, self.doc, self.labels = name, doc, dict(labels)
        self._bounds = np.asarray(buckets, dtype=np.float64)
        self._counts = np.zeros(len(buckets) + 1, dtype=np.int64)
        self.sum = 0.0
        registry.register(self)

    def observe_many(self, values: Array) -> None:
        if len(values):
            # Bucket `le=b` counts values <= b: the first bound >= the value.
            self._counts += np.bincount(np.searchsorted(self._bounds, values, side="left"),
                                        minlength=len(self._counts))
            self.sum += float(np.sum(values))

    @property
    def count(self) -> int:
        return int(self._counts.sum())

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self.name, self.doc, labels=list(self.labels))
        cumulative = np.cumsum(self._counts).tolist()
        buckets = [(repr(b), c) for b, c in zip(self._bounds.tolist(), cumulative[:-1], strict=True)]
        family.add_metric(list(self.labels.values()), [*buckets, ("+Inf", cumulative[-1])], self.sum)
        yield family


class TierMetrics:
    """The tier's Prometheus metrics, in their own registry (several agents may share a process)."""

    def __init__(self, config: TierConfig, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        names = ("inference", "tier")
        values = (str(config.inference_id), str(config.tier_index))

        def counter(name: str, doc: str) -> Any:
            return Counter(name, doc, names, registry=self.registry).labels(*values)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(name, doc, names, registry=self.registry, buckets=buckets).labels(*values)

        self.records = counter("tierflow_tier_records", "Input records consumed")
        self.samples = counter("tierflow_tier_samples", "Input samples decoded")
        self.answered = counter("tierflow_tier_answered", "Samples answered by this tier's exit")
        self.forwarded = counter("tierflow_tier_forwarded", "Samples forwarded to the upper tier")
        self.deadlettered = counter("tierflow_tier_deadlettered", "Records sent to the dead-letter topic")
        self.deadletter_failures = counter("tierflow_tier_deadletter_failures",
                                           "Dead letters that could not be sent (logged and skipped)")
        self.batch_records = histogram("tierflow_tier_batch_records", "Records per consumed batch", _SIZE_BUCKETS)
        self.batch_samples = histogram("tierflow_tier_batch_samples", "Samples per model call batch", _SIZE_BUCKETS)
        self.latency = BulkHistogram("tierflow_tier_latency_seconds",
                                     "From a sample's original input timestamp to this tier's answer",
                                     dict(zip(names, values, strict=True)), _TIME_BUCKETS, self.registry)
        self.processing = histogram("tierflow_tier_processing_seconds",
                                    "From a batch's arrival to the acknowledgement of all it produced", _TIME_BUCKETS)
        self.model = histogram("tierflow_tier_model_seconds", "Model time per batch", _TIME_BUCKETS)
        self.shadowed = counter("tierflow_tier_shadowed", "Answered samples also sent up as shadow samples")
        self.shadow_passed = counter("tierflow_tier_shadow_passed", "Shadow samples of lower tiers passed up")
        # At the top tier, per lower tier (label `tier`: the tier whose early answers are measured).
        self._inference = str(config.inference_id)
        live = ("inference", "tier")
        self.live_outcomes = Counter("tierflow_live_outcomes", "Shadow outcomes of the tier's answers seen by the "
                                     "top tier", live, registry=self.registry)
        self.live_agreeing = Counter("tierflow_live_agreeing", "... of them, answers with the top exit's class",
                                     live, registry=self.registry)
        self.live_agreement = Gauge("tierflow_live_agreement", "Live agreement of the tier's answers with the top "
                                    "exit (agreeing / outcomes)", live, registry=self.registry)
        self.live_predicted_lower = Gauge("tierflow_live_agreement_predicted_lower", "The predicted agreement's "
                                          "lower bound (limits chosen from a target)", live, registry=self.registry)
        self.live_drift = Gauge("tierflow_live_drift", "1 while the tier's live agreement is significantly below "
                                "the predicted lower bound (streams/exits.py live_agreement)", live,
                                registry=self.registry)

    def observe_live(self, tier: int, outcomes: int, agreeing: int, live: LiveAgreement) -> None:
        """Count lower tier `tier`'s new shadow outcomes (`agreeing` of them with the top exit's class) and set
        its live agreement gauges to `live` (the top tier, after each batch of shadow outcomes)."""
        labels = (self._inference, str(tier))
        self.live_outcomes.labels(*labels).inc(outcomes)
        self.live_agreeing.labels(*labels).inc(agreeing)
        if live.agreement is not None:
            self.live_agreement.labels(*labels).set(live.agreement)
        if live.predicted_lower is not None:
            self.live_predicted_lower.labels(*labels).set(live.predicted_lower)
        self.live_drift.labels(*labels).set(1 if live.drift else 0)


@dataclass
class TierStats:
    """Plain counters of what the agent did (tests, logs); the same numbers as the metrics."""

    records: int = 0
    samples: int = 0
    answered: int = 0
    forwarded: int = 0
    deadlettered: int = 0
    batches: int = 0
    #: Records whose offsets were committed (after every record produced for them was acknowledged).
    committed: int = 0
    #: Answered samples this tier also sent up as shadow samples; lower tiers' shadow samples it passed up;
    #: at the top, shadow outcomes it recorded.
    shadowed: int = 0
    shadow_passed: int = 0
    shadow_outcomes: int = 0
