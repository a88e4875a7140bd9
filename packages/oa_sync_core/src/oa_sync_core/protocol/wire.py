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
:func:`oa_sync_core.codec.read_message`; binary goes through the hand-written reader of
:mod:`oa_sync_core.protocol._protobuf`, driven by the schema tables below, which refuses
unknown fields, repeated singular fields, wrong wire types, truncation, invalid UTF-8, non-finite
numbers and nesting deeper than :data:`oa_sync_core.codec.MAX_DEPTH`.

Both encodings are written by hand too, from the same schema tables (betterproto 2.0.0b7
cannot encode ``google.protobuf.Struct``); tests check them against the official
``google.protobuf`` runtime.
``Struct`` numbers are doubles: an integral number comes back as ``int``, so a document holding
``1.0`` reads back as ``1`` over the binary subprotocol (its ``contentHash`` is the server's).

What this is not: the session logic (which frame is legal when) — see
:mod:`oa_sync_core.protocol.client_session` and the server session.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Mapping
from typing import Any, Final, TypeAlias

from oa_sync_core.codec import JsonObject, canonical_json, loads_strict, read_message
from oa_sync_core.contracts import v1
from oa_sync_core.errors import CodecError, CodecErrorCode, WireError
from oa_sync_core.protocol._protobuf import (
    I64,
    INT64_MAX,
    REP_STR,
    STR,
    STRUCT,
    U32,
    UINT32_MAX,
    Schema,
    encode_struct,
    int_field,
    len_field,
    read_oneof,
    str_field,
    varint,
)

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


class WireFormat(enum.StrEnum):
    """The two WebSocket subprotocols; the value is the ``Sec-WebSocket-Protocol`` token."""

    JSON = "oa-sync.v1.json"
    PROTO = "oa-sync.v1.proto"


def _check_int(name: str, value: int, high: int = INT64_MAX) -> None:
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
        _check_int("welcome.heartbeatIntervalMs", self.heartbeat_interval_ms, UINT32_MAX)


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


_RESUME: Final[Schema] = {1: ("epoch", STR), 2: ("watermark", I64)}
_CLIENT: Final[Schema] = {
    1: ("authenticate", {1: ("token", STR)}),
    2: (
        "subscribe",
        {1: ("subscriptionId", STR), 2: ("topics", REP_STR), 3: ("resume", _RESUME)},
    ),
    3: ("unsubscribe", {1: ("subscriptionId", STR)}),
    4: ("ping", {1: ("nonce", STR)}),
}
_SERVER: Final[Schema] = {
    1: (
        "welcome",
        {
            1: ("sessionId", STR),
            2: ("epoch", STR),
            3: ("watermark", I64),
            4: ("heartbeatIntervalMs", U32),
        },
    ),
    2: (
        "update",
        {
            1: ("subscriptionId", STR),
            2: ("docKey", STR),
            3: ("projection", STR),
            4: ("version", I64),
            5: ("watermark", I64),
            6: ("contentHash", STR),
            7: ("document", STRUCT),
        },
    ),
    3: ("synced", {1: ("subscriptionId", STR), 2: ("watermark", I64), 3: ("epoch", STR)}),
    4: ("reset", {1: ("subscriptionId", STR), 2: ("reason", STR), 3: ("epoch", STR)}),
    5: ("heartbeat", {1: ("watermark", I64)}),
    6: ("pong", {1: ("nonce", STR)}),
    7: ("error", {1: ("code", STR), 2: ("message", STR), 3: ("subscriptionId", STR)}),
}


_Field: TypeAlias = tuple[int, str, Any, str]
"""(field number, JSON name, kind or the nested message's fields, frame attribute)."""


def _fields(schema: Schema) -> tuple[_Field, ...]:
    return tuple(
        (
            number,
            name,
            kind if isinstance(kind, str) else _fields(kind),
            "".join("_" + c.lower() if c.isupper() else c for c in name),  # subscription_id
        )
        for number, (name, kind) in schema.items()
    )


_MESSAGE_CLASSES: Final[Mapping[str, type[Any]]] = {
    "authenticate": Authenticate,
    "subscribe": Subscribe,
    "resume": Resume,
    "unsubscribe": Unsubscribe,
    "ping": Ping,
    "welcome": Welcome,
    "update": UpdateFrame,
    "synced": Synced,
    "reset": Reset,
    "heartbeat": Heartbeat,
    "pong": Pong,
    "error": ErrorFrame,
}
"""The frame class of each message kind (and of the nested ``resume``)."""

_MESSAGES: Final = {
    _MESSAGE_CLASSES[name]: (number, name, _fields(kind))
    for schema in (_CLIENT, _SERVER)
    for number, (name, kind) in schema.items()
}
"""Frame class -> (field number in ClientMessage / ServerMessage, kind, fields): the schema
tables drive encoding and decoding (``update`` frames are encoded by :class:`EncodedUpdate`)."""
_BY_KIND: Final = {name: (cls, fields) for cls, (_, name, fields) in _MESSAGES.items()}


# ---------------------------------------------------------------------------------------------
# JSON reading
# ---------------------------------------------------------------------------------------------


def _read_json(
    data: str,
    max_bytes: int,
    cls: type[v1.ClientMessage] | type[v1.ServerMessage],
    kinds: frozenset[str],
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


_CLIENT_KINDS: Final = frozenset(name for name, _ in _CLIENT.values())
_SERVER_KINDS: Final = frozenset(name for name, _ in _SERVER.values())


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
    schema: Schema,
    cls: type[v1.ClientMessage] | type[v1.ServerMessage],
    kinds: frozenset[str],
) -> tuple[str, dict[str, Any]]:
    _check_input(data, fmt, max_bytes)
    try:
        if isinstance(data, str):
            return _read_json(data, max_bytes, cls, kinds)
        return read_oneof(bytes(data), schema)
    except WireError:
        raise
    except CodecError as exc:
        raise WireError(exc.code, str(exc).split(": ", 1)[-1], path=exc.path) from None


def _build(cls: type[Any], fields: tuple[_Field, ...], body: Mapping[str, Any]) -> Any:
    # An absent field is its proto3 default; JSON gives 64-bit integers as strings.
    values: dict[str, Any] = {}
    for _, name, kind, attribute in fields:
        raw = body.get(name)
        if kind == STR:
            values[attribute] = "" if raw is None else raw
        elif kind in (I64, U32):
            values[attribute] = 0 if raw is None else int(raw)
        elif kind == REP_STR:
            values[attribute] = tuple(raw or ())
        elif kind == STRUCT:
            values[attribute] = {} if raw is None else raw
        else:  # a nested message
            values[attribute] = None if raw is None else _build(_MESSAGE_CLASSES[name], kind, raw)
    return cls(**values)


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
    frame: ClientFrame = _build(*_BY_KIND[kind], body)
    return frame


def decode_server(data: bytes | str, fmt: WireFormat, *, max_bytes: int) -> ServerFrame:
    """Decode one message a server sent (the client side of :func:`decode_client`).

    Raises:
        WireError: as :func:`decode_client`.
    """
    kind, body = _decode(
        data, fmt, max_bytes=max_bytes, schema=_SERVER, cls=v1.ServerMessage, kinds=_SERVER_KINDS
    )
    frame: ServerFrame = _build(*_BY_KIND[kind], body)
    return frame


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


def _quote(text: str) -> str:
    """A JSON string literal; the common case (printable ASCII, no escapes) without json."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return '"' + text + '"'
    return _json_text(text)


_JSON_TAIL: Final = (
    b',"docKey":%b,"projection":%b,"version":"%d","watermark":"%d","contentHash":%b,"document":%b}}'
)
"""An ``update`` message's JSON after its subscription id (:class:`EncodedUpdate`)."""


def _json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _to_json(kind: str, body: JsonObject) -> str:
    return _json_text({kind: body})


def _json_body(value: Any, fields: tuple[_Field, ...]) -> JsonObject:
    # Every field, defaults included, in field-number order; 64-bit integers as strings.
    body: JsonObject = {}
    for _, name, kind, attribute in fields:
        item = getattr(value, attribute)
        if kind == I64:
            body[name] = str(item)
        elif kind == REP_STR:
            body[name] = list(item)
        elif not isinstance(kind, str):  # a nested message, absent when None
            if item is not None:
                body[name] = _json_body(item, kind)
        else:
            body[name] = item
    return body


def _proto_body(value: Any, fields: tuple[_Field, ...]) -> bytes:
    # proto3 defaults are omitted (but not the empty items of a repeated field).
    out = b""
    for number, _, kind, attribute in fields:
        item = getattr(value, attribute)
        if kind == STR:
            out += str_field(number, item)
        elif kind in (I64, U32):
            out += int_field(number, item)
        elif kind == REP_STR:
            out += b"".join(len_field(number, text.encode("utf-8")) for text in item)
        elif item is not None:  # a nested message
            out += len_field(number, _proto_body(item, kind))
    return out


def _encode(frame: ClientFrame | ServerFrame, fmt: WireFormat) -> bytes | str:
    number, kind, fields = _MESSAGES[type(frame)]
    if fmt is WireFormat.JSON:
        return _to_json(kind, _json_body(frame, fields))
    return len_field(number, _proto_body(frame, fields))


def encode_client(frame: ClientFrame, fmt: WireFormat) -> bytes | str:
    """Encode a client frame: ``str`` for :attr:`WireFormat.JSON`, ``bytes`` for PROTO.

    JSON carries every field (64-bit integers as strings); binary omits proto3 defaults.
    """
    return _encode(frame, fmt)


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
    return _encode(frame, fmt)


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
    _json_tail_bytes: list[bytes] = dataclasses.field(
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
            return '{"update":{"subscriptionId":' + _quote(subscription_id) + self._json_tail[0]
        return self._proto_frame(subscription_id)

    def _proto_frame(self, subscription_id: str) -> bytes:
        if not self._proto_tail:
            self._proto_tail.append(self._build_proto_tail())
        tail = self._proto_tail[0]
        head = str_field(1, subscription_id)
        return b"\x12" + varint(len(head) + len(tail)) + head + tail

    def frame_bytes(self, subscription_id: str, fmt: WireFormat) -> bytes:
        """The ``update`` message for one subscription as the bytes of a WebSocket payload.

        Exactly :meth:`frame` (UTF-8 encoded for JSON), without encoding the shared part again
        for every subscriber.

        Raises:
            WireError: as :meth:`frame`.
        """
        if fmt is WireFormat.JSON:
            if not self._json_tail_bytes:
                self._json_tail_bytes.append(self._build_json_tail_bytes())
            head = '{"update":{"subscriptionId":' + _quote(subscription_id)
            return head.encode("utf-8") + self._json_tail_bytes[0]
        return self._proto_frame(subscription_id)

    def document(self) -> JsonObject:
        """The document as a JSON object (parsed from :attr:`body` each call)."""
        value = json.loads(self.body)
        if not isinstance(value, dict):
            raise WireError(CodecErrorCode.WRONG_TYPE, "a document is a JSON object")
        return value

    def _build_json_tail(self) -> str:
        return self._build_json_tail_bytes().decode("utf-8")

    def _build_json_tail_bytes(self) -> bytes:
        self.body.decode("utf-8")  # a frame is text: refuse a body that is not UTF-8
        return _JSON_TAIL % (
            _quote(self.doc_key).encode("utf-8"),
            _quote(self.projection).encode("utf-8"),
            self.version,
            self.watermark,
            _quote(self.content_hash).encode("utf-8"),
            self.body,
        )

    def _build_proto_tail(self) -> bytes:
        return (
            str_field(2, self.doc_key)
            + str_field(3, self.projection)
            + int_field(4, self.version)
            + int_field(5, self.watermark)
            + str_field(6, self.content_hash)
            + len_field(7, encode_struct(self.document()))
        )
