"""The alembic migrations: up to head, down to base, and the schema they create."""

from __future__ import annotations

import psycopg
from oa_sync_server.postgres.migrate import downgrade, upgrade

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


def test_upgrade_head_then_downgrade_base_round_trips(empty_database: str) -> None:
    """Upgrade creates every table, downgrade drops the schema, and upgrade works again."""
    upgrade(empty_database)
    assert _tables(empty_database) == TABLES
    downgrade(empty_database)
    assert _tables(empty_database) == set()
    upgrade(empty_database)
    assert _tables(empty_database) == TABLES


def test_first_migration_sets_a_random_epoch(database_url: str) -> None:
    """A migrated database holds a uuid epoch and retains changes from watermark 0."""
    with psycopg.connect(database_url.replace("+psycopg", "")) as conn:
        meta = dict(conn.execute("SELECT key, value FROM oa_sync.sync_meta").fetchall())
    assert len(meta["epoch"]) == 36
    assert meta["retained_from"] == "0"


def test_migrations_match_the_table_definitions(database_url: str) -> None:
    """The schema the migrations create is the one ``tables.py`` (and the sink's tables)
    describe: alembic's ``compare_metadata`` finds no table or column missing on either side
    and no difference in column type or nullability."""
    import warnings

    import sqlalchemy as sa
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from oa_sync_server.postgres import tables
    from oa_sync_server.sinks import tables as sink_tables  # noqa: F401 - registers its tables

    engine = sa.create_engine(database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn,
                opts={
                    "include_schemas": True,
                    "include_name": lambda name, kind, _parent: (
                        kind != "schema" or name == tables.SCHEMA
                    ),
                    "compare_type": True,
                    "compare_server_default": False,
                },
            )
            with warnings.catch_warnings():
                # Reflection has no xid8 type (the log's tx_id columns): compared below.
                warnings.filterwarnings("ignore", "Did not recognize type 'xid8'", sa.exc.SAWarning)
                diff = compare_metadata(context, tables.metadata)
    finally:
        engine.dispose()
    # tables.py declares tables and columns only; the indexes and unique constraints exist in the
    # migrations alone (queries do not need them in the metadata).
    by_design = {"remove_index", "remove_constraint"}
    schema_diff = [d for d in diff if (d[0][0] if isinstance(d, list) else d[0]) not in by_design]
    assert schema_diff == []
    assert diff, "the migrations' indexes should show up as unknown to the metadata"


def _indexes(url: str) -> set[str]:
    with psycopg.connect(url.replace("+psycopg", "")) as conn:
        rows = conn.execute(
            "SELECT indexname FROM pg_indexes WHERE schemaname = 'oa_sync'"
        ).fetchall()
    return {r[0] for r in rows}


def test_0005_drops_the_unread_changes_index_and_its_downgrade_restores_it(
    empty_database: str,
) -> None:
    """Head has no ``changes_doc_key_idx``; downgrading to 0004 creates it again and
    upgrading drops it again."""
    upgrade(empty_database)
    assert "changes_doc_key_idx" not in _indexes(empty_database)
    assert "changes_pkey" in _indexes(empty_database)
    downgrade(empty_database, "0004_append_function")
    assert "changes_doc_key_idx" in _indexes(empty_database)
    upgrade(empty_database)
    assert "changes_doc_key_idx" not in _indexes(empty_database)


def _append_function(url: str) -> str:
    with psycopg.connect(url.replace("+psycopg", "")) as conn:
        row = conn.execute(
            "SELECT prosrc FROM pg_proc WHERE oid = "
            "'oa_sync.append_events(integer, integer[], jsonb)'::regprocedure"
        ).fetchone()
    assert row is not None
    return str(row[0])


def test_0006_replaces_the_append_function_and_its_downgrade_restores_0004s(
    empty_database: str,
) -> None:
    """At 0005 the append function is 0004's; 0006 replaces it with the one that tests for
    idempotency keys first, and downgrading to 0005 gives back 0004's body exactly."""
    upgrade(empty_database, "0005_drop_changes_doc_key_idx")
    before = _append_function(empty_database)
    assert "jsonb_path_exists" not in before
    upgrade(empty_database)
    assert "jsonb_path_exists" in _append_function(empty_database)
    downgrade(empty_database, "0005_drop_changes_doc_key_idx")
    assert _append_function(empty_database) == before


def _key_collation(url: str) -> str | None:
    with psycopg.connect(url.replace("+psycopg", "")) as conn:
        row = conn.execute(
            "SELECT collation_name FROM information_schema.columns "
            "WHERE table_schema = 'oa_sync' AND table_name = 'documents' "
            "AND column_name = 'doc_key'"
        ).fetchone()
    assert row is not None
    return None if row[0] is None else str(row[0])


def test_0007_one_key_index_serves_prefix_reads_and_its_downgrade_restores_two(
    empty_database: str,
) -> None:
    """Head keys documents in the "C" collation with only the primary key on ``doc_key``, and
    a prefix read (escaped, as the read model sends it) uses that key; downgrading to 0006
    restores the database's collation and the ``text_pattern_ops`` index."""
    upgrade(empty_database)
    assert _key_collation(empty_database) == "C"
    assert "documents_doc_key_prefix_idx" not in _indexes(empty_database)
    with psycopg.connect(empty_database.replace("+psycopg", "")) as conn:
        conn.execute("SET LOCAL enable_seqscan = off")  # an empty table: ask for an index
        plan = conn.execute(
            "EXPLAIN SELECT doc_key FROM oa_sync.documents "
            "WHERE doc_key LIKE 'runtime/run\\_summary:%' ESCAPE '\\'"
        ).fetchall()
    assert "documents_pkey" in "\n".join(r[0] for r in plan)
    downgrade(empty_database, "0006_append_without_keys")
    assert _key_collation(empty_database) is None
    assert "documents_doc_key_prefix_idx" in _indexes(empty_database)
    upgrade(empty_database)
    assert _key_collation(empty_database) == "C"


def _has_lock_watermarks(url: str) -> bool:
    with psycopg.connect(url.replace("+psycopg", "")) as conn:
        row = conn.execute(
            "SELECT to_regprocedure('oa_sync.lock_watermarks(bigint)') IS NOT NULL"
        ).fetchone()
    assert row is not None
    return bool(row[0])


def test_0008_adds_lock_watermarks_and_its_downgrade_drops_it(empty_database: str) -> None:
    """Head has ``oa_sync.lock_watermarks`` (what every writer of documents calls); 0007 has
    not, and upgrading again restores it."""
    upgrade(empty_database)
    assert _has_lock_watermarks(empty_database)
    downgrade(empty_database, "0007_documents_key_collation")
    assert not _has_lock_watermarks(empty_database)
    upgrade(empty_database)
    assert _has_lock_watermarks(empty_database)
