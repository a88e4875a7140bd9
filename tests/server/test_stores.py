"""The Postgres checkpoint store and document sink pass the core's port contract suites."""

from __future__ import annotations

import pytest
from oa_sync_core import CheckpointStore
from oa_sync_server.postgres.stores import PostgresCheckpointStore, PostgresDocumentSink
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.core.test_checkpoints import CheckpointStoreContract
from tests.core.test_sinks import ReadableSink, ReadableSinkContract


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
