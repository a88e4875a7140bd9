"""The HTTP API of DESIGN.md "Wire protocol v1": append, read one document, poll changes, ops.

Routes (added by :func:`add_routes`):

* ``POST /v1/events`` — ``AppendRequest`` → ``AppendResponse``; scope ``sync:append``.
  With ``?wait=visible[&timeoutMs=N]`` the answer waits until the projector has applied the
  batch and adds ``visibleWatermark`` (the watermark of the batch's documents, 0 when it
  changed none) and ``epoch`` (read-your-writes); past the timeout it is a 504
  ``not_visible`` whose ``positions`` say the events *were* appended.
* ``GET /v1/docs/{doc_key}`` — one ``Document`` (the whole rest of the path is the key);
  scope ``sync:read`` and a grant covering the key.
* ``GET /v1/changes?topic=…&after=W&limit=N[&epoch=E]`` — a ``ChangesPage``: documents
  (within topics ∩ grant) whose latest change is above ``W``, coalesced, in watermark order.
  A stale position (:func:`~oa_sync_core.protocol.resume.decide_resume`: another epoch, ``W``
  older than the retained change log or newer than the log) answers 410 with error code
  ``reset``: start again from ``after=0``.
* ``GET /healthz`` (the process answers), ``GET /readyz`` (database reachable, projector not
  far behind, not stalled; a ``detail`` names the cause), ``GET /metrics`` (Prometheus text).

Errors. Every failure is a JSON body ``{"error": {"code", "message"[, "index", "field"]}}``
whose status comes from :func:`oa_sync_server.errors.classify` — the one table. A transient
database outage is 503 ``unavailable`` with ``Retry-After`` (logged as one warning line: the
error's type and SQLSTATE, never its text, which carries SQL and parameters). Unexpected
exceptions become a bare 500 ``internal`` (logged with their type, never shown). A limit
breach counts in ``oa_sync_limit_breaches_total``; a 405 names the allowed methods in
``Allow``. Bodies are proto3 JSON: 64-bit integers as strings, lowerCamelCase names; a body
of another ``Content-Type`` than ``application/json`` is refused with 415.

What this is not: SSE (:mod:`oa_sync_server.transports.sse`) or the WebSocket
(:mod:`oa_sync_server.transports.ws`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import orjson
import sqlalchemy as sa
import structlog
from aiohttp import web
from oa_sync_core.codec import loads_strict, read_message, read_message_fast
from oa_sync_core.contracts import v1
from oa_sync_core.errors import AppendLimitError, CodecError, EventValidationError
from oa_sync_core.events import Event, NewEvent, check_append_size
from oa_sync_core.projectors import DEFAULT_PROJECTORS
from oa_sync_core.protocol.codes import ErrorCode, LimitKind
from oa_sync_core.protocol.resume import Position, decide_resume
from oa_sync_core.topics import Topic, parse_topic

from oa_sync_server.auth import Principal
from oa_sync_server.errors import (
    RETRY_AFTER_S,
    AuthError,
    AuthFailure,
    ForbiddenError,
    LimitExceededError,
    NotVisibleError,
    StaleCursorError,
    UnsupportedMediaTypeError,
    classify,
)
from oa_sync_server.logs import error_fields
from oa_sync_server.postgres import read_model
from oa_sync_server.postgres.diagnostics import read_horizon_holder, read_lease
from oa_sync_server.state import STATE, ServerState

__all__ = [
    "BODY_MEDIA_TYPES",
    "CORS_EXPOSED_HEADERS",
    "DEFAULT_CHANGES_LIMIT",
    "DEFAULT_VISIBLE_TIMEOUT_MS",
    "LAG_COUNT_CAP",
    "MAX_CHANGES_LIMIT",
    "MAX_VISIBLE_TIMEOUT_MS",
    "READY_MAX_LAG_S",
    "READY_STALL_S",
    "StaleCursorError",
    "add_cors_headers",
    "add_routes",
    "authenticate",
    "bad_query",
    "cors_middleware",
    "document_json",
    "error_middleware",
    "parse_topics",
    "projector_lag",
]

DEFAULT_CHANGES_LIMIT: Final = 100
MAX_CHANGES_LIMIT: Final = 1000
READY_MAX_LAG_S: Final = 30.0
"""``/readyz`` answers 503 while the oldest unprojected event is older than this."""
READY_STALL_S: Final = 5.0
"""``/readyz`` answers 503 ``stalled`` once events older than this wait behind an open
transaction that began before them (it holds the read horizon)."""
_DB_CHECK_TIMEOUT_S: Final = 2.0
BODY_MEDIA_TYPES: Final = ("application/json",)
"""The ``Content-Type`` a request body may have (parameters such as ``charset`` aside)."""
CORS_EXPOSED_HEADERS: Final = "WWW-Authenticate, Retry-After"
"""Response headers a browser page may read (``Access-Control-Expose-Headers``)."""
DEFAULT_VISIBLE_TIMEOUT_MS: Final = 5_000
"""How long ``POST /v1/events?wait=visible`` waits for the projector when no ``timeoutMs``."""
MAX_VISIBLE_TIMEOUT_MS: Final = 60_000
_EVENT_PATH = re.compile(r"events\[(\d+)\]\.?(.*)")
_BEARER = re.compile(r"Bearer +(\S+)", re.IGNORECASE)

_log = structlog.get_logger(__name__)

LAG_COUNT_CAP: Final = 100_000
"""Projector lag in events is counted up to this many (the count stays an index range scan)."""

_LAG = sa.text(
    "SELECT count(*) AS n, "
    "COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - min(s.recorded_at)), 0) AS age "
    "FROM (SELECT e.recorded_at FROM oa_sync.events e "
    "WHERE (e.tx_id, e.position) > ("
    "COALESCE((SELECT l.cursor_tx_id FROM oa_sync.projector_leases l WHERE l.name = :name), "
    "CAST('0' AS xid8)), "
    "COALESCE((SELECT l.cursor_position FROM oa_sync.projector_leases l WHERE l.name = :name), 0)"
    ") ORDER BY e.tx_id, e.position LIMIT :cap) AS s"
)


# Whether the projector's cursor has passed every event at :positions (all of one batch, or,
# for a replayed idempotency key, the original events, which may span transactions).
_PROJECTED = sa.text(
    "SELECT COALESCE(bool_and((e.tx_id, e.position) <= (l.cursor_tx_id, l.cursor_position)), "
    "false) FROM oa_sync.events e JOIN oa_sync.projector_leases l ON l.name = :name "
    "WHERE e.position = ANY(:positions)"
)
_VISIBLE_AT = sa.text(
    "SELECT COALESCE(max(watermark), 0) FROM oa_sync.documents WHERE doc_key = ANY(:keys)"
)


def _state(request: web.Request) -> ServerState:
    return request.app[STATE]


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _error_body(exc: BaseException) -> tuple[int, dict[str, Any]]:
    mapping = classify(exc)
    if isinstance(exc, StaleCursorError):
        body = {"code": ErrorCode.RESET, "message": str(exc), "epoch": exc.epoch}
        return 410, {"error": body}
    if isinstance(exc, NotVisibleError):
        positions = [str(p) for p in exc.positions]
        late: dict[str, Any] = {
            "code": ErrorCode.NOT_VISIBLE,
            "message": str(exc),
            "positions": positions,
        }
        return 504, {"error": late}
    if isinstance(exc, web.HTTPException):
        return exc.status, {"error": {"code": exc.reason.lower().replace(" ", "_"), "message": ""}}
    if mapping.status >= 500 or mapping.retry_after_s is not None:
        message = "internal error" if mapping.retry_after_s is None else "try again later"
        return mapping.status, {"error": {"code": mapping.code, "message": message}}
    error: dict[str, Any] = {"code": mapping.code, "message": str(exc)}
    if isinstance(exc, EventValidationError):
        if exc.index is not None:
            error["index"] = exc.index
        if exc.field is not None:
            error["field"] = exc.field
    return mapping.status, {"error": error}


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Turn every error into the JSON error body of its :func:`classify` status; count requests.

    aiohttp's own HTTP exceptions (404 for an unknown path, 405) keep their status with a JSON
    body. Nothing unexpected is ever shown to the client: a 500 says ``internal error``.
    """
    route = request.match_info.route.resource
    name = route.canonical if route is not None else "unmatched"
    state = _state(request)
    try:
        response = await handler(request)
    except Exception as exc:  # the one place every handler error is reported
        if isinstance(exc, web.HTTPException) and exc.status < 400:
            raise
        status, body = _error_body(exc)
        mapping = classify(exc)
        if mapping.retry_after_s is not None:
            # Expected in an outage: one line, no traceback (its text holds SQL and data).
            _log.warning("request_unavailable", route=name, **error_fields(exc))
        elif status >= 500 and not isinstance(exc, web.HTTPException):
            _log.error("request_failed", route=name, error=type(exc).__name__, exc_info=exc)
        response = _json(body, status)
        if status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        if status == 503:  # an outage, or a server shutting down: either way, come back soon
            response.headers["Retry-After"] = str(mapping.retry_after_s or RETRY_AFTER_S)
        if isinstance(exc, web.HTTPMethodNotAllowed):
            response.headers["Allow"] = exc.headers.get("Allow", "")
    state.metrics.http_requests.labels(route=name, status=str(response.status)).inc()
    return response


