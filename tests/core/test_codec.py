"""The codec: canonical bytes and hashes, the strict JSON reader and the proto3 JSON reader."""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from oa_sync_core import codec
from oa_sync_core.codec import (
    MAX_DEPTH,
    canonical_json,
    canonical_json_text,
    canonical_timestamp,
    check_json,
    content_hash,
    format_timestamp,
    loads_strict,
    parse_timestamp,
    read_message,
)
from oa_sync_core.contracts import v1
from oa_sync_core.errors import CodecError, CodecErrorCode

from tests.profiles import examples

BIG = 1 << 20
PROPERTY = settings(max_examples=examples(50), deadline=None)
"""Enough examples to find encoding corner cases; the suite has a time budget."""

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64)
    | st.text(alphabet=st.characters(codec="utf-8"), max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(alphabet=st.characters(codec="utf-8"), max_size=6), children)
    ),
    max_leaves=20,
)


def _code(data: bytes | str, *, max_bytes: int = BIG) -> CodecErrorCode:
    with pytest.raises(CodecError) as info:
        loads_strict(data, max_bytes=max_bytes)
    return info.value.code


# --- canonical bytes and hashes ---------------------------------------------------------------


GOLDEN = [
    ({}, b"{}", "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"),
    (
        {"c": {"z": "2", "y": ""}, "b": 1, "a": [True, None, "é"]},
        b'{"a":[true,null,"\xc3\xa9"],"b":1,"c":{"y":"","z":"2"}}',
        "3421b7f44d0ba823c2c3935f7575435057f7993fb163063f3f6b524821b49e00",
    ),
    (
        {"status": "RUNNING", "runId": "r1"},
        b'{"runId":"r1","status":"RUNNING"}',
        "4a0dc17b25fbe48ca6e5a2a1c66a783b0fba1f88d685986e06c0c59f03ada4b2",
    ),
]


@pytest.mark.parametrize(("value", "expected", "digest"), GOLDEN)
def test_golden_canonical_bytes_and_hashes(value: Any, expected: bytes, digest: str) -> None:
    """Pinned values encode to pinned bytes and hashes: sorted keys, no spaces, raw UTF-8."""
    assert canonical_json(value) == expected
    assert content_hash(expected) == digest


@PROPERTY
@given(json_values)
def test_canonical_json_is_stable_and_sorted(value: Any) -> None:
    """Canonical bytes parse back to the value, re-encode identically and have sorted keys."""
    encoded = canonical_json(value)
    decoded = json.loads(encoded)
    assert decoded == value
    assert canonical_json(decoded) == encoded
    assert content_hash(encoded) == hashlib.sha256(encoded).hexdigest()
    assert encoded.decode("utf-8") == json.dumps(
        decoded, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )

    def keys_sorted(item: Any) -> bool:
        if isinstance(item, dict):
            return list(item) == sorted(item) and all(keys_sorted(v) for v in item.values())
        if isinstance(item, list):
            return all(keys_sorted(v) for v in item)
        return True

    assert keys_sorted(json.loads(encoded, object_pairs_hook=dict))


@PROPERTY
@given(st.dictionaries(st.text(max_size=4), st.integers(), max_size=6), st.randoms())
def test_canonical_json_ignores_insertion_order(value: dict[str, int], rnd: Any) -> None:
    """Two dicts with the same items in any order give the same bytes."""
    items = list(value.items())
    rnd.shuffle(items)
    assert canonical_json(dict(items)) == canonical_json(value)


def test_canonical_json_refuses_non_finite_floats() -> None:
    """NaN and infinities have no canonical form."""
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ValueError, match="JSON"):
            canonical_json({"x": bad})


json_texts_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**80), 2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(codec="utf-8"), max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(alphabet=st.characters(codec="utf-8"), max_size=6), children)
    ),
    max_leaves=20,
)


@PROPERTY
@given(json_texts_values, st.booleans(), st.booleans())
def test_canonical_json_text_equals_the_definition(
    value: Any, spaced: bool, ascii_only: bool
) -> None:
    """The canonical bytes of a JSON text (with or without spaces and escapes, integers past
    64 bits, floats) are exactly ``canonical_json(json.loads(text))``."""
    separators = (", ", ": ") if spaced else (",", ":")
    text = json.dumps(value, separators=separators, ensure_ascii=ascii_only)
    expected = canonical_json(json.loads(text))
    assert canonical_json_text(text) == expected
    assert canonical_json_text(text.encode("utf-8")) == expected


