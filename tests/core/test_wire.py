"""The wire codec: round trips, agreement with the official protobuf runtime, strict decoding."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    json_format,
    message_factory,
    struct_pb2,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oa_sync_core.codec import MAX_DEPTH, canonical_json, content_hash
from oa_sync_core.errors import CodecError, CodecErrorCode, ProtocolError
from oa_sync_core.protocol.wire import (
    Authenticate,
    ClientFrame,
    EncodedUpdate,
    ErrorFrame,
    Heartbeat,
    Ping,
    Pong,
    Reset,
    Resume,
    ServerFrame,
    Subscribe,
    Synced,
    Unsubscribe,
    UpdateFrame,
    Welcome,
    WireError,
    WireFormat,
    decode_client,
    decode_server,
    encode_client,
    encode_server,
)

from tests.profiles import examples

MAX = 1 << 20
FORMATS = list(WireFormat)

# ---------------------------------------------------------------------------------------------
# The official runtime, built from a descriptor that mirrors proto/openagents/sync/v1/sync.proto
# ---------------------------------------------------------------------------------------------

_T = descriptor_pb2.FieldDescriptorProto
_STRING, _INT64, _UINT32, _MSG = _T.TYPE_STRING, _T.TYPE_INT64, _T.TYPE_UINT32, _T.TYPE_MESSAGE
_SPEC: dict[str, list[tuple[str, int, int, str]]] = {
    "Authenticate": [("token", 1, _STRING, "")],
    "ResumeFrom": [("epoch", 1, _STRING, ""), ("watermark", 2, _INT64, "")],
    "Subscribe": [
        ("subscription_id", 1, _STRING, ""),
        ("topics", 2, -_STRING, ""),  # negative: repeated
        ("resume", 3, _MSG, ".openagents.sync.v1.ResumeFrom"),
    ],
    "Unsubscribe": [("subscription_id", 1, _STRING, "")],
    "Ping": [("nonce", 1, _STRING, "")],
    "Welcome": [
        ("session_id", 1, _STRING, ""),
        ("epoch", 2, _STRING, ""),
        ("watermark", 3, _INT64, ""),
        ("heartbeat_interval_ms", 4, _UINT32, ""),
    ],
    "Update": [
        ("subscription_id", 1, _STRING, ""),
        ("doc_key", 2, _STRING, ""),
        ("projection", 3, _STRING, ""),
        ("version", 4, _INT64, ""),
        ("watermark", 5, _INT64, ""),
        ("content_hash", 6, _STRING, ""),
        ("document", 7, _MSG, ".google.protobuf.Struct"),
    ],
    "Synced": [
        ("subscription_id", 1, _STRING, ""),
        ("watermark", 2, _INT64, ""),
        ("epoch", 3, _STRING, ""),
    ],
    "Reset": [
        ("subscription_id", 1, _STRING, ""),
        ("reason", 2, _STRING, ""),
        ("epoch", 3, _STRING, ""),
    ],
    "Heartbeat": [("watermark", 1, _INT64, "")],
    "Pong": [("nonce", 1, _STRING, "")],
    "Error": [
        ("code", 1, _STRING, ""),
        ("message", 2, _STRING, ""),
        ("subscription_id", 3, _STRING, ""),
    ],
}
_ONEOFS = {
    "ClientMessage": ["Authenticate", "Subscribe", "Unsubscribe", "Ping"],
    "ServerMessage": ["Welcome", "Update", "Synced", "Reset", "Heartbeat", "Pong", "Error"],
}


def _build_pool() -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    struct_file = descriptor_pb2.FileDescriptorProto()
    struct_pb2.DESCRIPTOR.CopyToProto(struct_file)
    pool.Add(struct_file)
    fdp = descriptor_pb2.FileDescriptorProto(
        name="khala_wire_test.proto",
        package="openagents.sync.v1",
        syntax="proto3",
        dependency=["google/protobuf/struct.proto"],
    )
    for name, fields in _SPEC.items():
        msg = fdp.message_type.add(name=name)
        for field_name, number, kind, type_name in fields:
            field = msg.field.add(name=field_name, number=number, type=abs(kind))
            field.label = _T.LABEL_REPEATED if kind < 0 else _T.LABEL_OPTIONAL
            field.json_name = _camel(field_name)
            if type_name:
                field.type_name = type_name
    for name, members in _ONEOFS.items():
        msg = fdp.message_type.add(name=name)
        msg.oneof_decl.add(name="kind")
        for number, member in enumerate(members, start=1):
            field_name = {"ResumeFrom": "resume"}.get(member, member.lower())
            msg.field.add(
                name=field_name,
                number=number,
                type=_MSG,
                label=_T.LABEL_OPTIONAL,
                type_name=f".openagents.sync.v1.{member}",
                oneof_index=0,
                json_name=field_name,
            )
    pool.Add(fdp)
    return pool


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


_POOL = _build_pool()
ClientMessagePb: Any = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName("openagents.sync.v1.ClientMessage")
)
ServerMessagePb: Any = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName("openagents.sync.v1.ServerMessage")
)

# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------

texts = st.text(st.characters(codec="utf-8"), max_size=12)
ints = st.integers(min_value=0, max_value=2**63 - 1)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer())
    | texts
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)
documents = st.dictionaries(texts, json_values, max_size=5)

client_frames: st.SearchStrategy[ClientFrame] = st.one_of(
    st.builds(Authenticate, texts),
    st.builds(
        Subscribe,
        texts,
        st.lists(texts, max_size=4).map(tuple),
        st.none() | st.builds(Resume, texts, ints),
    ),
    st.builds(Unsubscribe, texts),
    st.builds(Ping, texts),
)
server_frames: st.SearchStrategy[ServerFrame] = st.one_of(
    st.builds(Welcome, texts, texts, ints, st.integers(min_value=0, max_value=2**32 - 1)),
    st.builds(Synced, texts, ints, texts),
    st.builds(Reset, texts, texts, texts),
    st.builds(Heartbeat, ints),
    st.builds(Pong, texts),
    st.builds(ErrorFrame, texts, texts, texts),
    st.builds(UpdateFrame, texts, texts, texts, ints, ints, texts, documents),
)


def _as_bytes(data: bytes | str) -> bytes:
    assert isinstance(data, bytes)
    return data


def _has_multi_entry_map(value: Any) -> bool:
    if isinstance(value, dict):
        return len(value) > 1 or any(_has_multi_entry_map(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_multi_entry_map(v) for v in value)
    return False


def _as_text(data: bytes | str) -> str:
    assert isinstance(data, str)
    return data


# ---------------------------------------------------------------------------------------------
# Round trips and agreement with google.protobuf
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@given(frame=client_frames)
def test_client_frames_round_trip(fmt: WireFormat, frame: ClientFrame) -> None:
    """Every client frame decodes to itself in both formats (str for JSON, bytes for proto)."""
    data = encode_client(frame, fmt)
    assert isinstance(data, str if fmt is WireFormat.JSON else bytes)
    assert decode_client(data, fmt, max_bytes=MAX) == frame


@pytest.mark.parametrize("fmt", FORMATS)
@given(frame=server_frames)
def test_server_frames_round_trip(fmt: WireFormat, frame: ServerFrame) -> None:
    """Every server frame decodes to itself in both formats."""
    data = encode_server(frame, fmt)
    assert isinstance(data, str if fmt is WireFormat.JSON else bytes)
    assert decode_server(data, fmt, max_bytes=MAX) == frame


@given(frame=client_frames)
def test_client_binary_agrees_with_google_protobuf(frame: ClientFrame) -> None:
    """Our binary is what google.protobuf writes, and each parses the other's bytes and JSON."""
    ours = _as_bytes(encode_client(frame, WireFormat.PROTO))
    theirs = json_format.Parse(_as_text(encode_client(frame, WireFormat.JSON)), ClientMessagePb())
    assert theirs.SerializeToString(deterministic=True) == ours
    assert ClientMessagePb.FromString(ours) == theirs
    assert decode_client(theirs.SerializeToString(), WireFormat.PROTO, max_bytes=MAX) == frame
    assert decode_client(json_format.MessageToJson(theirs), WireFormat.JSON, max_bytes=MAX) == frame


