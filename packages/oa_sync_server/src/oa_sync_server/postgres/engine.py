"""Engines: one place that turns a Postgres URL into a SQLAlchemy async engine on psycopg 3.

``postgresql://`` and ``postgres://`` URLs are normalised to ``postgresql+psycopg://``. What
this is not: configuration loading (``oa_sync_server.config``) or schema creation (alembic).
"""

from __future__ import annotations

import select
from collections.abc import Mapping
from typing import Any, Final

import psycopg
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import psycopg as psycopg_dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

__all__ = [
    "DriverText",
    "create_engine",
    "detached_connection",
    "driver_of",
    "looks_usable",
    "normalise_url",
    "run_on_driver",
]

_PREFIXES = ("postgresql+psycopg://", "postgresql://", "postgres://")


def normalise_url(url: str) -> str:
    """Return ``url`` with the ``postgresql+psycopg`` driver.

    Args:
        url: a ``postgresql://``, ``postgres://`` or ``postgresql+psycopg://`` URL.

    Returns:
        The same URL naming the psycopg 3 driver.

    Raises:
        ValueError: the URL is not a Postgres URL (the message never shows the URL).
    """
    for prefix in _PREFIXES:
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    raise ValueError("database URL must start with postgresql:// or postgresql+psycopg://")


def create_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """An async engine on psycopg 3 for ``url``.

    Args:
        url: a Postgres URL (normalised by :func:`normalise_url`).
        **kwargs: passed to :func:`sqlalchemy.ext.asyncio.create_async_engine`
            (``pool_size``, ``poolclass``...).

    Returns:
        The engine; dispose of it with ``await engine.dispose()``.

    Raises:
        ValueError: the URL is not a Postgres URL.
    """
    kwargs.setdefault("pool_pre_ping", True)
    return create_async_engine(normalise_url(url), **kwargs)


async def detached_connection(engine: AsyncEngine) -> psycopg.AsyncConnection[Any]:
    """A new autocommit psycopg connection, made as ``engine``'s pool makes them (its connect
    arguments and ping), then detached: the caller owns it and closes it, and the pool makes
    another when it needs one. For the connections kept outside the pool (catch-up reads,
    the server's appends) that save a checkout, a ping and a transaction per statement.

    Raises:
        psycopg.Error, OSError: the database could not be reached.
    """
    proxied = await engine.raw_connection()
    conn = proxied.driver_connection
    proxied.detach()
    assert isinstance(conn, psycopg.AsyncConnection)
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        await conn.rollback()
    await conn.set_autocommit(True)
    return conn


async def driver_of(conn: AsyncConnection) -> psycopg.AsyncConnection[Any]:
    """The psycopg connection under an SQLAlchemy one (still the pool's: not detached), for a
    statement run on the driver itself."""
    driver = (await conn.get_raw_connection()).driver_connection
    assert isinstance(driver, psycopg.AsyncConnection)
    return driver


def looks_usable(conn: psycopg.AsyncConnection[Any]) -> bool:
    """Whether an idle kept connection looks alive, without a round trip: open, not broken,
    outside a transaction, and nothing waiting on its socket (an idle backend sends nothing
    unasked but its termination: a FATAL message, then EOF). The one staleness rule of the
    connections kept outside the pool (appends, catch-up reads, the projector's)."""
    if conn.closed or conn.broken:
        return False
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        return False
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
    return not poller.poll(0)


_DIALECT: Final = psycopg_dialect.dialect()  # type: ignore[no-untyped-call]  # untyped in SA


class DriverText:
    """An ``sa.text`` statement compiled once for the psycopg connection itself.

    For the few statements that run many times a second (a projector batch's read, lock and
    write): run through SQLAlchemy, each cost ~0.1 ms of CPU more (execution context, result
    proxy, greenlet switch) than on the driver, a sixth of a small batch's CPU. The SQL stays
    one ``sa.text`` (the one the tests and the hygiene check read); its values bound with
    ``bindparams`` travel along.

    Attributes:
        sql: the statement in psycopg's ``%(name)s`` style.
        bound: the values bound in the statement itself.
    """

    __slots__ = ("bound", "sql")

    def __init__(self, statement: sa.TextClause) -> None:
        compiled = statement.compile(dialect=_DIALECT)
        self.sql: str = compiled.string
        self.bound: dict[str, Any] = {
            name: bind.value for name, bind in compiled.binds.items() if bind.value is not None
        }


async def run_on_driver(
    conn: AsyncConnection, statement: DriverText, params: Mapping[str, Any]
) -> list[tuple[Any, ...]]:
    """Run ``statement`` on the psycopg connection under ``conn``, inside its transaction.

    Returns:
        The rows (tuples; none for a statement that returns nothing).

    Raises:
        sqlalchemy.exc.DBAPIError: as ``conn.execute`` raises it (the subclass of the
            psycopg error; parameters hidden), so callers handle one kind of database error.
    """
    driver = await driver_of(conn)
    try:
        cursor = await driver.execute(statement.sql, {**statement.bound, **params})
        return await cursor.fetchall() if cursor.description is not None else []
    except psycopg.Error as exc:
        raise sa.exc.DBAPIError.instance(
            statement.sql, None, exc, psycopg.Error, hide_parameters=True
        ) from exc
