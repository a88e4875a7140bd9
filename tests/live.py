"""Pytest plugin: a real sync server on a real socket and a real Postgres database per test.

Fixtures:

* ``live_server`` (function): a :class:`LiveServer` running :func:`oa_sync_server.app.create_app`
  on ``127.0.0.1`` port 0 against the test's fresh database (``tests.pg``), with the projector
  worker in process and a random HS256 secret.

Helpers:

* :func:`make_live_server` — the same as an async context manager, for tests that need special
  settings (limits, poll interval), no projector, several servers on one database, or a
  restart (pass the same ``secret``).

What this is not: a mock. Every request crosses a socket; every read hits Postgres.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from aiohttp import web
from oa_sync_core.events import NewEvent
from oa_sync_server.app import STATE, ServerState, create_app
from oa_sync_server.auth import mint_token
from oa_sync_server.config import JwtSettings, Secret, Settings
from oa_sync_server.postgres import create_engine, read_model
from oa_sync_server.transports.http import projector_lag
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["LiveServer", "live_server", "make_live_server"]

SETTLE_TIMEOUT_S = 20.0


@dataclasses.dataclass(slots=True)
class LiveServer:
    """A running server: its address, app, engine and a token minter.

    Attributes:
        url: ``http://127.0.0.1:<port>``.
        ws_url: ``ws://127.0.0.1:<port>/v1/sync``.
        app: the aiohttp application.
        engine: the engine the app uses (owned by the test harness).
        secret: the HS256 secret tokens are minted with.
        database_url: the database it serves.
    """

    url: str
    ws_url: str
    app: web.Application
    engine: AsyncEngine
    secret: str
    database_url: str

    @property
    def state(self) -> ServerState:
        """The app's :class:`ServerState` (hub, metrics, settings...)."""
        return self.app[STATE]

    def token(
        self,
        topics: Sequence[str] = ("*",),
        scopes: Sequence[str] = ("sync:read", "sync:append"),
        ttl_s: float = 600,
        subject: str = "test",
    ) -> str:
        """A valid token for this server."""
        return mint_token(self.secret, subject=subject, topics=topics, scopes=scopes, ttl_s=ttl_s)

    async def append(self, events: Sequence[dict[str, Any] | NewEvent]) -> list[int]:
        """Append through :class:`~oa_sync_server.postgres.event_log.PostgresEventLog`.

        Dicts are proto3 JSON ``AppendEvent`` objects (``streamId``, ``type``, ``payload``,
        optional ``idempotencyKey`` / ``expectedSeq``) or snake_case ``NewEvent`` fields.
        """
        batch = [e if isinstance(e, NewEvent) else _new_event(e) for e in events]
        return await self.state.event_log.append(batch)

    async def settle(self, within_s: float = SETTLE_TIMEOUT_S) -> int:
        """Wait until everything appended so far is projected and delivered by the hub.

        Some projector must run on the database (this server's, unless it was started with
        ``run_projector=False``, or another server's); otherwise this times out.

        Returns:
            The watermark reached.

        Raises:
            TimeoutError: not settled within ``within_s`` seconds.
        """
        async with asyncio.timeout(within_s):
            while True:
                lag, _ = await projector_lag(self.state)
                if lag == 0:
                    break
                await asyncio.sleep(0.02)  # polling a condition, bounded by the timeout
            async with self.engine.connect() as conn:
                meta = await read_model.read_meta(conn)
        await self.state.hub.wait_for(meta.watermark, within_s)
        return meta.watermark


def _new_event(obj: dict[str, Any]) -> NewEvent:
    seq = obj.get("expectedSeq", obj.get("expected_seq"))
    return NewEvent(
        stream_id=obj.get("streamId", obj.get("stream_id", "")),
        type=obj["type"],
        payload=obj.get("payload", {}),
        expected_seq=None if seq is None else int(seq),
        idempotency_key=obj.get("idempotencyKey", obj.get("idempotency_key")),
    )


@contextlib.asynccontextmanager
async def make_live_server(
    database_url: str,
    *,
    secret: str | None = None,
    run_projector: bool = True,
    **overrides: Any,
) -> AsyncIterator[LiveServer]:
    """Run a server on ``database_url`` until the block exits (graceful shutdown).

    Args:
        database_url: a migrated database (the ``database_url`` fixture).
        secret: HS256 secret (default: a random one); reuse it to restart "the same" server.
        run_projector: run the projector worker in this server.
        **overrides: :class:`~oa_sync_server.config.Settings` fields (``limits=Limits(...)``,
            ``poll_interval_s=...``).
    """
    secret = secret or secrets.token_urlsafe(48)
    fields: dict[str, Any] = {
        "database_url": database_url,
        "host": "127.0.0.1",
        "port": 0,
        "jwt": JwtSettings(hs256_secret=Secret(secret)),
        "poll_interval_s": 0.5,
    }
    fields.update(overrides)
    settings = Settings(**fields)
    engine = create_engine(database_url)
    runner: web.AppRunner | None = None
    try:
        app = create_app(settings, engine=engine, run_projector=run_projector)
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=5.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        yield LiveServer(
            url=f"http://127.0.0.1:{port}",
            ws_url=f"ws://127.0.0.1:{port}/v1/sync",
            app=app,
            engine=engine,
            secret=secret,
            database_url=database_url,
        )
    finally:
        if runner is not None:
            await runner.cleanup()
        await engine.dispose()


@pytest.fixture
async def live_server(database_url: str) -> AsyncIterator[LiveServer]:
    """A running server (projector included) on the test's fresh database."""
    async with make_live_server(database_url) as server:
        yield server
