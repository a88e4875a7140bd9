"""Rebuild: reproject 200,000 events (10,000 run streams) into an empty read model, events/s.

Setup (not timed): the events are bulk-loaded into ``oa_sync.events`` with COPY. The rebuild
is the reprojection path: ``oa_sync_core.replay.plan_reprojection`` folds the whole log read
through ``PostgresEventLog`` (gap-safe reads in log order) and compares with the Postgres read
model (``PostgresDocumentSink`` / ``PostgresCheckpointStore``); the rewrites are then written in
one transaction with the projector's own store functions (``write_updates``, one change row per
document, and ``put_checkpoints``), with the garbage collector settled as ``oa-sync reproject``
settles it (:func:`oa_sync_server.runtime.settle_collector`). Figures: events/s end to end, and
the fold and write shares.

Same-run baseline: reading the same events straight from Postgres with psycopg (rows/s), the
ceiling for any rebuild that must read the log.

Run alone: ``python bench/rebuild.py [--quick]``.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    Result,
    admin_url,
    bar_plot,
    drop_database,
    git_revision,
    load_average,
    machine,
    quick,
)
from _load import copy_events, interleaved_events, migrated_database

DB_NAME = "oa_sync_bench_rebuild"


async def rebuild(url: str) -> dict[str, Any]:
    """Plan (fold + compare) and apply a full reprojection; returns timings and counts."""
    from oa_sync_core import DEFAULT_PROJECTORS  # noqa: PLC0415
    from oa_sync_core.engine import ProjectionEngine  # noqa: PLC0415
    from oa_sync_core.replay import plan_reprojection  # noqa: PLC0415
    from oa_sync_server.postgres import create_engine  # noqa: PLC0415
    from oa_sync_server.postgres.event_log import PostgresEventLog  # noqa: PLC0415
    from oa_sync_server.postgres.stores import (  # noqa: PLC0415
        PostgresCheckpointStore,
        PostgresDocumentSink,
        put_checkpoints,
        write_updates,
    )

    engine = create_engine(url, pool_size=2)
    try:
        start = time.perf_counter()
        plan = await plan_reprojection(
            PostgresEventLog(engine),
            ProjectionEngine(DEFAULT_PROJECTORS),
            PostgresDocumentSink(engine),
            PostgresCheckpointStore(engine),
        )
        planned = time.perf_counter()
        async with engine.begin() as conn:
            await write_updates(conn, [u for u, _ in plan.rewrites], only_newer=False)
            await put_checkpoints(conn, [c for _, c in plan.rewrites])
        done = time.perf_counter()
    finally:
        await engine.dispose()
    return {
        "events": plan.events,
        "rewrites": len(plan.rewrites),
        "seconds": done - start,
        "plan_seconds": planned - start,
        "write_seconds": done - planned,
    }


def raw_read(url: str) -> float:
    """Rows/s of reading every event straight from Postgres in log order."""
    with psycopg.connect(url, autocommit=True) as conn:
        start = time.perf_counter()
        rows = conn.execute(
            "SELECT position, stream_id, stream_seq, type, payload, recorded_at"
            " FROM oa_sync.events ORDER BY tx_id, position"
        ).fetchall()
        return len(rows) / (time.perf_counter() - start)


def main() -> int:
    """Load, rebuild, compare; write bench/results/rebuild.json."""
    total, streams = (10_000, 500) if quick() else (200_000, 10_000)
    admin = admin_url()
    facts = machine(admin)
    load_before = load_average()
    url = migrated_database(admin, DB_NAME)
    from oa_sync_server.runtime import settle_collector  # noqa: PLC0415

    settle_collector()  # the baselines and ours alike, as `oa-sync reproject` runs
    try:
        copy_events(url, interleaved_events(total, streams))
        read_rate = raw_read(url)
        rebuilt = asyncio.run(rebuild(url))
    finally:
        drop_database(admin, DB_NAME)
    rate = rebuilt["events"] / rebuilt["seconds"]
    result = Result(
        name="rebuild",
        parameters={
            "events": total,
            "streams": streams,
            "path": "plan_reprojection(PostgresEventLog, ...) + write_updates/put_checkpoints,"
            " collector settled as oa-sync reproject's",
            "read_model_before": "empty",
            "git": git_revision(),
            "load_average_before": load_before,
            "load_average_after": load_average(),
        },
        figures={
            "rebuilt_events_per_s": rate,
            "seconds": rebuilt["seconds"],
            "fold_and_compare_seconds": rebuilt["plan_seconds"],
            "write_seconds": rebuilt["write_seconds"],
            "documents_rewritten": rebuilt["rewrites"],
            "events_folded": rebuilt["events"],
        },
        baseline={
            "raw_read_rows_per_s": read_rate,
            "ratio_rebuild_vs_raw_read": rate / read_rate,
        },
    )
    result.target("rebuild", rate, at_least=40_000, unit="events/s")
    result.target("rebuild / same-run raw log read", rate / read_rate, at_least=0.5, unit="x")
    if rebuilt["events"] != total or rebuilt["rewrites"] != streams:
        result.notes.append(
            f"CHECK FAILED: folded {rebuilt['events']} of {total} events, "
            f"rewrote {rebuilt['rewrites']} documents for {streams} streams"
        )
    plot = bar_plot(
        "rebuild",
        ["raw read", "rebuild"],
        [read_rate, rate],
        "events / s",
        f"reproject {total:,} events ({streams:,} documents)",
    )
    result.write(facts, plot)
    return 0 if rebuilt["events"] == total else 1


if __name__ == "__main__":
    raise SystemExit(main())
