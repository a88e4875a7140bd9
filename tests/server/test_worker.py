"""The projector worker against real Postgres: exactly-once, gap-free, lease, NOTIFY."""

from __future__ import annotations

import asyncio
import random

import psycopg
import pytest
import sqlalchemy as sa
import structlog.testing
from oa_sync_core import CodexWorkerSummaryProjector, NewEvent, RunSummaryProjector
from oa_sync_core.testing import new_event
from oa_sync_server.postgres.event_log import PostgresEventLog
from oa_sync_server.postgres.read_model import log_epoch
from oa_sync_server.postgres.stores import PostgresCheckpointStore, PostgresDocumentSink
from oa_sync_server.postgres.tables import changes, changes_hint, documents
from oa_sync_server.worker import LeaseBusyError, LeaseLost, ProjectorWorker
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.server.pg_projection import (
    assert_matches_fold,
    expire_lease,
    read_model,
    terminate_backend,
    wait_until,
)


def _run_events(run: str, steps: int) -> list[NewEvent]:
    return [
        new_event("run.created", run),
        new_event("run.started", run),
        *(new_event("run.step", run, description=f"s{i}") for i in range(steps)),
    ]


async def test_catch_up_equals_a_pure_fold(engine: AsyncEngine) -> None:
    """Documents, checkpoints and changes after catch-up equal a fold of the log."""
    log = PostgresEventLog(engine)
    await log.append([*_run_events("r1", 3), new_event("worker.started", "w1")])
    await log.append([new_event("audit.note", "x", stream_kind="audit"), *_run_events("r2", 1)])
    worker = ProjectorWorker(engine, batch_size=3)
    assert await worker.catch_up() == 10
    model = await assert_matches_fold(engine)
    assert model["documents"]["runtime/run_summary:r1"][0] == 5
    assert worker.watermark == len(model["changes"])
    assert await worker.catch_up() == 0
    assert await read_model(engine) == model


async def test_out_of_order_commit_is_applied_once_in_order(engine: AsyncEngine) -> None:
    """A appends and stays open, B commits, the projector ticks, A commits: both applied once."""
    log = PostgresEventLog(engine)
    worker = ProjectorWorker(engine)
    async with engine.connect() as a:
        await a.begin()
        [pa] = await log.append([new_event("run.created", "ra")], conn=a)
        [pb] = await log.append([new_event("run.created", "rb")])
        assert pb > pa
        assert await worker.run_once() == 0  # B is past A's open transaction: not yet
        await a.commit()
    assert await worker.catch_up() == 2
    model = await assert_matches_fold(engine)
    assert {k: v[0] for k, v in model["documents"].items()} == {
        "runtime/run_summary:ra": 1,
        "runtime/run_summary:rb": 1,
    }
    assert [r[1] for r in model["changes"]] == ["runtime/run_summary:ra", "runtime/run_summary:rb"]


async def test_rolled_back_appends_never_stall_the_projector(engine: AsyncEngine) -> None:
    """Holes left by rolled-back appends are passed at once, without any clock."""
    log = PostgresEventLog(engine)
    worker = ProjectorWorker(engine)
    for i in range(3):
        async with engine.connect() as conn:
            await conn.begin()
            await log.append([new_event("run.created", f"hole{i}")], conn=conn)
            await conn.rollback()
        await log.append([new_event("run.created", f"r{i}")])
        assert await worker.catch_up() == 1
    await assert_matches_fold(engine)


async def test_changes_notify_carries_the_new_watermark(
    engine: AsyncEngine, database_url: str
) -> None:
    """Each committed batch sends the log epoch and the new watermark on oa_sync_changes
    (``<epoch>:<watermark>``, what a hub compares with what it delivered)."""
    listener = await psycopg.AsyncConnection.connect(
        database_url.replace("+psycopg", ""), autocommit=True
    )
    async with listener:
        await listener.execute("LISTEN oa_sync_changes")
        await PostgresEventLog(engine).append(_run_events("r1", 0) + _run_events("r2", 0))
        worker = ProjectorWorker(engine)
        await worker.catch_up()
        got = [n.payload async for n in listener.notifies(timeout=10, stop_after=1)]
        async with engine.connect() as conn:
            epoch = await log_epoch(conn)
    assert got == [f"{epoch}:2"]
    assert changes_hint(got[0]) == (epoch, 2)


async def test_lease_is_exclusive_and_fenced(engine: AsyncEngine) -> None:
    """A second worker stands by while the lease is live; takeover fences the old holder."""
    log = PostgresEventLog(engine)
    await log.append(_run_events("r1", 0))
    first = ProjectorWorker(engine, holder="first")
    second = ProjectorWorker(engine, holder="second")
    assert await first.catch_up() == 2
    with pytest.raises(LeaseBusyError):
        await second.run_once()
    await expire_lease(engine)
    assert await second.acquire()
    assert (first.epoch, second.epoch) == (1, 2)
    await log.append([new_event("run.step", "r1")])
    with pytest.raises(LeaseLost):
        await first.run_once()
    assert first.epoch == 0
    with pytest.raises(LeaseLost):
        await first.renew()
    assert await second.catch_up() == 1
    await assert_matches_fold(engine)


