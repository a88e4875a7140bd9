"""Every generated contract message round-trips through the proto3 JSON reader.

Values are generated from each betterproto class's own field metadata, so a new message or
field in ``proto/`` is covered without touching this file. The reader's canonical output must
be a fixed point, agree with betterproto's JSON and binary round trips, and, where the protobuf
compiler is available, equal the official protobuf runtime's canonical JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import importlib
import inspect
import sys
from pathlib import Path
from typing import Any, cast

import betterproto
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oa_sync_core.codec import (
    canonical_json,
    check_json,
    loads_strict,
    read_message,
    read_message_fast,
)
from oa_sync_core.contracts import v1
from oa_sync_core.errors import CodecError
from oa_sync_core.events import EVENT_PAYLOADS
from oa_sync_core.testing import texts, timestamps

from tests.profiles import examples

PROPERTY = settings(
    max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
"""Per message class; 37 classes make this the widest property test of the core."""

MESSAGES = sorted(
    (
        cls
        for _, cls in inspect.getmembers(v1, inspect.isclass)
        if issubclass(cls, betterproto.Message) and cls.__module__ == v1.__name__
    ),
    key=lambda cls: cls.__name__,
)
_INT_RANGES = {
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint64": (0, 2**64 - 1),
}
_JSON_LEAF = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | texts()
_STRUCTS = st.dictionaries(
    st.text(max_size=4),
    st.recursive(
        _JSON_LEAF,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
        max_leaves=6,
    ),
    max_size=4,
)


def _fields(cls: type[betterproto.Message]) -> list[tuple[str, Any, Any, bool]]:
    """(name, field metadata, python type, repeated) of every field of a message class."""
    meta = cast(Any, cls)._betterproto
    hints = {f.name: str(f.type) for f in dataclasses.fields(cast(Any, cls))}
    return [
        (
            name,
            field_meta,
            meta.cls_by_field[name],
            hints[name].startswith(("List[", "list[", "typing.List[")),
        )
        for name, field_meta in meta.meta_by_field_name.items()
    ]


def _holds_struct(cls: type[betterproto.Message]) -> bool:
    return any(
        field_meta.proto_type == "message"
        and py_type is not dt.datetime
        and (py_type.__name__ == "Struct" or _holds_struct(py_type))
        for _, field_meta, py_type, _ in _fields(cls)
    )


def _scalar(field_meta: Any, py_type: Any) -> st.SearchStrategy[Any]:
    kind = field_meta.proto_type
    if kind == "string":
        return texts()
    if kind == "bool":
        return st.booleans()
    if kind in _INT_RANGES:
        low, high = _INT_RANGES[kind]
        numbers = st.integers(low, high)
        if kind.endswith("64"):  # proto3 JSON writes them as strings, readers take both
            return numbers | numbers.map(str)
        return numbers
    if kind == "enum":
        members = list(py_type)
        return st.sampled_from([m.name for m in members] + [int(m.value) for m in members])
    raise AssertionError(f"no strategy for proto type {kind}")


@functools.cache
def messages(cls: type[betterproto.Message], depth: int = 3) -> st.SearchStrategy[dict[str, Any]]:
    """proto3 JSON objects of a message class: any subset of fields, under either name form."""
    entries: list[st.SearchStrategy[tuple[str, Any] | None]] = []
    groups: dict[str, list[st.SearchStrategy[tuple[str, Any]]]] = {}
    for name, field_meta, py_type, repeated in _fields(cls):
        if field_meta.proto_type == "message":
            if py_type is dt.datetime:
                value: st.SearchStrategy[Any] = timestamps()
            elif py_type.__name__ == "Struct":
                value = _STRUCTS
            elif depth == 0:
                continue
            else:
                value = messages(py_type, depth - 1)
        else:
            value = _scalar(field_meta, py_type)
        if repeated:
            value = st.lists(value, max_size=3)
        names = st.sampled_from(sorted({betterproto.casing.camel_case(name), name}))
        entry = st.tuples(names, value)
        if field_meta.group is not None:
            groups.setdefault(field_meta.group, []).append(entry)
        else:
            entries.append(st.none() | entry)
    entries += [st.none() | st.one_of(members) for members in groups.values()]
    return st.tuples(*entries).map(lambda pairs: dict(p for p in pairs if p is not None))


def test_every_message_class_is_covered() -> None:
    """The generated module holds the messages of events, projections and sync protos."""
    names = {cls.__name__ for cls in MESSAGES}
    assert {"RunSummaryProjection", "ClientMessage", "ServerMessage", "AppendRequest"} <= names
    assert len(MESSAGES) >= 30


# --- the official protobuf runtime, compiled from proto/ -----------------------------------------


@functools.cache
def _official(tmp: str) -> dict[str, Any] | None:
    """Official message classes by name, compiled with grpc_tools' protoc (None without it)."""
    try:
        protoc = importlib.import_module("grpc_tools.protoc")
    except ImportError:
        return None
    root = Path(__file__).resolve().parents[2] / "proto"
    includes = Path(cast(Any, importlib.import_module("grpc_tools")).__file__).parent / "_proto"
    sources = sorted(str(p.relative_to(root)) for p in root.rglob("*.proto"))
    args = ["protoc", f"-I{root}", f"-I{includes}", f"--python_out={tmp}", *sources]
    assert protoc.main(args) == 0, "protoc failed"
    sys.path.insert(0, tmp)
    try:
        modules = [
            importlib.import_module(source.removesuffix(".proto").replace("/", ".") + "_pb2")
            for source in sources
        ]
    finally:
        sys.path.remove(tmp)
    return {
        name: getattr(module, name)
        for module in modules
        for name in module.DESCRIPTOR.message_types_by_name
    }


