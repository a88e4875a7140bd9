"""SQLAlchemy Core descriptions of the ``oa_sync`` tables, for building queries.

The tables are created only by the alembic migrations (``alembic/versions``); this metadata
must match them but is never used to create anything. What this is not: an ORM.
"""

from __future__ import annotations

from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import UserDefinedType

__all__ = [
    "CHANGES_CHANNEL",
    "CHANGES_HINT_SQL",
    "EPOCH_SQL",
    "EVENTS_CHANNEL",
    "NOTIFY_CHANGES",
    "SCHEMA",
    "Xid8",
    "changes",
    "changes_hint",
    "checkpoints",
    "documents",
    "events",
    "leases",
    "metadata",
    "sync_meta",
]

SCHEMA: Final = "oa_sync"

CHANGES_CHANNEL: Final = "oa_sync_changes"
"""NOTIFY channel of the document writers' commits (payload ``<epoch>:<new last watermark>``,
see :func:`changes_hint`; only a hint)."""
EVENTS_CHANNEL: Final = "oa_sync_events"
"""NOTIFY channel of appends (empty payload; delivered at commit, so only a hint)."""
EPOCH_SQL: Final = "(SELECT value FROM oa_sync.sync_meta WHERE key = 'epoch')"
"""The log epoch, as an SQL expression."""
CHANGES_HINT_SQL: Final = f"{EPOCH_SQL} || ':' || CAST(CAST(:watermark AS bigint) AS text)"
"""The payload of a commit's hint on :data:`CHANGES_CHANNEL`, as an SQL expression: evaluated
in the writer's transaction after its watermark lock, so the epoch is its watermarks'."""
_NOTIFY_CHANGES_SQL: Final = f"SELECT pg_notify(:channel, {CHANGES_HINT_SQL})"  # constants
NOTIFY_CHANGES: Final = sa.text(_NOTIFY_CHANGES_SQL).bindparams(channel=CHANGES_CHANNEL)
"""A document writer's commit-time hint; execute with ``{"watermark": str(w)}`` inside the
transaction that holds the watermark lock."""


def changes_hint(payload: str) -> tuple[str, int] | None:
    """The ``(epoch, watermark)`` a hint on :data:`CHANGES_CHANNEL` names, or ``None`` for a
    payload of any other form (a listener then reads, as for a hint that names nothing)."""
    epoch, colon, watermark = payload.rpartition(":")
    if not (colon and epoch and watermark.isascii() and watermark.isdigit()) or len(watermark) > 19:
        return None
    return epoch, int(watermark)


class Xid8(UserDefinedType[int]):
    """Postgres ``xid8`` (a 64-bit transaction id), read and written as a Python ``int``."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "xid8"

    def bind_expression(self, bindvalue: Any) -> Any:
        return sa.cast(sa.cast(bindvalue, sa.Text), XID8_LITERAL)

    def column_expression(self, colexpr: Any) -> Any:
        return sa.cast(sa.cast(colexpr, sa.Text), sa.BigInteger)


class _Xid8Literal(UserDefinedType[str]):
    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "xid8"


XID8_LITERAL: Final = _Xid8Literal()

metadata = sa.MetaData(schema=SCHEMA)

events = sa.Table(
    "events",
    metadata,
    sa.Column("position", sa.BigInteger, sa.Identity(always=True), primary_key=True),
    sa.Column("stream_id", sa.Text, nullable=False),
    sa.Column("stream_seq", sa.BigInteger, nullable=False),
    sa.Column("type", sa.Text, nullable=False),
    sa.Column("payload", JSONB(none_as_null=True), nullable=False),
    sa.Column("idempotency_key", sa.Text, nullable=True),
    sa.Column("tx_id", Xid8, nullable=False, server_default=sa.text("pg_current_xact_id()")),
    sa.Column(
        "recorded_at",
        sa.DateTime(timezone=True),
        nullable=False,
        server_default=sa.text("clock_timestamp()"),
    ),
)

checkpoints = sa.Table(
    "projection_checkpoints",
    metadata,
    sa.Column("projection", sa.Text, primary_key=True),
    sa.Column("doc_key", sa.Text, primary_key=True),
    sa.Column("last_position", sa.BigInteger, nullable=False),
    sa.Column("projector_version", sa.Integer, nullable=False),
    sa.Column("content_hash", sa.Text, nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

documents = sa.Table(
    "documents",
    metadata,
    sa.Column("doc_key", sa.Text(collation="C"), primary_key=True),  # 0007
    sa.Column("projection", sa.Text, nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("watermark", sa.BigInteger, nullable=False),
    sa.Column("content_hash", sa.Text, nullable=False),
    sa.Column("body", JSONB(none_as_null=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

changes = sa.Table(
    "changes",
    metadata,
    sa.Column("watermark", sa.BigInteger, primary_key=True),
    sa.Column("doc_key", sa.Text, nullable=False),
    sa.Column("projection", sa.Text, nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("content_hash", sa.Text, nullable=False),
    sa.Column("committed_at", sa.DateTime(timezone=True), nullable=False),
)

leases = sa.Table(
    "projector_leases",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("holder", sa.Text, nullable=True),
    sa.Column("epoch", sa.BigInteger, nullable=False),
    sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("cursor_tx_id", Xid8, nullable=False),
    sa.Column("cursor_position", sa.BigInteger, nullable=False),
)

sync_meta = sa.Table(
    "sync_meta",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)