@given(frame=server_frames)
def test_server_binary_agrees_with_google_protobuf(frame: ServerFrame) -> None:
    """Server frames (Struct documents included) parse both ways between us and google.protobuf."""
    ours = _as_bytes(encode_server(frame, WireFormat.PROTO))
    theirs = json_format.Parse(_as_text(encode_server(frame, WireFormat.JSON)), ServerMessagePb())
    assert ServerMessagePb.FromString(ours) == theirs
    assert decode_server(theirs.SerializeToString(), WireFormat.PROTO, max_bytes=MAX) == frame
    assert decode_server(json_format.MessageToJson(theirs), WireFormat.JSON, max_bytes=MAX) == frame
    # Map order of the official runtime is its own; without maps of two or more entries
    # (at any depth, lists included) the bytes are identical.
    if not isinstance(frame, UpdateFrame) or not _has_multi_entry_map(frame.document):
        assert theirs.SerializeToString(deterministic=True) == ours


def test_struct_whole_numbers_read_back_as_int() -> None:
    """Struct carries doubles: 1.0 reads back as 1, 2.5 stays a float, huge ints stay floats."""
    frame = UpdateFrame("s", "k", "p", 1, 1, "h", {"a": 1.0, "b": 2.5, "c": 2.0**60})
    got = decode_server(encode_server(frame, WireFormat.PROTO), WireFormat.PROTO, max_bytes=MAX)
    assert isinstance(got, UpdateFrame)
    assert got.document == {"a": 1, "b": 2.5, "c": 2.0**60}
    assert isinstance(got.document["a"], int)
    assert isinstance(got.document["c"], float)


