"""SyncClient against a real server over real sockets, with a fault-injecting TCP proxy."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import sqlalchemy as sa
from oa_sync_client.client import (
    ClientClosedError,
    SubscriptionRefusedError,
    SubscriptionReset,
    SubscriptionSynced,
    SyncClient,
)
from oa_sync_core.events import NewEvent
from oa_sync_core.protocol.client_session import BackoffPolicy, ConnectionState, DocumentChanged
from oa_sync_core.protocol.wire import WireFormat
from oa_sync_core.testing import new_event
from oa_sync_server.auth import mint_token
from oa_sync_server.config import JwtSettings, Secret
from oa_sync_server.postgres import read_model
from oa_sync_server.postgres.tables import sync_meta

from tests.live import LiveServer, make_live_server

TOPIC = "runtime/run_summary:*"
CONVERGE_S = 60.0


class ChaosProxy:
    """A TCP proxy between clients and the server that can cut connections or play dead."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.down = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.accepted = 0
        self.cuts = 0

    async def __aenter__(self) -> ChaosProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut_all()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut_all(self) -> int:
        """Abort every open connection, both sides, mid-stream."""
        writers = list(self._writers)
        for writer in writers:
            writer.transport.abort()
        self._writers.clear()
        self.cuts += len(writers) // 2  # a client side and an upstream side per connection
        return len(writers) // 2

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.transport.abort()
            return
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        tasks = [
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ]
        self._tasks.update(tasks)
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.difference_update(tasks)
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.transport.abort()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.transport.abort()


async def server_docs(server: LiveServer) -> dict[str, tuple[int, str]]:
    """Every document on the server: key -> (version, content hash)."""
    async with server.engine.connect() as conn:
        rows = await read_model.documents_after(conn, 0, 5000)
    return {row.doc_key: (row.version, row.content_hash) for row in rows}


def client_docs(client_sub: Any) -> dict[str, tuple[int, str]]:
    return {k: (d.version, d.content_hash) for k, d in client_sub.documents.items()}


async def wait_until(predicate: Callable[[], Awaitable[bool]], within_s: float) -> None:
    """Poll a condition until it holds (bounded by a timeout)."""
    async with asyncio.timeout(within_s):
        while True:
            if await predicate():
                return
            await asyncio.sleep(0.05)  # polling a condition, bounded by the timeout


def run_events(run: int, steps: int) -> list[NewEvent]:
    events = [new_event("run.started", f"r{run}")]
    events += [
        new_event("run.step", f"r{run}", description=f"step {i}", progressPercent=i % 100)
        for i in range(1, steps)
    ]
    return events


class Recorder:
    """Consumes a subscription; records versions per document and resets."""

    def __init__(self) -> None:
        self.versions: dict[str, list[int]] = {}
        self.resets = 0
        self.synced = 0

    async def consume(self, subscription: AsyncIterator[Any]) -> None:
        async for event in subscription:
            if isinstance(event, DocumentChanged):
                self.versions.setdefault(event.doc.doc_key, []).append(event.doc.version)
            elif isinstance(event, SubscriptionReset):
                self.resets += 1
                self.versions.clear()
            elif isinstance(event, SubscriptionSynced):
                self.synced += 1

    def assert_monotonic(self) -> None:
        for key, versions in self.versions.items():
            assert versions == sorted(set(versions)), f"{key}: {versions}"


@contextlib.asynccontextmanager
async def consuming(subscription: Any) -> AsyncIterator[Recorder]:
    recorder = Recorder()
    task = asyncio.create_task(recorder.consume(subscription))
    try:
        yield recorder
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_follows_documents_live(database_url: str) -> None:
    """Clients get the snapshot, go live and see later changes, in both subprotocols."""
    async with make_live_server(database_url) as server:
        await server.append(run_events(0, 3))
        await server.settle()
        clients = [SyncClient(server.url, server.token(), fmt=fmt) for fmt in WireFormat]
        async with clients[0] as json_client, clients[1] as proto_client:
            subs = [json_client.subscribe([TOPIC]), proto_client.subscribe([TOPIC])]
            async with consuming(subs[0]) as rec_json, consuming(subs[1]) as rec_proto:
                async with asyncio.timeout(20):
                    await json_client.wait_for_state(ConnectionState.LIVE)
                    await proto_client.wait_for_state(ConnectionState.LIVE)
                expected = await server_docs(server)
                assert [client_docs(sub) for sub in subs] == [expected, expected]
                await server.append(run_events(1, 2))
                await server.settle()

                async def converged() -> bool:
                    expected = await server_docs(server)
                    return all(client_docs(sub) == expected for sub in subs)

                await wait_until(converged, 20)
                for rec in (rec_json, rec_proto):
                    rec.assert_monotonic()
                for sub in subs:
                    assert sub.documents["runtime/run_summary:r1"].document["runId"] == "r1"
                assert subs[0].documents == subs[1].documents
            assert json_client.stats.connections == proto_client.stats.connections == 1