@pytest.fixture(scope="module")
def official(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any] | None:
    """The official classes, compiled once per test module into a temporary directory."""
    return _official(str(tmp_path_factory.mktemp("pb2")))


def test_the_official_runtime_is_available(official: dict[str, Any] | None) -> None:
    """grpcio-tools (test dependency group) compiles proto/; every betterproto class has a twin."""
    if official is None:
        pytest.skip("grpcio-tools not installed: the official-runtime comparison is skipped")
    assert {cls.__name__ for cls in MESSAGES} <= set(official)


# --- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", MESSAGES, ids=lambda cls: cls.__name__)
@PROPERTY
@given(data=st.data())
def test_messages_round_trip_through_the_reader(
    cls: type[betterproto.Message], data: st.DataObject, official: dict[str, Any] | None
) -> None:
    """The reader's output is a fixed point and agrees with betterproto and google.protobuf.

    For any proto3 JSON of the message (either field-name form, 64-bit integers as numbers or
    strings, enums as names or numbers, timestamps with offsets): reading it gives canonical
    JSON that reads back unchanged, survives canonical bytes, equals betterproto's JSON and
    binary round trips, and equals the official runtime's parse-then-print.
    """
    raw = data.draw(messages(cls))
    canonical = read_message(cls, raw)
    assert read_message(cls, canonical) == canonical
    assert loads_strict(canonical_json(canonical), max_bytes=1 << 20) == canonical
    message = cls().from_dict(canonical)
    assert read_message(cls, message.to_dict()) == canonical
    if not _holds_struct(cls):  # betterproto 2.0.0b7 cannot encode Struct (see wire.py)
        parsed = cls().parse(bytes(message))
        assert read_message(cls, parsed.to_dict()) == canonical
    if official is not None:
        from google.protobuf import json_format

        reference = json_format.Parse(canonical_json(raw), official[cls.__name__]())
        assert json_format.MessageToDict(reference) == canonical


_ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["runId", "status", "kind", "ping", "x"]), inner)
    ),
    max_leaves=8,
)


