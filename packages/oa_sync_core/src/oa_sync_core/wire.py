"""The wire codec of sync protocol v1: frames as values, both subprotocols, strict decoding.

What this is:

* Frozen value types for every WebSocket message: the client frames (:class:`Authenticate`,
  :class:`Subscribe` with an optional :class:`Resume`, :class:`Unsubscribe`, :class:`Ping`) and
  the server frames (:class:`Welcome`, :class:`UpdateFrame`, :class:`Synced`, :class:`Reset`,
  :class:`Heartbeat`, :class:`Pong`, :class:`ErrorFrame`).
* :func:`encode_server` / :func:`decode_client` for the server, :func:`encode_client` /
  :func:`decode_server` for clients, in either :class:`WireFormat`: proto3 JSON text
  (``oa-sync.v1.json``) or the binary proto encoding (``oa-sync.v1.proto``) of
  ``openagents.sync.v1.ClientMessage`` / ``ServerMessage``.
* :class:`EncodedUpdate`: one document change, encoded once per format and spliced into each
  subscriber's frame (only the subscription id differs), so fan-out costs a concatenation.

Decoding is strict and total: whatever bytes arrive, the decoders either return a frame or
raise :class:`WireError` (a :class:`~oa_sync_core.errors.CodecError` *and* a
:class:`~oa_sync_core.errors.ProtocolError`) whose ``code`` is a
:class:`~oa_sync_core.errors.CodecErrorCode`: ``too_large`` (close 4413) or anything else
(close 4400). JSON goes through :func:`oa_sync_core.codec.loads_strict` and
:func:`oa_sync_core.codec.read_message`; binary goes through the hand-written reader below, which
refuses unknown fields, repeated singular fields, wrong wire types, truncation, invalid UTF-8,
non-finite numbers and nesting deeper than :data:`oa_sync_core.codec.MAX_DEPTH`.

The binary encoding is written by hand (betterproto 2.0.0b7 cannot encode
``google.protobuf.Struct``); tests check it against the official ``google.protobuf`` runtime.
``Struct`` numbers are doubles: an integral number comes back as ``int``, so a document holding
``1.0`` reads back as ``1`` over the binary subprotocol (its ``contentHash`` is the server's).

What this is not: the session logic (which frame is legal when) — see
:mod:`oa_sync_core.client_session` and the server session.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import struct
from collections.abc import Mapping
from typing import Any, Final, TypeAlias

from oa_sync_core.codec import MAX_DEPTH, JsonObject, canonical_json, loads_strict, read_message
from oa_sync_core.contracts import v1
from oa_sync_core.errors import CodecError, CodecErrorCode, ProtocolError

__all__ = [
    "Authenticate",
    "ClientFrame",
    "EncodedUpdate",
    "ErrorFrame",
    "Heartbeat",
    "Ping",
    "Pong",
    "Reset",
    "Resume",
    "ServerFrame",
    "Subscribe",
    "Synced",
    "Unsubscribe",
    "UpdateFrame",
    "Welcome",
    "WireError",
    "WireFormat",
    "decode_client",
    "decode_server",
    "encode_client",
    "encode_server",
]

_INT64_MAX: Final = 2**63 - 1
_UINT32_MAX: Final = 2**32 - 1
_U64_MASK: Final = 2**64 - 1
_EXACT_DOUBLE: Final = 2**53


class WireFormat(enum.StrEnum):
    """The two WebSocket subprotocols; the value is the ``Sec-WebSocket-Protocol`` token."""

    JSON = "oa-sync.v1.json"
    PROTO = "oa-sync.v1.proto"


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


def _check_int(name: str, value: int, high: int = _INT64_MAX) -> None:
    if not 0 <= value <= high:
        raise WireError(CodecErrorCode.OUT_OF_RANGE, f"{value} is outside 0..{high}", path=name)


# ---------------------------------------------------------------------------------------------
# Frames
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Authenticate:
    """Client: present (or refresh) a bearer token. Its ``repr`` hides the token."""

    token: str = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True, slots=True)
class Resume:
    """Where a subscription resumes: the last (epoch, watermark) the client fully applied."""

    epoch: str
    watermark: int

    def __post_init__(self) -> None:
        _check_int("resume.watermark", self.watermark)


@dataclasses.dataclass(frozen=True, slots=True)
class Subscribe:
    """Client: start a subscription to topics, from scratch or resuming."""

    subscription_id: str
    topics: tuple[str, ...]
    resume: Resume | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Unsubscribe:
    """Client: end a subscription."""

    subscription_id: str


@dataclasses.dataclass(frozen=True, slots=True)
class Ping:
    """Client: ask for a :class:`Pong` carrying the same nonce."""

    nonce: str


ClientFrame: TypeAlias = Authenticate | Subscribe | Unsubscribe | Ping
"""Every message a client sends."""


@dataclasses.dataclass(frozen=True, slots=True)
class Welcome:
    """Server: the session is authenticated."""

    session_id: str
    epoch: str
    watermark: int
    heartbeat_interval_ms: int

    def __post_init__(self) -> None:
        _check_int("welcome.watermark", self.watermark)
        _check_int("welcome.heartbeatIntervalMs", self.heartbeat_interval_ms, _UINT32_MAX)


@dataclasses.dataclass(frozen=True, slots=True)
class Synced:
    """Server: catch-up of a subscription is complete up to ``watermark`` of ``epoch``."""

    subscription_id: str
    watermark: int
    epoch: str

    def __post_init__(self) -> None:
        _check_int("synced.watermark", self.watermark)


@dataclasses.dataclass(frozen=True, slots=True)
class Reset:
    """Server: the client's state for a subscription is void; a full snapshot follows."""

    subscription_id: str
    reason: str
    epoch: str


