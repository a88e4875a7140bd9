"""Canonical encoding, content hashes and a strict proto3 JSON reader.

What this is:

* :func:`canonical_json` — the one byte encoding of a document: its proto3 JSON with sorted
  keys, no insignificant whitespace, UTF-8. :func:`content_hash` is the SHA-256 (hex) of those
  bytes. The same fold gives the same bytes and hash on every machine.
  :func:`canonical_json_text` is the same bytes from a JSON text (e.g. a stored ``jsonb``).
* :func:`loads_strict` — JSON text to Python values, refusing what a lenient parser lets
  through: NaN and Infinity, duplicate keys, nesting deeper than :data:`MAX_DEPTH`, numbers too
  large to parse, lone surrogates, invalid UTF-8, messages over a size limit.
* :func:`read_message` — validates proto3 JSON against a betterproto message class using the
  class's own field metadata (so ``proto/`` stays the schema authority) and returns the
  canonical proto3 JSON of it: lowerCamelCase keys, 64-bit integers as strings, canonical
  timestamps, defaults omitted. Unknown fields and wrong types are refused.

What this is not: a general protobuf runtime. Binary wire encoding lives in
:mod:`oa_sync_core.protocol.wire`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeAlias, cast

import betterproto
import orjson
from betterproto.casing import camel_case

from oa_sync_core.errors import CodecError, CodecErrorCode

__all__ = [
    "MAX_DEPTH",
    "JsonObject",
    "JsonValue",
    "canonical_json",
    "canonical_json_text",
    "canonical_timestamp",
    "check_json",
    "content_hash",
    "format_timestamp",
    "loads_strict",
    "parse_timestamp",
    "read_message",
    "read_message_fast",
]

JsonValue: TypeAlias = Any
"""A value of the JSON data model: dict, list, str, int, float, bool or None."""
JsonObject: TypeAlias = dict[str, Any]
"""A JSON object."""

MAX_DEPTH: Final = 32
"""Deepest nesting of arrays and objects accepted in a wire message or payload."""

_INT32 = (-(2**31), 2**31 - 1)
_UINT32 = (0, 2**32 - 1)
_INT64 = (-(2**63), 2**63 - 1)
_UINT64 = (0, 2**64 - 1)
_INT_RANGES: Final[Mapping[str, tuple[int, int]]] = {
    "int32": _INT32,
    "sint32": _INT32,
    "sfixed32": _INT32,
    "uint32": _UINT32,
    "fixed32": _UINT32,
    "int64": _INT64,
    "sint64": _INT64,
    "sfixed64": _INT64,
    "uint64": _UINT64,
    "fixed64": _UINT64,
}
_INT64_TYPES: Final = frozenset({"int64", "sint64", "sfixed64", "uint64", "fixed64"})
_INT_TEXT = re.compile(r"-?(0|[1-9][0-9]{0,19})")
_TIMESTAMP = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})"
)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MIN_TS = -62135596800  # 0001-01-01T00:00:00Z, the proto Timestamp range
_MAX_TS = 253402300799  # 9999-12-31T23:59:59Z


# ---------------------------------------------------------------------------------------------
# Canonical bytes and hashes
# ---------------------------------------------------------------------------------------------


_ORJSON_OPTIONS: Final = (
    orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_SUBCLASS | orjson.OPT_PASSTHROUGH_DATETIME
)
_FLOAT_PROBE: Final = bytes.maketrans(b"123456789E+}]", b"000000000e-,,")
_FLOAT_TAIL = re.compile(rb"0[.e][-0e.]*,")
"""Read on :data:`_FLOAT_PROBE`'s translation: the end of a number with a fraction or an
exponent, as orjson writes floats, up to the ``,``, ``}`` or ``]`` after it."""


def _may_hold_float(fast: bytes) -> bool:
    """False only if orjson's output ``fast`` holds no float token.

    A float token is ``-?D+(.D+(eS?D+)?|eS?D+)`` (D a digit, S a sign) followed by ``,``, ``}``,
    ``]`` or the end. Translated (digits to ``0``, ``E`` to ``e``, ``+`` to ``-``, ``}`` and
    ``]`` to ``,``), its last integer digit and what follows read ``0.`` or ``0e``, then only
    ``0 e - .`` up to a ``,``: :data:`_FLOAT_TAIL` at one of the places ``bytes.find`` gives. A
    text ending in a digit is a bare number, answered True. A string holding such text
    (``"x:1.5,y"``) merely takes the reference path. This replaced a regular expression
    searched over the whole text, which cost ~7 µs on a run summary (timestamps made its probe
    fire on every document).
    """
    probe = fast.translate(_FLOAT_PROBE)
    if probe[-1:] == b"0":
        return True
    tail = _FLOAT_TAIL.match
    for mark in (b"0.", b"0e"):
        at = probe.find(mark)
        while at >= 0:
            if tail(probe, at):
                return True
            at = probe.find(mark, at + 2)
    return False


def canonical_json(value: JsonValue) -> bytes:
    """Encode a JSON value canonically: sorted keys, no spaces, UTF-8.

    The definition is :func:`json.dumps` with ``sort_keys``, compact separators,
    ``ensure_ascii=False`` and ``allow_nan=False``, encoded as UTF-8. orjson writes exactly those
    bytes for strings, integers, booleans and containers (keys sort by code point either way,
    control characters get the same escapes) about ten times faster, so it is used whenever the
    value holds none of the things it writes differently: floats (orjson spells small exponents
    differently), non-finite numbers (orjson writes ``null``), integers beyond 64 bits, lone
    surrogates and non-JSON types (orjson refuses, or passes them to the reference). Those take
    the reference path, so the bytes never depend on which path ran (a property test compares
    both on arbitrary JSON).

    Args:
        value: a document in proto3 JSON form (only dict, list, str, int, bool, None).

    Returns:
        The canonical bytes.

    Raises:
        ValueError: the value holds a non-finite float.
    """
    try:
        fast = orjson.dumps(value, option=_ORJSON_OPTIONS)
    except TypeError:  # JSONEncodeError: big int, lone surrogate, non-str key, other type
        pass
    else:
        if b"null" not in fast and not _may_hold_float(fast):  # NaN/inf become null in orjson
            return fast
    return _reference_json(value)


def canonical_json_text(text: bytes | str) -> bytes:
    """The canonical bytes of a JSON text: exactly ``canonical_json(json.loads(text))``.

    The text is parsed with orjson, and orjson's canonical output is kept when it holds no
    float token and no ``null``: orjson reads integers beyond 64 bits as floats, and those (as
    every float) then take the reference path, the standard library's parser and
    :func:`canonical_json`, so the bytes never depend on which parser ran. Text orjson refuses
    (``NaN``, a lone surrogate escape, nesting past its limit) takes the reference path too,
    which accepts or refuses it exactly as ``json.loads`` does.

    Args:
        text: JSON text (UTF-8 bytes or a string), e.g. the ``jsonb`` text Postgres returns.

    Returns:
        The canonical bytes.

    Raises:
        ValueError: the text is not JSON, or holds a number out of double range (as
            ``canonical_json(json.loads(text))`` raises).
    """
    try:
        fast = orjson.dumps(orjson.loads(text), option=_ORJSON_OPTIONS)
    except (orjson.JSONDecodeError, TypeError):
        pass
    else:
        if b"null" not in fast and not _may_hold_float(fast):
            return fast
    return canonical_json(json.loads(text))


def _reference_json(value: JsonValue) -> bytes:
    """The definition of :func:`canonical_json` (the standard library's encoder)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def content_hash(canonical: bytes) -> str:
    """SHA-256 (lowercase hex) of a document's canonical bytes."""
    return hashlib.sha256(canonical).hexdigest()


# ---------------------------------------------------------------------------------------------
# Strict JSON text
# ---------------------------------------------------------------------------------------------


def _reject_constant(name: str) -> None:
    raise CodecError(CodecErrorCode.NOT_FINITE, f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise CodecError(CodecErrorCode.DUPLICATE_KEY, f"key {key!r} appears twice")
            seen.add(key)
    return obj


def _check_depth(value: JsonValue, limit: int) -> None:
    # Iterative, so a hostile value cannot exhaust the stack here.
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            if isinstance(item, str):
                if not item.isascii():  # ASCII text cannot hold a lone surrogate
                    _check_text(item)
            elif isinstance(item, float) and not math.isfinite(item):
                raise CodecError(CodecErrorCode.NOT_FINITE, "number out of double range")
            continue
        if depth > limit:
            raise CodecError(CodecErrorCode.TOO_DEEP, f"nesting deeper than {limit}")
        if isinstance(item, dict):
            for key in item:
                if not key.isascii():
                    _check_text(key)
        stack.extend((child, depth + 1) for child in children)


def _members_if_plain(value: Any, limit: int) -> int | None:
    """For a value orjson parsed: its number of object members, or ``None`` when the reference
    reader must decide (a float in it, or nesting deeper than ``limit``). orjson refuses lone
    surrogates and non-finite numbers itself, so those need no look here. One level at a time,
    so a hostile value cannot exhaust the stack."""
    members = 0
    level = [value]
    depth = 0
    while level:
        depth += 1
        below: list[Any] = []
        for item in level:
            kind = type(item)
            if kind is dict:
                members += len(item)
                below.extend(item.values())
            elif kind is list:
                below.extend(item)
            elif kind is float:
                return None
            else:
                continue
            if depth > limit:
                return None
        level = below
    return members


def _check_text(text: str, path: str = "") -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise CodecError(
            CodecErrorCode.INVALID_ENCODING, "string holds a lone surrogate", path=path
        ) from None


def _path(where: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else key


def check_json(value: JsonValue, *, max_depth: int = MAX_DEPTH, path: str = "") -> None:
    """Check that a Python value is plain JSON data, as :func:`loads_strict` would return it.

    Args:
        value: dicts with ``str`` keys, lists, ``str``, ``int``, finite ``float``, ``bool``,
            ``None``.
        max_depth: deepest accepted nesting of arrays and objects.
        path: prefix for error paths.

    Raises:
        CodecError: ``wrong_type`` (another type, e.g. a tuple, bytes or a non-string key),
            ``not_finite``, ``too_deep`` or ``invalid_encoding`` (a lone surrogate).
    """
    # Paths are built only for an error: (value, depth, parent path, key or index or None).
    stack: list[tuple[Any, int, str, str | int | None]] = [(value, 1, path, None)]
    while stack:
        item, depth, parent, name = stack.pop()
        kind = type(item)
        if kind is str:
            if not item.isascii():
                _check_text(item, parent if name is None else _path(parent, name))
            continue
        if kind is int or kind is bool or item is None:
            continue
        where = parent if name is None else _path(parent, name)
        if isinstance(item, dict | list):
            if depth > max_depth:
                raise CodecError(
                    CodecErrorCode.TOO_DEEP, f"nesting deeper than {max_depth}", path=where
                )
            if isinstance(item, list):
                stack.extend((v, depth + 1, where, i) for i, v in enumerate(item))
                continue
            for key, child in item.items():
                if type(key) is not str and not isinstance(key, str):
                    raise _type_error(where, "string keys", key)
                if not key.isascii():
                    _check_text(key, where)
                stack.append((child, depth + 1, where, key))
        elif isinstance(item, str):
            _check_text(item, where)
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise CodecError(
                    CodecErrorCode.NOT_FINITE, "number out of double range", path=where
                )
        elif not isinstance(item, int):  # bool is an int
            raise _type_error(where, "a JSON value", item)


_SPACED_KEY_END: Final = re.compile(r'"[ \t\n\r]+:')
"""A key's closing quote, JSON whitespace, then its colon (see :func:`loads_strict`)."""


def loads_strict(data: bytes | str, *, max_bytes: int, max_depth: int = MAX_DEPTH) -> JsonValue:
    """Parse JSON text, refusing anything ambiguous or abusive.

    Two readers, one answer. orjson (C, strict RFC 8259) answers when it parses the text, the
    value is within the depth limit and holds no float (orjson reads an integer beyond 64 bits
    as one, where the reference keeps the integer), and the text has no more key endings than
    the value has object members, which proves that no key appeared twice in an object
    (orjson keeps the last silently). Every member's key ends with ``"`` then ``:``, with
    JSON whitespace between only if :data:`_SPACED_KEY_END` finds some (then the reference
    decides); inside a string those characters can only follow an escaped quote, which only
    adds to the count. Anything else is decided by the reference reader (the standard
    library's, refusing duplicates and non-finite constants), so what is accepted or refused,
    and with which code, is the reference's; a property test holds the two equal.

    Args:
        data: UTF-8 bytes or text.
        max_bytes: largest accepted size in bytes (text is measured as UTF-8).
        max_depth: deepest accepted nesting of arrays and objects.

    Returns:
        The parsed value.

    Raises:
        CodecError: with code ``too_large``, ``invalid_encoding``, ``malformed_json``,
            ``not_finite``, ``duplicate_key`` or ``too_deep``.
    """
    size = len(data) if isinstance(data, bytes) else len(data) * 4
    # "surrogatepass": measuring must not raise on a lone surrogate (refused below, with a code).
    if size > max_bytes and (
        isinstance(data, bytes) or len(data.encode("utf-8", "surrogatepass")) > max_bytes
    ):
        raise CodecError(CodecErrorCode.TOO_LARGE, f"message exceeds {max_bytes} bytes")
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise CodecError(CodecErrorCode.INVALID_ENCODING, "not valid UTF-8") from None
    else:
        text = data
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        pass  # the reference reader decides, and words the error
    else:
        members = _members_if_plain(value, max_depth)
        if (
            members is not None
            and members == text.count('":')
            and _SPACED_KEY_END.search(text) is None
        ):
            return cast(JsonValue, value)
    return _loads_reference(text, max_depth)


def _loads_reference(text: str, max_depth: int) -> JsonValue:
    """:func:`loads_strict` by the standard library's reader alone."""
    try:
        value = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except CodecError:
        raise
    except RecursionError:
        raise CodecError(CodecErrorCode.TOO_DEEP, f"nesting deeper than {max_depth}") from None
    except ValueError as exc:  # JSONDecodeError, and int() refusing a 5,000-digit number
        raise CodecError(CodecErrorCode.MALFORMED_JSON, str(exc)) from None
    _check_depth(value, max_depth)
    return value


# ---------------------------------------------------------------------------------------------
# Timestamps (google.protobuf.Timestamp in proto3 JSON)
# ---------------------------------------------------------------------------------------------


def parse_timestamp(text: str) -> tuple[int, int]:
    """Parse an RFC 3339 timestamp into (seconds since the epoch, nanoseconds).

    Raises:
        ValueError: not an RFC 3339 timestamp within 0001-01-01 and 9999-12-31.
    """
    match = _TIMESTAMP.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not an RFC 3339 timestamp")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction, offset = match.group(7), match.group(8)
    try:
        base = dt.datetime(year, month, day, hour, minute, second, tzinfo=dt.UTC)
    except ValueError as exc:  # day 30 of February, hour 24, second 60...
        raise ValueError(f"{text!r} is not a valid timestamp: {exc}") from None
    seconds = (base - _EPOCH) // dt.timedelta(seconds=1)
    if offset not in ("Z", "z"):
        sign = 1 if offset[0] == "+" else -1
        hours, minutes = int(offset[1:3]), int(offset[4:6])
        if hours > 23 or minutes > 59:  # RFC 3339 time-numoffset
            raise ValueError(f"{text!r} is not a valid timestamp: offset beyond 23:59")
        seconds -= sign * (hours * 3600 + minutes * 60)
    if not _MIN_TS <= seconds <= _MAX_TS:
        raise ValueError(f"{text!r} is outside the Timestamp range")
    nanos = int((fraction or "").ljust(9, "0"))
    return seconds, nanos


_DAYS: Final = (0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_CANONICAL_UTC = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
    r"(?:\.(?:(?!000)[0-9]{3}|[0-9]{3}(?!000)[0-9]{3}|[0-9]{6}(?!000)[0-9]{3}))?Z"
)
"""A timestamp already in canonical form (but for its date's validity): UTC ``Z``, 0, 3, 6 or
9 fractional digits, the shortest that holds the value."""
_VALID_DATES: dict[str, bool] = {}
"""``YYYY-MM-DD`` texts seen by :func:`canonical_timestamp`, and whether each is a real date."""


def _valid_date(text: str) -> bool:
    year, month, day = int(text[0:4]), int(text[5:7]), int(text[8:10])
    leap = month == 2 and year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    return year >= 1 and 1 <= month <= 12 and 1 <= day <= _DAYS[month] + leap


def canonical_timestamp(text: str) -> str:
    """``format_timestamp(*parse_timestamp(text))``, without the datetime round trip for UTC.

    An ASCII ``Z`` timestamp with a valid date and time is already canonical but for its
    fraction and the case of ``T``/``Z``; anything else (offsets, invalid fields, out of
    range) takes the full path, which also words the error. A timestamp already canonical
    (the usual case) is returned as it is once its date is known valid.

    Raises:
        ValueError: as :func:`parse_timestamp`.
    """
    if _CANONICAL_UTC.fullmatch(text) is not None:
        date = text[:10]
        valid = _VALID_DATES.get(date)
        if valid is None:
            if len(_VALID_DATES) >= 4096:  # bounded: dates seen recently, not every date ever
                _VALID_DATES.clear()
            valid = _VALID_DATES[date] = _valid_date(date)
        if valid:
            return text
    match = _TIMESTAMP.fullmatch(text)
    if (
        match is not None
        and match.group(8) in ("Z", "z")
        and text.isascii()
        and (
            _valid_date(text)
            and int(text[11:13]) <= 23
            and int(text[14:16]) <= 59
            and int(text[17:19]) <= 59
        )
    ):
        fraction = match.group(7)
        head = f"{text[0:10]}T{text[11:19]}"
        if not fraction:
            return head + "Z"
        return _with_fraction(head, int(fraction.ljust(9, "0")))
    return format_timestamp(*parse_timestamp(text))


def format_timestamp(seconds: int, nanos: int = 0) -> str:
    """Format a timestamp as canonical proto3 JSON: UTC, 'Z', 0/3/6/9 fractional digits."""
    moment = _EPOCH + dt.timedelta(seconds=seconds)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if len(text) < 19:  # years below 1000 lose their zero padding on some platforms
        text = text.zfill(19)
    return _with_fraction(text, nanos)


def _with_fraction(seconds_text: str, nanos: int) -> str:
    """``seconds_text`` + the canonical fraction (0, 3, 6 or 9 digits) + 'Z'."""
    if nanos == 0:
        return seconds_text + "Z"
    if nanos % 1_000_000 == 0:
        return f"{seconds_text}.{nanos // 1_000_000:03d}Z"
    if nanos % 1_000 == 0:
        return f"{seconds_text}.{nanos // 1_000:06d}Z"
    return f"{seconds_text}.{nanos:09d}Z"


def datetime_to_timestamp(moment: dt.datetime) -> str:
    """Canonical proto3 JSON of an aware datetime (microsecond precision)."""
    if moment.tzinfo is None:
        raise ValueError("naive datetime: give a timezone")
    delta = moment - _EPOCH
    seconds = delta.days * 86400 + delta.seconds
    return format_timestamp(seconds, delta.microseconds * 1000)


# ---------------------------------------------------------------------------------------------
# proto3 JSON against betterproto metadata
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Field:
    name: str  # python attribute name
    json_name: str
    proto_type: str
    repeated: bool
    message_cls: type[betterproto.Message] | None
    enum_cls: type[betterproto.Enum] | None
    group: str | None
    well_known: str | None  # "timestamp" | "struct" | None


_SCHEMAS: dict[type[betterproto.Message], dict[str, _Field]] = {}


def _schema(cls: type[betterproto.Message]) -> dict[str, _Field]:
    """Fields of a message by every accepted JSON name (lowerCamelCase and proto name)."""
    cached = _SCHEMAS.get(cls)
    if cached is not None:
        return cached
    meta = cast(Any, cls)._betterproto  # betterproto's own metadata
    by_name: dict[str, _Field] = {}
    type_hints = {f.name: f.type for f in dataclasses.fields(cast(Any, cls))}
    for name, field_meta in meta.meta_by_field_name.items():
        py_type = meta.cls_by_field[name]
        hint = str(type_hints.get(name, ""))
        repeated = hint.startswith(("List[", "list[", "typing.List["))
        message_cls = None
        enum_cls = None
        well_known = None
        if field_meta.proto_type == "message":
            if py_type is dt.datetime:
                well_known = "timestamp"
            elif py_type.__name__ == "Struct":
                well_known = "struct"
            else:
                message_cls = py_type
        elif field_meta.proto_type == "enum":
            enum_cls = py_type
        elif field_meta.proto_type == "map":
            raise TypeError(f"{cls.__name__}.{name}: map fields are not supported")
        spec = _Field(
            name=name,
            json_name=camel_case(name),
            proto_type=field_meta.proto_type,
            repeated=repeated,
            message_cls=message_cls,
            enum_cls=enum_cls,
            group=field_meta.group,
            well_known=well_known,
        )
        by_name[spec.json_name] = spec
        by_name[name] = spec
    _SCHEMAS[cls] = by_name
    return by_name


def _type_error(path: str, expected: str, value: Any) -> CodecError:
    return CodecError(
        CodecErrorCode.WRONG_TYPE, f"expected {expected}, got {type(value).__name__}", path=path
    )


def _read_scalar(spec: _Field, value: Any, path: str) -> Any:
    kind = spec.proto_type
    if kind == "string":
        if not isinstance(value, str):
            raise _type_error(path, "a string", value)
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise _type_error(path, "true or false", value)
        return value
    if kind in _INT_RANGES:
        if isinstance(value, bool):
            raise _type_error(path, "an integer", value)
        if isinstance(value, str):
            if not _INT_TEXT.fullmatch(value):
                raise _type_error(path, "an integer", value)
            number = int(value)
        elif isinstance(value, int):
            number = value
        elif isinstance(value, float) and value.is_integer():
            number = int(value)
        else:
            raise _type_error(path, "an integer", value)
        low, high = _INT_RANGES[kind]
        if not low <= number <= high:
            raise CodecError(CodecErrorCode.OUT_OF_RANGE, f"{number} is outside {kind}", path=path)
        return str(number) if kind in _INT64_TYPES else number
    if kind in ("double", "float"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _type_error(path, "a number", value)
        return value
    if kind == "bytes":
        if not isinstance(value, str):
            raise _type_error(path, "base64 text", value)
        return value
    if kind == "enum":
        assert spec.enum_cls is not None
        if isinstance(value, str):
            names = {member.name for member in spec.enum_cls}
            if value in names:
                return value
            raise CodecError(
                CodecErrorCode.OUT_OF_RANGE,
                f"{value!r} is not a {spec.enum_cls.__name__}",
                path=path,
            )
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                return spec.enum_cls(value).name
            except ValueError:
                raise CodecError(
                    CodecErrorCode.OUT_OF_RANGE,
                    f"{value} is not a {spec.enum_cls.__name__}",
                    path=path,
                ) from None
        raise _type_error(path, "an enum name", value)
    raise TypeError(f"unsupported proto type {kind}")  # pragma: no cover - schema bug


def _is_default(spec: _Field, value: Any) -> bool:
    # By proto type: a string field holding "0" is not at its default, a 64-bit integer is.
    if spec.enum_cls is not None:
        return bool(spec.enum_cls[value].value == 0)
    if spec.proto_type in ("string", "bytes"):
        return bool(value == "")
    if spec.proto_type == "bool":
        return value is False
    if spec.proto_type in _INT64_TYPES:
        return bool(value == "0")
    if spec.proto_type in _INT_RANGES or spec.proto_type in ("double", "float"):
        return bool(value == 0)
    return False


def _read_value(spec: _Field, value: Any, path: str) -> Any:
    if spec.message_cls is not None:
        return read_message(spec.message_cls, value, path=path)
    if spec.well_known == "timestamp":
        if not isinstance(value, str):
            raise _type_error(path, "an RFC 3339 timestamp", value)
        try:
            return canonical_timestamp(value)
        except ValueError as exc:
            raise CodecError(CodecErrorCode.WRONG_TYPE, str(exc), path=path) from None
    if spec.well_known == "struct":
        if not isinstance(value, dict):
            raise _type_error(path, "an object", value)
        return value
    return _read_scalar(spec, value, path)


def read_message(cls: type[betterproto.Message], obj: Any, *, path: str = "") -> JsonObject:
    """Validate proto3 JSON against a message class; return its canonical proto3 JSON.

    Accepts lowerCamelCase and original field names, numbers for 64-bit integers, enum numbers;
    returns lowerCamelCase names, 64-bit integers as strings, enum names, canonical timestamps,
    and omits fields at their default value (except ``optional`` fields set explicitly,
    members of a ``oneof`` and message fields, whose presence is meaningful).

    Args:
        cls: the betterproto message class (from :mod:`oa_sync_core.contracts.v1`).
        obj: the parsed JSON value.
        path: prefix for error paths.

    Raises:
        CodecError: ``wrong_type``, ``unknown_field`` or ``out_of_range``, with the path.
    """
    if not isinstance(obj, dict):
        raise _type_error(path or cls.__name__, "an object", obj)
    schema = _schema(cls)
    meta_by_name = cast(Any, cls)._betterproto.meta_by_field_name
    out: JsonObject = {}
    groups: dict[str, str] = {}
    seen: set[str] = set()
    for key, raw in obj.items():
        spec = schema.get(key)
        where = f"{path}.{key}" if path else key
        if spec is None:
            raise CodecError(
                CodecErrorCode.UNKNOWN_FIELD, f"{cls.__name__} has no field {key!r}", path=where
            )
        if spec.json_name in seen:  # e.g. both "runId" and "run_id", even if one is a default
            raise CodecError(CodecErrorCode.DUPLICATE_KEY, "field given twice", path=where)
        seen.add(spec.json_name)
        if raw is None:  # proto3 JSON: null means "default" for every field but Value
            continue
        if spec.group is not None:
            if spec.group in groups:
                raise CodecError(
                    CodecErrorCode.WRONG_TYPE,
                    f"oneof {spec.group!r} has both {groups[spec.group]!r} and {spec.json_name!r}",
                    path=where,
                )
            groups[spec.group] = spec.json_name
        if spec.repeated:
            if not isinstance(raw, list):
                raise _type_error(where, "an array", raw)
            items = [_read_value(spec, item, f"{where}[{i}]") for i, item in enumerate(raw)]
            if items:
                out[spec.json_name] = items
            continue
        value = _read_value(spec, raw, where)
        keep = (
            spec.group is not None
            or spec.message_cls is not None
            or spec.well_known is not None
            or meta_by_name[spec.name].optional
            or not _is_default(spec, value)
        )
        if keep:
            out[spec.json_name] = value
    return out


# ---------------------------------------------------------------------------------------------
# A fast path for read_message, for the shapes events actually have
# ---------------------------------------------------------------------------------------------

_FastField: TypeAlias = tuple[str, str, Any, bool]
"""(json name, kind, range or nested reader, keep at default) of one field the fast path reads."""
_FastReader: TypeAlias = Callable[[Any], "JsonObject | None"]

_FAST: dict[type[betterproto.Message], _FastReader | None] = {}
_FAST_KINDS: Final = frozenset({"string", "bool", *_INT_RANGES})


def _fast_fields(cls: type[betterproto.Message]) -> dict[str, _FastField] | None:
    """The fields of ``cls`` by lowerCamelCase name, or ``None`` if a field is not simple.

    Simple: in no ``oneof``, and a string, bool, integer, timestamp, Struct, nested simple
    message or repeated nested simple message. Anything else (other repeated fields,
    ``oneof``, enum, double, bytes) makes the whole class take :func:`read_message`.
    """
    meta_by_name = cast(Any, cls)._betterproto.meta_by_field_name
    out: dict[str, _FastField] = {}
    for spec in _schema(cls).values():
        if spec.group is not None or (spec.repeated and spec.message_cls is None):
            return None
        keep = bool(meta_by_name[spec.name].optional)
        if spec.message_cls is not None:
            nested = _fast_reader(spec.message_cls)
            if nested is None:
                return None
            kind = "messages" if spec.repeated else "message"
            out[spec.json_name] = (spec.json_name, kind, nested, True)
        elif spec.well_known == "struct":
            out[spec.json_name] = (spec.json_name, "struct", None, True)
        elif spec.well_known == "timestamp":
            out[spec.json_name] = (spec.json_name, "timestamp", None, True)
        elif spec.well_known is None and spec.proto_type in _FAST_KINDS:
            if spec.proto_type in _INT64_TYPES:
                kind = "int64"
            elif spec.proto_type in _INT_RANGES:
                kind = "int"
            else:
                kind = spec.proto_type
            out[spec.json_name] = (spec.json_name, kind, _INT_RANGES.get(spec.proto_type), keep)
        else:
            return None
    return out


def _fast_reader(cls: type[betterproto.Message]) -> _FastReader | None:
    """The compiled fast reader of ``cls`` (cached), or ``None`` when it has none."""
    if cls in _FAST:
        return _FAST[cls]
    _FAST[cls] = None  # (a recursive message type gets no fast reader)
    fields = _fast_fields(cls)
    if fields is None:
        return None

    def read(obj: Any) -> JsonObject | None:
        if type(obj) is not dict:
            return None
        out: JsonObject = {}
        for key, raw in obj.items():
            spec = fields.get(key)
            if spec is None:
                return None
            name, kind, extra, keep = spec
            kind_of = type(raw)
            if kind == "string":
                if kind_of is not str:
                    return None
                if not raw.isascii():
                    try:
                        raw.encode("utf-8")
                    except UnicodeEncodeError:
                        return None
                if raw or keep:
                    out[name] = raw
            elif kind == "timestamp":
                if kind_of is not str:
                    return None
                try:
                    out[name] = canonical_timestamp(raw)
                except ValueError:
                    return None
            elif kind in {"int", "int64"}:
                if kind_of is not int or not extra[0] <= raw <= extra[1]:
                    return None
                if raw or keep:
                    out[name] = str(raw) if kind == "int64" else raw
            elif kind == "bool":
                if kind_of is not bool:
                    return None
                if raw or keep:
                    out[name] = raw
            elif kind == "message":
                nested = extra(raw)
                if nested is None:
                    return None
                out[name] = nested
            elif kind == "messages":
                if kind_of is not list:
                    return None
                items = [extra(item) for item in raw]
                if None in items:
                    return None
                if items:
                    out[name] = items
            else:  # a Struct: any JSON object
                if kind_of is not dict:
                    return None
                try:  # half the depth budget: message nesting above it is far shallower
                    check_json(raw, max_depth=MAX_DEPTH // 2)
                except CodecError:
                    return None
                out[name] = raw
        return out

    _FAST[cls] = read
    return read


def read_message_fast(cls: type[betterproto.Message], obj: Any) -> JsonObject | None:
    """:func:`read_message` for the common case, or ``None`` when it cannot decide.

    When it returns a value, it is exactly what :func:`read_message` returns for ``obj`` and
    ``obj`` is also plain JSON data (what :func:`check_json` accepts): every key is a
    lowerCamelCase field name of ``cls``, every value has the exact type its field takes
    (``str``, ``int`` in range, ``bool``, an RFC 3339 timestamp, a JSON object for a Struct, a
    nested message of the same kind or a list of them), and no string holds a lone surrogate.
    Anything else (snake_case names, ``null``, integers given as text or floats, enums, other
    repeated fields, ``oneof`` members, a Struct nested deeper than half of :data:`MAX_DEPTH`,
    an error of any kind) returns ``None``: the caller then takes :func:`check_json` and
    :func:`read_message`, which accept or refuse and word the error. A property test holds the
    two paths equal.

    Args:
        cls: the betterproto message class.
        obj: the parsed JSON value.
    """
    reader = _fast_reader(cls)
    return None if reader is None else reader(obj)
