"""Database outages seen from the HTTP API, on a real server and a real Postgres.

The outage is real: a table lock parks an append inside its transaction and the append's backend
is terminated (``pg_terminate_backend``), and the database is closed to new connections
(``ALTER DATABASE … ALLOW_CONNECTIONS false``) with every backend terminated. What it proves:
the log holds no SQL, parameters or traceback (issue 15, item 1); every read and write answers
503 ``unavailable`` with ``Retry-After`` and retrying with the same idempotency keys converges
to each event appended once (item 2).
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import psycopg
import pytest
import sqlalchemy as sa
from oa_sync_server.logs import build_formatter
from psycopg import sql

from tests.e2e.test_http import call, run_event
from tests.live import LiveServer, make_live_server
from tests.server.pg_projection import wait_until

MARKER = "payload-marker-7f3a"


def _plain(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


@contextmanager
def captured_lines() -> Iterator[io.StringIO]:
    """Every log record rendered by the server's own formatter (JSON), into a buffer."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(build_formatter("json"))
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield stream
    finally:
        root.removeHandler(handler)


async def _blocked_appends(admin: psycopg.AsyncConnection[Any], db: str) -> list[int]:
    """Backends of ``db`` parked on a lock in the append (its one ``append_events`` call)."""
    cursor = await admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'"
        " AND query LIKE %s AND pid <> pg_backend_pid()",
        (db, "%oa_sync.append_events(%"),
    )
    return [row[0] for row in await cursor.fetchall()]


async def _terminate(admin: psycopg.AsyncConnection[Any], db: str, pids: list[int] | None) -> None:
    """Terminate ``pids`` (all backends of ``db`` when None) and wait until they are gone."""
    if pids is None:
        cursor = await admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (db,),
        )
        pids = [row[0] for row in await cursor.fetchall()]
    for pid in pids:
        await admin.execute("SELECT pg_terminate_backend(%s)", (pid,))

    async def gone() -> bool:
        cursor = await admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)
        )
        row = await cursor.fetchone()
        return row is not None and row[0] == 0

    await wait_until(gone, within=30, what="terminated backends to exit")


@asynccontextmanager
async def closed_database(server_url: str, db: str) -> AsyncIterator[None]:
    """The database refuses new connections and has none open, until the block exits."""
    async with await psycopg.AsyncConnection.connect(_plain(server_url), autocommit=True) as admin:
        name = sql.Identifier(db)
        await admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(name))
        try:
            await _terminate(admin, db, None)
            yield
        finally:
            await admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(name))


async def append_killed_in_flight(
    server: LiveServer, session: aiohttp.ClientSession, server_url: str, body: Any
) -> tuple[int, Any, dict[str, str]]:
    """POST ``body`` while ``oa_sync.events`` is locked, terminate its backend mid-statement.

    Returns the status, the JSON body and the headers of the answer.
    """
    db = _name(server.database_url)
    token = server.token()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    async with (
        await psycopg.AsyncConnection.connect(_plain(server.database_url)) as locker,
        await psycopg.AsyncConnection.connect(_plain(server_url), autocommit=True) as admin,
    ):
        await locker.execute("LOCK TABLE oa_sync.events IN ACCESS EXCLUSIVE MODE")
        request = asyncio.ensure_future(session.post("/v1/events", json=body, headers=headers))

        async def parked() -> bool:
            return bool(await _blocked_appends(admin, db))

        await wait_until(parked, within=30, what="the append to wait on the table lock")
        await _terminate(admin, db, await _blocked_appends(admin, db))
        await locker.rollback()
        async with await request as resp:
            return resp.status, await resp.json(), dict(resp.headers)


@pytest.fixture
async def server(database_url: str) -> AsyncIterator[LiveServer]:
    """A live server whose projector and fan-out poll fast (outages end quickly)."""
    async with make_live_server(database_url, poll_interval_s=0.1) as live:
        yield live


