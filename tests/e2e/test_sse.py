"""Server-Sent Events over a real socket and Postgres: snapshot, synced, live updates, resume by
Last-Event-ID without a gap, reset, grant filtering, and the same changes as /v1/changes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import sqlalchemy as sa
from oa_sync_server.auth import mint_token
from oa_sync_server.config import Limits
from oa_sync_server.postgres.tables import sync_meta

from tests.e2e.test_http import auth, run_event
from tests.live import LiveServer, make_live_server

WAIT_S = 15.0


@dataclasses.dataclass
class SseEvent:
    """One dispatched SSE event (comments are reported with ``event == "comment"``)."""

    event: str
    data: Any
    id: str | None


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[SseEvent]:
    """Parse an event stream (the subset of the SSE grammar the server writes)."""
    fields: dict[str, str] = {}
    async for raw in resp.content:
        line = raw.decode().rstrip("\r\n")
        if line.startswith(":"):
            yield SseEvent("comment", line[1:].strip(), None)
            continue
        if line == "":
            if "data" in fields:
                yield SseEvent(
                    fields.get("event", "message"), orjson.loads(fields["data"]), fields.get("id")
                )
            fields = {}
            continue
        name, _, value = line.partition(":")
        fields[name] = value.removeprefix(" ")


class Stream:
    """An open /v1/stream response and its parsed events."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.events = sse_events(resp)

    async def next(self, *, skip_comments: bool = True) -> SseEvent:
        """The next event (bounded wait)."""
        async with asyncio.timeout(WAIT_S):
            while True:
                event = await anext(self.events)
                if event.event != "comment" or not skip_comments:
                    return event

    async def until_synced(self) -> tuple[list[SseEvent], SseEvent]:
        """Every event before ``synced``, and the ``synced`` event."""
        before: list[SseEvent] = []
        while True:
            event = await self.next()
            if event.event == "synced":
                return before, event
            before.append(event)


async def open_stream(
    session: aiohttp.ClientSession,
    token: str,
    topics: list[str],
    last_id: str | None = None,
    *,
    base: str = "",
) -> Stream:
    """GET /v1/stream, checked to be an event stream."""
    headers = auth(token) | ({"Last-Event-ID": last_id} if last_id is not None else {})
    resp = await session.get(
        base + "/v1/stream", params=[("topic", t) for t in topics], headers=headers
    )
    assert resp.status == 200, await resp.text()
    assert resp.content_type == "text/event-stream"
    return Stream(resp)


async def test_snapshot_then_live_and_changes_agree(live_server: LiveServer) -> None:
    """A stream sends the snapshot, ``synced``, then live updates of an HTTP append; the same
    documents and versions come back from /v1/changes."""
    await live_server.append([run_event("run.created", "r1"), run_event("run.created", "r2")])
    await live_server.settle()
    token = live_server.token()
    async with aiohttp.ClientSession(live_server.url) as s:
        stream = await open_stream(s, token, ["runtime/run_summary:*"])
        snapshot, synced = await stream.until_synced()
        assert [e.data["docKey"] for e in snapshot] == [
            "runtime/run_summary:r1",
            "runtime/run_summary:r2",
        ]
        assert all(e.event == "update" and e.id == e.data["watermark"] for e in snapshot)
        assert synced.id == synced.data["watermark"] == snapshot[-1].id
        body = {"events": [run_event("run.started", "r1"), run_event("run.created", "r3")]}
        async with s.post("/v1/events", json=body, headers=auth(token)) as resp:
            assert resp.status == 200
        live = [await stream.next(), await stream.next()]
        by_key = {e.data["docKey"]: e.data["version"] for e in snapshot + live}
        assert by_key["runtime/run_summary:r1"] == "2"
        assert by_key["runtime/run_summary:r3"] == "1"
        ids = [int(e.id or 0) for e in snapshot + live]
        assert ids == sorted(ids)
        stream.resp.close()
        async with s.get(
            "/v1/changes", params={"topic": "runtime/run_summary:*"}, headers=auth(token)
        ) as resp:
            page = await resp.json()
        assert {c["docKey"]: c["version"] for c in page["changes"]} == by_key
        assert page["nextAfter"] == max(live, key=lambda e: int(e.id or 0)).id
        assert live_server.state.metrics.connections.labels(transport="sse")._value.get() in (0, 1)