def _cors_origin(request: web.Request) -> str | None:
    origin = request.headers.get("Origin")
    if origin is None:
        return None
    allowed = _state(request).settings.allowed_origins
    return origin if "*" in allowed or origin.rstrip("/") in allowed else None


@web.middleware
async def cors_middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Answer CORS preflights from ``OA_SYNC_ALLOWED_ORIGINS``; other requests pass through.

    Origins not listed get no CORS headers (browsers then refuse the response); requests
    without ``Origin`` (non-browser clients) are unaffected.
    """
    if (
        request.method == "OPTIONS"
        and "Access-Control-Request-Method" in request.headers
        and _cors_origin(request) is not None
    ):
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Methods": "GET, POST",
                "Access-Control-Allow-Headers": "Authorization, Content-Type, Last-Event-ID",
                "Access-Control-Max-Age": "600",
            },
        )
    return await handler(request)


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare`` hook: allow a listed ``Origin`` (streams included)."""
    origin = _cors_origin(request)
    if origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSED_HEADERS
        response.headers["Vary"] = "Origin"


async def authenticate(request: web.Request, scope: str) -> Principal:
    """The principal of the request's ``Authorization: Bearer`` token, holding ``scope``.

    Raises:
        AuthError: no, malformed, or invalid token (401).
        ForbiddenError: the token lacks ``scope`` (403).
    """
    header = request.headers.get("Authorization", "")
    if not header:
        raise AuthError(AuthFailure.MISSING, "no Authorization header")
    match = _BEARER.fullmatch(header.strip())
    if match is None:
        raise AuthError(AuthFailure.MALFORMED, "Authorization is not 'Bearer <token>'")
    principal = await _state(request).verifier.verify(match.group(1))
    if not principal.has_scope(scope):
        raise ForbiddenError(principal.subject, scope)
    return principal


