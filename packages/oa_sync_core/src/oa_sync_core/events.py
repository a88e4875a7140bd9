"""Events: what runtime services append, and what the log hands back.

:class:`NewEvent` is an event to append; :func:`validate_new_event` checks it completely
(stream id, type, payload against its proto in ``events.proto``) and returns it normalised to
canonical proto3 JSON, so a bad event is refused before anything is written. :class:`Event` is
an event the log has recorded, with its global ``position`` and per-stream ``stream_seq``.

:func:`plan_append` is the one append decision (idempotency keys, ``expected_seq``, the next
``stream_seq`` of each stream) for :class:`EventLog` adapters: an adapter reads what it needs
(each stream's last seq, the keys already recorded), asks for the plan, and writes its rows.
The Postgres adapter makes the same decision inside Postgres, in one round trip
(``oa_sync.append_events``); a test holds the two equal on random batches.
:func:`check_append_size` is the one batch-size rule (:data:`MAX_APPEND_EVENTS`).

This module knows the event vocabulary (:data:`EVENT_PAYLOADS`) but not how events are stored.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from typing import Final, Protocol

import betterproto
import orjson

from oa_sync_core.codec import (
    JsonObject,
    JsonValue,
    canonical_json,
    check_json,
    read_message,
    read_message_fast,
)
from oa_sync_core.contracts import v1
from oa_sync_core.errors import (
    AppendLimitError,
    CodecError,
    ConcurrencyError,
    EventValidationError,
)

__all__ = [
    "EVENT_PAYLOADS",
    "ID_FIELDS",
    "MAX_APPEND_EVENTS",
    "MAX_PAYLOAD_BYTES",
    "AppendPlan",
    "Event",
    "EventLog",
    "EventSource",
    "NewEvent",
    "PlannedEvent",
    "check_append_size",
    "plan_append",
    "validate_new_event",
]

EVENT_PAYLOADS: Final[Mapping[str, type[betterproto.Message]]] = {
    "run.created": v1.RunCreated,
    "run.started": v1.RunStarted,
    "run.step": v1.RunStep,
    "run.tool_call": v1.RunToolCall,
    "run.completed": v1.RunCompleted,
    "run.failed": v1.RunFailed,
    "run.canceled": v1.RunCanceled,
    "worker.started": v1.WorkerStarted,
    "worker.heartbeat": v1.WorkerHeartbeat,
    "worker.request_received": v1.WorkerRequestReceived,
    "worker.request_completed": v1.WorkerRequestCompleted,
    "worker.request_failed": v1.WorkerRequestFailed,
    "worker.stopped": v1.WorkerStopped,
    "worker.failed": v1.WorkerFailed,
}
"""Payload message of every event type the projectors understand (DESIGN.md vocabulary)."""

_STREAM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]*:[A-Za-z0-9._\-:@/]{1,200}")
_EVENT_TYPE = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+")
MAX_PAYLOAD_BYTES: Final = 256 * 1024
"""Largest canonical payload accepted for one event."""
MAX_IDEMPOTENCY_KEY: Final = 200
_new_object = object.__new__
_set_field = object.__setattr__  # how a frozen dataclass sets its own fields
MAX_APPEND_EVENTS: Final = 10_000
"""Default most events in one append (library and ``POST /v1/events``); imports split files."""
ID_FIELDS: Final[Mapping[str, str]] = {"run": "runId", "worker": "workerId"}
"""The payload field holding the stream's id, by stream kind (``run:<id>`` has ``runId``)."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class NewEvent:
    """An event to append.

    Attributes:
        stream_id: ``<kind>:<id>``, e.g. ``run:r1``.
        type: dotted lowercase type, e.g. ``run.started``.
        payload: proto3 JSON object of the type's message (any object for unknown types).
        expected_seq: if set, the stream's last ``stream_seq`` must equal it (0: empty stream).
        idempotency_key: if set, a second append with the same key returns the original
            position and writes nothing.
    """

    stream_id: str
    type: str
    payload: JsonObject
    expected_seq: int | None = None
    idempotency_key: str | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """An event recorded in the log.

    Attributes:
        position: global position in the log, unique and increasing (with holes).
        stream_id: the stream.
        stream_seq: 1-based sequence number within the stream, gap-free.
        type: the event type.
        payload: canonical proto3 JSON of the payload.
        recorded_at: when the log recorded it (timezone-aware, UTC).
    """

    position: int
    stream_id: str
    stream_seq: int
    type: str
    payload: JsonObject
    recorded_at: dt.datetime

    def __post_init__(self) -> None:
        if self.position < 1:
            raise ValueError(f"position must be >= 1, got {self.position}")
        if self.stream_seq < 1:
            raise ValueError(f"stream_seq must be >= 1, got {self.stream_seq}")
        if self.recorded_at.tzinfo is None:
            raise ValueError("recorded_at must be timezone-aware")

    @classmethod
    def from_log(  # noqa: PLR0917 - the columns of a log row, in order
        cls,
        position: int,
        stream_id: str,
        stream_seq: int,
        type: str,
        payload: JsonObject,
        recorded_at: dt.datetime,
    ) -> Event:
        """An event read back from a log's own rows, without re-checking them.

        For adapters reading what their log wrote, whose schema already guarantees what
        ``__post_init__`` checks (positive position and seq, an aware ``recorded_at``); it builds
        the frozen value in about half the time, which a rebuild of millions of rows notices.
        Anything else should use the constructor.
        """
        event = _new_object(cls)
        _set_field(event, "position", position)
        _set_field(event, "stream_id", stream_id)
        _set_field(event, "stream_seq", stream_seq)
        _set_field(event, "type", type)
        _set_field(event, "payload", payload)
        _set_field(event, "recorded_at", recorded_at)
        return event


