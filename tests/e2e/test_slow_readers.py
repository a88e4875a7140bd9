"""Slow readers in every phase of a WebSocket connection (issue 15 item 3, issue 12).

A reader that stops reading during its snapshot, its catch-up or the live stream is closed with
4429 within the slow-consumer grace and counted in ``slow_consumer_disconnects_total``, while
the server's send buffer for it stays within its byte bound and a bystander keeps receiving.
A few hundred sockets of which a random tenth stall: every other one converges with versions
only increasing, and each stalled one, closed 4429, resumes after reconnecting with nothing
lost. Real server, real Postgres, real sockets; a stalled client is one that stops calling
``receive`` with a small socket receive buffer, so the kernel does not read for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import psutil
import pytest
from oa_sync_core.testing import new_event
from oa_sync_server.config import Limits
from oa_sync_server.postgres import read_model
from oa_sync_server.transports import ws as ws_transport

from tests.live import LiveServer, make_live_server

JSON = "oa-sync.v1.json"
RUNS = "runtime/run_summary:"
WAIT_S = 30.0
GRACE_S = ws_transport.SLOW_CONSUMER_GRACE_S
SEND_QUEUE_BYTES = 128 * 1024
DOCUMENTS = 1000
"""~8 MB of 8 KB documents: more than a loopback socket's kernel buffers (up to 4 MB) hold."""


def _small_buffer_socket(addr_info: Any) -> socket.socket:
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=type_, proto=proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


@contextlib.asynccontextmanager
async def open_socket(
    server: LiveServer, *, small: bool = False, subject: str = "test"
) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    """A JSON WebSocket authenticated by its upgrade header (no frame needs reading first)."""
    connector = aiohttp.TCPConnector(socket_factory=_small_buffer_socket) if small else None
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.ws_connect(
            server.ws_url,
            protocols=(JSON,),
            headers={"Authorization": f"Bearer {server.token(subject=subject)}"},
            max_msg_size=0,
            autoping=True,
            heartbeat=None,
        ) as ws,
    ):
        yield ws


async def send(ws: aiohttp.ClientWebSocketResponse, kind: str, body: dict[str, Any]) -> None:
    await ws.send_str(json.dumps({kind: body}))


async def frame(ws: aiohttp.ClientWebSocketResponse, within_s: float = WAIT_S) -> tuple[str, Any]:
    """The next frame as (kind, body); ("closed", code) once the server closed."""
    msg = await ws.receive(timeout=within_s)
    if msg.type is aiohttp.WSMsgType.CLOSE:
        return "closed", msg.data  # the code the server sent (its close frame)
    if msg.type is not aiohttp.WSMsgType.TEXT:
        return "closed", ws.close_code
    ((kind, body),) = json.loads(msg.data).items()
    return kind, body


async def close_code(ws: aiohttp.ClientWebSocketResponse) -> int | None:
    """Read and drop frames until the server closes; its code (after widening the receive
    window, so that what the kernel still holds drains before the server gives up on the close
    handshake)."""
    sock = ws.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 2**20)
    async with asyncio.timeout(WAIT_S):
        while True:
            kind, body = await frame(ws)
            if kind == "closed":
                return int(body) if body is not None else None


def slow_disconnects(server: LiveServer) -> float:
    value = server.state.metrics.registry.get_sample_value(
        "oa_sync_slow_consumer_disconnects_total"
    )
    return value or 0.0


def buffered_peak(server: LiveServer) -> int:
    """The most bytes any open connection's send buffer ever held."""
    registry = ws_transport._REGISTRIES.get(server.app)
    if registry is None:
        return 0
    return max((c.peak_bytes for c in registry.connections), default=0)


async def append_big_runs(server: LiveServer, count: int, start: int = 0) -> None:
    """``count`` new run summaries of ~8 KB each (the issue's documents), 100 per append."""
    note = "x" * 8000
    for first in range(start, start + count, 100):
        await server.append(
            [
                new_event("run.created", f"big{i}", agentId=note)
                for i in range(first, min(first + 100, start + count))
            ]
        )