def _breach(request: web.Request, kind: LimitKind, limit: float) -> LimitExceededError:
    """Count a limit breach of the HTTP API and return the error to raise."""
    _state(request).metrics.limit_breaches.labels(kind=kind.value).inc()
    return LimitExceededError(kind, limit)


def bad_query(name: str, message: str) -> EventValidationError:
    """A 400 for a bad query parameter or header ``name``."""
    return EventValidationError(message, field=name)


def parse_topics(request: web.Request, principal: Principal) -> list[Topic]:
    """The ``topic`` query parameters (one or more), each checked against the grant.

    Raises:
        EventValidationError: no topic, too many, or a malformed one (400).
        ForbiddenError: a topic shares no document with the grant (403).
    """
    raw = request.query.getall("topic", [])
    limit = _state(request).settings.limits.max_topics_per_subscription
    if not raw:
        raise bad_query("topic", "at least one topic query parameter is required")
    if len(raw) > limit:
        raise _breach(request, LimitKind.TOPICS, limit)
    topics: list[Topic] = []
    for text in raw:
        try:
            topic = parse_topic(text)
        except ValueError as exc:
            raise bad_query("topic", str(exc)) from None
        if not principal.grant.intersects(topic):
            raise ForbiddenError(principal.subject, f"topic {text}")
        topics.append(topic)
    return topics


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    if not re.fullmatch(r"[0-9]{1,19}", raw) or not low <= int(raw) <= high:
        raise bad_query(name, f"{name} must be an integer from {low} to {high}")
    return int(raw)