@pytest.mark.parametrize("cls", MESSAGES, ids=lambda cls: cls.__name__)
@settings(max_examples=examples(10), deadline=None)
@given(value=_ANY_JSON)
def test_reader_raises_only_codec_errors(cls: type[betterproto.Message], value: Any) -> None:
    """Any JSON value is read as the message or refused with a CodecError, never another error."""
    try:
        canonical = read_message(cls, value)
    except CodecError:
        return
    assert read_message(cls, canonical) == canonical


_ODD_LEAVES: st.SearchStrategy[Any] = (
    st.none()
    | st.booleans()
    | st.integers(-(2**65), 2**65)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(
        ["", "0", "-0", "1.0", "1e3", " 1", "0x10", "18446744073709551616", "-1", "RUNNING",
         "2026-01-01T00:00:60Z", "2026-02-30T00:00:00Z", "1970-01-01T00:00:00.0000000001Z",
         "9999-12-31T23:59:59.999999999Z", "10000-01-01T00:00:00Z", "2026-01-01 00:00:00Z"]
    )
    | st.lists(st.integers(), max_size=2)
    | st.just({})
)  # fmt: skip


@pytest.mark.parametrize("cls", MESSAGES, ids=lambda cls: cls.__name__)
@settings(max_examples=examples(10), deadline=None)
@given(data=st.data())
def test_reader_is_never_laxer_than_the_official_runtime(
    cls: type[betterproto.Message], data: st.DataObject, official: dict[str, Any] | None
) -> None:
    """With one field set to an odd value: what google.protobuf refuses, the reader refuses.

    The reader may be stricter (it refuses unknown enum numbers, exponents in integer strings),
    never laxer; when both accept, they print the same canonical JSON.
    """
    if official is None:
        pytest.skip("grpcio-tools not installed")
    from google.protobuf import json_format

    value = data.draw(messages(cls))
    if value:
        value[data.draw(st.sampled_from(sorted(value)))] = data.draw(_ODD_LEAVES)
    try:
        reference = json_format.MessageToDict(
            json_format.Parse(canonical_json(value), official[cls.__name__]())
        )
    except json_format.ParseError:
        with pytest.raises(CodecError):
            read_message(cls, value)
        return
    with contextlib.suppress(CodecError):
        assert read_message(cls, value) == reference


@pytest.mark.parametrize("cls", MESSAGES, ids=lambda cls: cls.__name__)
@settings(max_examples=examples(25), deadline=None)
@given(data=st.data())
def test_fast_reader_agrees_with_the_reference_or_defers(
    cls: type[betterproto.Message], data: st.DataObject
) -> None:
    """read_message_fast returns exactly read_message's answer, or None (then the reference
    decides); it never accepts what check_json or read_message refuse.

    Values are the message's proto3 JSON in any form, with one field sometimes set to an odd
    value (null, big or negative integers, floats, integer text, bad timestamps, lists).
    """
    value = data.draw(messages(cls))
    if value and data.draw(st.booleans()):
        value[data.draw(st.sampled_from(sorted(value)))] = data.draw(_ODD_LEAVES | texts())
    fast = read_message_fast(cls, value)
    if fast is None:
        return
    check_json(value)  # raises if the fast path accepted non-JSON
    assert read_message(cls, value) == fast
    assert read_message(cls, fast) == fast


def test_fast_reader_takes_the_event_payloads() -> None:
    """The fast path handles the event vocabulary's canonical payloads (it is not dead code)."""
    payload = {"runId": "r1", "occurredAt": "2026-11-25T12:00:00.120Z", "stepIndex": 3}
    assert read_message_fast(v1.RunStep, payload) == read_message(v1.RunStep, payload)
    error = {"runId": "r1", "error": {"code": "E", "message": "é"}}
    assert read_message_fast(v1.RunFailed, error) == read_message(v1.RunFailed, error)
    taken = [cls for cls in EVENT_PAYLOADS.values() if read_message_fast(cls, {}) == {}]
    assert len(taken) == len(EVENT_PAYLOADS)