async def wait_for_slow_disconnects(
    server: LiveServer, count: int, within_s: float, peaks: list[int]
) -> float:
    """Seconds until ``count`` slow-consumer closes happened, sampling the buffer peak."""
    started = time.monotonic()
    async with asyncio.timeout(within_s):
        while slow_disconnects(server) < count:  # a counter has no event: poll
            peaks.append(buffered_peak(server))
            await asyncio.sleep(0.02)  # poll a metric, bounded by the timeout
    return time.monotonic() - started


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["snapshot", "catch-up", "live"])
async def test_stalled_readers_are_closed_4429_with_bounded_memory(
    database_url: str, phase: str
) -> None:
    """Readers that stop reading during their snapshot, catch-up or live stream are closed
    4429 within the grace period, their send buffers never pass twice the byte bound, RSS stays
    bounded, and a bystander keeps receiving meanwhile."""
    limits = Limits(send_queue_bytes=SEND_QUEUE_BYTES)
    async with make_live_server(database_url, limits=limits) as server:
        if phase != "live":
            await append_big_runs(server, DOCUMENTS)
        watermark = await server.settle()
        async with (
            open_socket(server, subject="bystander") as bystander,
            contextlib.AsyncExitStack() as stack,
        ):
            await send(bystander, "subscribe", {"subscriptionId": "b", "topics": [RUNS + "by-*"]})
            async with asyncio.timeout(WAIT_S):
                while (await frame(bystander))[0] != "synced":
                    pass
            rss_before = psutil.Process().memory_info().rss
            stalled = [
                await stack.enter_async_context(open_socket(server, small=True)) for _ in range(4)
            ]
            body: dict[str, Any] = {"subscriptionId": "s", "topics": [RUNS + "*"]}
            if phase == "catch-up":
                async with server.engine.connect() as conn:
                    meta = await read_model.read_meta(conn)
                body["resume"] = {"epoch": meta.epoch, "watermark": str(1)}
                assert watermark > 1
            for ws in stalled:
                await send(ws, "subscribe", body)  # and never read again (until closed)
            if phase == "live":
                await asyncio.sleep(0)  # let the subscriptions reach the server
                await append_big_runs(server, DOCUMENTS)
            # The bystander is served while the stalled readers are not.
            await server.append([new_event("run.created", "by-live")])
            async with asyncio.timeout(GRACE_S + 5):
                while True:
                    kind, update = await frame(bystander)
                    if kind == "update" and update["docKey"] == RUNS + "by-live":
                        break
            peaks: list[int] = []
            took = await wait_for_slow_disconnects(server, 4, within_s=GRACE_S + 15, peaks=peaks)
            rss_growth = psutil.Process().memory_info().rss - rss_before
            assert took < GRACE_S + 15
            assert max(peaks, default=0) <= 2 * SEND_QUEUE_BYTES + 16 * 1024
            assert rss_growth < 64 * 2**20, f"RSS grew by {rss_growth / 2**20:.1f} MiB"
            assert await asyncio.gather(*(close_code(ws) for ws in stalled)) == [4429] * 4
            await server.append([new_event("run.created", "by-after")])
            async with asyncio.timeout(WAIT_S):
                while True:
                    kind, update = await frame(bystander)
                    if kind == "update" and update["docKey"] == RUNS + "by-after":
                        break
        breaches = server.state.metrics.registry.get_sample_value(
            "oa_sync_limit_breaches_total", {"kind": "send_queue"}
        )
        assert breaches == 4


@pytest.mark.slow
async def test_stalled_sse_reader_in_its_snapshot_is_dropped_and_counted(database_url: str) -> None:
    """An SSE client that stops reading during its snapshot is disconnected within the grace
    and counted as a slow consumer, while a WebSocket bystander keeps receiving."""
    async with make_live_server(database_url) as server:
        await append_big_runs(server, DOCUMENTS)
        await server.settle()
        connector = aiohttp.TCPConnector(socket_factory=_small_buffer_socket)
        async with (
            open_socket(server, subject="bystander") as bystander,
            aiohttp.ClientSession(connector=connector) as http,
        ):
            await send(bystander, "subscribe", {"subscriptionId": "b", "topics": [RUNS + "by-*"]})
            async with asyncio.timeout(WAIT_S):
                while (await frame(bystander))[0] != "synced":
                    pass
            headers = {"Authorization": f"Bearer {server.token()}"}
            url = f"{server.url}/v1/stream?topic={RUNS}*"
            async with http.get(url, headers=headers) as response:
                assert response.status == 200  # and the body is never read
                await server.append([new_event("run.created", "by-live")])
                async with asyncio.timeout(GRACE_S + 5):
                    while True:
                        kind, update = await frame(bystander)
                        if kind == "update" and update["docKey"] == RUNS + "by-live":
                            break
                await wait_for_slow_disconnects(server, 1, within_s=GRACE_S + 15, peaks=[])


# -- a few hundred sockets, a random tenth stall and resume -------------------------------------

SOCKETS = 200
DOCS = 8
ROUNDS = 16


