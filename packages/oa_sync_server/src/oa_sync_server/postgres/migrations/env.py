"""Alembic environment for the ``oa_sync`` schema.

The URL comes from the config attribute ``sqlalchemy.url`` (set by
:func:`oa_sync_server.postgres.migrate.upgrade`), else from ``OA_SYNC_DATABASE_URL``. Migrations run
on a synchronous psycopg 3 connection; ``postgresql://`` URLs are normalised to
``postgresql+psycopg://``. The version table lives outside the schema
(``public.oa_sync_alembic_version``) so that ``downgrade base`` can drop the schema whole.

What this is not: a place with table definitions. Revisions spell out their DDL.
"""

from __future__ import annotations

import os

import sqlalchemy as sa
from alembic import context

from oa_sync_server.postgres.engine import normalise_url

VERSION_TABLE = "oa_sync_alembic_version"


def _url() -> str:
    url = context.config.get_main_option("sqlalchemy.url") or os.environ.get(
        "OA_SYNC_DATABASE_URL", ""
    )
    if not url:
        raise SystemExit("OA_SYNC_DATABASE_URL: not set (no database to migrate)")
    return normalise_url(url)


def run_offline() -> None:
    """Emit SQL to stdout instead of running it."""
    context.configure(url=_url(), literal_binds=True, version_table=VERSION_TABLE)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    """Run the migrations on a live connection, one transaction in all."""
    connection = context.config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, version_table=VERSION_TABLE)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = sa.create_engine(_url(), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            context.configure(
                connection=conn, version_table=VERSION_TABLE, transaction_per_migration=False
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
