"""Public test helpers: a fixed clock, event factories, a synchronous fold, hypothesis strategies.

Runtime authors can use these in their own tests, as Khala's tests do:

* :class:`FixedClock` — a deterministic ``recorded_at`` source for
  :class:`~oa_sync_core.memory.MemoryEventLog`.
* :func:`new_event` / :func:`payload_for` — valid :class:`~oa_sync_core.events.NewEvent` values of
  every type in :data:`~oa_sync_core.events.EVENT_PAYLOADS` in one line.
* :func:`record_events` and :func:`fold_events` — turn new events into recorded
  :class:`~oa_sync_core.events.Event` values and fold them, without a log or an event loop.
* :func:`event_sequences` and friends — hypothesis strategies for valid event sequences over run
  and worker streams, with occasional unknown event types and optional ``occurredAt``.
* :class:`EventLogContract`, :class:`CheckpointStoreContract`, :class:`SinkContract` — the
  contract suites of the ports (:mod:`oa_sync_core.testing.contracts`), to run against your own
  adapter.

What this is not: a pytest plugin. Nothing here imports pytest, and hypothesis (not a runtime
dependency of the core) is imported only inside the strategy functions.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final

from oa_sync_core.checkpoints import DocId
from oa_sync_core.codec import JsonObject, datetime_to_timestamp
from oa_sync_core.engine import DocumentState, ProjectionEngine
from oa_sync_core.events import EVENT_PAYLOADS, ID_FIELDS, Event, NewEvent, validate_new_event
from oa_sync_core.projectors import DEFAULT_PROJECTORS
from oa_sync_core.sinks import DocumentUpdate
from oa_sync_core.testing.contracts import (
    CheckpointStoreContract,
    EventLogContract,
    ReadableSink,
    SinkContract,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from hypothesis.strategies import SearchStrategy

__all__ = [
    "FIXED_EPOCH",
    "RUN_EVENT_TYPES",
    "UNKNOWN_EVENT_TYPES",
    "WORKER_EVENT_TYPES",
    "CheckpointStoreContract",
    "EventLogContract",
    "FixedClock",
    "ReadableSink",
    "SinkContract",
    "event_sequences",
    "fold_events",
    "ids",
    "new_event",
    "new_events_for",
    "payload_for",
    "payloads",
    "record_events",
    "texts",
    "timestamps",
]

FIXED_EPOCH: Final = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
"""The instant a :class:`FixedClock` starts at by default."""

RUN_EVENT_TYPES: Final = tuple(t for t in EVENT_PAYLOADS if t.startswith("run."))
WORKER_EVENT_TYPES: Final = tuple(t for t in EVENT_PAYLOADS if t.startswith("worker."))
UNKNOWN_EVENT_TYPES: Final = ("run.annotated", "worker.log_line", "audit.note")
"""Types no projector knows: stored, and ignored by every fold."""


class FixedClock:
    """A clock for tests: returns ``start``, then ``start + step``, ``start + 2*step``...

    Args:
        start: the first instant returned (timezone-aware).
        step: how far each call advances the clock (zero: always the same instant).

    Raises:
        ValueError: ``start`` is naive.
    """

    def __init__(
        self, start: dt.datetime = FIXED_EPOCH, *, step: dt.timedelta = dt.timedelta(0)
    ) -> None:
        if start.tzinfo is None:
            raise ValueError("FixedClock needs a timezone-aware start")
        self.now = start
        self.step = step

    def __call__(self) -> dt.datetime:
        current = self.now
        self.now = current + self.step
        return current

    def advance(self, delta: dt.timedelta) -> dt.datetime:
        """Move the clock forward by ``delta``; returns the new instant."""
        self.now += delta
        return self.now


# ---------------------------------------------------------------------------------------------
# Plain factories
# ---------------------------------------------------------------------------------------------


def payload_for(
    event_type: str, ident: str, *, occurred_at: dt.datetime | str | None = None, **fields: Any
) -> JsonObject:
    """A payload for ``event_type``: the stream's id field plus ``fields`` (proto3 JSON names).

    Args:
        event_type: a type from ``EVENT_PAYLOADS`` (``run.*`` payloads get ``runId``,
            ``worker.*`` payloads ``workerId``); for other types only ``fields`` are used.
        ident: the run or worker id.
        occurred_at: optional ``occurredAt`` (an aware datetime or RFC 3339 text).
        fields: further payload fields, e.g. ``agentId="a1"``.

    Returns:
        The payload (not yet normalised; :func:`new_event` validates it).
    """
    payload: JsonObject = {}
    id_field = ID_FIELDS.get(event_type.partition(".")[0])
    if event_type in EVENT_PAYLOADS and id_field is not None:
        payload[id_field] = ident
    if occurred_at is not None:
        payload["occurredAt"] = (
            occurred_at if isinstance(occurred_at, str) else datetime_to_timestamp(occurred_at)
        )
    payload.update(fields)
    return payload


def new_event(
    event_type: str,
    ident: str,
    *,
    stream_kind: str | None = None,
    occurred_at: dt.datetime | str | None = None,
    expected_seq: int | None = None,
    idempotency_key: str | None = None,
    **fields: Any,
) -> NewEvent:
    """A validated :class:`NewEvent` on stream ``<kind>:<ident>``.

    Example: ``new_event("run.step", "r1", description="planning", progressPercent=40)``.

    Args:
        event_type: the event type.
        ident: the run or worker id (the stream's ``<id>``).
        stream_kind: the stream's kind; defaults to the type's first segment (``run``).
        occurred_at: optional ``occurredAt``.
        expected_seq: optional optimistic-concurrency check.
        idempotency_key: optional idempotency key.
        fields: further payload fields (proto3 JSON names).

    Returns:
        The event, payload normalised to canonical proto3 JSON.

    Raises:
        EventValidationError: the fields do not make a valid event.
    """
    kind = stream_kind or event_type.partition(".")[0]
    event = NewEvent(
        stream_id=f"{kind}:{ident}",
        type=event_type,
        payload=payload_for(event_type, ident, occurred_at=occurred_at, **fields),
        expected_seq=expected_seq,
        idempotency_key=idempotency_key,
    )
    return validate_new_event(event)


def new_events_for(ident: str, *types: str) -> list[NewEvent]:
    """Minimal valid events of the given types on one run or worker stream, in order."""
    return [new_event(t, ident) for t in types]


def record_events(
    events: Iterable[NewEvent],
    *,
    clock: FixedClock | None = None,
    start_position: int = 1,
    position_step: int = 1,
) -> list[Event]:
    """Record new events as a log would (positions, per-stream sequence numbers), in memory.

    No idempotency keys or ``expected_seq`` checks: use
    :class:`~oa_sync_core.memory.MemoryEventLog` for those.

    Args:
        events: events to record, in order; each is validated.
        clock: gives ``recorded_at`` (a :class:`FixedClock` at :data:`FIXED_EPOCH` stepping one
            second per event if omitted).
        start_position: position of the first event.
        position_step: gap between positions (> 1 leaves holes, as Postgres sequences do).

    Raises:
        EventValidationError: an event is invalid.
    """
    tick = clock or FixedClock(step=dt.timedelta(seconds=1))
    seqs: dict[str, int] = {}
    recorded: list[Event] = []
    for index, raw in enumerate(events):
        event = validate_new_event(raw, index=index)
        seq = seqs.get(event.stream_id, 0) + 1
        seqs[event.stream_id] = seq
        recorded.append(
            Event(
                position=start_position + index * position_step,
                stream_id=event.stream_id,
                stream_seq=seq,
                type=event.type,
                payload=event.payload,
                recorded_at=tick(),
            )
        )
    return recorded


def fold_events(
    batches: Iterable[Sequence[Event]] | Sequence[Event],
    engine: ProjectionEngine | None = None,
    *,
    states: dict[DocId, DocumentState] | None = None,
) -> dict[DocId, DocumentUpdate]:
    """Fold events synchronously, batch after batch, carrying document states between batches.

    Args:
        batches: a sequence of events (one batch) or an iterable of batches.
        engine: the engine; :data:`~oa_sync_core.projectors.DEFAULT_PROJECTORS` if omitted.
        states: document states before the first batch (updated in place as batches fold).

    Returns:
        The latest update of every document the events touched.
    """
    engine = engine or ProjectionEngine(DEFAULT_PROJECTORS)
    items: list[Any] = list(batches)
    single = not items or isinstance(items[0], Event)
    groups: list[Sequence[Event]] = [items] if single else items
    current = states if states is not None else {}
    latest: dict[DocId, DocumentUpdate] = {}
    for batch in groups:
        result = engine.apply(batch, current)
        for update, checkpoint in zip(result.updates, result.checkpoints, strict=True):
            latest[update.id] = update
            current[update.id] = DocumentState(
                checkpoint=checkpoint, body=update.body, version=update.version
            )
    return latest


# ---------------------------------------------------------------------------------------------
# Hypothesis strategies (hypothesis is imported lazily: it is not a runtime dependency)
# ---------------------------------------------------------------------------------------------

_ID_ALPHABET: Final = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-:@/"
_AWKWARD_TEXT: Final = (
    "0",
    "'; DROP TABLE oa_sync.events; --",
    '" OR "1"="1',
    "../../etc/passwd",
    "%2e%2e%2f",
    "\\u0000",
    "emoji \U0001f600 and \u2028 separator",
    "Ünïcödé",
)


def ids() -> SearchStrategy[str]:
    """Run or worker ids: short, valid in a stream id, sometimes ``"0"`` or awkward."""
    from hypothesis import strategies as st  # noqa: PLC0415 - optional, imported lazily

    return st.one_of(
        st.sampled_from(("r1", "r2", "w1", "0", "a-b.c", "x:y", "u@h/p")),
        st.text(alphabet=_ID_ALPHABET, min_size=1, max_size=12),
    )


def texts() -> SearchStrategy[str]:
    """Free text for payload fields: any Unicode but NUL and surrogates, plus SQL and quotes."""
    from hypothesis import strategies as st  # noqa: PLC0415 - optional, imported lazily

    return st.one_of(
        st.sampled_from(_AWKWARD_TEXT),
        st.text(
            alphabet=st.characters(codec="utf-8", exclude_characters="\x00"),
            max_size=20,
        ),
    )


def timestamps() -> SearchStrategy[str]:
    """RFC 3339 timestamps, in UTC or with an offset, with 0 to 9 fractional digits."""
    from hypothesis import strategies as st  # noqa: PLC0415 - optional, imported lazily

    def render(moment: dt.datetime, offset_minutes: int, digits: int) -> str:
        local = moment + dt.timedelta(minutes=offset_minutes)
        text = local.strftime("%Y-%m-%dT%H:%M:%S")
        if digits:
            text += "." + f"{local.microsecond:06d}000"[:digits]
        if offset_minutes == 0:
            return text + "Z"
        sign = "+" if offset_minutes > 0 else "-"
        hours, minutes = divmod(abs(offset_minutes), 60)
        return f"{text}{sign}{hours:02d}:{minutes:02d}"

    return st.builds(
        render,
        st.datetimes(
            min_value=dt.datetime(2000, 1, 1),
            max_value=dt.datetime(2100, 1, 1),
        ),
        st.sampled_from((0, 0, 60, -330, 14 * 60)),
        st.sampled_from((0, 3, 6, 9)),
    )


def payloads(event_type: str, ident: str) -> SearchStrategy[JsonObject]:
    """Valid payloads of one event type for one run or worker id.

    Known types get their message's fields (each present or not, ``occurredAt`` optional);
    unknown types get a small JSON object.
    """
    body = _payload_fields(event_type)
    id_field = ID_FIELDS.get(event_type.partition(".")[0])
    if event_type not in EVENT_PAYLOADS or id_field is None:
        return body
    return body.map(lambda fields: {id_field: ident, **fields})


@functools.cache
def _payload_fields(event_type: str) -> SearchStrategy[JsonObject]:
    """Payloads of one type without the id field; built once per type (building is slow)."""
    from hypothesis import strategies as st  # noqa: PLC0415 - optional, imported lazily

    uint32 = st.integers(0, 2**32 - 1)
    uint64 = st.one_of(st.integers(0, 10**6), st.integers(0, 2**64 - 1).map(str))
    error = st.fixed_dictionaries({}, optional={"code": texts(), "message": texts()})
    optional: dict[str, SearchStrategy[Any]] = {"occurredAt": timestamps()}
    fields: dict[str, dict[str, SearchStrategy[Any]]] = {
        "run.created": {"agentId": texts(), "threadId": texts()},
        "run.started": {"workerId": ids()},
        "run.step": {
            "stepIndex": uint32,
            "description": texts(),
            "progressPercent": st.integers(0, 120),
        },
        "run.tool_call": {"toolName": texts(), "callId": texts()},
        "run.completed": {"resultSummary": texts()},
        "run.failed": {"error": error},
        "run.canceled": {"reason": texts()},
        "worker.started": {"host": texts(), "version": texts()},
        "worker.heartbeat": {"inFlightRequests": uint32},
        "worker.request_received": {"requestId": texts(), "runId": ids()},
        "worker.request_completed": {"requestId": texts(), "durationMs": uint64},
        "worker.request_failed": {"requestId": texts(), "error": error},
        "worker.stopped": {"reason": texts()},
        "worker.failed": {"error": error},
    }
    if event_type not in fields:
        json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53), texts())
        return st.dictionaries(
            st.sampled_from(("note", "level", "data", "0")),
            st.one_of(json_leaf, st.lists(json_leaf, max_size=3)),
            max_size=3,
        )
    optional.update(fields[event_type])
    return st.fixed_dictionaries({}, optional=optional)


def event_sequences(
    *,
    run_ids: Sequence[str] = ("r1", "r2", "0"),
    worker_ids: Sequence[str] = ("w1", "w2"),
    unknown: bool = True,
    min_size: int = 0,
    max_size: int = 30,
) -> SearchStrategy[list[NewEvent]]:
    """Sequences of valid new events over a few run and worker streams.

    Args:
        run_ids: ids of the ``run:`` streams to use (empty: no run events).
        worker_ids: ids of the ``worker:`` streams to use (empty: no worker events).
        unknown: mix in event types no projector knows (about one in ten).
        min_size: fewest events.
        max_size: most events.

    Returns:
        A strategy of lists of validated :class:`NewEvent` (payloads canonical).
    """
    from hypothesis import strategies as st  # noqa: PLC0415 - optional, imported lazily

    known: list[tuple[str, str, Sequence[str]]] = []
    if run_ids:
        known += [(t, "run", run_ids) for t in RUN_EVENT_TYPES]
    if worker_ids:
        known += [(t, "worker", worker_ids) for t in WORKER_EVENT_TYPES]
    if not known:
        raise ValueError("event_sequences needs at least one run or worker id")
    pools = [(kind, pool) for kind, pool in (("run", run_ids), ("worker", worker_ids)) if pool]
    strange = [(t, kind, pool) for t in UNKNOWN_EVENT_TYPES for kind, pool in pools]

    @st.composite
    def one(draw: st.DrawFn) -> NewEvent:
        use_unknown = unknown and draw(st.integers(0, 9)) == 0
        event_type, kind, pool = draw(st.sampled_from(strange if use_unknown else known))
        ident = draw(st.sampled_from(list(pool)))
        payload = draw(payloads(event_type, ident))
        return validate_new_event(
            NewEvent(stream_id=f"{kind}:{ident}", type=event_type, payload=payload)
        )

    return st.lists(one(), min_size=min_size, max_size=max_size)
