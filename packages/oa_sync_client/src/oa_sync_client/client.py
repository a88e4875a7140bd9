"""The Python client of Khala: follow documents live over the WebSocket, surviving faults.

What this is: :class:`SyncClient`, a thin aiohttp driver around the sans-IO
:class:`oa_sync_core.protocol.client_session.ClientSession`. The session decides (what to
send, what to cache, when and whether to reconnect, when to refresh the token); this module owns the
socket, the clock and the tasks. Follow a run's summary::

    async with SyncClient("http://127.0.0.1:8787", token_provider) as client:
        async for event in client.subscribe(["runtime/run_summary:r1"]):
            if isinstance(event, DocumentChanged):
                print(event.doc.version, event.doc.document["status"])

Guarantees: per subscription and document, versions only increase (repeats are dropped); after
a disconnect every subscription resumes from its (epoch, watermark) and the server sends only
what changed (or ``reset`` + a snapshot when it cannot); reconnects back off exponentially
with full jitter and stop on refusals (4400, 4403, 4413); the token is refreshed before it
expires and sent in-band, one refresh at a time whoever asks.

Writes: :meth:`SyncClient.append` posts events to ``POST /v1/events`` (each with an
idempotency key, generated when absent, so a retry cannot append twice); with
``visible=True`` it resolves only once this client's subscriptions have reached the watermark
at which the write became visible, so the next read of ``Subscription.documents`` shows it::

    await client.append(
        [{"streamId": "run:r1", "type": "run.started", "payload": {"runId": "r1"}}], visible=True
    )

What this is not: a cache of anything the subscriptions do not cover.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import itertools
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, TypeAlias

import aiohttp
from oa_sync_core.protocol.client_session import (
    BackoffPolicy,
    CachedDocument,
    ClientEvent,
    ClientSession,
    ConnectionState,
    DocumentChanged,
    GiveUp,
    SessionStats,
    SubscriptionError,
    SubscriptionReset,
    SubscriptionSynced,
)
from oa_sync_core.protocol.wire import (
    ClientFrame,
    WireError,
    WireFormat,
    decode_server,
    encode_client,
)

from oa_sync_client.errors import AppendError, ClientClosedError, SubscriptionRefusedError

__all__ = [
    "AppendError",
    "AppendResult",
    "BackoffPolicy",
    "CachedDocument",
    "ClientClosedError",
    "ConnectionState",
    "DocumentChanged",
    "Subscription",
    "SubscriptionClosed",
    "SubscriptionEvent",
    "SubscriptionRefusedError",
    "SubscriptionReset",
    "SubscriptionSynced",
    "SyncClient",
    "TokenProvider",
    "WireFormat",
]

TokenProvider: TypeAlias = Callable[[], Awaitable[str] | str]
"""Returns a fresh bearer token (sync or async). Called once per refresh."""

SubscriptionEvent: TypeAlias = DocumentChanged | SubscriptionReset | SubscriptionSynced
"""What iterating a :class:`Subscription` yields."""

DEFAULT_MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024
_CONNECT_TIMEOUT_S: Final = 10.0
_DEFAULT_PING_S: Final = 15.0
_log = logging.getLogger(__name__)  # stdlib logging: the SDK runs inside other applications


@dataclasses.dataclass(frozen=True, slots=True)
class AppendResult:
    """What an append returned.

    Attributes:
        positions: the log position of each event, in order.
        visible_watermark: with ``visible``: the watermark at which the batch's documents
            became visible (0: the batch changed none).
        epoch: with ``visible``: the epoch of that watermark.
    """

    positions: tuple[int, ...]
    visible_watermark: int | None = None
    epoch: str | None = None


class SubscriptionClosed(Exception):  # noqa: N818 - a sentinel value, not an error to handle
    """Internal end-of-stream marker for a subscription's queue."""


