"""Every WebSocket limit: its documented close code or error frame, and its metric."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from oa_sync_server.config import Limits

from tests.e2e import raw_ws
from tests.live import LiveServer, make_live_server

RUN = "runtime/run_summary:"
SLOW_BATCHES = 12  # of 500 documents of ~2 KB: enough to overflow the feed and socket buffers


@contextlib.asynccontextmanager
async def server_with(database_url: str, **overrides: Any) -> AsyncIterator[LiveServer]:
    async with make_live_server(database_url, **overrides) as server:
        yield server


def breaches(server: LiveServer, kind: str) -> float:
    value = server.state.metrics.registry.get_sample_value(
        "oa_sync_limit_breaches_total", {"kind": kind}
    )
    return value or 0.0


async def kinds_until_close(client: raw_ws.RawClient) -> tuple[list[str], int | None]:
    """The kinds of the frames received until the server closed, and its close code."""
    kinds: list[str] = []
    try:
        while True:
            kind, _ = await client.recv()
            kinds.append(kind)
    except raw_ws.ClosedError as closed:
        return kinds, closed.code


async def upgrade_status(server: LiveServer, headers: dict[str, str]) -> int:
    """The HTTP status of a WebSocket upgrade with these headers (101 when it succeeds)."""
    try:
        async with raw_ws.connect(server.ws_url, headers=headers):
            return 101
    except aiohttp.WSServerHandshakeError as exc:
        return exc.status


async def test_origin_allowlist_refuses_before_upgrade(database_url: str) -> None:
    """Listed Origins (or none) upgrade, others 403; no list refuses any Origin; * allows all."""
    async with server_with(database_url, allowed_origins=("https://app.example",)) as server:
        assert await upgrade_status(server, {"Origin": "https://app.example"}) == 101
        assert await upgrade_status(server, {"Origin": "https://app.example/"}) == 101
        for origin in (
            "https://evil.example",
            "http://app.example",
            "https://app.example:8443",
            "https://app.example.evil.example",
            "null",
        ):
            assert await upgrade_status(server, {"Origin": origin}) == 403, origin
        assert await upgrade_status(server, {}) == 101  # non-browser clients send none
    async with server_with(database_url) as server:
        assert await upgrade_status(server, {}) == 101
        assert await upgrade_status(server, {"Origin": "https://anything.example"}) == 403
    async with server_with(database_url, allowed_origins=("*",)) as server:
        assert await upgrade_status(server, {"Origin": "https://anything.example"}) == 101


async def test_permessage_deflate_is_never_negotiated(live_server: LiveServer) -> None:
    """A client offering compression gets an uncompressed connection."""
    async with raw_ws.connect(live_server.ws_url, compress=15) as client:
        assert client.ws.compress == 0
        await client.authenticate(live_server.token())
        await client.ping()


async def test_oversized_message_closes_4413(database_url: str) -> None:
    """A message over max_message_bytes closes with 4413 and counts as message_size."""
    async with server_with(database_url, limits=Limits(max_message_bytes=2048)) as server:
        async with raw_ws.session(server.ws_url, server.token()) as client:
            await client.send({"ping": {"nonce": "x" * 1900}})
            await client.recv()  # just under the limit: a pong
            await client.send({"ping": {"nonce": "x" * 3000}})
            assert await client.close_code() == 4413
        assert breaches(server, "message_size") == 1


async def test_message_flood_closes_4429(database_url: str) -> None:
    """More messages than the token bucket allows closes with 4429 and counts as rate."""
    limits = Limits(messages_per_second=1, message_burst=5)
    async with server_with(database_url, limits=limits) as server:
        async with raw_ws.session(server.ws_url, server.token()) as client:
            for i in range(20):
                try:
                    await client.send({"ping": {"nonce": str(i)}})
                except ConnectionResetError:
                    break
            assert await client.close_code() == 4429
        assert breaches(server, "rate") >= 1


async def test_too_many_subscriptions_is_an_error_frame(database_url: str) -> None:
    """The subscription past max_subscriptions gets an error frame; the connection goes on."""
    async with server_with(database_url, limits=Limits(max_subscriptions=2)) as server:
        async with raw_ws.session(server.ws_url, server.token()) as client:
            await client.snapshot("a", [f"{RUN}a"])
            await client.snapshot("b", [f"{RUN}b"])
            await client.subscribe("c", [f"{RUN}c"])
            _, error = await client.until("error")
            assert error["code"] == "too_many_subscriptions"
            assert error["subscriptionId"] == "c"
            await client.send({"unsubscribe": {"subscriptionId": "a"}})
            await client.snapshot("c", [f"{RUN}c"])  # room again
            await client.ping()
        assert breaches(server, "subscriptions") == 1


async def test_too_many_topics_is_an_error_frame(database_url: str) -> None:
    """A subscribe with more than max_topics_per_subscription topics gets an error frame."""
    async with server_with(database_url, limits=Limits(max_topics_per_subscription=2)) as server:
        async with raw_ws.session(server.ws_url, server.token()) as client:
            await client.subscribe("s", [f"{RUN}a", f"{RUN}b", f"{RUN}c"])
            _, error = await client.until("error")
            assert error["code"] == "too_many_topics"
            await client.snapshot("s", [f"{RUN}a", f"{RUN}b"])
            await client.ping()
        assert breaches(server, "topics") == 1


async def test_connections_per_subject_are_capped(database_url: str) -> None:
    """The subject's connection past the cap closes 4429; other subjects and freed slots work."""
    limits = Limits(max_connections_per_subject=2)
    async with server_with(database_url, limits=limits) as server:
        alice = server.token(subject="alice")
        async with (
            raw_ws.session(server.ws_url, alice) as first,
            raw_ws.session(server.ws_url, alice),
        ):
            async with raw_ws.connect(server.ws_url) as third:
                await third.send({"authenticate": {"token": alice}})
                assert await third.close_code() == 4429
            async with raw_ws.session(server.ws_url, server.token(subject="bob")) as bob:
                await bob.ping()
            await first.ping()
        assert breaches(server, "connections_per_subject") == 1
        async with raw_ws.session(server.ws_url, alice) as again:  # both slots were freed
            await again.ping()


