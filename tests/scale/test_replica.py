"""Catch-up reads from a read replica: a second local database stands in for the replica, fed
by the test with a delay (a streaming replica cannot be built here)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import psycopg
import pytest

from bench._server import SECRET
from tests.live import make_live_server
from tests.pg import drop_database, make_database
from tests.scale._cluster import Appender, Client, expected_versions

TABLES = ("documents", "changes")


@pytest.fixture
def replica_url(pg_server_url: str, migrated_template: str) -> Iterator[str]:
    """A second migrated database, empty: the replica before it received anything."""
    name = "oa_replica_" + secrets.token_hex(6)
    url = make_database(pg_server_url, name, template=migrated_template)
    try:
        yield url
    finally:
        drop_database(pg_server_url, name)


def replicate(primary: str, replica: str) -> None:
    """Bring the replica to the primary's state now (what streaming replication does later)."""
    plain = [u.replace("postgresql+psycopg://", "postgresql://", 1) for u in (primary, replica)]
    with psycopg.connect(plain[0]) as src, psycopg.connect(plain[1]) as dst:
        for table in TABLES:
            dst.execute(f"TRUNCATE oa_sync.{table}")  # a fixed table name, no input
            with (
                src.cursor().copy(f"COPY oa_sync.{table} TO STDOUT") as out,
                dst.cursor().copy(f"COPY oa_sync.{table} FROM STDIN") as into,
            ):
                for block in out:
                    into.write(block)
        for key, value in src.execute("SELECT key, value FROM oa_sync.sync_meta"):
            dst.execute("UPDATE oa_sync.sync_meta SET value = %s WHERE key = %s", (value, key))
        dst.commit()


async def test_catch_up_reads_replica_only_once_it_reached_the_watermark(
    database_url: str, replica_url: str
) -> None:
    """A subscription's snapshot reads the primary while the replica lags the hub's watermark
    and the replica once it has caught up; either way the client converges to the primary's
    documents and the live feed is unchanged."""
    async with make_live_server(
        database_url, secret=SECRET, read_replica_url=replica_url
    ) as server:
        reads = server.state.metrics.catch_up_reads
        appender = Appender(server.engine)
        await appender.append(80)
        await server.settle()
        expected = await expected_versions(server.engine)

        async with Client(server.ws_url) as lagging:  # replica empty: another epoch, behind
            await lagging.converge(expected, 10)
        assert reads.labels("primary")._value.get() == 1
        assert reads.labels("replica")._value.get() == 0

        replicate(database_url, replica_url)
        async with Client(server.ws_url) as current:
            await current.converge(expected, 10)
            await appender.append(40)  # the live feed still comes from the primary's hub
            await server.settle()
            expected = await expected_versions(server.engine)
            await current.converge(expected, 10)
            current.check_order()
        assert reads.labels("replica")._value.get() == 1

        async with Client(server.ws_url) as behind:  # replica lags the new changes again
            await behind.converge(expected, 10)
        assert reads.labels("primary")._value.get() == 2
