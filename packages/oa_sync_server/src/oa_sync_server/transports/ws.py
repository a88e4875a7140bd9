"""``GET /v1/sync``: the WebSocket endpoint, a thin driver of the core's server session.

Theory of operation
-------------------
Before the upgrade the handler refuses what HTTP can answer: a server shutting down (503), an
``Origin`` outside ``OA_SYNC_ALLOWED_ORIGINS`` (403), and, when the request carries
``Authorization: Bearer``, a bad token (401), one without ``sync:read`` (403) or one subject
too many connections (429). After the upgrade a client that chose no known subprotocol is
closed with 4400.

Each connection is one :class:`~oa_sync_core.protocol.server_session.ServerSession` and one
task, the handler's own, which reads: it decodes each message
(:func:`oa_sync_core.protocol.wire.decode_client`; a bad one closes with the code
:func:`oa_sync_server.errors.classify` gives), verifies tokens (cached by the verifier until
``exp``) and performs the actions the session returns. Nothing else runs per connection:

* **live changes** are pushed by the process's :class:`~oa_sync_server.fanout.Hub` through a
  :class:`~oa_sync_server.fanout.Tap`, synchronously, inside the hub's read pass: the session
  decides (``on_live``) and the frames go straight into the connection's send buffer. The tap
  is attached *before* any snapshot is read, so nothing falls between a snapshot and the live
  stream; the session drops what the snapshot already covered;
* the **send buffer** is a deque of whole WebSocket frames (header included; a live update's
  frame is built once per change, subscription id and format and shared by every connection
  whose subscription has that id), bounded in messages and in bytes. It is flushed once per
  event-loop turn (one ``call_soon`` for every connection with something to write,
  :class:`_Flusher`): every pending frame goes to the transport in one ``write`` (one system
  call for a whole hub page), as long as the transport's own buffer is below
  :data:`_TRANSPORT_HIGH_BYTES`. The commit-to-send latency is observed once per change, at
  its first write, and ``updates_sent`` is added to once per loop turn (:class:`_Tally`);
* **time** (heartbeats, the auth deadline, idleness, token expiry, the slow-consumer grace, and
  re-trying a flush the transport refused) is one entry per connection in the app's
  :class:`TimerWheel`: one event-loop timer per occupied slot of
  :data:`TIMER_RESOLUTION_S`, whatever the number of connections;
* one transient **catch-up** task per new subscription reads the change-log metadata (resumes
  only), then the matching documents page by page through the app's
  :class:`~oa_sync_server.postgres.read_model.CatchUpReads` (shared with SSE; the reads of one
  event-loop turn are made together), waiting for room in the send buffer between chunks;
* an idle connection's **heartbeat** is one pre-framed bytes object written straight to the
  transport (nothing buffered, nothing scheduled).

Slow consumers, in every phase (snapshot, catch-up, live). A connection is *full* when its send
buffer holds ``send_queue_messages`` messages or ``send_queue_bytes`` bytes. Live changes and
control frames are buffered past that, up to twice ``send_queue_bytes`` and
``send_queue_messages`` plus one hub page (a burst is not a slow consumer); catch-up chunks
wait for the buffer to fall below half. A connection full for :data:`SLOW_CONSUMER_GRACE_S`,
past a hard bound, or whose catch-up waited the grace for room, is closed with 4429 and counted
in ``slow_consumer_disconnects``; its buffer is dropped at once. Memory per connection is so
bounded by twice ``send_queue_bytes`` plus the transport's :data:`_TRANSPORT_HIGH_BYTES` and
one catch-up page, and the kernel's by :data:`SOCKET_SEND_BUFFER_BYTES`. The hub and every
other connection carry on. aiohttp's own refusals are mapped
to the protocol's codes: a message over ``max_message_bytes`` closes with 4413 (not 1009),
invalid UTF-8 or a frame-level protocol error with 4400.

Frames are written as RFC 6455 server frames (FIN, text or binary opcode, no mask, no
compression: the socket is prepared with ``compress=False``) directly to the transport, so a
batch costs one write; aiohttp keeps reading, answering pings and closing.

What this is not: protocol logic (the session decides what to send), a codec, or a reader of
the database beyond the two read-model calls.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import math
import socket
import struct
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from typing import Final, Protocol

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
    ErrorFrame,
    Heartbeat,
    ServerFrame,
    WireFormat,
    decode_client,
    encode_server,
)
from oa_sync_core.topics import Topic
from prometheus_client import Counter

from oa_sync_server.auth import Principal
from oa_sync_server.config import Limits
from oa_sync_server.errors import (
    AuthError,
    AuthFailure,
    ForbiddenError,
    LimitExceededError,
    classify,
)
from oa_sync_server.fanout import Delivery, LiveDoc, Tap
from oa_sync_server.postgres import read_model
from oa_sync_server.state import STATE, ServerState

__all__ = ["SUBPROTOCOLS", "TimerWheel", "close_all", "session_limits", "sync_handler"]

SUBPROTOCOLS: Final = (WireFormat.JSON.value, WireFormat.PROTO.value)
"""The subprotocols offered on the upgrade, preferred first."""

READ_SCOPE: Final = "sync:read"
_CATCH_UP_PAGE: Final = 500
_CLOSE_TIMEOUT_S: Final = 5.0
SLOW_CONSUMER_GRACE_S: Final = 2.0
"""How long a full send buffer may stay full before its client counts as a slow consumer."""
TIMER_RESOLUTION_S: Final = 0.05
"""Granularity of the timer wheel: a deadline fires at most this late."""
_TRANSPORT_HIGH_BYTES: Final = 64 * 1024
SOCKET_SEND_BUFFER_BYTES: Final = 256 * 1024
"""The kernel send buffer of each WebSocket (``SO_SNDBUF``; Linux doubles it): without it the
kernel's auto-tuning lets a reader that stopped reading hold up to 4 MiB (``tcp_wmem``)."""
"""Bytes the transport may hold unsent before the connection stops writing to it."""
_DRAIN_POLL_S: Final = 0.005
"""How often a catch-up waiting for room re-tries a flush the transport refused (the wheel
would retry only at its next slot, :data:`TIMER_RESOLUTION_S`)."""
_REASON_BYTES: Final = 120
_OP_TEXT: Final = 0x81  # FIN + text
_OP_BINARY: Final = 0x82  # FIN + binary

