"""Pytest plugin: a real Postgres for the tests, and a fresh migrated database per test.

Where Postgres comes from, in order:

1. ``OA_SYNC_TEST_DATABASE_URL`` (an explicit choice wins: handy day to day; CI does not set
   it, so CI proves the path a newcomer takes);
2. testcontainers (``postgres:16-alpine``) when a Docker engine answers a ping;
3. an embedded ``pgserver`` in a temporary directory.

Fixtures:

* ``pg_server_url`` (session): a URL to the server's maintenance database.
* ``database_url`` (function): a new database ``oa_test_<random>``, cloned from a template
  migrated to head once per session, dropped after the test.
* ``engine`` (function): an :class:`~sqlalchemy.ext.asyncio.AsyncEngine` on it, disposed after.

What this is not: a mock. Every test talks to a real server.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from oa_sync_server.postgres import create_engine
from oa_sync_server.postgres.embedded import load_pgserver
from oa_sync_server.postgres.migrate import upgrade
from psycopg import sql
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["database_url", "engine", "make_database", "pg_server_url", "with_database"]

ENV_URL = "OA_SYNC_TEST_DATABASE_URL"


def with_database(url: str, name: str) -> str:
    """``url`` pointing at database ``name`` (same host, user and options)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


def _plain(url: str) -> str:
    """A libpq URL (psycopg's ``connect`` does not take SQLAlchemy driver names)."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _docker_available() -> bool:
    try:
        import docker  # type: ignore[import-untyped]
    except ImportError:
        return False
    if not os.environ.get("DOCKER_HOST") and not os.path.exists("/var/run/docker.sock"):
        return False  # no engine to ask (and no socket left open by asking)
    try:
        client = docker.from_env(timeout=2)
    except Exception:  # noqa: BLE001 - any failure means "no usable Docker engine"
        return False
    try:
        client.ping()
    except Exception:  # noqa: BLE001 - same
        return False
    finally:
        client.close()
    return True


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """A URL to a running Postgres server's maintenance database."""
    explicit = os.environ.get(ENV_URL)
    if explicit:
        yield explicit
        return
    if _docker_available():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as container:
            yield container.get_connection_url()
        return
    pgserver = load_pgserver()
    with tempfile.TemporaryDirectory(prefix="oa-sync-pg-") as data_dir:
        server = pgserver.get_server(data_dir, cleanup_mode="stop")
        try:
            yield server.get_uri()
        finally:
            server.cleanup()


def make_database(server_url: str, name: str, *, template: str | None = None) -> str:
    """Create database ``name`` (optionally from ``template``) and return its URL."""
    with psycopg.connect(_plain(server_url), autocommit=True) as conn:
        if template is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        else:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(template)
                )
            )
    return with_database(server_url, name)


def drop_database(server_url: str, name: str) -> None:
    """Drop database ``name``, ending any sessions still connected to it."""
    with psycopg.connect(_plain(server_url), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture(scope="session")
def migrated_template(pg_server_url: str) -> Iterator[str]:
    """The name of a database migrated to head once per session, used as a template."""
    name = "oa_tpl_" + secrets.token_hex(6)
    url = make_database(pg_server_url, name)
    try:
        upgrade(url)
        yield name
    finally:
        drop_database(pg_server_url, name)


@pytest.fixture
def database_url(pg_server_url: str, migrated_template: str) -> Iterator[str]:
    """A fresh database migrated to head, dropped after the test."""
    name = "oa_test_" + secrets.token_hex(6)
    url = make_database(pg_server_url, name, template=migrated_template)
    try:
        yield url
    finally:
        with contextlib.suppress(psycopg.Error):
            drop_database(pg_server_url, name)


@pytest.fixture
def empty_database(pg_server_url: str) -> Iterator[str]:
    """A new, empty database (not migrated), dropped after the test."""
    name = "oa_empty_" + secrets.token_hex(6)
    url = make_database(pg_server_url, name)
    try:
        yield url
    finally:
        with contextlib.suppress(psycopg.Error):
            drop_database(pg_server_url, name)


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An async engine on the test's database, disposed after the test."""
    created = create_engine(database_url)
    try:
        yield created
    finally:
        await created.dispose()
