"""The read side of the Postgres read model: documents, the coalesced catch-up, sync meta.

Every reader of projected documents — the WebSocket session, ``GET /v1/docs``,
``GET /v1/changes``, SSE and the fan-out hub — goes through these functions, so "which
documents does a topic list cover under a grant" and "what changed after watermark W" are
answered in one place.

Coalesced catch-up. ``documents.watermark`` is the watermark of the document's latest change,
so ``documents WHERE watermark > W ORDER BY watermark`` yields every document changed after
``W`` exactly once, at its latest version, in watermark order. Paging with ``after`` = the last
row's watermark never misses a document: one that changes between two pages moves to a higher
watermark and is found by a later page.

Topics and grants. A subscription topic only ever reaches documents inside the token's grant:
each (topic, grant pattern) pair is narrowed to the narrower of the two (topics are exact keys
or prefixes, so the intersection of two overlapping patterns is always one of them), and only
those narrowed patterns reach SQL, as bound parameters (``LIKE`` with escaping for prefixes).

Catch-up reads (:class:`CatchUpReads`: every snapshot and resume of the WebSocket and SSE
transports) bypass SQLAlchemy's statement building and row processing: they run plain SQL with
bound parameters on autocommit psycopg connections they keep, and the ``jsonb`` body is turned
into canonical bytes straight from its text (:func:`oa_sync_core.codec.canonical_json_text`),
never through the standard library's parser. They return exactly the rows
:func:`documents_matching` returns (a test holds the two equal).

What this is not: the write side (the projector worker and ``db.stores``) or an ORM.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any, Final

import psycopg
import sqlalchemy as sa
from oa_sync_core.codec import canonical_json, canonical_json_text
from oa_sync_core.protocol.wire import EncodedUpdate
from oa_sync_core.topics import Grant, Topic
from psycopg import sql
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from oa_sync_server.postgres.engine import detached_connection, looks_usable
from oa_sync_server.postgres.tables import SCHEMA, changes, documents, sync_meta

__all__ = [
    "CatchUpReads",
    "DocRow",
    "HubReader",
    "SyncMeta",
    "changed_after",
    "document",
    "documents_after",
    "documents_matching",
    "effective_topics",
    "log_epoch",
    "log_position",
    "read_meta",
]

MAX_LIMIT: Final = 10_000
"""Largest page any read returns."""
_READ_CONNECTIONS: Final = 4
"""Catch-up statements in flight at once per engine, each on a connection of its own."""

_COLUMNS: Final = (
    documents.c.doc_key,
    documents.c.projection,
    documents.c.version,
    documents.c.watermark,
    documents.c.content_hash,
    documents.c.body,
)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SyncMeta:
    """Where the change log stands.

    Attributes:
        epoch: the log epoch; changes whenever watermarks restart (rebuild, restore).
        watermark: the highest committed watermark (0 when nothing was projected yet).
        retained_from: every change with a watermark above this is still in ``changes``; a
            resume from a lower watermark must be answered with a reset.
    """

    epoch: str
    watermark: int
    retained_from: int


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DocRow:
    """One projected document as stored.

    Attributes:
        doc_key: the document key, e.g. ``runtime/run_summary:r1``.
        projection: the projection that owns it.
        version: number of events folded into it.
        watermark: watermark of its latest change.
        content_hash: SHA-256 of ``body``.
        body: the canonical JSON bytes of the document
            (:func:`oa_sync_core.codec.canonical_json` of the stored jsonb).
    """

    doc_key: str
    projection: str
    version: int
    watermark: int
    content_hash: str
    body: bytes

    def encoded(self) -> EncodedUpdate:
        """This version as a wire update, ready to be framed for any subscription."""
        return EncodedUpdate(
            doc_key=self.doc_key,
            projection=self.projection,
            version=self.version,
            watermark=self.watermark,
            content_hash=self.content_hash,
            body=self.body,
        )


def _row(row: Any) -> DocRow:
    return DocRow(
        doc_key=row.doc_key,
        projection=row.projection,
        version=int(row.version),
        watermark=int(row.watermark),
        content_hash=row.content_hash,
        body=canonical_json(row.body),
    )


def _check_limit(limit: int) -> int:
    if not 1 <= int(limit) <= MAX_LIMIT:
        raise ValueError(f"limit must be an integer from 1 to {MAX_LIMIT}")
    return limit


async def read_meta(conn: AsyncConnection) -> SyncMeta:
    """The current epoch, highest watermark and retention horizon, in one statement.

    Args:
        conn: any connection.

    Returns:
        The :class:`SyncMeta`.

    Raises:
        LookupError: ``sync_meta`` lacks its rows (the schema was not migrated).
    """
    epoch_q = sa.select(sync_meta.c.value).where(sync_meta.c.key == "epoch").scalar_subquery()
    retained_q = (
        sa.select(sync_meta.c.value).where(sync_meta.c.key == "retained_from").scalar_subquery()
    )
    watermark_q = sa.select(
        sa.func.greatest(
            sa.select(sa.func.coalesce(sa.func.max(documents.c.watermark), 0)).scalar_subquery(),
            sa.select(sa.func.coalesce(sa.func.max(changes.c.watermark), 0)).scalar_subquery(),
        )
    ).scalar_subquery()
    row = (
        await conn.execute(
            sa.select(
                epoch_q.label("epoch"),
                retained_q.label("retained_from"),
                watermark_q.label("watermark"),
            )
        )
    ).one()
    if row.epoch is None or row.retained_from is None:
        raise LookupError("oa_sync.sync_meta has no epoch / retained_from (run migrations)")
    return SyncMeta(
        epoch=str(row.epoch), watermark=int(row.watermark), retained_from=int(row.retained_from)
    )


_EPOCH: Final = sa.select(sync_meta.c.value).where(sync_meta.c.key == "epoch")
_POSITION: Final = sa.select(
    _EPOCH.scalar_subquery().label("epoch"),
    sa.select(sa.func.coalesce(sa.func.max(documents.c.watermark), 0))
    .scalar_subquery()
    .label("top"),
)


async def log_epoch(conn: AsyncConnection) -> str:
    """The log epoch (one primary-key lookup)."""
    return str((await conn.execute(_EPOCH)).scalar_one())


async def log_position(conn: AsyncConnection) -> tuple[str, int]:
    """The log epoch and the highest watermark in ``documents``, in one cheap statement (the
    fan-out bus's audit, the replica check, a republish)."""
    row = (await conn.execute(_POSITION)).one()
    return str(row.epoch), int(row.top)


def _narrow(topic: Topic, pattern: Topic) -> Topic | None:
    if topic.within(pattern):
        return topic
    if pattern.within(topic):
        return pattern
    return None


def effective_topics(topics: Iterable[Topic], grant: Grant) -> list[Topic]:
    """The patterns a subscription may actually read: each topic narrowed by the grant.

    Args:
        topics: the requested topics.
        grant: what the token grants.

    Returns:
        Distinct patterns, each inside both a requested topic and the grant; empty when the
        topics and the grant share no document.
    """
    out: dict[str, Topic] = {}
    for topic in topics:
        for pattern in grant.topics:
            narrowed = _narrow(topic, pattern)
            if narrowed is not None:
                out.setdefault(narrowed.text, narrowed)
    # A pattern inside another wildcard adds nothing.
    return [
        t
        for t in out.values()
        if not any(
            o is not t and o.wildcard and t.within(o) and o.text != t.text for o in out.values()
        )
    ]


def _topic_filter(patterns: Sequence[Topic]) -> sa.ColumnElement[bool]:
    exact = [t.prefix for t in patterns if not t.wildcard]
    clauses: list[sa.ColumnElement[bool]] = []
    if exact:
        clauses.append(documents.c.doc_key.in_(exact))
    for t in patterns:
        if t.wildcard and t.prefix:
            clauses.append(documents.c.doc_key.startswith(t.prefix, autoescape=True))
        elif t.wildcard:
            clauses.append(sa.true())
    return sa.or_(*clauses)


async def documents_matching(
    conn: AsyncConnection,
    topics: Sequence[Topic],
    grant: Grant,
    *,
    after: int | None,
    limit: int,
) -> list[DocRow]:
    """Documents covered by ``topics`` and ``grant``, in watermark order.

    Args:
        conn: any connection.
        topics: requested topics.
        grant: the token's grant; nothing outside it is ever returned.
        after: ``None`` for a snapshot of every matching document; a watermark ``W`` for the
            coalesced catch-up (documents whose latest change is above ``W``).
        limit: most rows to return (1 to :data:`MAX_LIMIT`); page on with ``after`` set to
            the last row's watermark.

    Returns:
        Up to ``limit`` documents ordered by watermark.

    Raises:
        ValueError: ``limit`` out of range.
    """
    _check_limit(limit)
    patterns = effective_topics(topics, grant)
    if not patterns:
        return []
    return await _documents_of_patterns(conn, patterns, after=after, limit=limit)


async def _documents_of_patterns(
    conn: AsyncConnection, patterns: Sequence[Topic], *, after: int | None, limit: int
) -> list[DocRow]:
    query = sa.select(*_COLUMNS).where(_topic_filter(patterns))
    if after is not None:
        query = query.where(documents.c.watermark > after)
    query = query.order_by(documents.c.watermark).limit(limit)
    return [_row(r) for r in (await conn.execute(query)).all()]


class _CanonicalBody(psycopg.adapt.Loader):
    """Loads a ``jsonb`` column as its canonical bytes (what :func:`_row` makes of it)."""

    def load(self, data: psycopg.abc.Buffer) -> bytes:
        return canonical_json_text(bytes(data))


_SELECT: Final = psycopg.sql.SQL(
    "SELECT doc_key, projection, version, watermark, content_hash, body FROM {} WHERE "
).format(psycopg.sql.Identifier(SCHEMA, documents.name))


def _like_prefix(prefix: str) -> str:
    """A ``LIKE`` pattern (escape character ``\\``) matching every text starting ``prefix``."""
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


async def _plain_documents(
    conn: psycopg.AsyncConnection[Any],
    patterns: Sequence[Topic],
    *,
    after: int | None,
    limit: int | None,
) -> list[DocRow]:
    """:func:`_documents_of_patterns` as plain SQL on a psycopg connection (``limit=None``: no
    ``LIMIT``, for a read of exact keys, at most one row each)."""
    exact = [t.prefix for t in patterns if not t.wildcard]
    clauses: list[str] = []
    params: list[object] = []
    if exact:
        clauses.append("doc_key = ANY(%s)")
        params.append(exact)
    for t in patterns:
        if t.wildcard and t.prefix:
            clauses.append("doc_key LIKE %s ESCAPE '\\'")
            params.append(_like_prefix(t.prefix))
        elif t.wildcard:
            clauses.append("TRUE")
    text = "(" + " OR ".join(clauses) + ")"
    if after is not None:
        text += " AND watermark > %s"
        params.append(after)
    if limit is not None:
        text += " ORDER BY watermark LIMIT %s"
        params.append(limit)
    async with conn.cursor(row_factory=psycopg.rows.tuple_row) as cursor:
        cursor.adapters.register_loader("jsonb", _CanonicalBody)
        await cursor.execute(_SELECT + psycopg.sql.SQL(text), params)
        return [
            DocRow(
                doc_key=doc_key,
                projection=projection,
                version=version,
                watermark=watermark,
                content_hash=content_hash,
                body=body,
            )
            for doc_key, projection, version, watermark, content_hash, body in (
                await cursor.fetchall()
            )
        ]


def _by_watermark(row: DocRow) -> int:
    return row.watermark


@dataclasses.dataclass(slots=True)
class _Read:
    patterns: list[Topic]
    after: int | None
    limit: int
    result: asyncio.Future[list[DocRow]]


class CatchUpReads:
    """The catch-up reads of connections that subscribe in the same event-loop turn, made
    together: one connection per turn, one :func:`read_meta` shared by every resume of the
    turn, and one statement for every read that names only exact document keys.

    The documents are read on autocommit psycopg connections this object keeps (at most
    :data:`_READ_CONNECTIONS` per engine, made by the engine's own pool and detached from it),
    so a turn costs one round trip per statement: no pool checkout with its ping, no ``BEGIN``
    and no ``ROLLBACK``. A kept connection that fails is closed, and a read that failed on a
    kept one is tried once more on a new one (what the pool's ping did). :meth:`close` closes
    them (the app does at shutdown).

    A read of exact keys returns at most one row per key, so when it names no more keys than
    its ``limit`` its page is complete and the reads of a turn can be answered by one
    ``doc_key IN (...)`` over the union of their keys (each read then keeps its own keys above
    its own ``after``, in watermark order). Reads of prefixes run one statement each on the
    same connection. Each caller still sees exactly what :func:`documents_matching` returns.

    Ordering is what the callers' correctness rests on: a read or meta request made after a
    connection attached its live feed is executed after that point too (the batch starts on a
    later turn), so nothing falls between the feed and the read.
    """

    def __init__(self) -> None:
        self._metas: dict[AsyncEngine, list[asyncio.Future[SyncMeta]]] = {}
        self._reads: dict[AsyncEngine, list[_Read]] = {}
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle: dict[AsyncEngine, list[psycopg.AsyncConnection[Any]]] = {}
        self._gates: dict[AsyncEngine, asyncio.Semaphore] = {}
        self._closed = False

    async def close(self, *, timeout_s: float = 5.0) -> None:
        """Close the connections kept for reads; reads under way get ``timeout_s`` to finish,
        then are cancelled (their callers see the cancellation)."""
        self._closed = True
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for conn in connections:
                await conn.close()

    def _release(self, engine: AsyncEngine, conn: psycopg.AsyncConnection[Any]) -> bool:
        if self._closed or conn.closed or conn.broken:
            return False
        idle = self._idle.setdefault(engine, [])
        if len(idle) >= _READ_CONNECTIONS:
            return False
        idle.append(conn)
        return True

    async def meta(self, engine: AsyncEngine) -> SyncMeta:
        """:func:`read_meta` on ``engine``, shared with the other callers of this turn."""
        result: asyncio.Future[SyncMeta] = asyncio.get_running_loop().create_future()
        self._metas.setdefault(engine, []).append(result)
        self._schedule()
        return await result

    async def documents(
        self,
        engine: AsyncEngine,
        topics: Sequence[Topic],
        grant: Grant,
        *,
        after: int | None,
        limit: int,
    ) -> list[DocRow]:
        """:func:`documents_matching` on ``engine``, read together with this turn's others."""
        _check_limit(limit)
        patterns = effective_topics(topics, grant)
        if not patterns:
            return []
        result: asyncio.Future[list[DocRow]] = asyncio.get_running_loop().create_future()
        self._reads.setdefault(engine, []).append(_Read(patterns, after, limit, result))
        self._schedule()
        return await result

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._start)

    def _start(self) -> None:
        self._scheduled = False
        metas, self._metas = self._metas, {}
        reads, self._reads = self._reads, {}
        for engine in {*metas, *reads}:
            task = asyncio.get_running_loop().create_task(
                self._run(engine, metas.get(engine, []), reads.get(engine, [])),
                name="oa-sync-catch-up-reads",
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(
        self,
        engine: AsyncEngine,
        metas: list[asyncio.Future[SyncMeta]],
        reads: list[_Read],
    ) -> None:
        waiting: list[asyncio.Future[Any]] = [*metas, *(r.result for r in reads)]
        gate = self._gates.setdefault(engine, asyncio.Semaphore(_READ_CONNECTIONS))
        try:
            if any(not f.done() for f in metas):
                async with engine.connect() as sa_conn:
                    meta = await read_meta(sa_conn)
                for future in metas:
                    if not future.done():
                        future.set_result(meta)
            if reads:
                async with gate:
                    await self._documents(engine, reads)
        except Exception as exc:  # noqa: BLE001 - every waiter gets the failure
            for future in waiting:
                if not future.done():
                    future.set_exception(exc)
        finally:
            for future in waiting:  # cancelled (shutdown): nobody waits forever
                if not future.done():
                    future.cancel()

    async def _documents(self, engine: AsyncEngine, reads: list[_Read]) -> None:
        idle = self._idle.get(engine)
        kept = idle.pop() if idle else None
        if kept is not None and not looks_usable(kept):  # e.g. its backend was terminated
            await kept.close()
            kept = None
        conn = kept or await detached_connection(engine)
        try:
            try:
                await self._read(conn, reads)
            except psycopg.OperationalError:
                if kept is None:
                    raise
                await conn.close()  # went stale while kept: once more on a new connection
                conn = await detached_connection(engine)
                await self._read(conn, reads)
        except BaseException:
            await conn.close()
            raise
        if not self._release(engine, conn):
            await conn.close()

    async def _read(self, conn: psycopg.AsyncConnection[Any], reads: list[_Read]) -> None:
        exact = [
            r
            for r in reads
            if not r.result.done()
            and len(r.patterns) <= r.limit
            and not any(t.wildcard for t in r.patterns)
        ]
        if exact:
            await self._exact(conn, exact)
        for r in reads:
            if not r.result.done():
                rows = await _plain_documents(conn, r.patterns, after=r.after, limit=r.limit)
                if not r.result.done():
                    r.result.set_result(rows)

    @staticmethod
    async def _exact(conn: psycopg.AsyncConnection[Any], reads: list[_Read]) -> None:
        keys = {t.prefix: t for r in reads for t in r.patterns}
        afters = [r.after for r in reads]
        lowest = None if None in afters else min(a for a in afters if a is not None)
        patterns = [keys[key] for key in sorted(keys)]
        by_key = {
            row.doc_key: row
            for row in await _plain_documents(conn, patterns, after=lowest, limit=None)
        }
        for r in reads:
            if not r.result.done():
                found = (by_key.get(t.prefix) for t in r.patterns)
                after = -1 if r.after is None else r.after
                r.result.set_result(
                    sorted(
                        (row for row in found if row is not None and row.watermark > after),
                        key=_by_watermark,
                    )
                )


async def document(conn: AsyncConnection, doc_key: str) -> DocRow | None:
    """One document by key, or ``None`` when it does not exist."""
    row = (await conn.execute(sa.select(*_COLUMNS).where(documents.c.doc_key == doc_key))).first()
    return None if row is None else _row(row)


async def documents_after(conn: AsyncConnection, after: int, limit: int) -> list[DocRow]:
    """Every document whose latest change is above ``after``, in watermark order.

    This is the fan-out hub's read: no topic or grant filter (each feed filters).

    Args:
        conn: any connection.
        after: the watermark already seen.
        limit: most rows to return (1 to :data:`MAX_LIMIT`).

    Raises:
        ValueError: ``limit`` out of range.
    """
    _check_limit(limit)
    query = (
        sa.select(*_COLUMNS)
        .where(documents.c.watermark > after)
        .order_by(documents.c.watermark)
        .limit(limit)
    )
    return [_row(r) for r in (await conn.execute(query)).all()]


async def changed_after(
    conn: AsyncConnection, after: int, limit: int
) -> list[tuple[DocRow, float]]:
    """Like :func:`documents_after`, each row with its commit time (seconds since the epoch).

    The time is the document's ``updated_at`` (set by the projector's transaction); the
    fan-out uses it for the commit-to-send latency metric.
    """
    _check_limit(limit)
    query = (
        sa.select(*_COLUMNS, sa.func.extract("epoch", documents.c.updated_at).label("at"))
        .where(documents.c.watermark > after)
        .order_by(documents.c.watermark)
        .limit(limit)
    )
    return [(_row(r), float(r.at)) for r in (await conn.execute(query)).all()]


_HUB_PAGE: Final = sql.SQL(
    """SELECT m.epoch, d.doc_key, d.projection, d.version, d.watermark, d.content_hash,
       d.body, extract(epoch FROM d.updated_at)::float8
FROM (SELECT (SELECT value FROM {schema}.sync_meta WHERE key = 'epoch') AS epoch) AS m
LEFT JOIN LATERAL (
    SELECT doc_key, projection, version, watermark, content_hash, body, updated_at
    FROM {schema}.documents WHERE watermark > %s ORDER BY watermark LIMIT %s
) AS d ON true"""
).format(schema=sql.Identifier(SCHEMA))
_HUB_SKIP: Final = sql.SQL(
    """SELECT m.epoch, max(d.watermark), count(d.watermark)
FROM (SELECT (SELECT value FROM {schema}.sync_meta WHERE key = 'epoch') AS epoch) AS m
LEFT JOIN LATERAL (
    SELECT watermark FROM {schema}.documents WHERE watermark > %s ORDER BY watermark LIMIT %s
) AS d ON true
GROUP BY m.epoch"""
).format(schema=sql.Identifier(SCHEMA))


class HubReader:
    """The hub's read of one page of changes: :func:`changed_after` and the log epoch in one
    statement, on a connection of its own (autocommit, outside the pool; psycopg prepares the
    statement after a few uses), each body made canonical from its text
    (:func:`~oa_sync_core.codec.canonical_json_text`).

    A failed read closes the connection; the next read opens a new one.

    Args:
        url: libpq URL of the database.
    """

    def __init__(self, url: str) -> None:
        self._url = url
        self._conn: psycopg.AsyncConnection[tuple[Any, ...]] | None = None

    async def page(self, after: int, limit: int) -> tuple[str | None, list[tuple[DocRow, float]]]:
        """The log epoch (``None`` when none is recorded) and up to ``limit`` documents with a
        watermark above ``after``, in watermark order, each with its commit time (seconds
        since the epoch), as :func:`changed_after`.

        Raises:
            psycopg.Error, OSError: the database could not be read.
        """
        _check_limit(limit)
        records = await self._fetch(_HUB_PAGE, (after, limit))
        epoch = records[0][0] if records else None
        rows: list[tuple[DocRow, float]] = []
        for _, key, projection, version, watermark, content_hash, body, at in records:
            if key is None:  # no document after ``after``: the epoch alone
                continue
            row = DocRow(
                doc_key=key,
                projection=projection,
                version=version,
                watermark=watermark,
                content_hash=content_hash,
                body=body,
            )
            rows.append((row, at))
        return epoch, rows

    async def skip(self, after: int, limit: int) -> tuple[str | None, int | None, int]:
        """The log epoch, the watermark of the last of up to ``limit`` documents above
        ``after`` (``None`` when there is none) and how many there are: the page that
        :meth:`page` would read, without its bodies, for a hub that nobody listens to.

        Raises:
            psycopg.Error, OSError: the database could not be read.
        """
        _check_limit(limit)
        records = await self._fetch(_HUB_SKIP, (after, limit))
        epoch, top, count = records[0]
        return epoch, top, count

    async def _fetch(self, query: sql.Composed, params: tuple[int, int]) -> list[tuple[Any, ...]]:
        conn = self._conn
        try:
            if conn is None or conn.closed:
                conn = self._conn = await psycopg.AsyncConnection.connect(
                    self._url, autocommit=True
                )
                conn.adapters.register_loader("jsonb", _CanonicalBody)  # as catch-up reads
            cursor = await conn.execute(query, params)
            return await cursor.fetchall()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close the connection (a later read opens a new one)."""
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            await conn.close()
