"""``GET /v1/stream``: Server-Sent Events for clients that cannot use the WebSocket.

Theory of operation. One response per client, in three phases, with no gap between them:

1. **attach** a fan-out feed first, so nothing committed from now on can be missed;
2. **catch up** from the database: without ``Last-Event-ID`` a snapshot of every matching
   document; with it (a watermark) the coalesced changes after it. A ``Last-Event-ID`` older
   than the retained change log, or newer than the log (another epoch), first sends a
   ``reset`` event and then the snapshot. Then a ``synced`` event whose id is the watermark
   the client is now complete up to;
3. **live**: feed changes above that watermark, filtered by topics ∩ grant.

Every ``update`` event carries ``id: <watermark>``, so the browser's automatic reconnect
resumes exactly where it stopped. Silence is broken by ``: heartbeat <watermark>`` comments.
A client too slow to keep up is disconnected in every phase (it reconnects and resumes): its
feed overflowed (live), or one write waited :data:`SLOW_CONSUMER_GRACE_S` for the transport to
drain (any phase: a reader that stops reading during its snapshot holds at most the
transport's buffer and one page, for at most the grace). Either counts in
``slow_consumer_disconnects``.

Events (``data`` is one line of proto3 JSON)::

    id: 124
    event: update
    data: {"docKey": ..., "projection": ..., "version": "7", "watermark": "124", ...}

    event: reset            data: {"reason": "watermark_expired", "epoch": ...}
    id: 130
    event: synced           data: {"watermark": "130", "epoch": ...}

What this is not: a second protocol. The payloads are the WebSocket messages' bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
from typing import Final

import orjson
import psycopg
import sqlalchemy as sa
import structlog
from aiohttp import web
from oa_sync_core.protocol.codes import LimitKind, ResetReason
from oa_sync_core.protocol.resume import Position, decide_resume

from oa_sync_server.errors import LimitExceededError
from oa_sync_server.fanout import LiveDoc
from oa_sync_server.postgres import read_model
from oa_sync_server.postgres.read_model import DocRow
from oa_sync_server.state import STATE
from oa_sync_server.transports.http import authenticate, bad_query, document_json, parse_topics

__all__ = ["CATCH_UP_PAGE", "add_routes", "stream", "update_event"]

CATCH_UP_PAGE: Final = 500
SLOW_CONSUMER_GRACE_S: Final = 2.0
SOCKET_SEND_BUFFER_BYTES: Final = 256 * 1024
"""The kernel send buffer of each stream (``SO_SNDBUF``), as for the WebSocket."""
"""Longest one write may wait for a client to read before it counts as a slow consumer."""
MAX_WATERMARK: Final = 2**63 - 1
_LAST_ID = re.compile(r"[0-9]{1,19}")

_log = structlog.get_logger(__name__)


def update_event(row: DocRow) -> bytes:
    """The SSE ``update`` event of one document version.

    Its data is the proto3 JSON ``Update`` without a subscription id, which has exactly the
    fields of a ``Document``.
    """
    return b"id: %d\nevent: update\ndata: %b\n\n" % (row.watermark, document_json(row))


def _live_event(live: LiveDoc) -> bytes:
    cached = live.cache.get("sse")
    if cached is None:
        cached = live.cache["sse"] = update_event(live.row)
    return cached


async def _write(response: web.StreamResponse, data: bytes) -> None:
    """Write, waiting at most :data:`SLOW_CONSUMER_GRACE_S` for the client to drain.

    Raises:
        LimitExceededError: ``send_queue``: the client did not read for the grace.
    """
    try:
        async with asyncio.timeout(SLOW_CONSUMER_GRACE_S):
            await response.write(data)
    except TimeoutError:
        raise LimitExceededError(LimitKind.SEND_QUEUE, SLOW_CONSUMER_GRACE_S) from None


def _control(event: str, body: dict[str, str], event_id: int | None = None) -> bytes:
    head = b"id: %d\n" % event_id if event_id is not None else b""
    return head + b"event: %b\ndata: %b\n\n" % (event.encode(), orjson.dumps(body))


async def stream(request: web.Request) -> web.StreamResponse:
    """``GET /v1/stream?topic=…``: catch-up then live updates as Server-Sent Events."""
    principal = await authenticate(request, "sync:read")
    topics = parse_topics(request, principal)
    patterns = read_model.effective_topics(topics, principal.grant)
    raw_last = request.headers.get("Last-Event-ID") or request.query.get("lastEventId")
    last: int | None = None
    if raw_last:
        if not _LAST_ID.fullmatch(raw_last.strip()) or int(raw_last) > MAX_WATERMARK:
            raise bad_query("Last-Event-ID", "Last-Event-ID must be a watermark (an integer)")
        last = int(raw_last.strip())
    state = request.app[STATE]
    limits = state.settings.limits
    # Room for one hub page on top of the queue: a burst is not a slow consumer.
    feed = state.hub.attach(limits.send_queue_messages + state.hub.page_size)
    feed.set_topics(patterns)  # before the catch-up read below
    state.streams.add(feed)
    gauge = state.metrics.connections.labels(transport="sse")
    gauge.inc()
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    sock = request.transport.get_extra_info("socket") if request.transport is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):  # bound what the kernel holds for a slow reader
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_SEND_BUFFER_BYTES)
    try:
        # Read before the headers go out: a database outage is then a 503 with Retry-After.
        engine = await state.catch_up_engine()
        reads = state.catch_up_reads  # the WebSocket's reads, batched with theirs
        meta = await reads.meta(engine)
        await response.prepare(request)
        after, reset = decide_resume(None if last is None else Position(watermark=last), meta)
        if reset is not None:
            await _write(response, _control("reset", {"reason": reset.value, "epoch": meta.epoch}))
        high = meta.watermark
        while True:
            # Each page in its own read, not held while writing to a possibly slow client.
            rows = await reads.documents(
                engine, topics, principal.grant, after=after, limit=CATCH_UP_PAGE
            )
            for row in rows:
                await _write(response, update_event(row))
                state.metrics.updates_sent.labels(format="sse").inc()
                high = max(high, row.watermark)
            if len(rows) < CATCH_UP_PAGE:
                break
            after = rows[-1].watermark
        await _write(
            response, _control("synced", {"watermark": str(high), "epoch": meta.epoch}, high)
        )
        sent = high
        latency = state.metrics.append_to_send_seconds
        while (left_s := principal.expires_at - time.time()) > 0:
            try:
                async with asyncio.timeout(min(limits.heartbeat_interval_s, left_s)):
                    live = await anext(feed, None)
            except TimeoutError:
                if time.time() < principal.expires_at:
                    await _write(response, b": heartbeat %d\n\n" % max(sent, state.hub.watermark))
                continue
            if live is None:
                break
            if live.row.watermark <= sent:
                continue
            sent = live.row.watermark
            if any(p.matches(live.row.doc_key) for p in patterns):
                await _write(response, _live_event(live))
                state.metrics.updates_sent.labels(format="sse").inc()
                if not live.delivery.sent:  # observed once per change, at its first send
                    live.delivery.sent = True
                    if live.committed_at:
                        latency.observe(max(0.0, time.time() - live.committed_at))
        if feed.overflowed:
            raise LimitExceededError(LimitKind.SEND_QUEUE, limits.send_queue_messages)
        if feed.epoch_changed:
            await _write(
                response,
                _control(
                    "reset", {"reason": ResetReason.EPOCH_CHANGED.value, "epoch": state.hub.epoch}
                ),
            )
    except LimitExceededError:  # only the slow-consumer kind is raised after prepare
        state.metrics.slow_consumer_disconnects.inc()
        state.metrics.limit_breaches.labels(kind=LimitKind.SEND_QUEUE.value).inc()
        _log.info("sse_slow_consumer", subject=principal.subject)
        if request.transport is not None:
            request.transport.abort()  # drop what the client would not read
    except ConnectionError:
        pass  # the client went away
    except (sa.exc.SQLAlchemyError, psycopg.Error, OSError) as exc:
        if not response.prepared:
            raise
        # Headers are sent: end the stream; the client resumes with its Last-Event-ID.
        _log.warning("sse_stream_failed", error=type(exc).__name__)
    finally:
        feed.close()
        state.streams.discard(feed)
        gauge.dec()
    return response


def add_routes(app: web.Application) -> None:
    """Register ``GET /v1/stream`` on ``app``."""
    app.router.add_get("/v1/stream", stream)
