"""SQLAlchemy Core descriptions of the HTTP sink's tables (migration ``0002_http_sink``).

They share the ``oa_sync`` :data:`~oa_sync_server.postgres.tables.metadata`; alembic creates them,
this module only describes them for queries. ``sink`` names the delivery lane (``"http"`` by
default) so that several endpoints could share the schema.

* ``http_sink_checkpoints`` — per sink, the change-log watermark delivered up to, and the
  log epoch it refers to (a new epoch restarts it from 0).
* ``http_sink_parity`` — per sink and document: what the primary (Postgres read model) held and
  what the shadow (HTTP endpoint) acknowledged at the last delivery, and the last error.
* ``http_sink_dead_letters`` — per sink and document: the latest version refused with a
  non-retryable status, with the response body.
"""

from __future__ import annotations

import sqlalchemy as sa

from oa_sync_server.postgres.tables import metadata

__all__ = ["http_sink_checkpoints", "http_sink_dead_letters", "http_sink_parity"]

http_sink_checkpoints = sa.Table(
    "http_sink_checkpoints",
    metadata,
    sa.Column("sink", sa.Text, primary_key=True),
    sa.Column("last_watermark", sa.BigInteger, nullable=False),
    sa.Column("epoch", sa.Text, nullable=True),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

http_sink_parity = sa.Table(
    "http_sink_parity",
    metadata,
    sa.Column("sink", sa.Text, primary_key=True),
    sa.Column("doc_key", sa.Text, primary_key=True),
    sa.Column("projection", sa.Text, nullable=False),
    sa.Column("primary_version", sa.BigInteger, nullable=False),
    sa.Column("primary_hash", sa.Text, nullable=False),
    sa.Column("shadow_version", sa.BigInteger, nullable=False),
    sa.Column("shadow_hash", sa.Text, nullable=False),
    sa.Column("shadow_delivered_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
)

http_sink_dead_letters = sa.Table(
    "http_sink_dead_letters",
    metadata,
    sa.Column("sink", sa.Text, primary_key=True),
    sa.Column("doc_key", sa.Text, primary_key=True),
    sa.Column("projection", sa.Text, nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("response_body", sa.Text, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)
