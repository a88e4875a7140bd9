"""``oa-sync migrate``: apply the alembic migrations of the ``oa_sync`` schema up to head."""

from __future__ import annotations

import argparse
import asyncio

from sqlalchemy.ext.asyncio import AsyncEngine

from oa_sync_server.commands._db import with_database

NAME = "migrate"
HELP = "create or upgrade the oa_sync schema (OA_SYNC_DATABASE_URL, or the embedded Postgres)"


def register(parser: argparse.ArgumentParser) -> None:
    """No arguments: always migrates to the newest revision."""
    del parser


def run(args: argparse.Namespace) -> int:
    """Migrate (opening the database migrates it) and say so."""
    del args

    async def done(engine: AsyncEngine) -> None:
        del engine

    asyncio.run(with_database(done))
    print("oa_sync schema is at head")
    return 0
