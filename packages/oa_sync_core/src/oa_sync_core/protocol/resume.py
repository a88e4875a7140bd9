"""The one resume rule: how a subscription, a stream or a poll continues from a watermark.

A client that comes back holds a position: a watermark, and (on the WebSocket, and optionally
when polling) the epoch it belongs to. :func:`decide_resume` says whether the server can
continue after it with only what changed (a coalesced catch-up) or must send a ``reset`` and a
full snapshot. The WebSocket session, SSE (``Last-Event-ID``) and ``GET /v1/changes`` all call
it, so all three refuse the same positions for the same reasons.

What this is not: reading the documents (the transports do), or the client's side of resuming
(:mod:`oa_sync_core.protocol.client_session` keeps the position).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

from oa_sync_core.protocol.codes import ResetReason

__all__ = ["LogMeta", "Position", "decide_resume"]


class LogMeta(Protocol):
    """The change log's metadata as read from the database (``sync_meta`` + newest watermark)."""

    @property
    def epoch(self) -> str: ...

    @property
    def watermark(self) -> int: ...

    @property
    def retained_from(self) -> int: ...


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Position:
    """Where a client says it stopped.

    Attributes:
        watermark: everything up to here was received.
        epoch: the epoch of that watermark; ``None`` when the transport does not carry it
            (SSE's ``Last-Event-ID``, a poll without ``epoch=``).
    """

    watermark: int
    epoch: str | None = None


def decide_resume(
    position: Position | None, meta: LogMeta
) -> tuple[int | None, ResetReason | None]:
    """Decide how a subscription starts.

    Args:
        position: the client's position, or ``None`` for a fresh start.
        meta: the change log's current metadata.

    Returns:
        ``(after, reset)``: read documents changed after ``after`` (``None``: everything),
        preceded by a ``reset`` for ``reset`` when it is not ``None``. Same epoch (or none
        given) and a watermark of 0 or in ``[retained_from, meta.watermark]`` → coalesced
        catch-up after it; another epoch, an expired watermark or one from the future → reset +
        snapshot.
    """
    if position is None:
        return None, None
    if position.epoch is not None and position.epoch != meta.epoch:
        return None, ResetReason.EPOCH_CHANGED
    if 0 < position.watermark < meta.retained_from:
        # Watermark 0 holds nothing, so nothing it holds can be stale: reading every document
        # changed after 0 is the snapshot itself, and no reset is needed to clear a cache.
        return None, ResetReason.WATERMARK_EXPIRED
    if position.watermark > meta.watermark:
        return None, ResetReason.WATERMARK_AHEAD
    return position.watermark, None
