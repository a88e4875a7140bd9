"""The inspector page at ``GET /`` and the admin endpoints its server panel reads.

Routes (added by :func:`add_routes`):

* ``GET /`` — the inspector: a static page (``oa_sync_server/static``, shipped in the wheel;
  ``inspector.js`` is the esbuild bundle of ``packages/oa-sync-js/inspector``, built by
  ``nox -s inspector``). It reads its token from the URL fragment (``/#token=…&topic=…``),
  which browsers never send to the server, or from a paste box, and follows documents with the
  TypeScript client over the WebSocket. No CDN, nothing fetched from elsewhere.
* ``GET /inspector/{name}`` — the page's assets (a fixed list; nothing else is served).
* ``GET /v1/admin/status`` — scope ``sync:admin``: projector lag (events, seconds), watermark
  and epoch, open connections and subscriptions, the sink lanes and, with an HTTP lane
  (``OA_SYNC_SINK=http|tee``), their parity.
* ``POST /v1/admin/drift`` — scope ``sync:admin``: a drift check (``oa-sync drift``) now.

What this is not: a second client. The page is the npm package's ``SyncClient``, bundled.
"""

from __future__ import annotations

import importlib.resources
from typing import Any, Final

import orjson
from aiohttp import web

from oa_sync_server.config import SinkKind
from oa_sync_server.postgres.admin import check_drift
from oa_sync_server.sinks.parity import compute_parity
from oa_sync_server.state import STATE
from oa_sync_server.transports.http import authenticate, projector_lag

__all__ = ["ASSETS", "add_routes"]

ASSETS: Final = {
    "index.html": "text/html",
    "inspector.js": "text/javascript",
    "inspector.css": "text/css",
}
"""The files of ``oa_sync_server/static`` the server serves, with their content types."""

# The page runs only its own bundled script and connects only back to this server.
_CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _asset(name: str) -> bytes:
    return importlib.resources.files("oa_sync_server").joinpath("static", name).read_bytes()


def _static(name: str) -> web.Response:
    response = web.Response(body=_asset(name), content_type=ASSETS[name])
    response.headers["Content-Security-Policy"] = _CSP
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


async def index(request: web.Request) -> web.Response:
    """``GET /``: the inspector page."""
    return _static("index.html")


async def asset(request: web.Request) -> web.Response:
    """``GET /inspector/{name}``: one of :data:`ASSETS`, 404 otherwise."""
    name = request.match_info["name"]
    if name not in ASSETS or name == "index.html":
        raise web.HTTPNotFound
    return _static(name)


def _gauge(request: web.Request, name: str, labels: dict[str, str] | None = None) -> int:
    value = request.app[STATE].metrics.registry.get_sample_value(f"oa_sync_{name}", labels or {})
    return int(value or 0)


async def admin_status(request: web.Request) -> web.Response:
    """``GET /v1/admin/status``: the server panel's figures (scope ``sync:admin``)."""
    await authenticate(request, "sync:admin")
    state = request.app[STATE]
    lag_events, lag_s = await projector_lag(state)
    settings = state.settings
    lanes = ["postgres"]
    if settings.sink is SinkKind.HTTP:
        lanes = ["http"]
    elif settings.sink is SinkKind.TEE:
        lanes = ["postgres", "http"]
    elif settings.sink is SinkKind.NOOP:
        lanes = []
    parity: dict[str, Any] | None = None
    if "http" in lanes:
        parity = (await compute_parity(state.engine, limit=20)).to_json()
    body = {
        "projector": {
            "inProcess": state.projector is not None,
            "lagEvents": lag_events,
            "lagSeconds": round(lag_s, 3),
            "watermark": str(state.hub.watermark),
            "epoch": state.hub.epoch,
        },
        "connections": {
            "ws": _gauge(request, "connections", {"transport": "ws"}),
            "sse": _gauge(request, "connections", {"transport": "sse"}),
        },
        "subscriptions": _gauge(request, "subscriptions"),
        "sink": {"kind": settings.sink.value, "lanes": lanes, "parity": parity},
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def admin_drift(request: web.Request) -> web.Response:
    """``POST /v1/admin/drift``: compare the read model with a fold of the log, now."""
    await authenticate(request, "sync:admin")
    state = request.app[STATE]
    worker = state.projector
    kwargs: dict[str, Any] = {}
    if worker is not None:
        kwargs = {"projectors": worker.projection.projectors.values(), "worker": worker.name}
    report = await check_drift(state.engine, **kwargs)
    return web.Response(body=orjson.dumps(report.to_json()), content_type="application/json")


def add_routes(app: web.Application) -> None:
    """Register the inspector and the admin endpoints on ``app``."""
    app.router.add_get("/", index)
    app.router.add_get("/inspector/{name}", asset)
    app.router.add_get("/v1/admin/status", admin_status)
    app.router.add_post("/v1/admin/drift", admin_drift)
