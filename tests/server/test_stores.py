"""The Postgres checkpoint store and document sink pass the core's port contract suites."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa
from oa_sync_core import DEFAULT_PROJECTORS, CheckpointStore, ProjectionEngine
from oa_sync_core.testing import new_event
from oa_sync_server.postgres.engine import DriverText, run_on_driver
from oa_sync_server.postgres.event_log import LogCursor, PostgresEventLog, read_committed
from oa_sync_server.postgres.stores import (
    PostgresCheckpointStore,
    PostgresDocumentSink,
    lock_watermarks,
    write_batch,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.core.test_checkpoints import CheckpointStoreContract
from tests.core.test_sinks import ReadableSink, ReadableSinkContract
from tests.server.pg_projection import read_model, wait_for_horizon, wait_until


class TestPostgresCheckpointStore(CheckpointStoreContract):
    """PostgresCheckpointStore behaves like every other CheckpointStore."""

    @pytest.fixture
    def store(self, engine: AsyncEngine) -> CheckpointStore:
        return PostgresCheckpointStore(engine)


class TestPostgresDocumentSink(ReadableSinkContract):
    """PostgresDocumentSink behaves like every other read-model sink."""

    @pytest.fixture
    def sink(self, engine: AsyncEngine) -> ReadableSink:
        return PostgresDocumentSink(engine)


async def test_sink_on_a_connection_joins_the_callers_transaction(engine: AsyncEngine) -> None:
    """Built on a connection, the adapters write inside the caller's transaction."""
    from tests.core.test_sinks import _update

    async with engine.connect() as conn:
        await conn.begin()
        await PostgresDocumentSink(conn).publish([_update("r1", 1)])
        assert len(await PostgresDocumentSink(conn).all_documents()) == 1
        assert await PostgresDocumentSink(engine).all_documents() == []
        await conn.rollback()
    assert await PostgresDocumentSink(engine).all_documents() == []


async def test_write_batch_refuses_checkpoints_that_do_not_match_the_updates(
    engine: AsyncEngine,
) -> None:
    """write_batch needs each update's own checkpoint beside it: another document's, a
    missing one or a document named twice is a ValueError, and nothing is written."""
    await PostgresEventLog(engine).append(
        [new_event("run.created", "r1"), new_event("run.created", "r2")]
    )
    await wait_for_horizon(engine)
    before = await read_model(engine)
    async with engine.begin() as conn:
        events, _ = await read_committed(conn, LogCursor(), 10)
        result = ProjectionEngine(DEFAULT_PROJECTORS).apply(events, {})
        last = await lock_watermarks(conn)
        ups, cps = result.updates, result.checkpoints
        for bad_updates, bad_checkpoints in (
            (ups, cps[::-1]),
            (ups, cps[:1]),
            ((ups[0], ups[0]), (cps[0], cps[0])),
        ):
            with pytest.raises(ValueError, match="one update and its checkpoint"):
                await write_batch(conn, bad_updates, bad_checkpoints, locked_at=last)
    assert await read_model(engine) == before


async def test_lock_watermarks_reads_what_the_writer_it_waited_for_committed(
    engine: AsyncEngine,
) -> None:
    """The last watermark is read after the watermark lock is granted (rule 4): a writer that
    held the lock while our call waited, and committed watermark ``W + 1``, is seen. (Read
    with the snapshot of the statement that waited, it would be ``W``, and the next batch would
    hand out ``W + 1`` a second time.)"""
    async with engine.connect() as holder, engine.connect() as waiter:
        await holder.begin()
        last = await lock_watermarks(holder)
        await holder.execute(
            sa.text(
                "INSERT INTO oa_sync.changes (watermark, doc_key, projection, version, "
                "content_hash) VALUES (:w, 'runtime/run_summary:r1', 'runtime/run_summary', 1, "
                "'h')"
            ),
            {"w": last + 1},
        )
        pid = (await waiter.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()
        await waiter.rollback()
        await waiter.begin()

        async def waiting() -> bool:
            async with engine.connect() as probe:
                query = sa.text(
                    "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = :pid"
                )
                return bool((await probe.execute(query, {"pid": pid})).scalar())

        call = asyncio.ensure_future(lock_watermarks(waiter))
        try:
            # Its statement (and that statement's snapshot) has begun, and waits on the lock.
            await wait_until(waiting, within=10, what="the call to wait on the watermark lock")
            await holder.commit()
            assert await asyncio.wait_for(call, 10) == last + 1
        finally:
            call.cancel()
            await waiter.rollback()


async def test_statements_run_on_the_driver_join_the_transaction_and_raise_sqlalchemy_errors(
    engine: AsyncEngine,
) -> None:
    """run_on_driver (the projector's hot statements): inside the SQLAlchemy connection's
    transaction (a rollback undoes it, a commit keeps it), with the values bound in the
    statement, and a database error raised as SQLAlchemy's (the subclass callers catch),
    its parameters hidden; the connection stays usable after a rollback."""
    put = DriverText(
        sa.text("INSERT INTO oa_sync.sync_meta (key, value) VALUES (:key, :value)").bindparams(
            key="driver-test"
        )
    )
    get = DriverText(sa.text("SELECT value FROM oa_sync.sync_meta WHERE key = 'driver-test'"))
    async with engine.connect() as conn:
        async with conn.begin() as tx:
            assert await run_on_driver(conn, put, {"value": "undone"}) == []
            assert await run_on_driver(conn, get, {}) == [("undone",)]
            await tx.rollback()
        assert await run_on_driver(conn, get, {}) == []
        async with conn.begin():
            await run_on_driver(conn, put, {"value": "kept"})
        with pytest.raises(sa.exc.IntegrityError) as raised:
            async with conn.begin():
                await run_on_driver(conn, put, {"value": "secret-value"})
        assert "secret-value" not in str(raised.value)
        assert (await conn.execute(sa.text("SELECT 1"))).scalar_one() == 1
    async with engine.begin() as conn:
        assert await run_on_driver(conn, get, {}) == [("kept",)]
        await conn.execute(sa.text("DELETE FROM oa_sync.sync_meta WHERE key = 'driver-test'"))