class Subscription:
    """One subscription: an async iterator of its events plus its cache.

    Iterating yields :class:`DocumentChanged` (a newer version of a document),
    :class:`SubscriptionReset` (the cache was cleared; a snapshot follows) and
    :class:`SubscriptionSynced` (caught up to a watermark). Iteration ends when the
    subscription or the client is closed, and raises :class:`ClientClosedError` when the client
    gave up, :class:`SubscriptionRefusedError` when the server refused it.
    """

    def __init__(self, client: SyncClient, subscription_id: str, topics: tuple[str, ...]):
        self.id = subscription_id
        self.topics = topics
        self._client = client
        self._queue: asyncio.Queue[SubscriptionEvent | BaseException] = asyncio.Queue()
        self._synced = asyncio.Event()
        self._ended = False

    @property
    def documents(self) -> Mapping[str, CachedDocument]:
        """The current documents of this subscription, by key."""
        try:
            return self._client.session.documents(self.id)
        except KeyError:
            return {}

    def __aiter__(self) -> AsyncIterator[SubscriptionEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[SubscriptionEvent]:
        while True:
            item = await self._queue.get()
            if isinstance(item, SubscriptionClosed):
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def wait_synced(self) -> None:
        """Wait until this subscription is caught up on the current connection.

        Bound it with ``asyncio.timeout``.
        """
        await self._synced.wait()

    async def close(self) -> None:
        """Unsubscribe and end iteration."""
        await self._client._unsubscribe(self)

    def _push(self, event: ClientEvent) -> None:
        if self._ended:
            return
        if isinstance(event, SubscriptionSynced):
            self._synced.set()
        elif isinstance(event, SubscriptionReset):
            self._synced.clear()
        if isinstance(event, SubscriptionError):
            if event.fatal:
                self._end(SubscriptionRefusedError(self.id, event.code, event.message))
            return
        self._queue.put_nowait(event)

    def _unsynced(self) -> None:
        self._synced.clear()

    def _end(self, item: BaseException) -> None:
        if not self._ended:
            self._ended = True
            self._queue.put_nowait(item)


class SyncClient:
    """Follows documents on a Khala server; reconnects, resumes and refreshes its token.

    Args:
        url: the server, ``http://host:port`` (``/v1/sync`` is appended) or a full
            ``ws://…/v1/sync`` URL.
        token_provider: a token string, or a callable (sync or async) returning a fresh token.
        fmt: the subprotocol: :attr:`WireFormat.JSON` (default) or :attr:`WireFormat.PROTO`.
        backoff: reconnect timing (base, cap, max attempts).
        rng: randomness for jitter (seed it in tests).
        max_message_bytes: the largest server message accepted.
        http: an existing ``aiohttp.ClientSession`` to use (not closed by the client).

    Use it as an async context manager; :attr:`state` and :meth:`wait_for_state` observe the
    connection (``connecting``, ``syncing``, ``live``, ``backing_off``, ``closed``).
    """

    def __init__(
        self,
        url: str,
        token_provider: TokenProvider | str,
        *,
        fmt: WireFormat = WireFormat.JSON,
        backoff: BackoffPolicy | None = None,
        rng: random.Random | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        http: aiohttp.ClientSession | None = None,
    ):
        self.url = _ws_url(url)
        self.fmt = WireFormat(fmt)
        self.max_message_bytes = max_message_bytes
        self.session = ClientSession(backoff=backoff, rng=rng)
        self._provider = token_provider
        self._http = http
        self._own_http = http is None
        self._subs: dict[str, Subscription] = {}
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._send_lock = asyncio.Lock()
        self._refreshing: asyncio.Future[None] | None = None
        self._token: str | None = None
        self._runner: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closing = False
        self._state_changed = asyncio.Condition()
        self._progress = asyncio.Condition()
        self._listeners: list[Callable[[ConnectionState], None]] = []
        self._last_state = self.session.state
        self._nonces = itertools.count(1)
        self.error: ClientClosedError | None = None
        self.attempt_times: list[float] = []
        """Monotonic time at which each connection attempt started."""
        self.planned_attempts: list[float] = []
        """Monotonic time each reconnect was scheduled for (decision time + backoff delay)."""

    # -- lifecycle -------------------------------------------------------------------------------

    async def __aenter__(self) -> SyncClient:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Start connecting in the background (``async with`` calls it)."""
        if self._runner is not None:
            return
        if self._http is None:
            self._http = aiohttp.ClientSession()
        self._runner = asyncio.create_task(self._run(), name="oa-sync-client")

    async def close(self) -> None:
        """Close the connection and end every subscription's iteration."""
        self._closing = True
        self.session.close()
        self._wake.set()
        ws = self._ws
        if ws is not None and not ws.closed:
            with contextlib.suppress(Exception):
                await ws.close()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        if self._refreshing is not None and not self._refreshing.done():
            self._refreshing.cancel()
        for sub in self._subs.values():
            sub._end(SubscriptionClosed())
        if self._own_http and self._http is not None:
            await self._http.close()
            self._http = None
        await self._notify_state()

    # -- observation -------------------------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        """The connection state."""
        return self.session.state

    @property
    def stats(self) -> SessionStats:
        """Counters: connections, snapshots, resumes, resets, updates, repeats dropped..."""
        return self.session.stats

    def add_state_listener(self, listener: Callable[[ConnectionState], None]) -> None:
        """Call ``listener(new_state)`` on every state change."""
        self._listeners.append(listener)

    async def wait_for_state(self, *states: ConnectionState) -> None:
        """Wait until the state is one of ``states`` (bound it with ``asyncio.timeout``)."""
        async with self._state_changed:
            await self._state_changed.wait_for(lambda: self.session.state in states)

    # -- subscriptions -----------------------------------------------------------------------------

    def subscribe(
        self, topics: Sequence[str], *, subscription_id: str | None = None
    ) -> Subscription:
        """Subscribe to topics (exact keys or prefixes ending in ``*``).

        Returns:
            The :class:`Subscription` (iterate it for events; read its ``documents``).

        Raises:
            ClientClosedError: the client is closed.
            ValueError: no topics, or the id is in use.
        """
        if self._closing or self.session.state is ConnectionState.CLOSED:
            raise self.error or ClientClosedError("the client is closed")
        sid, frames = self.session.subscribe(topics, subscription_id=subscription_id)
        sub = Subscription(self, sid, tuple(topics))
        self._subs[sid] = sub
        if frames:
            self._spawn_send(frames)
        return sub

    async def _unsubscribe(self, sub: Subscription) -> None:
        if self._subs.pop(sub.id, None) is None:
            return
        frames = self.session.unsubscribe(sub.id)
        sub._end(SubscriptionClosed())
        await self._send(frames)

    # -- tokens ------------------------------------------------------------------------------------

    async def refresh_token(self) -> None:
        """Fetch a new token and, when connected, send it in-band.

        Concurrent callers share one in-flight refresh.
        """
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._do_refresh())
        await asyncio.shield(self._refreshing)

    async def _do_refresh(self) -> None:
        provider = self._provider
        if isinstance(provider, str):
            token = provider
        else:
            result = provider()
            token = await result if inspect.isawaitable(result) else result
        frames = self.session.set_token(token, now=time.time())
        self._token = token
        await self._send(frames)

    # -- writes ------------------------------------------------------------------------------------

    async def append(
        self,
        events: Sequence[Mapping[str, Any]],
        *,
        visible: bool = False,
        timeout_s: float = 5.0,
    ) -> AppendResult:
        """Append events atomically through ``POST /v1/events`` (scope ``sync:append``).

        Args:
            events: proto3 JSON ``AppendEvent`` objects (``streamId``, ``type``, ``payload``,
                optional ``idempotencyKey`` — generated when absent — and ``expectedSeq``).
            visible: resolve only once this client's subscriptions have reached the write
                (read-your-writes): the server waits for the projector, then this client
                for the watermark it answered.
            timeout_s: with ``visible``, the bound on both waits.

        Raises:
            AppendError: the server refused the append (status and code), or ``not_visible``
                when the write did not become visible within ``timeout_s`` (it *was* appended).
        """
        if self._http is None:
            raise ClientClosedError("start the client (async with) before appending")
        body = {
            "events": [
                dict(e) | {"idempotencyKey": e.get("idempotencyKey") or uuid.uuid4().hex}
                for e in events
            ]
        }
        params = {"wait": "visible", "timeoutMs": str(max(int(timeout_s * 1000), 1))}
        token = await self._bearer()
        deadline = time.monotonic() + timeout_s
        async with self._http.post(
            _http_url(self.url) + "/v1/events",
            json=body,
            params=params if visible else None,
            headers={"Authorization": f"Bearer {token}"},
        ) as response:
            try:
                answer = await response.json(content_type=None)
            except ValueError:
                raise AppendError(response.status, "http_error", "the answer is not JSON") from None
        if response.status != 200:
            error = answer.get("error", {}) if isinstance(answer, dict) else {}
            raise AppendError(
                response.status,
                str(error.get("code", "http_error")),
                str(error.get("message", "")),
                [int(p) for p in error.get("positions", [])],
            )
        positions = tuple(int(p) for p in answer["positions"])
        if not visible:
            return AppendResult(positions)
        watermark, epoch = int(answer["visibleWatermark"]), str(answer["epoch"])
        if watermark > 0 and self._subs:
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.001)):
                    async with self._progress:
                        await self._progress.wait_for(lambda: self._reached(watermark, epoch))
            except TimeoutError:
                raise AppendError(
                    504,
                    "not_visible",
                    f"appended, but this client did not reach watermark {watermark}"
                    f" within {timeout_s} s",
                    positions,
                ) from None
        return AppendResult(positions, watermark, epoch)

    def _reached(self, watermark: int, epoch: str) -> bool:
        """Every subscription is synced on this connection and has seen ``watermark``."""
        if self.session.state is not ConnectionState.LIVE:
            return False
        for sid, sub in self._subs.items():
            if sub._ended:  # refused by the server: it will never reach anything
                continue
            position = self.session.position(sid)
            if position is None or position.epoch != epoch:
                return False
            seen = max(position.watermark, self.session.last_watermark_seen)
            if seen < watermark:
                return False
        return True

    async def _bearer(self) -> str:
        if self.session.token_expired(time.time()):
            await self.refresh_token()
        if self._token is None:
            raise ClientClosedError("no token")
        return self._token

    # -- the connection loop -----------------------------------------------------------------------

    async def _run(self) -> None:
        refresh_first = False
        while not self._closing:
            code: int | None = None
            try:
                if refresh_first or self.session.token_expired(time.time()):
                    await self.refresh_token()
                refresh_first = False
                self.session.connecting()
                await self._notify_state()
                self.attempt_times.append(time.monotonic())
                code = await self._connection()
            except asyncio.CancelledError:
                raise
            except (aiohttp.ClientError, OSError, TimeoutError, WireError) as exc:
                _log.info("oa-sync connection failed: %s", type(exc).__name__)
            except ValueError as exc:  # the token provider returned an expired/empty token
                _log.warning("oa-sync token refused locally: %s", exc)
                if isinstance(self._provider, str):
                    await self._close_for_fixed_token(
                        ClientClosedError("the fixed token has expired")
                    )
                    return
            except Exception:  # noqa: BLE001 - the token provider is application code
                _log.exception("oa-sync token provider or connection failed")
            finally:
                self._ws = None
            if self._closed_by_application():
                break
            if self.session.state in (ConnectionState.IDLE, ConnectionState.BACKING_OFF):
                self.session.connecting()  # the attempt failed before it started
            decision = self.session.closed(code)
            for sub in self._subs.values():
                sub._unsynced()
            await self._notify_state()
            if isinstance(decision, GiveUp):
                self._give_up(ClientClosedError(decision.reason, decision.code))
                return
            if decision.refresh_token and isinstance(self._provider, str):
                await self._close_for_fixed_token(
                    ClientClosedError("the server refused the fixed token", 4401)
                )
                return
            refresh_first = decision.refresh_token
            self.planned_attempts.append(time.monotonic() + decision.delay_s)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(decision.delay_s):
                    await self._wake.wait()

    def _closed_by_application(self) -> bool:
        # A method, not ``self._closing``: mypy keeps the loop condition's narrowing across
        # the awaits above, where close() may have set it.
        return self._closing

    async def _close_for_fixed_token(self, error: ClientClosedError) -> None:
        """A fixed token cannot be refreshed: close the session and end every subscription."""
        self.session.close()
        self._give_up(error)
        await self._notify_state()

    async def _connection(self) -> int | None:
        assert self._http is not None
        ws = await self._http.ws_connect(
            self.url,
            protocols=[self.fmt.value],
            max_msg_size=self.max_message_bytes,
            autoping=True,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0),
        )
        self._ws = ws
        helpers: list[asyncio.Task[None]] = []
        try:
            if ws.protocol != self.fmt.value:
                await ws.close(code=1002, message=b"subprotocol not negotiated")
                return 1002
            await self._send(self.session.opened(now=time.time()))
            helpers.append(asyncio.create_task(self._refresh_loop()))
            helpers.append(asyncio.create_task(self._ping_loop(ws)))
            while True:
                interval = self.session.heartbeat_interval_s or _DEFAULT_PING_S
                try:
                    msg = await ws.receive(timeout=interval * 3)
                except TimeoutError:
                    _log.info("oa-sync connection silent for %.1fs; reconnecting", interval * 3)
                    await ws.close(code=1001, message=b"silent")
                    return None
                if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                    frame = decode_server(msg.data, self.fmt, max_bytes=self.max_message_bytes)
                    events, replies = self.session.receive(frame)
                    self._dispatch(events)
                    await self._send(replies)
                    await self._notify_state()
                    async with self._progress:
                        self._progress.notify_all()
                elif msg.type in (
                    aiohttp.WSMsgType.CLOSE,
                    aiohttp.WSMsgType.CLOSING,
                    aiohttp.WSMsgType.CLOSED,
                    aiohttp.WSMsgType.ERROR,
                ):
                    break
            return ws.close_code
        finally:
            for task in helpers:
                task.cancel()
            for task in helpers:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if not ws.closed:
                with contextlib.suppress(Exception):
                    await ws.close()

    async def _refresh_loop(self) -> None:
        while True:
            at = self.session.token_refresh_at()
            if at is None:
                return
            await asyncio.sleep(max(at - time.time(), 0.05))
            try:
                await self.refresh_token()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - application code; retried next round
                _log.warning("oa-sync token refresh failed: %s", type(exc).__name__)
                await asyncio.sleep(1.0)
            if (self.session.token_refresh_at() or 0) <= time.time():
                await asyncio.sleep(1.0)  # the provider keeps returning a token due for refresh

    async def _ping_loop(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        while not ws.closed:
            await asyncio.sleep(self.session.heartbeat_interval_s or _DEFAULT_PING_S)
            await self._send(self.session.ping(f"n{next(self._nonces)}"))

    async def _send(self, frames: Sequence[ClientFrame]) -> None:
        ws = self._ws
        if not frames or ws is None or ws.closed:
            return
        async with self._send_lock:
            for frame in frames:
                data = encode_client(frame, self.fmt)
                if isinstance(data, str):
                    await ws.send_str(data)
                else:
                    await ws.send_bytes(data)

    def _spawn_send(self, frames: Sequence[ClientFrame]) -> None:
        task = asyncio.create_task(self._send(frames))
        task.add_done_callback(_ignore_result)

    def _dispatch(self, events: Sequence[ClientEvent]) -> None:
        for event in events:
            sub = self._subs.get(event.subscription_id)
            if sub is not None:
                sub._push(event)

    def _give_up(self, error: ClientClosedError) -> None:
        self.error = error
        for sub in self._subs.values():
            sub._end(error)

    async def _notify_state(self) -> None:
        state = self.session.state
        if state is self._last_state:
            return
        self._last_state = state
        for listener in self._listeners:
            listener(state)
        async with self._state_changed:
            self._state_changed.notify_all()


def _ignore_result(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        _log.info("oa-sync send failed: %s", type(task.exception()).__name__)


def _http_url(ws_url: str) -> str:
    """The HTTP base of a ``ws(s)://…/v1/sync`` URL."""
    base = ws_url.removesuffix("/v1/sync")
    return "http" + base[2:] if base.startswith("ws") else base


def _ws_url(url: str) -> str:
    if url.startswith(("ws://", "wss://")):
        return url
    if url.startswith("http://"):
        base = "ws://" + url[len("http://") :]
    elif url.startswith("https://"):
        base = "wss://" + url[len("https://") :]
    else:
        raise ValueError(f"not an http(s) or ws(s) URL: {url!r}")
    return base.rstrip("/") + "/v1/sync"
