"""``GET /v1/sync`` over real sockets and a real Postgres: snapshot, live, resume, reset, auth,
limits, slow consumers and shutdown, on both subprotocols."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jwt
import pytest
import sqlalchemy as sa
from oa_sync_core.protocol.wire import (
    Authenticate,
    ClientFrame,
    ErrorFrame,
    Heartbeat,
    Ping,
    Pong,
    Reset,
    Resume,
    ServerFrame,
    Subscribe,
    Synced,
    UpdateFrame,
    Welcome,
    WireFormat,
    decode_server,
    encode_client,
)
from oa_sync_core.testing import new_event
from oa_sync_server.auth import mint_token
from oa_sync_server.config import Limits
from oa_sync_server.postgres.tables import sync_meta
from oa_sync_server.transports.ws import close_all

from tests.live import LiveServer, make_live_server

WAIT_S = 10.0
MAX_BYTES = 1 << 22
RUN = "runtime/run_summary:"
FORMATS = pytest.mark.parametrize("fmt", list(WireFormat), ids=["json", "proto"])


class ClosedError(Exception):
    """The server closed the connection with ``code``."""

    def __init__(self, code: int | None) -> None:
        self.code = code
        super().__init__(f"closed with {code}")


@dataclasses.dataclass
class Client:
    """A test client speaking one subprotocol through the wire codec."""

    ws: aiohttp.ClientWebSocketResponse
    fmt: WireFormat

    async def send(self, frame: ClientFrame) -> None:
        data = encode_client(frame, self.fmt)
        if isinstance(data, str):
            await self.ws.send_str(data)
        else:
            await self.ws.send_bytes(data)

    async def recv(self, within_s: float = WAIT_S) -> ServerFrame:
        msg = await self.ws.receive(timeout=within_s)
        if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
            return decode_server(msg.data, self.fmt, max_bytes=MAX_BYTES)
        raise ClosedError(self.ws.close_code)

    async def closed_with(self, within_s: float = WAIT_S) -> int | None:
        """Read until the server closes; its close code."""
        async with asyncio.timeout(within_s):
            while True:
                try:
                    await self.recv(within_s)
                except ClosedError as exc:
                    return exc.code

    async def until_synced(self, subscription_id: str) -> tuple[list[ServerFrame], Synced]:
        """Frames up to the ``synced`` of a subscription."""
        frames: list[ServerFrame] = []
        while True:
            frame = await self.recv()
            if isinstance(frame, Synced) and frame.subscription_id == subscription_id:
                return frames, frame
            frames.append(frame)

    async def updates(self, n: int) -> list[UpdateFrame]:
        """The next ``n`` update frames (skipping heartbeats)."""
        out: list[UpdateFrame] = []
        while len(out) < n:
            frame = await self.recv()
            if isinstance(frame, UpdateFrame):
                out.append(frame)
        return out


@contextlib.asynccontextmanager
async def connect(
    server: LiveServer,
    *,
    fmt: WireFormat = WireFormat.JSON,
    token: str | None = None,
    authenticate: bool = True,
    session: aiohttp.ClientSession | None = None,
) -> AsyncIterator[Client]:
    """An open connection, authenticated (``welcome`` consumed) unless told otherwise."""
    async with contextlib.AsyncExitStack() as stack:
        if session is None:
            session = await stack.enter_async_context(aiohttp.ClientSession())
        ws = await stack.enter_async_context(
            session.ws_connect(server.ws_url, protocols=(fmt.value,), autoping=True)
        )
        client = Client(ws, fmt)
        if authenticate:
            await client.send(Authenticate(token or server.token()))
            assert isinstance(await client.recv(), Welcome)
        yield client


def runs(*names: str, event: str = "run.created") -> list[Any]:
    """One event per run."""
    return [new_event(event, name) for name in names]


@FORMATS
async def test_snapshot_synced_then_live_update_after_http_append(
    live_server: LiveServer, fmt: WireFormat
) -> None:
    """Subscribe: the snapshot, then synced, then a live update after an HTTP append."""
    await live_server.append(runs("r1", "r2"))
    watermark = await live_server.settle()
    async with connect(live_server, fmt=fmt) as client:
        await client.send(Subscribe("s1", (RUN + "*",)))
        frames, synced = await client.until_synced("s1")
        assert sorted(f.doc_key for f in frames if isinstance(f, UpdateFrame)) == [
            RUN + "r1",
            RUN + "r2",
        ]
        assert synced.watermark == watermark
        async with aiohttp.ClientSession() as http:
            body = {
                "events": [
                    {"streamId": "run:r3", "type": "run.created", "payload": {"runId": "r3"}}
                ]
            }
            headers = {"Authorization": f"Bearer {live_server.token()}"}
            async with http.post(live_server.url + "/v1/events", json=body, headers=headers) as r:
                assert r.status == 200
        (update,) = await client.updates(1)
        assert update.doc_key == RUN + "r3"
        assert update.subscription_id == "s1"
        assert update.version == 1
        assert update.watermark > watermark
        assert update.document["runId"] == "r3"
        await client.send(Ping("n1"))
        assert await client.recv() == Pong(nonce="n1")
    metrics = live_server.state.metrics
    assert metrics.updates_sent.labels(format=fmt.name.lower())._value.get() >= 3
    latency = metrics.registry.get_sample_value("oa_sync_append_to_send_seconds_count")
    assert latency is not None
    assert latency >= 1


async def test_resume_after_disconnect_is_coalesced_with_no_gap(live_server: LiveServer) -> None:
    """After 500 appends across 50 runs, a resume gets each changed run once, at its latest
    version, then synced; nothing older than what the client knew."""
    names = [f"r{i}" for i in range(50)]
    await live_server.append(runs(*names))
    await live_server.settle()
    known: dict[str, int] = {}
    async with connect(live_server) as client:
        await client.send(Subscribe("s", (RUN + "*",)))
        frames, synced = await client.until_synced("s")
        known = {f.doc_key: f.version for f in frames if isinstance(f, UpdateFrame)}
    assert len(known) == 50
    events = [new_event("run.step", n, stepIndex=k) for k in range(9) for n in names]
    for start in range(0, len(events), 100):
        await live_server.append(events[start : start + 100])
    final = await live_server.settle()
    async with connect(live_server) as client:
        await client.send(Subscribe("s", (RUN + "*",), Resume(synced.epoch, synced.watermark)))
        frames, synced2 = await client.until_synced("s")
    updates = [f for f in frames if isinstance(f, UpdateFrame)]
    assert not [f for f in frames if isinstance(f, Reset)]
    assert sorted(u.doc_key for u in updates) == sorted(RUN + n for n in names)
    assert all(u.version == 10 > known[u.doc_key] for u in updates)
    assert [u.watermark for u in updates] == sorted(u.watermark for u in updates)
    assert synced2.watermark == final


async def test_changed_epoch_gives_reset_then_full_snapshot(live_server: LiveServer) -> None:
    """A resume from another epoch: reset (epoch_changed), the full snapshot, then synced."""
    await live_server.append(runs("a", "b"))
    watermark = await live_server.settle()
    async with live_server.engine.begin() as conn:
        await conn.execute(
            sa.update(sync_meta).where(sync_meta.c.key == "epoch").values(value="epoch-2")
        )
    async with connect(live_server) as client:
        await client.send(Subscribe("s", (RUN + "*",), Resume("epoch-1", watermark)))
        frames, synced = await client.until_synced("s")
    assert frames[0] == Reset(subscription_id="s", reason="epoch_changed", epoch="epoch-2")
    assert sorted(f.doc_key for f in frames[1:] if isinstance(f, UpdateFrame)) == [
        RUN + "a",
        RUN + "b",
    ]
    assert synced.epoch == "epoch-2"


async def test_watermark_older_than_retention_gives_reset(live_server: LiveServer) -> None:
    """A resume below ``retained_from``: reset (watermark_expired), then the snapshot."""
    await live_server.append(runs("a", "b", "c"))
    watermark = await live_server.settle()
    async with live_server.engine.begin() as conn:
        await conn.execute(
            sa.update(sync_meta).where(sync_meta.c.key == "retained_from").values(value="2")
        )
    async with connect(live_server) as client:
        welcome_epoch = await _epoch(live_server)
        await client.send(Subscribe("s", (RUN + "*",), Resume(welcome_epoch, 1)))
        frames, synced = await client.until_synced("s")
        assert frames[0] == Reset(
            subscription_id="s", reason="watermark_expired", epoch=welcome_epoch
        )
        assert len([f for f in frames if isinstance(f, UpdateFrame)]) == 3
        assert synced.watermark == watermark
        # Within retention, the same client resumes without a reset.
        await client.send(Subscribe("t", (RUN + "*",), Resume(welcome_epoch, 2)))
        frames, _ = await client.until_synced("t")
        assert [f.doc_key for f in frames if isinstance(f, UpdateFrame)] == [RUN + "c"]


async def _epoch(server: LiveServer) -> str:
    async with server.engine.connect() as conn:
        value = (
            await conn.execute(sa.select(sync_meta.c.value).where(sync_meta.c.key == "epoch"))
        ).scalar_one()
    return str(value)


async def test_forbidden_topic_is_an_error_frame_and_no_data(live_server: LiveServer) -> None:
    """A topic outside the grant: a forbidden error frame, not a byte of its documents, and the
    connection keeps serving granted topics (a wider pattern only yields granted documents)."""
    await live_server.append(runs("mine", "secret"))
    await live_server.settle()
    token = live_server.token(topics=(RUN + "mine",))
    async with connect(live_server, token=token) as client:
        await client.send(Subscribe("bad", (RUN + "secret",)))
        error = await client.recv()
        assert isinstance(error, ErrorFrame)
        assert (error.code, error.subscription_id) == ("forbidden", "bad")
        await client.send(Subscribe("wide", ("runtime/*",)))
        frames, _ = await client.until_synced("wide")
        await live_server.append(runs("secret", "mine", event="run.started"))
        await live_server.settle()
        (live,) = await client.updates(1)
        await client.send(Ping("end"))
        rest: list[ServerFrame] = []
        while (frame := await client.recv()) != Pong(nonce="end"):
            rest.append(frame)
    seen = [f for f in [*frames, live, *rest] if isinstance(f, UpdateFrame)]
    assert [(f.doc_key, f.version) for f in seen] == [(RUN + "mine", 1), (RUN + "mine", 2)]


async def test_no_authentication_in_time_closes_4408(database_url: str) -> None:
    """Without an authenticate before the deadline the server closes with 4408."""
    async with (
        make_live_server(database_url, limits=Limits(auth_deadline_s=0.3)) as server,
        connect(server, authenticate=False) as client,
    ):
        assert await client.closed_with() == 4408


async def test_expired_token_closes_4401(live_server: LiveServer) -> None:
    """An expired token closes with 4401 at authenticate; a token expiring later closes then."""
    async with connect(live_server, authenticate=False) as client:
        await client.send(Authenticate(live_server.token(ttl_s=-600)))
        assert await client.closed_with() == 4401
    async with connect(live_server, authenticate=False) as client:
        await client.send(Authenticate("not-a-jwt"))
        assert await client.closed_with() == 4401
    async with connect(live_server, token=live_server.token(ttl_s=1)) as client:
        await client.send(Subscribe("s", ("*",)))
        assert await client.closed_with() == 4401


def test_a_short_token_lives_its_whole_ttl_even_at_a_second_boundary() -> None:
    """A 1-second token minted 8 ms before a second boundary expires no sooner than 1 s later
    (``exp`` rounds up; it used to be truncated with ``iat`` and leave 8 ms)."""
    for now in (1_800_000_000.992, 1_800_000_000.0, 1_800_000_000.5):
        claims = jwt.decode(
            mint_token("s" * 40, subject="t", topics=["*"], ttl_s=1, now=now),
            options={"verify_signature": False},
        )
        assert claims["exp"] >= now + 1
        assert claims["iat"] <= now


async def test_in_band_refresh_keeps_the_stream(live_server: LiveServer) -> None:
    """Re-authenticating before expiry keeps the session and its subscription alive."""
    first = live_server.token(ttl_s=2)
    expires = jwt.decode(first, options={"verify_signature": False})["exp"]
    async with connect(live_server, token=first) as client:
        await client.send(Subscribe("s", (RUN + "*",)))
        await client.until_synced("s")
        await client.send(Authenticate(live_server.token(ttl_s=600)))
        # Wall-clock time must pass the first token's expiry: that is the point of the test.
        await asyncio.sleep(max(0.0, expires - time.time()) + 0.5)
        await live_server.append(runs("after"))
        (update,) = await client.updates(1)
        assert update.doc_key == RUN + "after"


async def test_refresh_with_fewer_topics_stops_them(live_server: LiveServer) -> None:
    """A refreshed token with fewer topics: a forbidden error and no more of the lost topic."""
    async with connect(live_server, token=live_server.token(topics=(RUN + "a", RUN + "b"))) as c:
        await c.send(Subscribe("s", (RUN + "a", RUN + "b")))
        await c.until_synced("s")
        await c.send(Authenticate(live_server.token(topics=(RUN + "a",))))
        error = await c.recv()
        assert isinstance(error, ErrorFrame)
        assert error.code == "forbidden"
        await live_server.append(runs("b", "a"))
        (update,) = await c.updates(1)
        assert update.doc_key == RUN + "a"


BAD_FRAMES: list[tuple[str | bytes, int]] = [
    ("{not json", 4400),
    ('{"subscribe": {"subscriptionId": 5}}', 4400),
    ('{"teleport": {}}', 4400),
    (b"\x00\x01binary on the JSON subprotocol", 4400),
    ('{"ping": {"nonce": "' + "x" * 70_000 + '"}}', 4413),
]


async def test_bad_frames_close_with_documented_codes(live_server: LiveServer) -> None:
    """Malformed frames close with 4400, oversized ones with 4413; never a 1011."""
    for payload, code in BAD_FRAMES:
        async with connect(live_server) as client:
            if isinstance(payload, str):
                await client.ws.send_str(payload)
            else:
                await client.ws.send_bytes(payload)
            assert await client.closed_with() == code, payload[:40]


async def test_subprotocols_and_header_auth(live_server: LiveServer) -> None:
    """No known subprotocol closes 4400 after the upgrade; a bad header token is a 401 before
    it; a good header token authenticates without an in-band message."""
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(live_server.ws_url) as ws:
            msg = await ws.receive(timeout=WAIT_S)
            assert msg.type is aiohttp.WSMsgType.CLOSE
            assert ws.close_code == 4400
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(
                live_server.ws_url,
                protocols=(WireFormat.JSON.value,),
                headers={"Authorization": "Bearer nope"},
            )
        assert refused.value.status == 401
        headers = {"Authorization": f"Bearer {live_server.token()}"}
        async with http.ws_connect(
            live_server.ws_url, protocols=(WireFormat.PROTO.value,), headers=headers
        ) as ws:
            client = Client(ws, WireFormat.PROTO)
            assert isinstance(await client.recv(), Welcome)


def _small_buffer_socket(addr_info: Any) -> socket.socket:
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=type_, proto=proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


async def test_slow_consumer_is_closed_4429_others_keep_receiving(database_url: str) -> None:
    """A client that stops reading is closed with 4429; another client gets every update."""
    limits = Limits(send_queue_messages=8)
    async with make_live_server(database_url, limits=limits) as server:
        connector = aiohttp.TCPConnector(socket_factory=_small_buffer_socket)
        async with (
            aiohttp.ClientSession(connector=connector) as slow_http,
            connect(server, session=slow_http) as slow,
            connect(server) as fast,
        ):
            for client in (slow, fast):
                await client.send(Subscribe("s", (RUN + "*",)))
                await client.until_synced("s")
            metrics = server.state.metrics
            total = 0
            async with asyncio.timeout(60):
                while metrics.slow_consumer_disconnects._value.get() == 0:
                    batch = [
                        new_event("run.created", f"n{total + i}", agentId="x" * 30_000)
                        for i in range(100)
                    ]
                    await server.append(batch)
                    total += len(batch)
                    await server.settle()
                    got = await fast.updates(len(batch))
                    assert len({u.doc_key for u in got}) == len(batch)
            assert await slow.closed_with() == 4429
            await server.append(runs("still-alive"))
            (update,) = await fast.updates(1)
            assert update.doc_key == RUN + "still-alive"


async def test_shutdown_closes_1001(database_url: str) -> None:
    """Stopping the server closes every connection with 1001."""
    async with aiohttp.ClientSession() as http:
        async with make_live_server(database_url) as server:
            ws = await http.ws_connect(server.ws_url, protocols=(WireFormat.JSON.value,))
            client = Client(ws, WireFormat.JSON)
            await client.send(Authenticate(server.token()))
            assert isinstance(await client.recv(), Welcome)
            await client.send(Subscribe("s", ("*",)))
            await client.until_synced("s")
            closed = asyncio.create_task(client.closed_with())  # a client keeps reading
        assert await closed == 1001
        await ws.close()


async def test_epoch_change_while_connected_resets_and_resnapshots(
    live_server: LiveServer,
) -> None:
    """A rebuild's new epoch reaches connected clients: reset, snapshot, synced, then live."""
    await live_server.append(runs("a"))
    await live_server.settle()
    async with connect(live_server) as client:
        await client.send(Subscribe("s", (RUN + "*",)))
        await client.until_synced("s")
        async with live_server.engine.begin() as conn:
            await conn.execute(
                sa.update(sync_meta).where(sync_meta.c.key == "epoch").values(value="rebuilt")
            )
        live_server.state.hub.wake()
        frames, synced = await client.until_synced("s")
        assert frames[0] == Reset(subscription_id="s", reason="epoch_changed", epoch="rebuilt")
        assert [f.doc_key for f in frames[1:] if isinstance(f, UpdateFrame)] == [RUN + "a"]
        assert synced.epoch == "rebuilt"
        await live_server.append(runs("b"))
        (update,) = await client.updates(1)
        assert update.doc_key == RUN + "b"


