"""The aiohttp application: :func:`create_app` wires settings, database, projector, fan-out, API.

One :class:`ServerState` per app, under the typed key :data:`STATE`; no globals. Resources
live in cleanup contexts, started in order and stopped in reverse:

1. the engine (disposed on exit only when :func:`create_app` created it);
2. the fan-out :class:`~oa_sync_server.fanout.Hub` (its LISTEN connection and reader task);
3. the projector worker (``run_projector=True``), stopped by its stop event, then awaited;
4. the configured extra sink (``OA_SYNC_SINK=http|tee``, :func:`~oa_sync_server.sinks.start_sink`)
   beside the projector.

On shutdown the WebSocket connections are closed with 1001
(``oa_sync_server.transports.ws.close_all``) and the SSE streams end, before the cleanup contexts
run, so a SIGTERM drains promptly.

What this is not: the handlers (``transports.http``, ``transports.sse``, ``transports.ws``) or the
process entry point (``commands/serve.py`` opens the database and runs the app).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import structlog
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from oa_sync_server import openapi
from oa_sync_server.auth import TokenVerifier
from oa_sync_server.bus.local import LocalBus
from oa_sync_server.config import FanoutKind, Settings
from oa_sync_server.errors import ConfigError
from oa_sync_server.fanout import Hub
from oa_sync_server.metrics import Metrics
from oa_sync_server.postgres.engine import create_engine
from oa_sync_server.postgres.event_log import PostgresEventLog
from oa_sync_server.postgres.replica import ReadRouter
from oa_sync_server.sinks import start_sink
from oa_sync_server.state import STATE, ServerState
from oa_sync_server.transports import http as http_api
from oa_sync_server.transports import inspector, sse
from oa_sync_server.transports.ws import close_all, sync_handler
from oa_sync_server.worker import ProjectorWorker

if TYPE_CHECKING:
    from oa_sync_server.bus.changes import ChangeBus
    from oa_sync_server.bus.nats import NatsBus

__all__ = ["STATE", "ServerState", "create_app"]

_WORKER_STOP_TIMEOUT_S = 10.0

_log = structlog.get_logger(__name__)


def _nats_bus(settings: Settings, metrics: Metrics) -> NatsBus:
    try:
        from oa_sync_server.bus.nats import NatsBus  # noqa: PLC0415 - the optional extra
    except ImportError as exc:
        raise ConfigError(
            "OA_SYNC_FANOUT", "'nats' needs the nats extra: pip install 'oa-sync-server[nats]'"
        ) from exc
    assert settings.nats_url is not None  # Settings.from_env requires it with fanout=nats

    def published(count: int, republish: bool) -> None:
        metrics.bus_published.labels("republish" if republish else "commit").inc(count)

    return NatsBus(settings.nats_url, on_published=published)


async def _nothing() -> None:
    return None


def create_app(
    settings: Settings,
    *,
    engine: AsyncEngine | None = None,
    run_projector: bool = True,
) -> web.Application:
    """Build the sync server application.

    Args:
        settings: validated settings; a JWT key must be configured (see
            :meth:`Settings.require_jwt_key`).
        engine: an engine on a migrated database. The caller keeps ownership. When ``None``,
            the app creates one from ``settings.database_url`` and disposes of it.
        run_projector: also run the projector worker in this process (one per database holds
            the lease; others stand by).

    Returns:
        The application, ready for ``web.run_app`` or an ``AppRunner``.

    Raises:
        ConfigError: no engine given and no database URL configured, or no JWT key.
    """
    settings = settings.require_jwt_key()
    owned = engine is None
    if engine is None:
        if settings.database_url is None:
            raise ConfigError(
                "OA_SYNC_DATABASE_URL",
                "create_app needs an engine or a database URL (serve starts an embedded one)",
            )
        engine = create_engine(settings.database_url)
    metrics = Metrics()
    verifier = TokenVerifier(settings.jwt, metrics=metrics)
    nats = _nats_bus(settings, metrics) if settings.fanout is FanoutKind.NATS else None
    # Without NATS, this process's projector hands its commits to this process's hub.
    bus: ChangeBus | None = nats if nats is not None else LocalBus() if run_projector else None
    hub = Hub(engine, poll_interval_s=settings.poll_interval_s, metrics=metrics, bus=bus)
    replica = (
        None if settings.read_replica_url is None else create_engine(settings.read_replica_url)
    )
    reads = ReadRouter(
        engine, replica, on_choice=lambda target: metrics.catch_up_reads.labels(target).inc()
    )
    state = ServerState(
        settings=settings,
        engine=engine,
        verifier=verifier,
        metrics=metrics,
        hub=hub,
        reads=reads,
        event_log=PostgresEventLog(
            engine, max_events=settings.limits.max_append_events, keep_connection=True
        ),
        projector=(
            ProjectorWorker(
                engine,
                poll_interval_s=settings.poll_interval_s,
                retention_s=settings.changes_retention_s,
                bus=bus,
            )
            if run_projector
            else None
        ),
    )
    app = web.Application(
        client_max_size=settings.limits.max_body_bytes,
        middlewares=[http_api.cors_middleware, http_api.error_middleware],
    )
    app[STATE] = state

    async def engine_context(app: web.Application) -> AsyncIterator[None]:
        yield
        await state.catch_up_reads.close()
        await state.event_log.close()
        await verifier.close()
        if replica is not None:
            await replica.dispose()
        if owned:
            await state.engine.dispose()

    async def hub_context(app: web.Application) -> AsyncIterator[None]:
        await hub.start()
        if nats is not None:
            nats.start()
            if state.projector is not None:
                worker = state.projector
                nats.on_reconnect(lambda: worker._republish() if worker.epoch else _nothing())
        yield
        await hub.stop()
        if nats is not None:
            await nats.stop()

    async def projector_context(app: web.Application) -> AsyncIterator[None]:
        worker = state.projector
        if worker is None:
            yield
            return
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop), name="oa-sync-projector")
        yield
        stop.set()
        try:
            async with asyncio.timeout(_WORKER_STOP_TIMEOUT_S):
                await asyncio.shield(task)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if task.done() and not task.cancelled() and task.exception() is not None:
            _log.error("projector_failed", error=type(task.exception()).__name__)

    async def sink_context(app: web.Application) -> AsyncIterator[None]:
        if state.projector is None:
            yield
            return
        async with start_sink(settings, state.engine, metrics=metrics):
            yield

    async def on_shutdown(app: web.Application) -> None:
        state.stopping.set()
        for feed in list(state.streams):
            feed.close()
        await close_all(app)

    app.cleanup_ctx.append(engine_context)
    app.cleanup_ctx.append(hub_context)
    app.cleanup_ctx.append(projector_context)
    app.cleanup_ctx.append(sink_context)
    app.on_shutdown.append(on_shutdown)
    app.on_response_prepare.append(http_api.add_cors_headers)
    app.router.add_get("/v1/sync", sync_handler)
    http_api.add_routes(app)
    sse.add_routes(app)
    openapi.add_routes(app)
    inspector.add_routes(app)
    return app
