"""Stalled projection is named: the read horizon's holder and a lease left by a killed process.

Real Postgres, real server: a transaction left open in *another database* of the same server
holds the cluster-wide read horizon; a worker that takes the lease and then vanishes without
releasing it is what ``kill -9`` leaves behind. What it proves (issue 15, item 4): the worker
logs ``projection_stalled`` naming the blocking backend, ``/readyz`` is 503 with a detail naming
the backend or the lease holder and its expiry, ``oa_sync_read_horizon_age_seconds`` shows the
age, and a clean shutdown releases the lease at once.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import psycopg
import pytest
import sqlalchemy as sa
import structlog.testing
from oa_sync_core.testing import new_event
from oa_sync_server.postgres import create_engine
from oa_sync_server.postgres.event_log import PostgresEventLog
from oa_sync_server.postgres.tables import leases
from oa_sync_server.worker import ProjectorWorker
from psycopg import sql

from tests.live import LiveServer, make_live_server
from tests.pg import drop_database, make_database
from tests.server.pg_projection import wait_until

pytestmark = pytest.mark.slow


async def readyz(server: LiveServer) -> tuple[int, dict[str, Any]]:
    """The status and body of ``GET /readyz``."""
    async with aiohttp.ClientSession(server.url) as s, s.get("/readyz") as resp:
        return resp.status, await resp.json()


@pytest.fixture
async def open_transaction(pg_server_url: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A connection to another database, inside a transaction that holds an xid."""
    name = "oa_stall_" + secrets.token_hex(4)
    url = make_database(pg_server_url, name).replace("postgresql+psycopg://", "postgresql://")
    try:
        conn = await psycopg.AsyncConnection.connect(url, application_name="stall-holder")
        async with conn:
            await conn.execute("SELECT pg_current_xact_id()")  # assigns the xid
            yield conn
    finally:
        drop_database(pg_server_url, name)


async def test_an_open_transaction_in_another_database_is_named(
    database_url: str, open_transaction: psycopg.AsyncConnection[Any]
) -> None:
    """Events waiting behind a transaction open in another database produce a
    ``projection_stalled`` warning naming its pid, database and application, a 503 ``stalled``
    readiness naming the pid, and a read-horizon age on /metrics; ending it resumes projection."""
    pid = open_transaction.info.backend_pid
    async with make_live_server(database_url) as server:
        worker = server.state.projector
        assert worker is not None
        worker.stall_warn_after_s = 0.2
        with structlog.testing.capture_logs() as logs:
            await server.append([new_event("run.created", "r1")])

            # Other sessions on a shared server may hold an older transaction for a moment: the
            # worker warns again when the holder changes, so wait for the one naming ours.
            def stalled() -> list[dict[str, Any]]:
                return [
                    e
                    for e in logs
                    if e["event"] == "projection_stalled" and e.get("blocking_pid") == pid
                ]

            async def warned() -> bool:
                return bool(stalled())

            await wait_until(warned, within=30, what="a projection_stalled warning")
            warning = stalled()[0]
            assert warning["log_level"] == "warning"
            assert warning["blocking_pid"] == pid
            assert warning["blocking_application"] == "stall-holder"
            assert warning["blocking_database"] == open_transaction.info.dbname
            assert warning["blocking_state"] == "idle in transaction"
            assert "query" not in warning

            async def not_ready() -> bool:
                status, body = await readyz(server)
                return (
                    status == 503
                    and body["status"] == "stalled"
                    and f"read horizon held by pid {pid} " in body["detail"]
                )

            await wait_until(not_ready, within=60, what="/readyz to report the stall")
            _, body = await readyz(server)
            assert "'stall-holder'" in body["detail"]
            async with aiohttp.ClientSession(server.url) as s, s.get("/metrics") as resp:
                text = await resp.text()
            age = next(
                float(line.split()[1])
                for line in text.splitlines()
                if line.startswith("oa_sync_read_horizon_age_seconds ")
            )
            assert age >= 5.0

            await open_transaction.rollback()
            await server.settle()
            assert (await readyz(server))[0] == 200

            async def resumed() -> bool:
                return any(e["event"] == "projection_resumed" for e in logs)

            await wait_until(resumed, within=30, what="a projection_resumed line")


