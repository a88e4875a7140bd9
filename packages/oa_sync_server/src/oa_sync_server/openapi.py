"""The OpenAPI 3.1 description of the HTTP endpoints, served at ``GET /v1/openapi.json``.

:func:`document` builds the description from a dict in this module (the one source; no file to
keep in step), following DESIGN.md "Wire protocol v1" and the proto messages of
``proto/openagents/sync/v1/sync.proto``: bodies are proto3 JSON, 64-bit integers are decimal
strings, field names lowerCamelCase, every error is ``{"error": {"code", "message", ...}}``
with the statuses of :func:`oa_sync_server.errors.classify`.

A schemathesis test (``tests/e2e/test_openapi.py``) runs the description against a live server
and fails on any 5xx or any response that does not conform, so it stays true.

What this is not: a description of the WebSocket messages (see DESIGN.md and ``sync.proto``;
``GET /v1/sync`` is listed for its upgrade statuses only) or of the SSE event stream's events.
"""

from __future__ import annotations

import copy
from typing import Any, Final

import orjson
from aiohttp import web

from oa_sync_server import __version__

__all__ = ["OPENAPI_PATH", "add_routes", "document"]

OPENAPI_PATH: Final = "/v1/openapi.json"

_INT64: Final = {"type": "string", "pattern": "^-?[0-9]{1,19}$", "description": "int64"}
_JSON_OBJECT: Final = {"type": "object", "description": "proto3 JSON object"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_response(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


def _error(description: str) -> dict[str, Any]:
    return _json_response(description, "ErrorResponse")


_SCHEMAS: Final[dict[str, Any]] = {
    "Error": {
        "type": "object",
        "required": ["code", "message"],
        "properties": {
            "code": {"type": "string", "description": "machine-readable error code"},
            "message": {"type": "string"},
            "index": {"type": "integer", "description": "the offending event's index"},
            "field": {"type": "string", "description": "the offending field or parameter"},
            "epoch": {"type": "string", "description": "the current epoch (code `reset`)"},
            "positions": {
                "type": "array",
                "items": _INT64,
                "description": "code `not_visible`: the events were appended at these positions",
            },
        },
    },
    "ErrorResponse": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": _ref("Error")},
    },
    "AppendEvent": {
        "type": "object",
        "required": ["streamId", "type"],
        "additionalProperties": False,
        "properties": {
            "streamId": {"type": "string", "description": "e.g. `run:r1`"},
            "type": {"type": "string", "description": "e.g. `run.started`"},
            "payload": {
                **_JSON_OBJECT,
                "description": "proto3 JSON of the event type's message in events.proto",
            },
            "idempotencyKey": {"type": "string"},
            "expectedSeq": {
                "oneOf": [_INT64, {"type": "integer", "minimum": 0}],
                "description": "the stream's current last sequence number (0: empty)",
            },
        },
    },
    "AppendRequest": {
        "type": "object",
        "required": ["events"],
        "additionalProperties": False,
        "properties": {"events": {"type": "array", "minItems": 1, "items": _ref("AppendEvent")}},
    },
    "AppendResponse": {
        "type": "object",
        "required": ["positions"],
        "properties": {
            "positions": {"type": "array", "items": _INT64},
            "visibleWatermark": {
                **_INT64,
                "description": "with wait=visible: the watermark of the batch's documents",
            },
            "epoch": {"type": "string", "description": "with wait=visible: its epoch"},
        },
    },
    "AdminStatus": {
        "type": "object",
        "required": ["projector", "connections", "subscriptions", "sink"],
        "properties": {
            "projector": {
                "type": "object",
                "required": ["inProcess", "lagEvents", "lagSeconds", "watermark", "epoch"],
                "properties": {
                    "inProcess": {"type": "boolean"},
                    "lagEvents": {"type": "integer", "minimum": 0},
                    "lagSeconds": {"type": "number", "minimum": 0},
                    "watermark": _INT64,
                    "epoch": {"type": "string"},
                },
            },
            "connections": {
                "type": "object",
                "properties": {"ws": {"type": "integer"}, "sse": {"type": "integer"}},
            },
            "subscriptions": {"type": "integer"},
            "sink": {
                "type": "object",
                "required": ["kind", "lanes", "parity"],
                "properties": {
                    "kind": {"type": "string"},
                    "lanes": {"type": "array", "items": {"type": "string"}},
                    "parity": {"type": ["object", "null"]},
                },
            },
        },
    },
    "DriftReport": {
        "type": "object",
        "required": ["ok", "documentsChecked", "eventsFolded", "items"],
        "properties": {
            "ok": {"type": "boolean"},
            "documentsChecked": {"type": "integer"},
            "eventsFolded": {"type": "integer"},
            "items": {"type": "array", "items": {"type": "object"}},
        },
    },
    "Document": {
        "type": "object",
        "required": ["docKey", "projection", "version", "watermark", "contentHash", "document"],
        "properties": {
            "docKey": {"type": "string"},
            "projection": {"type": "string"},
            "version": _INT64,
            "watermark": _INT64,
            "contentHash": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "document": _JSON_OBJECT,
        },
    },
    "Change": {
        "type": "object",
        "properties": {
            "watermark": _INT64,
            "docKey": {"type": "string"},
            "projection": {"type": "string"},
            "version": _INT64,
            "contentHash": {"type": "string"},
        },
    },
    "ChangesPage": {
        "type": "object",
        "description": "proto3 JSON: fields at their default value are omitted",
        "properties": {
            "changes": {"type": "array", "items": _ref("Change")},
            "nextAfter": _INT64,
            "epoch": {"type": "string"},
            "hasMore": {"type": "boolean"},
        },
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string"}},
    },
    "Readiness": {
        "type": "object",
        "required": ["status", "database"],
        "properties": {
            "status": {
                "type": "string",
                "enum": ["ready", "waiting", "stalled", "lagging", "unavailable"],
            },
            "database": {"type": "boolean"},
            "detail": {"type": "string", "description": "why it is not ready"},
            "projectorLagEvents": {"type": "integer"},
            "projectorLagSeconds": {"type": "number"},
            "readHorizonAgeSeconds": {
                "type": ["number", "null"],
                "description": "null when the server's role may not see the holder's age",
            },
            "watermark": _INT64,
        },
    },
}

_TOPIC_PARAMETER: Final = {
    "name": "topic",
    "in": "query",
    "required": True,
    "description": "a document key, or a prefix ending in `*`; repeat for several",
    "style": "form",
    "explode": True,
    "schema": {"type": "array", "items": {"type": "string"}, "minItems": 1},
}

_UNAUTHENTICATED: Final = "missing, malformed or refused bearer token"
_UNAVAILABLE_RESPONSE: Final = _error(
    "the database is unavailable for a moment (code `unavailable`); retry after `Retry-After`"
    " seconds (appends: with the same idempotency keys)"
)

_PATHS: Final[dict[str, Any]] = {
    "/v1/events": {
        "post": {
            "operationId": "appendEvents",
            "summary": "Append events atomically, in order",
            "security": [{"bearer": []}],
            "parameters": [
                {
                    "name": "wait",
                    "in": "query",
                    "description": "`visible`: answer once the batch is projected, with"
                    " `visibleWatermark` and `epoch` (read-your-writes)",
                    "schema": {"type": "string", "enum": ["visible"]},
                },
                {
                    "name": "timeoutMs",
                    "in": "query",
                    "description": "with wait=visible: how long to wait, 1 to 60000 (default"
                    " 5000); past it the answer is 504 `not_visible`",
                    "schema": {"type": "string"},
                },
            ],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("AppendRequest")}},
            },
            "responses": {
                "200": _json_response("the positions of the events", "AppendResponse"),
                "400": _error("malformed body or invalid event"),
                "401": _error(_UNAUTHENTICATED),
                "403": _error("the token lacks sync:append"),
                "409": _error("expectedSeq does not match the stream"),
                "413": _error("body larger than OA_SYNC_MAX_BODY_BYTES"),
                "415": _error("a Content-Type other than application/json"),
                "503": _UNAVAILABLE_RESPONSE,
                "504": _error("wait=visible: appended, but not projected within timeoutMs"),
            },
        }
    },
    "/v1/docs/{doc_key}": {
        "get": {
            "operationId": "getDocument",
            "summary": "One document at its latest version",
            "security": [{"bearer": []}],
            "parameters": [
                {
                    "name": "doc_key",
                    "in": "path",
                    "required": True,
                    "description": "the document key (the whole rest of the path)",
                    "schema": {"type": "string", "minLength": 1},
                }
            ],
            "responses": {
                "200": _json_response("the document", "Document"),
                "401": _error(_UNAUTHENTICATED),
                "403": _error("the token lacks sync:read or does not grant the key"),
                "404": _error("no such document"),
                "503": _UNAVAILABLE_RESPONSE,
            },
        }
    },
    "/v1/changes": {
        "get": {
            "operationId": "getChanges",
            "summary": "Documents changed after a watermark (coalesced), for polling clients",
            "security": [{"bearer": []}],
            "parameters": [
                _TOPIC_PARAMETER,
                {
                    "name": "after",
                    "in": "query",
                    "description": "the watermark to continue after (default 0: everything)",
                    "schema": {"type": "string"},
                },
                {
                    "name": "limit",
                    "in": "query",
                    "description": "page size, 1 to 1000 (default 100)",
                    "schema": {"type": "string"},
                },
                {
                    "name": "epoch",
                    "in": "query",
                    "description": "the epoch of `after`; another epoch answers 410",
                    "schema": {"type": "string"},
                },
            ],
            "responses": {
                "200": _json_response("one page of changes", "ChangesPage"),
                "400": _error("bad topic, after or limit; too many topics"),
                "401": _error(_UNAUTHENTICATED),
                "403": _error("the token lacks sync:read or a topic is outside the grant"),
                "410": _error("the position is stale (code `reset`): start again from after=0"),
                "503": _UNAVAILABLE_RESPONSE,
            },
        }
    },
    "/v1/stream": {
        "get": {
            "operationId": "stream",
            "summary": "Server-Sent Events: catch-up, then live updates",
            "security": [{"bearer": []}],
            "parameters": [
                _TOPIC_PARAMETER,
                {
                    "name": "Last-Event-ID",
                    "in": "header",
                    "description": "the watermark to resume after",
                    "schema": {"type": "string"},
                },
            ],
            "responses": {
                "200": {
                    "description": "`update`, `reset` and `synced` events; heartbeat comments",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}},
                },
                "400": _error("bad topic or Last-Event-ID"),
                "401": _error(_UNAUTHENTICATED),
                "403": _error("the token lacks sync:read or a topic is outside the grant"),
                "503": _UNAVAILABLE_RESPONSE,
            },
        }
    },
    "/v1/sync": {
        "get": {
            "operationId": "sync",
            "summary": "The WebSocket (subprotocols oa-sync.v1.json and oa-sync.v1.proto)",
            "description": "Messages and close codes: DESIGN.md and docs/security.md.",
            "responses": {
                "101": {"description": "switched to the WebSocket protocol"},
                "400": {"description": "not a valid WebSocket upgrade request"},
                "403": {"description": "Origin not in OA_SYNC_ALLOWED_ORIGINS"},
            },
        }
    },
    "/": {
        "get": {
            "operationId": "inspector",
            "summary": "The inspector page (token in the URL fragment, never sent here)",
            "responses": {
                "200": {
                    "description": "the page",
                    "content": {"text/html": {"schema": {"type": "string"}}},
                }
            },
        }
    },
    "/inspector/{name}": {
        "get": {
            "operationId": "inspectorAsset",
            "summary": "The inspector page's script and style sheet",
            "parameters": [
                {
                    "name": "name",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "minLength": 1},
                }
            ],
            "responses": {
                "200": {
                    "description": "the asset",
                    "content": {
                        "text/javascript": {"schema": {"type": "string"}},
                        "text/css": {"schema": {"type": "string"}},
                    },
                },
                "404": _error("no such asset"),
            },
        }
    },
    "/v1/admin/status": {
        "get": {
            "operationId": "adminStatus",
            "summary": "Projector lag, connections, subscriptions, sink lanes and parity",
            "security": [{"bearer": []}],
            "responses": {
                "200": _json_response("the server's figures", "AdminStatus"),
                "401": _error(_UNAUTHENTICATED),
                "403": _error("the token lacks sync:admin"),
            },
        }
    },
    "/v1/admin/drift": {
        "post": {
            "operationId": "adminDrift",
            "summary": "Compare the read model with a fold of the log, now",
            "security": [{"bearer": []}],
            "responses": {
                "200": _json_response("the drift report (oa-sync drift --json)", "DriftReport"),
                "401": _error(_UNAUTHENTICATED),
                "403": _error("the token lacks sync:admin"),
            },
        }
    },
    "/healthz": {
        "get": {
            "operationId": "healthz",
            "summary": "Liveness: the process answers",
            "responses": {"200": _json_response("alive", "Health")},
        }
    },
    "/readyz": {
        "get": {
            "operationId": "readyz",
            "summary": "Readiness: the database answers and the projector keeps up",
            "responses": {
                "200": _json_response("ready", "Readiness"),
                "503": _json_response("not ready", "Readiness"),
            },
        }
    },
    "/metrics": {
        "get": {
            "operationId": "metrics",
            "summary": "Prometheus metrics",
            "responses": {
                "200": {
                    "description": "the Prometheus text exposition",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        }
    },
    OPENAPI_PATH: {
        "get": {
            "operationId": "openapi",
            "summary": "This document",
            "responses": {
                "200": {
                    "description": "the OpenAPI 3.1 description",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            },
        }
    },
}


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 description of the HTTP endpoints, as a fresh dict."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Khala sync API",
            "version": __version__,
            "description": (
                "Append events, read documents, poll or stream changes. Bodies are proto3 "
                "JSON (64-bit integers as strings). Errors are "
                '`{"error": {"code", "message"}}`; see docs/security.md for every status.'
            ),
        },
        "paths": copy.deepcopy(_PATHS),
        "components": {
            "schemas": copy.deepcopy(_SCHEMAS),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
    }


_BODY: Final = orjson.dumps(document(), option=orjson.OPT_SORT_KEYS)


async def openapi_json(request: web.Request) -> web.Response:
    """``GET /v1/openapi.json``: the description (no token needed)."""
    return web.Response(body=_BODY, content_type="application/json")


def add_routes(app: web.Application) -> None:
    """Register ``GET /v1/openapi.json`` on ``app``."""
    app.router.add_get(OPENAPI_PATH, openapi_json)
