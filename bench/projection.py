"""Projection throughput: 200,000 events across 10,000 streams, appended then projected.

1. Same-run baselines on the same Postgres: raw ``COPY`` rows/s into an event-log-shaped table
   and batched ``INSERT ... ON CONFLICT DO UPDATE`` rows/s into a document-shaped table.
2. Append: a separate process appends the events through ``PostgresEventLog.append`` in
   batches, on a kept connection as ``oa-sync serve`` and ``oa-sync append`` do (events/s
   appended, append commit included).
3. Project: ``ProjectorWorker.catch_up()`` in this process, from the first event to the last
   (events/s projected: every batch's documents, checkpoints, change rows and lease cursor
   committed). The worker starts after the appends are committed, so the figure is the
   projector's own rate, not the appender's. Both processes settle the garbage collector as
   ``oa-sync serve`` does before they start (:func:`oa_sync_server.runtime.settle_collector`).

Targets (issues 8, 13): projected at least 0.5 times the same-run upsert baseline; appended
at least 0.25 times the same-run COPY.
Run alone: ``python bench/projection.py [--quick]``.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    Result,
    admin_url,
    bar_plot,
    copy_baseline,
    drop_database,
    git_revision,
    load_average,
    machine,
    quick,
    upsert_baseline,
)
from _load import append_process, migrated_database

DB_NAME = "oa_sync_bench_projection"
FULL_EVENTS, FULL_STREAMS = 200_000, 10_000
"""The issue's size (about a minute on an idle 2-core machine; lower it here if needed)."""


async def project(url: str, batch_size: int) -> dict[str, Any]:
    """Catch the projector up from the start; returns events applied, seconds and row counts."""
    import sqlalchemy as sa  # noqa: PLC0415
    from oa_sync_server.postgres import create_engine  # noqa: PLC0415
    from oa_sync_server.worker import ProjectorWorker  # noqa: PLC0415

    engine = create_engine(url, pool_size=2)
    try:
        worker = ProjectorWorker(engine, name="bench", batch_size=batch_size)
        start = time.perf_counter()
        applied = await worker.catch_up()
        elapsed = time.perf_counter() - start
        async with engine.connect() as conn:
            documents = (
                await conn.execute(sa.text("SELECT count(*) FROM oa_sync.documents"))
            ).scalar_one()
            checkpoints = (
                await conn.execute(sa.text("SELECT count(*) FROM oa_sync.projection_checkpoints"))
            ).scalar_one()
            changes = (
                await conn.execute(sa.text("SELECT count(*) FROM oa_sync.changes"))
            ).scalar_one()
    finally:
        await engine.dispose()
    return {
        "applied": applied,
        "seconds": elapsed,
        "documents": documents,
        "checkpoints": checkpoints,
        "changes": changes,
    }


def main() -> int:
    """Run the baselines, the append and the projection; write bench/results/projection.json."""
    total, streams = (4_000, 400) if quick() else (FULL_EVENTS, FULL_STREAMS)
    append_batch, project_batch = 1_000, 1_000
    admin = admin_url()
    facts = machine(admin)
    load_before = load_average()
    url = migrated_database(admin, DB_NAME)
    from oa_sync_server.runtime import settle_collector  # noqa: PLC0415

    settle_collector()  # the baselines and ours alike, as `oa-sync serve` runs its projector
    try:
        copy_rate = copy_baseline(url, total, streams)
        upsert_rate = upsert_baseline(url, total, streams)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            appended = pool.submit(append_process, url, total, streams, append_batch).result()
        projected = asyncio.run(project(url, project_batch))
    finally:
        drop_database(admin, DB_NAME)
    append_rate = (appended["events"] - 1) / appended["seconds"]
    project_rate = projected["applied"] / projected["seconds"]
    batch_ms = sorted(1000 * s for s in appended["batch_seconds"])
    result = Result(
        name="projection",
        parameters={
            "events": total,
            "streams": streams,
            "append_batch": append_batch,
            "projector_batch": project_batch,
            "appender": "separate process (spawn), PostgresEventLog.append, own transactions"
            " on a kept connection (as serve and oa-sync append), collector settled as serve's",
            "projector": "ProjectorWorker.catch_up() in the benchmark process, after the appends,"
            " collector settled as serve's (runtime.settle_collector)",
            "git": git_revision(),
            "load_average_before": load_before,
            "load_average_after": load_average(),
        },
        figures={
            "appended_events_per_s": append_rate,
            "append_batch_p50_ms": batch_ms[len(batch_ms) // 2],
            "append_batch_p99_ms": batch_ms[int(len(batch_ms) * 0.99)],
            "projected_events_per_s": project_rate,
            "projection_seconds": projected["seconds"],
            "documents": projected["documents"],
            "checkpoints": projected["checkpoints"],
            "changes": projected["changes"],
        },
        baseline={
            "copy_rows_per_s": copy_rate,
            "upsert_rows_per_s": upsert_rate,
            "ratio_projected_vs_upsert": project_rate / upsert_rate,
            "ratio_appended_vs_copy": append_rate / copy_rate,
        },
    )
    result.target(
        "projected / same-run batched upsert",
        project_rate / upsert_rate,
        at_least=0.5,
        unit="x",
    )
    result.target(
        "appended (batches of 1,000) / same-run COPY",
        append_rate / copy_rate,
        at_least=0.25,
        unit="x",
    )
    if projected["applied"] != total or projected["documents"] != streams:
        result.notes.append(
            f"CHECK FAILED: applied {projected['applied']} of {total} events, "
            f"{projected['documents']} documents for {streams} streams"
        )
    plot = bar_plot(
        "projection",
        ["COPY (raw)", "upsert (raw)", "appended", "projected"],
        [copy_rate, upsert_rate, append_rate, project_rate],
        "rows or events / s",
        f"{total:,} events, {streams:,} streams",
    )
    result.write(facts, plot)
    return 0 if projected["applied"] == total else 1


if __name__ == "__main__":
    raise SystemExit(main())
