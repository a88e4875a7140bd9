"""``oa-sync serve [--demo] [--host H] [--port P] [--workers N]``: the sync server.

Loads settings from ``OA_SYNC_*``, configures logging, opens the database (an embedded Postgres
under ``OA_SYNC_DATA_DIR`` when ``OA_SYNC_DATABASE_URL`` is unset; migrated to head), and runs
the app (projector worker, fan-out, WebSocket/SSE/HTTP API) until SIGINT or SIGTERM, then
shuts down gracefully: WebSockets closed with 1001, streams ended, the projector's lease
released, the embedded Postgres stopped.

``--workers N`` (default: the number of cores) runs N server processes on one port: this process
opens (and migrates, or starts embedded) the database, reserves the port, then starts N
``oa-sync serve`` children that each bind it with ``SO_REUSEPORT`` (the kernel spreads the
connections) and each run their own app: hub, LISTEN connection, sessions, and a projector
worker of which exactly one holds the lease (the others stand by, as across machines). It
forwards SIGINT/SIGTERM to them and stops them all when one exits; a worker whose supervisor
died (its standard input closed) stops too. Per-process figures
(``/metrics``, the per-subject connection limit) are per worker.

``--demo`` also runs a synthetic runtime (:mod:`oa_sync_server.demo`), generates a throw-away
HS256 secret when no JWT key is configured (never printed), prints a token plus a
ready-to-paste command to watch updates, and allows the server's own origin
(:func:`own_origins`), so a page it serves (the inspector) may connect from a browser, and
prints the inspector's URL (``GET /``) with a ``sync:admin`` token in its fragment (for the
server panel): one click and the demo runs move in the browser.

The start-up lines say which browser origins may connect and, when none may, how to allow a
development origin: a refused page only sees WebSocket close 1006 and CORS errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import shlex
import signal
import socket
import sys
from pathlib import Path
from typing import Final

from aiohttp import web

from oa_sync_server.app import STATE, create_app
from oa_sync_server.auth import mint_token
from oa_sync_server.config import Settings
from oa_sync_server.demo import run_demo
from oa_sync_server.errors import ConfigError
from oa_sync_server.logs import configure_logging
from oa_sync_server.postgres.follower import libpq_url
from oa_sync_server.runtime import open_database, settle_collector

NAME = "serve"
HELP = "run the sync server (embedded Postgres when OA_SYNC_DATABASE_URL is unset)"

DEMO_TOKEN_TTL_S = 12 * 3600
_SHUTDOWN_TIMEOUT_S = 5.0
_WORKER_READY = "oa-sync worker ready"


def register(parser: argparse.ArgumentParser) -> None:
    """``--demo``, ``--host`` and ``--port`` (the last two override the environment)."""
    parser.add_argument(
        "--demo",
        action="store_true",
        help="also run a synthetic runtime and print a token and a command to watch it",
    )
    parser.add_argument("--host", help="address to bind (default: OA_SYNC_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind, 0 for any (default: 8787)")
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="server processes sharing the port (default: the number of cores)",
    )
    # Internal: how the supervisor starts its children (one per --workers).
    parser.add_argument("--worker-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--demo-runtime", action="store_true", help=argparse.SUPPRESS)


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


_LOOPBACK: Final = ("127.0.0.1", "localhost", "::1")
_ANY: Final = ("0.0.0.0", "::", "")  # noqa: S104 - recognising a wildcard bind, not binding


def own_origins(host: str, port: int) -> tuple[str, ...]:
    """The origins a page served by this server has: its URL, and the loopback names' for a
    loopback or wildcard bind (``localhost`` and ``127.0.0.1`` reach the same server)."""
    names = [host] if host not in _ANY else []
    if host in _LOOPBACK or host in _ANY:
        names += ["127.0.0.1", "localhost"]
    return tuple(dict.fromkeys(_url(name, port) for name in names))


def _with_own(settings: Settings, own: tuple[str, ...]) -> Settings:
    """``settings`` whose allowed origins also hold ``own`` (unchanged when ``*`` is set)."""
    if not own or "*" in settings.allowed_origins:
        return settings
    origins = tuple(dict.fromkeys((*settings.allowed_origins, *own)))
    return dataclasses.replace(settings, allowed_origins=origins)


def origin_lines(allowed: tuple[str, ...], own: tuple[str, ...] = ()) -> list[str]:
    """What the start-up output says about browsers (``own``: origins added by ``--demo``)."""
    if "*" in allowed:
        return ["browsers: every Origin may connect (OA_SYNC_ALLOWED_ORIGINS=*)"]
    configured = [o for o in allowed if o not in own]
    lines = []
    if own:
        lines.append(f"browsers: this server's own origin may connect (--demo): {', '.join(own)}")
    if configured:
        lines.append(f"browsers: OA_SYNC_ALLOWED_ORIGINS allows {', '.join(configured)}")
    if not allowed:
        lines.append(
            "browsers: no web page may connect (it would see WebSocket close 1006 and CORS "
            "errors); allow a development origin with "
            "OA_SYNC_ALLOWED_ORIGINS=http://localhost:5173"
        )
    return lines


def _bind(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, reuse_port=reuse_port)
    except OSError as exc:
        raise ConfigError("OA_SYNC_PORT", f"cannot listen on {host}:{port}: {exc}") from None


def self_command() -> str:
    """How to run this very ``oa-sync`` again from any shell: an absolute path, quoted.

    The console script when that is what runs (``.nox/serve/bin/oa-sync`` is not on the
    user's PATH), else this interpreter with ``-m oa_sync_server.cli``.
    """
    argv0 = Path(sys.argv[0])
    if argv0.name == "oa-sync" and argv0.is_file():
        return shlex.quote(str(argv0.absolute()))
    return f"{shlex.quote(sys.executable)} -m oa_sync_server.cli"


def _say(text: str, *, err: bool = False) -> None:
    """Print ``text`` and its newline in one write, flushed: with ``--workers`` every process
    shares the output, and ``print`` writes the newline separately when the stream is
    unbuffered (``PYTHONUNBUFFERED``, common in containers), so another process's log line
    could land between them (it did: ``serving on http://...:43979{"name": ...``)."""
    stream = sys.stderr if err else sys.stdout
    stream.write(text + "\n")
    stream.flush()


def _print_demo(settings: Settings, url: str) -> None:
    secret = settings.jwt.hs256_secret
    if secret is None:
        _say("demo: no HS256 secret configured; mint tokens with your issuer")
        return

    def mint(subject: str, scopes: list[str]) -> str:
        return mint_token(
            secret,
            subject=subject,
            topics=["*"],
            scopes=scopes,
            ttl_s=DEMO_TOKEN_TTL_S,
            issuer=settings.jwt.issuer,
            audience=settings.jwt.audience,
        )

    token = mint("demo", ["sync:read", "sync:append"])
    inspector_token = mint("demo-inspector", ["sync:read", "sync:admin"])
    topic = "runtime/run_summary:*"
    _say(
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
        )
    )


async def serve(
    settings: Settings, *, demo: bool, child: bool = False, demo_runtime: bool = False
) -> int:
    """Run until SIGINT/SIGTERM; returns the exit code.

    Args:
        settings: the server's settings.
        demo: print the demo token and run the synthetic runtime.
        child: a worker started by :func:`supervise` (binds with ``SO_REUSEPORT``, announces
            readiness on stdout instead of the serving line).
        demo_runtime: run the synthetic runtime (a child's share of ``--demo``).
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if child:
        _stop_with_parent(loop, stop)
    try:
        async with open_database(settings) as engine:
            # Bound before the app is built: --demo allows the origin, whose port may be 0.
            sock = _bind(settings.host, settings.port, reuse_port=child)
            port = int(sock.getsockname()[1])
            own = own_origins(settings.host, port) if demo else ()
            settings = _with_own(settings, own)
            try:
                app = create_app(settings, engine=engine)
            except BaseException:
                sock.close()
                raise
            runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=_SHUTDOWN_TIMEOUT_S)
            await runner.setup()
            demo_task: asyncio.Task[int] | None = None
            try:
                await web.SockSite(runner, sock).start()
                settle_collector()  # what start-up built lives as long as the process
                url = _url(settings.host, port)
                if child:
                    _say(_WORKER_READY)
                else:
                    _say(f"oa-sync serving on {url}")
                    for line in origin_lines(settings.allowed_origins, own):
                        _say(line)
                if demo:
                    _print_demo(settings, url)
                if demo or demo_runtime:
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
    _say("oa-sync stopped", err=True)
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
    configure_logging(settings.log_format, settings.log_level)
    if args.worker_child:
        return asyncio.run(serve(settings, demo=False, child=True, demo_runtime=args.demo_runtime))
    if args.workers < 1:
        raise ConfigError("--workers", "must be at least 1")
    if args.workers == 1:
        return asyncio.run(serve(settings, demo=args.demo))
    return asyncio.run(supervise(settings, workers=args.workers, demo=args.demo))


def _stop_with_parent(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Set ``stop`` when standard input ends: the supervisor holds the other end of the pipe,
    so a supervisor that dies (even killed) stops its workers instead of orphaning them."""
    fd = sys.stdin.fileno()

    def readable() -> None:
        try:
            data = os.read(fd, 4096)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            stop.set()

    loop.add_reader(fd, readable)


def _reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound (not listening) to ``host:port`` with ``SO_REUSEPORT``: it fixes the port
    (``0`` picks one) for the children, and receives no connection itself."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError("OA_SYNC_PORT", f"cannot listen on {host}:{port}: {exc}") from None
    return sock


async def supervise(settings: Settings, *, workers: int, demo: bool) -> int:
    """Run ``workers`` server processes on one port until SIGINT/SIGTERM or one exits.

    Returns:
        0 after a requested stop, 1 when a worker exited on its own or never became ready.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    children: list[asyncio.subprocess.Process] = []
    code = 0
    try:
        async with open_database(settings) as engine:
            reserved = _reserve_port(settings.host, settings.port)
            port = int(reserved.getsockname()[1])
            own = own_origins(settings.host, port) if demo else ()
            settings = _with_own(settings, own)
            env = {
                **os.environ,
                "OA_SYNC_DATABASE_URL": libpq_url(engine),
                "OA_SYNC_HOST": settings.host,
                "OA_SYNC_PORT": str(port),
            }
            if settings.allowed_origins:  # --demo's own origin reaches every worker
                env["OA_SYNC_ALLOWED_ORIGINS"] = ",".join(settings.allowed_origins)
            secret = settings.jwt.hs256_secret
            if secret is not None:  # the --demo secret generated here, shared (never printed)
                env["OA_SYNC_JWT_HS256_SECRET"] = secret.reveal()
            try:
                for index in range(workers):
                    extra = ["--demo-runtime"] if demo and index == 0 else []
                    children.append(
                        await asyncio.create_subprocess_exec(
                            sys.executable,
                            "-m",
                            "oa_sync_server.cli",
                            "serve",
                            "--worker-child",
                            *extra,
                            env=env,
                            stdin=asyncio.subprocess.PIPE,  # its end: see _stop_with_parent
                            stdout=asyncio.subprocess.PIPE,
                        )
                    )
                for child in children:
                    line = b"" if child.stdout is None else await child.stdout.readline()
                    if line.decode(errors="replace").strip() != _WORKER_READY:
                        _say("oa-sync: a worker failed to start", err=True)
                        return 1
            finally:
                reserved.close()
            url = _url(settings.host, port)
            _say(f"oa-sync serving on {url}")
            for browsers in origin_lines(settings.allowed_origins, own):
                _say(browsers)
            _say(f"oa-sync: {workers} worker processes", err=True)
            if demo:
                _print_demo(settings, url)
            exits = [asyncio.ensure_future(child.wait()) for child in children]
            stopping = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait([stopping, *exits], return_when=asyncio.FIRST_COMPLETED)
            if stopping not in done:
                _say("oa-sync: a worker exited; stopping the others", err=True)
                code = 1
            stopping.cancel()
    finally:
        await _stop_children(children)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    _say("oa-sync stopped", err=True)
    return code


async def _stop_children(children: list[asyncio.subprocess.Process]) -> None:
    """SIGTERM every running child, then SIGKILL those still running after the grace."""
    for child in children:
        if child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.terminate()
    try:
        async with asyncio.timeout(_SHUTDOWN_TIMEOUT_S * 2):
            await asyncio.gather(*(child.wait() for child in children))
    except TimeoutError:
        for child in children:
            if child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
        await asyncio.gather(*(child.wait() for child in children))