@given(frame=st.builds(UpdateFrame, texts, texts, texts, ints, ints, texts, documents))
def test_encoded_update_splices_identical_bytes(frame: UpdateFrame) -> None:
    """EncodedUpdate.frame (and frame_bytes, as UTF-8) equals encode_server(UpdateFrame) byte
    for byte, for any subscription."""
    update = EncodedUpdate(
        frame.doc_key,
        frame.projection,
        frame.version,
        frame.watermark,
        frame.content_hash,
        canonical_json(frame.document),
    )
    for fmt in FORMATS:
        for sid in (frame.subscription_id, "", "s-2", "é" * 200):
            other = UpdateFrame(
                sid,
                frame.doc_key,
                frame.projection,
                frame.version,
                frame.watermark,
                frame.content_hash,
                frame.document,
            )
            assert update.frame(sid, fmt) == encode_server(other, fmt)
            encoded = encode_server(other, fmt)
            expected = encoded.encode("utf-8") if isinstance(encoded, str) else encoded
            assert update.frame_bytes(sid, fmt) == expected


def test_encoded_update_caches_parts_per_format() -> None:
    """The document is encoded once per format; later frames only splice the subscription id."""
    body = canonical_json({"b": [1, "x"], "a": {"z": None}})
    update = EncodedUpdate("runtime/run_summary:r1", "runtime/run_summary", 3, 9, "h", body)
    first = update.frame("s1", WireFormat.PROTO)
    tail = update._proto_tail[0]
    assert update.frame("s2", WireFormat.PROTO) != first
    assert update._proto_tail[0] is tail
    text = update.frame("s1", WireFormat.JSON)
    assert isinstance(text, str)
    assert text.endswith(',"document":{"a":{"z":null},"b":[1,"x"]}}}')
    assert content_hash(body) == content_hash(canonical_json(update.document()))


