"""Load generation shared by the benchmarks: realistic run events and migrated databases.

The events are the runtime vocabulary of DESIGN.md: each run stream gets ``run.created``,
``run.started``, then ``run.step`` events, a ``run.tool_call`` now and then, and
``run.completed`` last when the stream is long enough. Streams are interleaved round-robin, as
many concurrent runs would write them. Nothing here is timed; callers time what they measure.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

from _common import temp_database
from oa_sync_core import NewEvent
from oa_sync_core.testing import new_event

TIMESTAMP = "2026-11-25T12:00:00Z"


def run_event(run: int, index: int, length: int) -> NewEvent:
    """Event ``index`` (0-based) of run ``r<run>`` in a stream of ``length`` events."""
    ident = f"r{run}"
    if index == 0:
        return new_event(
            "run.created",
            ident,
            agentId=f"agent-{run % 50}",
            threadId=f"t{run}",
            occurred_at=TIMESTAMP,
        )
    if index == 1:
        return new_event("run.started", ident, workerId=f"w-{run % 20}", occurred_at=TIMESTAMP)
    if index == length - 1 and length > 3:
        return new_event("run.completed", ident, resultSummary="done", occurred_at=TIMESTAMP)
    if index % 5 == 4:
        return new_event(
            "run.tool_call", ident, toolName="shell", callId=f"c{index}", occurred_at=TIMESTAMP
        )
    return new_event(
        "run.step",
        ident,
        stepIndex=index,
        description=f"step {index}: editing files",
        progressPercent=min(99, index * 5),
        occurred_at=TIMESTAMP,
    )


def interleaved_events(total: int, streams: int, *, first_run: int = 0) -> list[NewEvent]:
    """``total`` events over ``streams`` run streams, round-robin, each stream in order.

    Each event's payload is a validated template (built once per position in the stream with
    :func:`run_event`) with the run's own ids put in, so building 200,000 events takes a
    second, not the half-minute that validating each one would.
    """
    length = -(-total // streams)
    templates = [run_event(0, index, length) for index in range(length)]
    out: list[NewEvent] = []
    for index in range(length):
        template = templates[index]
        for run in range(first_run, first_run + streams):
            if len(out) == total:
                return out
            payload = dict(template.payload)
            payload["runId"] = f"r{run}"
            if "threadId" in payload:
                payload["threadId"] = f"t{run}"
            out.append(NewEvent(stream_id=f"run:r{run}", type=template.type, payload=payload))
    return out


def copy_events(url: str, events: list[NewEvent], *, start_seq: int = 0) -> None:
    """Bulk-load ``events`` straight into ``oa_sync.events`` with COPY (setup, not the product).

    Stream sequence numbers are assigned here in list order, after ``start_seq`` (the events
    every stream already holds); the table's defaults give
    ``tx_id`` and ``recorded_at``. One transaction, so log order equals list order. The table
    is analysed afterwards, as autovacuum would do for a live log.
    """
    import json  # noqa: PLC0415

    import psycopg  # noqa: PLC0415

    seqs: dict[str, int] = {}
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        with cur.copy(
            "COPY oa_sync.events (stream_id, stream_seq, type, payload) FROM STDIN"
        ) as copy:
            for event in events:
                seq = seqs.get(event.stream_id, start_seq) + 1
                seqs[event.stream_id] = seq
                copy.write_row((event.stream_id, seq, event.type, json.dumps(event.payload)))
        conn.commit()
        # A live log has statistics (autovacuum); a table filled by one COPY has none yet, and
        # the planner would then scan and sort it for every cursor read.
        conn.execute("ANALYZE oa_sync.events")
        conn.commit()


def batches(events: list[NewEvent], size: int) -> Iterator[list[NewEvent]]:
    """Consecutive slices of ``size`` events."""
    for start in range(0, len(events), size):
        yield events[start : start + size]


def migrated_database(admin: str, name: str) -> str:
    """A fresh database ``name`` migrated to head; returns its URL."""
    from oa_sync_server.postgres.migrate import upgrade  # noqa: PLC0415

    url = temp_database(admin, name)
    upgrade(url)
    return url


def append_process(url: str, total: int, streams: int, batch: int) -> dict[str, Any]:
    """Append ``total`` events in batches through PostgresEventLog (run in a child process).

    Returns:
        ``{"events": n, "seconds": elapsed, "batch_seconds": [...]}``; the build of the events
        is not timed, only the appends.
    """
    events = interleaved_events(total, streams)
    return asyncio.run(_append_all(url, events, batch))


async def _append_all(url: str, events: list[NewEvent], batch: int) -> dict[str, Any]:
    from oa_sync_server.postgres import create_engine  # noqa: PLC0415
    from oa_sync_server.postgres.event_log import PostgresEventLog  # noqa: PLC0415
    from oa_sync_server.runtime import settle_collector  # noqa: PLC0415

    engine = create_engine(url, pool_size=2)
    # A kept connection, as `oa-sync serve` and `oa-sync append` append.
    log = PostgresEventLog(engine, keep_connection=True)
    timings: list[float] = []
    try:
        await log.append(events[:1])  # connect and warm up outside the timing
        settle_collector()  # as `oa-sync serve` and `oa-sync append` run appends
        start = time.perf_counter()
        for chunk in batches(events[1:], batch):
            t0 = time.perf_counter()
            await log.append(chunk)
            timings.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
    finally:
        await log.close()
        await engine.dispose()
    return {"events": len(events), "seconds": elapsed, "batch_seconds": timings}
