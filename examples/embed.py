"""Embedding Khala in a runtime service: append in your own transaction, project in-process.

The service owns a table (``app_runs``). Starting a run inserts its row *and* appends the
run's events in one transaction (the outbox pattern: both commit or neither does). A
projector worker runs inside the same process and folds the events into the
``runtime/run_summary:<run_id>`` document; a drift check then proves the read model equals a
fold of the log. No HTTP server is involved.

Run it against any Postgres (or, with ``OA_SYNC_DATABASE_URL`` unset, an embedded one under
``./.oa-sync/``)::

    OA_SYNC_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres python examples/embed.py

See docs/embedding.md for the walk-through.
"""

from __future__ import annotations

import asyncio
import os
import time

import sqlalchemy as sa
from oa_sync_core import NewEvent
from oa_sync_core.codec import JsonObject
from oa_sync_server.config import Settings
from oa_sync_server.postgres.admin import check_drift
from oa_sync_server.postgres.event_log import PostgresEventLog
from oa_sync_server.postgres.stores import PostgresDocumentSink
from oa_sync_server.runtime import open_database
from oa_sync_server.worker import ProjectorWorker
from sqlalchemy.ext.asyncio import AsyncEngine

APP = sa.MetaData()
runs = sa.Table(
    "app_runs",
    APP,
    sa.Column("run_id", sa.Text, primary_key=True),
    sa.Column("agent_id", sa.Text, nullable=False),
)


async def start_run(engine: AsyncEngine, log: PostgresEventLog, run_id: str, agent: str) -> None:
    """The service's own write and its events, in one transaction."""
    async with engine.begin() as conn:
        await conn.execute(runs.insert().values(run_id=run_id, agent_id=agent))
        await log.append(
            [
                NewEvent(
                    stream_id=f"run:{run_id}",
                    type="run.created",
                    payload={"runId": run_id, "agentId": agent},
                    idempotency_key=f"{run_id}:created",
                ),
                NewEvent(
                    stream_id=f"run:{run_id}",
                    type="run.started",
                    payload={"runId": run_id},
                    expected_seq=1,
                ),
            ],
            conn=conn,
        )


async def wait_for_document(engine: AsyncEngine, key: str, version: int) -> JsonObject:
    """Poll the read model until ``key`` reaches ``version`` (a real service would LISTEN on
    ``oa_sync_changes`` or use the sync server instead)."""
    sink = PostgresDocumentSink(engine)
    doc_id = (key.partition(":")[0], key)
    deadline = time.monotonic() + 30
    while True:
        found = (await sink.get_documents([doc_id])).get(doc_id)
        if found is not None and found.version >= version:
            return found.body
        if time.monotonic() > deadline:
            raise TimeoutError(f"{key} was not projected")
        await asyncio.sleep(0.05)


async def embed(engine: AsyncEngine, run_id: str = "r-embed") -> JsonObject:
    """Append in the service's transaction, project in-process, check drift; the document."""
    async with engine.begin() as conn:
        await conn.run_sync(APP.create_all)
    log = PostgresEventLog(engine)
    worker = ProjectorWorker(engine, holder=f"embed-example:{os.getpid()}")
    stop = asyncio.Event()
    projector = asyncio.create_task(worker.run(stop))  # lives as long as the service
    try:
        await start_run(engine, log, run_id, agent="a1")
        body = await wait_for_document(engine, f"runtime/run_summary:{run_id}", version=2)
    finally:
        stop.set()
        await projector  # releases the lease for the next process
    report = await check_drift(engine)
    if not report.ok:
        raise RuntimeError(f"drift: {report.items}")
    return body


async def main() -> None:
    """Open the configured (or embedded) database and run the example once."""
    async with open_database(Settings.from_env(os.environ)) as engine:
        body = await embed(engine, run_id=f"r-{os.getpid()}")
    print(body)


if __name__ == "__main__":
    asyncio.run(main())
