"""The log follower on a real Postgres: a NOTIFY wakes a waiter at once, silence ends the wait
at the poll interval, and a killed LISTEN connection is replaced (with a hint, so the consumer
re-reads what it may have missed)."""

from __future__ import annotations

import asyncio
import time

import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st
from oa_sync_core.protocol.backoff import BackoffPolicy
from oa_sync_server.postgres.follower import MAX_PAYLOADS, LogFollower, libpq_url
from oa_sync_server.postgres.tables import changes_hint
from sqlalchemy.ext.asyncio import AsyncEngine

WAIT_S = 15.0


async def test_notify_wakes_and_silence_polls(engine: AsyncEngine) -> None:
    """A notification on the channel ends a wait long before the poll interval; without one
    the wait lasts the interval (the poll fallback)."""
    async with LogFollower(libpq_url(engine), "oa_sync_changes", poll_interval_s=0.3) as follower:
        async with asyncio.timeout(WAIT_S):
            await follower.listening.wait()
        await follower.wait()  # the connect hint
        started = time.monotonic()
        await follower.wait()
        assert time.monotonic() - started >= 0.25
        waiting = asyncio.create_task(follower.wait(timeout_s=WAIT_S))
        async with engine.connect() as conn:
            await conn.execute(sa.text("SELECT pg_notify('oa_sync_changes', '1')"))
            await conn.commit()
        started = time.monotonic()
        await asyncio.wait_for(waiting, WAIT_S)
        assert time.monotonic() - started < WAIT_S / 2


async def test_killed_listener_reconnects_with_a_hint(engine: AsyncEngine) -> None:
    """Terminating the LISTEN backend sets the hint, counts a reconnect, and a new backend
    listens again."""
    reconnects: list[int] = []
    follower = LogFollower(
        libpq_url(engine),
        "oa_sync_events",
        poll_interval_s=30,
        backoff=BackoffPolicy(base_s=0.01, cap_s=0.05),
        on_reconnect=lambda: reconnects.append(1),
    )
    async with follower:
        async with asyncio.timeout(WAIT_S):
            await follower.listening.wait()
        old = follower.backend_pid
        follower.hint.clear()
        async with engine.connect() as conn:
            await conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": old})
        async with asyncio.timeout(WAIT_S):
            await follower.hint.wait()
            while follower.backend_pid in (None, old):
                await follower.wait(timeout_s=0.05)
        assert reconnects == [1]


def test_unknown_channel_is_refused() -> None:
    """Only the server's two channels can be followed (no SQL is composed from a name)."""
    with pytest.raises(ValueError, match="unknown channel"):
        LogFollower("postgresql://", "x; DROP TABLE y", poll_interval_s=1)


async def test_a_wake_names_the_payloads_it_stands_for(engine: AsyncEngine) -> None:
    """``wait`` returns the payloads of the notifications it woke for, so a consumer may skip
    a read for what it already holds; a wake that names nothing (the connect, a plain
    ``wake``, the poll interval, too many payloads) returns ``None``: read."""
    async with LogFollower(libpq_url(engine), "oa_sync_changes", poll_interval_s=0.2) as follower:
        async with asyncio.timeout(WAIT_S):
            await follower.listening.wait()
        assert await follower.wait() is None  # the connect hint: read whatever was missed
        assert await follower.wait() is None  # the poll interval: read
        async with engine.connect() as conn:
            for payload in ("e:1", "e:2", "e:2"):
                await conn.execute(
                    sa.text("SELECT pg_notify('oa_sync_changes', :p)"), {"p": payload}
                )
                await conn.commit()
        named: set[str] = set()
        async with asyncio.timeout(WAIT_S):
            while named != {"e:1", "e:2"}:
                got = await follower.wait(timeout_s=WAIT_S)
                assert got is not None
                named |= got
        follower.wake(read=False)
        assert await follower.wait(timeout_s=WAIT_S) == frozenset()
        follower.wake(read=False)
        follower.wake()
        assert await follower.wait(timeout_s=WAIT_S) is None
        for i in range(MAX_PAYLOADS + 1):
            follower._notified(f"e:{i}")
        assert await follower.wait(timeout_s=WAIT_S) is None


@given(epoch=st.text(min_size=1), watermark=st.integers(0, 2**63 - 1))
def test_a_changes_hint_reads_back_what_the_writer_sent(epoch: str, watermark: int) -> None:
    """``<epoch>:<watermark>`` names its epoch (colons and all) and watermark."""
    assert changes_hint(f"{epoch}:{watermark}") == (epoch, watermark)


@pytest.mark.parametrize(
    "payload", ["", "7", ":7", "e:", "e:-1", "e:+1", "e: 1", "e:1.0", "e:٣", "e:²", "e:" + "9" * 20]
)
def test_a_changes_hint_of_another_form_names_nothing(payload: str) -> None:
    """Anything else (an older server's bare watermark, garbage) names nothing: read."""
    assert changes_hint(payload) is None
