"""In-memory adapters: an event log and a checkpoint store for tests and embedding.

They implement the same ports as the Postgres adapters and pass the same contract tests, but
keep nothing across processes and serialise everything (so they are trivially gap-safe).
"""

from __future__ import annotations

import bisect
import datetime as dt
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence

from oa_sync_core.checkpoints import Checkpoint, DocId
from oa_sync_core.events import (
    MAX_APPEND_EVENTS,
    Event,
    NewEvent,
    check_append_size,
    plan_append,
    validate_new_event,
)

__all__ = ["MemoryCheckpointStore", "MemoryEventLog"]


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class MemoryEventLog:
    """An append-only event log in memory; an :class:`~oa_sync_core.events.EventLog`.

    Args:
        clock: gives ``recorded_at`` for new events (inject a fixed clock in tests).
        max_events: the most events one append accepts.
    """

    def __init__(
        self,
        clock: Callable[[], dt.datetime] = _utc_now,
        *,
        max_events: int = MAX_APPEND_EVENTS,
    ) -> None:
        self._clock = clock
        self.max_events = max_events
        self.events: list[Event] = []
        self._positions: list[int] = []
        self._stream_seq: dict[str, int] = {}
        self._by_key: dict[str, int] = {}
        self._by_stream: dict[str, list[Event]] = {}

    async def append(self, events: Sequence[NewEvent]) -> list[int]:
        """Validate then append a batch atomically (the plan is :func:`plan_append`'s).

        Returns:
            The position of each event; a replayed idempotency key gives its original position.

        Raises:
            AppendLimitError: more than ``max_events`` events; nothing is appended.
            EventValidationError: an event is invalid; nothing is appended.
            ConcurrencyError: an ``expected_seq`` does not match; nothing is appended.
        """
        check_append_size(len(events), self.max_events)
        checked = [validate_new_event(e, index=i) for i, e in enumerate(events)]
        plan = plan_append(checked, self._stream_seq, self._by_key)
        first = (self._positions[-1] if self._positions else 0) + 1
        placed = list(range(first, first + len(plan.rows)))
        now = self._clock()
        for row, position in zip(plan.rows, placed, strict=True):
            recorded = Event(
                position=position,
                stream_id=row.event.stream_id,
                stream_seq=row.stream_seq,
                type=row.event.type,
                payload=row.event.payload,
                recorded_at=now,
            )
            self.events.append(recorded)
            self._positions.append(position)
            self._by_stream.setdefault(recorded.stream_id, []).append(recorded)
        positions = plan.positions(placed, self._by_key)
        self._stream_seq.update(plan.last_seqs)
        for row, position in zip(plan.rows, placed, strict=True):
            if row.event.idempotency_key is not None:
                self._by_key[row.event.idempotency_key] = position
        return positions

    async def stream(self, stream_id: str) -> list[Event]:
        """Every event of one stream, in ``stream_seq`` order."""
        return list(self._by_stream.get(stream_id, ()))

    async def read_after(self, position: int, limit: int) -> Sequence[Event]:
        """Up to ``limit`` events with a position above ``position``, ascending."""
        start = bisect.bisect_right(self._positions, position)
        return self.events[start : start + limit]

    async def batches(self, *, batch_size: int) -> AsyncIterator[Sequence[Event]]:
        """Every event in position order, ``batch_size`` at a time."""
        after = 0
        while batch := await self.read_after(after, batch_size):
            yield batch
            after = batch[-1].position


class MemoryCheckpointStore:
    """Checkpoints in a dict; a :class:`~oa_sync_core.checkpoints.CheckpointStore`."""

    def __init__(self) -> None:
        self.checkpoints: dict[DocId, Checkpoint] = {}

    async def get_many(self, ids: Iterable[DocId]) -> Mapping[DocId, Checkpoint]:
        return {i: self.checkpoints[i] for i in ids if i in self.checkpoints}

    async def put_many(self, checkpoints: Iterable[Checkpoint]) -> None:
        for checkpoint in checkpoints:
            self.checkpoints[checkpoint.id] = checkpoint

    async def all(self, projection: str | None = None) -> list[Checkpoint]:
        found = [c for c in self.checkpoints.values() if projection in (None, c.projection)]
        return sorted(found, key=lambda c: c.doc_key)
