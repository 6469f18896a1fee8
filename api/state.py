"""Typed app state (resources opened by the app factory), the API's Prometheus metrics, and its background
duties (`background`, a cleanup context the app factory adds after its resources)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tierflow.api.artefacts import ArtefactStore
from tierflow.api.collector import run_collector
from tierflow.api.outcomes import OutcomeWaiter
from tierflow.api.outputs import OutputReader
from tierflow.streams.health import HEALTHY, STALE_S
from tierflow.streams.kafka import fetch_highwater
from tierflow.streams.proofs import Signer
from tierflow.streams.settings import Settings


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("tierflow_api_requests_total", "HTTP requests", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("tierflow_api_request_seconds", "HTTP request latency", ["method", "route"],
                                 registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.commands = Counter("tierflow_api_commands_total", "Commands sent by the API, by outcome",
                                ["type", "outcome"], registry=self.registry)
        self.projection_lag = Gauge("tierflow_projection_lag_events", "Events not yet projected",
                                    registry=self.registry)
        self.artefacts_collected = Counter("tierflow_api_artefacts_collected_total",
                                           "Stored artefacts removed because no result names them",
                                           registry=self.registry)
        self.artefact_bytes_freed = Counter("tierflow_api_artefact_bytes_freed_total",
                                            "Bytes of the artefacts collected", registry=self.registry)
        # The worker's agents, as they last reported to Postgres (streams/health.py; the worker serves no HTTP).
        self.agent_up = Gauge("tierflow_agent_up", "1 while a worker agent starts or runs (and its worker reports), "
                              "0 otherwise", ["agent"], registry=self.registry)
        self.agent_restarts = Gauge("tierflow_agent_restarts", "Restarts of a worker agent since its worker "
                                    "started", ["agent"], registry=self.registry)
        self.agent_deadletter_failures = Gauge(
            "tierflow_agent_deadletter_failures", "Dead letters a worker agent could not send (logged and skipped) "
            "since its worker started", ["agent"], registry=self.registry)

    def observe_agents(self, agents: list[dict[str, Any]]) -> None:
        for a in agents:
            self.agent_up.labels(a["agent"]).set(1 if a["state"] in HEALTHY and a["age_s"] <= STALE_S else 0)
            self.agent_restarts.labels(a["agent"]).set(a["restarts"])
            self.agent_deadletter_failures.labels(a["agent"]).set(a["deadletter_failures"])

    def observe_command(self, command_type: str, outcome: dict[str, Any] | None) -> None:
        self.commands.labels(command_type, "pending" if outcome is None else str(outcome["status"])).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


@dataclass
class AppState:
    settings: Settings
    pool: asyncpg.Pool
    producer: AIOKafkaProducer
    outcomes: OutcomeWaiter
    events_consumer: AIOKafkaConsumer
    artefacts: ArtefactStore
    metrics: ApiMetrics = field(default_factory=ApiMetrics)
    #: signs the workloads' training reports (POST /reports); None when the API has no TIERFLOW_SECRET_KEY
    report_signer: Signer | None = None
    max_ready_lag: int = 1000
    #: the output topics' shared reader (/predictions, /stats); it connects on first use
    outputs: OutputReader = field(init=False)
    _hw_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        self.outputs = OutputReader(self.settings.kafka)

    async def events_highwater(self) -> int:
        """The events log's high-water mark, from one fetch of the probe consumer (/readyz, the artefact
        collection). The probe's partition stays paused in between (the app factory pauses it), so an idle API
        sends the broker nothing; `fetch_highwater` resumes it for this one fetch."""
        tp = TopicPartition(self.settings.kafka.events_topic, 0)
        async with self._hw_lock:
            pos = await self.events_consumer.position(tp)
            hw = await fetch_highwater(self.events_consumer, tp)
            # Keep the probe cheap: park the position near the end so each probe fetches little.
            if hw > pos:
                self.events_consumer.seek(tp, hw)
            return hw


STATE_KEY: web.AppKey[AppState] = web.AppKey("tierflow_state", AppState)


def get_state(request: web.Request) -> AppState:
    return request.app[STATE_KEY]


async def background(app: web.Application) -> AsyncIterator[None]:
    """The app's background duties (a `cleanup_ctx` after the one that opens the resources): the artefact
    collection runs for the app's lifetime; the shared output reader's clients close with it."""
    state = app[STATE_KEY]
    collector = asyncio.create_task(run_collector(state))
    try:
        yield
    finally:
        collector.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await collector
        await state.outputs.close()
