"""The oa_sync schema: event log, checkpoints, documents, change log, leases, sync meta.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-25

DESIGN.md "Postgres model". Each statement is a constant: no SQL is built from values.
``sync_meta`` gets a fresh random ``epoch`` and ``retained_from = 0`` (every change since
watermark 0 is still in ``changes``).
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0001_initial"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_UPGRADE = (
    "CREATE SCHEMA IF NOT EXISTS oa_sync",
    """
    CREATE TABLE oa_sync.events (
        position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        stream_id text NOT NULL,
        stream_seq bigint NOT NULL CHECK (stream_seq >= 1),
        type text NOT NULL,
        payload jsonb NOT NULL,
        idempotency_key text NULL,
        tx_id xid8 NOT NULL DEFAULT pg_current_xact_id(),
        recorded_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        CONSTRAINT events_stream_seq_key UNIQUE (stream_id, stream_seq),
        CONSTRAINT events_idempotency_key_key UNIQUE (idempotency_key)
    )
    """,
    "CREATE INDEX events_tx_position_idx ON oa_sync.events (tx_id, position)",
    """
    CREATE TABLE oa_sync.projection_checkpoints (
        projection text NOT NULL,
        doc_key text NOT NULL,
        last_position bigint NOT NULL,
        projector_version integer NOT NULL,
        content_hash text NOT NULL,
        version bigint NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        PRIMARY KEY (projection, doc_key)
    )
    """,
    """
    CREATE TABLE oa_sync.documents (
        doc_key text PRIMARY KEY,
        projection text NOT NULL,
        version bigint NOT NULL,
        watermark bigint NOT NULL,
        content_hash text NOT NULL,
        body jsonb NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
    )
    """,
    "CREATE INDEX documents_watermark_idx ON oa_sync.documents (watermark)",
    "CREATE INDEX documents_doc_key_prefix_idx ON oa_sync.documents (doc_key text_pattern_ops)",
    "CREATE INDEX documents_projection_idx ON oa_sync.documents (projection, doc_key)",
    """
    CREATE TABLE oa_sync.changes (
        watermark bigint PRIMARY KEY,
        doc_key text NOT NULL,
        projection text NOT NULL,
        version bigint NOT NULL,
        content_hash text NOT NULL,
        committed_at timestamptz NOT NULL DEFAULT clock_timestamp()
    )
    """,
    "CREATE INDEX changes_doc_key_idx ON oa_sync.changes (doc_key text_pattern_ops, watermark)",
    """
    CREATE TABLE oa_sync.projector_leases (
        name text PRIMARY KEY,
        holder text NULL,
        epoch bigint NOT NULL DEFAULT 0,
        heartbeat_at timestamptz NULL,
        expires_at timestamptz NULL,
        cursor_tx_id xid8 NOT NULL DEFAULT '0'::xid8,
        cursor_position bigint NOT NULL DEFAULT 0
    )
    """,
    """
    CREATE TABLE oa_sync.sync_meta (
        key text PRIMARY KEY,
        value text NOT NULL
    )
    """,
    """
    INSERT INTO oa_sync.sync_meta (key, value)
    VALUES ('epoch', gen_random_uuid()::text), ('retained_from', '0')
    """,
)


def upgrade() -> None:
    """Create the schema and its tables."""
    for statement in _UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    """Drop the schema and everything in it."""
    op.execute("DROP SCHEMA oa_sync CASCADE")
