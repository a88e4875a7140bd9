"""The HTTP sink's tables: delivery checkpoints, per-document parity, dead letters.

Revision ID: 0002_http_sink
Revises: 0001_initial
Create Date: 2026-11-25

Issue 7. Described for queries in ``oa_sync_server.sinks.tables``. Each statement is a
constant: no SQL is built from values.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002_http_sink"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_UPGRADE = (
    """
    CREATE TABLE oa_sync.http_sink_checkpoints (
        sink text PRIMARY KEY,
        last_watermark bigint NOT NULL DEFAULT 0 CHECK (last_watermark >= 0),
        epoch text NULL,
        updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
    )
    """,
    """
    CREATE TABLE oa_sync.http_sink_parity (
        sink text NOT NULL,
        doc_key text NOT NULL,
        projection text NOT NULL,
        primary_version bigint NOT NULL,
        primary_hash text NOT NULL,
        shadow_version bigint NOT NULL DEFAULT 0,
        shadow_hash text NOT NULL DEFAULT '',
        shadow_delivered_at timestamptz NULL,
        last_error text NULL,
        PRIMARY KEY (sink, doc_key)
    )
    """,
    """
    CREATE TABLE oa_sync.http_sink_dead_letters (
        sink text NOT NULL,
        doc_key text NOT NULL,
        projection text NOT NULL,
        version bigint NOT NULL,
        status integer NOT NULL,
        response_body text NOT NULL,
        attempts integer NOT NULL,
        created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        PRIMARY KEY (sink, doc_key)
    )
    """,
    "CREATE INDEX http_sink_dead_letters_created_idx"
    " ON oa_sync.http_sink_dead_letters (sink, created_at)",
)

_DOWNGRADE = (
    "DROP TABLE oa_sync.http_sink_dead_letters",
    "DROP TABLE oa_sync.http_sink_parity",
    "DROP TABLE oa_sync.http_sink_checkpoints",
)


def upgrade() -> None:
    """Create the HTTP sink's tables."""
    for statement in _UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    """Drop the HTTP sink's tables."""
    for statement in _DOWNGRADE:
        op.execute(statement)
