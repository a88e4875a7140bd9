"""Run the alembic migrations of the ``oa_sync`` schema from Python.

Used by ``oa-sync migrate``, the server's start-up and the test fixtures. The alembic scripts
live at the repository root (``alembic/``, ``alembic.ini``); :func:`script_location` finds them
from this file, or from ``OA_SYNC_ALEMBIC_DIR``. What this is not: the migrations themselves.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from alembic import command
from alembic.config import Config

from oa_sync_server.db.engine import normalise_url

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
    """The ``alembic`` directory holding ``env.py`` and ``versions/``.

    Raises:
        FileNotFoundError: it cannot be found.
    """
    override = os.environ.get("OA_SYNC_ALEMBIC_DIR")
    candidates = [Path(override)] if override else []
    candidates += [parent / "alembic" for parent in Path(__file__).resolve().parents]
    for candidate in candidates:
        if (candidate / "env.py").is_file() and (candidate / "versions").is_dir():
            return candidate
    raise FileNotFoundError("alembic scripts not found; set OA_SYNC_ALEMBIC_DIR")


def alembic_config(url: str) -> Config:
    """An alembic :class:`Config` for ``url`` (normalised to the psycopg driver)."""
    location = script_location()
    ini = location.parent / "alembic.ini"
    config = Config(str(ini)) if ini.is_file() else Config()
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