def test_design_examples_decode() -> None:
    """The JSON messages shown in DESIGN.md decode to the expected frames."""
    assert decode_client(
        '{"subscribe": {"subscriptionId": "s1", "topics": ["runtime/run_summary:r1",'
        ' "runtime/codex_worker_summary:*"], "resume": {"epoch": "e", "watermark": "123"}}}',
        WireFormat.JSON,
        max_bytes=MAX,
    ) == Subscribe(
        "s1", ("runtime/run_summary:r1", "runtime/codex_worker_summary:*"), Resume("e", 123)
    )
    assert decode_client('{"ping": {"nonce": "n1"}}', WireFormat.JSON, max_bytes=MAX) == Ping("n1")
    assert decode_server(
        '{"welcome": {"sessionId": "x", "epoch": "e", "watermark": "7", '
        '"heartbeatIntervalMs": 15000}}',
        WireFormat.JSON,
        max_bytes=MAX,
    ) == Welcome("x", "e", 7, 15000)
    assert decode_server(
        '{"update": {"subscriptionId": "s1", "docKey": "k", "projection": "p", "version": "7",'
        ' "watermark": "124", "contentHash": "c", "document": {"a": 1}}}',
        WireFormat.JSON,
        max_bytes=MAX,
    ) == UpdateFrame("s1", "k", "p", 7, 124, "c", {"a": 1})
    # Defaults may be omitted and snake_case names are accepted, as proto3 JSON allows.
    assert decode_client(
        '{"subscribe": {"subscription_id": "s"}}', WireFormat.JSON, max_bytes=MAX
    ) == (Subscribe("s", (), None))
    assert decode_client('{"authenticate": {}}', WireFormat.JSON, max_bytes=MAX) == Authenticate("")


def test_authenticate_repr_hides_the_token() -> None:
    """A token never shows up in a frame's repr (and so not in logs)."""
    assert "secret-token" not in repr(Authenticate("secret-token"))


# ---------------------------------------------------------------------------------------------
# Strict decoding
# ---------------------------------------------------------------------------------------------

C = CodecErrorCode
DEEP = "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)
REFUSED_JSON: list[tuple[str, CodecErrorCode]] = [
    ("", C.MALFORMED_JSON),
    ("[]", C.WRONG_TYPE),
    ("{}", C.UNKNOWN_KIND),
    ('{"ping": null}', C.UNKNOWN_KIND),
    ('{"welcome": {}}', C.UNKNOWN_KIND),
    ('{"ping": {"nonce": "a"}, "unsubscribe": {}}', C.WRONG_TYPE),
    ('{"ping": {"nonce": "a", "extra": 1}}', C.UNKNOWN_FIELD),
    ('{"ping": {"nonce": 5}}', C.WRONG_TYPE),
    ('{"ping": {"nonce": "a", "nonce": "b"}}', C.DUPLICATE_KEY),
    ('{"ping": {"nonce": NaN}}', C.NOT_FINITE),
    ('{"ping": {"nonce": "\\ud800"}}', C.INVALID_ENCODING),
    ('{"subscribe": {"topics": "a"}}', C.WRONG_TYPE),
    ('{"subscribe": {"topics": [1]}}', C.WRONG_TYPE),
    ('{"subscribe": {"resume": {"watermark": "99999999999999999999"}}}', C.OUT_OF_RANGE),
    ('{"subscribe": {"resume": {"watermark": "-1"}}}', C.OUT_OF_RANGE),
    ('{"subscribe": {"resume": {"watermark": 1e400}}}', C.NOT_FINITE),
    ('{"subscribe": {"resume": {"watermark": ' + "9" * 5000 + "}}}", C.MALFORMED_JSON),
    ('{"subscribe": {"resume": {"watermark": 1.5}}}', C.WRONG_TYPE),
    ('{"ping": {"nonce": ' + DEEP + "}}", C.TOO_DEEP),
]


@pytest.mark.parametrize(("text", "code"), REFUSED_JSON)
def test_malformed_json_is_refused_with_a_code(text: str, code: CodecErrorCode) -> None:
    """Each malformed JSON message raises WireError with the code that picks its close code."""
    with pytest.raises(WireError) as info:
        decode_client(text, WireFormat.JSON, max_bytes=MAX)
    assert info.value.code is code
    assert isinstance(info.value, CodecError)
    assert isinstance(info.value, ProtocolError)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _deep_struct(levels: int) -> bytes:
    value = b"\x08\x00"
    for _ in range(levels):
        entry = _entry(value)
        value = b"\x2a" + _varint(len(entry)) + entry
    return _entry(value)


