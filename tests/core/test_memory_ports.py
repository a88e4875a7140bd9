"""The port contract suites of ``oa_sync_core.testing`` against the in-memory adapters."""

from __future__ import annotations

from oa_sync_core import MAX_APPEND_EVENTS, MemoryCheckpointStore, MemoryEventLog, MemorySink
from oa_sync_core.testing import (
    CheckpointStoreContract,
    EventLogContract,
    ReadableSink,
    SinkContract,
)


class TestMemoryEventLog(EventLogContract):
    """MemoryEventLog keeps the EventLog contract."""

    async def make_event_log(self, *, max_events: int = MAX_APPEND_EVENTS) -> MemoryEventLog:
        return MemoryEventLog(max_events=max_events)


class TestMemoryCheckpointStore(CheckpointStoreContract):
    """MemoryCheckpointStore keeps the CheckpointStore contract."""

    async def make_checkpoint_store(self) -> MemoryCheckpointStore:
        return MemoryCheckpointStore()


class TestMemorySink(SinkContract):
    """MemorySink keeps the Sink contract."""

    async def make_sink(self) -> ReadableSink:
        return MemorySink()
