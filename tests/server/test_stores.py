"""The Postgres checkpoint store and document sink pass the core's port contract suites."""

from __future__ import annotations

import pytest
from oa_sync_core import DEFAULT_PROJECTORS, CheckpointStore, ProjectionEngine
from oa_sync_core.testing import new_event
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
from tests.server.pg_projection import read_model, wait_for_horizon


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
