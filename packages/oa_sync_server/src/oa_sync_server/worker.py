"""The single-writer projector worker: folds the Postgres event log into the read model.

Theory of operation. One row of ``oa_sync.projector_leases`` per worker ``name`` holds the
lease: ``holder`` (who), ``epoch`` (the fencing token, raised by every acquisition) and
``expires_at``, plus the worker's log cursor ``(cursor_tx_id, cursor_position)``. A worker
acquires the lease when it is free, expired, or already its own, which raises the epoch; it
renews it on every batch and while idle.

Each batch is one transaction in two phases:

1. *read* (no locks): the lease row's cursor and up to ``batch_size`` final events after it
   in log order, in one statement (only below the snapshot xmin, as
   :func:`oa_sync_server.postgres.event_log.read_committed` reads, so nothing still in flight
   is ever passed — DESIGN.md rule 1);
2. *write*: ``SELECT ... FOR UPDATE`` on the lease row, then the watermark lock and the last
   watermark (``oa_sync.lock_watermarks``, whose read has a snapshot of its own that follows
   the lock), in one statement; if ``holder``/``epoch`` changed the lease was taken over and
   the batch aborts with :class:`LeaseLost` (rule 3: a paused old leader cannot commit); if
   the cursor moved the batch is stale and is redone. Then the documents' checkpoints and
   bodies, the pure fold (:class:`oa_sync_core.ProjectionEngine`), and one statement writing
   documents, checkpoints, change rows (watermarks ``last + 1`` onwards, gap-free), the lease
   cursor and renewal, and ``pg_notify('oa_sync_changes', <new watermark>)`` — all committed
   together (rule 2), the NOTIFY delivered only on commit (rule 5). A batch is four round
   trips (the lease's cursor and the events after it, locks with the last watermark, write,
   commit), three when it was read ahead.

Look-ahead. After a full batch (``batch_size`` events: more are probably waiting), the worker
reads and folds the next batch on a second pooled connection *while* the current one's writes
are in flight (:meth:`ProjectorWorker._look_ahead`), so Python's fold overlaps Postgres'
write. The next batch's transaction then takes the same locks and checks as ever and uses what
was read ahead only if the lease cursor is still the one it was read after (else it is read
again) and the last watermark is the one the batch before left, i.e. nobody else wrote a
document since the look-ahead took its states (else it is refolded from the database). The
events read ahead are as final as any batch's (read below their own snapshot's xmin, rule 1).

After the commit, a worker given a fan-out bus (NATS, or the in-process
:class:`~oa_sync_server.bus.local.LocalBus` of ``oa-sync serve``) publishes the batch's
changes to it (:meth:`ProjectorWorker._publish`; a failure is logged, never retried here: the
hubs read Postgres for what the bus misses, and the next lease holder republishes, see
:mod:`oa_sync_server.bus.nats`).

A crash anywhere before the commit leaves nothing; after a restart the batch is read again.
Events at or below a document's checkpoint are skipped by the engine, so nothing is applied
twice even if a cursor were ever behind the checkpoints.

Why the lease row and not a session advisory lock: an advisory lock belongs to a connection,
so a pooled connection (or one that the server still thinks is alive after a network
partition) could keep or lose it independently of the transactions that write; fencing has to
be checked *inside* each write transaction anyway. The row lock taken by ``FOR UPDATE`` in
the batch transaction is both the mutual exclusion and the fencing check, and it is released
exactly when the writes commit or abort. The only advisory lock is the transaction-scoped
watermark lock (:data:`oa_sync_server.postgres.stores.WATERMARK_LOCK`) shared with reprojection.

:meth:`ProjectorWorker.run` is the long-running loop: it LISTENs on ``oa_sync_events`` for
append hints and polls as a fallback (one
:class:`~oa_sync_server.postgres.follower.LogFollower`), re-acquires the lease after losing it,
and backs off on database errors. On a clean stop it releases the lease at once, so only a
crash makes a successor wait for the lease to expire.

Stalls are named, not silent. Transaction ids are cluster-wide: a transaction holding an xid
that stays open anywhere on the server (another database included) keeps the read horizon
(the snapshot xmin) below every event committed after it began, and projection waits. When
committed events wait behind the horizon for ``stall_warn_after_s``, the loop logs
``projection_stalled`` naming the blocking backend from ``pg_stat_activity`` (pid, database,
application, state, transaction age and start, query start — never the query text), again
every :data:`STALL_WARN_EVERY_S` while it lasts, and ``projection_resumed`` after. A standby
whose lease holder stopped renewing (killed without releasing it) logs
``projector_lease_waiting`` with the holder and the expiry it waits for.
The diagnostics themselves (:mod:`oa_sync_server.postgres.diagnostics`) also serve ``/readyz``
and ``/metrics``. What this is not: the read side or the fan-out of changes to clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Final, NamedTuple, NoReturn

import sqlalchemy as sa
import structlog
from oa_sync_core import (
    DEFAULT_PROJECTORS,
    DocId,
    DocumentState,
    Event,
    ProjectionEngine,
    ProjectionResult,
    Projector,
)
from oa_sync_core.protocol.backoff import Backoff, BackoffPolicy
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from oa_sync_server.bus.changes import BusChange, ChangeBus
from oa_sync_server.errors import LeaseBusyError, LeaseError, LeaseLost
from oa_sync_server.postgres.admin import prune_changes, reproject
from oa_sync_server.postgres.diagnostics import read_horizon_holder, read_lease
from oa_sync_server.postgres.engine import DriverText, driver_of, looks_usable, run_on_driver
from oa_sync_server.postgres.event_log import LogCursor, log_events, read_committed
from oa_sync_server.postgres.follower import LogFollower, libpq_url
from oa_sync_server.postgres.read_model import DocRow, log_epoch
from oa_sync_server.postgres.stores import (
    WATERMARK_LOCK,
    LeaseAdvance,
    Written,
    load_states,
    write_batch,
)
from oa_sync_server.postgres.tables import EVENTS_CHANNEL

__all__ = [
    "STALL_WARN_EVERY_S",
    "LeaseBusyError",
    "LeaseError",
    "LeaseLost",
    "ProjectorWorker",
    "default_holder",
    "libpq_url",
]

log = structlog.get_logger(__name__)

_ACQUIRE = sa.text(
    "INSERT INTO oa_sync.projector_leases AS l (name, holder, epoch, heartbeat_at, expires_at) "
    "VALUES (:name, :holder, 1, clock_timestamp(), "
    "clock_timestamp() + make_interval(secs => :ttl)) "
    "ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, epoch = l.epoch + 1, "
    "heartbeat_at = EXCLUDED.heartbeat_at, expires_at = EXCLUDED.expires_at "
    "WHERE l.holder IS NULL OR l.holder = EXCLUDED.holder OR l.expires_at IS NULL "
    "OR l.expires_at < clock_timestamp() "
    "RETURNING epoch"
)
_RENEW = sa.text(
    "UPDATE oa_sync.projector_leases SET heartbeat_at = clock_timestamp(), "
    "expires_at = clock_timestamp() + make_interval(secs => :ttl) "
    "WHERE name = :name AND holder = :holder AND epoch = :epoch"
)
_RELEASE = sa.text(
    "UPDATE oa_sync.projector_leases SET holder = NULL, expires_at = NULL "
    "WHERE name = :name AND holder = :holder AND epoch = :epoch"
)
_READ_BATCH_SQL: Final = (
    # The lease row and up to :n final events after its cursor, in one statement (one
    # snapshot): one row per event, the lease's columns on each; one row with no event when
    # nothing is waiting; no row when the lease is gone. Final: below the snapshot's xmin
    # (DESIGN.md rule 1), as event_log.read_committed reads. The last column says whether the
    # same snapshot holds committed events that are not final yet (at or above its xmin: they
    # wait behind the horizon); the cursor is always below that xmin, so they all follow it.
    "SELECT l.holder, l.epoch, CAST(CAST(l.cursor_tx_id AS text) AS bigint), l.cursor_position, "
    "e.position, e.stream_id, e.stream_seq, e.type, CAST(e.payload AS text), e.recorded_at, "
    "CAST(CAST(e.tx_id AS text) AS bigint), EXISTS (SELECT 1 FROM oa_sync.events "
    "WHERE tx_id >= pg_snapshot_xmin(pg_current_snapshot())) AS held "
    "FROM oa_sync.projector_leases AS l LEFT JOIN LATERAL ("
    "SELECT position, stream_id, stream_seq, type, payload, recorded_at, tx_id "
    "FROM oa_sync.events "
    "WHERE (tx_id, position) > (l.cursor_tx_id, l.cursor_position) "
    "AND tx_id < pg_snapshot_xmin(pg_current_snapshot()) "
    "ORDER BY tx_id, position LIMIT :n) AS e ON true "
    "WHERE l.name = :name ORDER BY e.tx_id, e.position"
)
_READ_BATCH = DriverText(sa.text(_READ_BATCH_SQL))  # on the driver: see DriverText
_LOCK_LEASE_SQL: Final = (
    # The lease row, then the watermark lock (the order every document writer takes them in),
    # and the last watermark, in one round trip. The row is locked (the CTE) before the outer
    # SELECT calls oa_sync.lock_watermarks, which locks, then reads the last watermark with a
    # snapshot of its own that follows the lock (migration 0008).
    "WITH l AS (SELECT holder, epoch, CAST(CAST(cursor_tx_id AS text) AS bigint) AS tx, "
    "cursor_position FROM oa_sync.projector_leases WHERE name = :name FOR UPDATE) "
    "SELECT holder, epoch, tx, cursor_position, oa_sync.lock_watermarks(:key) AS last FROM l"
)
_LOCK_LEASE = DriverText(sa.text(_LOCK_LEASE_SQL).bindparams(key=WATERMARK_LOCK))
_VERSIONS_HELD = sa.text(
    "SELECT DISTINCT projection, projector_version FROM oa_sync.projection_checkpoints"
)
_HORIZON = sa.text("SELECT CAST(CAST(pg_snapshot_xmax(pg_current_snapshot()) AS text) AS bigint)")
_PASSED = sa.text(
    "SELECT pg_snapshot_xmin(pg_current_snapshot()) >= CAST(CAST(:target AS text) AS xid8)"
)
# Committed events after the lease cursor; after an empty batch, these wait behind the horizon.
_PENDING = sa.text(
    "SELECT EXISTS (SELECT 1 FROM oa_sync.events e, oa_sync.projector_leases l "
    "WHERE l.name = :name AND (e.tx_id, e.position) > "
    "(COALESCE(l.cursor_tx_id, CAST('0' AS xid8)), COALESCE(l.cursor_position, 0)))"
)

DEFAULT_LEASE_TTL_S: Final = 10.0
_RETRY_BACKOFF: Final = BackoffPolicy(base_s=0.1, cap_s=5.0)
"""How a failed batch is retried (full jitter, forever; reset by a batch that commits)."""
_HELD_BACKOFF: Final = BackoffPolicy(base_s=0.01, cap_s=1.0)
"""How often an idle worker looks again while committed events wait behind the horizon, once
they have waited :data:`_HELD_STEADY_S`."""
_HELD_STEADY_S: Final = 0.1
_HELD_STEADY_EVERY_S: Final = 0.005
"""For the first :data:`_HELD_STEADY_S` of a hold, look every 5 ms: a typical hold is another
session's short writing transaction, whose commit sends no hint, and a doubling backoff (10,
20, 40 ms) made a 20 ms hold cost ~50 ms at p95 (bench/visible); 20 cheap reads at most."""
DEFAULT_STALL_WARN_AFTER_S: Final = 5.0
STALL_WARN_EVERY_S: Final = 30.0
"""While a stall lasts, ``projection_stalled`` is repeated this often (or at once for a new
blocking backend)."""
_STALL_CHECK_EVERY_S: Final = 1.0


class _Ahead(NamedTuple):
    """The batch after a cursor, read (and folded) ahead by :meth:`ProjectorWorker._look_ahead`.

    Attributes:
        cursor: the cursor it was read after (the lease cursor must still be this).
        events: the events read; after: the cursor after them.
        result: their fold (None when there were no events).
        based_at: the last watermark at which the fold's document states are exact.
    """

    cursor: LogCursor
    events: list[Event]
    after: LogCursor
    result: ProjectionResult | None
    based_at: int


def default_holder() -> str:
    """A holder id unique to this process: ``<host>:<pid>:<random>``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class ProjectorWorker:
    """Projects the event log into documents, checkpoints and changes under a fenced lease.

    Args:
        engine: the async engine.
        projectors: the projectors to run (names unique).
        name: the lease (one writer per name; different names may run different projectors).
        holder: this worker's identity (default: :func:`default_holder`).
        batch_size: most events per batch transaction.
        lease_ttl_s: how long the lease lasts without renewal.
        poll_interval_s: wake-up interval when no NOTIFY hint arrives.
        cache_size: documents whose state is kept in memory between batches (0: none).
        retention_s: while idle, :meth:`run` deletes change rows older than this (at most
            every ``retention_s / 10`` seconds, capped at an hour); ``None`` keeps them all.
        bus: the fan-out bus to publish committed changes to (``None``: none); a fresh lease
            holder republishes what the bus missed.
        stall_warn_after_s: committed events waiting this long behind the read horizon make
            :meth:`run` log ``projection_stalled`` naming the blocking backend.
        look_ahead: after a full batch, read and fold the next one on a second pooled
            connection while the batch is written (see :meth:`_look_ahead`).

    Attributes:
        epoch: the fencing epoch of the lease we hold (0: none).
        watermark: the highest watermark this worker committed (0 before any).
        applied: events read and folded (or skipped) since start.
        folded_ahead: batches committed with the fold made ahead (see ``look_ahead``).
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        projectors: Iterable[Projector] = DEFAULT_PROJECTORS,
        name: str = "default",
        holder: str | None = None,
        batch_size: int = 1000,
        lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
        poll_interval_s: float = 1.0,
        cache_size: int = 100_000,
        retention_s: float | None = None,
        bus: ChangeBus | None = None,
        stall_warn_after_s: float = DEFAULT_STALL_WARN_AFTER_S,
        look_ahead: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if lease_ttl_s <= 0 or poll_interval_s <= 0:
            raise ValueError("lease_ttl_s and poll_interval_s must be > 0")
        self.engine = engine
        self.projection = ProjectionEngine(projectors)
        self.name = name
        self.holder = holder or default_holder()
        self.batch_size = batch_size
        self.lease_ttl_s = lease_ttl_s
        self.poll_interval_s = poll_interval_s
        self.epoch = 0
        self.watermark = 0
        self.applied = 0
        self.folded_ahead = 0
        self._follower = LogFollower(
            libpq_url(engine), EVENTS_CHANNEL, poll_interval_s=poll_interval_s, name="projector"
        )
        self.cache_size = cache_size
        self.retention_s = retention_s
        self.bus = bus
        self._next_prune = 0.0
        self._checked_epoch = 0  # the lease epoch whose stale projections were rebuilt
        self._renew_due = 0.0  # monotonic time at which an idle worker renews its lease
        self._cache: dict[DocId, DocumentState] = {}
        self._cache_at = -1  # the last watermark when the cache was known to be exact
        self.stall_warn_after_s = stall_warn_after_s
        self._stall_check_due = 0.0
        self._blocked_since: float | None = None  # monotonic: events first seen waiting
        self._stall_warned: tuple[int | None, float] | None = None  # (pid, next warning at)
        self._read_held: bool | None = None  # the last batch read saw events behind the horizon
        self._lease_warned: tuple[str | None, object] | None = None  # (holder, expiry) told
        self.look_ahead = look_ahead
        self._ahead: asyncio.Future[_Ahead] | None = None  # the next batch, read and folded
        self._keeping = 0  # run()/catch_up() calls in progress: batches use a kept connection
        self._kept: AsyncConnection | None = None  # for batches and stall checks
        self._kept_ahead: AsyncConnection | None = None  # for the look-ahead's reads

    def __repr__(self) -> str:
        return f"ProjectorWorker(name={self.name!r}, holder={self.holder!r}, epoch={self.epoch})"

    # -- lease -------------------------------------------------------------------------------

    async def acquire(self) -> bool:
        """Take the lease if it is free, expired or ours; True when we now hold it.

        On a fresh acquisition, documents whose checkpoints were written by another version
        of one of our projectors are rebuilt first (:meth:`rebuild_stale`).
        """
        async with self.engine.begin() as conn:
            epoch = (
                await conn.execute(
                    _ACQUIRE, {"name": self.name, "holder": self.holder, "ttl": self.lease_ttl_s}
                )
            ).scalar_one_or_none()
        if epoch is None:
            self.epoch = 0
            return False
        fresh = epoch != self.epoch
        if fresh:
            log.info("projector_lease_acquired", name=self.name, holder=self.holder, epoch=epoch)
        self.epoch = int(epoch)
        if fresh and self.bus is not None:
            await self._republish()
        self._renew_due = time.monotonic() + self.lease_ttl_s / 3
        await self._ensure_current()
        return True

    async def _ensure_current(self) -> None:
        """Rebuild stale projections once per lease epoch (retried until it succeeds)."""
        if self._checked_epoch != self.epoch:
            await self.rebuild_stale()
            self._checked_epoch = self.epoch

    async def rebuild_stale(self) -> list[str]:
        """Reproject every projection with checkpoints of another projector version.

        Bumping a projector's ``version`` means "rebuild": folding only new events onto a
        document made by the old version would be wrong, so the whole projection is refolded
        (up to the lease cursor) and rewritten, under the lease row lock, before any batch.

        Returns:
            The projections rebuilt.
        """
        async with self.engine.connect() as conn:
            held = (await conn.execute(_VERSIONS_HELD)).all()
        stale = sorted(
            name
            for name, version in held
            if name in self.projection.projectors
            and self.projection.projectors[name].version != version
        )
        for name in stale:
            outcome = await reproject(
                self.engine,
                projectors=self.projection.projectors.values(),
                projection=name,
                worker=self.name,
            )
            self._cache.clear()
            log.warning(
                "projection_rebuilt",
                projection=name,
                version=self.projection.projectors[name].version,
                rewritten=len(outcome.rewritten),
            )
        return stale

    async def renew(self) -> None:
        """Extend the lease. Raises :class:`LeaseLost` if it was taken over."""
        async with self.engine.begin() as conn:
            result = await conn.execute(_RENEW, self._lease_params())
        if result.rowcount != 1:
            self._lost()

    async def release(self) -> None:
        """Give the lease up (if still ours) so a standby takes over without waiting."""
        if not self.epoch:
            return
        async with self.engine.begin() as conn:
            await conn.execute(_RELEASE, self._lease_params())
        self.epoch = 0

    def _lease_params(self) -> dict[str, object]:
        return {
            "name": self.name,
            "holder": self.holder,
            "epoch": self.epoch,
            "ttl": self.lease_ttl_s,
        }

    async def _republish(self) -> None:
        """Publish what the bus missed (a predecessor died between commit and publish)."""
        assert self.bus is not None
        try:
            await self.bus.republish(self.engine)
        except (ConnectionError, TimeoutError, OSError, DBAPIError) as exc:
            log.warning("bus_republish_failed", name=self.name, error=type(exc).__name__)

    async def _publish(self, written: Written, epoch: str) -> None:
        """Publish a committed batch's changes to the bus (failures only logged)."""
        assert self.bus is not None
        at = time.time()
        changes = [
            BusChange(
                epoch=epoch,
                row=DocRow(
                    doc_key=u.doc_key,
                    projection=u.projection,
                    version=u.version,
                    watermark=w,
                    content_hash=u.content_hash,
                    body=u.canonical,
                ),
                committed_at=at,
            )
            for u, w in written.updates
        ]
        try:
            await self.bus.publish(changes)
        except (ConnectionError, TimeoutError, OSError) as exc:
            log.warning("bus_publish_failed", name=self.name, error=type(exc).__name__)

    def _lost(self) -> NoReturn:
        epoch, self.epoch = self.epoch, 0
        self._cache.clear()
        self._cache_at = -1
        log.warning("projector_lease_lost", name=self.name, holder=self.holder, epoch=epoch)
        raise LeaseLost(self.name, f"projector lease {self.name!r} was taken over")

    # -- batches -----------------------------------------------------------------------------

    async def _pause(self, stage: str, conn: AsyncConnection | None) -> None:
        """A seam for fault tests: called at ``read``, ``locked`` and ``written`` (in the
        transaction) and ``committed`` (after the commit, before publishing; no connection)."""

    async def run_once(self) -> int:
        """Project one batch in one transaction.

        Acquires the lease first if this worker holds none.

        Returns:
            Events consumed (folded, skipped or ignored); 0 when caught up.

        Raises:
            LeaseLost: the lease was taken over; nothing of the batch was committed.
            LeaseBusyError: the lease is held by another live worker.
            sqlalchemy.exc.DBAPIError: the database failed; nothing of the batch committed.
        """
        if not self.epoch and not await self.acquire():
            raise LeaseBusyError(self.name, f"projector lease {self.name!r} is held elsewhere")
        await self._ensure_current()
        while True:
            consumed = await self._batch()
            if consumed is not None:
                return consumed

    async def _batch(self) -> int | None:
        ahead = await self._take_ahead()
        try:
            return await self._write_batch(ahead)
        except BaseException:
            await self._drop_ahead()
            raise

    @contextlib.asynccontextmanager
    async def _transaction(self, *, ahead: bool = False) -> AsyncIterator[AsyncConnection]:
        """A transaction for a batch or a stall check (``ahead``: for the look-ahead's reads).

        Inside :meth:`run` and :meth:`catch_up`, on a connection the worker keeps between
        batches (one for batches and stall checks, one for the look-ahead, which runs while a
        batch writes): no pool checkout, no pre-ping round trip and no reset on return, which
        cost ~0.4 ms of CPU per batch (a batch of a few events is ~2 ms). Before each use it is
        checked without a round trip (``engine.looks_usable``: open, idle, nothing waiting
        on its socket, as a terminated backend leaves); after any error it is closed, and the
        next transaction takes a new one. Elsewhere (:meth:`run_once` alone), a pooled one.
        """
        if not self._keeping:
            async with self.engine.begin() as pooled:
                yield pooled
            return
        conn = self._kept_ahead if ahead else self._kept
        if conn is not None and (conn.closed or not looks_usable(await driver_of(conn))):
            await self._drop_kept(ahead=ahead)
            conn = None
        if conn is None:
            conn = await self.engine.connect()
            if ahead:
                self._kept_ahead = conn
            else:
                self._kept = conn
        try:
            async with conn.begin():
                yield conn
        except BaseException:
            await self._drop_kept(ahead=ahead)
            raise

    async def _drop_kept(self, *, ahead: bool | None = None) -> None:
        """Close a kept connection (``ahead``: the look-ahead's; ``None``: both)."""
        if ahead is None:
            await self._drop_kept(ahead=False)
            await self._drop_kept(ahead=True)
            return
        if ahead:
            conn, self._kept_ahead = self._kept_ahead, None
        else:
            conn, self._kept = self._kept, None
        if conn is not None:
            with contextlib.suppress(DBAPIError, OSError):
                await conn.close()

    @contextlib.asynccontextmanager
    async def _keeping_connection(self) -> AsyncIterator[None]:
        """Batches inside this block share a kept connection (see :meth:`_transaction`)."""
        self._keeping += 1
        try:
            yield
        finally:
            self._keeping -= 1
            if not self._keeping:
                await self._drop_ahead()  # before its connection closes under it
                await self._drop_kept()

    async def _write_batch(self, ahead: _Ahead | None) -> int | None:
        self._read_held = None  # known only after a read of our own (not a look-ahead's)
        async with self._transaction() as conn:
            if ahead is None:
                found = await run_on_driver(
                    conn, _READ_BATCH, {"name": self.name, "n": self.batch_size}
                )
                if not found or found[0][0] != self.holder or found[0][1] != self.epoch:
                    self._lost()
                cursor = LogCursor(tx_id=found[0][2], position=found[0][3])
                rows = [row[4:11] for row in found] if found[0][4] is not None else []
                events, after = log_events(rows, cursor)
                self._read_held = bool(found[0][11])
            else:  # read (and folded) while the previous batch was being written
                cursor, events, after = ahead.cursor, ahead.events, ahead.after
            await self._pause("read", conn)
            if not events:
                # Idle: no lock and no write (no transaction id burnt) unless renewal is due.
                if time.monotonic() >= self._renew_due:
                    if (await conn.execute(_RENEW, self._lease_params())).rowcount != 1:
                        self._lost()
                    self._renew_due = time.monotonic() + self.lease_ttl_s / 3
                return 0
            locked = await run_on_driver(conn, _LOCK_LEASE, {"name": self.name})
            if not locked:
                self._lost()
            holder, epoch, tx, position, last = locked[0]
            if holder != self.holder or epoch != self.epoch:
                self._lost()
            if (tx, position) != (cursor.tx_id, cursor.position):
                return None  # our own earlier incarnation moved it; read again
            last = int(last)  # read after the watermark lock was granted
            await self._pause("locked", conn)
            if ahead is not None and ahead.result is not None and ahead.based_at == last:
                result = ahead.result  # nobody wrote a document since its states were taken
                folded_ahead = 1
            else:
                states = await self._states(conn, self.projection.route(events), last)
                result = self.projection.apply(events, states)
                folded_ahead = 0
            folded = result.states  # each document's state once this batch commits
            if len(events) == self.batch_size and self.look_ahead:
                # More is probably waiting: read and fold it while this batch is written.
                self._ahead = asyncio.ensure_future(self._look_ahead(after, folded, last))
            advance = LeaseAdvance(self.name, after.tx_id, after.position, self.lease_ttl_s)
            written = await write_batch(  # and the lease cursor, in the same statement
                conn, result.updates, result.checkpoints, locked_at=last, advance=advance
            )
            epoch_now = ""
            if self.bus is not None and written.updates:  # read by the write when it advanced
                epoch_now = written.epoch or await log_epoch(conn)
            await self._pause("written", conn)
        await self._pause("committed", None)
        if self.bus is not None and written.updates:
            await self._publish(written, epoch_now)
        self._renew_due = time.monotonic() + self.lease_ttl_s / 3  # write_batch renewed it
        self._remember(folded, written.last_watermark)
        if written.updates:
            self.watermark = written.last_watermark
        self.applied += len(events)
        self.folded_ahead += folded_ahead
        return len(events)

    async def _look_ahead(
        self, after: LogCursor, folded: Mapping[DocId, DocumentState], last: int
    ) -> _Ahead:
        """Read the batch after ``after`` and fold it onto the states ``folded`` leaves.

        Runs on a second connection (kept between batches, as the batch's) while the batch
        that produced ``current`` is being written (``folded``: its documents' states after
        it; its transaction holds the watermark lock, taken at watermark ``last``), so the
        fold's CPU overlaps Postgres executing that write. Nothing here writes or is trusted
        blindly: the next batch uses the events only if the lease cursor still equals
        ``after`` (checked under the lease row lock), and the fold only if the last watermark
        is still the one this batch will leave (nobody else wrote a document since).

        The events are final: they are read below this read's own snapshot xmin (DESIGN.md
        rule 1), exactly as a batch reads them. Document states come, in this order, from
        ``folded`` (what this batch writes), the cache (when exact at ``last``), or the
        database: a document not in ``folded`` cannot change before the next batch locks
        the watermarks without raising the last watermark, which voids the fold.
        """
        based_at = last + len(folded)
        async with self._transaction(ahead=True) as conn:
            events, upto = await read_committed(conn, after, self.batch_size)
            if not events:
                return _Ahead(after, events, upto, None, based_at)
            ids = self.projection.route(events)
            cache = self._cache if self._cache_at in {last, based_at} else {}
            states: dict[DocId, DocumentState] = {}
            missing: list[DocId] = []
            for doc_id in ids:
                state = folded.get(doc_id) or cache.get(doc_id)
                if state is None:
                    missing.append(doc_id)
                else:
                    states[doc_id] = state
            if missing:
                states.update(await load_states(conn, missing))
        return _Ahead(after, events, upto, self.projection.apply(events, states), based_at)

    async def _take_ahead(self) -> _Ahead | None:
        """The look-ahead's batch, or None (none started, or it failed: the batch reads)."""
        task, self._ahead = self._ahead, None
        if task is None:
            return None
        try:
            return await task
        except Exception as exc:  # noqa: BLE001 - the batch redoes the work and meets it
            log.debug("projector_look_ahead_failed", name=self.name, error=type(exc).__name__)
            return None

    async def _drop_ahead(self) -> None:
        """Cancel a look-ahead in flight (its batch failed, or the worker stops)."""
        task, self._ahead = self._ahead, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _states(
        self, conn: AsyncConnection, ids: list[DocId], last: int
    ) -> dict[DocId, DocumentState]:
        """Document states for a batch: from memory when still exact, else from the database.

        Every document writer allocates watermarks under the watermark lock, so when the last
        watermark is still the one our previous batch committed, nobody else has written a
        document since and the cached states are exact. Otherwise the cache is dropped.
        (Writing checkpoints alone, e.g. ``PostgresCheckpointStore.put_many`` by hand while a
        worker runs, bypasses this; restart the worker after such surgery, or use
        :func:`oa_sync_server.postgres.admin.reproject`, which allocates watermarks.)
        """
        if last != self._cache_at:
            self._cache.clear()
        missing = [i for i in ids if i not in self._cache]
        states = {i: self._cache[i] for i in ids if i in self._cache}
        if missing:
            states.update(await load_states(conn, missing))
        return states

    def _remember(self, folded: Mapping[DocId, DocumentState], at: int) -> None:
        if not self.cache_size:
            return
        if len(self._cache) + len(folded) > self.cache_size:
            self._cache.clear()
        self._cache.update(folded)
        self._cache_at = at

    async def catch_up(self, *, wait_s: float | None = 60.0) -> int:
        """Run batches until every event committed before this call is projected.

        Transaction ids are cluster-wide, so a transaction still open anywhere on the server
        (even in another database) can hold the read horizon back; this waits for every
        transaction in flight at the call to end, then drains the log.

        Args:
            wait_s: most seconds to wait for those transactions (``None``: no limit).

        Returns:
            The events consumed in total.

        Raises:
            TimeoutError: transactions in flight at the call were still open after ``wait_s``.
            LeaseLost, LeaseBusyError: as for :meth:`run_once`.
        """
        async with self.engine.connect() as conn:
            target = (await conn.execute(_HORIZON)).scalar_one()
        total = 0
        async with self._keeping_connection():
            async with asyncio.timeout(wait_s):
                while True:
                    consumed = await self.run_once()
                    total += consumed
                    if consumed:
                        continue
                    async with self.engine.connect() as conn:
                        if (await conn.execute(_PASSED, {"target": target})).scalar_one():
                            break
                    await asyncio.sleep(0.01)  # an open transaction elsewhere holds the horizon
            while consumed := await self.run_once():
                total += consumed
        return total

    # -- the loop ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Project until ``stop`` is set: lease, LISTEN hint, poll fallback, back-off.

        Stands by while another worker holds the lease; releases it on the way out.
        """
        self._follower.start()
        retry = Backoff(_RETRY_BACKOFF)
        held = Backoff(_HELD_BACKOFF)
        renew_every = self.lease_ttl_s / 3
        try:
            async with self._keeping_connection():  # batches and stall checks share one
                await self._loop(stop, retry, held, renew_every)
        finally:
            await self._drop_ahead()
            await self._follower.stop()
            with contextlib.suppress(DBAPIError, OSError):
                await self.release()

    async def _loop(
        self, stop: asyncio.Event, retry: Backoff, held: Backoff, renew_every: float
    ) -> None:
        """:meth:`run`'s loop, until ``stop`` is set."""
        while not stop.is_set():
            try:
                if not self.epoch and not await self.acquire():
                    await self._note_silent_lease()
                    await self._wait(stop, min(renew_every, self.poll_interval_s))
                    continue
                if consumed := await self.run_once():
                    retry.reset()
                    held.reset()
                    self._blocked_since = None  # progress: nothing is held
                    if consumed >= self.batch_size:
                        continue  # a full batch: more is probably waiting
                    if self._follower.hint.is_set():
                        # Appends committed since the batch read: read them now (the hint
                        # is cleared first, so one arriving during the read counts).
                        self._follower.hint.clear()
                        continue
                # Caught up, or a partial batch and no hint since: everything final after
                # the cursor was read (below its snapshot's xmin), so what is left is in
                # flight (its commit hint will wake us) or held behind the horizon (the
                # check below); an immediate read would find nothing.
                await self._maybe_prune()
                idle_s = min(renew_every, self.poll_interval_s)
                if await self._check_stall():
                    # Committed events wait behind the horizon: its clearing sends no hint,
                    # so look again soon (every 5 ms for 100 ms, then 10 ms doubling, with
                    # jitter) rather than at the next append or poll.
                    since = self._blocked_since
                    if since is not None and time.monotonic() - since < _HELD_STEADY_S:
                        idle_s = min(idle_s, _HELD_STEADY_EVERY_S)
                    else:
                        idle_s = min(idle_s, held.next_delay() or idle_s)
                else:
                    held.reset()
                await self._wait(stop, idle_s)
            except LeaseError:
                continue
            except (DBAPIError, OSError) as exc:
                log.warning("projector_batch_failed", name=self.name, error=type(exc).__name__)
                await self._wait(stop, retry.next_delay() or _RETRY_BACKOFF.cap_s)

    async def _note_silent_lease(self) -> None:
        """Standing by: warn once per holder when the lease's holder stopped renewing it."""
        async with self.engine.connect() as conn:
            lease = await read_lease(conn, self.name)
        if lease is None or not lease.silent:
            return
        seen = (lease.holder, lease.expires_at)
        if seen != self._lease_warned:
            self._lease_warned = seen
            log.warning(
                "projector_lease_waiting",
                name=self.name,
                held_by=lease.holder,
                until=lease.expires_at.isoformat() if lease.expires_at else None,
                silent_s=round(lease.heartbeat_age_s, 1),
            )

    async def _check_stall(self) -> bool:
        """After a batch that was not full: whether committed events wait behind the read
        horizon (or were committed since the batch read: a hint for them is on its way).
        Answered without a query when the batch's own read saw none waiting (``held``).

        When they have waited ``stall_warn_after_s``, the backend holding the horizon is looked
        up (at most once a second) and named in a warning.
        """
        if self._read_held is False:
            # The batch's own read saw nothing waiting behind the horizon, and anything
            # committed since that read sends a hint: no second look (a transaction, three
            # round trips) after every batch that was not full.
            pending = False
        else:
            async with self._transaction() as conn:
                pending = bool((await conn.execute(_PENDING, {"name": self.name})).scalar_one())
        now = time.monotonic()
        if not pending:
            if self._stall_warned is not None:
                log.info("projection_resumed", name=self.name)
            self._blocked_since = self._stall_warned = None
            return False
        if self._blocked_since is None:
            self._blocked_since = now
        if now - self._blocked_since < self.stall_warn_after_s or now < self._stall_check_due:
            return True
        self._stall_check_due = now + _STALL_CHECK_EVERY_S
        async with self.engine.connect() as conn:
            holder = await read_horizon_holder(conn)
        pid = holder.pid if holder is not None else None
        if self._stall_warned is not None:
            warned_pid, next_at = self._stall_warned
            if warned_pid == pid and now < next_at:
                return True
        self._stall_warned = (pid, now + STALL_WARN_EVERY_S)
        fields = holder.log_fields() if holder is not None else {"blocking_pid": None}
        if holder is None:
            hint = "no open transaction found: look for a prepared one (pg_prepared_xacts)"
        elif not holder.visible:
            hint = "its age and state are hidden from this role: grant it pg_read_all_stats"
        else:
            hint = "an open transaction holds the read horizon: end it (pg_terminate_backend)"
        log.warning(
            "projection_stalled",
            name=self.name,
            waiting_s=round(now - self._blocked_since, 1),
            hint=hint,
            **fields,
        )
        return True

    async def _maybe_prune(self) -> None:
        if self.retention_s is None or time.monotonic() < self._next_prune:
            return
        self._next_prune = time.monotonic() + min(self.retention_s / 10, 3600.0)
        retained = await prune_changes(self.engine, older_than_s=self.retention_s)
        log.debug("changes_pruned", name=self.name, retained_from=retained)

    async def _wait(self, stop: asyncio.Event, seconds: float) -> None:
        """Until an append hint arrives (:class:`LogFollower`), ``stop`` is set, or ``seconds``
        pass."""
        await self._follower.wait(stop, seconds)
