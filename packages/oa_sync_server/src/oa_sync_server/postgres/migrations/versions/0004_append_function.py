"""One round trip per append: the ``oa_sync.append_events`` function.

Revision ID: 0004_append_function
Revises: 0003_projection_writes
Create Date: 2026-12-03

Issue 13. An append used to be BEGIN, three statements (bucket locks + xid + NOTIFY; each
stream's last row and the known idempotency keys; the insert) and COMMIT: five round trips
after the pool's pre-ping, each 0.1-1 ms, against one for a single-row commit. This function
does the same work in one call, so :class:`~oa_sync_server.postgres.event_log.PostgresEventLog`
runs it as one autocommit statement (or inside the caller's transaction). It keeps the old
semantics exactly:

1. ``pg_advisory_xact_lock`` on the given sorted lock buckets (array order), then the
   transactional ``pg_notify('oa_sync_events', '')``;
2. one statement (a fresh snapshot, taken after the locks: in READ COMMITTED each statement of
   a VOLATILE function sees what committed before it) reads each stream's last
   ``(stream_seq, tx_id)`` and the batch's known idempotency keys and plans the batch the way
   :func:`oa_sync_core.plan_append` does: a key recorded before, or repeated later in the
   batch, is a replay (no row, the original position); every other event gets its stream's
   next ``stream_seq`` in batch order; an ``expected_seq`` is checked against the seq before
   it. A stream last written by a *newer* transaction is reported (``status = 'order'``, the
   per-stream order guard), then the first ``expected_seq`` mismatch in batch order
   (``status = 'expected'``); either way nothing is written and the caller's transaction stays
   usable (no SQL error);
3. inserts the planned rows in batch order (positions follow it) and returns every event's
   position in batch order (``status = 'ok'``).

The rows are one ``jsonb`` array of objects ``{stream_id, type, payload, expected_seq,
idempotency_key}``. Each statement is a constant.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004_append_function"
down_revision: str | None = "0003_projection_writes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_FUNCTION = r"""
CREATE FUNCTION oa_sync.append_events(
    p_space integer, p_buckets integer[], p_rows jsonb,
    OUT status text, OUT positions bigint[], OUT detail jsonb
) LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    v_mismatch jsonb;
BEGIN
    PERFORM count(pg_advisory_xact_lock(p_space, b)) FROM unnest(p_buckets) AS b;
    PERFORM pg_notify('oa_sync_events', '');
    WITH input AS (
        SELECT r.n, r.stream_id, r.type, r.payload, r.expected_seq, r.idempotency_key AS key
        FROM ROWS FROM (jsonb_to_recordset(p_rows) AS (
            stream_id text, type text, payload jsonb, expected_seq bigint, idempotency_key text
        )) WITH ORDINALITY AS r(stream_id, type, payload, expected_seq, idempotency_key, n)
    ), last AS (
        SELECT s.stream_id, coalesce(e.stream_seq, 0) AS seq, e.tx_id
        FROM (SELECT DISTINCT stream_id FROM input) AS s
        LEFT JOIN LATERAL (
            SELECT stream_seq, tx_id FROM oa_sync.events WHERE stream_id = s.stream_id
            ORDER BY stream_seq DESC LIMIT 1
        ) AS e ON true
    ), known AS (
        SELECT idempotency_key AS key, position FROM oa_sync.events
        WHERE idempotency_key IN (SELECT key FROM input WHERE key IS NOT NULL)
    ), marked AS (
        SELECT i.*, k.position AS known_position,
            (k.key IS NOT NULL OR (i.key IS NOT NULL
                AND row_number() OVER (PARTITION BY i.key COLLATE "C" ORDER BY i.n) > 1)) AS replay
        FROM input AS i LEFT JOIN known AS k ON k.key = i.key
    ), planned AS (
        SELECT m.*, CASE WHEN NOT m.replay THEN l.seq + row_number() OVER (
                PARTITION BY m.stream_id COLLATE "C", m.replay ORDER BY m.n) END AS stream_seq
        FROM marked AS m JOIN last AS l USING (stream_id)
    ), verdict AS (
        SELECT
            (SELECT jsonb_build_object('stream', stream_id, 'seq', seq) FROM last
             WHERE tx_id > pg_current_xact_id() LIMIT 1) AS conflict,
            (SELECT jsonb_build_object(
                    'stream', stream_id, 'expected', expected_seq, 'actual', stream_seq - 1)
             FROM planned WHERE stream_seq IS NOT NULL AND expected_seq IS NOT NULL
                 AND expected_seq <> stream_seq - 1
             ORDER BY n LIMIT 1) AS mismatch
    ), ins AS (
        INSERT INTO oa_sync.events (stream_id, stream_seq, type, payload, idempotency_key)
        SELECT stream_id, stream_seq, type, payload, key FROM planned
        WHERE stream_seq IS NOT NULL
            AND (SELECT conflict IS NULL AND mismatch IS NULL FROM verdict)
        ORDER BY n
        RETURNING stream_id, stream_seq, position, idempotency_key
    )
    SELECT v.conflict, v.mismatch, (
        SELECT array_agg(coalesce(p.known_position, w.position, k.position) ORDER BY p.n)
        FROM planned AS p
        LEFT JOIN ins AS w ON p.stream_seq IS NOT NULL
            AND w.stream_id = p.stream_id AND w.stream_seq = p.stream_seq
        LEFT JOIN ins AS k ON p.stream_seq IS NULL AND p.known_position IS NULL
            AND k.idempotency_key = p.key
    )
    INTO detail, v_mismatch, positions
    FROM verdict AS v;
    IF detail IS NOT NULL THEN
        status := 'order';
        positions := NULL;
    ELSIF v_mismatch IS NOT NULL THEN
        status := 'expected';
        detail := v_mismatch;
        positions := NULL;
    ELSE
        status := 'ok';
    END IF;
END
$fn$
"""


def upgrade() -> None:
    """Create the append function."""
    op.execute(_FUNCTION)


def downgrade() -> None:
    """Drop the append function."""
    op.execute("DROP FUNCTION oa_sync.append_events(integer, integer[], jsonb)")