async def test_resume_by_last_event_id_has_no_gap(live_server: LiveServer) -> None:
    """Reconnecting with Last-Event-ID yields exactly the latest version of every document
    changed meanwhile, then ``synced``; nothing older follows anything newer."""
    await live_server.append([run_event("run.created", f"r{i}") for i in range(60)])
    await live_server.settle()
    token = live_server.token()
    async with aiohttp.ClientSession(live_server.url) as s:
        stream = await open_stream(s, token, ["*"])
        _, synced = await stream.until_synced()
        stream.resp.close()
        # While disconnected: 500 appends across 50 of the 60 documents.
        for round_ in range(10):
            await live_server.append(
                [run_event("run.step", f"r{i}", stepIndex=round_ + 1) for i in range(50)]
            )
        await live_server.settle()
        stream = await open_stream(s, token, ["*"], last_id=synced.id)
        catch_up, synced2 = await stream.until_synced()
        assert sorted(e.data["docKey"] for e in catch_up) == sorted(
            f"runtime/run_summary:r{i}" for i in range(50)
        )
        assert all(e.data["version"] == "11" for e in catch_up)
        ids = [int(e.id or 0) for e in catch_up]
        assert ids == sorted(ids)
        assert int(synced2.id or 0) == ids[-1]
        stream.resp.close()
        # Resuming from the newest id gives nothing but synced.
        stream = await open_stream(s, token, ["*"], last_id=synced2.id)
        nothing, synced3 = await stream.until_synced()
        assert nothing == []
        assert synced3.id == synced2.id
        stream.resp.close()


async def test_stale_last_event_id_gives_reset_then_snapshot(live_server: LiveServer) -> None:
    """A Last-Event-ID older than the retained log, or beyond the log, sends ``reset`` first."""
    await live_server.append([run_event("run.created", "r1"), run_event("run.created", "r2")])
    await live_server.settle()
    token = live_server.token()
    async with aiohttp.ClientSession(live_server.url) as s:
        stream = await open_stream(s, token, ["*"], last_id="999999")
        first = await stream.next()
        assert first.event == "reset"
        assert first.data["reason"] == "watermark_ahead"
        snapshot, _ = await stream.until_synced()
        assert len(snapshot) == 2
        stream.resp.close()
        async with live_server.engine.begin() as conn:
            await conn.execute(
                sa.update(sync_meta).where(sync_meta.c.key == "retained_from").values(value="2")
            )
        stream = await open_stream(s, token, ["*"], last_id="1")
        first = await stream.next()
        assert first.event == "reset"
        assert first.data["reason"] == "watermark_expired"
        stream.resp.close()


async def test_grant_filters_live_updates_and_bad_requests(live_server: LiveServer) -> None:
    """A wide topic only yields granted documents; a disjoint topic is 403, a bad id 400."""
    narrow = live_server.token(topics=["runtime/run_summary:r1"])
    async with aiohttp.ClientSession(live_server.url) as s:
        stream = await open_stream(s, narrow, ["runtime/run_summary:*"])
        await stream.until_synced()
        await live_server.append([run_event("run.created", "r2"), run_event("run.created", "r1")])
        event = await stream.next()
        assert event.data["docKey"] == "runtime/run_summary:r1"
        stream.resp.close()
        async with s.get(
            "/v1/stream",
            params={"topic": "runtime/codex_worker_summary:*"},
            headers=auth(narrow),
        ) as resp:
            assert resp.status == 403
        async with s.get(
            "/v1/stream",
            params={"topic": "*"},
            headers=auth(narrow) | {"Last-Event-ID": "abc"},
        ) as resp:
            assert resp.status == 400
        async with s.get(
            "/v1/stream",
            params={"topic": "*"},
            headers=auth(narrow) | {"Last-Event-ID": "9" * 19},
        ) as resp:
            assert resp.status == 400
        async with s.get("/v1/stream", params={"topic": "*"}) as resp:
            assert resp.status == 401


async def test_heartbeat_comments_when_idle(database_url: str) -> None:
    """An idle stream carries ``: heartbeat <watermark>`` comments."""
    limits = Limits(heartbeat_interval_s=0.2)
    async with (
        make_live_server(database_url, limits=limits) as server,
        aiohttp.ClientSession(server.url) as s,
    ):
        stream = await open_stream(s, server.token(), ["*"])
        await stream.until_synced()
        comment = await stream.next(skip_comments=False)
        assert comment.event == "comment"
        assert comment.data == "heartbeat 0"
        stream.resp.close()