def document_json(row: read_model.DocRow) -> bytes:
    """The proto3 JSON ``Document`` of a stored row (the body spliced in, not re-encoded)."""
    return orjson.dumps(
        {
            "docKey": row.doc_key,
            "projection": row.projection,
            "version": str(row.version),
            "watermark": str(row.watermark),
            "contentHash": row.content_hash,
            "document": orjson.Fragment(row.body),
        }
    )


# -- handlers ---------------------------------------------------------------------------------


def _require_json(request: web.Request) -> None:
    """415 unless the body is declared ``application/json`` (checked before it is read)."""
    declared = request.headers.get("Content-Type", "")
    if request.content_type not in BODY_MEDIA_TYPES or not declared:
        raise UnsupportedMediaTypeError(declared.split(";")[0].strip(), BODY_MEDIA_TYPES)


async def _read_body(request: web.Request) -> bytes:
    limit = _state(request).settings.limits.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise _breach(request, LimitKind.BODY_SIZE, limit)
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _breach(request, LimitKind.BODY_SIZE, limit) from None


def _event_error(exc: CodecError) -> EventValidationError:
    match = _EVENT_PATH.match(exc.path)
    if match is None:
        return EventValidationError(str(exc), field=exc.path or None)
    return EventValidationError(str(exc), index=int(match.group(1)), field=match.group(2) or None)


async def append_events(request: web.Request) -> web.Response:
    """``POST /v1/events``: validate every event strictly, append atomically, return positions."""
    await authenticate(request, "sync:append")
    _require_json(request)
    state = _state(request)
    body = await _read_body(request)
    try:
        parsed = loads_strict(body, max_bytes=state.settings.limits.max_body_bytes)
        # The fast reader answers the usual request exactly as read_message; else it decides.
        message = read_message_fast(v1.AppendRequest, parsed) or read_message(
            v1.AppendRequest, parsed
        )
    except CodecError as exc:
        if exc.path:
            raise _event_error(exc) from None
        raise
    items = message.get("events", [])
    try:
        check_append_size(len(items), state.event_log.max_events)  # 413 naming the limit
    except AppendLimitError:
        state.metrics.limit_breaches.labels(kind=LimitKind.APPEND_EVENTS.value).inc()
        raise
    if not items:
        raise EventValidationError("events must hold at least one event", field="events")
    batch = []
    for item in items:
        seq = item.get("expectedSeq")
        event = NewEvent(
            stream_id=item.get("streamId", ""),
            type=item.get("type", ""),
            payload=item.get("payload", {}),
            expected_seq=None if seq is None else int(seq),
            idempotency_key=item.get("idempotencyKey") or None,
        )
        batch.append(event)
    wait = request.query.get("wait")
    if wait not in (None, "visible"):
        raise bad_query("wait", "wait must be 'visible' when given")
    timeout_ms = _int_param(
        request, "timeoutMs", DEFAULT_VISIBLE_TIMEOUT_MS, 1, MAX_VISIBLE_TIMEOUT_MS
    )
    positions = await state.event_log.append(batch)  # validates each event once, names its index
    answer: dict[str, Any] = {"positions": [str(p) for p in positions]}
    if wait == "visible":
        try:
            async with asyncio.timeout(timeout_ms / 1000):
                watermark, epoch = await _visible(state, batch, positions)
        except TimeoutError:
            raise NotVisibleError(positions, timeout_ms) from None
        answer |= {"visibleWatermark": str(watermark), "epoch": epoch}
    return _json(answer)


