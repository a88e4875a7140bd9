"""Fault campaigns on real Postgres: the projector crashing mid-batch, and split brain.

Each interleaving is produced with real connections and explicit pause points inside the
worker's batch transaction (``ProjectorWorker._pause``); waits are on conditions
(``pg_stat_activity``, events), never on sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
import sqlalchemy as sa
from oa_sync_core.testing import new_event
from oa_sync_server.postgres.event_log import PostgresEventLog
from oa_sync_server.worker import LeaseBusyError, LeaseLost, ProjectorWorker
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tests.server.pg_projection import (
    assert_matches_fold,
    expire_lease,
    read_model,
    terminate_backend,
    wait_for_horizon,
    wait_until,
)

Hook = Callable[[str, AsyncConnection], Awaitable[None]]


class HookedWorker(ProjectorWorker):
    """A worker that calls ``hook`` at each pause point of its batch transaction."""

    hook: Hook | None = None

    async def _pause(self, stage: str, conn: AsyncConnection) -> None:
        if self.hook is not None:
            await self.hook(stage, conn)


async def _backend_pid(conn: AsyncConnection) -> int:
    return int((await conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one())


async def _append_runs(log: PostgresEventLog, first: int, count: int) -> None:
    for i in range(first, first + count):
        await log.append(
            [
                new_event("run.created", f"r{i}"),
                new_event("run.started", f"r{i}"),
                new_event("run.step", f"r{i % 3}", description=f"d{i}"),
            ]
        )


@pytest.mark.parametrize("stage", ["read", "locked", "written"])
async def test_crash_mid_batch_leaves_all_or_nothing(engine: AsyncEngine, stage: str) -> None:
    """Terminating the projector's backend at a pause point commits nothing of the batch;
    after a restart every document equals a pure fold of the committed log."""
    log = PostgresEventLog(engine)
    await _append_runs(log, 0, 4)
    await ProjectorWorker(engine, holder="p1", batch_size=5).catch_up()
    before = await read_model(engine)
    await _append_runs(log, 4, 4)

    crashed = HookedWorker(engine, holder="p1", batch_size=5)
    crashes = 0

    async def crash(at: str, conn: AsyncConnection) -> None:
        nonlocal crashes
        if at == stage and crashes < 2:
            crashes += 1
            await terminate_backend(engine, await _backend_pid(conn))

    crashed.hook = crash
    with pytest.raises(DBAPIError):
        await crashed.catch_up()
    assert await read_model(engine) == before  # the batch left nothing behind
    with pytest.raises(DBAPIError):
        await crashed.catch_up()  # crashes again on the retry, one batch further or not
    restarted = ProjectorWorker(engine, holder="p1", batch_size=5)  # a new process
    await restarted.catch_up()
    await assert_matches_fold(engine)
    assert crashes == 2


async def test_crash_at_every_stage_in_turn_converges(engine: AsyncEngine) -> None:
    """One worker whose connection dies at each pause point in turn still converges."""
    log = PostgresEventLog(engine)
    await _append_runs(log, 0, 6)
    await wait_for_horizon(engine)
    worker = HookedWorker(engine, holder="p", batch_size=4)
    for stage in ("read", "locked", "written", "locked"):

        async def crash(at: str, conn: AsyncConnection, stage: str = stage) -> None:
            if at == stage:
                await terminate_backend(engine, await _backend_pid(conn))

        worker.hook = crash
        with pytest.raises(DBAPIError):
            await worker.run_once()
    assert (await read_model(engine))["documents"] == {}
    worker.hook = None
    assert await worker.catch_up() == 18
    await assert_matches_fold(engine)


async def test_split_brain_old_leader_commit_is_rejected(engine: AsyncEngine) -> None:
    """The old leader pauses mid-batch, its lease is taken over and the new leader projects;
    when the old one resumes its commit is refused, and nothing is applied twice."""
    log = PostgresEventLog(engine)
    await _append_runs(log, 0, 3)
    await wait_for_horizon(engine)  # another session's transaction would hide events from both
    old = HookedWorker(engine, holder="old")
    new = ProjectorWorker(engine, holder="new")
    paused = asyncio.Event()
    resume = asyncio.Event()

    async def pause(at: str, conn: AsyncConnection) -> None:
        if at == "read":
            paused.set()
            await resume.wait()

    old.hook = pause
    assert await old.acquire()
    batch = asyncio.create_task(old.run_once())
    await asyncio.wait_for(paused.wait(), 30)
    await expire_lease(engine)  # the old leader was paused past its TTL
    assert await new.acquire()
    assert new.epoch == old.epoch + 1
    assert await new.catch_up() == 9
    settled = await read_model(engine)
    resume.set()
    with pytest.raises(LeaseLost):
        await batch
    assert await read_model(engine) == settled
    await _append_runs(log, 3, 1)
    await wait_for_horizon(engine)
    with pytest.raises(LeaseBusyError):
        await old.run_once()  # it no longer holds any lease: it must re-acquire, and cannot
    assert await new.catch_up() == 3
    await assert_matches_fold(engine)


async def test_takeover_waits_for_a_leader_inside_its_write(engine: AsyncEngine) -> None:
    """A leader inside its write transaction (lease row locked, lease run out) commits; a
    takeover that queued behind the row lock re-checks the renewed lease and stands down."""
    log = PostgresEventLog(engine)
    await _append_runs(log, 0, 2)
    await wait_for_horizon(engine)  # so the leader's first batch has events to write
    leader = HookedWorker(engine, holder="leader")
    other = ProjectorWorker(engine, holder="other")
    paused = asyncio.Event()
    resume = asyncio.Event()

    async def pause(at: str, conn: AsyncConnection) -> None:
        if at == "locked":
            # the lease has run out while the leader sits inside its write transaction
            await conn.execute(
                sa.text(
                    "UPDATE oa_sync.projector_leases "
                    "SET expires_at = clock_timestamp() - interval '1 second'"
                )
            )
            paused.set()
            await resume.wait()

    leader.hook = pause
    assert await leader.acquire()
    batch = asyncio.create_task(leader.run_once())
    await asyncio.wait_for(paused.wait(), 30)
    takeover = asyncio.create_task(other.acquire())

    async def blocked() -> bool:
        async with engine.connect() as conn:
            query = sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' "
                "AND query LIKE 'INSERT INTO oa_sync.projector_leases%'"
            )
            return (await conn.execute(query)).scalar_one() == 1

    await wait_until(blocked, within=30, what="the takeover to queue on the lease row")
    resume.set()
    assert await batch == 6
    assert await takeover is False
    await assert_matches_fold(engine)


async def _listener_pids(engine: AsyncEngine) -> set[int]:
    async with engine.connect() as conn:
        query = sa.text(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND query = 'LISTEN oa_sync_events'"
        )
        return {int(r[0]) for r in await conn.execute(query)}


async def test_run_loop_survives_lost_connections(engine: AsyncEngine) -> None:
    """The running worker re-LISTENs after its listener is killed and retries a batch whose
    connection died; every append is still projected, driven by hints alone."""
    worker = HookedWorker(engine, holder="loop", poll_interval_s=30)
    crashes: list[str] = []

    async def crash_once(at: str, conn: AsyncConnection) -> None:
        if at == "locked" and not crashes:
            crashes.append(at)
            await terminate_backend(engine, await _backend_pid(conn))

    worker.hook = crash_once
    stop = asyncio.Event()
    runner = asyncio.create_task(worker.run(stop))
    log = PostgresEventLog(engine)
    try:

        async def listening() -> bool:
            return len(await _listener_pids(engine)) == 1

        await wait_until(listening, within=30, what="the LISTEN connection")
        [old] = await _listener_pids(engine)
        await terminate_backend(engine, old)

        async def relistening() -> bool:
            pids = await _listener_pids(engine)
            return len(pids) == 1 and old not in pids

        await wait_until(relistening, within=30, what="a new LISTEN connection")
        await _append_runs(log, 0, 2)

        async def projected() -> bool:
            return worker.applied == 6

        await wait_until(projected, within=30, what="6 events projected")
    finally:
        stop.set()
        await asyncio.wait_for(runner, 30)
    assert crashes == ["locked"]
    await assert_matches_fold(engine)