async def test_streams_end_cleanly_on_shutdown(database_url: str) -> None:
    """Shutting the server down ends an open stream promptly and cleanly."""
    async with aiohttp.ClientSession() as s, contextlib.AsyncExitStack() as stack:
        server = await stack.enter_async_context(make_live_server(database_url))
        stream = await open_stream(s, server.token(), ["*"], base=server.url)
        await stream.until_synced()
        closing = asyncio.create_task(stack.aclose())
        async with asyncio.timeout(WAIT_S):
            rest = [e async for e in stream.events]
            await closing
        assert [e for e in rest if e.event != "comment"] == []
        assert server.state.stopping.is_set()


async def test_database_failure_mid_stream_ends_it_cleanly(live_server: LiveServer) -> None:
    """A database failure after the stream started ends the stream (the client resumes later)
    instead of breaking the response."""
    async with live_server.engine.begin() as conn:
        # The position read before the headers still works; the snapshot read after them fails.
        await conn.execute(sa.text("ALTER TABLE oa_sync.documents RENAME COLUMN body TO gone"))
    async with aiohttp.ClientSession(live_server.url) as s:
        stream = await open_stream(s, live_server.token(), ["*"])
        async with asyncio.timeout(WAIT_S):
            assert [e async for e in stream.events] == []


async def test_stream_ends_when_the_token_expires(live_server: LiveServer) -> None:
    """A stream ends at its token's expiry (the client reconnects with a fresh token)."""
    token = mint_token(
        live_server.secret, subject="short", topics=["*"], ttl_s=2, now=time.time() - 1
    )
    async with aiohttp.ClientSession(live_server.url) as s:
        stream = await open_stream(s, token, ["*"])
        await stream.until_synced()
        async with asyncio.timeout(WAIT_S):
            rest = [e async for e in stream.events if e.event != "comment"]
        assert rest == []


async def test_last_event_id_query_fallback_and_header_precedence(live_server: LiveServer) -> None:
    """``?lastEventId=`` resumes like the header (for clients that cannot set headers); when
    both are given the ``Last-Event-ID`` header wins."""
    await live_server.append([run_event("run.created", "r1")])
    first = await live_server.settle()
    await live_server.append([run_event("run.created", "r2")])
    await live_server.settle()
    token = live_server.token()
    params = [("topic", "*"), ("lastEventId", str(first))]
    async with aiohttp.ClientSession(live_server.url) as s:
        async with s.get("/v1/stream", params=params, headers=auth(token)) as resp:
            catch_up, _ = await Stream(resp).until_synced()
        assert [e.data["docKey"] for e in catch_up] == ["runtime/run_summary:r2"]
        # The header says "from the start of the log": both documents; the query is ignored.
        headers = auth(token) | {"Last-Event-ID": "0"}
        async with s.get("/v1/stream", params=params, headers=headers) as resp:
            catch_up, _ = await Stream(resp).until_synced()
        assert sorted(e.data["docKey"] for e in catch_up) == [
            "runtime/run_summary:r1",
            "runtime/run_summary:r2",
        ]


async def test_live_epoch_change_sends_reset_and_ends_the_stream(live_server: LiveServer) -> None:
    """A rebuild's new epoch reaching a live stream sends ``reset`` (``epoch_changed``, the new
    epoch) and ends the response, so the browser reconnects and gets a fresh snapshot."""
    await live_server.append([run_event("run.created", "r1")])
    await live_server.settle()
    async with aiohttp.ClientSession(live_server.url) as s:
        stream = await open_stream(s, live_server.token(), ["*"])
        await stream.until_synced()
        async with live_server.engine.begin() as conn:
            await conn.execute(
                sa.update(sync_meta).where(sync_meta.c.key == "epoch").values(value="rebuilt")
            )
        live_server.state.hub.wake()
        reset = await stream.next()
        assert (reset.event, reset.data) == (
            "reset",
            {"reason": "epoch_changed", "epoch": "rebuilt"},
        )
        async with asyncio.timeout(WAIT_S):
            assert [e async for e in stream.events if e.event != "comment"] == []
