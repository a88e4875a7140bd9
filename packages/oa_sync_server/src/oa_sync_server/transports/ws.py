"""``GET /v1/sync``: the WebSocket endpoint, a thin driver of the core's server session.

Theory of operation
-------------------
Before the upgrade the handler refuses what HTTP can answer: a server shutting down (503), an
``Origin`` outside ``OA_SYNC_ALLOWED_ORIGINS`` (403), and, when the request carries
``Authorization: Bearer``, a bad token (401), one without ``sync:read`` (403) or one subject
too many connections (429). After the upgrade a client that chose no known subprotocol is
closed with 4400.

Each connection then runs one :class:`~oa_sync_core.protocol.server_session.ServerSession` and four
kinds of task, all of them feeding the session and performing the actions it returns:

* the **reader** decodes each message (:func:`oa_sync_core.protocol.wire.decode_client`; a bad one
  closes with the code :func:`oa_sync_server.errors.classify` gives) and verifies tokens;
* the **feed** task takes the live changes of the process's :class:`~oa_sync_server.fanout.Hub`
  (the feed is attached *before* any snapshot is read, so nothing falls between a snapshot and
  the live stream; the session drops what the snapshot already covered);
* one **catch-up** task per new subscription reads the change-log metadata, then the matching
  documents page by page (:func:`oa_sync_server.postgres.read_model.documents_matching`);
* the **timer** calls ``tick`` at the session's next deadline (auth deadline, token expiry,
  idleness, heartbeats).

Everything sent goes through one bounded per-connection send queue drained by a **writer**
task. Catch-up pages wait for room in that queue (backpressure). Live changes are queued while
fewer than ``send_queue_messages`` are waiting; a client is a *slow consumer*, closed with 4429
and counted in ``slow_consumer_disconnects``, when its queue stays full for
:data:`SLOW_CONSUMER_GRACE_S` or its live feed (bounded: the queue size plus one hub page)
overflows meanwhile. The hub and every other connection carry on. aiohttp's own refusals are
mapped to the protocol's codes: a message over ``max_message_bytes`` closes with 4413 (not
1009), invalid UTF-8 or a frame-level protocol error with 4400.

What this is not: protocol logic (the session decides what to send), a codec, or a reader of
the database beyond the two read-model calls.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import math
import time
import uuid
import weakref
from collections.abc import Coroutine, Sequence
from typing import Any, Final

import structlog
from aiohttp import WSCloseCode, WSMsgType, web
from oa_sync_core.errors import OaSyncError
from oa_sync_core.protocol.codes import CloseCode, ErrorCode, LimitKind
from oa_sync_core.protocol.server_session import (
    Action,
    CancelCatchUp,
    CatchUp,
    Close,
    Credentials,
    Send,
    SendUpdate,
    ServerSession,
    SessionLimits,
    VerifyToken,
)
from oa_sync_core.protocol.wire import (
    EncodedUpdate,
    ErrorFrame,
    WireFormat,
    decode_client,
    encode_server,
)

from oa_sync_server.auth import Principal
from oa_sync_server.config import Limits
from oa_sync_server.errors import (
    AuthError,
    AuthFailure,
    ForbiddenError,
    LimitExceededError,
    classify,
)
from oa_sync_server.fanout import Feed
from oa_sync_server.postgres import read_model
from oa_sync_server.state import STATE, ServerState

__all__ = ["SUBPROTOCOLS", "close_all", "session_limits", "sync_handler"]

SUBPROTOCOLS: Final = (WireFormat.JSON.value, WireFormat.PROTO.value)
"""The subprotocols offered on the upgrade, preferred first."""

READ_SCOPE: Final = "sync:read"
_CATCH_UP_PAGE: Final = 500
_HUB_BURST: Final = 1000  # the hub hands a feed up to one page of changes at once
_CLOSE_TIMEOUT_S: Final = 5.0
SLOW_CONSUMER_GRACE_S: Final = 2.0
"""How long a full send queue may stay full before its client counts as a slow consumer."""
_REASON_BYTES: Final = 120

_LIMIT_ERRORS: Final[dict[str, str]] = {
    ErrorCode.TOO_MANY_SUBSCRIPTIONS: LimitKind.SUBSCRIPTIONS.value,
    ErrorCode.TOO_MANY_TOPICS: LimitKind.TOPICS.value,
}
"""Error frames that report a limit breach, and the breach's kind for the metric."""

