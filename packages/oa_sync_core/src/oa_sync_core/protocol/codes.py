"""The protocol's vocabulary: close codes, error codes, reset reasons and limit kinds.

Every transport (WebSocket, SSE, HTTP), both sans-IO sessions, the server's error table
(:func:`oa_sync_server.errors.classify`) and the clients import these; none spells a code as a
literal. The values are the wire protocol (docs/protocol.md): changing one is a protocol change.

What this is not: the decisions that use them (:mod:`oa_sync_core.protocol.resume` decides a
reset; the server's error table maps exceptions to codes).
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = [
    "FINAL_CLOSE_CODES",
    "CloseCode",
    "ErrorCode",
    "LimitKind",
    "ResetReason",
]


class CloseCode(enum.IntEnum):
    """WebSocket close codes (DESIGN.md "Wire protocol v1")."""

    GOING_AWAY = 1001
    """The server is shutting down; reconnect elsewhere or later."""
    INTERNAL = 1011
    """The server failed unexpectedly; reconnect with backoff."""
    MALFORMED = 4400
    """A frame could not be decoded or is not a valid client message."""
    UNAUTHENTICATED = 4401
    """No valid token, or the token expired without a refresh."""
    TIMEOUT = 4408
    """No ``authenticate`` in time, or idle with no subscription."""
    TOO_LARGE = 4413
    """A frame exceeded the message size limit."""
    RATE_LIMITED = 4429
    """Too many messages, too many connections, or too slow a consumer."""


FINAL_CLOSE_CODES: Final = frozenset(
    {
        1002,  # RFC 6455 protocol error
        1003,  # RFC 6455 unsupported data
        1008,  # RFC 6455 policy violation
        4403,  # forbidden, as gateways in front of the server say it
        CloseCode.MALFORMED,
        CloseCode.TOO_LARGE,
    }
)
"""Closes after which a client must not reconnect: retrying would be refused the same way."""


class ErrorCode(enum.StrEnum):
    """The ``code`` of an ``error`` frame and of an HTTP error body."""

    MALFORMED = "malformed"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    AUTH_TIMEOUT = "auth_timeout"
    IDLE_TIMEOUT = "idle_timeout"
    TOO_MANY_SUBSCRIPTIONS = "too_many_subscriptions"
    TOO_MANY_TOPICS = "too_many_topics"
    DUPLICATE_SUBSCRIPTION = "duplicate_subscription"
    INVALID_SUBSCRIPTION = "invalid_subscription"
    UNKNOWN_SUBSCRIPTION = "unknown_subscription"
    RESET = "reset"
    NOT_VISIBLE = "not_visible"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    UNAVAILABLE = "unavailable"
    """The database is unreachable for now; retry after ``Retry-After`` (503)."""
    INTERNAL = "internal"


class ResetReason(enum.StrEnum):
    """Why a resume was refused and a full snapshot follows (every transport says the same)."""

    EPOCH_CHANGED = "epoch_changed"
    """The log's epoch changed (rebuild, restore): watermarks restarted."""
    WATERMARK_EXPIRED = "watermark_expired"
    """The watermark is older than the retained change log."""
    WATERMARK_AHEAD = "watermark_ahead"
    """The watermark is newer than the log (it belongs to another log)."""


class LimitKind(enum.StrEnum):
    """The configured limits; the ``kind`` label of the limit-breach metric."""

    MESSAGE_SIZE = "message_size"
    SUBSCRIPTIONS = "subscriptions"
    TOPICS = "topics"
    CONNECTIONS_PER_SUBJECT = "connections_per_subject"
    RATE = "rate"
    AUTH_DEADLINE = "auth_deadline"
    IDLE = "idle"
    SEND_QUEUE = "send_queue"
    BODY_SIZE = "body_size"
    APPEND_EVENTS = "append_events"
