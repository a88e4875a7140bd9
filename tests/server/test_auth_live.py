"""Token verification inside a live server: a hanging JWKS endpoint stalls no one else."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from oa_sync_server.config import JwtSettings, Secret
from oa_sync_server.errors import AuthFailure

from tests.e2e import raw_ws
from tests.live import LiveServer, make_live_server


@pytest.fixture
async def hanging_jwks() -> AsyncIterator[tuple[str, asyncio.Event, asyncio.Event]]:
    """A JWKS endpoint that answers only when ``release`` is set; ``hit`` marks a request."""
    hit, release = asyncio.Event(), asyncio.Event()

    async def handle(_request: web.Request) -> web.Response:
        hit.set()
        await release.wait()
        return web.json_response({"keys": []})

    app = web.Application()
    app.router.add_get("/jwks.json", handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}/jwks.json", hit, release
    release.set()
    await runner.cleanup()


async def test_hanging_jwks_fetch_does_not_stall_other_connections(
    database_url: str, hanging_jwks: tuple[str, asyncio.Event, asyncio.Event]
) -> None:
    """While one socket waits on a hung JWKS fetch, others authenticate and are served."""
    url, hit, release = hanging_jwks
    secret = secrets.token_urlsafe(48)
    settings = JwtSettings(hs256_secret=Secret(secret), jwks_url=url, jwks_timeout_s=3.0)
    async with make_live_server(database_url, secret=secret, jwt=settings) as server:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        claims = jwt.decode(server.token(), options={"verify_signature": False})
        rotated = jwt.encode(claims, key, algorithm="RS256", headers={"kid": "rotated"})
        async with raw_ws.connect(server.ws_url) as waiting:
            await waiting.send({"authenticate": {"token": rotated}})
            await asyncio.wait_for(hit.wait(), timeout=5)  # the fetch is now hanging
            loop = asyncio.get_running_loop()
            started = loop.time()
            for subject in ("a", "b", "c"):
                async with raw_ws.session(server.ws_url, server.token(subject=subject)) as other:
                    await other.ping()
            assert loop.time() - started < 2.0
            release.set()
            assert await waiting.close_code(within_s=10) == 4401  # no such kid: refused


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signed(header: dict[str, Any], payload: str, key: bytes) -> str:
    head = _b64(json.dumps(header).encode())
    body = _b64(payload.encode())
    signature = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(signature)}"


def jwt_matrix(secret: str) -> dict[str, str]:
    """Issue 5's JWT matrix as tokens for a server holding the HS256 ``secret``."""
    now = int(time.time())
    good: dict[str, Any] = {
        "sub": "u",
        "iss": "oa-sync",
        "aud": "oa-sync",
        "iat": now - 10,
        "exp": now + 600,
        "oa_topics": ["*"],
        "oa_scopes": ["sync:read"],
    }

    def hs(claims: dict[str, Any] | str, **header: Any) -> str:
        payload = claims if isinstance(claims, str) else json.dumps(claims)
        return _signed({"alg": "HS256", "typ": "JWT", **header}, payload, secret.encode())

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    head, body, sig = hs(good).split(".")
    unsigned = _b64(json.dumps({"alg": "none"}).encode())
    raw = json.dumps(good)[:-1]
    return {
        "alg none": f"{unsigned}.{body}.",
        "HS256 keyed with the RSA public key": _signed({"alg": "HS256"}, json.dumps(good), public),
        "RS256 where only HS256 is configured": jwt.encode(good, rsa_key, algorithm="RS256"),
        "unknown kid": jwt.encode(good, rsa_key, algorithm="RS256", headers={"kid": "nope"}),
        "two segments": f"{head}.{body}",
        "four segments": f"{head}.{body}.{sig}.{sig}",
        "expired": hs({**good, "exp": now - 3600}),
        "not yet valid": hs({**good, "nbf": now + 3600}),
        "missing exp": hs({k: v for k, v in good.items() if k != "exp"}),
        "wrong aud": hs({**good, "aud": "elsewhere"}),
        "iss prefix": hs({**good, "iss": "oa-syn"}),
        "iss superstring": hs({**good, "iss": "oa-sync.evil"}),
        "exp []": hs({**good, "exp": []}),
        "nbf null": hs({**good, "nbf": None}),
        "exp 1e400": hs(raw.replace(f'"exp": {now + 600}', '"exp": 1e400') + "}"),
        "wrong secret": _signed({"alg": "HS256"}, json.dumps(good), b"w" * 40),
    }


async def test_the_jwt_matrix_is_refused_before_any_subscribe(live_server: LiveServer) -> None:
    """Each bad token of the matrix closes 4401 (WebSocket) and gets 401 (HTTP); nothing served."""
    await live_server.append(
        [{"streamId": "run:r1", "type": "run.created", "payload": {"runId": "r1"}}]
    )
    await live_server.settle()
    assert (await _kinds_after(live_server, live_server.token()))[0] == ["welcome", "update"]
    async with aiohttp.ClientSession() as http:
        for name, token in jwt_matrix(live_server.secret).items():
            kinds, code = await _kinds_after(live_server, token)
            assert code == 4401, (name, code)
            assert kinds == [], (name, kinds)
            async with http.get(
                f"{live_server.url}/v1/docs/runtime/run_summary:r1",
                headers={"Authorization": f"Bearer {token}"},
            ) as response:
                assert response.status == 401, name
                assert (await response.json())["error"]["code"] == "unauthenticated"
    failures = live_server.state.metrics.registry.get_sample_value
    reasons = {r.value for r in AuthFailure}
    assert sum(failures("oa_sync_auth_failures_total", {"reason": r}) or 0 for r in reasons) >= 32


async def _kinds_after(server: LiveServer, token: str) -> tuple[list[str], int | None]:
    """Authenticate with ``token``, subscribe to everything: frame kinds until synced or close."""
    async with raw_ws.connect(server.ws_url) as client:
        await client.send({"authenticate": {"token": token}})
        await client.subscribe("s", ["*"])
        kinds: list[str] = []
        try:
            while True:
                kind, _ = await client.recv()
                if kind == "synced":
                    return kinds, None
                kinds.append(kind)
        except raw_ws.ClosedError as closed:
            return kinds, closed.code


async def test_a_token_without_sync_read_reads_nothing(live_server: LiveServer) -> None:
    """An append-only token is refused over WebSocket (4401) and HTTP reads (403)."""
    await live_server.append(
        [{"streamId": "run:r1", "type": "run.created", "payload": {"runId": "r1"}}]
    )
    await live_server.settle()
    writer = live_server.token(scopes=["sync:append"])
    assert await _kinds_after(live_server, writer) == ([], 4401)
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{live_server.url}/v1/docs/runtime/run_summary:r1",
            headers={"Authorization": f"Bearer {writer}"},
        ) as response,
    ):
        assert response.status == 403
