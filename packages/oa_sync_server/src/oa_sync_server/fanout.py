"""Live fan-out: one LISTEN connection per process, one read per change, many feeds.

Theory of operation. The projector worker commits a batch, then ``pg_notify('oa_sync_changes',
<watermark>)``. A notification is only a *hint* (DESIGN.md rule 5): the :class:`Hub` never
trusts its payload. Two tasks run per hub:

* the **follower** (:class:`~oa_sync_server.postgres.follower.LogFollower`) holds a dedicated
  psycopg connection that ``LISTEN``s on ``oa_sync_changes``, reconnects with backoff and
  re-reads after a reconnect;
* the **reader** waits for the follower's hint or the poll interval (the fallback when hints
  are lost), then reads ``documents WHERE watermark > hub.watermark ORDER BY watermark`` page by
  page (the coalesced catch-up of :mod:`oa_sync_server.postgres.read_model`), each page with the
  log epoch in one statement on a connection of its own
  (:class:`~oa_sync_server.postgres.read_model.HubReader`), builds each row's
  :class:`~oa_sync_core.protocol.wire.EncodedUpdate` once, hands the same :class:`LiveDoc` to every
  attached :class:`Feed` that wants it, and advances ``hub.watermark``. With nobody attached
  (a process that only takes appends) a page is read as its watermarks alone, no bodies
  (:meth:`~oa_sync_server.postgres.read_model.HubReader.skip`): ``hub.watermark`` still
  advances for ``wait=visible``, and a feed that attaches during that read gets the page read
  again with its bodies.

Routing. A feed that declared its topics (:meth:`Feed.set_topics`) is offered only the changes
those topics cover; the hub finds them through an index (exact keys in a dict, ``*`` prefixes
in a dict probed with the key's prefixes of the lengths in use), so a change costs work in
proportion to the feeds that want it, not to every connection of the process. A feed that
declared nothing receives every change. Topics are a coarse filter: the owner still checks
each change against its subscriptions and grant. An owner must declare a topic *before* it
reads that topic's snapshot or catch-up, so every change is in one or the other.

Each :class:`Feed` has a bounded queue. A feed whose queue is full is *overflowed*: it stops
receiving and its iteration ends, and its owner closes the connection (4429) — one slow
consumer never holds back the hub or the other feeds.

Hints. A commit's notification names its epoch and new watermark (``<epoch>:<watermark>``,
:func:`~oa_sync_server.postgres.tables.changes_hint`): a wake whose notifications all name
watermarks the hub has delivered in its epoch reads nothing. Any other wake (the poll
interval, a reconnect, :meth:`Hub.wake`, a payload of another form) reads, as before.

Source. In the process that runs the projector, its committed batches arrive on the local bus
(:class:`~oa_sync_server.bus.local.LocalBus`, the default) and are delivered without reading
them back; other writers' changes (another process's projector, a reprojection) are read from
Postgres when their hints name them. With the NATS bus (``OA_SYNC_FANOUT=nats``,
:mod:`oa_sync_server.bus`) every instance takes every change from it: the bus is *complete*.
Either way a bus change arrives as a message with its watermark, and the reader delivers it
only when it carries the next watermark of the hub's epoch. A gap (a message ahead of the next
one), a message of another epoch, or a bus that is not connected makes the pass read Postgres
exactly as without a bus, from the hub's watermark; messages at or below the watermark are
dropped. So a client sees the same changes in the same order whichever way they came. While a
complete bus is up, the only Postgres read per instance is an *audit* once per poll interval
(the epoch and the last watermark, one row): when the hub is still below the watermark the
previous audit saw, something committed was not published (e.g. a reprojection) and the pass
reads it.

Epoch. Each pass also reads the log epoch. When it changes (a rebuild restarted watermarks),
the hub jumps to the new log's watermark and ends every feed with ``feed.epoch_changed`` set:
their sessions must reset their clients.

What this is not: the projector, or a per-connection reader; nothing here writes to sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Final, Literal, Protocol

import psycopg
import sqlalchemy as sa
import structlog
from oa_sync_core.protocol.wire import EncodedUpdate, WireFormat
from oa_sync_core.topics import Topic
from sqlalchemy.ext.asyncio import AsyncEngine

from oa_sync_server.metrics import Metrics
from oa_sync_server.postgres.follower import LogFollower, libpq_url
from oa_sync_server.postgres.read_model import DocRow, HubReader, log_position, read_meta
from oa_sync_server.postgres.tables import CHANGES_CHANNEL, changes_hint

if TYPE_CHECKING:
    from oa_sync_server.bus.changes import BusChange, ChangeBus

__all__ = ["Delivery", "Feed", "Hub", "LiveDoc", "Receiver", "Tap"]


_log = structlog.get_logger(__name__)


class Delivery:
    """What the deliveries of one :class:`LiveDoc` share, mutable (the LiveDoc is frozen).

    Attributes:
        frames: whole WebSocket frames of the update, by (subscription id, wire format): the
            connections whose subscription has the same id (clients usually use the same ids)
            send the same bytes. At most :attr:`MAX_FRAMES` are kept.
        sent: whether a connection has written the change yet (the commit-to-send latency is
            observed once per change, at its first write).
    """

    __slots__ = ("frames", "sent")

    MAX_FRAMES: Final = 16

    def __init__(self) -> None:
        self.frames: dict[tuple[str, WireFormat], bytes] = {}
        self.sent = False


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LiveDoc:
    """One change as the hub delivers it to every feed.

    Attributes:
        row: the document at its new version.
        update: its wire encoding, built once and shared by every feed.
        committed_at: when the projector wrote it (seconds since the epoch), for the
            commit-to-send latency metric.
        cache: other encodings of this change (e.g. the SSE event), built on first use by
            whichever transport needs them and shared by all its connections.
        delivery: the WebSocket frames and the first-send mark shared by its deliveries.
    """

    row: DocRow
    update: EncodedUpdate
    committed_at: float = 0.0
    cache: dict[str, bytes] = dataclasses.field(default_factory=dict, compare=False, repr=False)
    delivery: Delivery = dataclasses.field(default_factory=Delivery, compare=False, repr=False)

    @classmethod
    def of_row(cls, row: DocRow, committed_at: float = 0.0) -> LiveDoc:
        """A row read by a snapshot or catch-up (or the hub), with its encoding."""
        return cls(row=row, update=row.encoded(), committed_at=committed_at)

    # What a protocol session needs of a document version (its ``DocVersion``).
    @property
    def doc_key(self) -> str:
        """The document's key."""
        return self.row.doc_key

    @property
    def version(self) -> int:
        """The document's version."""
        return self.row.version

    @property
    def watermark(self) -> int:
        """The watermark of this change."""
        return self.row.watermark


