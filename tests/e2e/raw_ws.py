"""A raw WebSocket client for hostile tests: hand-written JSON frames, no SDK, no client session.

The hardening tests must be able to send what no well-behaved client would (binary on the JSON
subprotocol, oversized or malformed frames, floods), and to observe exactly which close code
the server chose, so they talk to ``/v1/sync`` through aiohttp directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

JSON_PROTOCOL = "oa-sync.v1.json"
RECEIVE_TIMEOUT_S = 5.0


class ClosedError(Exception):
    """The server closed the socket; ``code`` is its close code."""

    def __init__(self, code: int | None):
        self.code = code
        super().__init__(f"closed with {code}")


@dataclass
class RawClient:
    """One WebSocket connection speaking JSON frames by hand."""

    ws: aiohttp.ClientWebSocketResponse

    async def send(self, frame: Mapping[str, Any]) -> None:
        await self.ws.send_str(json.dumps(frame))

    async def send_text(self, text: str) -> None:
        await self.ws.send_str(text)

    async def send_bytes(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def recv(self, within_s: float = RECEIVE_TIMEOUT_S) -> tuple[str, dict[str, Any]]:
        """The next server frame as (kind, body), e.g. ``("welcome", {...})``.

        Raises:
            ClosedError: the server closed the connection instead.
        """
        msg = await self.ws.receive(timeout=within_s)
        if msg.type in (
            aiohttp.WSMsgType.CLOSE,
            aiohttp.WSMsgType.CLOSING,
            aiohttp.WSMsgType.CLOSED,
        ):
            raise ClosedError(self.ws.close_code)
        if msg.type is aiohttp.WSMsgType.ERROR:
            raise ClosedError(self.ws.close_code)
        assert msg.type is aiohttp.WSMsgType.TEXT, msg
        frame = json.loads(msg.data)
        assert isinstance(frame, dict), frame
        assert len(frame) == 1, frame
        ((kind, body),) = frame.items()
        return kind, body

    async def until(
        self, kind: str, within_s: float = RECEIVE_TIMEOUT_S
    ) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, Any]]:
        """Frames received before the first ``kind`` frame (heartbeats skipped), and its body."""
        before: list[tuple[str, dict[str, Any]]] = []
        async with asyncio.timeout(within_s):
            while True:
                got, body = await self.recv(within_s)
                if got == kind:
                    return before, body
                if got != "heartbeat":
                    before.append((got, body))

    async def close_code(self, within_s: float = RECEIVE_TIMEOUT_S) -> int | None:
        """Read (and drop) frames until the server closes; its close code."""
        async with asyncio.timeout(within_s):
            while True:
                try:
                    await self.recv(within_s)
                except ClosedError as closed:
                    return closed.code

    async def authenticate(self, token: str) -> dict[str, Any]:
        """Send ``authenticate`` and return the ``welcome`` body."""
        await self.send({"authenticate": {"token": token}})
        _, welcome = await self.until("welcome")
        return welcome

    async def subscribe(
        self, sid: str, topics: list[str], *, resume: dict[str, str] | None = None
    ) -> None:
        body: dict[str, Any] = {"subscriptionId": sid, "topics": topics}
        if resume is not None:
            body["resume"] = resume
        await self.send({"subscribe": body})

    async def snapshot(self, sid: str, topics: list[str]) -> list[dict[str, Any]]:
        """Subscribe and return the ``update`` bodies received before ``synced``."""
        await self.subscribe(sid, topics)
        frames, _ = await self.until("synced")
        for kind, body in frames:
            assert kind == "update", (kind, body)
        return [body for _, body in frames]

    async def ping(self, nonce: str = "n") -> None:
        """A ping answered by its pong: the connection is alive and served."""
        await self.send({"ping": {"nonce": nonce}})
        frames, pong = await self.until("pong")
        assert pong["nonce"] == nonce
        assert all(kind != "error" for kind, _ in frames), frames


@contextlib.asynccontextmanager
async def connect(
    ws_url: str,
    *,
    protocols: tuple[str, ...] = (JSON_PROTOCOL,),
    headers: Mapping[str, str] | None = None,
    compress: int = 0,
    max_msg_size: int = 64 * 2**20,
) -> AsyncIterator[RawClient]:
    """An open connection to ``ws_url`` (closed on exit)."""
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(
            ws_url,
            protocols=protocols,
            headers=dict(headers or {}),
            compress=compress,
            max_msg_size=max_msg_size,
            autoping=True,
            heartbeat=None,
        ) as ws,
    ):
        yield RawClient(ws)


@contextlib.asynccontextmanager
async def session(ws_url: str, token: str, **kwargs: Any) -> AsyncIterator[RawClient]:
    """An authenticated connection (``welcome`` received)."""
    async with connect(ws_url, **kwargs) as client:
        await client.authenticate(token)
        yield client
