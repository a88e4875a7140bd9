"""The error tree of ``oa_sync_server`` and the one table mapping errors to HTTP and close codes.

Every server error derives from :class:`ServerError`, itself an
:class:`oa_sync_core.errors.OaSyncError`; each carries its context as attributes::

    OaSyncError                       (oa_sync_core)
    └── ServerError
        ├── ConfigError               a setting is invalid; ``variable`` names it
        ├── AuthError                 a token was refused; ``reason`` says why (401 / 4401)
        ├── ForbiddenError            authenticated, but not allowed (403 / ``error`` frame)
        ├── LimitExceededError        a configured limit was breached; ``kind`` names it
        ├── UnsupportedMediaTypeError a request body of a media type the route does not take
        └── EmbeddedPostgresError     the embedded Postgres could not start or stop

:func:`classify` is the only place that turns an exception into an HTTP status, a WebSocket
close code and a machine-readable ``error`` code: handlers call it, they never pick numbers.
It also knows the database driver's errors: a connection that failed, was refused or was
terminated, an exhausted pool, a serialization failure or a server shutting down is a
*transient outage* (:func:`is_database_unavailable`): 503 ``unavailable`` with ``Retry-After``,
so a writer can tell "try again" from a bug (500 ``internal``).

What this is not: the close-code constants of the wire protocol. Those are the core's
(:mod:`oa_sync_core.protocol`) once it defines them; until then they live here.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Final

import psycopg
import sqlalchemy.exc as sa_exc
from oa_sync_core.errors import (
    CodecError,
    CodecErrorCode,
    ConcurrencyError,
    EventValidationError,
    OaSyncError,
    ProtocolError,
)

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_MALFORMED",
    "CLOSE_NO_AUTH_IN_TIME",
    "CLOSE_RATE_LIMITED",
    "CLOSE_TOO_LARGE",
    "CLOSE_UNAUTHENTICATED",
    "RETRY_AFTER_S",
    "AuthError",
    "AuthFailure",
    "ConfigError",
    "EmbeddedPostgresError",
    "ErrorMapping",
    "ForbiddenError",
    "LimitExceededError",
    "LimitKind",
    "ServerError",
    "UnsupportedMediaTypeError",
    "classify",
    "is_database_unavailable",
]

# Close codes of DESIGN.md "Wire protocol v1".
CLOSE_GOING_AWAY: Final = 1001
CLOSE_MALFORMED: Final = 4400
CLOSE_UNAUTHENTICATED: Final = 4401
CLOSE_NO_AUTH_IN_TIME: Final = 4408
CLOSE_TOO_LARGE: Final = 4413
CLOSE_RATE_LIMITED: Final = 4429


class ServerError(OaSyncError):
    """Root of every error raised by ``oa_sync_server``."""


class ConfigError(ServerError, ValueError):
    """A setting is invalid. The message is one line that starts with the variable's name.

    Attributes:
        variable: the environment variable (``OA_SYNC_PORT``), or the option, at fault.
    """

    def __init__(self, variable: str, message: str):
        self.variable = variable
        super().__init__(f"{variable}: {message}")


class AuthFailure(enum.StrEnum):
    """Why a token was refused. Used as the ``reason`` label of the auth-failure metric."""

    MISSING = "missing"
    MALFORMED = "malformed"
    TOO_LARGE = "too_large"
    UNSUPPORTED_ALGORITHM = "unsupported_algorithm"
    UNKNOWN_KEY = "unknown_key"
    KEYS_UNAVAILABLE = "keys_unavailable"
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    MISSING_CLAIM = "missing_claim"
    INVALID_CLAIM = "invalid_claim"
    WRONG_ISSUER = "wrong_issuer"
    WRONG_AUDIENCE = "wrong_audience"


class AuthError(ServerError):
    """A bearer token was refused (HTTP 401, close 4401).

    The message never contains the token.

    Attributes:
        reason: an :class:`AuthFailure`.
        claim: the offending claim or header field, when one is to blame.
    """

    def __init__(self, reason: AuthFailure, message: str = "", *, claim: str | None = None):
        self.reason = reason
        self.claim = claim
        super().__init__(f"{reason.value}: {message}" if message else reason.value)


class ForbiddenError(ServerError):
    """An authenticated principal asked for something its token does not grant (HTTP 403).

    Attributes:
        subject: the token's ``sub``.
        needed: the scope or topic that was missing.
    """

    def __init__(self, subject: str, needed: str):
        self.subject = subject
        self.needed = needed
        super().__init__(f"not granted: {needed}")


class LimitKind(enum.StrEnum):
    """The configured limits; used as the ``kind`` label of the limit-breach metric."""

    MESSAGE_SIZE = "message_size"
    SUBSCRIPTIONS = "subscriptions"
    TOPICS = "topics"
    CONNECTIONS_PER_SUBJECT = "connections_per_subject"
    RATE = "rate"
    AUTH_DEADLINE = "auth_deadline"
    IDLE = "idle"
    SEND_QUEUE = "send_queue"
    BODY_SIZE = "body_size"


class LimitExceededError(ServerError):
    """A configured limit was breached.

    Attributes:
        kind: a :class:`LimitKind`.
        limit: the configured value that was exceeded.
    """

    def __init__(self, kind: LimitKind, limit: float):
        self.kind = kind
        self.limit = limit
        shown = int(limit) if float(limit).is_integer() else limit
        super().__init__(f"{kind.value} limit of {shown} exceeded")


class UnsupportedMediaTypeError(ServerError):
    """A request body whose ``Content-Type`` the route does not accept (HTTP 415).

    Attributes:
        media_type: what the request declared (empty when it declared nothing).
        accepted: the media types the route takes.
    """

    def __init__(self, media_type: str, accepted: tuple[str, ...]):
        self.media_type = media_type
        self.accepted = accepted
        declared = repr(media_type) if media_type else "no Content-Type"
        super().__init__(f"{declared} is not accepted; send {' or '.join(accepted)}")


class MigrationsMissingError(ServerError):
    """The migration scripts are not where the package keeps them (a broken install).

    Attributes:
        location: the directory that was looked for.
    """

    def __init__(self, location: str):
        self.location = location
        super().__init__(
            f"migration scripts missing at {location}: reinstall oa-sync-server from its wheel"
        )


class EmbeddedPostgresError(ServerError):
    """The embedded Postgres failed to start or stop.

    Attributes:
        data_dir: the directory it runs in.
    """

    def __init__(self, message: str, *, data_dir: str):
        self.data_dir = data_dir
        super().__init__(f"{data_dir}: {message}")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ErrorMapping:
    """How one error is reported on each transport.

    Attributes:
        status: the HTTP status.
        close_code: the WebSocket close code, or ``None`` when the socket stays open and the
            client gets an ``error`` frame instead.
        code: the machine-readable ``error.code`` of an ``error`` frame or an HTTP body.
        retry_after_s: the ``Retry-After`` seconds of a transient failure, else ``None``.
    """

    status: int
    close_code: int | None
    code: str
    retry_after_s: int | None = None


_LIMIT_CLOSE: Final[dict[LimitKind, ErrorMapping]] = {
    LimitKind.MESSAGE_SIZE: ErrorMapping(status=413, close_code=CLOSE_TOO_LARGE, code="too_large"),
    LimitKind.BODY_SIZE: ErrorMapping(status=413, close_code=CLOSE_TOO_LARGE, code="too_large"),
    LimitKind.AUTH_DEADLINE: ErrorMapping(
        status=401, close_code=CLOSE_NO_AUTH_IN_TIME, code="auth_timeout"
    ),
    LimitKind.IDLE: ErrorMapping(status=408, close_code=CLOSE_NO_AUTH_IN_TIME, code="idle_timeout"),
    LimitKind.SUBSCRIPTIONS: ErrorMapping(
        status=429, close_code=None, code="too_many_subscriptions"
    ),
    LimitKind.TOPICS: ErrorMapping(status=400, close_code=None, code="too_many_topics"),
}
_LIMIT_DEFAULT: Final = ErrorMapping(status=429, close_code=CLOSE_RATE_LIMITED, code="rate_limited")

_CODEC_TOO_LARGE: Final = ErrorMapping(status=413, close_code=CLOSE_TOO_LARGE, code="too_large")
_MALFORMED: Final = ErrorMapping(status=400, close_code=CLOSE_MALFORMED, code="malformed")
_UNAUTHENTICATED: Final = ErrorMapping(
    status=401, close_code=CLOSE_UNAUTHENTICATED, code="unauthenticated"
)
_FORBIDDEN: Final = ErrorMapping(status=403, close_code=None, code="forbidden")
_UNSUPPORTED_MEDIA_TYPE: Final = ErrorMapping(
    status=415, close_code=None, code="unsupported_media_type"
)
_CONFLICT: Final = ErrorMapping(status=409, close_code=None, code="conflict")
_INTERNAL: Final = ErrorMapping(status=500, close_code=1011, code="internal")
RETRY_AFTER_S: Final = 1
"""The ``Retry-After`` of a 503: the pool reconnects on the next checkout, so soon is right."""
_UNAVAILABLE: Final = ErrorMapping(
    status=503, close_code=1011, code="unavailable", retry_after_s=RETRY_AFTER_S
)
# SQLSTATE classes of a transient condition: 08 connection exception, 40 transaction rollback
# (serialization failure, deadlock), 53 insufficient resources (too many connections),
# 57 operator intervention (admin shutdown, crash shutdown, cannot connect now).
_TRANSIENT_SQLSTATE_CLASSES: Final = frozenset({"08", "40", "53", "57"})


def _sqlstate(exc: BaseException) -> str | None:
    state = getattr(exc, "sqlstate", None)
    return state if isinstance(state, str) else None


def is_database_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` is a transient database failure (retrying later may succeed).

    Connection failures, refused or terminated connections, an exhausted pool, and the
    SQLSTATE classes 08, 40, 53 and 57, whether raised by psycopg directly or wrapped by
    SQLAlchemy. A constraint violation, a syntax error or a bug is not.
    """
    if isinstance(exc, sa_exc.TimeoutError):  # the pool had no connection to give
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        exc = exc.orig if exc.orig is not None else exc
    state = _sqlstate(exc)
    if state is not None:
        return state[:2] in _TRANSIENT_SQLSTATE_CLASSES
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)


