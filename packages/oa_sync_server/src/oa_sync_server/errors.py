"""The error tree of ``oa_sync_server`` and the one table mapping errors to HTTP and close codes.

Every server error derives from :class:`ServerError`, itself an
:class:`oa_sync_core.errors.OaSyncError`; each carries its context as attributes. Every error
class the distribution raises is defined here::

    OaSyncError                           (oa_sync_core)
    └── ServerError
        ├── ConfigError                   a setting is invalid; ``variable`` names it
        ├── UsageError                    bad input on a command line or in a file (exit 2)
        ├── AuthError                     a token was refused; ``reason`` says why (401 / 4401)
        ├── ForbiddenError                authenticated, but not allowed (403 / ``error`` frame)
        ├── LimitExceededError            a configured limit was breached; ``kind`` names it
        ├── UnsupportedMediaTypeError     a request body of a media type the route does not take
        ├── StaleCursorError              a polling position cannot continue (410 ``reset``)
        ├── NotVisibleError               appended, but not projected within ``timeoutMs`` (504)
        ├── DatabaseUnavailableError      unreachable, credentials refused, no such database
        ├── MigrationsMissingError        the package's migration scripts are missing
        ├── EmbeddedUnavailableError      no database URL and no ``[embedded]`` extra
        ├── EmbeddedPostgresError         the embedded Postgres could not start or stop
        ├── LeaseError                    the projector lease is not ours
        │   ├── LeaseLost                 another holder took it over mid-batch
        │   └── LeaseBusyError            another live holder has it; stand by
        ├── HttpSinkError                 a document could not be delivered over HTTP
        │   ├── DeliveryUnavailableError  every attempt failed retryably
        │   ├── DeliveryRejectedError     the receiver refused it for good
        │   └── DeliveryStoppedError      the stop event ended a retry wait
        └── StreamOrderConflict           (also a ConcurrencyError) a newer transaction wrote
                                          the stream first; retry in a new transaction

:func:`classify` is the only place that turns an exception into an HTTP status, a WebSocket
close code and a machine-readable ``error`` code: handlers call it, they never pick numbers.
It also knows the database driver's errors: a connection that failed, was refused or was
terminated, an exhausted pool, a serialization failure or a server shutting down is a
*transient outage* (:func:`is_database_unavailable`): 503 ``unavailable`` with ``Retry-After``,
so a writer can tell "try again" from a bug (500 ``internal``).

What this is not: the protocol's vocabulary. Close codes, error codes and limit kinds are the
core's (:mod:`oa_sync_core.protocol.codes`); this module only maps exceptions onto them.
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
from oa_sync_core.protocol.codes import CloseCode, ErrorCode, LimitKind

__all__ = [
    "RETRY_AFTER_S",
    "AuthError",
    "AuthFailure",
    "ConfigError",
    "EmbeddedPostgresError",
    "ErrorMapping",
    "ForbiddenError",
    "LimitExceededError",
    "ServerError",
    "UnsupportedMediaTypeError",
    "classify",
    "is_database_unavailable",
]


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


class EmbeddedUnavailableError(ServerError):
    """No database URL is set and the embedded Postgres (the ``[embedded]`` extra) is absent."""

    def __init__(self) -> None:
        super().__init__(
            "OA_SYNC_DATABASE_URL: not set, and the embedded Postgres is not installed: set "
            "OA_SYNC_DATABASE_URL=postgresql://... or pip install 'oa-sync-server[embedded]'"
        )


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


class LeaseError(ServerError):
    """The projector lease is not ours. Attributes: ``name`` (the worker name)."""

    def __init__(self, name: str, message: str) -> None:
        self.name = name
        super().__init__(message)


class LeaseLost(LeaseError):  # noqa: N818 - the name says what happened
    """Another holder took the lease over (a higher epoch); nothing of this batch committed."""


class LeaseBusyError(LeaseError):
    """The lease is held by another live holder; this worker stands by."""


class HttpSinkError(ServerError):
    """Root of the HTTP sink's errors.

    Attributes:
        doc_key: the document being delivered.
        version: its version.
    """

    def __init__(self, message: str, *, doc_key: str, version: int):
        self.doc_key = doc_key
        self.version = version
        super().__init__(f"{doc_key}@{version}: {message}")


class DeliveryUnavailableError(HttpSinkError):
    """Every attempt failed with a retryable status or a connection error.

    Attributes:
        attempts: attempts made.
        last_status: the last HTTP status, or ``None`` after a connection error.
        last_error: a one-line description of the last failure.
    """

    def __init__(
        self, *, doc_key: str, version: int, attempts: int, last_status: int | None, last_error: str
    ):
        self.attempts = attempts
        self.last_status = last_status
        self.last_error = last_error
        super().__init__(
            f"gave up after {attempts} attempts: {last_error}", doc_key=doc_key, version=version
        )


class DeliveryRejectedError(HttpSinkError):
    """The receiver refused an update with a non-retryable status (raised by :class:`HttpSink`).

    Attributes:
        status: the HTTP status (0 when refused before sending, e.g. no mutation configured).
        body: the response body, truncated.
    """

    def __init__(self, *, doc_key: str, version: int, status: int, body: str):
        self.status = status
        self.body = body
        super().__init__(f"rejected with {status}", doc_key=doc_key, version=version)


class DeliveryStoppedError(HttpSinkError):
    """The stop event was set while a delivery waited to retry; nothing more was sent."""


class StreamOrderConflict(ServerError, ConcurrencyError):  # noqa: N818 - named for its cause
    """A stream's last event was written by a newer transaction than the appending one.

    Appending now would put this event before an earlier ``stream_seq`` in log order. Retry
    in a new transaction (the log does so itself when it owns the transaction).

    Attributes:
        stream_id: the stream.
        expected_seq: the caller's ``expected_seq`` (or the seq the append would follow).
        actual_seq: the stream's last sequence number.
    """

    def __init__(self, stream_id: str, last_seq: int, expected_seq: int | None = None) -> None:
        super().__init__(stream_id, last_seq if expected_seq is None else expected_seq, last_seq)
        self.args = (
            f"stream {stream_id!r} was last written by a newer transaction; "
            "retry the append in a new transaction",
        )


class StaleCursorError(ServerError):
    """A polling position can no longer be continued (410, code ``reset``).

    Attributes:
        reason: a :class:`~oa_sync_core.protocol.codes.ResetReason` value.
        epoch: the current epoch.
    """

    def __init__(self, reason: str, epoch: str):
        self.reason = reason
        self.epoch = epoch
        super().__init__(f"{reason}: restart from after=0 with epoch {epoch}")


class NotVisibleError(ServerError):
    """An append committed but was not projected within its ``timeoutMs`` (504 ``not_visible``).

    Attributes:
        positions: the log positions of the appended events (they *are* in the log).
    """

    def __init__(self, positions: list[int], timeout_ms: int):
        self.positions = positions
        super().__init__(
            f"appended, but not visible within {timeout_ms} ms (the projector is behind or not"
            " running); the events are in the log: do not append them again without their"
            " idempotency keys"
        )


class DatabaseUnavailableError(ServerError):
    """The database could not be reached or refused us. The message never shows the URL.

    Attributes:
        reason: ``unreachable`` (nothing answers at the host and port), ``credentials`` (the
            server refused the user or password), ``no_database`` (the server has no such
            database) or ``error`` (anything else the driver reported).
    """

    def __init__(self, message: str, *, reason: str):
        self.reason = reason
        super().__init__(message)


class UsageError(ServerError):
    """Bad input on the command line or in a file: one line for the user, exit code 2."""


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
    LimitKind.MESSAGE_SIZE: ErrorMapping(
        status=413, close_code=CloseCode.TOO_LARGE, code=ErrorCode.TOO_LARGE
    ),
    LimitKind.BODY_SIZE: ErrorMapping(
        status=413, close_code=CloseCode.TOO_LARGE, code=ErrorCode.TOO_LARGE
    ),
    LimitKind.AUTH_DEADLINE: ErrorMapping(
        status=401, close_code=CloseCode.TIMEOUT, code=ErrorCode.AUTH_TIMEOUT
    ),
    LimitKind.IDLE: ErrorMapping(
        status=408, close_code=CloseCode.TIMEOUT, code=ErrorCode.IDLE_TIMEOUT
    ),
    LimitKind.SUBSCRIPTIONS: ErrorMapping(
        status=429, close_code=None, code=ErrorCode.TOO_MANY_SUBSCRIPTIONS
    ),
    LimitKind.TOPICS: ErrorMapping(status=400, close_code=None, code=ErrorCode.TOO_MANY_TOPICS),
}
_LIMIT_DEFAULT: Final = ErrorMapping(
    status=429, close_code=CloseCode.RATE_LIMITED, code=ErrorCode.RATE_LIMITED
)

_CODEC_TOO_LARGE: Final = ErrorMapping(
    status=413, close_code=CloseCode.TOO_LARGE, code=ErrorCode.TOO_LARGE
)
_MALFORMED: Final = ErrorMapping(
    status=400, close_code=CloseCode.MALFORMED, code=ErrorCode.MALFORMED
)
_UNAUTHENTICATED: Final = ErrorMapping(
    status=401, close_code=CloseCode.UNAUTHENTICATED, code=ErrorCode.UNAUTHENTICATED
)
_FORBIDDEN: Final = ErrorMapping(status=403, close_code=None, code=ErrorCode.FORBIDDEN)
_CONFLICT: Final = ErrorMapping(status=409, close_code=None, code=ErrorCode.CONFLICT)
_INTERNAL: Final = ErrorMapping(status=500, close_code=CloseCode.INTERNAL, code=ErrorCode.INTERNAL)
RETRY_AFTER_S: Final = 1
"""The ``Retry-After`` of a 503: the pool reconnects on the next checkout, so soon is right."""
# The codes of 415 and 503 are spelled here until oa_sync_core.protocol.codes.ErrorCode has
# UNSUPPORTED_MEDIA_TYPE and UNAVAILABLE.
_UNSUPPORTED_MEDIA_TYPE: Final = ErrorMapping(
    status=415, close_code=None, code=ErrorCode.UNSUPPORTED_MEDIA_TYPE
)
_UNAVAILABLE: Final = ErrorMapping(
    status=503,
    close_code=CloseCode.INTERNAL,
    code=ErrorCode.UNAVAILABLE,
    retry_after_s=RETRY_AFTER_S,
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
