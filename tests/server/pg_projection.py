"""Test helpers for the Postgres projection: the reference fold and read-model invariants."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import sqlalchemy as sa
from oa_sync_core import DEFAULT_PROJECTORS, ProjectionEngine, canonical_json, fold_log
from oa_sync_server.postgres.event_log import PostgresEventLog
from oa_sync_server.postgres.tables import changes, checkpoints, documents, leases
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "assert_matches_fold",
    "expire_lease",
    "read_model",
    "terminate_backend",
    "wait_for_horizon",
    "wait_until",
]


async def wait_until(
    condition: Callable[[], Awaitable[bool]], *, within: float = 30.0, what: str = ""
) -> None:
    """Re-check ``condition`` every 20 ms until true; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.02)


async def wait_for_horizon(engine: AsyncEngine) -> None:
    """Wait until every transaction in flight now has ended, anywhere on the server.

    Transaction ids are cluster-wide: other test sessions sharing the server can hold the
    gap-safe read horizon back for a moment; reads of "everything committed" wait for them.
    """
    async with engine.connect() as conn:
        target = (
            await conn.execute(
                sa.text("SELECT CAST(pg_snapshot_xmax(pg_current_snapshot()) AS text)")
            )
        ).scalar_one()

    async def passed() -> bool:
        async with engine.connect() as conn:
            query = sa.text(
                "SELECT pg_snapshot_xmin(pg_current_snapshot()) >= CAST(CAST(:t AS text) AS xid8)"
            )
            return bool((await conn.execute(query, {"t": target})).scalar_one())

    await wait_until(passed, within=60, what="the read horizon")


async def read_model(engine: AsyncEngine) -> dict[str, Any]:
    """Documents (canonical bytes), checkpoints and change rows as stored."""
    async with engine.connect() as conn:
        docs = {
            r.doc_key: (r.version, r.watermark, r.content_hash, canonical_json(r.body))
            for r in await conn.execute(sa.select(documents))
        }
        cps = {
            r.doc_key: (r.last_position, r.projector_version, r.content_hash, r.version)
            for r in await conn.execute(sa.select(checkpoints))
        }
        rows = [
            (r.watermark, r.doc_key, r.version, r.content_hash)
            for r in await conn.execute(sa.select(changes).order_by(changes.c.watermark))
        ]
    return {"documents": docs, "checkpoints": cps, "changes": rows}


async def assert_matches_fold(engine: AsyncEngine, *, repaired: bool = False) -> dict[str, Any]:
    """The read model equals a pure fold of the committed log, and the change log is sound.

    Sound: watermarks 1..N with no gap; per document, versions strictly increase with the
    watermark (never decrease, after a repair at the same version); each document's watermark
    is that of its latest change.
    """
    await wait_for_horizon(engine)
    folded = await fold_log(PostgresEventLog(engine), ProjectionEngine(DEFAULT_PROJECTORS))
    model = await read_model(engine)
    expected_docs = {
        u.doc_key: (u.version, u.content_hash, u.canonical) for u in folded.documents.values()
    }
    actual_docs = {k: (v[0], v[2], v[3]) for k, v in model["documents"].items()}
    assert actual_docs == expected_docs
    expected_cps = {
        c.doc_key: (c.last_position, c.projector_version, c.content_hash, c.version)
        for c in folded.checkpoints.values()
    }
    assert model["checkpoints"] == expected_cps
    rows = model["changes"]
    assert [r[0] for r in rows] == list(range(1, len(rows) + 1))
    last: dict[str, tuple[int, int]] = {}
    for watermark, key, version, _ in rows:
        if key in last:
            ok = version >= last[key][1] if repaired else version > last[key][1]
            assert ok, f"{key} went from {last[key][1]} to {version}"
        last[key] = (watermark, version)
    for key, (version, watermark, _, _) in model["documents"].items():
        assert last[key] == (watermark, version)
    return model


async def expire_lease(engine: AsyncEngine, name: str = "default") -> None:
    """Make the lease look expired, as if its holder had been paused past its TTL."""
    async with engine.begin() as conn:
        await conn.execute(
            sa.update(leases)
            .where(leases.c.name == name)
            .values(expires_at=sa.func.now() - sa.text("interval '1 second'"))
        )


async def terminate_backend(engine: AsyncEngine, pid: int) -> None:
    """pg_terminate_backend, then wait until the backend is gone."""
    async with engine.connect() as admin:
        await admin.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})

    async def gone() -> bool:
        async with engine.connect() as admin:
            query = sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid")
            return (await admin.execute(query, {"pid": pid})).scalar_one() == 0

    await wait_until(gone, within=30, what=f"backend {pid} to exit")
