"""One index for a document's key: ``documents.doc_key`` in the "C" collation.

Revision ID: 0007_documents_key_collation
Revises: 0006_append_without_keys
Create Date: 2026-12-04

Issue 13. ``documents`` had two indexes on ``doc_key``: the primary key (in the database's
collation) for exact reads, and ``documents_doc_key_prefix_idx`` (``text_pattern_ops``) for
the prefix reads of topics like ``runtime/run_summary:*`` (``LIKE 'prefix%'`` can use a
btree only when the index compares bytes). A document's watermark changes on every write, so
no document update is HOT and each one inserts into every index. With the column in the "C"
collation the primary key compares bytes, serves both reads (and the byte order the read
model already sorts by), and the second index goes. Same-run A/B of ``bench/projection.py``
(200,000 events, 10,000 documents, local Postgres 15): 33,600-33,900 events/s as before,
36,700-38,700 with the one index. Keys are compared for equality everywhere else, which does
not depend on the collation. Changing the column's collation rebuilds the primary key
(``ALTER TABLE`` rewrites the index, not the rows' values). Each statement is a constant.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0007_documents_key_collation"
down_revision: str | None = "0006_append_without_keys"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_UPGRADE = (
    "DROP INDEX oa_sync.documents_doc_key_prefix_idx",
    'ALTER TABLE oa_sync.documents ALTER COLUMN doc_key TYPE text COLLATE "C"',
)

_DOWNGRADE = (
    'ALTER TABLE oa_sync.documents ALTER COLUMN doc_key TYPE text COLLATE "default"',
    "CREATE INDEX documents_doc_key_prefix_idx ON oa_sync.documents (doc_key text_pattern_ops)",
)


def upgrade() -> None:
    """Put the key in the "C" collation (the primary key then serves prefix reads)."""
    for statement in _UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    """Restore the database's collation and the prefix index."""
    for statement in _DOWNGRADE:
        op.execute(statement)