@dataclasses.dataclass(frozen=True, slots=True)
class Heartbeat:
    """Server: the connection was quiet; the newest watermark the server has seen."""

    watermark: int

    def __post_init__(self) -> None:
        _check_int("heartbeat.watermark", self.watermark)


@dataclasses.dataclass(frozen=True, slots=True)
class Pong:
    """Server: the answer to a :class:`Ping`."""

    nonce: str


@dataclasses.dataclass(frozen=True, slots=True)
class ErrorFrame:
    """Server: a refused request that does not end the session (e.g. ``forbidden``)."""

    code: str
    message: str
    subscription_id: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class UpdateFrame:
    """Server: a document at a version, for one subscription (snapshot, catch-up or live)."""

    subscription_id: str
    doc_key: str
    projection: str
    version: int
    watermark: int
    content_hash: str
    document: JsonObject

    def __post_init__(self) -> None:
        _check_int("update.version", self.version)
        _check_int("update.watermark", self.watermark)


ServerFrame: TypeAlias = Welcome | Synced | Reset | Heartbeat | Pong | ErrorFrame | UpdateFrame
"""Every message a server sends."""


# ---------------------------------------------------------------------------------------------
# Binary writing
# ---------------------------------------------------------------------------------------------

_DOUBLE = struct.Struct("<d")


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _len_field(field: int, payload: bytes) -> bytes:
    return _tag(field, 2) + _varint(len(payload)) + payload


def _str_field(field: int, text: str) -> bytes:
    """A proto3 ``string`` field; absent when empty (proto3 default)."""
    if not text:
        return b""
    return _len_field(field, text.encode("utf-8"))


def _int_field(field: int, value: int) -> bytes:
    """A proto3 ``int64`` / ``uint32`` field; absent when zero."""
    if value == 0:
        return b""
    return _tag(field, 0) + _varint(value & _U64_MASK)


def _encode_value(value: Any) -> bytes:
    if value is None:
        return b"\x08\x00"
    if value is True:
        return b"\x20\x01"
    if value is False:
        return b"\x20\x00"
    if isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:
            raise WireError(CodecErrorCode.OUT_OF_RANGE, f"{value} is not a double") from None
        if not math.isfinite(number):
            raise WireError(CodecErrorCode.NOT_FINITE, "number is not finite")
        return b"\x11" + _DOUBLE.pack(number)
    if isinstance(value, str):
        return _len_field(3, value.encode("utf-8"))
    if isinstance(value, dict):
        return _len_field(5, _encode_struct(value))
    if isinstance(value, list):
        return _len_field(6, b"".join(_len_field(1, _encode_value(item)) for item in value))
    raise WireError(CodecErrorCode.WRONG_TYPE, f"{type(value).__name__} is not a JSON value")