_log = structlog.get_logger(__name__)


def session_limits(limits: Limits) -> SessionLimits:
    """The session's share of the server's limits."""
    return SessionLimits(
        auth_deadline_s=limits.auth_deadline_s,
        idle_timeout_s=limits.idle_timeout_s,
        heartbeat_interval_s=limits.heartbeat_interval_s,
        max_subscriptions=limits.max_subscriptions,
        max_topics_per_subscription=limits.max_topics_per_subscription,
        messages_per_second=limits.messages_per_second,
        message_burst=limits.message_burst,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class _Item:
    """A document version as the session sees it, with its shared encoding."""

    doc_key: str
    version: int
    watermark: int
    encoded: EncodedUpdate
    committed_at: float = 0.0

    @classmethod
    def of_row(cls, row: read_model.DocRow) -> _Item:
        return cls(row.doc_key, row.version, row.watermark, row.encoded())


class _Registry:
    """The open connections of one app: for shutdown and the per-subject limit."""

    def __init__(self) -> None:
        self.connections: set[_Connection] = set()
        self.per_subject: collections.Counter[str] = collections.Counter()

    def acquire(self, subject: str, limit: int) -> bool:
        if self.per_subject[subject] >= limit:
            return False
        self.per_subject[subject] += 1
        return True

    def release(self, subject: str) -> None:
        self.per_subject[subject] -= 1
        if self.per_subject[subject] <= 0:
            del self.per_subject[subject]


_REGISTRIES: weakref.WeakKeyDictionary[web.Application, _Registry] = weakref.WeakKeyDictionary()


def _registry(app: web.Application) -> _Registry:
    registry = _REGISTRIES.get(app)
    if registry is None:
        registry = _REGISTRIES[app] = _Registry()
    return registry


class _SyncSocket(web.WebSocketResponse):
    """aiohttp's WebSocket with its own refusal codes mapped to the protocol's."""

    owner: ServerState | None = None

    async def close(
        self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True
    ) -> bool:
        if code == WSCloseCode.MESSAGE_TOO_BIG:
            code, message = CloseCode.TOO_LARGE, b"message too large"
            if self.owner is not None:
                self.owner.metrics.limit_breaches.labels(kind=LimitKind.MESSAGE_SIZE.value).inc()
        elif code in (WSCloseCode.INVALID_TEXT, WSCloseCode.PROTOCOL_ERROR):
            code, message = CloseCode.MALFORMED, b"malformed frame"
        return await super().close(code=code, message=message, drain=drain)


def _check_origin(request: web.Request, allowed: Sequence[str]) -> None:
    origin = request.headers.get("Origin")
    if origin is None or "*" in allowed:
        return
    if origin.rstrip("/") not in allowed:
        raise ForbiddenError("", "origin")


async def _header_principal(request: web.Request, state: ServerState) -> Principal | None:
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError(AuthFailure.MALFORMED, "Authorization is not 'Bearer <token>'")
    principal = await state.verifier.verify(token.strip())
    if not principal.has_scope(READ_SCOPE):
        raise ForbiddenError(principal.subject, READ_SCOPE)
    return principal


async def sync_handler(request: web.Request) -> web.StreamResponse:
    """Serve one WebSocket connection of sync protocol v1 (see the module docstring).

    Raises (before the upgrade, answered as JSON errors by the app's error middleware):
        web.HTTPServiceUnavailable: the server is shutting down.
        ForbiddenError: a disallowed ``Origin`` or a header token without ``sync:read``.
        AuthError: a bad ``Authorization`` header token.
        LimitExceededError: the subject already holds the most connections allowed.
    """
    state = request.app[STATE]
    settings = state.settings
    limits = settings.limits
    if state.stopping.is_set():
        raise web.HTTPServiceUnavailable(reason="shutting down")
    _check_origin(request, settings.allowed_origins)
    registry = _registry(request.app)
    principal = await _header_principal(request, state)
    if principal is not None and not registry.acquire(
        principal.subject, limits.max_connections_per_subject
    ):
        state.metrics.limit_breaches.labels(kind=LimitKind.CONNECTIONS_PER_SUBJECT.value).inc()
        raise LimitExceededError(
            LimitKind.CONNECTIONS_PER_SUBJECT, limits.max_connections_per_subject
        )
    ws = _SyncSocket(
        protocols=SUBPROTOCOLS,
        compress=False,
        max_msg_size=limits.max_message_bytes,
        heartbeat=None,
        autoping=True,
        timeout=_CLOSE_TIMEOUT_S,
    )
    ws.owner = state
    try:
        await ws.prepare(request)
    except BaseException:
        if principal is not None:
            registry.release(principal.subject)
        raise
    if ws.ws_protocol not in SUBPROTOCOLS:
        if principal is not None:
            registry.release(principal.subject)
        await ws.close(code=CloseCode.MALFORMED, message=b"unsupported subprotocol")
        return ws
    connection = _Connection(ws, WireFormat(ws.ws_protocol), state, registry, request.transport)
    registry.connections.add(connection)
    try:
        await connection.run(principal)
    finally:
        registry.connections.discard(connection)
    return ws


async def close_all(app: web.Application, *, timeout_s: float = _CLOSE_TIMEOUT_S) -> None:
    """Close every WebSocket connection of ``app`` with 1001 (going away) and wait for them.

    Args:
        app: the application shutting down.
        timeout_s: how long to wait for the connections to finish closing.
    """
    registry = _REGISTRIES.get(app)
    if registry is None or not registry.connections:
        return
    connections = list(registry.connections)
    for connection in connections:
        connection.request_close(CloseCode.GOING_AWAY, "server shutting down")
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*(c.done.wait() for c in connections))


