"""The watermark lock and the last watermark in one call: ``oa_sync.lock_watermarks(key)``.

Revision ID: 0008_lock_watermarks
Revises: 0007_documents_key_collation
Create Date: 2026-12-04

Issues 12 and 13. Every writer of documents takes the transaction-scoped advisory lock on the
watermarks, then reads the highest watermark handed out (DESIGN.md rule 4). The read must be a
statement of its own: a statement's snapshot is taken when it starts, before any lock it then
waits for, so a read in the locking statement could miss the writer it waited for. That made
two round trips of every projector batch (and of every reprojection). A ``VOLATILE`` function
takes a fresh snapshot for each statement it runs (READ COMMITTED), so this one locks, then
reads with a snapshot that follows the lock, in one call: the projector makes it from the
statement that locks its lease row. A test holds the function on the lock while another
transaction writes a watermark and commits, and requires the function to return that
watermark. The key is the caller's (``stores.WATERMARK_LOCK``). Each statement is a constant.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0008_lock_watermarks"
down_revision: str | None = "0007_documents_key_collation"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_UPGRADE = """
CREATE FUNCTION oa_sync.lock_watermarks(lock_key bigint) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    last bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(lock_key);
    -- A new snapshot (this function is VOLATILE): it sees every writer that held the lock.
    SELECT greatest(
        (SELECT max(watermark) FROM oa_sync.changes),
        (SELECT max(watermark) FROM oa_sync.documents),
        0)
    INTO last;
    RETURN last;
END
$$
"""

_DOWNGRADE = "DROP FUNCTION oa_sync.lock_watermarks(bigint)"


def upgrade() -> None:
    """Create ``oa_sync.lock_watermarks``."""
    op.execute(_UPGRADE)


def downgrade() -> None:
    """Drop it (writers lock and read in two statements again)."""
    op.execute(_DOWNGRADE)