_NO_FRAMES: Final[collections.deque[tuple[bytes, LiveDoc | None]]] = collections.deque(maxlen=0)
"""The send buffer of every connection with nothing to send (never appended to: ``maxlen=0``
would drop a frame silently, so :meth:`_Connection._enqueue` swaps in a deque of its own)."""

_LIMIT_ERRORS: Final[dict[str, str]] = {
    ErrorCode.TOO_MANY_SUBSCRIPTIONS: LimitKind.SUBSCRIPTIONS.value,
    ErrorCode.TOO_MANY_TOPICS: LimitKind.TOPICS.value,
}
"""Error frames that report a limit breach, and the breach's kind for the metric."""

_log = structlog.get_logger(__name__)


@functools.lru_cache(maxsize=8)
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


def _server_frame(frame: ServerFrame, fmt: WireFormat) -> bytes:
    """A server message as a whole WebSocket frame (header included) in ``fmt``."""
    encoded = encode_server(frame, fmt)
    payload = encoded.encode("utf-8") if isinstance(encoded, str) else encoded
    return frame_header(_OP_TEXT if fmt is WireFormat.JSON else _OP_BINARY, len(payload)) + payload


@functools.lru_cache(maxsize=4)
def _heartbeat_frame(frame: Heartbeat, fmt: WireFormat) -> bytes:
    """A heartbeat's frame, once per watermark and format, not once per connection: what an
    idle connection writes to its transport directly (one ``write``, nothing buffered, nothing
    scheduled), or enqueues behind frames already waiting."""
    return _server_frame(frame, fmt)


