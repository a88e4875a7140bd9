"""The projector's look-ahead: the next batch read and folded while one is written.

The fold made ahead is used only when nothing else wrote a document in between (the last
watermark is the one the batch before left) and the lease cursor is still where it was read
from; anything else refolds from the database, so the read model always equals a fold of the
log.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from oa_sync_core import DocumentUpdate, canonical_json, content_hash
from oa_sync_core.testing import new_event
from oa_sync_server.postgres.event_log import PostgresEventLog
from oa_sync_server.postgres.stores import PostgresDocumentSink
from oa_sync_server.worker import ProjectorWorker
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tests.server.pg_projection import (
    assert_matches_fold,
    read_model,
    terminate_backend,
    wait_for_horizon,
)

RUN_0 = "runtime/run_summary:r0"


async def test_batches_folded_ahead_equal_a_pure_fold(engine: AsyncEngine) -> None:
    """Full batches are folded ahead while the one before is written (concurrent appenders
    meanwhile), and the read model equals a fold of the log, as without the look-ahead."""
    log = PostgresEventLog(engine)
    rng = random.Random(13)
    runs = [f"r{i}" for i in range(12)]
    await log.append([new_event("run.created", run) for run in runs])
    for _ in range(20):
        await log.append(
            [new_event("run.step", rng.choice(runs), description="x") for _ in range(7)]
        )
    worker = ProjectorWorker(engine, batch_size=5)

    async def append_more() -> None:
        for i in range(10):
            await log.append([new_event("run.step", runs[i], description="y")])

    consumed, _ = await asyncio.gather(worker.catch_up(), append_more())
    consumed += await worker.catch_up()
    assert consumed == 12 + 140 + 10
    assert worker.folded_ahead > 0
    with_look_ahead = await assert_matches_fold(engine)
    assert sum(v[0] for v in with_look_ahead["documents"].values()) == 162


class _WritingBetween(ProjectorWorker):
    """After its first batch commits, another writer rewrites document r0."""

    between = True
    batches = 0

    async def _pause(self, stage: str, conn: AsyncConnection | None) -> None:
        if stage != "committed":
            return
        self.batches += 1
        if self.batches == 1 and self.between:
            body = {"agentId": "written-between", "runId": "r0", "status": "CREATED"}
            canonical = canonical_json(body)
            update = DocumentUpdate(
                projection="runtime/run_summary",
                doc_key=RUN_0,
                version=2,
                body=body,
                canonical=canonical,
                content_hash=content_hash(canonical),
                last_position=0,
            )
            await PostgresDocumentSink(self.engine).publish([update])


async def _two_batches(
    engine: AsyncEngine, *, between: bool
) -> tuple[_WritingBetween, dict[str, Any]]:
    log = PostgresEventLog(engine)
    await log.append([new_event("run.created", "r0"), new_event("run.created", "r1")])
    await log.append([new_event("run.step", "r0", description="s"), new_event("run.step", "r1")])
    await wait_for_horizon(engine)
    worker = _WritingBetween(engine, batch_size=2)
    worker.between = between
    assert await worker.catch_up() == 4
    return worker, (await read_model(engine))["documents"]


async def test_a_document_written_between_batches_voids_the_fold_made_ahead(
    engine: AsyncEngine,
) -> None:
    """A document written by someone else between two batches is folded from what was
    written, not from the state the look-ahead took before it."""
    worker, documents = await _two_batches(engine, between=True)
    assert worker.folded_ahead == 0  # the second batch refolded from the database
    version, body = documents[RUN_0][0], documents[RUN_0][3]
    assert version == 3
    assert b'"agentId":"written-between"' in body
    assert b'"stepCount":1' in body


async def test_without_a_writer_between_the_fold_made_ahead_is_used(engine: AsyncEngine) -> None:
    """The same two batches with nobody writing between them use the fold made ahead."""
    worker, documents = await _two_batches(engine, between=False)
    assert worker.folded_ahead == 1
    assert documents[RUN_0][0] == 2
    await assert_matches_fold(engine)


class _KillingAhead(ProjectorWorker):
    """Records the look-ahead's connection at each batch; terminates its backend once, while
    it is idle between two look-aheads."""

    seen: list[object]
    killed = False

    async def _pause(self, stage: str, conn: AsyncConnection | None) -> None:
        if stage != "committed" or self._kept_ahead is None:
            return
        self.seen.append(self._kept_ahead)
        if not self.killed and self._ahead is not None:
            await asyncio.wait([self._ahead])  # its read is done: the connection is idle
            raw = (await self._kept_ahead.get_raw_connection()).driver_connection
            self.killed = True
            await terminate_backend(self.engine, raw.info.backend_pid)


async def test_the_look_ahead_keeps_its_connection_and_replaces_a_dead_one(
    engine: AsyncEngine,
) -> None:
    """Inside catch_up the look-ahead reads on a connection kept between batches (not one
    checked out of the pool each time); one whose backend died while idle is replaced
    without a failed batch; it is closed when catch_up returns; the read model equals a
    fold of the log."""
    log = PostgresEventLog(engine)
    runs = [f"r{i}" for i in range(10)]
    await log.append([new_event("run.created", run) for run in runs])
    for step in range(30):
        await log.append([new_event("run.step", run, description=f"s{step}") for run in runs])
    worker = _KillingAhead(engine, batch_size=20)
    worker.seen = []
    assert await worker.catch_up() == 310
    assert worker.killed
    assert worker.folded_ahead > 0
    distinct = {id(conn) for conn in worker.seen}
    assert 2 <= len(distinct) < len(worker.seen) / 2  # kept, and replaced once
    assert worker._kept_ahead is None  # closed when catch_up returned
    await assert_matches_fold(engine)
