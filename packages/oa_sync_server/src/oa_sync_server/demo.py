"""A synthetic agent runtime for ``oa-sync serve --demo``: runs and a worker, at a gentle rate.

:func:`demo_events` is a pure, endless script of the runtime event vocabulary (DESIGN.md): a
worker starts, then run after run is created, started on the worker, stepped with progress, calls
a tool and completes, while the worker receives and completes the matching request and sends
heartbeats. :func:`run_demo` appends that script through the event log, one event per tick, so
``runtime/run_summary:*`` and ``runtime/codex_worker_summary:*`` documents change every second.

What this is not: a load generator (see ``bench/``) or anything a production server runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import secrets
from collections.abc import Iterator
from typing import Any

import psycopg
import sqlalchemy as sa
import structlog
from oa_sync_core.codec import datetime_to_timestamp
from oa_sync_core.events import NewEvent

from oa_sync_server.postgres.event_log import PostgresEventLog

__all__ = ["demo_events", "run_demo"]

_TOOLS = ("search", "read_file", "run_tests", "edit_file")
_log = structlog.get_logger(__name__)


def _event(stream: str, event_type: str, **payload: Any) -> NewEvent:
    return NewEvent(stream_id=stream, type=event_type, payload=payload)


def demo_events(suffix: str) -> Iterator[NewEvent]:
    """The endless demo script, without timestamps.

    Args:
        suffix: makes ids unique per process (``demo-<suffix>-<n>``), so restarting the demo
            against the same database never collides with older streams.
    """
    worker_id = f"demo-worker-{suffix}"
    worker = f"worker:{worker_id}"
    yield _event(worker, "worker.started", workerId=worker_id, host="localhost", version="demo")
    n = 0
    while True:
        n += 1
        run_id = f"demo-{suffix}-{n}"
        run = f"run:{run_id}"
        request_id = f"req-{n}"
        yield _event(run, "run.created", runId=run_id, agentId="demo-agent", threadId="t-demo")
        yield _event(
            worker,
            "worker.request_received",
            workerId=worker_id,
            requestId=request_id,
            runId=run_id,
        )
        yield _event(run, "run.started", runId=run_id, workerId=worker_id)
        for step in range(1, 4):
            yield _event(
                run,
                "run.step",
                runId=run_id,
                stepIndex=step,
                description=f"step {step} of 4",
                progressPercent=step * 25,
            )
            if step == 2:
                yield _event(
                    run,
                    "run.tool_call",
                    runId=run_id,
                    toolName=_TOOLS[n % len(_TOOLS)],
                    callId=f"call-{n}",
                )
        yield _event(worker, "worker.heartbeat", workerId=worker_id, inFlightRequests=1)
        yield _event(run, "run.completed", runId=run_id, resultSummary=f"demo run {n} done")
        yield _event(
            worker,
            "worker.request_completed",
            workerId=worker_id,
            requestId=request_id,
            durationMs=str(1000 + 137 * n % 900),
        )


async def run_demo(
    event_log: PostgresEventLog, stop: asyncio.Event, *, interval_s: float = 0.25
) -> int:
    """Append the demo script, one event every ``interval_s``, until ``stop`` is set.

    Database errors are logged and retried on the next tick (the demo must not take the server
    down). Returns the number of events appended.
    """
    suffix = secrets.token_hex(3)
    appended = 0
    script = demo_events(suffix)
    pending = next(script)
    _log.info("demo_started", worker=f"demo-worker-{suffix}")
    while not stop.is_set():
        now = datetime_to_timestamp(dt.datetime.now(dt.UTC))
        event = NewEvent(
            stream_id=pending.stream_id,
            type=pending.type,
            payload={**pending.payload, "occurredAt": now},
        )
        try:
            await event_log.append([event])
        except (sa.exc.SQLAlchemyError, psycopg.Error, OSError) as exc:
            _log.warning("demo_append_failed", error=type(exc).__name__)
        else:
            appended += 1
            pending = next(script)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval_s):
                await stop.wait()
    return appended