@pytest.mark.parametrize(
    "text",
    [
        b'{"b": 123456789012345678901234567890, "a": -9223372036854775809}',
        b'{"x": [1.0, 2.50, 1e-7, 18446744073709551615]}',
        b'{"a": 1, "a": 2}',
        b'{"s": "\\u00e9\\n\\"", "n": null, "t": true}',
    ],
)
def test_canonical_json_text_corner_cases(text: bytes) -> None:
    """Big integers, floats, duplicate keys, escapes and null agree with the definition."""
    assert canonical_json_text(text) == canonical_json(json.loads(text))


def test_canonical_json_text_refuses_what_the_definition_refuses() -> None:
    """Text that is not JSON, or holds a number beyond double range, raises ValueError."""
    for bad in (b"1e400", b'{"x": NaN}', b"{", b"\xff"):
        with pytest.raises(ValueError, match=r"JSON|Expecting|decode"):
            canonical_json_text(bad)


# --- loads_strict -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "code"),
    [
        ("[1, NaN]", CodecErrorCode.NOT_FINITE),
        ("Infinity", CodecErrorCode.NOT_FINITE),
        ('{"x": -Infinity}', CodecErrorCode.NOT_FINITE),
        ("1e400", CodecErrorCode.NOT_FINITE),
        ('{"a": 1, "a": 2}', CodecErrorCode.DUPLICATE_KEY),
        ('{"o": {"k": 1, "k": 1}}', CodecErrorCode.DUPLICATE_KEY),
        ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), CodecErrorCode.TOO_DEEP),
        ('{"a":' * (MAX_DEPTH + 1) + "1" + "}" * (MAX_DEPTH + 1), CodecErrorCode.TOO_DEEP),
        ("[" * 100_000 + "]" * 100_000, CodecErrorCode.TOO_DEEP),
        ('"\\ud800"', CodecErrorCode.INVALID_ENCODING),
        ('["ok", "\\udfff"]', CodecErrorCode.INVALID_ENCODING),
        ('{"\\ud83d": 1}', CodecErrorCode.INVALID_ENCODING),
        (b'"\xff"', CodecErrorCode.INVALID_ENCODING),
        (b'"\xc3"', CodecErrorCode.INVALID_ENCODING),
        (b'"\xed\xa0\x80"', CodecErrorCode.INVALID_ENCODING),  # a surrogate encoded as UTF-8
        ("1" + "0" * 5000, CodecErrorCode.MALFORMED_JSON),  # int() refuses > 4300 digits
        ("[1,]", CodecErrorCode.MALFORMED_JSON),
        ("{'a': 1}", CodecErrorCode.MALFORMED_JSON),
        ("[1] [2]", CodecErrorCode.MALFORMED_JSON),
        ("", CodecErrorCode.MALFORMED_JSON),
    ],
)
def test_loads_strict_refuses_with_its_code(data: bytes | str, code: CodecErrorCode) -> None:
    """Each kind of hostile or ambiguous JSON is refused with its own error code."""
    assert _code(data) == code


def test_loads_strict_depth_limit_is_inclusive() -> None:
    """Exactly MAX_DEPTH levels of nesting parse; one more does not."""
    deepest = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert loads_strict(deepest, max_bytes=BIG) is not None
    assert loads_strict("[[1]]", max_bytes=BIG, max_depth=2) == [[1]]
    with pytest.raises(CodecError) as info:
        loads_strict("[[[1]]]", max_bytes=BIG, max_depth=2)
    assert info.value.code is CodecErrorCode.TOO_DEEP


def test_loads_strict_size_limit_counts_utf8_bytes() -> None:
    """The size limit is in UTF-8 bytes, for bytes and text alike, and is inclusive."""
    assert loads_strict('"é"', max_bytes=4) == "é"  # 4 bytes: quote, 2-byte char, quote
    assert loads_strict('"é"'.encode(), max_bytes=4) == "é"
    assert _code('"é"', max_bytes=3) is CodecErrorCode.TOO_LARGE
    assert _code('"é"'.encode(), max_bytes=3) is CodecErrorCode.TOO_LARGE
    assert _code("[" + "1," * 1000 + "1]", max_bytes=1000) is CodecErrorCode.TOO_LARGE


