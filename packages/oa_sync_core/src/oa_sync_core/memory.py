"""In-memory adapters: an event log and a checkpoint store for tests and embedding.

They implement the same ports as the Postgres adapters and pass the same contract tests, but
keep nothing across processes and serialise everything (so they are trivially gap-safe).
"""

from __future__ import annotations

import bisect
import datetime as dt
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence

from oa_sync_core.checkpoints import Checkpoint, DocId
from oa_sync_core.errors import ConcurrencyError
from oa_sync_core.events import Event, NewEvent, validate_new_event

__all__ = ["MemoryCheckpointStore", "MemoryEventLog"]


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class MemoryEventLog:
    """An append-only event log in memory; an :class:`~oa_sync_core.events.EventSource`.

    Args:
        clock: gives ``recorded_at`` for new events (inject a fixed clock in tests).
    """

    def __init__(self, clock: Callable[[], dt.datetime] = _utc_now) -> None:
        self._clock = clock
        self.events: list[Event] = []
        self._positions: list[int] = []
        self._stream_seq: dict[str, int] = {}
        self._by_key: dict[str, int] = {}

    async def append(self, events: Sequence[NewEvent]) -> list[int]:
        """Validate then append a batch atomically.

        Returns:
            The position of each event; a replayed idempotency key gives its original position.

        Raises:
            EventValidationError: an event is invalid; nothing is appended.
            ConcurrencyError: an ``expected_seq`` does not match; nothing is appended.
        """
        checked = [validate_new_event(e, index=i) for i, e in enumerate(events)]
        seqs = dict(self._stream_seq)
        keys: dict[str, int] = {}
        planned: list[tuple[NewEvent, int, int] | int] = []
        next_position = (self._positions[-1] if self._positions else 0) + 1
        for event in checked:
            key = event.idempotency_key
            if key is not None and (key in self._by_key or key in keys):
                planned.append(self._by_key.get(key) or keys[key])
                continue
            current = seqs.get(event.stream_id, 0)
            if event.expected_seq is not None and event.expected_seq != current:
                raise ConcurrencyError(event.stream_id, event.expected_seq, current)
            seqs[event.stream_id] = current + 1
            if key is not None:
                keys[key] = next_position
            planned.append((event, next_position, current + 1))
            next_position += 1
        now = self._clock()
        positions: list[int] = []
        for item in planned:
            if isinstance(item, int):
                positions.append(item)
                continue
            event, position, seq = item
            self.events.append(
                Event(
                    position=position,
                    stream_id=event.stream_id,
                    stream_seq=seq,
                    type=event.type,
                    payload=event.payload,
                    recorded_at=now,
                )
            )
            self._positions.append(position)
            positions.append(position)
        self._stream_seq = seqs
        self._by_key.update(keys)
        return positions

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