def _doc_keys(state: ServerState, batch: list[NewEvent], positions: list[int]) -> list[str]:
    """The documents the server's projectors route the batch's events to."""
    worker = state.projector
    projectors = (
        list(worker.projection.projectors.values()) if worker is not None else DEFAULT_PROJECTORS
    )
    now = dt.datetime.now(dt.UTC)
    keys: set[str] = set()
    for new, position in zip(batch, positions, strict=True):
        event = Event(
            position=position,
            stream_id=new.stream_id,
            stream_seq=1,
            type=new.type,
            payload=new.payload,
            recorded_at=now,
        )
        keys.update(k for p in projectors if (k := p.doc_key(event)) is not None)
    return sorted(keys)


async def _visible(
    state: ServerState, batch: list[NewEvent], positions: list[int]
) -> tuple[int, str]:
    """Wait until the projector has applied the batch; its documents' watermark and the epoch.

    Waits on the hub (woken by the projector's NOTIFY), never on a timer: the hub's watermark
    is read before each check, so an advance between the check and the wait is not missed.
    """
    keys = _doc_keys(state, batch, positions)
    while True:
        seen = state.hub.watermark
        async with state.engine.connect() as conn:
            if not keys:
                return 0, (await read_model.read_meta(conn)).epoch
            lease = state.projector.name if state.projector is not None else "default"
            done = await conn.execute(_PROJECTED, {"name": lease, "positions": positions})
            if done.scalar_one():
                watermark = (await conn.execute(_VISIBLE_AT, {"keys": keys})).scalar_one()
                return int(watermark), (await read_model.read_meta(conn)).epoch
        await state.hub.wait_for(seen + 1, within_s=MAX_VISIBLE_TIMEOUT_MS / 1000)


async def get_document(request: web.Request) -> web.Response:
    """``GET /v1/docs/{doc_key}``: one document, 404 when absent, 403 outside the grant."""
    principal = await authenticate(request, "sync:read")
    doc_key = request.match_info["doc_key"]
    if not principal.grant.allows(doc_key):
        raise ForbiddenError(principal.subject, f"document {doc_key}")
    async with _state(request).engine.connect() as conn:
        row = await read_model.document(conn, doc_key)
    if row is None:
        return _json({"error": {"code": ErrorCode.NOT_FOUND, "message": "no such document"}}, 404)
    return web.Response(body=document_json(row), content_type="application/json")


async def get_changes(request: web.Request) -> web.Response:
    """``GET /v1/changes``: one coalesced page of changes after ``after``."""
    principal = await authenticate(request, "sync:read")
    topics = parse_topics(request, principal)
    after = _int_param(request, "after", 0, 0, 2**63 - 1)
    limit = _int_param(request, "limit", DEFAULT_CHANGES_LIMIT, 1, MAX_CHANGES_LIMIT)
    epoch = request.query.get("epoch") or None
    position = Position(watermark=after, epoch=epoch)
    engine = await _state(request).catch_up_engine()
    async with engine.connect() as conn:
        meta = await read_model.read_meta(conn)
        _, reset = decide_resume(position, meta)
        if reset is not None:
            raise StaleCursorError(reset.value, meta.epoch)
        rows = await read_model.documents_matching(
            conn, topics, principal.grant, after=after, limit=limit
        )
    changes = [
        {
            "watermark": str(r.watermark),
            "docKey": r.doc_key,
            "projection": r.projection,
            "version": str(r.version),
            "contentHash": r.content_hash,
        }
        for r in rows
    ]
    # Defaults are written out (proto3 JSON allows it) so polling clients need no fallbacks.
    return _json(
        {
            "changes": changes,
            "nextAfter": str(rows[-1].watermark if rows else after),
            "epoch": meta.epoch,
            "hasMore": len(rows) == limit,
        }
    )


