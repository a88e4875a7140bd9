"""The fan-out hub over a real server and Postgres: one read per change shared by every feed,
watermark order, bounded feeds, and NOTIFY treated as a hint (re-LISTEN then re-read)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import sqlalchemy as sa
from oa_sync_core import DocumentUpdate
from oa_sync_core.codec import canonical_json, content_hash
from oa_sync_core.testing import new_event
from oa_sync_core.topics import parse_topic
from oa_sync_server.bus.changes import BusChange
from oa_sync_server.fanout import Feed, Hub, LiveDoc
from oa_sync_server.postgres.read_model import DocRow
from oa_sync_server.postgres.stores import write_updates
from oa_sync_server.postgres.tables import NOTIFY_CHANGES, sync_meta

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


async def test_feeds_with_topics_get_only_their_changes_each_once(
    live_server: LiveServer,
) -> None:
    """A feed that declared topics is offered only what they cover (exact keys and prefixes),
    a change covered twice arrives once, and a feed without topics still gets everything."""
    hub = live_server.state.hub
    everything = hub.attach(100)
    exact = hub.attach(100)
    exact.set_topics([parse_topic("runtime/run_summary:r1")])
    both = hub.attach(100)
    both.set_topics([parse_topic("runtime/run_summary:r1"), parse_topic("runtime/run_*")])
    workers = hub.attach(100)
    workers.set_topics([parse_topic("runtime/codex_worker_summary:*")])
    nothing = hub.attach(100)
    nothing.set_topics([])
    await live_server.append(
        [
            new_event("run.created", "r1"),
            new_event("run.created", "r2"),
            new_event("worker.started", "w1"),
        ]
    )
    got = [x.row.doc_key for x in await take(everything, 3)]
    assert sorted(got) == [
        "runtime/codex_worker_summary:w1",
        "runtime/run_summary:r1",
        "runtime/run_summary:r2",
    ]
    await live_server.append([new_event("run.created", "last")])
    assert (await take(everything, 1))[0].row.doc_key == "runtime/run_summary:last"
    # Everything up to "last" has been offered: what each feed holds now is all it will get.
    assert [x.row.doc_key for x in drain(exact)] == ["runtime/run_summary:r1"]
    assert [x.row.doc_key for x in drain(both)] == [
        key for key in got if key.startswith("runtime/run_")
    ] + ["runtime/run_summary:last"]
    assert [x.row.doc_key for x in drain(workers)] == ["runtime/codex_worker_summary:w1"]
    assert drain(nothing) == []
    for feed in (exact, both, workers, nothing):
        feed.close()
    everything.set_topics(None)
    assert hub.feeds == 1


async def test_retargeted_feed_follows_its_new_topics(live_server: LiveServer) -> None:
    """Changing a feed's topics moves it in the hub's index: old topics stop, new ones start."""
    hub = live_server.state.hub
    probe, feed = hub.attach(100), hub.attach(100)
    feed.set_topics([parse_topic("runtime/run_summary:a")])
    await live_server.append([new_event("run.created", "a")])
    assert len(await take(probe, 1)) == 1
    feed.set_topics([parse_topic("runtime/run_summary:b*")])
    await live_server.append([new_event("run.created", "a2"), new_event("run.created", "b1")])
    await live_server.append([new_event("run.started", "a")])
    assert len(await take(probe, 3)) == 3
    assert [x.row.doc_key for x in drain(feed)] == [
        "runtime/run_summary:a",
        "runtime/run_summary:b1",
    ]


def drain(feed: Feed) -> list[LiveDoc]:
    """What a feed holds right now, without waiting."""
    out: list[LiveDoc] = []
    while feed.pending:
        out.append(feed._queue.get_nowait())
    return out


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
    changes committed while it was deaf still arrive (poll interval far longer than the wait).
    The hub is one of another process, as it were: no projector of its own hands it changes."""
    async with (
        make_live_server(database_url, poll_interval_s=600.0) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        metrics = server.state.metrics
        hub = Hub(server.engine, poll_interval_s=600.0, metrics=metrics)
        await hub.start()
        stack.push_async_callback(hub.stop)
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
        reconnects = metrics.listener_reconnects._value.get()
        assert reconnects >= 1


async def test_poll_fallback_delivers_without_any_notify(live_server: LiveServer) -> None:
    """A hub whose LISTEN connection can never be made still delivers, by polling."""
    hub = Hub(
        live_server.engine,
        poll_interval_s=0.1,
        listen_url="postgresql://nobody@127.0.0.1:1/none?connect_timeout=1",
    )
    await hub.start()
    try:
        feed = hub.attach(100)
        await live_server.append([new_event("run.created", "polled")])
        got = await take(feed, 1)
        assert got[0].row.doc_key == "runtime/run_summary:polled"
        assert not hub.listening.is_set()
    finally:
        await hub.stop()


async def test_epoch_change_ends_feeds_and_rebases(live_server: LiveServer) -> None:
    """When the log epoch changes, every feed ends with ``epoch_changed`` and the hub follows
    the new epoch."""
    hub = live_server.state.hub
    feed = hub.attach(10)
    async with live_server.engine.begin() as conn:
        await conn.execute(
            sa.update(sync_meta).where(sync_meta.c.key == "epoch").values(value="new-epoch")
        )
    hub.wake()
    assert await take(feed, 1) == []
    assert feed.epoch_changed
    assert hub.epoch == "new-epoch"


async def test_two_servers_on_one_database_both_deliver(database_url: str) -> None:
    """Two server processes' worth of apps on one database: one projects, both deliver every
    update to their own clients."""
    async with make_live_server(database_url) as a, make_live_server(database_url) as b:
        feed_a, feed_b = a.state.hub.attach(100), b.state.hub.attach(100)
        await a.append([new_event("run.created", f"r{i}") for i in range(3)])
        await b.append([new_event("worker.started", "w1")])
        keys = {"runtime/run_summary:r0", "runtime/run_summary:r1", "runtime/run_summary:r2"}
        keys.add("runtime/codex_worker_summary:w1")
        assert {x.row.doc_key for x in await take(feed_a, 4)} == keys
        assert {x.row.doc_key for x in await take(feed_b, 4)} == keys


async def test_hub_with_nobody_attached_reads_no_bodies_and_still_advances(
    live_server: LiveServer,
) -> None:
    """A process nobody listens to passes changes over as watermarks alone (wait=visible
    still sees them), and a feed attached afterwards gets the changes that follow."""
    hub = live_server.state.hub
    pages: list[int] = []
    real_page = hub._reader.page

    async def counted_page(after: int, limit: int) -> tuple[str | None, list[tuple[Any, float]]]:
        epoch, rows = await real_page(after, limit)
        pages.extend(row.watermark for row, _ in rows)
        return epoch, rows

    hub._reader.page = counted_page  # type: ignore[method-assign]
    await live_server.append([new_event("run.created", f"q{i}") for i in range(3)])
    assert await live_server.settle() == hub.watermark == 3  # delivered: wait=visible's signal
    assert pages == []  # no body was read for changes nobody wanted
    feed = hub.attach(10)
    await live_server.append([new_event("run.started", "q1")])
    [live] = await take(feed, 1)
    assert (live.row.doc_key, live.row.version) == ("runtime/run_summary:q1", 2)


async def test_feed_attached_while_the_hub_skips_gets_that_page(live_server: LiveServer) -> None:
    """The hub decides after its read whether anyone listens: a feed that attaches while a
    bodiless read is in flight is offered that page's changes, none passed over. (A hub of a
    process without the projector: the projector's own hub takes its commits from it.)"""
    hub = Hub(live_server.engine, poll_interval_s=600.0)
    await hub.start()
    try:
        await _attach_during_a_skip(live_server, hub)
    finally:
        await hub.stop()


async def _attach_during_a_skip(live_server: LiveServer, hub: Hub) -> None:
    async with asyncio.timeout(WAIT_S):
        await hub.listening.wait()
    real_skip = hub._reader.skip
    in_flight, release = asyncio.Event(), asyncio.Event()

    async def gated_skip(after: int, limit: int) -> tuple[str | None, int | None, int]:
        result = await real_skip(after, limit)
        if result[1] is not None and not in_flight.is_set():
            in_flight.set()
            await release.wait()
        return result

    hub._reader.skip = gated_skip  # type: ignore[method-assign]
    await live_server.append([new_event("run.created", "late")])
    async with asyncio.timeout(WAIT_S):
        await in_flight.wait()
    feed = hub.attach(10)
    release.set()
    [live] = await take(feed, 1)
    assert live.row.doc_key == "runtime/run_summary:late"


def _update(doc_key: str, version: int) -> DocumentUpdate:
    body: dict[str, Any] = {"runId": doc_key.rpartition(":")[2], "stepCount": version}
    canonical = canonical_json(body)
    return DocumentUpdate(
        projection="runtime/run_summary",
        doc_key=doc_key,
        version=version,
        body=body,
        canonical=canonical,
        content_hash=content_hash(canonical),
        last_position=0,
    )


def _reads(server: LiveServer, kind: str = "page") -> float:
    return float(server.state.metrics.hub_reads.labels(kind)._value.get())


@contextlib.asynccontextmanager
async def _hub_of_a_projector(database_url: str) -> AsyncIterator[tuple[LiveServer, Feed]]:
    """A server whose hub listens (poll interval ten minutes: only hints and the bus move
    it) and a feed of it that has received one change, run ``r0`` created."""
    async with make_live_server(database_url, poll_interval_s=600.0) as server:
        hub = server.state.hub
        async with asyncio.timeout(WAIT_S):
            await hub.listening.wait()
        feed = hub.attach(1000)
        await server.append([new_event("run.created", "r0")])
        await take(feed, 1)
        yield server, feed


async def test_the_projectors_commits_reach_its_own_hub_without_a_read(database_url: str) -> None:
    """In the process that runs the projector, the hub takes each committed batch from it
    (the local bus): a bus change the hub can place (the next watermark of its epoch) is
    delivered though it is not in Postgres at all, and a commit's hint that names a watermark
    already delivered reads nothing (at most one read per batch)."""
    async with _hub_of_a_projector(database_url) as (server, feed):
        hub = server.state.hub
        await server.settle()
        reads = _reads(server)
        for i in range(1, 6):
            await server.append([new_event("run.created", f"r{i}")])
            assert [x.row.doc_key for x in await take(feed, 1)] == [f"runtime/run_summary:r{i}"]
        await server.settle()
        # The hint comes on another connection and may overtake its batch's hand-over (then
        # that batch is read, as without the bus; on a loaded machine every one of these
        # did): at most one read per batch, never a read for the hand-over itself.
        assert _reads(server) - reads <= 5
        bus = server.state.projector.bus if server.state.projector else None
        assert bus is not None
        change = BusChange(
            epoch=hub.epoch,
            row=DocRow(
                doc_key="runtime/run_summary:only-on-the-bus",
                projection="runtime/run_summary",
                version=1,
                watermark=hub.watermark + 1,
                content_hash="h",
                body=b"{}",
            ),
            committed_at=0.0,
        )
        await bus.publish([change])
        got = await take(feed, 1)
        assert got[0].row.doc_key == "runtime/run_summary:only-on-the-bus"
        assert hub.watermark == change.watermark


async def test_a_hint_from_another_writer_is_read_at_once(database_url: str) -> None:
    """A document writer other than this process's projector (a reprojection, the projector
    of another process) commits changes the local bus never carries: its hint names a
    watermark the hub has not delivered, so the hub reads Postgres at once (the poll interval
    here is ten minutes)."""
    async with _hub_of_a_projector(database_url) as (server, feed):
        async with server.engine.begin() as conn:
            written = await write_updates(conn, [_update("runtime/run_summary:elsewhere", 1)])
            await conn.execute(NOTIFY_CHANGES, {"watermark": str(written.last_watermark)})
        got = await take(feed, 1)
        assert got[0].row.doc_key == "runtime/run_summary:elsewhere"


async def test_a_hint_in_another_epoch_is_read_whatever_its_watermark(database_url: str) -> None:
    """A hint names its epoch: after a rebuild restarted watermarks, a hint at or below the
    hub's watermark but in the new epoch still makes the hub read (and see the new epoch)."""
    async with _hub_of_a_projector(database_url) as (server, feed):
        hub = server.state.hub
        async with server.engine.begin() as conn:
            await conn.execute(
                sa.update(sync_meta).where(sync_meta.c.key == "epoch").values(value="rebuilt")
            )
            await conn.execute(NOTIFY_CHANGES, {"watermark": "1"})
        assert await take(feed, 1) == []
        assert feed.epoch_changed
        assert hub.epoch == "rebuilt"


async def test_a_run_of_bus_changes_is_delivered_coalesced_as_a_page_read(
    database_url: str,
) -> None:
    """Changes the hub takes from the bus in one pass reach the feeds as a read of Postgres
    would give them: each document once, at its latest version, in watermark order."""
    async with make_live_server(database_url, poll_interval_s=600.0) as server:
        hub = server.state.hub
        async with asyncio.timeout(WAIT_S):
            await hub.listening.wait()
        await server.settle()
        feed = hub.attach(1000)
        bus = server.state.projector.bus if server.state.projector else None
        assert bus is not None
        start = hub.watermark

        def change(key: str, version: int, offset: int) -> BusChange:
            row = DocRow(
                doc_key=f"runtime/run_summary:{key}",
                projection="runtime/run_summary",
                version=version,
                watermark=start + offset,
                content_hash="h",
                body=b"{}",
            )
            return BusChange(epoch=hub.epoch, row=row, committed_at=0.0)

        await bus.publish([change("a", 1, 1), change("b", 1, 2), change("a", 2, 3)])
        got = await take(feed, 2)
        assert [(x.row.doc_key[-1], x.row.version, x.row.watermark) for x in got] == [
            ("b", 1, start + 2),
            ("a", 2, start + 3),
        ]
        assert hub.watermark == start + 3
