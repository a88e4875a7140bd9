"""Engines: one place that turns a Postgres URL into a SQLAlchemy async engine on psycopg 3.

``postgresql://`` and ``postgres://`` URLs are normalised to ``postgresql+psycopg://``. What
this is not: configuration loading (``oa_sync_server.config``) or schema creation (alembic).
"""

from __future__ import annotations

import select
from typing import Any

import psycopg
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

__all__ = ["create_engine", "detached_connection", "driver_of", "looks_usable", "normalise_url"]

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
