"""Fallback server entry point for the benchmarks: ``create_app`` on ``OA_SYNC_*`` settings.

Used only when the checkout has no ``oa-sync serve`` command yet; it serves the same
application object that command serves (projector, hub, WebSocket and HTTP API).
"""

from __future__ import annotations

import os

from aiohttp import web
from oa_sync_server.app import create_app
from oa_sync_server.config import Settings


def main() -> None:
    """Serve until SIGTERM / SIGINT."""
    settings = Settings.from_env(os.environ)
    web.run_app(
        create_app(settings), host=settings.host, port=settings.port, print=None, backlog=4096
    )


if __name__ == "__main__":
    main()
