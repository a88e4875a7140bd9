"""The fan-out hub over a real server and Postgres: one read per change shared by every feed,
watermark order, bounded feeds, and NOTIFY treated as a hint (re-LISTEN then re-read)."""

from __future__ import annotations

import asyncio

import psycopg
from oa_sync_core.testing import new_event
from oa_sync_server.fanout import Feed, LiveDoc

from tests.live import LiveServer, make_live_server

WAIT_S = 15.0


async def take(feed: Feed, n: int) -> list[LiveDoc]:
    """The next ``n`` changes of a feed (bounded wait)."""
    out: list[LiveDoc] = []
    async with asyncio.timeout(WAIT_S):
        async for live in feed:
            out.append(live)
            if len(out) == n:
                break
    return out


async def test_every_feed_gets_every_change_once_in_watermark_order(
    live_server: LiveServer,
) -> None:
    """Two feeds see the same changes, in increasing watermark order, sharing one encoding."""
    hub = live_server.state.hub
    a, b = hub.attach(100), hub.attach(100)
    await live_server.append([new_event("run.created", f"r{i}", agentId="a") for i in range(3)])
    await live_server.settle()  # else r1's two versions may coalesce into one change
    await live_server.append([new_event("run.started", "r1")])
    got_a, got_b = await take(a, 4), await take(b, 4)
    marks = [live.row.watermark for live in got_a]
    assert marks == sorted(marks)
    assert len(set(marks)) == 4
    assert [x.row.doc_key for x in got_a] == [x.row.doc_key for x in got_b]
    assert all(x.update is y.update for x, y in zip(got_a, got_b, strict=True))
    assert got_a[-1].row.doc_key == "runtime/run_summary:r1"
    assert got_a[-1].row.version == 2
    assert hub.watermark == marks[-1]


async def test_overflowed_feed_ends_and_others_keep_receiving(live_server: LiveServer) -> None:
    """A feed that is not drained overflows and ends; a drained feed keeps receiving."""
    hub = live_server.state.hub
    slow, fast = hub.attach(2), hub.attach(100)
    await live_server.append([new_event("run.created", f"r{i}") for i in range(5)])
    assert len(await take(fast, 5)) == 5
    assert slow.overflowed
    assert slow.closed
    assert [x async for x in slow] == []
    await live_server.append([new_event("run.created", "late")])
    assert (await take(fast, 1))[0].row.doc_key == "runtime/run_summary:late"
    assert hub.feeds == 1


async def test_closed_feed_stops_iteration(live_server: LiveServer) -> None:
    """Closing a feed ends a pending iteration and detaches it from the hub."""
    feed = live_server.state.hub.attach(10)
    waiter = asyncio.create_task(take(feed, 1))
    await asyncio.sleep(0)
    feed.close()
    assert await asyncio.wait_for(waiter, WAIT_S) == []
    assert live_server.state.hub.feeds == 0


async def test_terminated_listen_connection_reconnects_and_rereads(database_url: str) -> None:
    """pg_terminate_backend on the LISTEN connection: the hub re-LISTENs, then re-reads, so
    changes committed while it was deaf still arrive (poll interval far longer than the wait)."""
    async with make_live_server(database_url, poll_interval_s=600.0) as server:
        hub = server.state.hub
        async with asyncio.timeout(WAIT_S):
            await hub.listening.wait()
        feed = hub.attach(1000)
        await server.append([new_event("run.created", "before")])
        assert (await take(feed, 1))[0].row.doc_key == "runtime/run_summary:before"
        old_pid = hub.listener_pid
        assert old_pid is not None
        async with await psycopg.AsyncConnection.connect(
            server.database_url, autocommit=True
        ) as admin:
            await admin.execute("SELECT pg_terminate_backend(%s)", (old_pid,))
            # Appends while the hub may be deaf.
            for i in range(20):
                await server.append([new_event("run.created", f"during{i}")])
        got = await take(feed, 20)
        assert {x.row.doc_key for x in got} == {f"runtime/run_summary:during{i}" for i in range(20)}
        assert hub.listener_pid not in (None, old_pid)
        reconnects = server.state.metrics.listener_reconnects._value.get()
        assert reconnects >= 1
