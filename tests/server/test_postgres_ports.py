"""The port contract suites of ``oa_sync_core.testing`` against the Postgres adapters."""

from __future__ import annotations

import pytest
from oa_sync_core import MAX_APPEND_EVENTS, EventLog
from oa_sync_core.testing import (
    CheckpointStoreContract,
    EventLogContract,
    ReadableSink,
    SinkContract,
)
from oa_sync_server.postgres.event_log import PostgresEventLog
from oa_sync_server.postgres.stores import PostgresCheckpointStore, PostgresDocumentSink
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.server.pg_projection import wait_for_horizon


class _OnEngine:
    """Each test gets a freshly migrated database (the ``engine`` fixture)."""

    pg: AsyncEngine

    @pytest.fixture(autouse=True)
    def _database(self, engine: AsyncEngine) -> None:
        self.pg = engine


class TestPostgresEventLog(_OnEngine, EventLogContract):
    """PostgresEventLog keeps the EventLog contract."""

    async def make_event_log(self, *, max_events: int = MAX_APPEND_EVENTS) -> PostgresEventLog:
        return PostgresEventLog(self.pg, max_events=max_events)

    async def settle(self, log: EventLog) -> None:
        await wait_for_horizon(self.pg)  # reads stop below the cluster-wide xmin (rule 1)


class TestPostgresCheckpointStore(_OnEngine, CheckpointStoreContract):
    """PostgresCheckpointStore keeps the CheckpointStore contract."""

    async def make_checkpoint_store(self) -> PostgresCheckpointStore:
        return PostgresCheckpointStore(self.pg)


class TestPostgresDocumentSink(_OnEngine, SinkContract):
    """PostgresDocumentSink keeps the Sink contract."""

    async def make_sink(self) -> ReadableSink:
        return PostgresDocumentSink(self.pg)
