"""Sinks of the server beside the Postgres read model: the HTTP lane, selection, tee/parity.

The Postgres read model (``documents`` + ``changes``, written by the projector worker) is
always the projection state the server serves. ``OA_SYNC_SINK`` (see :mod:`.selection`) adds:

* ``http`` — :class:`~.delivery.HttpDeliveryLoop` follows the change log and POSTs each changed
  document to ``OA_SYNC_HTTP_SINK_URL`` (signed, idempotent, retried; refusals dead-lettered);
* ``tee`` — the same loop as the shadow lane of a parity run, with parity metrics refreshed;
* ``postgres`` / ``noop`` — nothing more.

:func:`start_sink` is the one hook the application calls: ``create_app`` enters it in a cleanup
context (``async with start_sink(settings, engine, metrics=metrics): yield``).

Modules: ``http`` (client + core ``Sink``), ``delivery`` (the loop), ``parity``, ``selection``,
``signing``, ``tables``. What this package is not: the projector, or the read side.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import AsyncIterator, Mapping

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from oa_sync_server.config import Settings
from oa_sync_server.metrics import Metrics
from oa_sync_server.sinks.delivery import (
    DEFAULT_SINK,
    DeadLetter,
    DeliveryPass,
    HttpDeliveryLoop,
    list_dead_letters,
)
from oa_sync_server.sinks.http import (
    DEFAULT_MUTATIONS,
    Delivered,
    DeliveryRequest,
    HttpDeliveryClient,
    HttpSink,
    HttpSinkError,
    HttpSinkOptions,
    Rejected,
    RetryPolicy,
)
from oa_sync_server.sinks.parity import (
    DeliveryMetrics,
    ParityMetrics,
    ParityReport,
    compute_parity,
)
from oa_sync_server.sinks.selection import SinkPlan, plan_sinks
from oa_sync_server.sinks.signing import verify_signature

__all__ = [
    "DEFAULT_MUTATIONS",
    "DEFAULT_SINK",
    "DeadLetter",
    "Delivered",
    "DeliveryMetrics",
    "DeliveryPass",
    "DeliveryRequest",
    "HttpDeliveryClient",
    "HttpDeliveryLoop",
    "HttpSink",
    "HttpSinkError",
    "HttpSinkOptions",
    "ParityMetrics",
    "ParityReport",
    "Rejected",
    "RetryPolicy",
    "SinkPlan",
    "SinkRuntime",
    "compute_parity",
    "list_dead_letters",
    "plan_sinks",
    "start_sink",
    "verify_signature",
]

_log = structlog.get_logger("oa_sync_server.sinks")
PARITY_REFRESH_S = 15.0


@dataclasses.dataclass(slots=True, kw_only=True)
class SinkRuntime:
    """What :func:`start_sink` started.

    Attributes:
        plan: the validated sink plan.
        loop: the HTTP delivery loop, or ``None`` when no HTTP lane runs.
        parity: the parity gauges, when metrics were given and this is a tee run.
    """

    plan: SinkPlan
    loop: HttpDeliveryLoop | None = None
    parity: ParityMetrics | None = None


@contextlib.asynccontextmanager
async def start_sink(
    settings: Settings,
    engine: AsyncEngine,
    *,
    metrics: Metrics | None = None,
    environ: Mapping[str, str] | None = None,
    poll_interval_s: float | None = None,
    parity_refresh_s: float = PARITY_REFRESH_S,
) -> AsyncIterator[SinkRuntime]:
    """Run the configured sink beside the Postgres read model for the duration of the block.

    For ``http`` and ``tee`` a background task runs :meth:`HttpDeliveryLoop.run`; on exit it is
    stopped (a backoff wait ends at once) and awaited. With ``metrics``, the loop's counters
    (:class:`DeliveryMetrics`) are registered on ``metrics.registry``; in ``tee`` mode the
    parity gauges (:class:`ParityMetrics`) are registered on ``metrics.registry`` and refreshed
    after a pass at most every ``parity_refresh_s``. For ``postgres`` and ``noop`` nothing runs.

    Hook for ``create_app`` (one cleanup context)::

        async def sink_context(app: web.Application) -> AsyncIterator[None]:
            async with start_sink(settings, engine, metrics=metrics):
                yield

    Args:
        settings: validated settings (``sink``, ``http_sink``, ``poll_interval_s``).
        engine: the database, migrated to head.
        metrics: the app's metrics, if any.
        environ: the environment for the HTTP sink's extra variables (``os.environ``).
        poll_interval_s: wait between passes when caught up (``settings.poll_interval_s``).
        parity_refresh_s: least time between two parity metric refreshes.

    Yields:
        The :class:`SinkRuntime`.

    Raises:
        ConfigError: on entry, a misconfigured sink (one line naming the variable).
    """
    plan = plan_sinks(settings, os.environ if environ is None else environ)
    if plan.http is None:
        _log.info("sink_selected", sink=plan.kind.value, http_lane=False)
        yield SinkRuntime(plan=plan)
        return
    parity = ParityMetrics(metrics.registry) if metrics is not None and plan.is_parity_run else None
    counters = DeliveryMetrics(metrics.registry) if metrics is not None else None
    refreshed_at = float("-inf")

    async def after_pass(done: DeliveryPass) -> None:
        nonlocal refreshed_at
        if counters is not None:
            counters.record(done)
        now = time.monotonic()
        if parity is None or now - refreshed_at < parity_refresh_s:
            return
        refreshed_at = now
        parity.update(await compute_parity(engine, sink=DEFAULT_SINK))

    async with HttpDeliveryClient(plan.http) as client:
        loop = HttpDeliveryLoop(
            engine,
            client,
            poll_interval_s=settings.poll_interval_s
            if poll_interval_s is None
            else poll_interval_s,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(loop.run(stop, after_pass=after_pass), name="oa-sync-http-sink")
        _log.info("sink_selected", sink=plan.kind.value, http_lane=True)
        try:
            yield SinkRuntime(plan=plan, loop=loop, parity=parity)
        finally:
            stop.set()
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=10.0)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
