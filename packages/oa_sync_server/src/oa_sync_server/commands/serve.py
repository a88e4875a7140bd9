"""``oa-sync serve [--demo] [--host H] [--port P]``: the sync server.

Loads settings from ``OA_SYNC_*``, configures logging, opens the database (an embedded Postgres
under ``OA_SYNC_DATA_DIR`` when ``OA_SYNC_DATABASE_URL`` is unset; migrated to head), and runs
the app (projector worker, fan-out, WebSocket/SSE/HTTP API) until SIGINT or SIGTERM, then
shuts down gracefully: WebSockets closed with 1001, streams ended, the projector's lease
released, the embedded Postgres stopped.

``--demo`` also runs a synthetic runtime (:mod:`oa_sync_server.demo`), generates a throw-away
HS256 secret when no JWT key is configured (never printed), and prints a token plus a
ready-to-paste command to watch updates, and the inspector's URL (``GET /``) with a
``sync:admin`` token in its fragment (for the server panel): one click and the demo runs move
in the browser. The demo also accepts its own origin on the WebSocket (added to
``OA_SYNC_ALLOWED_ORIGINS``) so that page can use it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import shlex
import signal
import sys
from pathlib import Path

from aiohttp import web

from oa_sync_server.app import STATE, create_app
from oa_sync_server.auth import mint_token
from oa_sync_server.config import Settings
from oa_sync_server.demo import run_demo
from oa_sync_server.errors import ConfigError
from oa_sync_server.logs import configure_logging
from oa_sync_server.runtime import open_database

NAME = "serve"
HELP = "run the sync server (embedded Postgres when OA_SYNC_DATABASE_URL is unset)"

DEMO_TOKEN_TTL_S = 12 * 3600
_SHUTDOWN_TIMEOUT_S = 5.0


def register(parser: argparse.ArgumentParser) -> None:
    """``--demo``, ``--host`` and ``--port`` (the last two override the environment)."""
    parser.add_argument(
        "--demo",
        action="store_true",
        help="also run a synthetic runtime and print a token and a command to watch it",
    )
    parser.add_argument("--host", help="address to bind (default: OA_SYNC_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind, 0 for any (default: 8787)")


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def self_command() -> str:
    """How to run this very ``oa-sync`` again from any shell: an absolute path, quoted.

    The console script when that is what runs (``.nox/serve/bin/oa-sync`` is not on the
    user's PATH), else this interpreter with ``-m oa_sync_server.cli``.
    """
    argv0 = Path(sys.argv[0])
    if argv0.name == "oa-sync" and argv0.is_file():
        return shlex.quote(str(argv0.absolute()))
    return f"{shlex.quote(sys.executable)} -m oa_sync_server.cli"


def _print_demo(settings: Settings, url: str) -> None:
    secret = settings.jwt.hs256_secret
    if secret is None:
        print("demo: no HS256 secret configured; mint tokens with your issuer", flush=True)
        return
    token = mint_token(
        secret,
        subject="demo",
        topics=["*"],
        scopes=["sync:read", "sync:append"],
        ttl_s=DEMO_TOKEN_TTL_S,
        issuer=settings.jwt.issuer,
        audience=settings.jwt.audience,
    )
    inspector_token = mint_token(
        secret,
        subject="demo-inspector",
        topics=["*"],
        scopes=["sync:read", "sync:admin"],
        ttl_s=DEMO_TOKEN_TTL_S,
        issuer=settings.jwt.issuer,
        audience=settings.jwt.audience,
    )
    topic = "runtime/run_summary:*"
    print(
        "\n".join(
            [
                "demo: a synthetic runtime is appending run and worker events.",
                "watch it in a browser (the inspector; the token stays in the URL fragment):",
                f"  {url}/#token={inspector_token}&topic=*",
                f"demo token (12 h, read + append): {token}",
                "watch live updates:",
                f"  {self_command()} tail '{topic}' --url {url} --token {token}",
                "or with curl (Server-Sent Events):",
                f"  curl -sN -H 'Authorization: Bearer {token}' '{url}/v1/stream?topic={topic}'",
                "",
            ]
        ),
        flush=True,
    )


async def serve(settings: Settings, *, demo: bool) -> int:
    """Run until SIGINT/SIGTERM; returns the exit code."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with open_database(settings) as engine:
            app = create_app(settings, engine=engine)
            runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=_SHUTDOWN_TIMEOUT_S)
            await runner.setup()
            demo_task: asyncio.Task[int] | None = None
            try:
                site = web.TCPSite(runner, settings.host, settings.port)
                try:
                    await site.start()
                except OSError as exc:
                    raise ConfigError(
                        "OA_SYNC_PORT", f"cannot listen on {settings.host}:{settings.port}: {exc}"
                    ) from None
                host, port = runner.addresses[0][:2]
                url = _url(str(host), int(port))
                print(f"oa-sync serving on {url}", flush=True)
                if demo:
                    _print_demo(settings, url)
                    demo_task = asyncio.create_task(run_demo(app[STATE].event_log, stop))
                await stop.wait()
            finally:
                stop.set()
                if demo_task is not None:
                    with contextlib.suppress(asyncio.CancelledError):
                        await demo_task
                await runner.cleanup()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    print("oa-sync stopped", file=sys.stderr, flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    """Load settings, configure logging, serve."""
    settings = Settings.from_env(os.environ)
    if args.host is not None:
        settings = dataclasses.replace(settings, host=args.host)
    if args.port is not None:
        if not 0 <= args.port <= 65535:
            raise ConfigError("--port", "must be between 0 and 65535")
        settings = dataclasses.replace(settings, port=args.port)
    settings = settings.require_jwt_key(dev=args.demo)
    if args.demo and settings.port != 0 and "*" not in settings.allowed_origins:
        own = (_url(settings.host, settings.port), f"http://localhost:{settings.port}")
        settings = dataclasses.replace(settings, allowed_origins=(*settings.allowed_origins, *own))
    configure_logging(settings.log_format, settings.log_level)
    return asyncio.run(serve(settings, demo=args.demo))