def test_loads_strict_text_with_a_lone_surrogate_is_a_codec_error_at_any_size() -> None:
    """Measuring text that holds a lone surrogate raises CodecError, never UnicodeEncodeError."""
    assert _code('"\ud800"', max_bytes=5) is CodecErrorCode.INVALID_ENCODING
    assert _code('"\ud800' + "x" * 10 + '"', max_bytes=5) is CodecErrorCode.TOO_LARGE


def test_loads_strict_accepts_plain_json() -> None:
    """Ordinary JSON, big integers within the digit limit and non-BMP text parse normally."""
    assert loads_strict(b'{"a": [1, 2.5, true, null, "\\ud83d\\ude00"]}', max_bytes=BIG) == {
        "a": [1, 2.5, True, None, "\U0001f600"]
    }
    assert loads_strict("18446744073709551616", max_bytes=BIG) == 2**64


@PROPERTY
@given(json_values)
def test_loads_strict_round_trips_canonical_bytes(value: Any) -> None:
    """Whatever canonical_json writes, loads_strict reads back unchanged (within depth)."""
    assert loads_strict(canonical_json(value), max_bytes=BIG) == value


def _answer(read: Any, text: str) -> tuple[str, Any]:
    """What a reader answers: ("ok", value with its types) or ("error", code)."""
    try:
        value = read(text)
    except CodecError as exc:
        return ("error", exc.code)
    return ("ok", json.dumps(value, sort_keys=True) + repr(_types(value)))


