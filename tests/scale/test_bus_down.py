"""An instance configured for the NATS bus starts and serves while NATS cannot be reached: its
hub reads Postgres as without a bus (no nats-server needed: nothing listens on the port)."""

from __future__ import annotations

from oa_sync_server.config import FanoutKind

from bench._nats import free_port
from bench._server import SECRET
from tests.live import make_live_server
from tests.scale._cluster import Appender, Client, expected_versions


async def test_unreachable_nats_falls_back_to_postgres(database_url: str) -> None:
    """With OA_SYNC_FANOUT=nats and no NATS server, a client still receives every change, all
    of them read from Postgres by the hub."""
    nats_url = f"nats://127.0.0.1:{free_port()}"
    async with make_live_server(
        database_url, secret=SECRET, fanout=FanoutKind.NATS, nats_url=nats_url
    ) as server:
        metrics = server.state.metrics
        async with Client(server.ws_url) as client:
            await Appender(server.engine).append(60)
            await server.settle()
            await client.converge(await expected_versions(server.engine), 10)
            client.check_order()
        assert metrics.hub_changes.labels("bus")._value.get() == 0
        assert metrics.hub_changes.labels("postgres")._value.get() > 0
        assert metrics.bus_published.labels("commit")._value.get() == 0