async def test_connections_per_subject_and_gauges(database_url: str) -> None:
    """A subject over its connection limit is closed 4429 (429 with a header token); the
    connection and subscription gauges return to zero when clients leave."""
    async with make_live_server(database_url, limits=Limits(max_connections_per_subject=1)) as s:
        metrics = s.state.metrics
        async with connect(s) as first:
            await first.send(Subscribe("s", ("*",)))
            await first.until_synced("s")
            assert metrics.subscriptions._value.get() == 1
            async with connect(s, authenticate=False) as second:
                await second.send(Authenticate(s.token()))
                assert await second.closed_with() == 4429
            async with aiohttp.ClientSession() as http:
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await http.ws_connect(
                        s.ws_url,
                        protocols=(WireFormat.JSON.value,),
                        headers={"Authorization": f"Bearer {s.token()}"},
                    )
                assert refused.value.status == 429
            async with connect(s, token=s.token(subject="other")):
                pass
        await close_all(s.app)  # waits for the handlers of the clients that left to finish
        assert metrics.connections.labels(transport="ws")._value.get() == 0
        assert metrics.subscriptions._value.get() == 0


async def test_quiet_connection_gets_heartbeats_with_the_watermark(database_url: str) -> None:
    """With nothing to send, the server sends a heartbeat carrying the newest watermark at the
    interval announced in welcome."""
    limits = Limits(heartbeat_interval_s=0.2)
    async with make_live_server(database_url, limits=limits) as server:
        await server.append(runs("a"))
        watermark = await server.settle()
        async with connect(server, authenticate=False) as client:
            await client.send(Authenticate(server.token()))
            welcome = await client.recv()
            assert isinstance(welcome, Welcome)
            assert welcome.heartbeat_interval_ms == 200
            await client.send(Subscribe("s", ("*",)))
            await client.until_synced("s")
            heartbeat = await client.recv(within_s=2.0)
            assert heartbeat == Heartbeat(watermark=watermark)


async def test_refusals_before_the_upgrade(live_server: LiveServer) -> None:
    """Before upgrading: a header token without ``sync:read`` is a 403 ``forbidden``, and a
    server that is shutting down answers 503 with ``Retry-After`` (no socket is opened in
    either case)."""
    async with aiohttp.ClientSession() as http:
        append_only = live_server.token(scopes=("sync:append",))
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(
                live_server.ws_url,
                protocols=(WireFormat.JSON.value,),
                headers={"Authorization": f"Bearer {append_only}"},
            )
        assert refused.value.status == 403
        # The flag on_shutdown sets first: the window before the listener closes.
        live_server.state.stopping.set()
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(live_server.ws_url, protocols=(WireFormat.JSON.value,))
        assert refused.value.status == 503
        assert refused.value.headers is not None
        assert refused.value.headers["Retry-After"] == "1"
    assert live_server.state.metrics.connections.labels(transport="ws")._value.get() == 0