async def test_cut_connections_resume_and_converge(database_url: str) -> None:
    """2,000 events over 200 documents while a proxy cuts the client at random points: the
    cache ends equal to the server's documents, versions only increased, and every reconnect
    resumed (one snapshot, no reset)."""
    rng = random.Random(20261125)
    async with make_live_server(database_url) as server, ChaosProxy(_port(server)) as proxy:
        await server.append([new_event("run.started", f"r{i}") for i in range(200)])
        await server.settle()
        backoff = BackoffPolicy(base_s=0.05, cap_s=0.4)
        async with SyncClient(proxy.url, server.token(), backoff=backoff, rng=rng) as client:
            sub = client.subscribe([TOPIC])
            async with consuming(sub) as rec:
                async with asyncio.timeout(20):
                    await client.wait_for_state(ConnectionState.LIVE)

                async def chaos() -> None:
                    while True:
                        await asyncio.sleep(rng.uniform(0.05, 0.3))
                        proxy.cut_all()

                cutter = asyncio.create_task(chaos())
                try:
                    for _ in range(36):  # 36 batches of 50: 1,800 more events
                        batch = [
                            new_event("run.step", f"r{rng.randrange(200)}", description="s")
                            for _ in range(50)
                        ]
                        await server.append(batch)
                        await asyncio.sleep(rng.uniform(0, 0.05))

                    async def cut_enough() -> bool:
                        return proxy.cuts >= 8

                    await wait_until(cut_enough, 30)
                finally:
                    cutter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await cutter
                await server.settle()

                async def converged() -> bool:
                    live = client.state is ConnectionState.LIVE
                    return live and client_docs(sub) == await server_docs(server)

                await wait_until(converged, CONVERGE_S)
                rec.assert_monotonic()
                assert len(client_docs(sub)) == 200
                assert sum(d.version for d in sub.documents.values()) == 2000
            assert client.stats.connections >= 5
            assert client.stats.snapshots == 1
            assert client.stats.resets == 0
            # Every subscribe after the first resumed (a cut before welcome sends none).
            assert 4 <= client.stats.resumes <= client.stats.connections - 1


async def test_token_expiring_mid_stream_is_refreshed_in_band(database_url: str) -> None:
    """Tokens living 4 s are replaced in-band before they expire: one connection, no gap."""
    secret = "s" * 48
    jwt = JwtSettings(hs256_secret=Secret(secret), leeway_s=0.0)
    async with make_live_server(database_url, secret=secret, jwt=jwt) as server:
        minted: list[float] = []

        async def provider() -> str:
            minted.append(time.time())
            await asyncio.sleep(0.01)
            return server.token(topics=[TOPIC], scopes=["sync:read"], ttl_s=4)

        await server.append([new_event("run.started", "r0")])
        async with SyncClient(server.url, provider) as client:
            sub = client.subscribe([TOPIC])
            arrivals: list[float] = []

            async def consume() -> None:
                async for event in sub:
                    if isinstance(event, DocumentChanged):
                        arrivals.append(time.monotonic())  # noqa: PERF401 - read while it runs

            consumer = asyncio.create_task(consume())
            async with asyncio.timeout(20):
                await client.wait_for_state(ConnectionState.LIVE)
            # Concurrent refreshes share one call of the provider.
            before = len(minted)
            await asyncio.gather(*(client.refresh_token() for _ in range(5)))
            assert len(minted) == before + 1
            end = time.monotonic() + 7  # longer than a token's life
            step = 0
            while time.monotonic() < end:
                step += 1
                await server.append([new_event("run.step", "r0", description=f"{step}")])
                await asyncio.sleep(0.1)
            await server.settle()

            async def converged() -> bool:
                return client_docs(sub) == await server_docs(server)

            await wait_until(converged, 20)
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer
            assert client.stats.connections == 1
            assert client.stats.token_refreshes >= 2
            assert client.state is ConnectionState.LIVE
            # Updates kept flowing: no pause as long as a token's life (what a 4401 close and
            # reconnect would cost). The bound is loose because 2 shared cores run everything.
            gaps = [b - a for a, b in itertools.pairwise(arrivals)]
            assert max(gaps) < 4.0, gaps


async def test_new_epoch_resets_then_converges(database_url: str) -> None:
    """The server restarts with a new epoch: the client gets reset, then converges."""
    secret = "e" * 48
    async with make_live_server(database_url, secret=secret) as first:
        token = first.token(topics=[TOPIC], scopes=["sync:read"])
        await first.append([new_event("run.started", f"r{i}") for i in range(5)])
        await first.settle()
        proxy_port = _port(first)
        async with ChaosProxy(proxy_port) as proxy:
            backoff = BackoffPolicy(base_s=0.05, cap_s=0.2)
            client = SyncClient(proxy.url, token, backoff=backoff)
            async with client:
                sub = client.subscribe([TOPIC])
                async with consuming(sub) as rec:
                    async with asyncio.timeout(20):
                        await client.wait_for_state(ConnectionState.LIVE)
                    old = client.session.position(sub.id)
                    assert old is not None
                    proxy.down = True
                    proxy.cut_all()
                    async with first.engine.begin() as conn:
                        await conn.execute(
                            sa.update(sync_meta)
                            .where(sync_meta.c.key == "epoch")
                            .values(value="rebuilt-epoch")
                        )
                    async with make_live_server(database_url, secret=secret) as second:
                        await second.append([new_event("run.started", "r9")])
                        await second.settle()
                        proxy.upstream_port = _port(second)
                        proxy.down = False

                        async def converged() -> bool:
                            live = client.state is ConnectionState.LIVE
                            return live and client_docs(sub) == await server_docs(second)

                        await wait_until(converged, CONVERGE_S)
                        assert rec.resets == 1
                        assert client.stats.resets == 1
                        position = client.session.position(sub.id)
                        assert position is not None
                        assert position.epoch == "rebuilt-epoch"
                        assert len(sub.documents) == 6