def _encode_struct(obj: Mapping[str, Any]) -> bytes:
    # Map entries always carry key and value (as the official runtime writes them); sorted
    # keys make the encoding deterministic.
    return b"".join(
        _len_field(1, _len_field(1, key.encode("utf-8")) + _len_field(2, _encode_value(obj[key])))
        for key in sorted(obj)
    )


# ---------------------------------------------------------------------------------------------
# Binary reading
# ---------------------------------------------------------------------------------------------

# Field kinds of the schema tables below.
_STR: Final = "string"
_I64: Final = "int64"
_U32: Final = "uint32"
_REP_STR: Final = "repeated string"
_STRUCT: Final = "struct"

_Schema: TypeAlias = Mapping[int, tuple[str, Any]]  # number -> (json name, kind or sub-schema)

_RESUME: Final[_Schema] = {1: ("epoch", _STR), 2: ("watermark", _I64)}
_CLIENT: Final[_Schema] = {
    1: ("authenticate", {1: ("token", _STR)}),
    2: (
        "subscribe",
        {1: ("subscriptionId", _STR), 2: ("topics", _REP_STR), 3: ("resume", _RESUME)},
    ),
    3: ("unsubscribe", {1: ("subscriptionId", _STR)}),
    4: ("ping", {1: ("nonce", _STR)}),
}
_SERVER: Final[_Schema] = {
    1: (
        "welcome",
        {
            1: ("sessionId", _STR),
            2: ("epoch", _STR),
            3: ("watermark", _I64),
            4: ("heartbeatIntervalMs", _U32),
        },
    ),
    2: (
        "update",
        {
            1: ("subscriptionId", _STR),
            2: ("docKey", _STR),
            3: ("projection", _STR),
            4: ("version", _I64),
            5: ("watermark", _I64),
            6: ("contentHash", _STR),
            7: ("document", _STRUCT),
        },
    ),
    3: ("synced", {1: ("subscriptionId", _STR), 2: ("watermark", _I64), 3: ("epoch", _STR)}),
    4: ("reset", {1: ("subscriptionId", _STR), 2: ("reason", _STR), 3: ("epoch", _STR)}),
    5: ("heartbeat", {1: ("watermark", _I64)}),
    6: ("pong", {1: ("nonce", _STR)}),
    7: ("error", {1: ("code", _STR), 2: ("message", _STR), 3: ("subscriptionId", _STR)}),
}


def _malformed(message: str, path: str = "") -> WireError:
    return WireError(CodecErrorCode.MALFORMED_BINARY, message, path=path)


