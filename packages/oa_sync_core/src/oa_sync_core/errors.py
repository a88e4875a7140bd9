"""The error tree of ``oa_sync_core``.

Every exception the core raises derives from :class:`OaSyncError` and is defined here; each carries
the context a caller needs (stream, position, projection, code) as attributes, never only in the
message::

    OaSyncError
    ├── EventValidationError      a NewEvent or payload is not acceptable; nothing was written
    ├── ConcurrencyError          expected_seq did not match the stream (HTTP 409)
    ├── ProjectionError           a projector broke its contract (non-determinism, bad key)
    ├── CodecError                a wire message could not be decoded; ``code`` says why
    │   ├── AppendLimitError      an append holds more events than the limit (HTTP 413)
    │   └── WireError             (also a ProtocolError) a WebSocket frame did not decode
    └── ProtocolError             a decoded message is illegal in the session's state

Drift is not an error: :class:`oa_sync_core.drift.DriftReport` is a value.
"""

from __future__ import annotations

import enum

__all__ = [
    "AppendLimitError",
    "CodecError",
    "CodecErrorCode",
    "ConcurrencyError",
    "EventValidationError",
    "OaSyncError",
    "ProjectionError",
    "ProtocolError",
    "WireError",
]


class OaSyncError(Exception):
    """Root of every error raised by Khala."""


class EventValidationError(OaSyncError, ValueError):
    """An event to append is invalid. Raised before anything is written.

    Attributes:
        index: position of the offending event in the batch, when known.
        field: the offending field (``stream_id``, ``type``, ``payload.runId``...), if known.
    """

    def __init__(self, message: str, *, index: int | None = None, field: str | None = None):
        self.index = index
        self.field = field
        prefix = f"event {index}: " if index is not None else ""
        super().__init__(prefix + message)


class ConcurrencyError(OaSyncError):
    """An append's ``expected_seq`` did not match the stream's last sequence number.

    Attributes:
        stream_id: the stream.
        expected_seq: what the caller expected.
        actual_seq: the stream's last sequence number at the time of the check.
    """

    def __init__(self, stream_id: str, expected_seq: int, actual_seq: int):
        self.stream_id = stream_id
        self.expected_seq = expected_seq
        self.actual_seq = actual_seq
        super().__init__(
            f"stream {stream_id!r} is at seq {actual_seq}, append expected {expected_seq}"
        )


class ProjectionError(OaSyncError):
    """A projector broke its contract.

    Attributes:
        projection: the projector's name.
        position: the event being folded, when known.
    """

    def __init__(self, message: str, *, projection: str, position: int | None = None):
        self.projection = projection
        self.position = position
        super().__init__(f"{projection}: {message}")


class CodecErrorCode(enum.StrEnum):
    """Why a wire message was refused. The server maps each code to a close code."""

    TOO_LARGE = "too_large"
    INVALID_ENCODING = "invalid_encoding"
    MALFORMED_JSON = "malformed_json"
    NOT_FINITE = "not_finite"
    TOO_DEEP = "too_deep"
    DUPLICATE_KEY = "duplicate_key"
    UNKNOWN_KIND = "unknown_kind"
    UNKNOWN_FIELD = "unknown_field"
    WRONG_TYPE = "wrong_type"
    OUT_OF_RANGE = "out_of_range"
    MALFORMED_BINARY = "malformed_binary"


class CodecError(OaSyncError, ValueError):
    """A wire message or payload could not be decoded.

    Attributes:
        code: a :class:`CodecErrorCode`.
        path: where in the message (``subscribe.topics[2]``), empty for the whole message.
    """

    def __init__(self, code: CodecErrorCode, message: str, *, path: str = ""):
        self.code = code
        self.path = path
        where = f" at {path}" if path else ""
        super().__init__(f"{code.value}{where}: {message}")


class ProtocolError(OaSyncError):
    """A well-formed message is illegal in the session's current state.

    The session's state is unchanged when this is raised.

    Attributes:
        code: a short machine-readable reason, e.g. ``not_authenticated``.
    """

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(f"{code}: {message}")


class AppendLimitError(CodecError):
    """An append holds more events than the log accepts in one batch; nothing was written.

    A :class:`CodecError` with code ``too_large``, so every transport reports it like any
    other oversized message (HTTP 413, close 4413). Split the batch, or raise the limit
    (``max_events`` of the log; ``OA_SYNC_MAX_APPEND_EVENTS`` for the server).

    Attributes:
        limit: the most events one append may hold.
        count: how many the refused append held.
    """

    def __init__(self, limit: int, count: int):
        self.limit = limit
        self.count = count
        super().__init__(
            CodecErrorCode.TOO_LARGE,
            f"an append holds at most {limit} events, this one holds {count}; "
            "split it into smaller batches",
            path="events",
        )


class WireError(CodecError, ProtocolError):
    """A WebSocket message could not be decoded (or a frame holds an impossible value).

    It is both a :class:`CodecError` (so ``oa_sync_server.errors.classify`` maps ``too_large``
    to close 4413 and every other code to 4400) and a :class:`ProtocolError`.

    Attributes:
        code: a :class:`CodecErrorCode`.
        path: where in the message, e.g. ``subscribe.topics[2]``; empty for the whole message.
    """

    code: CodecErrorCode

    def __init__(self, code: CodecErrorCode, message: str, *, path: str = ""):
        # Not CodecError.__init__: its super() call would reach ProtocolError's signature.
        self.code = code
        self.path = path
        self.detail = message
        where = f" at {path}" if path else ""
        Exception.__init__(self, f"{code.value}{where}: {message}")
