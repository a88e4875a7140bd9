"""The one resume rule (oa_sync_core.protocol.resume), as every transport applies it."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st
from oa_sync_core.protocol.codes import ResetReason
from oa_sync_core.protocol.resume import Position, decide_resume


@dataclasses.dataclass(frozen=True)
class Meta:
    epoch: str
    watermark: int
    retained_from: int


META = Meta("e1", 10, 3)


@pytest.mark.parametrize(
    ("position", "after", "reason"),
    [
        (None, None, None),
        (Position(epoch="e1", watermark=7), 7, None),
        (Position(epoch="e1", watermark=3), 3, None),
        (Position(epoch="e1", watermark=10), 10, None),
        (Position(epoch=None, watermark=7), 7, None),
        (Position(epoch="e0", watermark=7), None, ResetReason.EPOCH_CHANGED),
        (Position(epoch="e1", watermark=2), None, ResetReason.WATERMARK_EXPIRED),
        (Position(epoch=None, watermark=2), None, ResetReason.WATERMARK_EXPIRED),
        (Position(epoch="e1", watermark=0), 0, None),
        (Position(epoch="e0", watermark=0), None, ResetReason.EPOCH_CHANGED),
        (Position(epoch="e1", watermark=11), None, ResetReason.WATERMARK_AHEAD),
        (Position(epoch=None, watermark=11), None, ResetReason.WATERMARK_AHEAD),
    ],
)
def test_decide_resume(
    position: Position | None, after: int | None, reason: ResetReason | None
) -> None:
    """Same (or unknown) epoch and a retained watermark resume; anything else resets."""
    assert decide_resume(position, META) == (after, reason)


@given(
    watermark=st.integers(0, 100),
    epoch=st.sampled_from([None, "e1", "e2"]),
    retained_from=st.integers(0, 50),
    high=st.integers(0, 100),
)
def test_resume_never_skips_or_repeats_beyond_the_log(
    watermark: int, epoch: str | None, retained_from: int, high: int
) -> None:
    """A catch-up starts inside the retained log of the same epoch, or there is a reset."""
    meta = Meta("e1", high, retained_from)
    after, reason = decide_resume(Position(watermark=watermark, epoch=epoch), meta)
    assert (after is None) == (reason is not None)
    if after is not None:
        assert after == 0 or retained_from <= after <= high
        assert epoch in (None, "e1")
