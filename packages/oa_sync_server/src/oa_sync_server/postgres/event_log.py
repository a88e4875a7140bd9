"""The Postgres event log: batch appends (own or caller's transaction) and gap-safe reads.

Appends. :meth:`PostgresEventLog.append` validates every event with
:func:`oa_sync_core.validate_new_event` before touching the database, then, in one
transaction:

1. takes ``pg_advisory_xact_lock`` on every stream and idempotency key of the batch, in sorted
   order (so concurrent appenders cannot deadlock, and a key or a stream's last row read next
   is final);
2. looks up idempotency keys seen before (their original positions are returned, nothing is
   written for them, also for a key repeated inside the batch);
3. reads each stream's last ``(stream_seq, tx_id)``: an ``expected_seq`` mismatch raises
   :class:`~oa_sync_core.ConcurrencyError`; a last row written by a *newer* transaction than
   ours raises :class:`StreamOrderConflict` (the per-stream order guard: it keeps log order,
   ``(tx_id, position)``, equal to ``stream_seq`` order within each stream);
4. inserts the batch with one ``INSERT ... SELECT FROM jsonb_to_recordset(:rows) RETURNING``
   (one bound parameter whatever the batch size; positions follow batch order);
5. ``pg_notify('oa_sync_events', '')`` — transactional, so it is delivered only on commit.

With ``conn=None`` the log runs its own transaction and retries a few times on
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

import dataclasses
from collections.abc import AsyncIterator, Sequence
from typing import Any, Final

import orjson
import sqlalchemy as sa
from oa_sync_core import ConcurrencyError, Event, NewEvent, validate_new_event
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from oa_sync_server.errors import StreamOrderConflict
from oa_sync_server.postgres.tables import events

__all__ = [
    "EVENTS_CHANNEL",
    "BoundedLog",
    "LogCursor",
    "PostgresEventLog",
    "StreamOrderConflict",
    "read_committed",
]

EVENTS_CHANNEL: Final = "oa_sync_events"
"""NOTIFY channel hinting that events were appended (carries no data)."""

_LOCK = sa.text(
    "SELECT count(pg_advisory_xact_lock(hashtextextended(k, 0))) "
    "FROM (SELECT k FROM unnest(CAST(:keys AS text[])) AS k ORDER BY k) AS sorted_keys"
)
_MY_XID = sa.text("SELECT CAST(CAST(pg_current_xact_id() AS text) AS bigint)")
_LAST_SEQ = sa.text(
    # One backward index probe per stream (not a scan of the stream's whole history).
    "SELECT s.stream_id, e.stream_seq, CAST(CAST(e.tx_id AS text) AS bigint) "
    "FROM unnest(CAST(:streams AS text[])) AS s(stream_id) CROSS JOIN LATERAL ("
    "SELECT stream_seq, tx_id FROM oa_sync.events WHERE stream_id = s.stream_id "
    "ORDER BY stream_seq DESC LIMIT 1) AS e"
)
_KNOWN_KEYS = sa.text(
    "SELECT idempotency_key, position FROM oa_sync.events "
    "WHERE idempotency_key = ANY(CAST(:keys AS text[]))"
)
_NOTIFY = sa.text("SELECT pg_notify('oa_sync_events', '')")
_INSERT = sa.text(
    "INSERT INTO oa_sync.events (stream_id, stream_seq, type, payload, idempotency_key) "
    "SELECT stream_id, stream_seq, type, payload, idempotency_key "
    "FROM ROWS FROM (jsonb_to_recordset(CAST(:rows AS jsonb)) AS ("
    "stream_id text, stream_seq bigint, type text, payload jsonb, idempotency_key text)) "
    "WITH ORDINALITY AS x(stream_id, stream_seq, type, payload, idempotency_key, n) "
    "ORDER BY n "
    "RETURNING stream_id, stream_seq, position, idempotency_key"
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
    rows = (await conn.execute(_READ, params)).all()
    found = [
        Event(
            position=r.position,
            stream_id=r.stream_id,
            stream_seq=r.stream_seq,
            type=r.type,
            payload=orjson.loads(r.payload),
            recorded_at=r.recorded_at,
        )
        for r in rows
    ]
    cursor = LogCursor(tx_id=rows[-1].tx, position=rows[-1].position) if rows else after
    return found, cursor


class PostgresEventLog:
    """The event log in ``oa_sync.events``; an :class:`~oa_sync_core.EventSource`.

    Args:
        engine: the async engine.
        retries: attempts of an own-transaction append on an order conflict.
    """

    def __init__(self, engine: AsyncEngine, *, retries: int = 5) -> None:
        self.engine = engine
        self.retries = retries

    async def append(
        self, batch: Sequence[NewEvent], *, conn: AsyncConnection | None = None
    ) -> list[int]:
        """Validate then append a batch atomically.

        Args:
            batch: the events, in order.
            conn: a connection inside the caller's transaction (outbox pattern), or ``None`` to
                run (and commit) a transaction of the log's own.

        Returns:
            The position of each event; a replayed idempotency key gives the original position.

        Raises:
            EventValidationError: an event is invalid; nothing was written.
            ConcurrencyError: an ``expected_seq`` does not match; nothing was written.
            StreamOrderConflict: (caller's transaction only) retry in a new transaction.
        """
        checked = [validate_new_event(e, index=i) for i, e in enumerate(batch)]
        if not checked:
            return []
        if conn is not None:
            return await self._append(conn, checked)
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self.engine.begin() as own:
                    return await self._append(own, checked)
            except StreamOrderConflict:
                if attempt >= self.retries:
                    raise
            except IntegrityError as exc:
                if attempt >= self.retries or not _is_unique_violation(exc):
                    raise

    async def _append(self, conn: AsyncConnection, checked: list[NewEvent]) -> list[int]:
        streams = sorted({e.stream_id for e in checked})
        keys = sorted({e.idempotency_key for e in checked if e.idempotency_key is not None})
        await conn.execute(_LOCK, {"keys": [f"s:{s}" for s in streams] + [f"k:{k}" for k in keys]})
        known: dict[str, int] = {}
        if keys:
            known = {row[0]: row[1] for row in await conn.execute(_KNOWN_KEYS, {"keys": keys})}
        my_xid = (await conn.execute(_MY_XID)).scalar_one()
        last: dict[str, tuple[int, int]] = {
            row[0]: (row[1], row[2]) for row in await conn.execute(_LAST_SEQ, {"streams": streams})
        }
        seqs = {stream: seq for stream, (seq, _) in last.items()}
        for stream, (seq, tx) in last.items():
            if tx > my_xid:
                raise StreamOrderConflict(stream, seq)
        rows: list[dict[str, Any]] = []
        slots: list[tuple[str, int] | str] = []  # (stream, seq) to insert, or a known key
        batch_keys: set[str] = set()
        for event in checked:
            key = event.idempotency_key
            if key is not None and (key in known or key in batch_keys):
                slots.append(key)
                continue
            current = seqs.get(event.stream_id, 0)
            if event.expected_seq is not None and event.expected_seq != current:
                raise ConcurrencyError(event.stream_id, event.expected_seq, current)
            seqs[event.stream_id] = current + 1
            if key is not None:
                batch_keys.add(key)
            rows.append(
                {
                    "stream_id": event.stream_id,
                    "stream_seq": current + 1,
                    "type": event.type,
                    "payload": event.payload,
                    "idempotency_key": key,
                }
            )
            slots.append((event.stream_id, current + 1))
        placed: dict[tuple[str, int], int] = {}
        by_key: dict[str, int] = {}
        if rows:
            # One statement, one parameter: the batch as a JSON array, in batch order.
            found = await conn.execute(_INSERT, {"rows": orjson.dumps(rows).decode()})
            for row in found:
                placed[row.stream_id, row.stream_seq] = row.position
                if row.idempotency_key is not None:
                    by_key[row.idempotency_key] = row.position
        if rows:
            await conn.execute(_NOTIFY)
        return [
            known.get(slot, by_key.get(slot, 0)) if isinstance(slot, str) else placed[slot]
            for slot in slots
        ]

    async def read(self, after: LogCursor, limit: int) -> tuple[list[Event], LogCursor]:
        """:func:`read_committed` on a connection of the log's own."""
        async with self.engine.connect() as conn:
            return await read_committed(conn, after, limit)

    async def batches(self, *, batch_size: int) -> AsyncIterator[Sequence[Event]]:
        """Every final event in log order, ``batch_size`` at a time (the EventSource port)."""
        cursor = LogCursor()
        while True:
            found, cursor = await self.read(cursor, batch_size)
            if not found:
                return
            yield found

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


def _is_unique_violation(exc: IntegrityError) -> bool:
    return getattr(exc.orig, "sqlstate", None) == "23505"
