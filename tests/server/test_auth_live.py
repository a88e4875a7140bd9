"""Token verification inside a live server: a hanging JWKS endpoint stalls no one else."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from oa_sync_server.config import JwtSettings, Secret

from tests.e2e import raw_ws
from tests.live import make_live_server


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
