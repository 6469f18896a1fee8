"""A tier's numbers: its Prometheus metrics (`TierMetrics`) and the same counts as plain `TierStats`.

Fed by the batching loop (`tierflow.tiers.tier_agent`) once per batch, never per sample, through plain
numbers: its counters are the agent's `TierStats`, read when `/metrics` is scraped, and its histograms are
`BulkHistogram`s (a bisect per value, one numpy call for a large batch). Served as `GET /metrics` by the tier's
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

from bisect import bisect_left
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from tierflow.streams.exits import LiveAgreement
from tierflow.tiers.tier_config import TierConfig

Array = np.ndarray[Any, Any]
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
_TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Values from which `BulkHistogram.observe_many` counts with numpy rather than one by one.
_NUMPY_FROM = 16


class BulkHistogram:
    """A Prometheus histogram's counts, kept as plain numbers and exported by `TierMetrics`' collector.

    prometheus_client's `Histogram.observe` takes a lock and walks the bounds in Python (~3 us per value, as
    much as routing a sample); at 200 one-sample records/s a tier's time goes mostly into code run once per
    record, so each batch costs a `bisect` per value here, and a large batch one numpy call.
    """

    def __init__(self, name: str, doc: str, buckets: tuple[float, ...]) -> None:
        self.name, self.doc = name, doc
        self._bounds = [float(b) for b in buckets]
        self._counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1  # bucket `le=b` counts values <= b
        self.sum += value

    def observe_many(self, values: Array) -> None:
        if len(values) < _NUMPY_FROM:
            for value in values.tolist():
                self.observe(value)
            return
        counts = np.bincount(np.searchsorted(self._bounds, values, side="left"), minlength=len(self._counts))
        self._counts = [a + b for a, b in zip(self._counts, counts.tolist(), strict=True)]
        self.sum += float(np.sum(values))

    @property
    def count(self) -> int:
        return sum(self._counts)

    def family(self, labels: Mapping[str, str]) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.doc, labels=list(labels))
        cumulative = np.cumsum(self._counts).tolist()
        buckets = [(repr(b), c) for b, c in zip(self._bounds, cumulative[:-1], strict=True)]
        family.add_metric(list(labels.values()), [*buckets, ("+Inf", cumulative[-1])], self.sum)
        return family


#: The tier's counters: (metric name, `TierStats` field, help).
_COUNTERS = (
    ("tierflow_tier_records", "records", "Input records consumed"),
    ("tierflow_tier_samples", "samples", "Input samples decoded"),
    ("tierflow_tier_answered", "answered", "Samples answered by this tier's exit"),
    ("tierflow_tier_forwarded", "forwarded", "Samples forwarded to the upper tier"),
    ("tierflow_tier_deadlettered", "deadlettered", "Records sent to the dead-letter topic"),
    ("tierflow_tier_deadletter_failures", "deadletter_failures", "Dead letters that could not be sent (logged and "
                                                                  "skipped)"),
    ("tierflow_tier_shadowed", "shadowed", "Answered samples also sent up as shadow samples"),
    ("tierflow_tier_shadow_passed", "shadow_passed", "Shadow samples of lower tiers passed up"),
)


class TierMetrics(Collector):
    """The tier's Prometheus metrics, in their own registry (several agents may share a process).

    The counters are the agent's `TierStats`, read when the registry is collected (`GET /metrics`); the
    histograms are `BulkHistogram`s the agent feeds once per batch. So a batch touches no Prometheus code.
    """

    def __init__(self, config: TierConfig, stats: TierStats, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.stats = stats
        self._labels = {"inference": str(config.inference_id), "tier": str(config.tier_index)}
        self.batch_records = BulkHistogram("tierflow_tier_batch_records", "Records per consumed batch", _SIZE_BUCKETS)
        self.batch_samples = BulkHistogram("tierflow_tier_batch_samples", "Samples per model call batch",
                                           _SIZE_BUCKETS)
        self.latency = BulkHistogram("tierflow_tier_latency_seconds",
                                     "From a sample's original input timestamp to this tier's answer", _TIME_BUCKETS)
        self.processing = BulkHistogram("tierflow_tier_processing_seconds",
                                        "From a batch's arrival to the acknowledgement of all it produced",
                                        _TIME_BUCKETS)
        self.model = BulkHistogram("tierflow_tier_model_seconds", "Model time per batch", _TIME_BUCKETS)
        self.registry.register(self)
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

    def collect(self) -> Iterable[Metric]:
        for name, field, doc in _COUNTERS:
            family = CounterMetricFamily(name, doc, labels=list(self._labels))
            family.add_metric(list(self._labels.values()), float(getattr(self.stats, field)))
            yield family
        for histogram in (self.batch_records, self.batch_samples, self.latency, self.processing, self.model):
            yield histogram.family(self._labels)

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
    """Plain counters of what the agent did (tests, logs, `/readyz`); the metrics' counters read them."""

    records: int = 0
    samples: int = 0
    answered: int = 0
    forwarded: int = 0
    deadlettered: int = 0
    #: Dead letters that could not be sent (logged and skipped).
    deadletter_failures: int = 0
    batches: int = 0
    #: Records whose offsets were committed (after every record produced for them was acknowledged).
    committed: int = 0
    #: Answered samples this tier also sent up as shadow samples; lower tiers' shadow samples it passed up;
    #: at the top, shadow outcomes it recorded.
    shadowed: int = 0
    shadow_passed: int = 0
    shadow_outcomes: int = 0
