"""The embedded Postgres starts under a data directory, answers queries and stops cleanly."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from oa_sync_server.errors import EmbeddedPostgresError
from oa_sync_server.postgres.embedded import EmbeddedPostgres


async def test_embedded_postgres_starts_answers_and_stops(tmp_path: Path) -> None:
    """An embedded Postgres under DATA_DIR accepts connections and is gone after stop."""
    pg = EmbeddedPostgres(tmp_path / "data")
    with pytest.raises(EmbeddedPostgresError):
        _ = pg.url
    async with pg:
        url = pg.url
        assert url.startswith("postgresql://")
        async with await psycopg.AsyncConnection.connect(url) as conn:
            cur = await conn.execute("SELECT 1 + 1")
            assert await cur.fetchone() == (2,)
        assert (tmp_path / "data" / "pg" / "PG_VERSION").exists()
    # pg_ctl stop -w returns once the postmaster has exited and removed its pid file.
    assert not (tmp_path / "data" / "pg" / "postmaster.pid").exists()
