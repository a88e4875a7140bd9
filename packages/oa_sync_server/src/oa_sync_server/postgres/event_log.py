"""The Postgres event log: batch appends (own or caller's transaction) and gap-safe reads.

Appends. :meth:`PostgresEventLog.append` refuses a batch over ``max_events``
(:class:`~oa_sync_core.AppendLimitError`), validates every event with
:func:`oa_sync_core.validate_new_event` before touching the database, then makes one call of
``oa_sync.append_events`` (migrations ``0004_append_function`` and
``0006_append_without_keys``), one round trip, which:

1. takes ``pg_advisory_xact_lock`` on the *lock bucket* of every stream and idempotency key of
   the batch (a CRC-32 of the name modulo :data:`LOCK_BUCKETS`), in sorted order, so
   concurrent appenders cannot deadlock and a key's row or a stream's last row read next is
   final; queues ``pg_notify('oa_sync_events', '')`` (transactional: delivered only on
   commit). A bucket stands for every name hashed to it, so one append holds at most
   :data:`LOCK_BUCKETS` locks whatever it touches (one lock per stream exhausted Postgres' lock
   table, ``max_locks_per_transaction``, on imports of 10,000 runs); two appends to different
   streams of the same bucket merely run one after the other;
2. in one statement, with a snapshot taken after the locks: reads each stream's last
   ``(stream_seq, tx_id)`` and the idempotency keys seen before, and plans the batch exactly as
   :func:`oa_sync_core.plan_append` does (a test drives both with the same random batches): a
   last row written by a *newer* transaction than ours is reported and becomes
   :class:`StreamOrderConflict` (the per-stream order guard: it keeps log order,
   ``(tx_id, position)``, equal to ``stream_seq`` order within each stream); an
   ``expected_seq`` mismatch becomes :class:`~oa_sync_core.ConcurrencyError`; either way
   nothing is written and no SQL error is raised (a caller's transaction stays usable);
   otherwise it inserts the rows in batch order (positions follow it) and returns every
   event's position, a replayed key's being the original one. A batch without any
   idempotency key (the common case) takes a shorter statement: no key lookups, no replay
   numbering, and the positions are the inserted rows' in order, with no join back to the batch.

The batch travels as one ``jsonb`` parameter whatever its size (an unset ``expected_seq`` or
``idempotency_key`` is left out), the lock buckets as one ``int[]`` literal. With ``conn=None``
the call is one autocommit statement (its own transaction: no BEGIN and COMMIT round trips); an
append it refuses (order conflict, ``expected_seq``) then still commits its NOTIFY, a spurious
hint that listeners already tolerate (DESIGN.md rule 5).

One way to run it. An own-transaction append (``conn=None``) always runs the statement on a
psycopg connection itself, with bound parameters (prepared by psycopg after a few uses): a kept
one (below) or, by default, the driver connection of a pooled one, checked out (with the
engine's pre-ping) and set to autocommit for the call. Per 1,000-event append, the pooled path
cost ~1 ms more than a kept connection: checkout with pre-ping ~0.45 ms, autocommit on and off
~0.25 ms, SQLAlchemy's execution ~0.35 ms; psycopg's Python dumper of the bucket list cost
another ~0.4 ms on both. Database errors of an own-transaction append are therefore psycopg's
(``psycopg.Error``; a broken pooled connection is invalidated); an append in a caller's
transaction (``conn``) runs through that SQLAlchemy connection and raises SQLAlchemy's.

Kept connection (``keep_connection=True``, what the server uses). Then an own-transaction
append runs on an autocommit psycopg connection the log keeps (at most :data:`KEPT_CONNECTIONS`,
made by the engine's own pool and detached from it, as ``read_model.CatchUpReads`` keeps its
reads'): one round trip per append, with no pool checkout, no pre-ping round trip and no
SQLAlchemy statement machinery. On an idle server the pre-ping's extra round trip and that
Python cost about 1.3 ms of a 3 ms append (``docs/benchmarks.md``). Instead of the ping, a
kept connection is checked without a round trip before each use: closed, broken, inside a
transaction, or with bytes waiting on its socket while idle (a terminated backend's last
message or its EOF) means it is closed and another is taken. A connection error *during* the
append is never retried (the statement may have committed): the connection is dropped and the
error propagates (the server answers 503), as with a pooled connection. When every kept
connection is busy, the append takes a pooled connection. :meth:`close` closes them.

With ``conn=None`` the log retries a few times on
:class:`StreamOrderConflict` or a unique violation; with a caller's connection (the outbox
pattern) those errors propagate and the caller retries in a new transaction.

Reads (DESIGN.md rule 1). Events are read in log order ``(tx_id, position)`` and only below
``pg_snapshot_xmin(pg_current_snapshot())``: every transaction below that horizon has ended, so
nothing can still appear behind the cursor, and rolled-back holes are simply never seen. No
clock is involved. A transaction holding an xid open for long holds the horizon back (the
projector then waits for it; it never skips it).

What this is not: the projector (:mod:`oa_sync_server.worker`) or the read model.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import zlib
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, Final

import orjson
import psycopg
import sqlalchemy as sa
from oa_sync_core import Event, NewEvent, validate_new_event
from oa_sync_core.errors import ConcurrencyError
from oa_sync_core.events import MAX_APPEND_EVENTS, check_append_size
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from oa_sync_server.errors import StreamOrderConflict
from oa_sync_server.postgres.engine import detached_connection, driver_of, looks_usable
from oa_sync_server.postgres.tables import EVENTS_CHANNEL, events

__all__ = [
    "KEPT_CONNECTIONS",
    "LOCK_BUCKETS",
    "BoundedLog",
    "LogCursor",
    "PostgresEventLog",
    "StreamOrderConflict",
    "lock_buckets",
    "log_events",
    "read_committed",
]

"""NOTIFY channel hinting that events were appended (carries no data)."""

LOCK_BUCKETS: Final = 256
"""Advisory lock buckets of the append guard: the most locks one append transaction holds."""
KEPT_CONNECTIONS: Final = 2
"""Most autocommit connections a log with ``keep_connection=True`` keeps for its appends."""
_LOCK_SPACE: Final = 0x6F61  # the first key of the two-key advisory locks ("oa")

_LOCK = sa.text(
    # Sorted buckets, locked in array order; then our xid and the (commit-time) hint.
    "SELECT (SELECT count(pg_advisory_xact_lock(:space, b)) "
    "FROM unnest(CAST(:buckets AS int[])) AS b), "
    "CAST(CAST(pg_current_xact_id() AS text) AS bigint), "
    "pg_notify(:channel, '')"
).bindparams(channel=EVENTS_CHANNEL)
_APPEND = sa.text(
    # The whole append in one call (migration 0004): bucket locks, NOTIFY, plan, insert.
    "SELECT status, positions, CAST(detail AS text) "
    "FROM oa_sync.append_events(:space, CAST(:buckets AS int[]), CAST(:rows AS jsonb))"
)
_APPEND_OWN: Final = (  # _APPEND on a psycopg connection (own transaction: bound parameters)
    "SELECT status, positions, CAST(detail AS text) "
    "FROM oa_sync.append_events(%s, CAST(%s AS int[]), CAST(%s AS jsonb))"
)
_READ = sa.text(
    "SELECT position, stream_id, stream_seq, type, CAST(payload AS text) AS payload, recorded_at, "
    "CAST(CAST(tx_id AS text) AS bigint) AS tx "
    "FROM oa_sync.events "
    "WHERE (tx_id, position) > (CAST(CAST(:tx AS text) AS xid8), :pos) "
    "AND tx_id < pg_snapshot_xmin(pg_current_snapshot()) "
    "AND (tx_id, position) <= (CAST(CAST(:upto_tx AS text) AS xid8), :upto_pos) "
    "ORDER BY tx_id, position LIMIT :n"
).columns(
    sa.column("position", sa.BigInteger),
    sa.column("stream_id", sa.Text),
    sa.column("stream_seq", sa.BigInteger),
    sa.column("type", sa.Text),
    sa.column("payload", sa.Text),
    sa.column("recorded_at", sa.DateTime(timezone=True)),
    sa.column("tx", sa.BigInteger),
)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, order=True)
class LogCursor:
    """A place in log order: everything at or before ``(tx_id, position)`` has been read.

    Attributes:
        tx_id: the ``xid8`` of the last event's transaction (0 at the start).
        position: the last event's position (0 at the start).
    """

    tx_id: int = 0
    position: int = 0


_END: Final = 2**63 - 1


async def read_committed(
    conn: AsyncConnection, after: LogCursor, limit: int, *, upto: LogCursor | None = None
) -> tuple[list[Event], LogCursor]:
    """Up to ``limit`` final events after ``after``, in log order.

    Args:
        conn: any connection (a read in its own statement snapshot).
        after: the cursor to read after.
        limit: most events to return.
        upto: read nothing past this cursor (e.g. a projector's, to compare a read model
            with exactly the part of the log it has folded).

    Returns:
        The events and the cursor after the last of them (``after`` when there are none).
    """
    end = upto or LogCursor(tx_id=_END, position=_END)
    params = {
        "tx": after.tx_id,
        "pos": after.position,
        "upto_tx": end.tx_id,
        "upto_pos": end.position,
        "n": limit,
    }
    return log_events((await conn.execute(_READ, params)).all(), after)


def log_events(rows: Sequence[Sequence[Any]], after: LogCursor) -> tuple[list[Event], LogCursor]:
    """Events from rows of the log read in log order, and the cursor after the last.

    Args:
        rows: ``(position, stream_id, stream_seq, type, payload as JSON text, recorded_at,
            tx_id as an integer)`` each, as :func:`read_committed` selects them.
        after: the cursor the rows were read after (returned when there are none).
    """
    loads, make = orjson.loads, Event.from_log  # our own rows: the schema holds the invariants
    found = [  # positional unpacking (rows are tuples): a read is up to 20,000 rows
        make(position, stream_id, stream_seq, kind, loads(payload), recorded_at)
        for position, stream_id, stream_seq, kind, payload, recorded_at, _ in rows
    ]
    cursor = LogCursor(tx_id=rows[-1][6], position=rows[-1][0]) if rows else after
    return found, cursor


class PostgresEventLog:
    """The event log in ``oa_sync.events``; an :class:`~oa_sync_core.EventSource`.

    Args:
        engine: the async engine.
        retries: attempts of an own-transaction append on an order conflict.
        max_events: the largest batch :meth:`append` takes.
        keep_connection: run own-transaction appends on kept autocommit connections (see the
            module docstring); the owner then calls :meth:`close`.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        retries: int = 5,
        max_events: int = MAX_APPEND_EVENTS,
        keep_connection: bool = False,
    ) -> None:
        self.engine = engine
        self.retries = retries
        self.max_events = max_events
        self.keep_connection = keep_connection
        self._idle: list[psycopg.AsyncConnection[Any]] = []
        self._kept = 0  # connections made for keeping (idle or in use)
        self._closed = False

    async def close(self) -> None:
        """Close the kept connections (one in use is closed when its append returns)."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()

    async def append(
        self, events: Sequence[NewEvent], *, conn: AsyncConnection | None = None
    ) -> list[int]:
        """Validate then append a batch atomically.

        Args:
            events: the events, in order (at most ``max_events``).
            conn: a connection inside the caller's transaction (outbox pattern), or ``None`` to
                run (and commit) a transaction of the log's own.

        Returns:
            The position of each event; a replayed idempotency key gives the original position.

        Raises:
            AppendLimitError: more than ``max_events`` events; nothing was written.
            EventValidationError: an event is invalid; nothing was written.
            ConcurrencyError: an ``expected_seq`` does not match; nothing was written.
            StreamOrderConflict: (caller's transaction only) retry in a new transaction.
        """
        check_append_size(len(events), self.max_events)
        checked = [validate_new_event(e, index=i) for i, e in enumerate(events)]
        if not checked:
            return []
        buckets, rows = _statement_params(checked)
        if conn is not None:
            params = {"space": _LOCK_SPACE, "buckets": buckets, "rows": rows}
            return _outcome(*(await conn.execute(_APPEND, params)).one())
        attempt = 0
        while True:
            attempt += 1
            try:
                return _outcome(*await self._append_own(buckets, rows))
            except (StreamOrderConflict, psycopg.errors.UniqueViolation):
                if attempt >= self.retries:
                    raise

    async def _append_own(self, buckets: str, rows: str) -> tuple[str, list[int], str | None]:
        """One ``append_events`` call in its own transaction: on a kept connection when the
        log keeps them and one is free, else on a pooled one; either way the statement runs
        on the psycopg connection itself, in autocommit (one round trip)."""
        kept = await self._take() if self.keep_connection else None
        if kept is not None:
            return await self._run_kept(kept, buckets, rows)
        async with self.engine.connect() as own:
            auto = await own.execution_options(isolation_level="AUTOCOMMIT")
            driver = await driver_of(auto)
            try:
                return await _run(driver, buckets, rows)
            except psycopg.Error:
                if driver.broken or driver.closed:
                    await own.invalidate()  # SQLAlchemy did not see the error: tell the pool
                raise

    async def _take(self) -> psycopg.AsyncConnection[Any] | None:
        """An idle kept connection that looks usable, a new one, or ``None`` (all busy)."""
        while self._idle:
            conn = self._idle.pop()
            if looks_usable(conn):
                return conn
            self._kept -= 1
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()
        if self._closed or self._kept >= KEPT_CONNECTIONS:
            return None
        self._kept += 1
        try:
            conn = await detached_connection(self.engine)
        except BaseException:
            self._kept -= 1
            raise
        return conn

    async def _run_kept(
        self, conn: psycopg.AsyncConnection[Any], buckets: str, rows: str
    ) -> tuple[str, list[int], str | None]:
        """:func:`_run` on a kept connection, which is kept after an answer or a unique
        violation (an autocommit statement leaves it idle) and dropped after any other error.
        """
        keep = False
        try:
            answer = await _run(conn, buckets, rows)
            keep = True
            return answer
        except psycopg.errors.UniqueViolation:
            keep = True
            raise
        finally:
            if keep and not self._closed and looks_usable(conn):
                self._idle.append(conn)
            else:
                self._kept -= 1
                with contextlib.suppress(psycopg.Error, OSError):
                    await conn.close()

    async def lock_for(self, conn: AsyncConnection, events: Iterable[NewEvent]) -> None:
        """Take, up front, the append locks of every stream and key of ``events``.

        For a caller appending several batches in one transaction (an all-or-nothing import):
        locking the union first, in sorted order, keeps concurrent appenders deadlock-free
        (each later :meth:`append` re-takes locks it already holds, at no cost).
        """
        streams: set[str] = set()
        keys: set[str] = set()
        for event in events:  # not validated yet: str() keeps a bad one for append to name
            streams.add(str(event.stream_id))
            if event.idempotency_key is not None:
                keys.add(str(event.idempotency_key))
        await conn.execute(
            _LOCK, {"space": _LOCK_SPACE, "buckets": lock_buckets(sorted(streams), sorted(keys))}
        )

    async def read(self, after: LogCursor, limit: int) -> tuple[list[Event], LogCursor]:
        """:func:`read_committed` on a connection of the log's own."""
        async with self.engine.connect() as conn:
            return await read_committed(conn, after, limit)

    async def batches(self, *, batch_size: int) -> AsyncIterator[Sequence[Event]]:
        """Every final event in log order, ``batch_size`` at a time (the EventSource port).

        The next page is read (on a second connection) while the caller works on this one, so
        a rebuild's fold and Postgres' read overlap.
        """
        cursor = LogCursor()
        pending = asyncio.ensure_future(self.read(cursor, batch_size))
        try:
            while True:
                found, cursor = await pending
                if not found:
                    return
                pending = asyncio.ensure_future(self.read(cursor, batch_size))
                yield found
        finally:
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pending

    async def stream(self, stream_id: str) -> list[Event]:
        """Every committed event of one stream, in ``stream_seq`` order."""
        query = (
            sa.select(
                events.c.position,
                events.c.stream_id,
                events.c.stream_seq,
                events.c.type,
                events.c.payload,
                events.c.recorded_at,
            )
            .where(events.c.stream_id == stream_id)
            .order_by(events.c.stream_seq)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [
            Event(
                position=r.position,
                stream_id=r.stream_id,
                stream_seq=r.stream_seq,
                type=r.type,
                payload=r.payload,
                recorded_at=r.recorded_at,
            )
            for r in rows
        ]


class BoundedLog:
    """The committed log read on one connection (and its snapshot), optionally up to a cursor.

    An :class:`~oa_sync_core.EventSource` for drift checks and reprojection inside a
    transaction of the caller's: with ``upto`` set to a projector's cursor, it yields exactly
    the events that projector has folded.

    Args:
        conn: the connection to read on.
        upto: the last cursor to include (``None``: everything final).
    """

    def __init__(self, conn: AsyncConnection, upto: LogCursor | None = None) -> None:
        self.conn = conn
        self.upto = upto

    async def batches(self, *, batch_size: int) -> AsyncIterator[Sequence[Event]]:
        """Every event up to ``upto`` in log order, ``batch_size`` at a time."""
        cursor = LogCursor()
        while True:
            found, cursor = await read_committed(self.conn, cursor, batch_size, upto=self.upto)
            if not found:
                return
            yield found


def lock_buckets(streams: Iterable[str], keys: Iterable[str] = ()) -> list[int]:
    """The sorted, distinct advisory lock buckets guarding some streams and idempotency keys.

    Stable across processes and versions (CRC-32, not Python's salted ``hash``): every
    appender must map a name to the same bucket.
    """
    found = {zlib.crc32(b"s:" + s.encode()) % LOCK_BUCKETS for s in streams}
    found.update(zlib.crc32(b"k:" + k.encode()) % LOCK_BUCKETS for k in keys)
    return sorted(found)


async def _run(
    conn: psycopg.AsyncConnection[Any], buckets: str, rows: str
) -> tuple[str, list[int], str | None]:
    """The ``append_events`` call on an autocommit psycopg connection: its answer row."""
    cursor = await conn.execute(_APPEND_OWN, (_LOCK_SPACE, buckets, rows))
    row = await cursor.fetchone()
    assert row is not None
    return row[0], row[1], row[2]


def _statement_params(checked: Sequence[NewEvent]) -> tuple[str, str]:
    """The lock buckets (an ``int[]`` literal) and the rows (``jsonb`` text) of a batch.

    The rows leave out an ``expected_seq`` or ``idempotency_key`` that is not set (the function
    reads a missing key as ``NULL``): less to send and parse.
    """
    streams: set[str] = set()
    keys: set[str] = set()
    rows: list[dict[str, Any]] = []
    for e in checked:
        streams.add(e.stream_id)
        row: dict[str, Any] = {"stream_id": e.stream_id, "type": e.type, "payload": e.payload}
        if e.expected_seq is not None:
            row["expected_seq"] = e.expected_seq
        if e.idempotency_key is not None:
            row["idempotency_key"] = e.idempotency_key
            keys.add(e.idempotency_key)
        rows.append(row)
    literal = "{" + ",".join(map(str, lock_buckets(streams, keys))) + "}"
    return literal, orjson.dumps(rows).decode()


def _outcome(status: str, positions: list[int], detail: str | None) -> list[int]:
    """The positions of an ``ok`` answer of ``append_events``; else its error."""
    if status == "ok":
        return list(positions)
    found = orjson.loads(detail or "{}")
    if status == "order":
        raise StreamOrderConflict(found["stream"], found["seq"])
    raise ConcurrencyError(found["stream"], found["expected"], found["actual"])