class _Reader:
    """A cursor over a binary protobuf message; every read is bounds-checked."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int = 0):
        self.data = data
        self.pos = pos

    def varint(self, path: str) -> int:
        result = 0
        shift = 0
        data = self.data
        while True:
            if self.pos >= len(data):
                raise _malformed("truncated varint", path)
            byte = data[self.pos]
            self.pos += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            if shift >= 70:
                raise _malformed("varint longer than 10 bytes", path)
        if result > _U64_MASK:
            raise _malformed("varint exceeds 64 bits", path)
        return result

    def tag(self, path: str) -> tuple[int, int]:
        key = self.varint(path)
        field, wire_type = key >> 3, key & 7
        if field == 0 or field > 2**29 - 1:
            raise _malformed(f"invalid field number {field}", path)
        return field, wire_type

    def length_delimited(self, path: str) -> tuple[int, int]:
        """Returns (start, end) of the payload and moves past it."""
        size = self.varint(path)
        start = self.pos
        end = start + size
        if end > len(self.data):
            raise _malformed("length runs past the end of the message", path)
        self.pos = end
        return start, end

    def skip(self, wire_type: int, path: str) -> None:
        if wire_type == 0:
            self.varint(path)
        elif wire_type == 1:
            self.fixed(8, path)
        elif wire_type == 2:
            self.length_delimited(path)
        elif wire_type == 5:
            self.fixed(4, path)
        else:
            raise _malformed(f"unsupported wire type {wire_type}", path)

    def fixed(self, size: int, path: str) -> int:
        start = self.pos
        if start + size > len(self.data):
            raise _malformed("truncated fixed-width field", path)
        self.pos = start + size
        return start

    def text(self, path: str) -> str:
        start, end = self.length_delimited(path)
        try:
            return self.data[start:end].decode("utf-8")
        except UnicodeDecodeError:
            raise WireError(CodecErrorCode.INVALID_ENCODING, "not valid UTF-8", path=path) from None


_WIRE_TYPE: Final[Mapping[str, int]] = {_STR: 2, _I64: 0, _U32: 0, _REP_STR: 2, _STRUCT: 2}


def _read_message(
    reader: _Reader, end: int, schema: _Schema, path: str, depth: int
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    while reader.pos < end:
        field, wire_type = reader.tag(path)
        spec = schema.get(field)
        if spec is None:
            raise WireError(CodecErrorCode.UNKNOWN_FIELD, f"no field number {field}", path=path)
        name, kind = spec
        where = f"{path}.{name}" if path else name
        expected = _WIRE_TYPE.get(kind, 2) if isinstance(kind, str) else 2
        if wire_type != expected:
            reader.skip(wire_type, where)  # a malformed skip takes precedence
            raise WireError(CodecErrorCode.WRONG_TYPE, f"wire type {wire_type}", path=where)
        if kind == _REP_STR:
            out.setdefault(name, []).append(reader.text(where))
        else:
            if name in out:
                raise WireError(CodecErrorCode.DUPLICATE_KEY, "field given twice", path=where)
            out[name] = _read_field(reader, kind, where, depth)
        if reader.pos > end:
            raise _malformed("field runs past the end of its message", where)
    return out


def _read_field(reader: _Reader, kind: Any, path: str, depth: int) -> Any:
    if kind == _STR:
        return reader.text(path)
    if kind == _I64:
        value = reader.varint(path)
        return value - 2**64 if value > _INT64_MAX else value
    if kind == _U32:
        value = reader.varint(path)
        if value > _UINT32_MAX:
            raise WireError(CodecErrorCode.OUT_OF_RANGE, f"{value} is outside uint32", path=path)
        return value
    start, end = reader.length_delimited(path)
    sub = _Reader(reader.data, start)
    if kind == _STRUCT:
        return _read_struct(sub, end, path, depth + 1)
    if depth + 1 > MAX_DEPTH:
        raise WireError(CodecErrorCode.TOO_DEEP, f"nesting deeper than {MAX_DEPTH}", path=path)
    return _read_message(sub, end, kind, path, depth + 1)


def _read_struct(reader: _Reader, end: int, path: str, depth: int) -> JsonObject:
    if depth > MAX_DEPTH:
        raise WireError(CodecErrorCode.TOO_DEEP, f"nesting deeper than {MAX_DEPTH}", path=path)
    out: JsonObject = {}
    while reader.pos < end:
        field, wire_type = reader.tag(path)
        if field != 1 or wire_type != 2:
            raise WireError(CodecErrorCode.UNKNOWN_FIELD, "not a Struct entry", path=path)
        start, entry_end = reader.length_delimited(path)
        entry = _Reader(reader.data, start)
        key: str | None = None
        value: Any = _MISSING
        while entry.pos < entry_end:
            efield, etype = entry.tag(path)
            if etype != 2 or efield not in (1, 2):
                raise WireError(CodecErrorCode.UNKNOWN_FIELD, "not a Struct entry", path=path)
            if efield == 1:
                if key is not None:
                    raise WireError(CodecErrorCode.DUPLICATE_KEY, "entry key twice", path=path)
                key = entry.text(path)
            else:
                if value is not _MISSING:
                    raise WireError(CodecErrorCode.DUPLICATE_KEY, "entry value twice", path=path)
                vstart, vend = entry.length_delimited(path)
                value = _read_value(_Reader(entry.data, vstart), vend, path, depth)
        if entry.pos != entry_end:
            raise _malformed("Struct entry runs past its end", path)
        key = key or ""
        where = f"{path}.{key}"
        if value is _MISSING:
            raise WireError(CodecErrorCode.WRONG_TYPE, "Struct entry without a value", path=where)
        if key in out:
            raise WireError(CodecErrorCode.DUPLICATE_KEY, f"key {key!r} appears twice", path=where)
        out[key] = value
    if reader.pos != end:
        raise _malformed("Struct runs past its end", path)
    return out


_MISSING: Final = object()


def _read_value(reader: _Reader, end: int, path: str, depth: int) -> Any:
    value: Any = _MISSING
    while reader.pos < end:
        field, wire_type = reader.tag(path)
        if value is not _MISSING:
            raise WireError(CodecErrorCode.WRONG_TYPE, "Value has two kinds", path=path)
        if field == 1 and wire_type == 0:
            if reader.varint(path) != 0:
                raise WireError(CodecErrorCode.OUT_OF_RANGE, "not a NullValue", path=path)
            value = None
        elif field == 2 and wire_type == 1:
            number = _DOUBLE.unpack_from(reader.data, reader.fixed(8, path))[0]
            if not math.isfinite(number):
                raise WireError(CodecErrorCode.NOT_FINITE, "number is not finite", path=path)
            if number.is_integer() and abs(number) <= _EXACT_DOUBLE:
                number = int(number)
            value = number
        elif field == 3 and wire_type == 2:
            value = reader.text(path)
        elif field == 4 and wire_type == 0:
            flag = reader.varint(path)
            if flag > 1:
                raise WireError(CodecErrorCode.OUT_OF_RANGE, "not a bool", path=path)
            value = flag == 1
        elif field == 5 and wire_type == 2:
            start, sub_end = reader.length_delimited(path)
            value = _read_struct(_Reader(reader.data, start), sub_end, path, depth + 1)
        elif field == 6 and wire_type == 2:
            start, sub_end = reader.length_delimited(path)
            value = _read_list(_Reader(reader.data, start), sub_end, path, depth + 1)
        else:
            raise WireError(CodecErrorCode.UNKNOWN_FIELD, "not a Value kind", path=path)
    if reader.pos != end:
        raise _malformed("Value runs past its end", path)
    if value is _MISSING:
        raise WireError(CodecErrorCode.WRONG_TYPE, "Value without a kind", path=path)
    return value


def _read_list(reader: _Reader, end: int, path: str, depth: int) -> list[Any]:
    if depth > MAX_DEPTH:
        raise WireError(CodecErrorCode.TOO_DEEP, f"nesting deeper than {MAX_DEPTH}", path=path)
    out: list[Any] = []
    while reader.pos < end:
        field, wire_type = reader.tag(path)
        if field != 1 or wire_type != 2:
            raise WireError(CodecErrorCode.UNKNOWN_FIELD, "not a ListValue item", path=path)
        start, item_end = reader.length_delimited(path)
        out.append(_read_value(_Reader(reader.data, start), item_end, f"{path}[{len(out)}]", depth))
    if reader.pos != end:
        raise _malformed("ListValue runs past its end", path)
    return out


def _read_binary(data: bytes, schema: _Schema) -> tuple[str, dict[str, Any]]:
    """Decode a ClientMessage / ServerMessage: exactly one member of its ``kind`` oneof."""
    reader = _Reader(data)
    kind: str | None = None
    body: dict[str, Any] = {}
    while reader.pos < len(data):
        field, wire_type = reader.tag("")
        spec = schema.get(field)
        if spec is None:
            raise WireError(CodecErrorCode.UNKNOWN_KIND, f"unknown message kind {field}")
        name, sub = spec
        if wire_type != 2:
            raise WireError(CodecErrorCode.WRONG_TYPE, f"wire type {wire_type}", path=name)
        if kind is not None:
            raise WireError(
                CodecErrorCode.WRONG_TYPE, f"oneof kind has both {kind!r} and {name!r}", path=name
            )
        start, end = reader.length_delimited(name)
        body = _read_message(_Reader(data, start), end, sub, name, 2)
        kind = name
    if kind is None:
        raise WireError(CodecErrorCode.UNKNOWN_KIND, "no message kind is set")
    return kind, body


# ---------------------------------------------------------------------------------------------
# JSON reading
# ---------------------------------------------------------------------------------------------


def _read_json(
    data: str, max_bytes: int, cls: type[v1.ClientMessage] | type[v1.ServerMessage], kinds: Any
) -> tuple[str, dict[str, Any]]:
    obj = loads_strict(data, max_bytes=max_bytes)
    if not isinstance(obj, dict):
        raise WireError(CodecErrorCode.WRONG_TYPE, "a message is a JSON object")
    for key in obj:
        if key not in kinds:
            raise WireError(CodecErrorCode.UNKNOWN_KIND, f"unknown message kind {key!r}")
    message = read_message(cls, obj)
    if not message:
        raise WireError(CodecErrorCode.UNKNOWN_KIND, "no message kind is set")
    ((kind, body),) = message.items()  # read_message refuses two members of the oneof
    return kind, body


_CLIENT_KINDS: Final = frozenset({"authenticate", "subscribe", "unsubscribe", "ping"})
_SERVER_KINDS: Final = frozenset(
    {"welcome", "update", "synced", "reset", "heartbeat", "pong", "error"}
)


def _check_input(data: bytes | str, fmt: WireFormat, max_bytes: int) -> None:
    if fmt is WireFormat.JSON:
        if not isinstance(data, str):
            raise WireError(CodecErrorCode.WRONG_TYPE, "binary frame on the JSON subprotocol")
    elif not isinstance(data, bytes | bytearray | memoryview):
        raise WireError(CodecErrorCode.WRONG_TYPE, "text frame on the proto subprotocol")
    elif len(data) > max_bytes:
        raise WireError(CodecErrorCode.TOO_LARGE, f"message exceeds {max_bytes} bytes")


def _decode(
    data: bytes | str,
    fmt: WireFormat,
    *,
    max_bytes: int,
    schema: _Schema,
    cls: type[v1.ClientMessage] | type[v1.ServerMessage],
    kinds: frozenset[str],
) -> tuple[str, dict[str, Any]]:
    _check_input(data, fmt, max_bytes)
    try:
        if isinstance(data, str):
            return _read_json(data, max_bytes, cls, kinds)
        return _read_binary(bytes(data), schema)
    except WireError:
        raise
    except CodecError as exc:
        raise WireError(exc.code, str(exc).split(": ", 1)[-1], path=exc.path) from None


def _int(body: Mapping[str, Any], key: str) -> int:
    # JSON gives 64-bit integers as canonical strings, binary as ints.
    return int(body.get(key, 0))


def _client_frame(kind: str, body: dict[str, Any]) -> ClientFrame:
    if kind == "authenticate":
        return Authenticate(body.get("token", ""))
    if kind == "subscribe":
        raw = body.get("resume")
        resume = None if raw is None else Resume(raw.get("epoch", ""), _int(raw, "watermark"))
        return Subscribe(body.get("subscriptionId", ""), tuple(body.get("topics", ())), resume)
    if kind == "unsubscribe":
        return Unsubscribe(body.get("subscriptionId", ""))
    return Ping(body.get("nonce", ""))


def _server_frame(kind: str, body: dict[str, Any]) -> ServerFrame:
    sid = body.get("subscriptionId", "")
    if kind == "update":
        return UpdateFrame(
            sid,
            body.get("docKey", ""),
            body.get("projection", ""),
            _int(body, "version"),
            _int(body, "watermark"),
            body.get("contentHash", ""),
            body.get("document", {}),
        )
    if kind == "welcome":
        return Welcome(
            body.get("sessionId", ""),
            body.get("epoch", ""),
            _int(body, "watermark"),
            int(body.get("heartbeatIntervalMs", 0)),
        )
    if kind == "synced":
        return Synced(sid, _int(body, "watermark"), body.get("epoch", ""))
    if kind == "reset":
        return Reset(sid, body.get("reason", ""), body.get("epoch", ""))
    if kind == "heartbeat":
        return Heartbeat(_int(body, "watermark"))
    if kind == "pong":
        return Pong(body.get("nonce", ""))
    return ErrorFrame(body.get("code", ""), body.get("message", ""), sid)


def decode_client(data: bytes | str, fmt: WireFormat, *, max_bytes: int) -> ClientFrame:
    """Decode one message a client sent.

    Args:
        data: a text frame (``str``) on :attr:`WireFormat.JSON`, a binary frame (``bytes``) on
            :attr:`WireFormat.PROTO`.
        fmt: the negotiated subprotocol.
        max_bytes: the largest accepted message, in bytes (UTF-8 for text).

    Returns:
        The frame.

    Raises:
        WireError: ``too_large`` (close 4413); any other code (close 4400): a frame of the
            wrong kind for the subprotocol, invalid JSON or protobuf, an unknown message kind,
            an unknown field, a wrong type, a value out of range, nesting too deep.
    """
    kind, body = _decode(
        data, fmt, max_bytes=max_bytes, schema=_CLIENT, cls=v1.ClientMessage, kinds=_CLIENT_KINDS
    )
    return _client_frame(kind, body)


def decode_server(data: bytes | str, fmt: WireFormat, *, max_bytes: int) -> ServerFrame:
    """Decode one message a server sent (the client side of :func:`decode_client`).

    Raises:
        WireError: as :func:`decode_client`.
    """
    kind, body = _decode(
        data, fmt, max_bytes=max_bytes, schema=_SERVER, cls=v1.ServerMessage, kinds=_SERVER_KINDS
    )
    return _server_frame(kind, body)


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


def _json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _to_json(kind: str, body: JsonObject) -> str:
    return _json_text({kind: body})


def encode_client(frame: ClientFrame, fmt: WireFormat) -> bytes | str:
    """Encode a client frame: ``str`` for :attr:`WireFormat.JSON`, ``bytes`` for PROTO.

    JSON carries every field (64-bit integers as strings); binary omits proto3 defaults.
    """
    if isinstance(frame, Authenticate):
        if fmt is WireFormat.JSON:
            return _to_json("authenticate", {"token": frame.token})
        return _len_field(1, _str_field(1, frame.token))
    if isinstance(frame, Subscribe):
        if fmt is WireFormat.JSON:
            body: JsonObject = {
                "subscriptionId": frame.subscription_id,
                "topics": list(frame.topics),
            }
            if frame.resume is not None:
                body["resume"] = {
                    "epoch": frame.resume.epoch,
                    "watermark": str(frame.resume.watermark),
                }
            return _to_json("subscribe", body)
        inner = _str_field(1, frame.subscription_id) + b"".join(
            _len_field(2, topic.encode("utf-8")) for topic in frame.topics
        )
        if frame.resume is not None:
            inner += _len_field(
                3, _str_field(1, frame.resume.epoch) + _int_field(2, frame.resume.watermark)
            )
        return _len_field(2, inner)
    if isinstance(frame, Unsubscribe):
        if fmt is WireFormat.JSON:
            return _to_json("unsubscribe", {"subscriptionId": frame.subscription_id})
        return _len_field(3, _str_field(1, frame.subscription_id))
    if fmt is WireFormat.JSON:
        return _to_json("ping", {"nonce": frame.nonce})
    return _len_field(4, _str_field(1, frame.nonce))


def encode_server(frame: ServerFrame, fmt: WireFormat) -> bytes | str:
    """Encode a server frame: ``str`` for :attr:`WireFormat.JSON`, ``bytes`` for PROTO.

    An :class:`UpdateFrame` is encoded through :class:`EncodedUpdate`, so both paths give the
    same bytes. The document is written canonically (sorted keys).

    Raises:
        WireError: a document value the format cannot carry (e.g. a non-finite number).
    """
    if isinstance(frame, UpdateFrame):
        try:
            body = canonical_json(frame.document)
        except (TypeError, ValueError) as exc:
            raise WireError(CodecErrorCode.WRONG_TYPE, str(exc), path="update.document") from None
        update = EncodedUpdate(
            frame.doc_key,
            frame.projection,
            frame.version,
            frame.watermark,
            frame.content_hash,
            body,
        )
        return update.frame(frame.subscription_id, fmt)
    json_fmt = fmt is WireFormat.JSON
    if isinstance(frame, Welcome):
        if json_fmt:
            return _to_json(
                "welcome",
                {
                    "sessionId": frame.session_id,
                    "epoch": frame.epoch,
                    "watermark": str(frame.watermark),
                    "heartbeatIntervalMs": frame.heartbeat_interval_ms,
                },
            )
        return _len_field(
            1,
            _str_field(1, frame.session_id)
            + _str_field(2, frame.epoch)
            + _int_field(3, frame.watermark)
            + _int_field(4, frame.heartbeat_interval_ms),
        )
    if isinstance(frame, Synced):
        if json_fmt:
            return _to_json(
                "synced",
                {
                    "subscriptionId": frame.subscription_id,
                    "watermark": str(frame.watermark),
                    "epoch": frame.epoch,
                },
            )
        return _len_field(
            3,
            _str_field(1, frame.subscription_id)
            + _int_field(2, frame.watermark)
            + _str_field(3, frame.epoch),
        )
    if isinstance(frame, Reset):
        if json_fmt:
            return _to_json(
                "reset",
                {
                    "subscriptionId": frame.subscription_id,
                    "reason": frame.reason,
                    "epoch": frame.epoch,
                },
            )
        return _len_field(
            4,
            _str_field(1, frame.subscription_id)
            + _str_field(2, frame.reason)
            + _str_field(3, frame.epoch),
        )
    if isinstance(frame, Heartbeat):
        if json_fmt:
            return _to_json("heartbeat", {"watermark": str(frame.watermark)})
        return _len_field(5, _int_field(1, frame.watermark))
    if isinstance(frame, Pong):
        if json_fmt:
            return _to_json("pong", {"nonce": frame.nonce})
        return _len_field(6, _str_field(1, frame.nonce))
    if json_fmt:
        return _to_json(
            "error",
            {
                "code": frame.code,
                "message": frame.message,
                "subscriptionId": frame.subscription_id,
            },
        )
    return _len_field(
        7,
        _str_field(1, frame.code)
        + _str_field(2, frame.message)
        + _str_field(3, frame.subscription_id),
    )


@dataclasses.dataclass(frozen=True, slots=True)
class EncodedUpdate:
    """One document version, encoded once per format and shared by every subscriber.

    :meth:`frame` returns exactly ``encode_server(UpdateFrame(subscription_id, ...))`` but only
    concatenates the subscription id with parts computed on first use and cached on this object
    (one JSON text and one binary tail per update, whatever the number of subscribers).

    Attributes:
        body: the document's canonical JSON bytes (:func:`oa_sync_core.codec.canonical_json`),
            as stored by the server; it is spliced verbatim into JSON frames.
    """

    doc_key: str
    projection: str
    version: int
    watermark: int
    content_hash: str
    body: bytes
    _json_tail: list[str] = dataclasses.field(
        default_factory=list, init=False, repr=False, compare=False
    )
    _proto_tail: list[bytes] = dataclasses.field(
        default_factory=list, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        _check_int("update.version", self.version)
        _check_int("update.watermark", self.watermark)

    def frame(self, subscription_id: str, fmt: WireFormat) -> bytes | str:
        """The ``update`` message for one subscription, ``str`` for JSON, ``bytes`` for PROTO.

        Raises:
            WireError: (first call per format only) the body is not a JSON object the format
                can carry.
        """
        if fmt is WireFormat.JSON:
            if not self._json_tail:
                self._json_tail.append(self._build_json_tail())
            return '{"update":{"subscriptionId":' + _json_text(subscription_id) + self._json_tail[0]
        if not self._proto_tail:
            self._proto_tail.append(self._build_proto_tail())
        tail = self._proto_tail[0]
        head = _str_field(1, subscription_id)
        return b"\x12" + _varint(len(head) + len(tail)) + head + tail

    def document(self) -> JsonObject:
        """The document as a JSON object (parsed from :attr:`body` each call)."""
        value = json.loads(self.body)
        if not isinstance(value, dict):
            raise WireError(CodecErrorCode.WRONG_TYPE, "a document is a JSON object")
        return value

    def _build_json_tail(self) -> str:
        text = self.body.decode("utf-8")
        return (
            ',"docKey":'
            + _json_text(self.doc_key)
            + ',"projection":'
            + _json_text(self.projection)
            + ',"version":"'
            + str(self.version)
            + '","watermark":"'
            + str(self.watermark)
            + '","contentHash":'
            + _json_text(self.content_hash)
            + ',"document":'
            + text
            + "}}"
        )

    def _build_proto_tail(self) -> bytes:
        return (
            _str_field(2, self.doc_key)
            + _str_field(3, self.projection)
            + _int_field(4, self.version)
            + _int_field(5, self.watermark)
            + _str_field(6, self.content_hash)
            + _len_field(7, _encode_struct(self.document()))
        )