async def test_a_lease_left_by_a_killed_process_is_named_until_it_expires(
    database_url: str,
) -> None:
    """A lease whose holder stopped renewing it (killed, never released) makes /readyz 503
    ``waiting`` with the holder and the expiry, and the standing-by worker warns once
    (``projector_lease_waiting``); once it expires the server takes over."""
    async with make_live_server(database_url, run_projector=False) as bootstrap:
        dead = ProjectorWorker(bootstrap.engine, holder="dead-host:4242:feedface", lease_ttl_s=30)
        assert await dead.acquire()
        # What the row looks like 25 s after its holder was killed: no renewal since.
        async with bootstrap.engine.begin() as conn:
            await conn.execute(
                sa.update(leases)
                .where(leases.c.name == "default")
                .values(
                    heartbeat_at=sa.func.clock_timestamp() - sa.text("interval '25 seconds'"),
                    expires_at=sa.func.clock_timestamp() + sa.text("interval '8 seconds'"),
                )
            )
    with structlog.testing.capture_logs() as logs:
        async with make_live_server(database_url) as server:
            await server.append([new_event("run.created", "r1")])
            status, body = await readyz(server)
            assert (status, body["status"]) == (503, "waiting")
            detail = body["detail"]
            assert detail.startswith("waiting for the lease held by dead-host:4242:feedface")
            assert " until 20" in detail  # an ISO timestamp
            await server.settle()
            assert (await readyz(server))[0] == 200
    waiting = [e for e in logs if e["event"] == "projector_lease_waiting"]
    assert len(waiting) == 1
    assert waiting[0]["held_by"] == "dead-host:4242:feedface"
    assert waiting[0]["until"] in detail


async def test_a_clean_shutdown_releases_the_lease_at_once(database_url: str) -> None:
    """After a graceful stop the lease row has no holder and no expiry, so a successor takes
    it over without waiting for the TTL."""
    async with make_live_server(database_url) as server:
        await server.append([new_event("run.created", "r1")])
        await server.settle()
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cursor = await conn.execute(
            "SELECT holder, expires_at FROM oa_sync.projector_leases WHERE name = 'default'"
        )
        assert await cursor.fetchone() == (None, None)


async def test_a_holder_the_role_cannot_see_is_reported_as_such(
    database_url: str, pg_server_url: str, open_transaction: psycopg.AsyncConnection[Any]
) -> None:
    """A server role without ``pg_read_all_stats`` sees another role's transaction but not its
    age or state: the stall warning still names the pid, says the age is hidden, and hints at
    granting that role."""
    role = "oa_stall_role_" + secrets.token_hex(4)
    # Same server and database as another user (TCP or, with pgserver, a Unix socket).
    as_role = (
        sa.engine.make_url(database_url)
        .set(username=role, password=None)
        .render_as_string(hide_password=False)
    )
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as admin:
        await admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        for grant in (
            "GRANT USAGE ON SCHEMA oa_sync TO {}",
            "GRANT ALL ON ALL TABLES IN SCHEMA oa_sync TO {}",
            "GRANT ALL ON ALL SEQUENCES IN SCHEMA oa_sync TO {}",
        ):
            await admin.execute(sql.SQL(grant).format(sql.Identifier(role)))
        engine = create_engine(as_role)
        stop = asyncio.Event()
        try:
            worker = ProjectorWorker(engine, stall_warn_after_s=0.2, poll_interval_s=0.1)
            with structlog.testing.capture_logs() as logs:
                task = asyncio.create_task(worker.run(stop))
                await PostgresEventLog(engine).append([new_event("run.created", "r1")])

                pid = open_transaction.info.backend_pid

                def ours() -> list[dict[str, Any]]:
                    return [
                        e
                        for e in logs
                        if e["event"] == "projection_stalled" and e["blocking_pid"] == pid
                    ]

                async def warned() -> bool:
                    return bool(ours())

                await wait_until(warned, within=30, what="a projection_stalled warning")
                stop.set()
                await task
            warning = ours()[0]
            assert warning["blocking_pid"] == open_transaction.info.backend_pid
            assert warning["blocking_age_s"] is None
            assert warning["blocking_state"] is None
            assert "pg_read_all_stats" in warning["hint"]
        finally:
            stop.set()
            await engine.dispose()
            await admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            await admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
