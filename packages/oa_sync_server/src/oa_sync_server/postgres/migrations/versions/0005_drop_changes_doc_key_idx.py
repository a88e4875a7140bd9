"""Cheaper change rows: drop ``changes_doc_key_idx``, which no query reads.

Revision ID: 0005_drop_changes_doc_key_idx
Revises: 0004_append_function
Create Date: 2026-12-04

Issue 13. Every projected document writes one ``changes`` row, and each row paid for two
indexes: the primary key (``watermark``) and ``changes_doc_key_idx`` (``doc_key
text_pattern_ops, watermark``). Every read of ``changes`` is by watermark (the newest
watermark, the retention bound, pruning); the live path, resume and the HTTP sink read
``documents`` by watermark instead (see docs/design.md), so the second index was only ever
written. EXPLAIN ANALYZE of the projector's 1,000-document write, same run: the ``changes``
insert 11-20 ms with the index, 5-9 ms without it. Each statement is a constant.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005_drop_changes_doc_key_idx"
down_revision: str | None = "0004_append_function"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Drop the unread index."""
    op.execute("DROP INDEX oa_sync.changes_doc_key_idx")


def downgrade() -> None:
    """Create the index again."""
    op.execute(
        "CREATE INDEX changes_doc_key_idx ON oa_sync.changes (doc_key text_pattern_ops, watermark)"
    )
