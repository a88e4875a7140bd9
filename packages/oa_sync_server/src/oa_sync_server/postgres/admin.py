"""Drift detection and reprojection over the live Postgres read model.

Both compare the read model with a pure fold of *the part of the log the projector has
folded*: events up to the projector lease's cursor (:class:`~oa_sync_server.postgres.event_log.
BoundedLog`), so events appended but not yet projected never show up as drift.

* :func:`check_drift` runs in one ``REPEATABLE READ`` read-only transaction: the cursor, the
  events, the documents and the checkpoints all come from the same snapshot, and the worker
  commits documents and cursor together, so the comparison is exact while the worker runs.
  Nothing is written.
* :func:`reproject` runs in one transaction that locks the lease row (a live worker's next
  batch waits for it) and the watermark lock, refolds, and rewrites only the documents that
  differ from the fold (:func:`oa_sync_core.plan_reprojection`), each with a new change row
  and watermark, plus its checkpoint. A healthy read model gets no write at all, so a
  reprojection over it leaves every document byte-identical. ``dry_run`` rolls back.

Epoch. Watermarks keep increasing, so a repair that only moves documents *forward* (a missing
or stale document gets a higher version) keeps ``sync_meta.epoch``. A repair that rewrites a
document at a version a client may already hold with other bytes (a corrupted row, or a new
projector version) would be dropped by every client as a repeat, so it also writes a new
random epoch:
clients resuming with the old one get ``reset`` and a fresh snapshot.

What this is not: a rebuild from scratch that restarts watermarks (that would bump
``sync_meta.epoch``), or a way to remove documents the log no longer produces — drift reports
those as ``orphaned``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import sqlalchemy as sa
from oa_sync_core import (
    DEFAULT_PROJECTORS,
    DriftDetector,
    DriftReport,
    ProjectionEngine,
    Projector,
    canonical_json,
    content_hash,
    plan_reprojection,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from oa_sync_server.postgres.event_log import BoundedLog, LogCursor
from oa_sync_server.postgres.stores import (
    PostgresCheckpointStore,
    PostgresDocumentSink,
    lock_watermarks,
    put_checkpoints,
    write_updates,
)
from oa_sync_server.postgres.tables import NOTIFY_CHANGES

__all__ = ["ReprojectionOutcome", "check_drift", "prune_changes", "reproject"]

Progress = Callable[[int], None]

_CURSOR = sa.text(
    "SELECT CAST(CAST(cursor_tx_id AS text) AS bigint) AS tx, cursor_position "
    "FROM oa_sync.projector_leases WHERE name = :name"
)
_CURSOR_LOCKED = sa.text(
    "SELECT CAST(CAST(cursor_tx_id AS text) AS bigint) AS tx, cursor_position "
    "FROM oa_sync.projector_leases WHERE name = :name FOR UPDATE"
)
_NEW_EPOCH = sa.text(
    "UPDATE oa_sync.sync_meta SET value = CAST(gen_random_uuid() AS text) WHERE key = 'epoch'"
)
_PRUNABLE = sa.text(
    "SELECT coalesce(max(watermark), 0) FROM oa_sync.changes "
    "WHERE committed_at < clock_timestamp() - make_interval(secs => :age)"
)
_SINK_TABLE = sa.text("SELECT to_regclass('oa_sync.http_sink_checkpoints') IS NOT NULL")
_SINK_LOW = sa.text("SELECT min(last_watermark) FROM oa_sync.http_sink_checkpoints")
_PRUNE = sa.text("DELETE FROM oa_sync.changes WHERE watermark <= :bound")
_RETAINED = sa.text(
    "UPDATE oa_sync.sync_meta SET value = CAST(CAST(:bound AS bigint) AS text) "
    "WHERE key = 'retained_from' AND CAST(value AS bigint) < :bound"
)


async def _cursor(conn: AsyncConnection, worker: str, *, lock: bool) -> LogCursor | None:
    row = (await conn.execute(_CURSOR_LOCKED if lock else _CURSOR, {"name": worker})).one_or_none()
    return None if row is None else LogCursor(tx_id=row.tx, position=row.cursor_position)


async def check_drift(
    engine: AsyncEngine,
    *,
    projectors: Iterable[Projector] = DEFAULT_PROJECTORS,
    projection: str | None = None,
    worker: str = "default",
    progress: Progress | None = None,
) -> DriftReport:
    """Compare the read model with a fold of the log up to the projector's cursor.

    Args:
        engine: the async engine.
        projectors: the projectors the worker runs.
        projection: only this projection.
        worker: the projector lease whose cursor bounds the fold (without one: the whole log).
        progress: called with the events folded so far, after each batch.

    Returns:
        The report; ``report.ok`` when nothing drifted.

    Raises:
        KeyError: no projector named ``projection``.
    """
    detector = DriftDetector(ProjectionEngine(projectors))
    async with engine.connect() as plain:
        conn = await plain.execution_options(
            isolation_level="REPEATABLE READ", postgresql_readonly=True
        )
        async with conn.begin():
            upto = await _cursor(conn, worker, lock=False)
            return await detector.check(
                BoundedLog(conn, upto),
                PostgresDocumentSink(conn),
                PostgresCheckpointStore(conn),
                projection=projection,
                progress=progress,
            )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ReprojectionOutcome:
    """What :func:`reproject` did (or, with ``dry_run``, would do).

    Attributes:
        rewritten: keys of the documents rewritten, in watermark order.
        unchanged: documents already equal to the fold.
        events: events folded.
        watermark: the last watermark after the rewrite (unchanged when nothing was written).
        epoch_changed: a document was rewritten at a version clients may hold, so the log
            epoch was (or, in a dry run, would be) replaced.
        dry_run: nothing was committed.
    """

    rewritten: tuple[str, ...]
    unchanged: int
    events: int
    watermark: int
    epoch_changed: bool
    dry_run: bool


async def reproject(
    engine: AsyncEngine,
    *,
    projectors: Iterable[Projector] = DEFAULT_PROJECTORS,
    projection: str | None = None,
    doc_key: str | None = None,
    dry_run: bool = False,
    worker: str = "default",
    progress: Progress | None = None,
) -> ReprojectionOutcome:
    """Refold and rewrite the documents that differ from the fold, in one transaction.

    Args:
        engine: the async engine.
        projectors: the projectors the worker runs.
        projection: only this projection.
        doc_key: only this document.
        dry_run: plan only; roll back.
        worker: the projector lease whose cursor bounds the fold (locked meanwhile).
        progress: called with the events folded so far, after each batch.

    Raises:
        KeyError: no projector for ``projection`` / ``doc_key``.
    """
    selected = ProjectionEngine(projectors)
    async with engine.connect() as conn:
        tx = await conn.begin()
        try:
            upto = await _cursor(conn, worker, lock=True)
            last = await lock_watermarks(conn)
            plan = await plan_reprojection(
                BoundedLog(conn, upto),
                selected,
                PostgresDocumentSink(conn),
                PostgresCheckpointStore(conn),
                projection=projection,
                doc_key=doc_key,
                progress=progress,
            )
            updates = [update for update, _ in plan.rewrites]
            watermark = last
            held = await PostgresDocumentSink(conn).get_documents(u.id for u in updates)
            new_epoch = any(
                u.id in held
                and held[u.id].version >= u.version
                and content_hash(canonical_json(held[u.id].body)) != u.content_hash
                for u in updates
            )
            if updates and not dry_run:
                if new_epoch:
                    await conn.execute(_NEW_EPOCH)
                written = await write_updates(conn, updates, only_newer=False, locked_at=last)
                await put_checkpoints(conn, (checkpoint for _, checkpoint in plan.rewrites))
                await conn.execute(NOTIFY_CHANGES, {"watermark": str(written.last_watermark)})
                watermark = written.last_watermark
        except BaseException:
            await tx.rollback()
            raise
        if dry_run:
            await tx.rollback()
        else:
            await tx.commit()
    return ReprojectionOutcome(
        rewritten=tuple(u.doc_key for u in updates),
        unchanged=plan.unchanged,
        events=plan.events,
        watermark=watermark,
        epoch_changed=new_epoch,
        dry_run=dry_run,
    )


async def prune_changes(engine: AsyncEngine, *, older_than_s: float) -> int:
    """Delete change rows committed more than ``older_than_s`` ago; raise ``retained_from``.

    Documents keep their watermarks, so watermarks never restart and the epoch is kept;
    a client resuming from below ``retained_from`` is answered with ``reset``. Changes an HTTP
    sink has not delivered yet (``http_sink_checkpoints``) are kept.

    Returns:
        The new ``retained_from`` (unchanged: 0 or its old value, when nothing was pruned).
    """
    async with engine.begin() as conn:
        await lock_watermarks(conn)
        bound = int((await conn.execute(_PRUNABLE, {"age": older_than_s})).scalar_one())
        if (await conn.execute(_SINK_TABLE)).scalar_one():
            low = (await conn.execute(_SINK_LOW)).scalar_one()
            if low is not None:
                bound = min(bound, int(low))
        if bound > 0:
            await conn.execute(_PRUNE, {"bound": bound})
            await conn.execute(_RETAINED, {"bound": bound})
        value = await conn.execute(
            sa.text(
                "SELECT CAST(value AS bigint) FROM oa_sync.sync_meta WHERE key = 'retained_from'"
            )
        )
        return int(value.scalar_one())
