"""The Postgres write side of the read model: checkpoints, documents and the change log.

Two layers:

* connection-level functions (:func:`load_states`, :func:`write_updates`,
  :func:`put_checkpoints`) that run inside a transaction the caller owns — the projector worker
  and reprojection call these so documents, checkpoints, change rows and the lease cursor
  commit together (DESIGN.md rule 2);
* the port adapters :class:`PostgresCheckpointStore` (a core ``CheckpointStore``) and
  :class:`PostgresDocumentSink` (a core ``Sink`` and ``DocumentReader``), built on an engine
  (each call is its own transaction) or on a connection (each call joins its transaction).

Watermarks (rule 4). Every writer of documents takes the transaction-scoped advisory lock
:data:`WATERMARK_LOCK` before reading the highest watermark, so watermarks are handed out one
writer at a time, ``last + 1`` onwards with no gap, and in commit order (the lock is released
only at commit, after which the next writer's statements see the new rows). Each document
update gets exactly one change row; ``documents.watermark`` is the watermark of the document's
latest change. An update whose version is not newer than the stored one is dropped before any
watermark is assigned (a replayed batch writes nothing).

Bulk writes send the whole batch as one JSON array of positional rows (one layout for every
write, :data:`_ROWS`), expanded by ``jsonb_array_elements`` (document bodies spliced in as their
precomputed canonical bytes): one statement and one bound parameter per batch, whatever its
size, and no per-row Python escaping.

What this is not: the read side used by the sync server (:mod:`oa_sync_server.postgres.read_model`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, NamedTuple

import orjson
import sqlalchemy as sa
from oa_sync_core import Checkpoint, DocId, DocumentState, DocumentUpdate, StoredDocument
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from oa_sync_server.postgres.engine import DriverText, run_on_driver
from oa_sync_server.postgres.tables import (
    CHANGES_CHANNEL,
    CHANGES_HINT_SQL,
    EPOCH_SQL,
    checkpoints,
    documents,
)

__all__ = [
    "WATERMARK_LOCK",
    "LeaseAdvance",
    "PostgresCheckpointStore",
    "PostgresDocumentSink",
    "Written",
    "advance_lease",
    "load_checkpoints",
    "load_documents",
    "load_states",
    "lock_watermarks",
    "put_checkpoints",
    "write_batch",
    "write_updates",
]

"""NOTIFY channel carrying the new highest watermark after a commit (a hint, no data)."""

WATERMARK_LOCK: Final = 0x6F615F73796E63  # "oa_sync"
"""Advisory lock key serialising watermark allocation across every document writer."""

_LOCK_WATERMARKS = sa.text("SELECT oa_sync.lock_watermarks(:key)").bindparams(key=WATERMARK_LOCK)
"""The watermark lock, then the last watermark read with a snapshot that follows it, in one
call (migration 0008: the function's own statement takes a fresh snapshot)."""
_ROWS: Final = (
    # The one row layout of the set-based writes: a JSON array of positional rows
    # [doc_key, projection, version, watermark, content_hash, body, last_position,
    # projector_version] (see _row; a write reads the columns it needs, absent ones are NULL).
    # Positional arrays, not keyed objects: Postgres expanded 1,000 keyed rows with
    # jsonb_to_recordset in ~7 ms, these in ~4 ms (a smaller text to parse, no key lookups).
    "WITH r AS (SELECT e->>0 AS doc_key, e->>1 AS projection, CAST(e->>2 AS bigint) AS version, "
    "CAST(e->>3 AS bigint) AS watermark, e->>4 AS content_hash, e->5 AS body, "
    "CAST(e->>6 AS bigint) AS last_position, CAST(e->>7 AS integer) AS projector_version "
    "FROM jsonb_array_elements(CAST(:rows AS jsonb)) AS e)"
)
_UPSERT_DOCUMENTS: Final = (
    "d AS (INSERT INTO oa_sync.documents "
    "(doc_key, projection, version, watermark, content_hash, body, updated_at) "
    "SELECT doc_key, projection, version, watermark, content_hash, body, clock_timestamp() "
    "FROM r "
    "ON CONFLICT (doc_key) DO UPDATE SET projection = EXCLUDED.projection, "
    "version = EXCLUDED.version, watermark = EXCLUDED.watermark, "
    "content_hash = EXCLUDED.content_hash, body = EXCLUDED.body, "
    "updated_at = EXCLUDED.updated_at)"
)
_INSERT_CHANGES: Final = (
    "INSERT INTO oa_sync.changes (watermark, doc_key, projection, version, content_hash) "
    "SELECT watermark, doc_key, projection, version, content_hash FROM r"
)
_UPSERT_CHECKPOINT_ROWS: Final = (
    "INSERT INTO oa_sync.projection_checkpoints "
    "(projection, doc_key, last_position, projector_version, content_hash, version, updated_at) "
    "SELECT projection, doc_key, last_position, projector_version, content_hash, version, "
    "clock_timestamp() FROM r "
    "ON CONFLICT (projection, doc_key) DO UPDATE SET last_position = EXCLUDED.last_position, "
    "projector_version = EXCLUDED.projector_version, content_hash = EXCLUDED.content_hash, "
    "version = EXCLUDED.version, updated_at = EXCLUDED.updated_at"
)
_WRITE_ROWS: Final = (
    # The projector's batch: documents, their checkpoints and change rows from one parameter.
    f"{_ROWS}, {_UPSERT_DOCUMENTS}, c AS ({_UPSERT_CHECKPOINT_ROWS}), ch AS ({_INSERT_CHANGES})"
)
_HINT_SELECT: Final = f"SELECT {EPOCH_SQL}, pg_notify(:channel, {CHANGES_HINT_SQL})"
_ADVANCE_CTE: Final = (
    # The lease cursor and renewal; then, when the batch changed documents, the log epoch and
    # the commit-time hint naming it and the new watermark (a CTE and the final SELECT of a
    # projector statement; after the watermark lock, so the epoch is the batch's).
    "advanced AS (UPDATE oa_sync.projector_leases SET "
    "cursor_tx_id = CAST(CAST(:tx AS text) AS xid8), cursor_position = :pos, "
    "heartbeat_at = clock_timestamp(), "
    "expires_at = clock_timestamp() + make_interval(secs => :ttl) "
    "WHERE name = :name RETURNING 1)"
)
_ADVANCE_LEASE: Final = " ".join(
    (_ADVANCE_CTE, _HINT_SELECT, "FROM advanced WHERE CAST(:watermark AS text) IS NOT NULL")
)
# The statements, from the constant fragments above (composed once, at import; no value is
# ever spliced into SQL text: every value is a bound parameter).
_WRITE_DOCUMENTS_SQL: Final = f"{_ROWS}, {_UPSERT_DOCUMENTS} {_INSERT_CHANGES}"
_UPSERT_CHECKPOINTS_SQL: Final = f"{_ROWS} {_UPSERT_CHECKPOINT_ROWS}"
_WRITE_ONLY_SQL: Final = f"{_WRITE_ROWS} SELECT 1"
_WRITE_AND_ADVANCE_SQL: Final = f"{_WRITE_ROWS}, {_ADVANCE_LEASE}"
_ADVANCE_SQL: Final = f"WITH {_ADVANCE_LEASE}"
_WRITE_WITH_CHECKPOINTS = DriverText(sa.text(_WRITE_ONLY_SQL))
_WRITE_AND_ADVANCE = DriverText(sa.text(_WRITE_AND_ADVANCE_SQL).bindparams(channel=CHANGES_CHANNEL))
_ADVANCE = sa.text(_ADVANCE_SQL).bindparams(channel=CHANGES_CHANNEL)
_WRITE_DOCUMENTS = sa.text(_WRITE_DOCUMENTS_SQL)
_UPSERT_CHECKPOINTS = sa.text(_UPSERT_CHECKPOINTS_SQL)
_VERSIONS = sa.text(
    "SELECT doc_key, version FROM oa_sync.documents WHERE doc_key = ANY(CAST(:keys AS text[]))"
)


async def lock_watermarks(conn: AsyncConnection) -> int:
    """Take the watermark lock for the rest of the transaction; returns the last watermark
    (exact: read after the lock was granted). One round trip."""
    return int((await conn.execute(_LOCK_WATERMARKS)).scalar_one())


def _checkpoint(row: Any) -> Checkpoint:
    return Checkpoint(
        projection=row[0],
        doc_key=row[1],
        last_position=row[2],
        projector_version=row[3],
        content_hash=row[4],
        version=row[5],
    )


_CHECKPOINT_COLUMNS: Final = (
    checkpoints.c.projection,
    checkpoints.c.doc_key,
    checkpoints.c.last_position,
    checkpoints.c.projector_version,
    checkpoints.c.content_hash,
    checkpoints.c.version,
)
_DOCUMENT_COLUMNS: Final = (
    documents.c.projection,
    documents.c.doc_key,
    documents.c.version,
    documents.c.content_hash,
    sa.cast(documents.c.body, sa.Text).label("body"),  # parsed by orjson: several times faster
    documents.c.watermark,
)


def _document(row: Any) -> StoredDocument:
    return StoredDocument(
        projection=row[0],
        doc_key=row[1],
        version=row[2],
        content_hash=row[3],
        body=orjson.loads(row[4]),
        watermark=row[5],
    )


def _keys(keys: Iterable[str], name: str = "keys") -> Any:
    array: Any = ARRAY(sa.Text)
    return sa.bindparam(name, sorted(keys), type_=array)


async def load_checkpoints(conn: AsyncConnection, ids: Iterable[DocId]) -> dict[DocId, Checkpoint]:
    """The stored checkpoints of ``ids`` (absent ones left out)."""
    wanted = set(ids)
    if not wanted:
        return {}
    query = sa.select(*_CHECKPOINT_COLUMNS).where(
        # both primary-key columns, so the lookup is index probes, not a scan
        checkpoints.c.projection == sa.any_(_keys({name for name, _ in wanted}, "projections")),
        checkpoints.c.doc_key == sa.any_(_keys({key for _, key in wanted})),
    )
    found = (_checkpoint(r) for r in await conn.execute(query))
    return {c.id: c for c in found if c.id in wanted}


async def load_documents(
    conn: AsyncConnection, ids: Iterable[DocId]
) -> dict[DocId, StoredDocument]:
    """The stored documents among ``ids`` (absent ones left out)."""
    wanted = set(ids)
    if not wanted:
        return {}
    query = sa.select(*_DOCUMENT_COLUMNS).where(
        documents.c.doc_key == sa.any_(_keys({key for _, key in wanted}))
    )
    found = (_document(r) for r in await conn.execute(query))
    return {d.id: d for d in found if d.id in wanted}


async def load_states(conn: AsyncConnection, ids: Sequence[DocId]) -> dict[DocId, DocumentState]:
    """Checkpoint and stored body of each document, as the projection engine wants them."""
    held = await load_checkpoints(conn, ids)
    stored = await load_documents(conn, ids)
    return {i: DocumentState.of(held.get(i), stored.get(i)) for i in ids}


async def put_checkpoints(conn: AsyncConnection, advances: Iterable[Checkpoint]) -> None:
    """Upsert checkpoints (one statement), replacing those of the same documents."""
    latest = {c.id: c for c in advances}
    if not latest:
        return
    rows = orjson.dumps(
        [
            _row(
                c.doc_key,
                c.projection,
                c.version,
                None,
                c.content_hash,
                None,
                c.last_position,
                c.projector_version,
            )
            for c in latest.values()
        ]
    )
    await conn.execute(_UPSERT_CHECKPOINTS, {"rows": rows.decode()})


class Written:
    """What :func:`write_updates` wrote.

    Attributes:
        updates: the updates written, each with its watermark, in watermark order.
        last_watermark: the highest watermark after the write (unchanged if nothing written).
        epoch: the log epoch the watermarks belong to, when the write read it
            (:func:`write_batch` with a lease advance and updates; else ``None``).
    """

    __slots__ = ("epoch", "last_watermark", "updates")

    def __init__(
        self,
        updates: list[tuple[DocumentUpdate, int]],
        last_watermark: int,
        epoch: str | None = None,
    ) -> None:
        self.updates = updates
        self.last_watermark = last_watermark
        self.epoch = epoch


async def write_updates(
    conn: AsyncConnection,
    updates: Sequence[DocumentUpdate],
    *,
    only_newer: bool = True,
    locked_at: int | None = None,
) -> Written:
    """Upsert documents and append one change row each, with gap-free watermarks.

    Must run inside the caller's transaction; takes :data:`WATERMARK_LOCK` unless the caller
    already did (``locked_at``: the last watermark :func:`lock_watermarks` returned).

    Args:
        conn: a connection in a transaction.
        updates: the new document states; for a document named twice the last one counts.
        only_newer: drop updates whose version is not above the stored one (a sink's rule);
            ``False`` overwrites whatever is stored (reprojection repairing a corrupted row).
        locked_at: see above.

    Returns:
        The updates written with their watermarks, and the new last watermark.
    """
    last = await lock_watermarks(conn) if locked_at is None else locked_at
    latest: dict[str, DocumentUpdate] = {}
    for update in updates:
        latest.pop(update.doc_key, None)
        latest[update.doc_key] = update
    if only_newer and latest:
        found = await conn.execute(_VERSIONS, {"keys": list(latest)})
        held = {row[0]: row[1] for row in found}
        latest = {k: u for k, u in latest.items() if u.version > held.get(k, 0)}
    if not latest:
        return Written([], last)
    rows = list(latest.values())
    watermarks = range(last + 1, last + 1 + len(rows))
    payload = orjson.dumps([_document_row(u, w) for u, w in zip(rows, watermarks, strict=True)])
    await conn.execute(_WRITE_DOCUMENTS, {"rows": payload.decode()})
    return Written(list(zip(rows, watermarks, strict=True)), watermarks[-1])


def _row(  # noqa: PLR0917 - the columns of one row, in _ROWS order
    doc_key: str,
    projection: str,
    version: int,
    watermark: int | None,
    content_hash: str,
    body: orjson.Fragment | None,
    last_position: int | None = None,
    projector_version: int | None = None,
) -> list[Any]:
    """One row of the set-based writes' JSON payload, in :data:`_ROWS` order."""
    return [
        doc_key,
        projection,
        version,
        watermark,
        content_hash,
        body,
        last_position,
        projector_version,
    ]


def _document_row(update: DocumentUpdate, watermark: int) -> list[Any]:
    """One document row of the set-based writes (the body spliced, not re-encoded)."""
    return _row(
        update.doc_key,
        update.projection,
        update.version,
        watermark,
        update.content_hash,
        orjson.Fragment(update.canonical),
    )


@asynccontextmanager
async def _transaction(source: AsyncEngine | AsyncConnection) -> AsyncIterator[AsyncConnection]:
    """A connection in a transaction: the engine's own, or the caller's connection as is."""
    if isinstance(source, AsyncConnection):
        yield source
        return
    async with source.begin() as conn:
        yield conn


class PostgresCheckpointStore:
    """Checkpoints in ``oa_sync.projection_checkpoints``; a core ``CheckpointStore``.

    Args:
        source: an engine (each call is its own transaction) or a connection (calls join the
            caller's transaction and see its uncommitted writes).
    """

    def __init__(self, source: AsyncEngine | AsyncConnection) -> None:
        self.source = source

    async def get_many(self, ids: Iterable[DocId]) -> Mapping[DocId, Checkpoint]:
        async with _transaction(self.source) as conn:
            return await load_checkpoints(conn, ids)

    async def put_many(self, checkpoints: Iterable[Checkpoint]) -> None:
        async with _transaction(self.source) as conn:
            await put_checkpoints(conn, checkpoints)

    async def all(self, projection: str | None = None) -> list[Checkpoint]:
        query = sa.select(*_CHECKPOINT_COLUMNS).order_by(checkpoints.c.doc_key.collate("C"))
        if projection is not None:
            query = query.where(checkpoints.c.projection == projection)
        async with _transaction(self.source) as conn:
            return [_checkpoint(r) for r in await conn.execute(query)]


class PostgresDocumentSink:
    """The Postgres read model (``documents`` + ``changes``); a ``Sink`` and ``DocumentReader``.

    :meth:`publish` writes documents and change rows with fresh watermarks and ignores updates
    not newer than the stored version. It does not write checkpoints or send NOTIFY: the
    projector worker does both in its own batch transaction (see :mod:`oa_sync_server.worker`).

    Args:
        source: an engine or a connection, as for :class:`PostgresCheckpointStore`.
    """

    def __init__(self, source: AsyncEngine | AsyncConnection) -> None:
        self.source = source

    async def publish(self, updates: Sequence[DocumentUpdate]) -> None:
        if not updates:
            return
        async with _transaction(self.source) as conn:
            await write_updates(conn, updates)

    async def get_documents(self, ids: Iterable[DocId]) -> Mapping[DocId, StoredDocument]:
        async with _transaction(self.source) as conn:
            return await load_documents(conn, ids)

    async def all_documents(self, projection: str | None = None) -> list[StoredDocument]:
        query = sa.select(*_DOCUMENT_COLUMNS).order_by(documents.c.doc_key.collate("C"))
        if projection is not None:
            query = query.where(documents.c.projection == projection)
        async with _transaction(self.source) as conn:
            return [_document(r) for r in await conn.execute(query)]


class LeaseAdvance(NamedTuple):
    """Where a projector batch leaves its lease: the cursor after its events, renewed.

    Attributes:
        name: the lease.
        cursor_tx_id, cursor_position: the log cursor after the batch's last event.
        ttl_s: the renewed lease's time to live.
    """

    name: str
    cursor_tx_id: int
    cursor_position: int
    ttl_s: float

    def params(self, watermark: int | None) -> dict[str, Any]:
        return {
            "tx": self.cursor_tx_id,
            "pos": self.cursor_position,
            "name": self.name,
            "ttl": self.ttl_s,
            "watermark": None if watermark is None else str(watermark),
        }


async def advance_lease(conn: AsyncConnection, advance: LeaseAdvance) -> None:
    """Move a projector lease's cursor past a batch that changed no document (and renew it)."""
    await conn.execute(_ADVANCE, advance.params(None))


async def write_batch(
    conn: AsyncConnection,
    updates: Sequence[DocumentUpdate],
    checkpoints: Sequence[Checkpoint],
    *,
    locked_at: int,
    advance: LeaseAdvance | None = None,
) -> Written:
    """The projector's write: documents, their checkpoints and change rows in one statement.

    Like :func:`write_updates` with ``only_newer=False`` followed by :func:`put_checkpoints`,
    in one round trip and one parameter (each row carries its document and its checkpoint).
    With ``advance``, the same statement also moves the lease cursor (as
    :func:`advance_lease`), reads the log epoch (:attr:`Written.epoch`) and queues
    ``pg_notify('oa_sync_changes', '<epoch>:<new last watermark>')``.

    Args:
        conn: a connection in a transaction holding the watermark lock.
        updates: one per document (as :meth:`oa_sync_core.ProjectionEngine.apply` returns).
        checkpoints: the matching checkpoint of each update, in the same order.
        locked_at: the last watermark :func:`lock_watermarks` returned.
        advance: the projector lease to advance in the same round trip (``None``: none).

    Raises:
        ValueError: the checkpoints do not match the updates one to one.
        LookupError: ``advance`` names no lease row (nothing is advanced; roll back).
    """
    if len(checkpoints) != len(updates) or len({u.doc_key for u in updates}) != len(updates):
        raise ValueError("write_batch needs one update and its checkpoint per document")
    if not updates:
        if advance is not None:
            await advance_lease(conn, advance)
        return Written([], locked_at)
    watermarks = range(locked_at + 1, locked_at + 1 + len(updates))
    rows = []
    fragment = orjson.Fragment
    for u, c, w in zip(updates, checkpoints, watermarks, strict=True):
        if c.doc_key != u.doc_key or c.projection != u.projection:
            raise ValueError("write_batch needs one update and its checkpoint per document")
        rows.append(  # the document, its change and its checkpoint
            _row(
                u.doc_key,
                u.projection,
                u.version,
                w,
                u.content_hash,
                fragment(u.canonical),  # spliced, not re-encoded
                c.last_position,
                c.projector_version,
            )
        )
    params = {"rows": orjson.dumps(rows).decode()}
    epoch = None
    if advance is None:
        await run_on_driver(conn, _WRITE_WITH_CHECKPOINTS, params)
    else:
        found = await run_on_driver(
            conn, _WRITE_AND_ADVANCE, params | advance.params(watermarks[-1])
        )
        if not found:  # the lease row is gone: nothing to advance (the caller checked it)
            raise LookupError(f"projector lease {advance.name!r} not found")
        epoch = str(found[0][0])
    return Written(list(zip(updates, watermarks, strict=True)), watermarks[-1], epoch)