class Receiver(Protocol):
    """What a :class:`Tap` hands the hub's changes to, synchronously, inside the hub's pass."""

    def offer(self, live: LiveDoc) -> None:
        """Take one change (must not block or await; must not raise)."""

    def tap_ended(self, tap: Tap) -> None:
        """The tap stopped receiving: ``tap.epoch_changed``, or the hub stopped."""


class _Attachment:
    """What the hub routes changes to: topics, and closing (shared by :class:`Feed` and
    :class:`Tap`)."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        self.epoch_changed = False
        """True once the log epoch changed; the owner should reset its subscriptions."""
        self.closed = False
        """True once the attachment no longer receives anything."""
        self.topics: frozenset[Topic] | None = None
        """The topics this is offered (``None``: every change). See :meth:`set_topics`."""

    def set_topics(self, topics: Iterable[Topic] | None) -> None:
        """Receive from now on only changes these topics cover (``None``: every change).

        Call it before reading a snapshot or catch-up of a newly added topic, so that no change
        falls between that read and the feed.
        """
        new = None if topics is None else frozenset(topics)
        if new != self.topics and not self.closed:
            self._hub._route(self, self.topics, new)
            self.topics = new

    def close(self) -> None:
        """Stop receiving. Idempotent."""
        if not self.closed:
            self.closed = True
            self._hub._detach(self)
            self._ended()

    def _ended(self) -> None:
        """Called once when closed."""

    def _offer(self, live: LiveDoc) -> None:
        raise NotImplementedError


class Tap(_Attachment):
    """A push attachment: the hub hands each change straight to a :class:`Receiver`, no queue
    and no task in between (the WebSocket connections use one each). Create with
    :meth:`Hub.tap`."""

    def __init__(self, hub: Hub, receiver: Receiver) -> None:
        super().__init__(hub)
        self._receiver = receiver

    def _offer(self, live: LiveDoc) -> None:
        if not self.closed:
            self._receiver.offer(live)

    def _ended(self) -> None:
        self._receiver.tap_ended(self)


class Feed(_Attachment):
    """One consumer's view of the hub: an async iterator of :class:`LiveDoc` in watermark order.

    Create with :meth:`Hub.attach`. Iteration ends when the feed is closed, overflows
    (``overflowed``) or the log epoch changes (``epoch_changed``).
    """

    def __init__(self, hub: Hub, max_queue: int) -> None:
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        super().__init__(hub)
        self._queue: asyncio.Queue[LiveDoc] = asyncio.Queue(max_queue)
        self._waiter: asyncio.Future[None] | None = None
        self.overflowed = False
        """True once the bounded queue overflowed; the owner should close with 4429."""

    def __aiter__(self) -> AsyncIterator[LiveDoc]:
        return self

    async def __anext__(self) -> LiveDoc:
        while True:
            if self.closed:
                raise StopAsyncIteration
            try:
                return self._queue.get_nowait()
            except asyncio.QueueEmpty:
                pass
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    @property
    def pending(self) -> int:
        """Changes queued and not yet taken."""
        return self._queue.qsize()

    def _ended(self) -> None:
        self._wake()  # a pending iteration ends

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _offer(self, live: LiveDoc) -> None:
        if self.closed:
            return
        try:
            self._queue.put_nowait(live)
        except asyncio.QueueFull:
            self.overflowed = True
            self.close()
            return
        self._wake()


class Hub:
    """The process's single reader of live changes. See the module docstring.

    Args:
        engine: the database engine: the reader holds a connection of its own to its
            database (:class:`~oa_sync_server.postgres.read_model.HubReader`) and borrows a
            pooled one only to re-read the log's metadata when the epoch changed, or to audit
            the bus.
        poll_interval_s: longest time between two reads when no hint arrives.
        page_size: rows per read.
        metrics: where to count listener reconnects, if anywhere.
        listen_url: libpq URL of the LISTEN connection (default: the engine's URL).
        bus: the fan-out bus to take changes from while it is connected (``None``: Postgres
            only). The hub subscribes; the caller starts and stops the bus.

    Use :meth:`start` and :meth:`stop` (the app does so in a cleanup context).
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        poll_interval_s: float = 1.0,
        page_size: int = 1000,
        metrics: Metrics | None = None,
        listen_url: str | None = None,
        bus: ChangeBus | None = None,
    ) -> None:
        self._engine = engine
        self._bus = bus
        self._from_bus: dict[int, BusChange] = {}
        self._bus_lost = False
        self._audit_due = 0.0
        self._audit_seen = 0
        self._poll_interval_s = poll_interval_s
        self.page_size = page_size
        """Changes read per query: a feed may receive this many at once."""
        self._metrics = metrics
        self._listen_url = listen_url or libpq_url(engine)
        self._feeds: list[_Attachment] = []
        # Routing index (see the module docstring); dicts as ordered sets of feeds.
        self._everything: dict[_Attachment, None] = {}
        self._exact: dict[str, dict[_Attachment, None]] = {}
        self._prefixes: dict[str, dict[_Attachment, None]] = {}
        self._prefix_lengths: Counter[int] = Counter()
        self._reader = HubReader(libpq_url(engine))
        self._follower = LogFollower(
            self._listen_url,
            CHANGES_CHANNEL,
            poll_interval_s=poll_interval_s,
            on_reconnect=None if metrics is None else metrics.listener_reconnects.inc,
            name="hub",
        )
        self._advanced = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.watermark = 0
        """The highest watermark read and delivered to the feeds."""
        self.epoch = ""
        """The log epoch the hub is following."""
        self.listening = self._follower.listening
        """Set while the LISTEN connection is up."""

    @property
    def listener_pid(self) -> int | None:
        """Backend pid of the LISTEN connection while it is up (tests terminate it)."""
        return self._follower.backend_pid

    async def start(self) -> None:
        """Read the current watermark and epoch, then start listening and reading.

        Live delivery begins after the watermark current at start: older changes are the
        business of snapshots and catch-up reads.
        """
        if self._bus is not None:
            self._bus.subscribe(self._on_bus)  # before the read: nothing falls in between
        async with self._engine.connect() as conn:
            meta = await read_meta(conn)
        self.watermark = meta.watermark
        self.epoch = meta.epoch
        self._follower.start()
        self._tasks = [asyncio.create_task(self._read_loop(), name="oa-sync-hub-reader")]

    async def stop(self) -> None:
        """Stop both tasks and close every feed."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self._follower.stop()
        await self._reader.close()
        for feed in list(self._feeds):
            feed.close()

    def attach(self, max_queue: int) -> Feed:
        """A new feed receiving every change read from now on.

        Args:
            max_queue: changes it may hold before it counts as overflowed.
        """
        feed = Feed(self, max_queue)
        self._feeds.append(feed)
        self._everything[feed] = None
        return feed

    def tap(self, receiver: Receiver, topics: Iterable[Topic] | None = None) -> Tap:
        """A new push attachment handing ``receiver`` every change read from now on that
        ``topics`` cover (``None``: every change)."""
        tap = Tap(self, receiver)
        self._feeds.append(tap)
        self._everything[tap] = None
        tap.set_topics(topics)
        return tap

    @property
    def feeds(self) -> int:
        """Number of attached feeds."""
        return len(self._feeds)

    def wake(self) -> None:
        """Ask for a read now (as a NOTIFY hint would)."""
        self._follower.wake()

    async def wait_for(self, watermark: int, within_s: float) -> None:
        """Wait until the hub has delivered ``watermark``.

        Raises:
            TimeoutError: not reached within ``within_s`` seconds.
        """
        async with asyncio.timeout(within_s):
            while self.watermark < watermark:
                self.wake()
                await self._advanced.wait()

    def _detach(self, feed: _Attachment) -> None:
        with contextlib.suppress(ValueError):
            self._feeds.remove(feed)
        self._route(feed, feed.topics, frozenset())

    def _route(
        self, feed: _Attachment, old: frozenset[Topic] | None, new: frozenset[Topic] | None
    ) -> None:
        """Move a feed in the routing index from topics ``old`` to ``new``."""
        if old is None:
            self._everything.pop(feed, None)
        else:
            for topic in old:
                table = self._prefixes if topic.wildcard else self._exact
                feeds = table.get(topic.prefix)
                if feeds is not None:
                    feeds.pop(feed, None)
                    if not feeds:
                        del table[topic.prefix]
                        if topic.wildcard:
                            self._prefix_lengths[len(topic.prefix)] -= 1
                            if not self._prefix_lengths[len(topic.prefix)]:
                                del self._prefix_lengths[len(topic.prefix)]
        if new is None:
            self._everything[feed] = None
            return
        for topic in new:
            table = self._prefixes if topic.wildcard else self._exact
            feeds = table.get(topic.prefix)
            if feeds is None:
                feeds = table[topic.prefix] = {}
                if topic.wildcard:
                    self._prefix_lengths[len(topic.prefix)] += 1
            feeds[feed] = None

    def _targets(self, doc_key: str) -> list[_Attachment]:
        """The feeds a change of ``doc_key`` is offered to, each once."""
        found: list[dict[_Attachment, None]] = []
        if self._everything:
            found.append(self._everything)
        exact = self._exact.get(doc_key)
        if exact:
            found.append(exact)
        for length in self._prefix_lengths:
            if length <= len(doc_key):
                feeds = self._prefixes.get(doc_key[:length])
                if feeds:
                    found.append(feeds)
        if len(found) == 1:
            return list(found[0])
        targets: dict[_Attachment, None] = {}
        for feeds in found:
            targets.update(feeds)
        return list(targets)

    # -- reader -----------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        while True:
            named = await self._follower.wait()
            try:
                await self._read_pass(named)
            except (sa.exc.SQLAlchemyError, psycopg.Error, OSError) as exc:
                _log.warning("fanout_read_failed", error=type(exc).__name__)
            except Exception as exc:  # noqa: BLE001 - a bug must not end live delivery
                _log.error("fanout_read_crashed", error=type(exc).__name__, exc_info=exc)

    def _on_bus(self, change: BusChange) -> None:
        if change.watermark > self.watermark:
            if len(self._from_bus) >= 8 * self.page_size:
                self._from_bus.clear()  # far behind: the next pass reads Postgres
                self._bus_lost = True
            self._from_bus[change.watermark] = change
            self._follower.wake(read=False)  # delivered by the pass; no read for it

    def _take_from_bus(self) -> bool:
        """Deliver the bus's messages that continue the watermark; False when Postgres must
        be read (a gap, another epoch).

        The contiguous run after the watermark is delivered as a page read of Postgres would
        give it: each document once, at its latest change, in watermark order (when the hub
        has fallen behind by more than a batch, a document changed twice is sent once).
        """
        held = self._from_bus
        if self._bus_lost:
            self._bus_lost = False
            return False
        run: dict[str, BusChange] = {}  # by document; re-inserted, so in watermark order
        top = self.watermark
        other_epoch = False
        while (change := held.pop(top + 1, None)) is not None:
            if change.epoch != self.epoch:
                held.clear()
                other_epoch = True
                break
            key = change.row.doc_key
            run.pop(key, None)
            run[key] = change
            top = change.watermark
        if run:
            for change in run.values():
                self._offer(change.row, change.committed_at)
            self.watermark = top
            if self._metrics is not None:
                self._metrics.hub_changes.labels("bus").inc(len(run))
            self._signal()
        if other_epoch:
            return False
        for watermark in [w for w in held if w <= self.watermark]:
            del held[watermark]
        return not held

    async def _audit(self) -> bool:
        """True when Postgres holds a change the bus did not bring (see the module docstring)."""
        now = time.monotonic()
        if now < self._audit_due:
            return False
        self._audit_due = now + self._poll_interval_s
        async with self._engine.connect() as conn:
            epoch, top = await log_position(conn)
        if self._metrics is not None:
            self._metrics.hub_reads.labels("audit").inc()
        behind = epoch != self.epoch or self.watermark < self._audit_seen
        self._audit_seen = top
        return behind

    def _covered(self, named: frozenset[str] | None) -> bool:
        """Whether the notifications of a wake name only changes already delivered (their
        ``<epoch>:<watermark>`` payloads in the hub's epoch, at or below its watermark)."""
        if named is None:
            return False
        for payload in named:
            hint = changes_hint(payload)
            if hint is None or hint[0] != self.epoch or hint[1] > self.watermark:
                return False
        return True

    def _offer(self, row: DocRow, committed_at: float) -> None:
        """Hand one change to the feeds that want it (its encoding built only if any do)."""
        if not self._feeds:
            return
        targets = self._targets(row.doc_key)
        if targets:
            live = LiveDoc.of_row(row, committed_at)
            for feed in targets:
                feed._offer(live)

    async def _read_pass(self, named: frozenset[str] | None = None) -> None:
        """Deliver what the bus brought, then read Postgres unless nothing is left to read
        (``named``: the payloads of the notifications this pass was woken for, see
        :meth:`LogFollower.wait`)."""
        bus = self._bus
        if bus is not None and bus.connected:
            if self._take_from_bus():
                if bus.complete:
                    if not await self._audit():
                        return
                elif self._covered(named):
                    return
        elif self._covered(named):
            return
        while True:
            if not self._feeds:
                skipped = await self._skip_page()
                if skipped == "more":
                    continue
                if skipped == "done":
                    break
            # One statement per page (the epoch and the documents after the watermark), each
            # its own transaction (autocommit).
            epoch, rows = await self._reader.page(self.watermark, self.page_size)
            if epoch is not None and epoch != self.epoch:
                await self._epoch_changed()
                return
            if self._metrics is not None:
                self._metrics.hub_reads.labels("page").inc()
                if rows:
                    self._metrics.hub_changes.labels("postgres").inc(len(rows))
            for row, committed_at in rows:
                self._offer(row, committed_at)
                self.watermark = row.watermark
            if rows:
                self._signal()
            if len(rows) < self.page_size:
                break

    async def _skip_page(self) -> Literal["more", "done", "read"]:
        """With nobody attached, advance over one page reading only its watermarks (no bodies
        to parse, canonicalise and drop): ``"more"`` after a full page, ``"done"`` after the
        last one (or an epoch change), ``"read"`` when the page must be read with its bodies.

        Whether anyone is attached is decided again after the read, as the page read decides
        (its rows are offered after its await): a feed that attached meanwhile gets the page
        with its bodies (``"read"``), so nothing it should see is passed over.
        """
        epoch, top, count = await self._reader.skip(self.watermark, self.page_size)
        if epoch is not None and epoch != self.epoch:
            await self._epoch_changed()
            return "done"
        if self._feeds:
            return "read"
        if self._metrics is not None:
            self._metrics.hub_reads.labels("page").inc()
            if count:
                self._metrics.hub_changes.labels("postgres").inc(count)
        if top is not None:
            self.watermark = top
            self._signal()
        return "more" if count == self.page_size else "done"

    async def _epoch_changed(self) -> None:
        async with self._engine.connect() as conn:
            meta = await read_meta(conn)
        _log.info("epoch_changed", old=self.epoch, new=meta.epoch)
        self.epoch = meta.epoch
        self.watermark = meta.watermark
        for feed in list(self._feeds):
            feed.epoch_changed = True
            feed.close()
        self._signal()

    def _signal(self) -> None:
        self._advanced.set()
        self._advanced = asyncio.Event()
