"""Hostile event payloads and keys over POST /v1/events: refused, or stored verbatim, never run."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
import sqlalchemy as sa
from oa_sync_server.postgres import tables

from tests.live import LiveServer

SQL_FRAGMENTS = [
    "'; DROP TABLE oa_sync.events; --",
    "\"); DELETE FROM oa_sync.documents WHERE ('1'='1",
    "1' OR '1'='1",
    "$$; TRUNCATE oa_sync.changes; $$",
    "%s %(position)s {0} :position ?",
    "\\'; SELECT pg_sleep(10); --",
    "/* */ UNION SELECT * FROM pg_shadow --",
    "back\\slash \"quote\" 'single' `tick` ; semi",
    "unicode \u2028 \u00e9 \U0001f600 \ud7ff",
]


async def post_events(
    server: LiveServer, http: aiohttp.ClientSession, events: list[dict[str, Any]]
) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {server.token(scopes=['sync:append', 'sync:read'])}"}
    async with http.post(f"{server.url}/v1/events", json={"events": events}, headers=headers) as r:
        return r.status, await r.json()


async def event_count(server: LiveServer) -> int:
    async with server.engine.connect() as conn:
        return int(
            (await conn.execute(sa.select(sa.func.count()).select_from(tables.events))).one()[0]
        )


def strings_in(value: Any) -> set[str]:
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        return set(value) | {s for v in value.values() for s in strings_in(v)}
    if isinstance(value, list):
        return {s for v in value for s in strings_in(v)}
    return set()


async def test_sql_fragments_in_payloads_and_keys_are_stored_verbatim(
    live_server: LiveServer,
) -> None:
    """Quotes and SQL in payload values, JSON keys and idempotency keys round-trip unchanged."""
    hostile_payload = {fragment: [fragment, {fragment: fragment}] for fragment in SQL_FRAGMENTS}
    events = [
        {
            "streamId": "note:n1",
            "type": "note.written",  # unknown to the projectors: stored as any JSON object
            "payload": hostile_payload,
            "idempotencyKey": SQL_FRAGMENTS[0],
        },
        {
            "streamId": "run:r-inj",
            "type": "run.created",
            "payload": {
                "runId": "r-inj",
                "agentId": SQL_FRAGMENTS[1],
                "threadId": SQL_FRAGMENTS[5],
            },
            "idempotencyKey": SQL_FRAGMENTS[3],
        },
    ]
    async with aiohttp.ClientSession() as http:
        status, body = await post_events(live_server, http, events)
        assert status == 200, body
        positions = [int(p) for p in body["positions"]]
        # The same idempotency keys again: the original positions, nothing new written.
        status, again = await post_events(live_server, http, events)
        assert status == 200, again
        assert [int(p) for p in again["positions"]] == positions
        assert await event_count(live_server) == 2

        async with live_server.engine.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(tables.events.c.payload, tables.events.c.idempotency_key)
                    .where(tables.events.c.position.in_(positions))
                    .order_by(tables.events.c.position)
                )
            ).all()
        assert rows[0].payload == hostile_payload
        assert rows[0].idempotency_key == SQL_FRAGMENTS[0]
        assert rows[1].idempotency_key == SQL_FRAGMENTS[3]

        await live_server.settle()
        headers = {"Authorization": f"Bearer {live_server.token()}"}
        key = quote("runtime/run_summary:r-inj", safe="/:")
        async with http.get(f"{live_server.url}/v1/docs/{key}", headers=headers) as response:
            assert response.status == 200
            document = (await response.json())["document"]
        assert {SQL_FRAGMENTS[1], SQL_FRAGMENTS[5]} <= strings_in(document)

    # Every table is still there and whole.
    async with live_server.engine.connect() as conn:
        for table in (tables.events, tables.documents, tables.changes, tables.checkpoints):
            await conn.execute(sa.select(sa.func.count()).select_from(table))
    assert await event_count(live_server) == 2


@pytest.mark.parametrize(
    ("name", "event", "field"),
    [
        (
            "NUL in a payload value",
            {"streamId": "note:n1", "type": "note.written", "payload": {"a": "x\u0000y"}},
            "payload",
        ),
        (
            "NUL in a payload key",
            {"streamId": "note:n1", "type": "note.written", "payload": {"a\u0000": 1}},
            "payload",
        ),
        (
            "NUL in an idempotency key",
            {"streamId": "note:n1", "type": "note.written", "idempotencyKey": "k\u0000"},
            "idempotency_key",
        ),
        (
            "SQL in a stream id",
            {"streamId": "run:r1'; DROP TABLE oa_sync.events; --", "type": "run.created"},
            "stream_id",
        ),
        ("quote in a type", {"streamId": "note:n1", "type": "note.x'--"}, "type"),
        ("NUL in a stream id", {"streamId": "note:n\u00001", "type": "note.written"}, "stream_id"),
    ],
)
async def test_unstorable_or_unsafe_fields_are_refused(
    live_server: LiveServer, name: str, event: dict[str, Any], field: str
) -> None:
    """NUL anywhere, SQL in stream ids or types: 400 naming the field, and nothing written."""
    good = {"streamId": "note:n0", "type": "note.written", "payload": {"ok": True}}
    async with aiohttp.ClientSession() as http:
        status, body = await post_events(live_server, http, [good, event])
    assert status == 400, body
    assert body["error"]["code"] == "malformed"
    assert body["error"]["index"] == 1
    assert body["error"]["field"] == field
    assert await event_count(live_server) == 0  # the batch is atomic: the good event is not in
