"""Every key of the aiohttp application's state, as typed :class:`aiohttp.web.AppKey` values.

Handlers read ``request.app[SETTINGS]`` and get a :class:`~oa_sync_server.config.Settings`,
checked by mypy. No string keys anywhere else.

What this is not: the resources themselves; ``app.py`` creates them in cleanup contexts.
"""

from __future__ import annotations

from aiohttp import web

from oa_sync_server.auth import TokenVerifier
from oa_sync_server.config import Settings
from oa_sync_server.metrics import Metrics

__all__ = ["METRICS", "SETTINGS", "VERIFIER"]

SETTINGS = web.AppKey("settings", Settings)
"""The validated settings the app was created with."""
METRICS = web.AppKey("metrics", Metrics)
"""The app's Prometheus metrics (its own registry)."""
VERIFIER = web.AppKey("verifier", TokenVerifier)
"""The bearer-token verifier."""
