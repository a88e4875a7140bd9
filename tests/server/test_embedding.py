"""The documented embedding example (examples/embed.py) runs against real Postgres."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import sqlalchemy as sa
from oa_sync_core import NewEvent
from oa_sync_server.postgres.event_log import PostgresEventLog
from sqlalchemy.ext.asyncio import AsyncEngine

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "embed.py"


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("khala_embed_example", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def test_embedding_example_appends_projects_and_checks_drift(engine: AsyncEngine) -> None:
    """The service's row and its events commit together; the in-process projector folds
    them into the run summary and the drift check passes."""
    example = _example()
    body = await example.embed(engine, run_id="r1")
    assert body["runId"] == "r1"
    assert body["agentId"] == "a1"
    assert body["status"] == "RUNNING"
    async with engine.connect() as conn:
        rows = (await conn.execute(sa.select(example.runs))).all()
    assert [tuple(r) for r in rows] == [("r1", "a1")]


async def test_a_failed_service_transaction_appends_nothing(engine: AsyncEngine) -> None:
    """If the service's own write fails, its events roll back with it (the outbox pattern)."""
    example = _example()
    async with engine.begin() as conn:
        await conn.run_sync(example.APP.create_all)
    log = PostgresEventLog(engine)
    await example.start_run(engine, log, "r1", "a1")
    with pytest.raises(sa.exc.IntegrityError):
        await example.start_run(engine, log, "r1", "a2")  # duplicate app row: all rolled back
    assert [e.stream_seq for e in await log.stream("run:r1")] == [1, 2]
    await log.append([NewEvent(stream_id="run:r1", type="run.step", payload={"runId": "r1"})])
    assert [e.stream_seq for e in await log.stream("run:r1")] == [1, 2, 3]
