"""Binary protobuf primitives for the wire codec: varints, fields, ``Struct``, a strict reader.

What this is: the hand-written proto3 binary encoding :mod:`oa_sync_core.protocol.wire` uses
(betterproto 2.0.0b7 cannot encode ``google.protobuf.Struct``), and a schema-table-driven reader
that refuses unknown fields, repeated singular fields, wrong wire types, truncation, invalid UTF-8,
non-finite numbers and nesting deeper than :data:`oa_sync_core.codec.MAX_DEPTH`. Every failure
is a :class:`WireError`. Tests check both directions against the official ``google.protobuf``.

What this is not: a general protobuf runtime, or public API (import from
:mod:`oa_sync_core.protocol.wire`).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from typing import Any, Final, TypeAlias

from oa_sync_core.codec import MAX_DEPTH, JsonObject
from oa_sync_core.errors import CodecErrorCode, WireError

INT64_MAX: Final = 2**63 - 1
UINT32_MAX: Final = 2**32 - 1
_U64_MASK: Final = 2**64 - 1
_EXACT_DOUBLE: Final = 2**53


# ---------------------------------------------------------------------------------------------
# Binary writing
# ---------------------------------------------------------------------------------------------

_DOUBLE = struct.Struct("<d")


_SMALL: Final = tuple(bytes((i,)) for i in range(0x80))


def varint(value: int) -> bytes:
    """The base-128 varint of a non-negative integer below 2**64."""
    if value < 0x80:
        return _SMALL[value]
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def len_field(field: int, payload: bytes) -> bytes:
    return _tag(field, 2) + varint(len(payload)) + payload


def str_field(field: int, text: str) -> bytes:
    """A proto3 ``string`` field; absent when empty (proto3 default)."""
    if not text:
        return b""
    return len_field(field, text.encode("utf-8"))


def int_field(field: int, value: int) -> bytes:
    """A proto3 ``int64`` / ``uint32`` field; absent when zero."""
    if value == 0:
        return b""
    return _tag(field, 0) + varint(value & _U64_MASK)


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
        return len_field(3, value.encode("utf-8"))
    if isinstance(value, dict):
        return len_field(5, encode_struct(value))
    if isinstance(value, list):
        return len_field(6, b"".join(len_field(1, _encode_value(item)) for item in value))
    raise WireError(CodecErrorCode.WRONG_TYPE, f"{type(value).__name__} is not a JSON value")


def encode_struct(obj: Mapping[str, Any]) -> bytes:
    # Map entries always carry key and value (as the official runtime writes them); sorted
    # keys make the encoding deterministic.
    return b"".join(
        len_field(1, len_field(1, key.encode("utf-8")) + len_field(2, _encode_value(obj[key])))
        for key in sorted(obj)
    )


# ---------------------------------------------------------------------------------------------
# Binary reading
# ---------------------------------------------------------------------------------------------

# Field kinds of the schema tables of oa_sync_core.protocol.wire.
STR: Final = "string"
I64: Final = "int64"
U32: Final = "uint32"
REP_STR: Final = "repeated string"
STRUCT: Final = "struct"

Schema: TypeAlias = Mapping[int, tuple[str, Any]]  # number -> (json name, kind or sub-schema)


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


_WIRE_TYPE: Final[Mapping[str, int]] = {STR: 2, I64: 0, U32: 0, REP_STR: 2, STRUCT: 2}


def _read_message(
    reader: _Reader, end: int, schema: Schema, path: str, depth: int
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
        if kind == REP_STR:
            out.setdefault(name, []).append(reader.text(where))
        else:
            if name in out:
                raise WireError(CodecErrorCode.DUPLICATE_KEY, "field given twice", path=where)
            out[name] = _read_field(reader, kind, where, depth)
        if reader.pos > end:
            raise _malformed("field runs past the end of its message", where)
    return out


def _read_field(reader: _Reader, kind: Any, path: str, depth: int) -> Any:
    if kind == STR:
        return reader.text(path)
    if kind == I64:
        value = reader.varint(path)
        return value - 2**64 if value > INT64_MAX else value
    if kind == U32:
        value = reader.varint(path)
        if value > UINT32_MAX:
            raise WireError(CodecErrorCode.OUT_OF_RANGE, f"{value} is outside uint32", path=path)
        return value
    start, end = reader.length_delimited(path)
    sub = _Reader(reader.data, start)
    if kind == STRUCT:
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


def read_oneof(data: bytes, schema: Schema) -> tuple[str, dict[str, Any]]:
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