def _entry(value: bytes) -> bytes:
    entry = b"\x0a\x01k\x12" + _varint(len(value)) + value
    return b"\x0a" + _varint(len(entry)) + entry


REFUSED_BINARY: list[tuple[bytes, CodecErrorCode]] = [
    (b"", C.UNKNOWN_KIND),
    (b"\x42\x00", C.UNKNOWN_KIND),  # field 8
    (b"\x08\x01", C.WRONG_TYPE),  # kind as a varint
    (b"\x22\x00\x1a\x00", C.WRONG_TYPE),  # ping and unsubscribe
    (b"\x22\x02\x0a", C.MALFORMED_BINARY),  # truncated
    (b"\x22\x05\x0a\x03ab", C.MALFORMED_BINARY),  # length past the end
    (b"\x22\x03\x0a\x01\xff", C.INVALID_ENCODING),
    (b"\x22\x02\x10\x01", C.UNKNOWN_FIELD),
    (b"\x22\x02\x08\x01", C.WRONG_TYPE),  # nonce as a varint
    (b"\x22\x06\x0a\x01a\x0a\x01b", C.DUPLICATE_KEY),
    (b"\x12\x04\x1a\x02\x10" + b"\xff", C.MALFORMED_BINARY),  # truncated varint
    (b"\x12\x0d\x1a\x0b\x10" + b"\xff" * 10, C.MALFORMED_BINARY),  # varint too long
    (b"\x12\x04\x1a\x02\x10\x7f\x00", C.MALFORMED_BINARY),  # resume longer than its parent
    (b"\x22\x02\x0b\x0c", C.MALFORMED_BINARY),  # group wire type
    (b"\x22\x00" * 2, C.WRONG_TYPE),
]


@pytest.mark.parametrize(("data", "code"), REFUSED_BINARY)
def test_malformed_binary_client_message_is_refused(data: bytes, code: CodecErrorCode) -> None:
    """Each malformed binary client message raises WireError with a 4400-class code."""
    with pytest.raises(WireError) as info:
        decode_client(data, WireFormat.PROTO, max_bytes=MAX)
    assert info.value.code is code


def _update_with_document(document: bytes) -> bytes:
    inner = b"\x3a" + _varint(len(document)) + document
    return b"\x12" + _varint(len(inner)) + inner


@pytest.mark.parametrize(
    ("document", "code"),
    [
        (_entry(b"\x11" + b"\x00" * 6 + b"\xf8\x7f"), C.NOT_FINITE),  # NaN
        (_entry(b"\x08\x01"), C.OUT_OF_RANGE),  # NullValue 1
        (_entry(b"\x20\x02"), C.OUT_OF_RANGE),  # bool 2
        (_entry(b""), C.WRONG_TYPE),  # Value without a kind
        (_entry(b"\x08\x00\x20\x01"), C.WRONG_TYPE),  # two kinds
        (_entry(b"\x08\x00") * 2, C.DUPLICATE_KEY),
        (_entry(b"\x3a\x00"), C.UNKNOWN_FIELD),
        (b"\x12\x00", C.UNKNOWN_FIELD),
    ],
)
def test_malformed_struct_is_refused(document: bytes, code: CodecErrorCode) -> None:
    """Struct documents are read strictly: no NaN, no kindless Value, no repeated key."""
    with pytest.raises(WireError) as info:
        decode_server(_update_with_document(document), WireFormat.PROTO, max_bytes=MAX)
    assert info.value.code is code


def test_nesting_limit_is_the_same_in_both_formats() -> None:
    """A document nested MAX_DEPTH - 2 deep (inside message and update) passes, one more fails."""
    for levels, ok in ((MAX_DEPTH - 2, True), (MAX_DEPTH - 1, False)):
        doc: Any = None
        for _ in range(levels):
            doc = {"k": doc}
        frame = UpdateFrame("s", "k", "p", 1, 1, "h", doc)
        for fmt in FORMATS:
            data = encode_server(frame, fmt)
            if ok:
                assert decode_server(data, fmt, max_bytes=MAX) == frame
            else:
                with pytest.raises(WireError) as info:
                    decode_server(data, fmt, max_bytes=MAX)
                assert info.value.code is C.TOO_DEEP
    hostile = _update_with_document(_deep_struct(5000))
    with pytest.raises(WireError) as info:
        decode_server(hostile, WireFormat.PROTO, max_bytes=MAX)
    assert info.value.code is C.TOO_DEEP


