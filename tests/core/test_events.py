"""Events: validation refuses bad input before anything is written; the memory log appends."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from oa_sync_core.codec import canonical_json
from oa_sync_core.errors import ConcurrencyError, EventValidationError
from oa_sync_core.events import (
    MAX_PAYLOAD_BYTES,
    Event,
    NewEvent,
    _plain_bytes,
    validate_new_event,
)
from oa_sync_core.memory import MemoryEventLog
from oa_sync_core.testing import (
    FIXED_EPOCH,
    FixedClock,
    event_sequences,
    new_event,
    record_events,
)

from tests.profiles import examples


def _ev(stream_id: str = "run:r1", type_: str = "run.started", **payload: Any) -> NewEvent:
    return NewEvent(stream_id=stream_id, type=type_, payload=payload or {"runId": "r1"})


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


BAD_EVENTS: list[tuple[str, NewEvent, str]] = [
    ("no kind", _ev(stream_id="r1"), "stream_id"),
    ("empty id", _ev(stream_id="run:"), "stream_id"),
    ("space", _ev(stream_id="run:r 1"), "stream_id"),
    ("NUL in stream", _ev(stream_id="run:r\x001"), "stream_id"),
    ("slash kind", _ev(stream_id="a/b:r1"), "stream_id"),
    ("too long id", _ev(stream_id="run:" + "r" * 201), "stream_id"),
    ("non-str stream", NewEvent(stream_id=1, type="x.y", payload={}), "stream_id"),  # type: ignore[arg-type]
    ("upper type", _ev(type_="Run.Started"), "type"),
    ("undotted type", _ev(type_="started"), "type"),
    ("trailing dot", _ev(type_="run."), "type"),
    ("long type", _ev(type_="a." + "b" * 100), "type"),
    ("non-str type", NewEvent(stream_id="run:r1", type=None, payload={}), "type"),  # type: ignore[arg-type]
    ("mismatched runId", _ev(runId="r2"), "payload.runId"),
    ("missing runId", _ev(stream_id="run:r1", type_="run.step", stepIndex=1), "payload.runId"),
    ("run type on worker stream", _ev(stream_id="worker:r1", runId="r1"), "stream_id"),
    ("worker type on run stream", _ev(type_="worker.started", workerId="r1"), "stream_id"),
    ("unknown field", _ev(runId="r1", colour="red"), "payload.colour"),
    ("wrong type", _ev(runId="r1", workerId=7), "payload.workerId"),
    ("NUL in known payload", _ev(runId="r1", workerId="w\x00"), "payload"),
    ("NUL in unknown payload", _ev(type_="run.annotated", note="a\x00b"), "payload"),
    ("NUL in unknown key", NewEvent(stream_id="a:b", type="a.b", payload={"k\x00": 1}), "payload"),
    ("lone surrogate", _ev(type_="run.annotated", note="\ud800"), "payload.note"),
    ("NaN", _ev(type_="run.annotated", note=float("nan")), "payload.note"),
    ("tuple", _ev(type_="run.annotated", note=(1, 2)), "payload.note"),
    ("too deep", _ev(type_="run.annotated", note=_nested(32)), "payload.note" + "[0]" * 31),
    ("oversize", _ev(type_="run.annotated", note="x" * MAX_PAYLOAD_BYTES), "payload"),
    ("payload list", NewEvent(stream_id="run:r1", type="a.b", payload=[]), "payload"),  # type: ignore[arg-type]
    ("negative seq", dataclasses.replace(_ev(), expected_seq=-1), "expected_seq"),
    ("bool seq", dataclasses.replace(_ev(), expected_seq=True), "expected_seq"),
    ("str seq", dataclasses.replace(_ev(), expected_seq="1"), "expected_seq"),  # type: ignore[arg-type]
    ("empty key", dataclasses.replace(_ev(), idempotency_key=""), "idempotency_key"),
    ("long key", dataclasses.replace(_ev(), idempotency_key="k" * 201), "idempotency_key"),
    ("NUL key", dataclasses.replace(_ev(), idempotency_key="a\x00"), "idempotency_key"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "event", "field"), BAD_EVENTS, ids=[c[0] for c in BAD_EVENTS])
def test_validate_new_event_refuses_and_names_the_field(
    case: str, event: NewEvent, field: str
) -> None:
    """Each malformed event is refused with an EventValidationError naming the field."""
    with pytest.raises(EventValidationError) as info:
        validate_new_event(event, index=3)
    assert info.value.field == field, case
    assert info.value.index == 3
    assert str(info.value).startswith("event 3: ")


@pytest.mark.parametrize(("case", "event", "field"), BAD_EVENTS, ids=[c[0] for c in BAD_EVENTS])
async def test_a_bad_event_leaves_the_memory_log_unchanged(
    case: str, event: NewEvent, field: str
) -> None:
    """A batch holding one bad event writes nothing, not even the good events before it."""
    log = MemoryEventLog(clock=FixedClock())
    await log.append([new_event("run.created", "r0")])
    before = list(log.events)
    with pytest.raises(EventValidationError) as info:
        await log.append([new_event("run.created", "r1"), event])
    assert info.value.index == 1
    assert log.events == before
    assert await log.append([new_event("run.started", "r1", expected_seq=0)]) == [2]


def test_validate_normalises_payload_to_canonical_proto3_json() -> None:
    """Snake-case names, numeric int64, default values and offsets normalise canonically."""
    event = validate_new_event(
        NewEvent(
            stream_id="worker:w1",
            type="worker.request_completed",
            payload={
                "worker_id": "w1",
                "durationMs": 1500,
                "requestId": "",
                "occurredAt": "2026-01-01T02:00:00.250+02:00",
            },
        )
    )
    assert event.payload == {
        "workerId": "w1",
        "durationMs": "1500",
        "occurredAt": "2026-01-01T00:00:00.250Z",
    }


def test_unknown_types_need_only_a_json_object() -> None:
    """An event type no projector knows is accepted with any plain JSON object payload."""
    payload = {"anything": [1, "two", None, {"x": True}], "0": 1.5}
    event = validate_new_event(NewEvent(stream_id="audit:a1", type="audit.note", payload=payload))
    assert event.payload == payload


async def test_recorded_payloads_do_not_alias_the_callers_dict() -> None:
    """Mutating a payload after appending it changes nothing in the log, for any type."""
    log = MemoryEventLog(clock=FixedClock())
    unknown: dict[str, Any] = {"note": {"a": [1]}}
    known: dict[str, Any] = {"workerId": "w1", "error": {"code": "x"}}
    await log.append(
        [
            NewEvent(stream_id="audit:a1", type="audit.note", payload=unknown),
            NewEvent(stream_id="worker:w1", type="worker.failed", payload=known),
        ]
    )
    unknown["note"]["a"].append(2)
    unknown["extra"] = True
    known["error"]["code"] = "y"
    assert [e.payload for e in log.events] == [
        {"note": {"a": [1]}},
        {"workerId": "w1", "error": {"code": "x"}},
    ]


def test_payload_size_limit_is_inclusive() -> None:
    """A payload whose canonical bytes are exactly the limit is accepted."""
    overhead = len(b'{"n":""}')
    note = "x" * (MAX_PAYLOAD_BYTES - overhead)
    validate_new_event(NewEvent(stream_id="a:b", type="a.b", payload={"n": note}))


@settings(max_examples=examples(30), deadline=None)
@given(event_sequences(max_size=10))
def test_validation_is_idempotent(events: list[NewEvent]) -> None:
    """Validating an already validated event returns an equal event."""
    for event in events:
        assert validate_new_event(event) == event


def test_event_checks_its_own_fields() -> None:
    """Recorded events need a positive position and seq and an aware timestamp."""
    good: dict[str, Any] = {
        "position": 1,
        "stream_id": "run:r1",
        "stream_seq": 1,
        "type": "run.started",
        "payload": {},
        "recorded_at": FIXED_EPOCH,
    }
    Event(**good)
    for change in ({"position": 0}, {"stream_seq": 0}, {"recorded_at": dt.datetime(2026, 1, 1)}):
        with pytest.raises(ValueError, match=r"position|stream_seq|timezone"):
            Event(**(good | change))


async def test_memory_log_assigns_positions_and_stream_seqs() -> None:
    """Positions are global and increasing; stream_seq counts per stream from 1."""
    clock = FixedClock(step=dt.timedelta(seconds=1))
    log = MemoryEventLog(clock=clock)
    assert await log.append(
        [new_event("run.created", "r1"), new_event("worker.started", "w1")]
    ) == [1, 2]
    assert await log.append([new_event("run.started", "r1")]) == [3]
    assert [(e.position, e.stream_id, e.stream_seq) for e in log.events] == [
        (1, "run:r1", 1),
        (2, "worker:w1", 1),
        (3, "run:r1", 2),
    ]
    # One batch shares one recorded_at.
    assert log.events[0].recorded_at == log.events[1].recorded_at == FIXED_EPOCH
    assert log.events[2].recorded_at == FIXED_EPOCH + dt.timedelta(seconds=1)
    assert [e.position for e in await log.read_after(1, 10)] == [2, 3]
    batches = [[e.position for e in b] async for b in log.batches(batch_size=2)]
    assert batches == [[1, 2], [3]]


async def test_memory_log_idempotency_keys_return_the_original_position() -> None:
    """A repeated idempotency key, in a later batch or the same one, writes nothing new."""
    log = MemoryEventLog(clock=FixedClock())
    first = await log.append([new_event("run.created", "r1", idempotency_key="k1")])
    again = await log.append(
        [
            new_event("run.created", "r1", idempotency_key="k1"),
            new_event("run.started", "r1", idempotency_key="k2"),
            new_event("run.started", "r1", idempotency_key="k2"),
        ]
    )
    assert first == [1]
    assert again == [1, 2, 2]
    assert len(log.events) == 2


async def test_memory_log_expected_seq_conflict_is_atomic() -> None:
    """A stale expected_seq raises ConcurrencyError and nothing in the batch is written."""
    log = MemoryEventLog(clock=FixedClock())
    await log.append([new_event("run.created", "r1", expected_seq=0)])
    with pytest.raises(ConcurrencyError) as info:
        await log.append(
            [new_event("run.created", "r2"), new_event("run.started", "r1", expected_seq=0)]
        )
    assert (info.value.stream_id, info.value.expected_seq, info.value.actual_seq) == (
        "run:r1",
        0,
        1,
    )
    assert len(log.events) == 1
    assert await log.append([new_event("run.started", "r1", expected_seq=1)]) == [2]
    # A conflict is checked against seqs planned earlier in the same batch.
    assert await log.append(
        [new_event("run.step", "r1", expected_seq=2), new_event("run.step", "r1", expected_seq=3)]
    ) == [3, 4]


@settings(max_examples=examples(30), deadline=None)
@given(st.lists(st.sampled_from(["r1", "r2", "w1"]), max_size=12))
async def test_memory_log_stream_seqs_are_gap_free(idents: list[str]) -> None:
    """Within every stream, stream_seq is 1, 2, 3... in log order."""
    log = MemoryEventLog(clock=FixedClock())
    for ident in idents:
        kind = "worker" if ident.startswith("w") else "run"
        await log.append(
            [new_event(f"{kind}.{'heartbeat' if kind == 'worker' else 'step'}", ident)]
        )
    seen: dict[str, list[int]] = {}
    for event in log.events:
        seen.setdefault(event.stream_id, []).append(event.stream_seq)
    for seqs in seen.values():
        assert seqs == list(range(1, len(seqs) + 1))


def test_testing_helpers_record_like_a_log() -> None:
    """FixedClock ticks by its step; record_events numbers positions and per-stream seqs."""
    with pytest.raises(ValueError, match="timezone-aware"):
        FixedClock(dt.datetime(2026, 1, 1))
    clock = FixedClock(step=dt.timedelta(seconds=2))
    assert [clock(), clock()] == [FIXED_EPOCH, FIXED_EPOCH + dt.timedelta(seconds=2)]
    assert clock.advance(dt.timedelta(seconds=1)) == FIXED_EPOCH + dt.timedelta(seconds=5)
    events = record_events(
        [
            new_event("run.created", "r1"),
            new_event("worker.started", "w1"),
            new_event("run.step", "r1"),
        ],
        start_position=10,
        position_step=5,
    )
    assert [(e.position, e.stream_seq) for e in events] == [(10, 1), (15, 1), (20, 2)]
    assert [e.recorded_at.second for e in events] == [0, 1, 2]
    with pytest.raises(EventValidationError):
        new_event("run.step", "r1", stepIndex=-1)


def test_event_from_log_equals_the_checked_constructor() -> None:
    """Event.from_log builds the same frozen value as Event(...), without the checks."""
    at = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    fields = {
        "position": 7,
        "stream_id": "run:r1",
        "stream_seq": 2,
        "type": "run.started",
        "payload": {"runId": "r1"},
        "recorded_at": at,
    }
    fast = Event.from_log(7, "run:r1", 2, "run.started", {"runId": "r1"}, at)
    assert fast == Event(**fields)  # type: ignore[arg-type]
    assert repr(fast) == repr(Event(**fields))  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.position = 8  # type: ignore[misc]


_PLAIN = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(alphabet=st.characters(codec="utf-8"), max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(alphabet=st.characters(codec="utf-8"), max_size=6), children)
    ),
    max_leaves=20,
)


@settings(max_examples=examples(200), deadline=None)
@given(st.dictionaries(st.text(max_size=6), _PLAIN, max_size=5), st.integers(0, 3))
def test_plain_bytes_answer_the_size_and_nul_checks_as_the_canonical_bytes(
    payload: dict[str, Any], widen: int
) -> None:
    """Whenever validation's shortcut (orjson's bytes of a fast-read payload) answers, the
    canonical bytes are within the size limit too and escape a NUL exactly when they do, for
    any JSON-like payload (floats, non-finite ones, big integers, NULs, long strings)."""
    if widen:  # near the shortcut's own bound, which floats must not carry past the limit
        room = MAX_PAYLOAD_BYTES // 8 - len(repr(payload)) - 16 * widen
        payload = {**payload, "pad": "x" * max(room, 0), "floats": [1e-300] * (64 * widen)}
    quick = _plain_bytes(payload)
    if quick is None:
        return
    canonical = canonical_json(payload)
    assert len(canonical) <= MAX_PAYLOAD_BYTES
    assert (b"\\u0000" in quick) == (b"\\u0000" in canonical)


def test_plain_bytes_leave_floats_near_the_limit_to_the_canonical_path() -> None:
    """A payload of floats whose orjson bytes are within an eighth of the limit is within the
    limit canonically (each float at most 8 times longer); past that bound the shortcut
    declines, so validation encodes canonically and refuses exactly as before."""
    floats = {"f": [-1.2345678901234567e-300] * (MAX_PAYLOAD_BYTES // 8 // 25)}
    assert _plain_bytes(floats) is not None
    assert len(canonical_json(floats)) <= MAX_PAYLOAD_BYTES
    assert _plain_bytes({"f": [1.5] * (MAX_PAYLOAD_BYTES // 8)}) is None
    assert _plain_bytes({"nan": float("nan")}) is None
    assert _plain_bytes({"big": 2**70}) is None
