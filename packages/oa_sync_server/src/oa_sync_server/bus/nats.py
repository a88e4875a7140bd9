"""The NATS JetStream fan-out bus (``OA_SYNC_FANOUT=nats``).

Theory of operation. Postgres stays the source of truth; the bus is a fast path that spares
every instance its own read of each change.

* **Publish.** The process holding the projector lease publishes every change it commits,
  *after* the commit, as one message on :data:`SUBJECT` (captured by the JetStream stream
  :data:`STREAM`). The message id (header ``Nats-Msg-Id``) is ``<log epoch>:<watermark>``, so
  JetStream drops a second copy within its duplicate window. The payload is the row as stored
  (:func:`encode_change`), its commit time and the log epoch. Publishing is a core publish per
  change and one flush per batch: the projector never waits on an acknowledgement per message.
* **Republish.** A change committed but not published (the process died between the two) is
  published by the next lease holder: on acquiring the lease the worker calls
  :meth:`NatsBus.republish`, which asks the stream for its last message and publishes the
  documents changed after that watermark (at most :data:`REPUBLISH_LIMIT`), read from Postgres;
  a last message of another epoch or beyond the log's last watermark (a restored database, a
  stream shared by mistake) counts as no position: the latest documents are sent.
  It does the same when the bus reconnects after an outage.
* **Consume.** Every instance's hub subscribes to :data:`SUBJECT` (:meth:`NatsBus.subscribe`)
  and delivers a message only when its watermark is the next one; a gap, another epoch, or a
  lost connection makes the hub read the missing range from Postgres instead (see
  :mod:`oa_sync_server.fanout`), so a lost, late or duplicated message never reaches a client.
* **Connection.** :meth:`NatsBus.start` connects in the background and reconnects forever
  (full-jitter backoff); the server starts and serves without NATS. :attr:`NatsBus.connected`
  tells the hub whether to rely on the bus.

What this is not: a queue with delivery guarantees to clients, or a second log. Nothing is
read from the bus that Postgres could not answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from typing import Final

import nats
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import StreamConfig
from nats.js.errors import BadRequestError, NotFoundError
from oa_sync_core.protocol.backoff import Backoff, BackoffPolicy
from sqlalchemy.ext.asyncio import AsyncEngine

from oa_sync_server.bus.changes import BusChange, decode_change, encode_change
from oa_sync_server.postgres.read_model import DocRow, changed_after, log_position

__all__ = [
    "REPUBLISH_LIMIT",
    "STREAM",
    "SUBJECT",
    "NatsBus",
]

STREAM: Final = "OA_SYNC_CHANGES"
"""The JetStream stream holding the changes (created if missing)."""
SUBJECT: Final = "oa_sync.changes"
"""The subject every change is published on."""
REPUBLISH_LIMIT: Final = 10_000
"""Most documents a republish sends; hubs read anything older from Postgres."""
STREAM_MAX_AGE_S: Final = 3600.0
"""How long the stream keeps a change (it only needs the last one, for republishing)."""
DUPLICATE_WINDOW_S: Final = 120.0
"""How long JetStream remembers a message id to drop a republished copy."""
BUS_BACKOFF: Final = BackoffPolicy(base_s=0.1, cap_s=5.0)
"""First-connection retry schedule (nats-py reconnects by itself once connected)."""

_log = structlog.get_logger(__name__)


Handler = Callable[[BusChange], None]


class NatsBus:
    """A connection to NATS for publishing and consuming changes. See the module docstring.

    Args:
        url: the NATS server URL (``nats://host:port``).
        on_published: called with the number of changes published (a metric), if given.

    Use :meth:`start` and :meth:`stop`.
    """

    complete: Final = True
    """Every change the lease holder commits is published (see the module docstring)."""

    def __init__(
        self, url: str, *, on_published: Callable[[int, bool], None] | None = None
    ) -> None:
        self.url = url
        self._nc: NatsClient | None = None
        self._handlers: list[Handler] = []
        self._on_published = on_published
        self._on_reconnect: list[Callable[[], Awaitable[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._ready = asyncio.Event()
        self.published = 0
        """Changes published since start (republished ones included)."""
        self.republished = 0
        """Changes republished since start."""
        self.received = 0
        """Messages received since start."""

    @property
    def connected(self) -> bool:
        """True while the connection is up (the hub relies on the bus only then)."""
        return self._nc is not None and self._nc.is_connected

    def start(self) -> None:
        """Connect in the background (retrying until it succeeds)."""
        if self._task is None:
            self._task = asyncio.create_task(self._connect(), name="oa-sync-bus-connect")

    async def wait_ready(self, within_s: float) -> None:
        """Until the first connection is up and subscribed.

        Raises:
            TimeoutError: not within ``within_s``.
        """
        async with asyncio.timeout(within_s):
            await self._ready.wait()

    async def stop(self) -> None:
        """Stop connecting; close the connection."""
        tasks = [t for t in (self._task, *self._background) if t is not None]
        self._task = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        nc, self._nc = self._nc, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()

    def subscribe(self, handler: Handler) -> None:
        """Call ``handler`` with every change received (in the event loop, in order)."""
        self._handlers.append(handler)

    def on_reconnect(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Await ``callback`` after every reconnection (e.g. a republish)."""
        self._on_reconnect.append(callback)

    async def _connect(self) -> None:
        backoff = Backoff(BUS_BACKOFF)
        while True:
            try:
                nc = await nats.connect(
                    servers=[self.url],
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.2,
                    connect_timeout=2,
                    error_cb=self._error,
                    disconnected_cb=self._disconnected,
                    reconnected_cb=self._reconnected,
                )
                break
            except (OSError, TimeoutError, nats.errors.Error) as exc:
                _log.warning("bus_connect_failed", error=type(exc).__name__)
                await asyncio.sleep(backoff.next_delay() or BUS_BACKOFF.cap_s)
        js = nc.jetstream()
        with contextlib.suppress(BadRequestError):  # exists (maybe with other limits): keep it
            await js.add_stream(
                StreamConfig(
                    name=STREAM,
                    subjects=[SUBJECT],
                    max_age=STREAM_MAX_AGE_S,
                    duplicate_window=DUPLICATE_WINDOW_S,
                )
            )
        await nc.subscribe(SUBJECT, cb=self._message)
        self._nc = nc
        self._ready.set()
        _log.info("bus_connected")

    async def _error(self, exc: Exception) -> None:
        _log.debug("bus_error", error=type(exc).__name__)

    async def _disconnected(self) -> None:
        _log.warning("bus_disconnected")

    async def _reconnected(self) -> None:
        _log.info("bus_reconnected")
        # In a task of its own: the client finishes reconnecting before the callbacks publish.
        task = asyncio.create_task(self._after_reconnect(), name="oa-sync-bus-reconnected")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _after_reconnect(self) -> None:
        for callback in self._on_reconnect:
            try:
                await callback()
            except Exception as exc:  # noqa: BLE001 - a failed republish is retried later
                _log.warning("bus_reconnect_callback_failed", error=type(exc).__name__)

    async def _message(self, msg: Msg) -> None:
        self.received += 1
        try:
            change = decode_change(msg.data)
        except ValueError as exc:
            _log.warning("bus_message_dropped", error=str(exc))
            return
        for handler in self._handlers:
            handler(change)

    # -- publishing ------------------------------------------------------------------------

    async def publish(self, changes: Iterable[BusChange], *, republish: bool = False) -> int:
        """Publish ``changes`` in order and flush; returns how many were sent.

        Raises:
            ConnectionError: not connected (nothing sent; the next lease holder or the next
                reconnection republishes, and hubs read Postgres meanwhile).
            TimeoutError: the flush did not complete.
        """
        nc = self._nc
        if nc is None or not nc.is_connected:
            raise ConnectionError("NATS bus not connected")
        count = 0
        for change in changes:
            await nc.publish(SUBJECT, encode_change(change), headers={"Nats-Msg-Id": change.msg_id})
            count += 1
        if count:
            await nc.flush(timeout=2)
            self.published += count
            if republish:
                self.republished += count
            if self._on_published is not None:
                self._on_published(count, republish)
        return count

    async def last_published(self) -> tuple[str, int] | None:
        """``(epoch, watermark)`` of the stream's last message, or ``None`` when it has none.

        Raises:
            ConnectionError: not connected.
        """
        nc = self._nc
        if nc is None or not nc.is_connected:
            raise ConnectionError("NATS bus not connected")
        try:
            raw = await nc.jetstream().get_last_msg(STREAM, SUBJECT)
        except NotFoundError:
            return None
        if raw.data is None:
            return None
        change = decode_change(raw.data)
        return change.epoch, change.watermark

    async def republish(self, engine: AsyncEngine) -> int:
        """Publish what Postgres committed after the stream's last message (see the module
        docstring); returns how many changes were sent.

        Raises:
            ConnectionError: not connected.
        """
        last = await self.last_published()
        async with engine.connect() as conn:
            if last is None:
                return 0  # a new stream: hubs start from Postgres anyway
            epoch, top = await log_position(conn)
            # Another epoch, or a stream ahead of the log (a restored database, a stream that
            # served another one): the stream's position means nothing here, send the latest.
            after = last[1] if last[0] == epoch and last[1] <= top else 0
            after = max(after, top - REPUBLISH_LIMIT)
            rows: list[tuple[DocRow, float]] = []
            while len(rows) < REPUBLISH_LIMIT:
                page = await changed_after(conn, after, 1000)
                if not page:
                    break
                rows.extend(page)
                after = page[-1][0].watermark
        sent = await self.publish(
            (BusChange(epoch=epoch, row=row, committed_at=at) for row, at in rows),
            republish=True,
        )
        if sent:
            _log.info("bus_republished", changes=sent)
        return sent