@pytest.mark.parametrize("fmt", FORMATS)
def test_wrong_frame_type_and_size(fmt: WireFormat) -> None:
    """Binary on JSON / text on proto is malformed; over max_bytes is too_large (4413)."""
    good = encode_client(Ping("x" * 100), fmt)
    wrong: bytes | str = good.encode() if isinstance(good, str) else good.decode("latin-1")
    with pytest.raises(WireError) as info:
        decode_client(wrong, fmt, max_bytes=MAX)
    assert info.value.code is C.WRONG_TYPE
    with pytest.raises(WireError) as info:
        decode_client(good, fmt, max_bytes=50)
    assert info.value.code is C.TOO_LARGE


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=examples(300))
@given(data=st.binary(max_size=64))
def test_random_bytes_never_raise_anything_but_wire_error(data: bytes) -> None:
    """Arbitrary bytes decode to a frame or raise WireError, on both sides."""
    for decode in (decode_client, decode_server):
        with contextlib.suppress(WireError):
            decode(data, WireFormat.PROTO, max_bytes=MAX)


@settings(max_examples=examples(300))
@given(frame=server_frames, cut=st.integers(min_value=0), flip=st.integers(min_value=0))
def test_mutated_frames_never_raise_anything_but_wire_error(
    frame: ServerFrame, cut: int, flip: int
) -> None:
    """Truncated or bit-flipped valid frames decode to a frame or raise WireError."""
    data = bytearray(_as_bytes(encode_server(frame, WireFormat.PROTO)))
    text = _as_text(encode_server(frame, WireFormat.JSON))
    if data:
        data[flip % len(data)] ^= 1 << (flip % 8)
    for candidate in (bytes(data), bytes(data[: cut % (len(data) + 1)])):
        with contextlib.suppress(WireError):
            decode_server(candidate, WireFormat.PROTO, max_bytes=MAX)
    for candidate_text in (text[: cut % (len(text) + 1)], text.replace('"', "", flip % 3)):
        with contextlib.suppress(WireError):
            decode_server(candidate_text, WireFormat.JSON, max_bytes=MAX)


@given(
    value=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
        ),
        max_leaves=8,
    )
)
def test_arbitrary_json_never_raises_anything_but_wire_error(value: Any) -> None:
    """Any JSON value, wrapped or not in a message kind, decodes or raises WireError."""
    for candidate in (value, {"subscribe": value}, {"update": value}, {"ping": {"nonce": value}}):
        text = json.dumps(candidate)
        for decode in (decode_client, decode_server):
            with contextlib.suppress(WireError):
                decode(text, WireFormat.JSON, max_bytes=MAX)


@pytest.mark.parametrize("max_bytes", [8, 40, MAX])
@pytest.mark.parametrize("where", ["nonce", "key"])
def test_text_holding_a_raw_lone_surrogate_is_refused(where: str, max_bytes: int) -> None:
    """A str that cannot be UTF-8 (a raw lone surrogate) is a WireError at any size limit."""
    text = '{"ping": {"nonce": "a\ud800b"}}' if where == "nonce" else '{"ping": {"a\udfffb": "x"}}'
    with pytest.raises(WireError) as info:
        decode_client(text, WireFormat.JSON, max_bytes=max_bytes)
    assert info.value.code in (C.TOO_LARGE, C.INVALID_ENCODING)


@given(text=st.text(st.characters(categories=["Cs", "L", "N", "P", "S", "Z", "Cc"]), max_size=40))
def test_arbitrary_text_never_raises_anything_but_wire_error(text: str) -> None:
    """Any str (surrogates and control characters included) decodes or raises WireError."""
    for candidate in (text, '{"ping": {"nonce": "' + text + '"}}'):
        for decode in (decode_client, decode_server):
            with contextlib.suppress(WireError):
                decode(candidate, WireFormat.JSON, max_bytes=MAX)