def validate_new_event(event: NewEvent, *, index: int | None = None) -> NewEvent:
    """Check an event completely and return it with its payload normalised.

    Known event types must carry the proto3 JSON of their message, and the id inside it
    (``runId`` / ``workerId``) must match the stream's id. Unknown types need only a JSON
    object payload.

    Args:
        event: the event to check.
        index: its place in a batch, for the error message.

    Returns:
        A copy whose payload is canonical proto3 JSON.

    Raises:
        EventValidationError: anything is wrong; names the field.
    """
    # Callers are often untyped (HTTP bodies, CLI lines): check types at run time too.
    fields: dict[str, object] = {
        "stream_id": event.stream_id,
        "type": event.type,
        "expected_seq": event.expected_seq,
        "idempotency_key": event.idempotency_key,
        "payload": event.payload,
    }
    if not isinstance(fields["stream_id"], str) or not _STREAM_ID.fullmatch(event.stream_id):
        raise EventValidationError(
            f"stream_id {event.stream_id!r} is not '<kind>:<id>' of safe characters",
            index=index,
            field="stream_id",
        )
    if not isinstance(fields["type"], str) or len(event.type) > 100:
        raise EventValidationError("type must be a string", index=index, field="type")
    if not _EVENT_TYPE.fullmatch(event.type):
        raise EventValidationError(
            f"type {event.type!r} is not dotted lowercase (e.g. 'run.started')",
            index=index,
            field="type",
        )
    seq = fields["expected_seq"]
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or seq < 0):
        raise EventValidationError(
            "expected_seq must be a non-negative integer", index=index, field="expected_seq"
        )
    key = fields["idempotency_key"]
    if key is not None and (
        not isinstance(key, str) or not 0 < len(key) <= MAX_IDEMPOTENCY_KEY or "\x00" in key
    ):
        raise EventValidationError(
            f"idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY} characters without NUL",
            index=index,
            field="idempotency_key",
        )
    if not isinstance(fields["payload"], dict):
        raise EventValidationError("payload must be a JSON object", index=index, field="payload")
    message_cls = EVENT_PAYLOADS.get(event.type)
    # The fast reader proves the payload plain JSON too (see read_message_fast); when it cannot
    # decide, the reference path accepts or refuses and words the error.
    fast = None if message_cls is None else read_message_fast(message_cls, event.payload)
    try:
        if fast is not None:
            payload = fast
            encoded = _plain_bytes(fast) or canonical_json(fast)
        else:
            check_json(event.payload, path="payload")
            if message_cls is not None:
                payload = read_message(message_cls, event.payload, path="payload")
            else:
                payload = event.payload
            encoded = canonical_json(payload)
    except CodecError as exc:
        raise EventValidationError(str(exc), index=index, field=exc.path or "payload") from None
    except (TypeError, ValueError) as exc:  # non-JSON values in a hand-built payload
        raise EventValidationError(
            f"payload is not JSON: {exc}", index=index, field="payload"
        ) from None
    if b"\\u0000" in encoded and _holds_nul(payload):
        # Postgres jsonb cannot store NUL in text; refuse it up front, clearly.
        raise EventValidationError("payload contains a NUL character", index=index, field="payload")
    if len(encoded) > MAX_PAYLOAD_BYTES:
        raise EventValidationError(
            f"payload exceeds {MAX_PAYLOAD_BYTES} bytes", index=index, field="payload"
        )
    if message_cls is None:
        # A fresh copy, so a caller mutating its dict later cannot rewrite a recorded event.
        payload = json.loads(encoded)
    kind, _, stream_key = event.stream_id.partition(":")
    id_field = ID_FIELDS.get(event.type.partition(".")[0])
    if message_cls is not None and id_field is not None:
        if kind != event.type.partition(".")[0]:
            raise EventValidationError(
                f"{event.type} belongs on a '{event.type.partition('.')[0]}:' stream",
                index=index,
                field="stream_id",
            )
        if payload.get(id_field) != stream_key:
            raise EventValidationError(
                f"payload.{id_field} must equal the stream id {stream_key!r}",
                index=index,
                field=f"payload.{id_field}",
            )
    return NewEvent(
        stream_id=event.stream_id,
        type=event.type,
        payload=payload,
        expected_seq=event.expected_seq,
        idempotency_key=event.idempotency_key,
    )


