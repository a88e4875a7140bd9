"""Opening the database a process works on: the configured one, or an embedded Postgres.

:func:`open_database` is shared by ``oa-sync serve`` and the database commands (``migrate``,
``append``, ``reproject``, ``drift``): it starts
:class:`~oa_sync_server.postgres.embedded.EmbeddedPostgres` under ``settings.data_dir`` when
``settings.database_url`` is unset, applies the alembic migrations (unless told not to), checks the
database answers, and yields an async engine that it disposes of (and an embedded server it stops)
on exit. :func:`settle_collector` is the garbage-collector policy of every long-running process
(``serve``, and the database commands once the database is open).

What this is not: the projector, the HTTP app, or the migrations themselves.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import AsyncIterator
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from oa_sync_server.config import Settings
from oa_sync_server.errors import DatabaseUnavailableError
from oa_sync_server.postgres.embedded import EmbeddedPostgres
from oa_sync_server.postgres.engine import create_engine
from oa_sync_server.postgres.migrate import upgrade_async

__all__ = [
    "GC_THRESHOLDS",
    "DatabaseUnavailableError",
    "explain_connect_error",
    "open_database",
    "settle_collector",
]

GC_THRESHOLDS: Final = (10_000, 10, 100)
"""The collector's thresholds once a process is set up: a young collection once 10,000 more
container objects are alive than at the last one (Python's default is 700), and a full
collection at most every 100 middle ones (default 10). A fold holds a batch's thousands of
documents alive until it ends, so at 700 the young collector ran ~2,000 times per 200,000
events projected, 0.4-0.6 s of ~5 s of CPU, freeing nothing; at 10,000 it ran 8 times
(``docs/benchmarks.md``). Garbage still counts towards the threshold, so cycles are still
collected; what waits longer is at most 10,000 young objects."""


def settle_collector() -> None:
    """Keep what set-up built out of the collector's full passes, and make those passes rarer.

    Call once a process has built what it keeps for its lifetime (modules, the app, the
    engine: ~130k objects for ``serve``). ``gc.freeze()`` moves them to the permanent
    generation, and :data:`GC_THRESHOLDS` makes young collections rarer and runs a full
    collection at most every 100 middle ones.
    Each full pass walks every live object: 10,000 idle sockets are ~800k objects, and at
    Python's defaults the full passes took ~4.5 s of the ~30 s that 10,000 connects took; a
    projector folding 1,000-document batches spent ~17 % of its CPU in them, finding nothing to
    free (folds make no cycles; ``docs/benchmarks.md``).
    Garbage already there is collected first, so none is frozen. Once per process: a later
    call does nothing.
    """
    global _settled  # noqa: PLW0603 - a process-wide fact, like the collector it describes
    if _settled:
        return
    _settled = True
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


_settled = False


# libpq reports connection-phase refusals as text only (no SQLSTATE reaches the client), so
# these fragments of its messages are how the three cases are told apart.
_CREDENTIALS = ("password authentication failed", "no password supplied", "role", "pg_hba.conf")


def explain_connect_error(exc: BaseException) -> DatabaseUnavailableError:
    """One line saying what is wrong with the database and what to do (never the URL)."""
    cause = exc.__cause__ or exc
    text = str(cause)
    if "does not exist" in text and "database" in text and "role" not in text:
        return DatabaseUnavailableError(
            "database unavailable: the server has no such database: create it "
            "(createdb NAME) or fix the database name in OA_SYNC_DATABASE_URL",
            reason="no_database",
        )
    if "FATAL" in text and any(fragment in text for fragment in _CREDENTIALS):
        return DatabaseUnavailableError(
            "database unavailable: the server refused the user or password: check the "
            "credentials in OA_SYNC_DATABASE_URL (and the server's pg_hba.conf)",
            reason="credentials",
        )
    if isinstance(cause, OSError) or "connection" in text.lower() or "resolve" in text:
        return DatabaseUnavailableError(
            "database unavailable: nothing answers at the host and port of "
            "OA_SYNC_DATABASE_URL: start Postgres there or fix the URL",
            reason="unreachable",
        )
    return DatabaseUnavailableError(
        f"database unavailable ({type(cause).__name__})", reason="error"
    )


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
        DatabaseUnavailableError: the database cannot be reached, or refused the credentials.
        MigrationsMissingError: the package's migration scripts are missing.
        EmbeddedPostgresError: the embedded Postgres failed to start.
        EmbeddedUnavailableError: no URL is set and the ``[embedded]`` extra is absent.
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
            raise explain_connect_error(exc) from exc
        yield engine
