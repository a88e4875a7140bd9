"""The port contract suites of ``oa_sync_core.testing`` against the in-memory adapters."""

from __future__ import annotations

import json
import subprocess
import sys

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


def test_the_contract_suites_import_without_pytest_or_hypothesis() -> None:
    """oa_sync_core.testing (suites included) imports on a core-only install: no pytest, no
    hypothesis loaded."""
    code = (
        "import json, sys, oa_sync_core.testing\n"
        "print(json.dumps([m for m in ('pytest', '_pytest', 'hypothesis') if m in sys.modules]))\n"
    )
    out = subprocess.run(  # noqa: S603 - runs this interpreter on a literal
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert json.loads(out) == []
