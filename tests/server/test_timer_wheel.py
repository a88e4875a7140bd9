"""The WebSocket transport's timer wheel: every owner's callback runs once, never before its
deadline and at most one slot late; moving an owner earlier wins, later is ignored until it
fires, and cancelling removes it; the event-loop timers in use are the occupied slots, not the
owners."""

from __future__ import annotations

import heapq
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st
from oa_sync_server.transports.ws import TimerWheel

RESOLUTION = 0.05


class Handle:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualLoop:
    """The wheel's scheduler with a clock moved by the test (``call_at`` and ``advance``)."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Handle, Callable[[int], None], int]] = []
        self._seq = 0

    def call_at(self, when: float, callback: Callable[[int], None], slot: int, /) -> Handle:
        handle = Handle()
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, handle, callback, slot))
        return handle

    def advance(self, to: float) -> None:
        while self._heap and self._heap[0][0] <= to:
            when, _, handle, callback, slot = heapq.heappop(self._heap)
            self.now = max(self.now, when)
            if not handle.cancelled:
                callback(slot)
        self.now = max(self.now, to)

    @property
    def pending(self) -> int:
        return sum(1 for entry in self._heap if not entry[2].cancelled)


deadlines = st.lists(st.floats(min_value=0.0, max_value=5.0), min_size=1, max_size=60)


@settings(max_examples=200, deadline=None)
@given(first=deadlines, moves=st.lists(st.tuples(st.integers(0, 59), st.floats(0.0, 5.0))))
def test_each_owner_fires_once_not_early_at_most_a_slot_late(
    first: list[float], moves: list[tuple[int, float]]
) -> None:
    """Each scheduled owner fires exactly once, at or after the earliest deadline it was given
    and less than one resolution after it; timers in use never exceed occupied slots."""
    loop = ManualLoop()
    wheel = TimerWheel(loop, RESOLUTION)
    fired: dict[int, list[float]] = {}
    earliest: dict[int, float] = {}

    def schedule(owner: int, when: float) -> None:
        earliest[owner] = min(earliest.get(owner, when), when)
        wheel.schedule(owner, when, lambda: fired.setdefault(owner, []).append(loop.now))

    for owner, when in enumerate(first):
        schedule(owner, when)
    for owner, when in moves:
        if owner < len(first):
            schedule(owner, when)
    assert loop.pending == wheel.slots <= len(first)
    loop.advance(10.0)
    assert sorted(fired) == sorted(earliest)
    for owner, times in fired.items():
        assert len(times) == 1
        assert earliest[owner] <= times[0] < earliest[owner] + RESOLUTION + 1e-9
    assert len(wheel) == 0
    assert wheel.slots == 0


def test_later_is_ignored_until_fired_and_cancel_removes() -> None:
    """Scheduling an owner later than it is due keeps the earlier slot; after it fires the owner
    can be scheduled again; a cancelled owner never fires and frees its timer."""
    loop = ManualLoop()
    wheel = TimerWheel(loop, RESOLUTION)
    calls: list[str] = []
    wheel.schedule(1, 1.0, lambda: calls.append("a"))
    wheel.schedule(1, 3.0, lambda: calls.append("late"))
    loop.advance(1.2)
    assert calls == ["a"]
    wheel.schedule(1, 2.0, lambda: calls.append("b"))
    wheel.schedule(2, 2.0, lambda: calls.append("c"))
    assert wheel.slots == 1
    wheel.cancel(2)
    assert wheel.slots == 1
    wheel.cancel(1)
    assert wheel.slots == 0
    assert loop.pending == 0
    loop.advance(5.0)
    assert calls == ["a"]
    wheel.schedule(3, float("inf"), lambda: calls.append("never"))
    assert len(wheel) == 0