async def test_outage_logs_hold_no_sql_parameters_or_traceback(
    server: LiveServer, pg_server_url: str
) -> None:
    """An append whose backend is terminated mid-statement, and requests while the database
    refuses connections, log a warning naming the error type and SQLSTATE: no SQL statement,
    no bound parameters (the payload), no traceback."""
    body = {"events": [run_event("run.created", "r1", agentId=MARKER) | {"idempotencyKey": "k1"}]}
    with captured_lines() as lines:
        async with aiohttp.ClientSession(server.url) as s:
            status, _, _ = await append_killed_in_flight(server, s, pg_server_url, body)
            assert status >= 500
            async with closed_database(pg_server_url, _name(server.database_url)):
                status, _ = await call(s, "POST", "/v1/events", token=server.token(), body=body)
                assert status >= 500
    text = lines.getvalue()
    assert '"request_unavailable"' in text, text[-2000:]
    assert '"sqlstate": "57P01"' in text  # admin_shutdown: the terminated backend
    for leak in ("[SQL:", "[parameters:", "INSERT INTO", "SELECT ", "Traceback", MARKER):
        assert leak not in text, leak


async def test_outage_is_503_with_retry_after_and_idempotent_retries_converge(
    server: LiveServer, pg_server_url: str
) -> None:
    """During an outage appends, documents, changes and the SSE stream answer 503
    ``unavailable`` with ``Retry-After``; afterwards the same batches retried with their
    idempotency keys append each event exactly once and the projection converges. /readyz
    says ``unavailable`` meanwhile."""
    token = server.token()
    first = {
        "events": [
            run_event("run.created", "r1", agentId="a") | {"idempotencyKey": "r1:1"},
            run_event("run.started", "r1") | {"idempotencyKey": "r1:2"},
        ]
    }
    second = {
        "events": [
            run_event("run.created", "r2", agentId="b") | {"idempotencyKey": "r2:1"},
            run_event("run.started", "r2") | {"idempotencyKey": "r2:2"},
        ]
    }
    async with aiohttp.ClientSession(server.url) as s:
        status, ok = await call(s, "POST", "/v1/events", token=token, body=first)
        assert status == 200
        status, body, headers = await append_killed_in_flight(server, s, pg_server_url, second)
        assert (status, body["error"]["code"]) == (503, "unavailable")
        assert headers["Retry-After"] == "1"
        async with closed_database(pg_server_url, _name(server.database_url)):
            for method, path, params, payload in (
                ("POST", "/v1/events", None, second),
                ("GET", "/v1/docs/runtime/run_summary:r1", None, None),
                ("GET", "/v1/changes", {"topic": "runtime/run_summary:*"}, None),
                ("GET", "/v1/stream", {"topic": "runtime/run_summary:*"}, None),
            ):
                async with s.request(
                    method,
                    path,
                    params=params,
                    json=payload,
                    headers={"Authorization": f"Bearer {token}"},
                ) as resp:
                    assert resp.status == 503, (method, path, await resp.text())
                    assert resp.headers["Retry-After"] == "1"
                    assert (await resp.json())["error"]["code"] == "unavailable"
            async with s.get("/readyz") as resp:
                assert resp.status == 503
                body = await resp.json()
                assert (body["status"], body["database"]) == ("unavailable", False)

        async def answered() -> bool:
            status, _ = await call(s, "POST", "/v1/events", token=token, body=first)
            return status == 200

        await wait_until(answered, within=30, what="the database to be back")
        status, again = await call(s, "POST", "/v1/events", token=token, body=first)
        assert again == ok  # a replayed key returns the original positions
        status, _ = await call(s, "POST", "/v1/events", token=token, body=second)
        assert status == 200
    await server.settle()
    async with server.engine.connect() as conn:
        count = (await conn.execute(sa.text("SELECT count(*) FROM oa_sync.events"))).scalar_one()
        runs = (
            await conn.execute(
                sa.text("SELECT doc_key, version FROM oa_sync.documents ORDER BY doc_key")
            )
        ).all()
    assert count == 4
    assert [(r.doc_key, r.version) for r in runs] == [
        ("runtime/run_summary:r1", 2),
        ("runtime/run_summary:r2", 2),
    ]