class Subscriber:
    """One socket's view: the versions it saw per document, in order."""

    def __init__(self, index: int, stalls: bool) -> None:
        self.index = index
        self.stalls = stalls
        self.versions: dict[str, list[int]] = {}
        self.watermark = 0
        self.epoch = ""
        self.synced = asyncio.Event()
        self.close_codes: list[int | None] = []
        self.changed = asyncio.Event()

    def record(self, body: dict[str, Any]) -> None:
        self.versions.setdefault(body["docKey"], []).append(int(body["version"]))
        self.watermark = max(self.watermark, int(body["watermark"]))
        self.changed.set()

    async def converged(self, expected: dict[str, int]) -> None:
        """Wait until the last version seen of every document is ``expected``."""
        while self.final() != expected:
            self.changed.clear()
            await self.changed.wait()

    def final(self) -> dict[str, int]:
        return {key: seen[-1] for key, seen in self.versions.items()}

    async def read_until_synced(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async with asyncio.timeout(WAIT_S * 2):
            while True:
                kind, body = await frame(ws, WAIT_S * 2)
                if kind == "update":
                    self.record(body)
                elif kind == "synced":
                    self.watermark = max(self.watermark, int(body["watermark"]))
                    self.epoch = body.get("epoch", self.epoch)
                    return
                elif kind == "closed":
                    raise AssertionError(f"subscriber {self.index} closed {body} before synced")

    async def run(self, server: LiveServer, resume: asyncio.Event, done: asyncio.Event) -> None:
        async with open_socket(server, small=self.stalls, subject=f"s{self.index}") as ws:
            await send(ws, "subscribe", {"subscriptionId": "s", "topics": [RUNS + "*"]})
            await self.read_until_synced(ws)
            self.synced.set()
            if self.stalls:
                await resume.wait()  # not reading meanwhile
                sock = ws.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 2**20)  # drain fast
            while True:
                get = asyncio.ensure_future(frame(ws, WAIT_S * 4))
                stop = asyncio.ensure_future(done.wait())
                finished, _ = await asyncio.wait({get, stop}, return_when=asyncio.FIRST_COMPLETED)
                if get not in finished:
                    get.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await get
                    return
                stop.cancel()
                kind, body = get.result()
                if kind == "update":
                    self.record(body)
                elif kind == "closed":
                    self.close_codes.append(body)
                    break
        if self.stalls:
            # Reconnect and resume from the last watermark received.
            async with open_socket(server, subject=f"s{self.index}") as ws:
                resume_body = {"epoch": self.epoch, "watermark": str(self.watermark)}
                await send(
                    ws,
                    "subscribe",
                    {"subscriptionId": "s", "topics": [RUNS + "*"], "resume": resume_body},
                )
                await self.read_until_synced(ws)


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_random_tenth_stall_others_converge_stalled_resume_with_nothing_lost(
    database_url: str,
) -> None:
    """With a few hundred sockets of which a random tenth stop reading, every other socket
    converges to the final versions with versions only increasing per document, and each
    stalled socket is closed 4429 and, after reconnecting with resume, holds the final versions
    too."""
    rng = random.Random(12)
    stalled = set(rng.sample(range(SOCKETS), SOCKETS // 10))
    limits = Limits(
        send_queue_bytes=256 * 1024,  # more than one round (8 x 16 KB) arriving at once
        send_queue_messages=256,
        max_connections_per_subject=4,
        max_subscriptions=4,
    )
    async with make_live_server(database_url, limits=limits) as server:
        await server.append(
            [new_event("run.created", f"f{d}", agentId="a") for d in range(DOCS)]
            + [new_event("run.started", f"f{d}", workerId="w") for d in range(DOCS)]
        )
        await server.settle()
        subscribers = [Subscriber(i, i in stalled) for i in range(SOCKETS)]
        resume, done = asyncio.Event(), asyncio.Event()
        tasks = [asyncio.create_task(s.run(server, resume, done)) for s in subscribers]
        try:
            async with asyncio.timeout(WAIT_S * 3):
                await asyncio.gather(*(s.synced.wait() for s in subscribers))
            note = "y" * 16_000
            for round_ in range(ROUNDS):
                await server.append(
                    [
                        new_event("run.step", f"f{d}", description=f"{round_}{note}")
                        for d in range(DOCS)
                    ]
                )
                await server.settle()
            async with asyncio.timeout(WAIT_S):
                while slow_disconnects(server) < len(stalled):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)  # a counter has no event: poll, bounded above
            expected: dict[str, int] = {}
            async with server.engine.connect() as conn:
                for row in await read_model.documents_after(conn, 0, 1000):
                    expected[row.doc_key] = row.version
            assert len(expected) == DOCS
            # Healthy sockets converge; then the stalled ones read, see 4429 and resume.
            async with asyncio.timeout(WAIT_S * 2):
                await asyncio.gather(*(s.converged(expected) for s in subscribers if not s.stalls))
            resume.set()
            async with asyncio.timeout(WAIT_S * 2):
                await asyncio.gather(*(s.converged(expected) for s in subscribers if s.stalls))
        finally:
            done.set()
            resume.set()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert errors == []
        for s in subscribers:
            for key, seen in s.versions.items():
                assert seen == sorted(set(seen)), (s.index, key, seen)
            if s.stalls:
                assert s.close_codes == [4429], (s.index, s.close_codes)
            else:
                assert s.close_codes == [], (s.index, s.close_codes)
            assert s.final() == expected
        assert slow_disconnects(server) == len(stalled)