def classify(exc: BaseException) -> ErrorMapping:
    """Map an exception to its HTTP status, close code and error code.

    This is the one table of DESIGN.md's status and close codes: 400/4400 malformed,
    401/4401 unauthenticated, 403 forbidden (an ``error`` frame, no close), 409 sequence
    conflict, 413/4413 too large, 415 unsupported media type, 429/4429 rate limited or slow
    consumer, 503 ``unavailable`` (with ``Retry-After``) for a transient database outage, and
    500/1011 for anything unexpected (which handlers log and never show).

    Args:
        exc: any exception.

    Returns:
        The :class:`ErrorMapping` for it.
    """
    if isinstance(exc, AuthError):
        return _UNAUTHENTICATED
    if isinstance(exc, ForbiddenError):
        return _FORBIDDEN
    if isinstance(exc, LimitExceededError):
        return _LIMIT_CLOSE.get(exc.kind, _LIMIT_DEFAULT)
    if isinstance(exc, CodecError):
        return _CODEC_TOO_LARGE if exc.code is CodecErrorCode.TOO_LARGE else _MALFORMED
    if isinstance(exc, ProtocolError) and exc.code == "not_authenticated":
        return _UNAUTHENTICATED
    if isinstance(exc, EventValidationError | ProtocolError):
        return _MALFORMED
    if isinstance(exc, ConcurrencyError):
        return _CONFLICT
    if isinstance(exc, UnsupportedMediaTypeError):
        return _UNSUPPORTED_MEDIA_TYPE
    if is_database_unavailable(exc):
        return _UNAVAILABLE
    return _INTERNAL
