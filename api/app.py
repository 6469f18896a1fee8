"""The aiohttp app factory and the `tierflow api` entry point.

`create_app(settings)` refuses settings that would leave the API open by accident (api/auth.py:
`check_settings`), wires the routes, the middlewares (metrics, errors as JSON, then the doors of api/auth.py:
Host, Origin, content type, token, workload scope) and opens the resources (asyncpg pool, Kafka producer,
outcome listener, events probe) in `cleanup_ctx`, so nothing connects at import time and tests build the same
app as production.
The API never imports TensorFlow or the worker's agents.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import asyncpg
from aiohttp import web
from aiokafka import TopicPartition

from tierflow.api.artefacts import ArtefactStore
from tierflow.api.auth import ApiConfigError, check_settings, security_middleware
from tierflow.api.errors import Handler, error_middleware
from tierflow.api.outcomes import OutcomeWaiter
from tierflow.api.routes import routes
from tierflow.api.state import STATE_KEY, AppState, background, get_state
from tierflow.api.ui import setup_ui
from tierflow.projections.schema import migrate
from tierflow.streams import kafka as kio
from tierflow.streams.proofs import API, Signer
from tierflow.streams.settings import Settings

log = logging.getLogger("tierflow.api")

@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        if STATE_KEY in request.app:
            m = get_state(request).metrics
            m.requests.labels(request.method, route, str(status)).inc()
            m.latency.labels(request.method, route).observe(time.perf_counter() - started)


def create_app(settings: Settings) -> web.Application:
    """The API app; ApiConfigError when `settings` would leave it open (no token, no Host allow-list)."""
    check_settings(settings)
    app = web.Application(
        client_max_size=settings.api.max_body_bytes,
        middlewares=[metrics_middleware, error_middleware, security_middleware(settings)],
    )
    app.add_routes(routes)
    setup_ui(app)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        # The key that vouches for workloads' reports (streams/proofs.py); a short secret fails the start here.
        secret = settings.security.secret_key
        signer = Signer.from_secret(secret, API) if secret else None
        await migrate(settings.database.url)
        pool = await asyncpg.create_pool(settings.database.url, min_size=1, max_size=settings.database.pool_size,
                                         server_settings={"application_name": "tierflow-api"})
        producer = kio.producer(settings.kafka)
        await producer.start()
        probe = kio.consumer(settings.kafka)
        await probe.start()
        events = TopicPartition(settings.kafka.events_topic, 0)
        probe.assign([events])
        # Paused except inside `events_highwater`: an assigned partition is otherwise fetched back to back by
        # aiokafka's background fetcher, ~150 requests/s to the broker from an idle API (issue 12).
        probe.pause(events)
        outcomes = OutcomeWaiter(pool)
        await outcomes.start(settings.database.url)
        app[STATE_KEY] = AppState(settings=settings, pool=pool, producer=producer, outcomes=outcomes,
                                  events_consumer=probe,
                                  artefacts=ArtefactStore(settings.artefacts_path(),
                                                          max_bytes=settings.api.max_artefact_bytes),
                                  report_signer=signer)
        try:
            yield
        finally:
            await outcomes.stop()
            await probe.stop()
            await producer.stop()
            await pool.close()

    app.cleanup_ctx.append(resources)
    app.cleanup_ctx.append(background)  # after `resources`: it uses them, and stops before they close
    return app


def run_api(settings: Settings) -> int:
    from tierflow.streams.stack_state import with_stack_endpoints

    resolved = with_stack_endpoints(settings)
    if resolved is None:
        log.error("no KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL and no running embedded stack in %s", settings.stack.home)
        return 2
    settings = resolved
    try:
        app = create_app(settings)
    except ApiConfigError as exc:
        log.error("%s", exc)
        return 2
    web.run_app(app, host=settings.api.host, port=settings.api.port, print=None,
                access_log=None, shutdown_timeout=5)
    return 0