async def healthz(request: web.Request) -> web.Response:
    """``GET /healthz``: the process answers."""
    return _json({"status": "ok"})


async def projector_lag(state: ServerState) -> tuple[int, float]:
    """Events not yet projected and the age in seconds of the oldest of them."""
    async with state.engine.connect() as conn:
        row = (await conn.execute(_LAG, {"name": "default", "cap": LAG_COUNT_CAP})).one()
    return int(row.n), float(row.age)


async def _readiness(state: ServerState) -> tuple[str, dict[str, Any]]:
    """The readiness status and its details: lag, the lease, the read horizon.

    ``ready``; ``waiting`` while a silent holder (killed without releasing) keeps the lease
    until it expires; ``stalled`` while events wait behind an open transaction that holds the
    read horizon; ``lagging`` beyond :data:`READY_MAX_LAG_S`.
    """
    lag_events, lag_s = await projector_lag(state)
    async with state.engine.connect() as conn:
        lease = await read_lease(conn)
        holder = await read_horizon_holder(conn)
    metrics = state.metrics
    metrics.projector_lag_events.set(lag_events)
    metrics.projector_lag_seconds.set(lag_s)
    # Unknown (NaN) when the holder's age is hidden from this role; 0 when nothing holds it.
    age = 0.0 if holder is None else math.nan if holder.age_s is None else holder.age_s
    metrics.read_horizon_age_seconds.set(age)
    body: dict[str, Any] = {
        "projectorLagEvents": lag_events,
        "projectorLagSeconds": round(lag_s, 3),
        "readHorizonAgeSeconds": None if math.isnan(age) else round(age, 3),
    }
    if lease is not None and lease.silent:
        return "waiting", body | {"detail": lease.describe()}
    # The holder blocks the waiting events when its transaction began before them (an age
    # hidden from this role is taken to: a pending event older than READY_STALL_S says enough).
    if (
        lag_events
        and lag_s > READY_STALL_S
        and holder is not None
        and (holder.age_s is None or holder.age_s >= lag_s)
    ):
        return "stalled", body | {"detail": holder.describe()}
    if lag_s > READY_MAX_LAG_S:
        return "lagging", body | {"detail": f"oldest unprojected event is {lag_s:.0f} s old"}
    return "ready", body


async def readyz(request: web.Request) -> web.Response:
    """``GET /readyz``: 200 when the database answers and projection runs, else 503.

    The body says why: ``status`` (``ready``, ``waiting``, ``stalled``, ``lagging``,
    ``unavailable``) and, unless ready, a one-line ``detail`` naming the cause.
    """
    state = _state(request)
    try:
        async with asyncio.timeout(_DB_CHECK_TIMEOUT_S):
            status, details = await _readiness(state)
    except (TimeoutError, sa.exc.SQLAlchemyError, OSError) as exc:
        _log.warning("readiness_failed", **error_fields(exc))
        return _json(
            {"status": "unavailable", "database": False, "detail": "database unreachable"}, 503
        )
    body = {
        "status": status,
        "database": True,
        **details,
        "watermark": str(state.hub.watermark),
    }
    return _json(body, 200 if status == "ready" else 503)


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: the Prometheus exposition (lag and read horizon refreshed on scrape)."""
    state = _state(request)
    started = time.monotonic()
    try:
        async with asyncio.timeout(_DB_CHECK_TIMEOUT_S):
            await _readiness(state)
    except (TimeoutError, sa.exc.SQLAlchemyError, OSError) as exc:
        _log.warning("lag_scrape_failed", s=time.monotonic() - started, **error_fields(exc))
    body, content_type = state.metrics.render()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


def add_routes(app: web.Application) -> None:
    """Register the HTTP API on ``app``."""
    app.router.add_post("/v1/events", append_events)
    app.router.add_get("/v1/docs/{doc_key:.+}", get_document)
    app.router.add_get("/v1/changes", get_changes)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