async def test_fifty_clients_back_off_with_jitter_and_converge(database_url: str) -> None:
    """With the server unreachable for several backoff steps, 50 clients spread their attempts
    (no thundering herd) and all converge once it is back."""
    async with make_live_server(database_url) as server, ChaosProxy(_port(server)) as proxy:
        await server.append([new_event("run.started", f"r{i}") for i in range(10)])
        await server.settle()
        backoff = BackoffPolicy(base_s=0.2, cap_s=1.6)
        clients = [
            SyncClient(
                proxy.url,
                server.token(subject=f"c{i}", topics=[TOPIC], scopes=["sync:read"]),
                backoff=backoff,
                rng=random.Random(i),
            )
            for i in range(50)
        ]
        async with contextlib.AsyncExitStack() as stack:
            await asyncio.gather(*(client.start() for client in clients))
            stack.push_async_callback(
                lambda: asyncio.gather(*(client.close() for client in clients))
            )
            subs = [client.subscribe([TOPIC]) for client in clients]
            async with asyncio.timeout(60):
                for client in clients:
                    await client.wait_for_state(ConnectionState.LIVE)
            proxy.down = True
            down_at = time.monotonic()
            proxy.cut_all()
            await server.append(
                [new_event("run.step", f"r{i}", description="x") for i in range(10)]
            )
            await server.append([new_event("run.started", f"r{i}") for i in range(10, 20)])
            await asyncio.sleep(4.0)  # the outage being simulated, not a synchronisation
            proxy.down = False
            up_at = time.monotonic()
            await server.settle()
            expected = await server_docs(server)

            async def all_converged() -> bool:
                return all(
                    c.state is ConnectionState.LIVE and client_docs(s) == expected
                    for c, s in zip(clients, subs, strict=True)
                )

            await wait_until(all_converged, CONVERGE_S)
        per_client = [
            sum(1 for t in client.attempt_times if down_at <= t < up_at) for client in clients
        ]
        assert min(per_client) >= 4  # several backoff steps passed for everyone
        # When each client chose to retry (the test's event loop, shared by 50 clients and the
        # server, may run timers late; the schedule is what the jitter controls). Without jitter
        # the k-th retries of all 50 clients would coincide; with full jitter they cover the
        # k-th window [0, min(cap, base * 2**(k-1))].
        retries = [[t for t in c.planned_attempts if down_at <= t < up_at] for c in clients]
        for k, ceiling in enumerate((0.2, 0.4, 0.8, 1.6)):
            kth = [times[k] for times in retries]
            assert max(kth) - min(kth) >= ceiling / 2, (k, ceiling, kth)
        for client in clients:
            assert client.stats.resets == 0


async def drain(subscription: Any) -> None:
    """Iterate a subscription to its end (bounded)."""
    async with asyncio.timeout(20):
        async for _ in subscription:
            pass


def _port(server: LiveServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


async def test_refused_token_and_forbidden_topic(database_url: str) -> None:
    """A fixed token the server refuses ends the client (4401, nothing to refresh); a provider
    is asked again after 4401; a topic outside the grant refuses only that subscription."""
    async with make_live_server(database_url) as server:
        await server.append([new_event("run.started", "r1")])
        await server.settle()
        bad = mint_token("x" * 48, subject="t", topics=["*"], scopes=["sync:read"])
        async with SyncClient(server.url, bad) as client:
            sub = client.subscribe([TOPIC])
            with pytest.raises(ClientClosedError) as info:
                await drain(sub)
            assert info.value.code == 4401
            assert client.state is ConnectionState.CLOSED

        tokens = iter([bad, server.token(topics=["runtime/run_summary:r1"])])
        backoff = BackoffPolicy(base_s=0.05, cap_s=0.1)
        async with SyncClient(server.url, lambda: next(tokens), backoff=backoff) as client:
            allowed = client.subscribe(["runtime/run_summary:r1"])
            denied = client.subscribe(["runtime/codex_worker_summary:*"])
            with pytest.raises(SubscriptionRefusedError) as refused:
                await drain(denied)
            assert refused.value.code == "forbidden"
            async with asyncio.timeout(20):
                await allowed.wait_synced()
                await client.wait_for_state(ConnectionState.LIVE)
            assert list(allowed.documents) == ["runtime/run_summary:r1"]
            assert client.stats.connections == 2
            assert client.stats.token_refreshes == 1