def _update_frame(live: LiveDoc, subscription_id: str, fmt: WireFormat, opcode: int) -> bytes:
    """The whole WebSocket frame of ``live`` as an update of one subscription, built once per
    subscription id and format and shared by every connection with such a subscription."""
    frames = live.delivery.frames
    key = (subscription_id, fmt)
    data = frames.get(key)
    if data is None:
        payload = live.update.frame_bytes(subscription_id, fmt)
        data = frame_header(opcode, len(payload)) + payload
        if len(frames) < Delivery.MAX_FRAMES:
            frames[key] = data
    return data


class _Tally:
    """Counter increments gathered over one event-loop turn and applied once: a Prometheus
    counter takes a lock per ``inc``, and every connection's write would take it."""

    __slots__ = ("_loop", "_pending")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._pending: dict[Counter, int] = {}

    def add(self, counter: Counter, amount: int) -> None:
        pending = self._pending
        if not pending:
            self._loop.call_soon(self._apply)
        pending[counter] = pending.get(counter, 0) + amount

    def _apply(self) -> None:
        pending, self._pending = self._pending, {}
        for counter, amount in pending.items():
            counter.inc(amount)


class _Flusher:
    """The connections with frames to write, flushed together once per event-loop turn: one
    loop callback for every connection a hub pass reached, not one each."""

    __slots__ = ("_due", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._due: list[_Connection] = []

    def add(self, connection: _Connection) -> None:
        if not self._due:
            self._loop.call_soon(self._run)
        self._due.append(connection)

    def _run(self) -> None:
        due, self._due = self._due, []
        for connection in due:
            try:
                connection._flush()
            except Exception as exc:  # noqa: BLE001 - one connection must not stop the others
                connection.log.error("ws_failed", error=type(exc).__name__)
                connection.request_close(1011, "internal error")


def frame_header(opcode: int, length: int) -> bytes:
    """The header of an unmasked, final RFC 6455 frame of ``length`` payload bytes."""
    if length < 126:
        return struct.pack("!BB", opcode, length)
    if length < 65536:
        return struct.pack("!BBH", opcode, 126, length)
    return struct.pack("!BBQ", opcode, 127, length)


class _Cancellable(Protocol):
    def cancel(self) -> None: ...


class Scheduler(Protocol):
    """What the wheel needs of an event loop (an ``asyncio`` loop is one)."""

    def call_at(self, when: float, callback: Callable[[int], None], slot: int, /) -> _Cancellable:
        """Run ``callback(slot)`` at loop time ``when``."""
        ...


class TimerWheel:
    """One event-loop timer per occupied time slot, for any number of owners.

    An owner is scheduled at most once; :meth:`schedule` moves it only to an *earlier* slot
    (a later deadline is found when the earlier slot fires and the owner re-arms), so frequent
    sends that push a heartbeat back cost nothing here. When a slot fires each of its owners'
    callbacks runs once.
    """

    def __init__(self, loop: Scheduler, resolution_s: float) -> None:
        self._loop = loop
        self._resolution = resolution_s
        self._slots: dict[int, dict[int, Callable[[], None]]] = {}
        self._handles: dict[int, _Cancellable] = {}
        self._slot_of: dict[int, int] = {}  # owner id -> its slot

    def __len__(self) -> int:
        return len(self._slot_of)

    @property
    def slots(self) -> int:
        """Event-loop timers in use."""
        return len(self._handles)

    def schedule(self, owner: int, when: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` at ``when`` (or up to one resolution later), unless ``owner`` is
        already due sooner."""
        if math.isinf(when):
            return
        slot = math.ceil(when / self._resolution)
        current = self._slot_of.get(owner)
        if current is not None:
            if current <= slot:
                return
            self._remove(owner, current)
        self._slot_of[owner] = slot
        owners = self._slots.get(slot)
        if owners is None:
            owners = self._slots[slot] = {}
            self._handles[slot] = self._loop.call_at(slot * self._resolution, self._fire, slot)
        owners[owner] = callback

    def cancel(self, owner: int) -> None:
        """Forget ``owner``."""
        slot = self._slot_of.pop(owner, None)
        if slot is not None:
            self._remove(owner, slot, forget=False)

    def _remove(self, owner: int, slot: int, *, forget: bool = True) -> None:
        if forget:
            self._slot_of.pop(owner, None)
        owners = self._slots.get(slot)
        if owners is not None:
            owners.pop(owner, None)
            if not owners:
                del self._slots[slot]
                self._handles.pop(slot).cancel()

    def _fire(self, slot: int) -> None:
        self._handles.pop(slot, None)
        owners = self._slots.pop(slot, {})
        for owner in owners:
            self._slot_of.pop(owner, None)
        for callback in owners.values():
            callback()


class _Registry:
    """The open connections of one app: for shutdown, the per-subject limit and the timers."""

    def __init__(self) -> None:
        self.connections: set[_Connection] = set()
        self.per_subject: collections.Counter[str] = collections.Counter()
        self.wheel = TimerWheel(asyncio.get_running_loop(), TIMER_RESOLUTION_S)
        self.tally = _Tally(asyncio.get_running_loop())
        self.flusher = _Flusher(asyncio.get_running_loop())

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
    sock = request.transport.get_extra_info("socket") if request.transport is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):  # bound what the kernel holds for a slow reader
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_SEND_BUFFER_BYTES)
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
            await asyncio.gather(*(c.wait_done() for c in connections))


class _Connection:
    """One open WebSocket: the session, its send buffer and its place in the timer wheel.

    Slotted, and what only some connections need (the logger's bound context, the event a
    shutdown waits on) is made on demand: 10,000 idle connections are mostly this object.
    """

    __slots__ = (
        "_done",
        "buffer",
        "buffered_bytes",
        "catch_ups",
        "close_request",
        "closer",
        "closing",
        "finished",
        "flush_scheduled",
        "fmt",
        "format_label",
        "full_since",
        "hard_messages",
        "key",
        "limits",
        "loop",
        "max_bytes",
        "max_messages",
        "opcode",
        "peak_bytes",
        "registry",
        "room",
        "sent",
        "session",
        "state",
        "subject",
        "subscriptions",
        "tally",
        "tap",
        "transport",
        "wheel",
        "ws",
    )

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
        self.opcode = _OP_TEXT if fmt is WireFormat.JSON else _OP_BINARY
        self.state = state
        self.registry = registry
        self.wheel = registry.wheel
        self.limits = state.settings.limits
        self.loop = asyncio.get_running_loop()
        self.session: ServerSession[LiveDoc] = ServerSession(
            session_limits(self.limits), self.loop.time(), session_id=uuid.uuid4().hex
        )
        self.format_label = "json" if fmt is WireFormat.JSON else "proto"
        self.sent = state.metrics.updates_sent.labels(format=self.format_label)
        self.tally = registry.tally
        # The send buffer: (whole WebSocket frame, the change it carries or None). An empty
        # one is the shared _NO_FRAMES (a deque is 760 bytes; most connections idle most of
        # the time): _enqueue gives the connection its own, _flush hands it back when drained.
        self.buffer: collections.deque[tuple[bytes, LiveDoc | None]] = _NO_FRAMES
        self.buffered_bytes = 0
        self.peak_bytes = 0
        """Most bytes the send buffer ever held (for tests and the memory bound)."""
        self.max_messages = self.limits.send_queue_messages
        self.max_bytes = self.limits.send_queue_bytes
        # A hub page arrives at once: a burst of one page is not a slow consumer.
        self.hard_messages = self.max_messages + state.hub.page_size
        self.full_since: float | None = None
        self.flush_scheduled = False
        self.room: asyncio.Future[None] | None = None
        self.closing = False
        self.closer: asyncio.Task[None] | None = None
        self._done: asyncio.Event | None = None
        self.finished = False
        self.close_request: tuple[int, str] | None = None
        self.tap: Tap | None = None
        self.catch_ups: dict[int, asyncio.Task[None]] = {}
        self.subject: str | None = None
        self.subscriptions = 0
        self.key = id(self)

    @property
    def log(self) -> structlog.typing.FilteringBoundLogger:
        """The module's logger bound to this connection (made when something is logged)."""
        return _log.bind(session_id=self.session.session_id, format=self.format_label)  # type: ignore[no-any-return]

    async def wait_done(self) -> None:
        """Wait until :meth:`run` has finished (the socket closed, the counters released)."""
        if self.finished:
            return
        if self._done is None:
            self._done = asyncio.Event()
        await self._done.wait()

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self, principal: Principal | None) -> None:
        metrics = self.state.metrics
        metrics.connections.labels(transport="ws").inc()
        self.log.debug("ws_connected")
        self._arm()
        try:
            if principal is not None:
                self.subject = principal.subject  # acquired before the upgrade
                self._authenticated(principal, acquired=True)
            await self._read_loop()
        except Exception as exc:  # noqa: BLE001 - a broken connection must not break the server
            self.log.error("ws_failed", error=type(exc).__name__)
            self.request_close(1011, "internal error")
        finally:
            self.closing = True
            self.session.close(CloseCode.GOING_AWAY, "closed")
            self.wheel.cancel(self.key)
            if self.tap is not None:
                self.tap.close()
            tasks = list(self.catch_ups.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._drop_buffer()
            if self.closer is None:
                self.closer = asyncio.create_task(self._close_socket())
            await asyncio.shield(self.closer)
            metrics.connections.labels(transport="ws").dec()
            metrics.subscriptions.dec(self.subscriptions)
            self.subscriptions = 0
            if self.subject is not None:
                self.registry.release(self.subject)
            self.log.debug("ws_closed", code=self.ws.close_code)
            self.finished = True
            if self._done is not None:
                self._done.set()

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
        """Close the connection with ``code`` (from any context); the first request wins.

        Sending stops at once; the close frame is written by a closing task, which also ends
        the handler's read.
        """
        if self.closing:
            return
        self.closing = True
        self.close_request = (code, reason)
        self.log.debug("ws_closing", code=code, reason=reason)
        self.session.close(CloseCode.GOING_AWAY, reason)  # no more decisions
        self._drop_buffer()
        self.wheel.cancel(self.key)
        if self.tap is not None:
            self.tap.close()
        for serial, task in list(self.catch_ups.items()):
            if task is not asyncio.current_task():
                task.cancel()
                del self.catch_ups[serial]
        self.closer = asyncio.create_task(self._close_socket(), name="oa-sync-ws-close")

    # -- performing actions ----------------------------------------------------------------

    def _perform(self, actions: Sequence[Action[LiveDoc]]) -> None:
        catching_up = False
        for action in actions:
            if isinstance(action, SendUpdate):
                live = action.update
                self._enqueue(
                    _update_frame(live, action.subscription_id, self.fmt, self.opcode), live
                )
            elif isinstance(action, Send):
                frame = action.frame
                if isinstance(frame, ErrorFrame) and frame.code in _LIMIT_ERRORS:
                    kind = _LIMIT_ERRORS[frame.code]
                    self.state.metrics.limit_breaches.labels(kind=kind).inc()
                if type(frame) is Heartbeat:  # every connection of a wheel slot sends the same
                    self._enqueue(_heartbeat_frame(frame, self.fmt))
                    continue
                self._enqueue(_server_frame(frame, self.fmt))
            elif isinstance(action, Close):
                if action.limit:
                    self.state.metrics.limit_breaches.labels(kind=action.limit).inc()
                self.request_close(action.code, action.reason)
            elif isinstance(action, CatchUp):
                catching_up = True
                self.catch_ups[action.serial] = asyncio.create_task(
                    self._catch_up(action), name="oa-sync-ws-catch-up"
                )
            elif isinstance(action, CancelCatchUp):
                task = self.catch_ups.pop(action.serial, None)
                if task is not None and task is not asyncio.current_task():
                    task.cancel()
            elif isinstance(action, VerifyToken):  # pragma: no cover - handled by the reader
                raise TypeError("VerifyToken must be handled by the reader")
        if self.closing:
            return
        count = len(self.session.subscription_ids)
        if catching_up or count != self.subscriptions:
            # Before any catch-up task runs (none has yielded yet): the tap must already carry
            # the new topics when their snapshot is read, or a change could fall in between.
            self._route_tap()
        if count != self.subscriptions:
            self.state.metrics.subscriptions.inc(count - self.subscriptions)
            self.subscriptions = count
        self._arm()

    # -- the send buffer -------------------------------------------------------------------

    def _full(self) -> bool:
        return len(self.buffer) >= self.max_messages or self.buffered_bytes >= self.max_bytes

    def _enqueue(self, data: bytes, live: LiveDoc | None = None) -> None:
        """Buffer one whole WebSocket frame (``live``: the change it carries, if an update)."""
        if self.closing:
            return
        buffer = self.buffer
        if len(buffer) >= self.hard_messages or self.buffered_bytes >= 2 * self.max_bytes:
            self._slow_consumer()  # past the hard bounds: no grace (memory stays bounded)
            return
        if buffer is _NO_FRAMES:
            buffer = self.buffer = collections.deque()
        buffer.append((data, live))
        buffered = self.buffered_bytes = self.buffered_bytes + len(data)
        if buffered > self.peak_bytes:  # noqa: PLR1730 - max() is a call per frame
            self.peak_bytes = buffered
        if self.full_since is None and (  # _full(), inline: once per frame
            buffered >= self.max_bytes or len(buffer) >= self.max_messages
        ):
            self.full_since = self.loop.time()
            self._arm()
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.registry.flusher.add(self)

    def _flush(self) -> None:
        """Write what the transport has room for, in one write."""
        self.flush_scheduled = False
        transport = self.transport
        if self.closing or not self.buffer or self.ws.closed:
            return
        if transport is None or transport.is_closing():
            self.request_close(1011, "transport lost")
            return
        room = _TRANSPORT_HIGH_BYTES - transport.get_write_buffer_size()
        if room <= 0:
            self._arm()  # retry at the next slot of the wheel
            return
        parts: list[bytes] = []
        written = 0
        updates = 0
        now = 0.0
        buffer = self.buffer
        while buffer and written < room:
            data, live = buffer.popleft()
            parts.append(data)
            written += len(data)
            if live is not None:
                updates += 1
                delivery = live.delivery
                if not delivery.sent:  # the latency of a change is observed at its first write
                    delivery.sent = True
                    if live.committed_at:
                        now = now or time.time()
                        self.state.metrics.append_to_send_seconds.observe(
                            max(0.0, now - live.committed_at)
                        )
        self.buffered_bytes -= written
        if not buffer:
            self.buffer = _NO_FRAMES
        transport.write(parts[0] if len(parts) == 1 else b"".join(parts))
        if updates:
            self.tally.add(self.sent, updates)
        if self.full_since is not None and not self._full():
            self.full_since = None
        if (
            self.room is not None
            and self.buffered_bytes * 2 < self.max_bytes
            and (len(buffer) * 2 < self.max_messages)
        ):
            if not self.room.done():
                self.room.set_result(None)
            self.room = None
        if buffer:
            if transport.get_write_buffer_size() < _TRANSPORT_HIGH_BYTES:
                self.flush_scheduled = True  # the socket took it: go on at the next turn
                self.registry.flusher.add(self)
            else:
                self._arm()  # the socket is full: retry at the next slot of the wheel

    def _drop_buffer(self) -> None:
        self.buffer.clear()
        self.buffered_bytes = 0
        self.full_since = None
        if self.room is not None and not self.room.done():
            self.room.set_result(None)
        self.room = None

    async def _wait_for_room(self) -> bool:
        """Wait until the send buffer is below half of both bounds.

        Returns:
            ``False`` when it stayed above for :data:`SLOW_CONSUMER_GRACE_S` (a slow consumer)
            or the connection is closing.
        """
        deadline = self.loop.time() + SLOW_CONSUMER_GRACE_S
        while not self.closing and (
            self.buffered_bytes * 2 >= self.max_bytes or len(self.buffer) * 2 >= self.max_messages
        ):
            if self.room is None:
                self.room = self.loop.create_future()
            try:
                async with asyncio.timeout_at(min(deadline, self.loop.time() + _DRAIN_POLL_S)):
                    await asyncio.shield(self.room)
            except TimeoutError:
                if self.loop.time() >= deadline:
                    self._slow_consumer()
                    return False
                if self.buffer and not self.flush_scheduled:
                    self._flush()  # the transport may have drained since it refused a write
        return not self.closing

    def _slow_consumer(self) -> None:
        if self.closing:
            return
        self.state.metrics.slow_consumer_disconnects.inc()
        self.state.metrics.limit_breaches.labels(kind=LimitKind.SEND_QUEUE.value).inc()
        self.request_close(CloseCode.RATE_LIMITED, "too slow a consumer")

    # -- time ------------------------------------------------------------------------------

    def _arm(self) -> None:
        """Be in the timer wheel at the next thing due (session deadline, slow-consumer grace,
        a flush the transport refused)."""
        if self.closing:
            return
        when = self.session.next_deadline()
        if self.full_since is not None:
            when = min(when, self.full_since + SLOW_CONSUMER_GRACE_S)
        if self.buffer and not self.flush_scheduled:
            when = min(when, self.loop.time())  # next slot: retry the flush
        self.wheel.schedule(self.key, when, self._on_timer)

    def _on_timer(self) -> None:
        if self.closing:
            return
        try:
            now = self.loop.time()
            if self.buffer and not self.flush_scheduled:
                self._flush()
            if self.full_since is not None and now - self.full_since >= SLOW_CONSUMER_GRACE_S:
                self._slow_consumer()
                return
            if self.session.next_deadline() <= now:
                actions = self.session.tick(now, watermark=self.state.hub.watermark)
                if not self._heartbeat_written(actions):
                    self._perform(actions)
            self._arm()
        except Exception as exc:  # noqa: BLE001 - one connection's bug must not stop the wheel
            self.log.error("ws_failed", error=type(exc).__name__)
            self.request_close(1011, "internal error")

    def _heartbeat_written(self, actions: Sequence[Action[LiveDoc]]) -> bool:
        """Write a tick's lone heartbeat straight to the transport when nothing is queued
        before it (the idle case: no buffer, no flush, no metric); ``False``: not done, perform
        ``actions`` as usual."""
        if len(actions) != 1 or self.buffer or self.ws.closed:
            return False
        action = actions[0]
        if type(action) is not Send or type(action.frame) is not Heartbeat:
            return False
        transport = self.transport
        if (
            transport is None
            or transport.is_closing()
            or transport.get_write_buffer_size() >= _TRANSPORT_HIGH_BYTES
        ):
            return False
        transport.write(_heartbeat_frame(action.frame, self.fmt))
        return True

    # -- live changes (the hub's Receiver) -------------------------------------------------

    def offer(self, live: LiveDoc) -> None:
        """A change from the hub (synchronously, inside its read pass)."""
        if self.closing:
            return
        try:
            for action in self.session.on_live(live, self.loop.time()):
                if type(action) is SendUpdate:  # the common case, without _perform's dispatch
                    sid = action.subscription_id
                    self._enqueue(_update_frame(live, sid, self.fmt, self.opcode), live)
                else:  # a close (token expired): sends only ever move deadlines later
                    self._perform([action])
        except Exception as exc:  # noqa: BLE001 - one connection's bug must not stop the hub
            self.log.error("ws_failed", error=type(exc).__name__)
            self.request_close(1011, "internal error")

    def tap_ended(self, tap: Tap) -> None:
        """The hub closed our tap: on an epoch change, reset and re-snapshot."""
        if self.closing or tap is not self.tap or not tap.epoch_changed:
            return
        self.tap = None
        self._attach()
        self._perform(self.session.epoch_changed(self.state.hub.epoch, self.loop.time()))

    def _attach(self) -> None:
        self.tap = self.state.hub.tap(self, self._topics())

    def _topics(self) -> list[Topic]:
        session = self.session
        return [topic for sid in session.subscription_ids for topic in session.topics_of(sid)]

    def _route_tap(self) -> None:
        """Offer the tap only the changes the open subscriptions' topics cover."""
        if self.tap is not None:
            self.tap.set_topics(self._topics())

    # -- reading ---------------------------------------------------------------------------

    def _stopped(self) -> bool:
        return self.closing

    async def _read_loop(self) -> None:
        max_bytes = self.limits.max_message_bytes
        while not self.closing:
            msg = await self.ws.receive()
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                return  # closed by the peer, by us, or refused by aiohttp (too large, bad frame)
            if self._stopped():  # closed by the hub, the wheel or a catch-up meanwhile
                return
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
        self._authenticated(principal, acquired=False)

    def _authenticated(self, principal: Principal, *, acquired: bool) -> None:
        if self.closing:
            return
        expires_at = self.loop.time() + (principal.expires_at - time.time())
        credentials = Credentials(
            subject=principal.subject, grant=principal.grant, expires_at=expires_at
        )
        hub = self.state.hub
        if self.session.credentials is not None:  # a refresh
            self._perform(
                self.session.authenticated(
                    credentials, self.loop.time(), epoch=self.session.epoch, watermark=hub.watermark
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
        # Attach the live tap before any snapshot is read, so nothing falls in between. The
        # welcome announces what the hub has delivered (no database read per connection).
        self._attach()
        self._perform(
            self.session.authenticated(
                credentials, self.loop.time(), epoch=hub.epoch, watermark=hub.watermark
            )
        )

    # -- catch-up --------------------------------------------------------------------------

    async def _send_rows(self, serial: int, rows: Sequence[read_model.DocRow]) -> bool:
        """Hand ``rows`` to the session in chunks of at most a quarter of either bound, each
        once the send buffer is below half (:meth:`_wait_for_room`).

        Returns:
            ``False`` when the connection closed meanwhile (e.g. a slow consumer).
        """
        max_chunk_messages = max(1, self.max_messages // 4)
        max_chunk_bytes = max(1, self.max_bytes // 4)
        start = 0
        while start < len(rows):
            if not await self._wait_for_room():
                return False
            end, size = start, 0
            while end < len(rows) and end - start < max_chunk_messages and size < max_chunk_bytes:
                size += len(rows[end].body)
                end += 1
            items = [LiveDoc.of_row(r) for r in rows[start:end]]
            self._perform(self.session.catch_up_rows(serial, items, self.loop.time()))
            start = end
        return not self.closing

    async def _catch_up(self, action: CatchUp) -> None:
        serial = action.serial
        try:
            engine = await self.state.catch_up_engine()
            reads = self.state.catch_up_reads
            hub = self.state.hub
            if action.resume:  # the resume is judged against the log as stored
                meta = await reads.meta(engine)
            else:  # the tap is attached: what the hub delivered is covered by what follows
                meta = read_model.SyncMeta(
                    epoch=hub.epoch, watermark=hub.watermark, retained_from=0
                )
            plan = self.session.begin_catch_up(serial, meta, self.loop.time())
            if plan.cancelled:
                return
            self._perform(plan.actions)
            rows = await reads.documents(
                engine, action.topics, action.grant, after=plan.after, limit=_CATCH_UP_PAGE
            )
            while True:
                if not await self._send_rows(serial, rows):
                    return
                if len(rows) < _CATCH_UP_PAGE:
                    break
                # Each page in its own short transaction: a document that changes meanwhile
                # moves to a higher watermark and is found by a later page or the live feed.
                after = rows[-1].watermark
                rows = []  # not held while the next page is read
                rows = await reads.documents(
                    engine, action.topics, action.grant, after=after, limit=_CATCH_UP_PAGE
                )
            self._perform(self.session.end_catch_up(serial, meta, self.loop.time()))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken connection must not break the server
            self.log.error("ws_failed", error=type(exc).__name__)
            self.request_close(1011, "internal error")
        finally:
            if self.catch_ups.get(serial) is asyncio.current_task():
                del self.catch_ups[serial]