class _Connection:
    """One open WebSocket: the session, its tasks and its send queue."""

    def __init__(
        self,
        ws: _SyncSocket,
        fmt: WireFormat,
        state: ServerState,
        registry: _Registry,
        transport: asyncio.Transport | None,
    ) -> None:
        self.ws = ws
        self.transport = transport
        self.fmt = fmt
        self.state = state
        self.registry = registry
        self.limits = state.settings.limits
        self.loop = asyncio.get_running_loop()
        self.session: ServerSession[_Item] = ServerSession(
            session_limits(self.limits), self.loop.time(), session_id=uuid.uuid4().hex
        )
        self.format_label = "json" if fmt is WireFormat.JSON else "proto"
        self.queue: collections.deque[tuple[str | bytes, bool, float]] = collections.deque()
        self.low_water = max(1, self.limits.send_queue_messages // 2)
        self.chunk = max(1, self.limits.send_queue_messages // 4)
        self.wake_writer = asyncio.Event()
        self.room = asyncio.Event()
        self.rearm = asyncio.Event()
        self.armed_for = math.inf  # the deadline the timer sleeps until
        self.stop = asyncio.Event()
        self.done = asyncio.Event()
        self.close_request: tuple[int, str] | None = None
        self.feed: Feed | None = None
        self.feed_task: asyncio.Task[None] | None = None
        self.catch_ups: dict[int, asyncio.Task[None]] = {}
        self.subject: str | None = None
        self.subscriptions = 0
        self.log = _log.bind(session_id=self.session.session_id, format=self.format_label)

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self, principal: Principal | None) -> None:
        metrics = self.state.metrics
        metrics.connections.labels(transport="ws").inc()
        self.log.debug("ws_connected")
        writer = asyncio.create_task(self._guard(self._write_loop()), name="oa-sync-ws-writer")
        tasks = [asyncio.create_task(self._guard(self._timer_loop()), name="oa-sync-ws-timer")]
        try:
            if principal is not None:
                self.subject = principal.subject  # acquired before the upgrade
                await self._authenticated(principal, acquired=True)
            tasks.append(
                asyncio.create_task(self._guard(self._read_loop()), name="oa-sync-ws-reader")
            )
            await self.stop.wait()
        finally:
            tasks.extend(self.catch_ups.values())
            if self.feed_task is not None:
                tasks.append(self.feed_task)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.feed is not None:
                self.feed.close()
            # The writer may be waiting for the transport to drain; aiohttp shares that wait
            # with the close frame's, so cancelling the writer first would cancel the close.
            self.queue.clear()
            await self._close_socket()
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            metrics.connections.labels(transport="ws").dec()
            metrics.subscriptions.dec(self.subscriptions)
            self.subscriptions = 0
            if self.subject is not None:
                self.registry.release(self.subject)
            self.log.debug("ws_closed", code=self.ws.close_code)
            self.done.set()

    async def _close_socket(self) -> None:
        if self.ws.closed:
            return
        code, reason = self.close_request or (WSCloseCode.OK, "")
        message = reason.encode("utf-8")[:_REASON_BYTES]
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT_S + 1):
                await self.ws.close(code=code, message=message)
        except TimeoutError:
            # The peer reads nothing, not even the close frame: drop the connection rather
            # than hold its buffers until TCP gives up.
            if self.transport is not None:
                self.transport.abort()
        except Exception as exc:  # noqa: BLE001 - the peer is gone; nothing left to do
            self.log.debug("ws_close_failed", error=type(exc).__name__)

    def request_close(self, code: int, reason: str) -> None:
        """Close the connection with ``code`` (from any task); the first request wins."""
        if self.close_request is None and not self.stop.is_set():
            self.close_request = (code, reason)
            self.log.debug("ws_closing", code=code, reason=reason)
        self.session.close(CloseCode.GOING_AWAY, reason)  # no more decisions; tasks end
        self.stop.set()

    async def _guard(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken connection must not break the server
            self.log.error("ws_failed", error=type(exc).__name__)
            self.request_close(1011, "internal error")

    # -- performing actions ----------------------------------------------------------------

    def _perform(self, actions: Sequence[Action[_Item]]) -> None:
        catching_up = False
        for action in actions:
            if isinstance(action, SendUpdate):
                update = action.update
                data = update.encoded.frame(action.subscription_id, self.fmt)
                self._enqueue(data, update=True, committed_at=update.committed_at)
            elif isinstance(action, Send):
                frame = action.frame
                if isinstance(frame, ErrorFrame) and frame.code in _LIMIT_ERRORS:
                    kind = _LIMIT_ERRORS[frame.code]
                    self.state.metrics.limit_breaches.labels(kind=kind).inc()
                self._enqueue(encode_server(frame, self.fmt))
            elif isinstance(action, Close):
                if action.limit:
                    self.state.metrics.limit_breaches.labels(kind=action.limit).inc()
                self.request_close(action.code, action.reason)
            elif isinstance(action, CatchUp):
                catching_up = True
                self.catch_ups[action.serial] = asyncio.create_task(
                    self._guard(self._catch_up(action)), name="oa-sync-ws-catch-up"
                )
            elif isinstance(action, CancelCatchUp):
                task = self.catch_ups.pop(action.serial, None)
                if task is not None and task is not asyncio.current_task():
                    task.cancel()
            elif isinstance(action, VerifyToken):  # pragma: no cover - handled by the reader
                raise TypeError("VerifyToken must be handled by the reader")
        count = len(self.session.subscription_ids)
        if catching_up or count != self.subscriptions:
            # Before any catch-up task runs (none has yielded yet): the feed must already carry
            # the new topics when their snapshot is read, or a change could fall in between.
            self._route_feed()
        if count != self.subscriptions:
            self.state.metrics.subscriptions.inc(count - self.subscriptions)
            self.subscriptions = count
        if self.session.next_deadline() < self.armed_for:
            self.rearm.set()  # a deadline moved earlier (sends only ever move them later)

    def _enqueue(
        self, data: str | bytes, *, update: bool = False, committed_at: float = 0.0
    ) -> None:
        if self.stop.is_set():
            return
        self.queue.append((data, update, committed_at))
        self.wake_writer.set()

    async def _below(self, threshold: int, grace_s: float | None = None) -> bool:
        """Wait until fewer than ``threshold`` messages are queued.

        Returns:
            ``False`` when ``grace_s`` passed first (the client is not reading).
        """
        deadline = None if grace_s is None else self.loop.time() + grace_s
        while len(self.queue) >= threshold and not self.stop.is_set():
            self.room.clear()
            try:
                async with asyncio.timeout_at(deadline):
                    await self.room.wait()
            except TimeoutError:
                return len(self.queue) < threshold
        return True

    # -- tasks -----------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        metrics = self.state.metrics
        sent = metrics.updates_sent.labels(format=self.format_label)
        while True:
            while not self.queue:
                self.wake_writer.clear()
                await self.wake_writer.wait()
            data, update, committed_at = self.queue.popleft()
            self.room.set()
            try:
                if isinstance(data, str):
                    await self.ws.send_str(data)
                else:
                    await self.ws.send_bytes(data)
            except (ConnectionError, RuntimeError):
                self.stop.set()  # the peer is gone
                return
            if update:
                sent.inc()
                if committed_at:
                    metrics.append_to_send_seconds.observe(max(0.0, time.time() - committed_at))

    async def _timer_loop(self) -> None:
        hub = self.state.hub
        while True:
            deadline = self.session.next_deadline()
            if deadline > self.loop.time():
                self.rearm.clear()
                self.armed_for = deadline
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(deadline):
                        await self.rearm.wait()
                self.armed_for = math.inf
                continue
            actions = self.session.tick(self.loop.time(), watermark=hub.watermark)
            self._perform(actions)
            if not actions:  # float rounding: the deadline is due by a hair
                await asyncio.sleep(0.001)

    async def _read_loop(self) -> None:
        max_bytes = self.limits.max_message_bytes
        try:
            while not self.stop.is_set():
                msg = await self.ws.receive()
                if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    return  # closed by the peer, or refused by aiohttp (too large, bad frame)
                try:
                    frame = decode_client(msg.data, self.fmt, max_bytes=max_bytes)
                except OaSyncError as exc:
                    mapping = classify(exc)
                    code = mapping.close_code or CloseCode.MALFORMED
                    if code == CloseCode.TOO_LARGE:
                        self.state.metrics.limit_breaches.labels(
                            kind=LimitKind.MESSAGE_SIZE.value
                        ).inc()
                    self.request_close(code, mapping.code)
                    return
                for action in self.session.receive(frame, self.loop.time()):
                    if isinstance(action, VerifyToken):
                        await self._verify(action.token)
                    else:
                        self._perform([action])
        finally:
            self.stop.set()

    async def _verify(self, token: str) -> None:
        try:
            principal = await self.state.verifier.verify(token)
        except AuthError as exc:
            self.state.metrics.auth_failures.labels(reason=exc.reason.value).inc()
            self._perform(self.session.auth_failed(exc.reason.value, self.loop.time()))
            return
        if not principal.has_scope(READ_SCOPE):
            self._perform(self.session.auth_failed("missing scope sync:read", self.loop.time()))
            return
        await self._authenticated(principal, acquired=False)

    async def _authenticated(self, principal: Principal, *, acquired: bool) -> None:
        expires_at = self.loop.time() + (principal.expires_at - time.time())
        credentials = Credentials(
            subject=principal.subject, grant=principal.grant, expires_at=expires_at
        )
        if self.session.credentials is not None:  # a refresh
            self._perform(
                self.session.authenticated(
                    credentials,
                    self.loop.time(),
                    epoch=self.session.epoch,
                    watermark=self.state.hub.watermark,
                )
            )
            return
        if not acquired:
            if not self.registry.acquire(
                principal.subject, self.limits.max_connections_per_subject
            ):
                kind = LimitKind.CONNECTIONS_PER_SUBJECT.value
                self.state.metrics.limit_breaches.labels(kind=kind).inc()
                self.request_close(CloseCode.RATE_LIMITED, "too many connections")
                return
            self.subject = principal.subject
        # Attach the live feed before any snapshot is read, so nothing falls in between. The
        # welcome announces what the hub has delivered (no database read per connection).
        self._attach()
        hub = self.state.hub
        self._perform(
            self.session.authenticated(
                credentials, self.loop.time(), epoch=hub.epoch, watermark=hub.watermark
            )
        )

    def _attach(self) -> None:
        self.feed = self.state.hub.attach(self.limits.send_queue_messages + _HUB_BURST)
        self._route_feed()
        if self.feed_task is None or self.feed_task.done():
            self.feed_task = asyncio.create_task(
                self._guard(self._feed_loop()), name="oa-sync-ws-feed"
            )

    def _route_feed(self) -> None:
        """Offer the feed only the changes the open subscriptions' topics cover."""
        if self.feed is not None:
            session = self.session
            self.feed.set_topics(
                topic for sid in session.subscription_ids for topic in session.topics_of(sid)
            )

    async def _feed_loop(self) -> None:
        while not self.stop.is_set():
            feed = self.feed
            assert feed is not None
            async for live in feed:
                limit = self.limits.send_queue_messages
                if not await self._below(limit, SLOW_CONSUMER_GRACE_S):
                    self._slow_consumer()
                    return
                if feed.overflowed or self.stop.is_set():
                    break
                item = _Item(
                    live.row.doc_key,
                    live.row.version,
                    live.row.watermark,
                    live.update,
                    live.committed_at,
                )
                self._perform(self.session.on_live(item, self.loop.time()))
            if self.stop.is_set():
                return
            if feed.overflowed:
                self._slow_consumer()
                return
            if not feed.epoch_changed:
                return  # the hub stopped: the app is shutting down
            self._attach()
            self._perform(self.session.epoch_changed(self.state.hub.epoch, self.loop.time()))

    def _slow_consumer(self) -> None:
        if self.stop.is_set():
            return
        self.state.metrics.slow_consumer_disconnects.inc()
        self.state.metrics.limit_breaches.labels(kind=LimitKind.SEND_QUEUE.value).inc()
        self.request_close(CloseCode.RATE_LIMITED, "too slow a consumer")

    async def _catch_up(self, action: CatchUp) -> None:
        serial = action.serial
        try:
            engine = self.state.engine
            async with engine.connect() as conn:
                meta = await read_model.read_meta(conn)
                plan = self.session.begin_catch_up(serial, meta, self.loop.time())
                if plan.cancelled:
                    return
                self._perform(plan.actions)
                rows = await read_model.documents_matching(
                    conn, action.topics, action.grant, after=plan.after, limit=_CATCH_UP_PAGE
                )
            while True:
                for start in range(0, len(rows), self.chunk):
                    await self._below(self.low_water)
                    items = [_Item.of_row(r) for r in rows[start : start + self.chunk]]
                    self._perform(self.session.catch_up_rows(serial, items, self.loop.time()))
                if len(rows) < _CATCH_UP_PAGE:
                    break
                # Each page in its own short transaction: a document that changes meanwhile
                # moves to a higher watermark and is found by a later page or the live feed.
                async with engine.connect() as conn:
                    rows = await read_model.documents_matching(
                        conn,
                        action.topics,
                        action.grant,
                        after=rows[-1].watermark,
                        limit=_CATCH_UP_PAGE,
                    )
            self._perform(self.session.end_catch_up(serial, meta, self.loop.time()))
        finally:
            if self.catch_ups.get(serial) is asyncio.current_task():
                del self.catch_ups[serial]