async def test_sink_and_checkpoint_store_ports(engine: AsyncEngine) -> None:
    """The port adapters read what the worker wrote; a stale publish writes nothing."""
    await PostgresEventLog(engine).append(_run_events("r1", 1))
    await ProjectorWorker(engine).catch_up()
    sink = PostgresDocumentSink(engine)
    store = PostgresCheckpointStore(engine)
    [doc] = await sink.all_documents("runtime/run_summary")
    [cp] = await store.all()
    assert (doc.version, doc.content_hash, doc.watermark) == (3, cp.content_hash, 1)
    assert await sink.get_documents([doc.id]) == {doc.id: doc}
    assert await store.get_many([cp.id]) == {cp.id: cp}
    before = await read_model(engine)
    from oa_sync_core import DocumentUpdate, canonical_json, content_hash

    old = DocumentUpdate(
        projection=doc.projection,
        doc_key=doc.doc_key,
        version=2,
        body={"runId": "r1"},
        canonical=canonical_json({"runId": "r1"}),
        content_hash=content_hash(canonical_json({"runId": "r1"})),
        last_position=1,
    )
    await sink.publish([old])
    assert await read_model(engine) == before


async def test_four_appenders_2000_events_exactly_once_gap_free(engine: AsyncEngine) -> None:
    """Four concurrent appenders x 2,000 events with a live worker: every event once, no gap."""
    log = PostgresEventLog(engine)
    worker = ProjectorWorker(engine, batch_size=500, poll_interval_s=0.05)
    stop = asyncio.Event()
    runner = asyncio.create_task(worker.run(stop))
    rng = random.Random(7)

    async def appender(n: int) -> None:
        runs = [f"a{n}-{i}" for i in range(20)]
        for run in runs:
            await log.append([new_event("run.created", run)])
        sent = len(runs)
        while sent < 2000:
            size = min(rng.randint(1, 40), 2000 - sent)
            await log.append(
                [new_event("run.step", rng.choice(runs), description="x") for _ in range(size)]
            )
            sent += size

    try:
        await asyncio.gather(*(appender(n) for n in range(4)))

        async def done() -> bool:
            async with engine.connect() as conn:
                total = await conn.execute(sa.select(sa.func.sum(documents.c.version)))
                return total.scalar_one() == 8000

        await wait_until(done, within=60, what="8000 events projected")
    finally:
        stop.set()
        await asyncio.wait_for(runner, 30)
    model = await assert_matches_fold(engine)
    assert len(model["documents"]) == 80
    async with engine.connect() as conn:
        count = (await conn.execute(sa.select(sa.func.count()).select_from(changes))).scalar_one()
    assert count == len(model["changes"])
    assert worker.applied == 8000


async def test_run_loop_wakes_on_append_and_releases_on_stop(engine: AsyncEngine) -> None:
    """run() projects appends as they come and hands the lease back when stopped."""
    worker = ProjectorWorker(engine, poll_interval_s=30)  # only the LISTEN hint can wake it
    stop = asyncio.Event()
    runner = asyncio.create_task(worker.run(stop))
    log = PostgresEventLog(engine)
    for i in range(3):
        await log.append([new_event("run.created", f"r{i}")])

        async def projected(n: int = i + 1) -> bool:
            return worker.watermark == n

        await wait_until(projected, within=20, what=f"watermark {i + 1}")
    stop.set()
    await asyncio.wait_for(runner, 20)
    standby = ProjectorWorker(engine, holder="standby")
    assert await standby.acquire()


async def test_a_kept_connection_whose_backend_died_between_batches_is_replaced_unnoticed(
    engine: AsyncEngine,
) -> None:
    """run() keeps its connection between batches; when its backend is terminated while idle,
    the next batch sees that without a round trip and takes a new connection: no batch fails
    and every append is still projected."""
    worker = ProjectorWorker(engine, poll_interval_s=30)  # only the LISTEN hint wakes it
    stop = asyncio.Event()
    log = PostgresEventLog(engine)
    with structlog.testing.capture_logs() as logs:
        runner = asyncio.create_task(worker.run(stop))
        try:
            await log.append([new_event("run.created", "r0")])

            async def first() -> bool:
                return worker.watermark == 1

            await wait_until(first, within=20, what="the first batch")
            kept = worker._kept
            assert kept is not None
            raw = (await kept.get_raw_connection()).driver_connection
            assert isinstance(raw, psycopg.AsyncConnection)
            pid = raw.info.backend_pid
            await terminate_backend(engine, pid)
            await log.append([new_event("run.created", "r1")])

            async def second() -> bool:
                return worker.watermark == 2

            await wait_until(second, within=20, what="the batch after the termination")
            replaced = worker._kept
            assert replaced is not None
            assert replaced is not kept
        finally:
            stop.set()
            await asyncio.wait_for(runner, 20)
    assert [e for e in logs if e["event"] == "projector_batch_failed"] == []
    assert worker._kept is None  # closed when run() returned
    await assert_matches_fold(engine)


