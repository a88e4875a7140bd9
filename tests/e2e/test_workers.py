"""``oa-sync serve --workers 2`` as real processes: both workers accept connections on the one
port, every socket (whichever worker holds it) receives an update appended through any of them,
exactly one worker projects, and SIGTERM stops them all with exit code 0."""

from __future__ import annotations

import asyncio
import json
import signal

import aiohttp
import psutil
import pytest
import sqlalchemy as sa
from oa_sync_server.auth import mint_token
from oa_sync_server.postgres import create_engine

from tests.serve_process import ServeProcess, serve_process

TWO_WORKERS = ("--workers", "2")
SOCKETS = 40
WAIT_S = 60.0
RUN = "runtime/run_summary:"


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_two_workers_share_the_port_and_the_live_stream(database_url: str) -> None:
    """Two worker processes both hold some of 40 sockets, each socket gets an update appended
    through the port, one worker holds the projector lease, and SIGTERM stops everything."""
    server = ServeProcess(database_url, args=TWO_WORKERS, allow_own_origin=False)
    secret = server.secret
    token = mint_token(secret, subject="w", topics=["*"], scopes=["sync:read", "sync:append"])
    headers = {"Authorization": f"Bearer {token}"}
    try:
        url = await server.start()
        port = server.port
        children = psutil.Process(server.pid).children()
        assert len(children) == 2
        async with aiohttp.ClientSession() as http:
            sockets = []
            for i in range(SOCKETS):
                reader = mint_token(secret, subject=f"r{i}", topics=["*"], scopes=["sync:read"])
                ws = await http.ws_connect(
                    url.replace("http", "ws") + "/v1/sync",
                    protocols=("oa-sync.v1.json",),
                    headers={"Authorization": f"Bearer {reader}"},
                )
                await ws.send_str(
                    json.dumps({"subscribe": {"subscriptionId": "s", "topics": [RUN + "*"]}})
                )
                sockets.append(ws)
            for ws in sockets:
                async with asyncio.timeout(WAIT_S):
                    while "synced" not in json.loads((await ws.receive()).data):
                        pass
            held = [
                sum(
                    1
                    for c in getattr(child, "net_connections", child.connections)("tcp")
                    if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED
                )
                for child in children
            ]
            assert all(count > 0 for count in held), held
            body = {
                "events": [
                    {"streamId": "run:w1", "type": "run.created", "payload": {"runId": "w1"}}
                ]
            }
            async with http.post(f"{url}/v1/events", json=body, headers=headers) as response:
                assert response.status == 200, await response.text()
            for ws in sockets:
                async with asyncio.timeout(WAIT_S):
                    while True:
                        frame = json.loads((await ws.receive()).data)
                        if "update" in frame:
                            assert frame["update"]["docKey"] == RUN + "w1"
                            break
                await ws.close()
        engine = create_engine(database_url)
        try:
            async with engine.connect() as conn:
                holders = [
                    row.holder
                    for row in await conn.execute(
                        sa.text("SELECT holder FROM oa_sync.projector_leases")
                    )
                ]
        finally:
            await engine.dispose()
        assert len(holders) == 1  # one lease, held by one of the workers
        assert int(holders[0].split(":")[1]) in {child.pid for child in children}
        assert await server.stop() == 0
        assert not any(child.is_running() and child.status() != "zombie" for child in children)
    finally:
        await server.stop(signal.SIGKILL)


@pytest.mark.slow
async def test_workers_stop_when_their_supervisor_is_killed(database_url: str) -> None:
    """Killing the supervisor (SIGKILL, no chance to clean up) stops its workers too: they
    see their standard input close and shut down instead of lingering as orphans."""
    async with serve_process(database_url, args=TWO_WORKERS, allow_own_origin=False) as server:
        children = psutil.Process(server.pid).children()
        assert len(children) == 2
        await server.stop(signal.SIGKILL)
        _, alive = await asyncio.to_thread(psutil.wait_procs, children, timeout=30)
        assert alive == []