async def test_aborted_connections_free_their_subject_slot(database_url: str) -> None:
    """A connection dropped without a close handshake gives its per-subject slot back."""
    limits = Limits(max_connections_per_subject=1)
    async with server_with(database_url, limits=limits) as server:
        alice = server.token(subject="alice")
        for _ in range(3):
            async with raw_ws.session(server.ws_url, alice) as client:
                await client.ping()
                client.ws._writer.transport.abort()  # no close frame: the TCP connection dies
            gauge = server.state.metrics.registry.get_sample_value
            async with asyncio.timeout(10):
                while gauge("oa_sync_connections", {"transport": "ws"}):  # noqa: ASYNC110
                    await asyncio.sleep(0.02)  # a gauge has no event: poll, bounded above
        async with raw_ws.session(server.ws_url, alice) as client:
            await client.ping()
        assert breaches(server, "connections_per_subject") == 0


async def test_no_authentication_in_time_closes_4408(database_url: str) -> None:
    """A connection that never authenticates is closed with 4408 after the deadline."""
    async with server_with(database_url, limits=Limits(auth_deadline_s=0.3)) as server:
        async with raw_ws.connect(server.ws_url) as client:
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert await client.close_code(within_s=5) == 4408
            assert loop.time() - started < 3
        assert breaches(server, "auth_deadline") == 1


async def test_idle_connection_closes_4408(database_url: str) -> None:
    """An authenticated connection with no subscription that stays silent is closed 4408."""
    limits = Limits(idle_timeout_s=0.5, heartbeat_interval_s=0.2)
    async with server_with(database_url, limits=limits) as server:
        async with raw_ws.session(server.ws_url, server.token()) as client:
            assert await client.close_code(within_s=5) == 4408
        assert breaches(server, "idle") == 1


async def test_bad_and_expired_tokens_close_4401_before_any_subscribe(
    live_server: LiveServer,
) -> None:
    """Refused tokens, or none, close 4401 before anything is served."""
    await live_server.append(
        [{"streamId": "run:r1", "type": "run.created", "payload": {"runId": "r1"}}]
    )
    await live_server.settle()
    for token in ("", "a.b", "a.b.c.d", live_server.token(ttl_s=-3600), "x" * 10_000):
        async with raw_ws.connect(live_server.ws_url) as client:
            await client.send({"authenticate": {"token": token}})
            await client.subscribe("s", ["*"])
            frames, code = await kinds_until_close(client)
            assert code == 4401
            assert "update" not in frames
            assert "welcome" not in frames
    async with raw_ws.connect(live_server.ws_url) as client:  # no authenticate at all
        await client.subscribe("s", ["*"])
        assert await client.close_code() == 4401


async def test_slow_consumer_is_disconnected_4429(database_url: str) -> None:
    """A client that stops reading fills its send queue and is closed 4429, not buffered for."""
    async with server_with(database_url, limits=Limits(send_queue_messages=4)) as server:
        async with raw_ws.session(server.ws_url, server.token()) as slow:
            await slow.snapshot("s", ["*"])
            # Stop reading, with a small receive window so the kernel does not read for us.
            sock = slow.ws.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
            note = "x" * 2000
            metric = server.state.metrics.registry.get_sample_value
            for batch in range(SLOW_BATCHES):
                await server.append(
                    [
                        {
                            "streamId": f"run:r{batch}-{i}",
                            "type": "run.created",
                            "payload": {"runId": f"r{batch}-{i}", "agentId": note},
                        }
                        for i in range(500)
                    ]
                )
                if metric("oa_sync_slow_consumer_disconnects_total"):
                    break
            async with asyncio.timeout(30):
                while not metric("oa_sync_slow_consumer_disconnects_total"):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)  # a metric has no event: poll, bounded above
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 2**20)  # now drain fast
            assert await slow.close_code(within_s=30) == 4429
        assert breaches(server, "send_queue") >= 1