def _types(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _types(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_types(v) for v in value]
    return type(value).__name__


_KEYS = st.sampled_from(["a", "b", "a:b", 'q":', "\\", "é", "k", ""])
_SCALARS = st.sampled_from(
    [
        "1",
        "-0",
        "0.5",
        "1e2",
        "1E400",
        "18446744073709551616",
        "-9223372036854775809",
        "123456789012345678901234567890",
        "true",
        "null",
        '"x"',
        '"a\\":1"',
        '"\\ud800"',
        '"t:12:00"',
        "NaN",
        "Infinity",
        '"\\u0000"',
    ]
)
_SPACES = st.sampled_from(["", " ", "\n", "\t", "\r\n  "])


@st.composite
def _json_texts(draw: st.DrawFn, depth: int = 0) -> str:
    """JSON-like text built token by token: duplicate keys, escaped quotes before colons,
    JSON whitespace around separators, numbers orjson and the reference read differently."""
    if depth >= 3 or draw(st.integers(0, 3)) == 0:
        return draw(_SCALARS)
    space = draw(_SPACES)
    if draw(st.booleans()):
        items = draw(st.lists(st.deferred(lambda: _json_texts(depth + 1)), max_size=4))
        return "[" + space + ("," + space).join(items) + "]"
    members = draw(
        st.lists(st.tuples(_KEYS, st.deferred(lambda: _json_texts(depth + 1))), max_size=4)
    )
    return "{" + ",".join(f'{space}"{k}"{space}:{space}{v}' for k, v in members) + space + "}"


@settings(max_examples=examples(400), deadline=None)
@given(_json_texts(), st.integers(0, 40), st.sampled_from(["", "}", ":", '"', ",", "\ufeff"]))
def test_loads_strict_answers_as_the_reference_reader(text: str, at: int, insert: str) -> None:
    """The orjson path accepts and refuses exactly what the standard library's reader does,
    with the same value (types included) or the same error code, for well-formed and for
    broken texts (a character inserted anywhere)."""
    for sample in (text, text[:at] + insert + text[at:]):
        fast = _answer(lambda t: loads_strict(t, max_bytes=BIG), sample)
        reference = _answer(lambda t: codec._loads_reference(t, MAX_DEPTH), sample)
        assert fast == reference, sample


def test_loads_strict_takes_the_fast_path_for_plain_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request without duplicates, floats or escaped quotes before colons never reaches the
    reference reader (the speed the append path relies on); one with a duplicate does."""
    calls: list[str] = []
    reference = codec._loads_reference

    def counting(text: str, max_depth: int) -> Any:
        calls.append(text)
        return reference(text, max_depth)

    monkeypatch.setattr(codec, "_loads_reference", counting)
    plain = json.dumps({"events": [{"streamId": "run:r1", "payload": {"at": "12:00:00Z"}}] * 3})
    assert loads_strict(plain, max_bytes=BIG) == json.loads(plain)
    assert calls == []
    assert _code('{"a": 1, "b": {"a": 2, "a": 3}}') is CodecErrorCode.DUPLICATE_KEY
    assert len(calls) == 1


@PROPERTY
@given(st.one_of(st.binary(max_size=64), st.text(max_size=64)))
def test_loads_strict_raises_only_codec_errors(data: bytes | str) -> None:
    """Arbitrary bytes or text either parse like json.loads or raise CodecError, nothing else."""
    try:
        value = loads_strict(data, max_bytes=48)
    except CodecError:
        return
    assert value == json.loads(data)


@PROPERTY
@given(
    st.lists(
        st.sampled_from(
            ['{"a":', "[", "]", "}", ",", "1", '"x"', "NaN", "1e999", "-", '"\\ud800"']
        ),
        max_size=20,
    ).map("".join)
)
def test_loads_strict_on_json_shaped_noise(text: str) -> None:
    """JSON-shaped fragments parse or raise CodecError, never another exception."""
    with contextlib.suppress(CodecError):
        loads_strict(text, max_bytes=BIG, max_depth=3)


def test_check_json_refuses_non_json_values() -> None:
    """check_json names the path of a tuple, bytes, a non-string key, NaN, depth or surrogate."""
    cases: list[tuple[Any, CodecErrorCode, str]] = [
        ({"a": (1, 2)}, CodecErrorCode.WRONG_TYPE, "a"),
        ({"a": [b"x"]}, CodecErrorCode.WRONG_TYPE, "a[0]"),
        ({"a": {1: 2}}, CodecErrorCode.WRONG_TYPE, "a"),
        ({"a": float("nan")}, CodecErrorCode.NOT_FINITE, "a"),
        ({"a": "\ud800"}, CodecErrorCode.INVALID_ENCODING, "a"),
        ([[[1]]], CodecErrorCode.TOO_DEEP, "[0][0]"),
    ]
    for value, code, path in cases:
        with pytest.raises(CodecError) as info:
            check_json(value, max_depth=2)
        assert (info.value.code, info.value.path) == (code, path)
    check_json({"a": [1, 2.5, None, True, "x"]})


# --- timestamps -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("2026-01-01T00:00:00Z", "2026-01-01T00:00:00Z"),
        ("2026-01-01t00:00:00z", "2026-01-01T00:00:00Z"),
        ("2026-01-01T01:30:00+01:30", "2026-01-01T00:00:00Z"),
        ("2025-12-31T00:01:00-23:59", "2026-01-01T00:00:00Z"),
        ("2025-12-31T19:00:00.5-05:00", "2026-01-01T00:00:00.500Z"),
        ("2026-01-01T00:00:00.000001Z", "2026-01-01T00:00:00.000001Z"),
        ("2026-01-01T00:00:00.123456789Z", "2026-01-01T00:00:00.123456789Z"),
        ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00Z"),
        ("9999-12-31T23:59:59Z", "9999-12-31T23:59:59Z"),
    ],
)
def test_timestamps_normalise_to_utc_z(text: str, canonical: str) -> None:
    """RFC 3339 timestamps normalise to UTC with 0, 3, 6 or 9 fractional digits."""
    assert format_timestamp(*parse_timestamp(text)) == canonical


@pytest.mark.parametrize(
    "text",
    ["2026-01-01", "2026-01-01T00:00:00", "2026-13-01T00:00:00Z", "0000-12-31T23:59:59Z",
     "0001-01-01T00:00:00+00:01", "2026-01-01T00:00:00.1234567890Z", " 2026-01-01T00:00:00Z",
     "2026-01-01T00:00:00+24:00", "2026-01-01T00:00:00+99:99", "2026-01-01T00:00:00-00:60",
     "2026-01-01T24:00:00Z", "2026-01-01T00:00:60Z", "2026-02-29T00:00:00Z"],
)  # fmt: skip
def test_timestamps_refuse_malformed_or_out_of_range(text: str) -> None:
    """Missing zone, bad fields, more than 9 digits and instants outside the range are refused."""
    with pytest.raises(ValueError, match=r"timestamp|Timestamp|range|month"):
        parse_timestamp(text)


# --- read_message -----------------------------------------------------------------------------


def test_read_message_accepts_both_name_forms_and_normalises() -> None:
    """lowerCamelCase and proto names are both accepted; output is canonical proto3 JSON."""
    camel = read_message(v1.RunStep, {"runId": "r1", "stepIndex": 2, "progressPercent": 0})
    snake = read_message(v1.RunStep, {"run_id": "r1", "step_index": 2.0, "progress_percent": 0})
    assert camel == snake == {"runId": "r1", "stepIndex": 2}
    resume = read_message(v1.ResumeFrom, {"epoch": "e", "watermark": 12})
    assert resume == {"epoch": "e", "watermark": "12"}
    assert read_message(v1.ResumeFrom, {"watermark": "0", "epoch": None}) == {}
    stamped = read_message(
        v1.RunStarted, {"run_id": "r1", "occurred_at": "2026-01-01T01:00:00+01:00"}
    )
    assert stamped == {"runId": "r1", "occurredAt": "2026-01-01T00:00:00Z"}
    status = read_message(v1.RunSummaryProjection, {"status": 2})
    assert status == {"status": "RUNNING"}
    assert read_message(v1.RunSummaryProjection, {"status": "STATUS_UNSPECIFIED"}) == {}


def test_read_message_keeps_explicit_optional_and_oneof_and_messages() -> None:
    """Presence matters for optional fields, oneof members and message fields."""
    assert read_message(v1.AppendEvent, {"expectedSeq": 0}) == {"expectedSeq": "0"}
    assert read_message(v1.ClientMessage, {"ping": {}}) == {"ping": {}}
    assert read_message(v1.RunFailed, {"runId": "r", "error": {}}) == {"runId": "r", "error": {}}
    assert read_message(v1.Subscribe, {"topics": []}) == {}


@pytest.mark.parametrize(
    ("cls", "obj", "code", "path"),
    [
        (v1.RunStep, {"runId": "r1", "colour": "red"}, CodecErrorCode.UNKNOWN_FIELD, "colour"),
        (v1.RunStep, {"RunId": "r1"}, CodecErrorCode.UNKNOWN_FIELD, "RunId"),
        (v1.RunStep, {"runId": 1}, CodecErrorCode.WRONG_TYPE, "runId"),
        (v1.RunStep, {"stepIndex": "x"}, CodecErrorCode.WRONG_TYPE, "stepIndex"),
        (v1.RunStep, {"stepIndex": 1.5}, CodecErrorCode.WRONG_TYPE, "stepIndex"),
        (v1.RunStep, {"stepIndex": True}, CodecErrorCode.WRONG_TYPE, "stepIndex"),
        (v1.RunStep, {"stepIndex": "01"}, CodecErrorCode.WRONG_TYPE, "stepIndex"),
        (v1.RunStep, {"stepIndex": -1}, CodecErrorCode.OUT_OF_RANGE, "stepIndex"),
        (v1.RunStep, {"stepIndex": 2**32}, CodecErrorCode.OUT_OF_RANGE, "stepIndex"),
        (v1.ResumeFrom, {"watermark": str(2**63)}, CodecErrorCode.OUT_OF_RANGE, "watermark"),
        (v1.ResumeFrom, {"watermark": "1" * 25}, CodecErrorCode.WRONG_TYPE, "watermark"),
        (v1.ResumeFrom, {"watermark": 10**30}, CodecErrorCode.OUT_OF_RANGE, "watermark"),
        (v1.RunStep, {"runId": "r", "run_id": "r"}, CodecErrorCode.DUPLICATE_KEY, "run_id"),
        (v1.RunStarted, {"occurredAt": "yesterday"}, CodecErrorCode.WRONG_TYPE, "occurredAt"),
        (v1.RunStarted, {"occurredAt": 0}, CodecErrorCode.WRONG_TYPE, "occurredAt"),
        (v1.RunFailed, {"error": "boom"}, CodecErrorCode.WRONG_TYPE, "error"),
        (v1.RunFailed, {"error": {"cause": "x"}}, CodecErrorCode.UNKNOWN_FIELD, "error.cause"),
        (v1.Subscribe, {"topics": "a"}, CodecErrorCode.WRONG_TYPE, "topics"),
        (v1.Subscribe, {"topics": ["a", 2]}, CodecErrorCode.WRONG_TYPE, "topics[1]"),
        (v1.RunSummaryProjection, {"status": "DONE"}, CodecErrorCode.OUT_OF_RANGE, "status"),
        (v1.RunSummaryProjection, {"status": 99}, CodecErrorCode.OUT_OF_RANGE, "status"),
        (v1.RunSummaryProjection, {"status": True}, CodecErrorCode.WRONG_TYPE, "status"),
        (v1.ClientMessage, {"ping": {}, "unsubscribe": {}}, CodecErrorCode.WRONG_TYPE,
         "unsubscribe"),
        (v1.AppendEvent, {"payload": []}, CodecErrorCode.WRONG_TYPE, "payload"),
        (v1.RunStep, [], CodecErrorCode.WRONG_TYPE, "RunStep"),
    ],
)  # fmt: skip
def test_read_message_refuses_with_code_and_path(
    cls: type[Any], obj: Any, code: CodecErrorCode, path: str
) -> None:
    """Unknown fields, wrong types and out-of-range values are refused, naming the field."""
    with pytest.raises(CodecError) as info:
        read_message(cls, obj)
    assert (info.value.code, info.value.path) == (code, path)


def test_read_message_paths_are_prefixed() -> None:
    """Nested errors carry the caller's prefix, so a server can say where in a frame it was."""
    with pytest.raises(CodecError) as info:
        read_message(v1.ClientMessage, {"subscribe": {"topics": [1]}}, path="frame")
    assert info.value.path == "frame.subscribe.topics[0]"
    assert info.value.code is CodecErrorCode.WRONG_TYPE


_ANY_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(_ANY_JSON)
def test_canonical_json_fast_path_writes_the_reference_bytes(value: Any) -> None:
    """canonical_json (orjson when safe) equals the json.dumps definition on arbitrary JSON,
    floats, huge integers and odd text included."""
    reference = json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")
    assert canonical_json(value) == reference


def _holds_float(value: Any) -> bool:
    if isinstance(value, float):
        return True
    if isinstance(value, dict):
        return any(_holds_float(v) for v in value.values())
    if isinstance(value, list):
        return any(_holds_float(v) for v in value)
    return False


@settings(max_examples=600, deadline=None)
@given(_ANY_JSON | st.floats(allow_nan=False, allow_infinity=False))
def test_the_float_probe_never_misses_a_float(value: Any) -> None:
    """Whatever holds a float is sent to the reference path: orjson spells some floats
    differently, so a float the probe missed would change canonical bytes. (Text that merely
    looks like a float may take the reference path too; that costs time, not bytes.)"""
    try:
        fast = orjson.dumps(value, option=codec._ORJSON_OPTIONS)
    except TypeError:  # big integers, lone surrogates: the reference path anyway
        return
    if _holds_float(value):
        assert codec._may_hold_float(fast)


@pytest.mark.parametrize(
    ("fast", "held"),
    [
        (b'{"at":"2026-12-04T22:47:02.123456Z","n":3}', False),
        (b'{"v":"1.2.3","x":[1,2,3],"e":"0e9f"}', False),
        (b"[1.5]", True),
        (b'{"a":-2.5e+300}', True),
        (b"1e-7", True),
        (b'{"s":"x:1.5,y"}', True),  # looks like one: the reference path, same bytes
    ],
)
def test_the_float_probe_on_known_texts(fast: bytes, held: bool) -> None:
    """Timestamps with fractions (every run summary has three) no longer look like floats."""
    assert codec._may_hold_float(fast) is held


@pytest.mark.parametrize("value", [float("nan"), {"a": [float("inf")]}, {"x": "\ud800"}])
def test_canonical_json_still_refuses_what_the_reference_refuses(value: Any) -> None:
    """Non-finite numbers and lone surrogates raise ValueError on the fast path as before."""
    with pytest.raises(ValueError):  # noqa: PT011 - the reference's own error types
        canonical_json(value)


_STAMP = st.builds(
    "{:04d}-{:02d}-{:02d}{}{:02d}:{:02d}:{:02d}{}{}".format,
    st.integers(0, 9999),
    st.integers(0, 13),
    st.integers(0, 32),
    st.sampled_from("Tt"),
    st.integers(0, 24),
    st.integers(0, 60),
    st.integers(0, 60),
    st.sampled_from(["", ".0", ".000", ".5", ".120000", ".123456", ".000001", ".123456789"]),
    st.sampled_from(["Z", "z", "+00:00", "-05:30", "+24:00"]),
)


@settings(max_examples=500, deadline=None)
@given(_STAMP)
def test_canonical_timestamp_agrees_with_parse_and_format(text: str) -> None:
    """The UTC fast path gives format_timestamp(parse_timestamp(t)) or the same ValueError."""
    try:
        expected: str | None = format_timestamp(*parse_timestamp(text))
    except ValueError as exc:
        expected = None
        message = str(exc)
    if expected is None:
        with pytest.raises(ValueError) as caught:  # noqa: PT011 - the message is compared below
            canonical_timestamp(text)
        assert str(caught.value) == message
    else:
        assert canonical_timestamp(text) == expected