class _RunSummaryV2(RunSummaryProjector):
    """The run summary at a new projector version (same fold, new version number)."""

    version = RunSummaryProjector.version + 1


async def test_a_new_projector_version_rebuilds_its_projection(engine: AsyncEngine) -> None:
    """A worker whose projector version changed refolds that projection before any batch;
    other projections are left alone and later events apply on the rebuilt documents."""
    log = PostgresEventLog(engine)
    await log.append([*_run_events("r1", 2), new_event("worker.started", "w1")])
    old = ProjectorWorker(engine, holder="v1")
    await old.catch_up()
    await old.release()
    before = await read_model(engine)
    new = ProjectorWorker(
        engine, holder="v2", projectors=(_RunSummaryV2(), CodexWorkerSummaryProjector())
    )
    assert await new.acquire()
    after = await read_model(engine)
    assert after["checkpoints"]["runtime/run_summary:r1"][1] == _RunSummaryV2.version
    assert (
        after["checkpoints"]["runtime/codex_worker_summary:w1"]
        == (before["checkpoints"]["runtime/codex_worker_summary:w1"])
    )
    assert (
        after["documents"]["runtime/run_summary:r1"][3]
        == (before["documents"]["runtime/run_summary:r1"][3])
    )
    assert await new.rebuild_stale() == []
    await log.append([new_event("run.completed", "r1")])
    assert await new.catch_up() == 1
    assert after["documents"]["runtime/run_summary:r1"][0] == 4
    assert (await read_model(engine))["documents"]["runtime/run_summary:r1"][0] == 5


async def test_an_idle_running_worker_keeps_its_lease(engine: AsyncEngine) -> None:
    """While idle, run() renews the lease before it expires, so a standby never takes over."""
    worker = ProjectorWorker(engine, holder="idle", lease_ttl_s=3, poll_interval_s=0.05)
    standby = ProjectorWorker(engine, holder="standby", lease_ttl_s=3)
    stop = asyncio.Event()
    runner = asyncio.create_task(worker.run(stop))

    async def expiry() -> object:
        async with engine.connect() as conn:
            query = sa.text("SELECT expires_at FROM oa_sync.projector_leases")
            return (await conn.execute(query)).scalar_one_or_none()

    try:

        async def holding() -> bool:
            return worker.epoch != 0

        # Until run() has taken the lease for the first time, anyone may take it.
        await wait_until(holding, within=30, what="the running worker's lease")
        seen: list[object] = []

        async def renewed_three_times() -> bool:
            value = await expiry()
            if value is not None and value not in seen:
                seen.append(value)
            assert not await standby.acquire()
            return len(seen) >= 4

        await wait_until(renewed_three_times, within=30, what="three renewals")
    finally:
        stop.set()
        await asyncio.wait_for(runner, 30)
    assert worker.epoch == 0  # released on stop
    assert await standby.acquire()


async def test_an_append_held_back_by_the_horizon_is_projected_once_it_clears(
    engine: AsyncEngine, database_url: str
) -> None:
    """An append committed while another transaction holds the read horizon is projected soon
    after that transaction ends, without a further hint and without waiting the poll interval
    (the long poll here would otherwise decide the delay)."""

    class Counting(ProjectorWorker):
        reads = 0

        async def _pause(self, stage: str, conn: object) -> None:
            if stage == "read":
                self.reads += 1

    worker = Counting(engine, poll_interval_s=30)  # no poll can rescue a missed moment
    stop = asyncio.Event()
    runner = asyncio.create_task(worker.run(stop))
    log = PostgresEventLog(engine)
    await log.append([new_event("run.created", "r0")])

    async def projected(n: int) -> bool:
        return worker.watermark == n

    await wait_until(lambda: projected(1), within=20, what="watermark 1")
    holder = await psycopg.AsyncConnection.connect(
        database_url.replace("postgresql+psycopg://", "postgresql://")
    )
    try:
        await holder.execute("SELECT pg_current_xact_id()")  # an open transaction with an xid
        reads = worker.reads
        await log.append([new_event("run.created", "r1")])  # its hint arrives while held

        async def looked() -> bool:
            return worker.reads > reads

        await wait_until(looked, within=20, what="a batch after the append's hint")
        assert worker.watermark == 1  # the horizon held it back
        await holder.rollback()  # the horizon clears; no append, no hint follows
        await wait_until(lambda: projected(2), within=3, what="watermark 2 after the horizon")
    finally:
        await holder.close()
        stop.set()
        await asyncio.wait_for(runner, 20)
