"""Run the alembic migrations of the ``oa_sync`` schema from Python.

Used by ``oa-sync migrate``, the server's start-up and the test fixtures. The alembic scripts
ship inside this package (``oa_sync_server/postgres/migrations``, in the wheel too); the
repository's ``alembic.ini`` points there for developers who run ``alembic`` by hand. What this
is not: the migrations themselves.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config

from oa_sync_server.errors import MigrationsMissingError
from oa_sync_server.postgres.engine import normalise_url

__all__ = [
    "HEAD",
    "alembic_config",
    "downgrade",
    "script_location",
    "upgrade",
    "upgrade_async",
]

HEAD = "head"


def script_location() -> Path:
    """The directory holding ``env.py`` and ``versions/``, inside this package.

    Raises:
        MigrationsMissingError: the package was installed without its migration scripts.
    """
    location = Path(__file__).resolve().with_name("migrations")
    if (location / "env.py").is_file() and (location / "versions").is_dir():
        return location
    raise MigrationsMissingError(str(location))


def alembic_config(url: str) -> Config:
    """An alembic :class:`Config` for ``url`` (normalised to the psycopg driver)."""
    location = script_location()
    config = Config()
    config.set_main_option("script_location", str(location))
    # ConfigParser interpolates '%': escape it so passwords with '%' survive.
    config.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = HEAD) -> None:
    """Migrate the database at ``url`` up to ``revision`` (blocking).

    Raises:
        sqlalchemy.exc.OperationalError: the database cannot be reached.
    """
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    """Migrate the database at ``url`` down to ``revision`` (``base`` drops the schema)."""
    command.downgrade(alembic_config(url), revision)


async def upgrade_async(url: str, revision: str = HEAD) -> None:
    """:func:`upgrade` in a worker thread, for callers inside an event loop."""
    await asyncio.to_thread(upgrade, url, revision)
