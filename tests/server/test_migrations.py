"""The alembic migrations: up to head, down to base, and the schema they create."""

from __future__ import annotations

import secrets

import psycopg
from oa_sync_server.postgres.migrate import downgrade, upgrade

from tests.pg import drop_database, make_database

TABLES = {
    "events",
    "projection_checkpoints",
    "documents",
    "changes",
    "projector_leases",
    "sync_meta",
    "http_sink_checkpoints",
    "http_sink_parity",
    "http_sink_dead_letters",
}


def _tables(url: str) -> set[str]:
    with psycopg.connect(url.replace("+psycopg", "")) as conn:
        rows = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'oa_sync'"
        ).fetchall()
    return {r[0] for r in rows}


def test_upgrade_head_then_downgrade_base_round_trips(pg_server_url: str) -> None:
    """Upgrade creates every table, downgrade drops the schema, and upgrade works again."""
    name = "oa_mig_" + secrets.token_hex(6)
    url = make_database(pg_server_url, name)
    try:
        upgrade(url)
        assert _tables(url) == TABLES
        downgrade(url)
        assert _tables(url) == set()
        upgrade(url)
        assert _tables(url) == TABLES
    finally:
        drop_database(pg_server_url, name)


def test_first_migration_sets_a_random_epoch(database_url: str) -> None:
    """A migrated database holds a uuid epoch and retains changes from watermark 0."""
    with psycopg.connect(database_url.replace("+psycopg", "")) as conn:
        meta = dict(conn.execute("SELECT key, value FROM oa_sync.sync_meta").fetchall())
    assert len(meta["epoch"]) == 36
    assert meta["retained_from"] == "0"
