"""Opening the database a process works on: the configured one, or an embedded Postgres.

:func:`open_database` is shared by ``oa-sync serve`` and the database commands (``migrate``,
``append``, ``reproject``, ``drift``): it starts
:class:`~oa_sync_server.postgres.embedded.EmbeddedPostgres` under ``settings.data_dir`` when
``settings.database_url`` is unset, applies the alembic migrations (unless told not to), checks the
database answers, and yields an async engine that it disposes of (and an embedded server it stops)
on exit.

What this is not: the projector, the HTTP app, or the migrations themselves.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from oa_sync_server.config import Settings
from oa_sync_server.errors import ServerError
from oa_sync_server.postgres.embedded import EmbeddedPostgres
from oa_sync_server.postgres.engine import create_engine
from oa_sync_server.postgres.migrate import upgrade_async

__all__ = ["DatabaseUnavailableError", "open_database"]


class DatabaseUnavailableError(ServerError):
    """The database could not be reached or migrated. The message never shows the URL."""


@contextlib.asynccontextmanager
async def open_database(
    settings: Settings, *, migrate: bool = True, **engine_kwargs: Any
) -> AsyncIterator[AsyncEngine]:
    """An engine on the configured database (or an embedded one), migrated to head.

    Args:
        settings: ``database_url`` (``None``: embedded Postgres under ``data_dir``).
        migrate: apply the alembic migrations up to head first.
        **engine_kwargs: passed to :func:`oa_sync_server.postgres.create_engine`.

    Yields:
        The engine, disposed of on exit.

    Raises:
        DatabaseUnavailableError: the database cannot be reached or migrated.
        EmbeddedPostgresError: the embedded Postgres failed to start.
    """
    async with contextlib.AsyncExitStack() as stack:
        url = settings.database_url
        if url is None:
            embedded = EmbeddedPostgres(settings.data_dir)
            url = await embedded.start()
            stack.push_async_callback(embedded.stop)
        try:
            if migrate:
                await upgrade_async(url)
            engine = create_engine(url, **engine_kwargs)
            stack.push_async_callback(engine.dispose)
            async with engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
        except (DBAPIError, OSError) as exc:
            raise DatabaseUnavailableError(
                f"database unavailable ({type(exc.__cause__ or exc).__name__})"
            ) from exc
        yield engine