def _plain_bytes(payload: JsonObject) -> bytes | None:
    """orjson's bytes of a payload the fast reader proved plain JSON, when they answer the size
    and NUL checks exactly as the canonical bytes would; else ``None`` (encode canonically).

    Validation reads only the length of the canonical bytes and whether they escape a NUL; key
    order changes neither, and orjson writes strings (escapes included), integers, booleans and
    containers exactly as :func:`~oa_sync_core.codec.canonical_json` does. Only a float is
    spelled differently: at most 24 canonical bytes against at least 3 of orjson's, so the
    canonical bytes are at most 8 times as long, and orjson bytes within an eighth of the limit
    mean canonical bytes within it. A non-finite float (orjson's ``null``) and what orjson
    refuses (an integer beyond 64 bits) take the canonical path, which refuses or encodes them
    as before. This skips the canonical encoding and its float probe: ~0.5 us of ~5 us per
    event (same-run A/B over the benchmark's batches of 1,000).
    """
    try:
        quick = orjson.dumps(payload)
    except TypeError:  # an integer beyond 64 bits, or what the canonical path refuses
        return None
    if len(quick) > MAX_PAYLOAD_BYTES // 8 or b"null" in quick:
        return None
    return quick


def _holds_nul(value: JsonValue) -> bool:
    """Whether any string (key or value) in a JSON value contains U+0000."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


class EventSource(Protocol):
    """Reads every committed event of a log, in log order, batch by batch.

    Log order is the order in which events became final: position order for the in-memory
    log, (transaction id, position) for Postgres (DESIGN.md rule 1). Within one stream, log
    order is always ``stream_seq`` order, and positions increase with it.
    """

    def batches(self, *, batch_size: int) -> AsyncIterator[Sequence[Event]]:
        """Every committed event in log order, ``batch_size`` at a time."""
        ...


def check_append_size(count: int, limit: int) -> None:
    """Refuse an append of more than ``limit`` events, before anything is read or written.

    Raises:
        AppendLimitError: ``count > limit``.
    """
    if count > limit:
        raise AppendLimitError(limit, count)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PlannedEvent:
    """An event of a batch that will be written, with its place in its stream.

    Attributes:
        event: the (validated) event.
        stream_seq: the sequence number it gets.
    """

    event: NewEvent
    stream_seq: int


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AppendPlan:
    """What an append writes, and how to answer it.

    Attributes:
        rows: the events to write, in batch order (positions must follow this order).
        slots: for each event of the batch, the index of its row in ``rows``, or the
            idempotency key whose position answers it (a key recorded before, or repeated
            inside the batch).
        last_seqs: each stream's last ``stream_seq`` after the append.
    """

    rows: tuple[PlannedEvent, ...]
    slots: tuple[int | str, ...]
    last_seqs: Mapping[str, int]

    def positions(self, placed: Sequence[int], known: Mapping[str, int]) -> list[int]:
        """The answer to the append: the position of every event of the batch.

        Args:
            placed: the position each of ``rows`` was written at.
            known: positions of the idempotency keys recorded before the append.
        """
        by_key = dict(known)
        for row, position in zip(self.rows, placed, strict=True):
            if row.event.idempotency_key is not None:
                by_key[row.event.idempotency_key] = position
        return [placed[s] if isinstance(s, int) else by_key[s] for s in self.slots]


def plan_append(
    events: Sequence[NewEvent], last_seqs: Mapping[str, int], known_keys: Collection[str]
) -> AppendPlan:
    """Decide an append: which events are written, at which ``stream_seq``, which are replays.

    Pure: the adapter supplies what it read under its locks.

    Args:
        events: validated events, in batch order.
        last_seqs: the last ``stream_seq`` of (at least) every stream of the batch; a stream
            missing here is empty.
        known_keys: the batch's idempotency keys already recorded.

    Returns:
        The :class:`AppendPlan`.

    Raises:
        ConcurrencyError: an ``expected_seq`` does not match its stream (counting the events
            of the batch before it); nothing may be written.
    """
    seqs = dict(last_seqs)
    rows: list[PlannedEvent] = []
    slots: list[int | str] = []
    batch_keys: set[str] = set()
    for event in events:
        key = event.idempotency_key
        if key is not None and (key in known_keys or key in batch_keys):
            slots.append(key)
            continue
        current = seqs.get(event.stream_id, 0)
        if event.expected_seq is not None and event.expected_seq != current:
            raise ConcurrencyError(event.stream_id, event.expected_seq, current)
        seqs[event.stream_id] = current + 1
        if key is not None:
            batch_keys.add(key)
        slots.append(len(rows))
        rows.append(PlannedEvent(event=event, stream_seq=current + 1))
    return AppendPlan(rows=tuple(rows), slots=tuple(slots), last_seqs=seqs)


class EventLog(EventSource, Protocol):
    """The event log port: what :class:`~oa_sync_core.memory.MemoryEventLog` and the Postgres
    adapter both offer (and what :class:`oa_sync_core.testing.EventLogContract` checks).

    Attributes:
        max_events: the most events one :meth:`append` accepts.
    """

    max_events: int

    async def append(self, events: Sequence[NewEvent]) -> list[int]:
        """Validate then append a batch atomically; the position of each event.

        Raises:
            AppendLimitError: more than ``max_events`` events; nothing was written.
            EventValidationError: an event is invalid; nothing was written.
            ConcurrencyError: an ``expected_seq`` does not match; nothing was written.
        """
        ...

    async def stream(self, stream_id: str) -> list[Event]:
        """Every recorded event of one stream, in ``stream_seq`` order."""
        ...
