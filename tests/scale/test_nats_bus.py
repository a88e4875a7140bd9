"""The NATS fan-out bus on real NATS and real Postgres: instances converge, outages fall back to
Postgres, a change committed but not published is republished by the next lease holder.

Each module run starts its own ``nats-server`` on a free port (never the machine's on 4222).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from oa_sync_server.bus.nats import NatsBus
from oa_sync_server.fanout import Hub, LiveDoc
from oa_sync_server.metrics import Metrics
from oa_sync_server.postgres import create_engine
from oa_sync_server.worker import ProjectorWorker
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bench._nats import NATS_SERVER, NatsServer
from bench._server import ServerProcess
from tests.scale._cluster import Appender, Client, expected_versions

pytestmark = [
    pytest.mark.skipif(
        not Path(NATS_SERVER).exists(),
        reason="nats-server binary absent (apt-get install nats-server)",
    ),
    pytest.mark.timeout(300),
]


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A private JetStream server for this module."""
    server = NatsServer(tmp_path_factory.mktemp("nats-store"))
    server.start()
    yield server
    server.stop()


async def projected(engine: AsyncEngine, events: int, within_s: float) -> dict[str, int]:
    """Wait until the servers' projector folded ``events`` events; the versions then."""
    async with asyncio.timeout(within_s):
        while True:
            versions = await expected_versions(engine)
            if sum(versions.values()) >= events:
                return versions
            await asyncio.sleep(0.1)  # polling Postgres for a condition, not a sync sleep


def metric(server: ServerProcess, name: str, label: str) -> float:
    """A counter's value from the server's ``/metrics`` (0 when absent)."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as answer:  # noqa: S310
        text = answer.read().decode()
    found = re.search(rf"^oa_sync_{name}_total\{{{label}\}} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


@contextlib.contextmanager
def servers(database_url: str, count: int, **env: Any) -> Iterator[list[ServerProcess]]:
    """``count`` ``oa-sync serve`` processes on one database."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(ServerProcess(database_url, **env)) for _ in range(count)]


@contextlib.asynccontextmanager
async def clients(urls: list[str], per_server: int) -> AsyncIterator[list[Client]]:
    """``per_server`` clients on each server."""
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(Client(url)) for url in urls for _ in range(per_server)
        ]


async def test_three_instances_converge_and_reads_per_change_stay_flat(
    database_url: str, engine: AsyncEngine, nats_server: NatsServer
) -> None:
    """Three server processes with OA_SYNC_FANOUT=nats and clients on each: after 2,000
    appends every client holds every document's final version, versions only increase, and
    each instance delivers the changes from the bus with a bounded number of Postgres reads
    (audits, not pages per change), so total reads per change do not grow with instances."""
    env = {"fanout": "nats", "nats_url": nats_server.url, "poll_interval_s": "1"}
    with servers(database_url, 3, **env) as procs:
        async with clients([p.ws_url for p in procs], 2) as subs:
            await Appender(engine).append(2000)
            expected = await projected(engine, 2000, 120)
            for sub in subs:
                await sub.converge(expected, 60)
                sub.check_order()
        published = sum(metric(p, "bus_published", 'kind="commit"') for p in procs)
        assert published >= len(expected)
        for proc in procs:
            from_bus = metric(proc, "hub_changes", 'source="bus"')
            pages = metric(proc, "hub_reads", 'kind="page"')
            from_pg = metric(proc, "hub_changes", 'source="postgres"')
            # Nearly every change came over the bus; Postgres pages stay a handful.
            assert from_bus >= 0.9 * (from_bus + from_pg), (from_bus, from_pg)
            assert pages <= 0.05 * 2000, pages


async def test_nats_outage_falls_back_to_postgres_without_duplicates(
    database_url: str, engine: AsyncEngine, nats_server: NatsServer
) -> None:
    """NATS stopped and restarted mid-run: clients on two instances keep receiving through
    the Postgres fallback while it is down, converge, and never get a duplicate or stale
    frame."""
    env = {"fanout": "nats", "nats_url": nats_server.url, "poll_interval_s": "0.5"}
    appender = Appender(engine)
    with servers(database_url, 2, **env) as procs:
        async with clients([p.ws_url for p in procs], 2) as subs:
            await appender.append(300)
            expected = await projected(engine, 300, 60)
            for sub in subs:
                await sub.converge(expected, 60)
            nats_server.stop()
            try:
                await appender.append(300)
                expected = await projected(engine, 600, 60)
                for sub in subs:
                    await sub.converge(expected, 60)  # Postgres alone brought these
            finally:
                nats_server.start()
            await appender.append(300)
            expected = await projected(engine, 900, 60)
            for sub in subs:
                await sub.converge(expected, 60)
                sub.check_order()
        assert all(metric(p, "hub_changes", 'source="postgres"') > 0 for p in procs)


class CrashingWorker(ProjectorWorker):
    """A projector that 'dies' after its next commit, before publishing: it hangs at the
    ``committed`` seam until cancelled, and never releases its lease."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.crash = False
        self.crashed = asyncio.Event()

    async def _pause(self, stage: str, conn: AsyncConnection | None) -> None:
        if stage == "committed" and self.crash:
            self.crashed.set()
            await asyncio.Event().wait()  # the process is gone: nothing after this runs


async def test_change_committed_but_not_published_is_republished_by_next_holder(
    database_url: str, nats_server: NatsServer
) -> None:
    """The projector dies between commit and publish: the next lease holder republishes the
    missing changes from Postgres and every instance's hub receives them over the bus (the
    hubs' own Postgres audit is an hour away, so only the republish can deliver them)."""
    engine = create_engine(database_url)
    buses = [NatsBus(nats_server.url) for _ in range(4)]
    hubs = [Hub(engine, poll_interval_s=3600, bus=bus, metrics=Metrics()) for bus in buses[:2]]
    try:
        for bus in buses:
            bus.start()
            await bus.wait_ready(10)
        for hub in hubs:
            await hub.start()
        feeds = [hub.attach(10_000) for hub in hubs]
        first = CrashingWorker(engine, holder="first", lease_ttl_s=1.0, bus=buses[2])
        appender = Appender(engine)
        await appender.append(40)
        await first.catch_up()  # published normally: the stream now holds a last message
        top = first.watermark
        for hub in hubs:
            await hub.wait_for(top, 10)
        await appender.append(40)
        first.crash = True
        # catch_up waits for the read horizon (another transaction may hold it) and commits.
        crashed = asyncio.create_task(first.catch_up())
        await asyncio.wait_for(first.crashed.wait(), 60)
        crashed.cancel()  # killed: no publish, no release
        with contextlib.suppress(asyncio.CancelledError):
            await crashed
        async with engine.connect() as conn:
            committed = int(
                (
                    await conn.execute(sa.text("SELECT max(watermark) FROM oa_sync.documents"))
                ).scalar_one()
            )
        assert committed > top
        second = ProjectorWorker(engine, holder="second", lease_ttl_s=1.0, bus=buses[3])
        for _ in range(100):  # until the dead holder's lease expires (10 s at most)
            if await second.acquire():
                break
            await asyncio.sleep(0.1)
        assert second.epoch
        assert buses[3].republished > 0
        for hub, feed in zip(hubs, feeds, strict=True):
            await hub.wait_for(committed, 10)
            got: list[LiveDoc] = []
            while feed.pending:
                got.append(await anext(feed))
            watermarks = [live.watermark for live in got]
            assert watermarks == sorted(set(watermarks))
            assert watermarks[-1] == committed
            assert hub._metrics is not None
            assert hub._metrics.hub_reads.labels("page")._value.get() == 0
    finally:
        for hub in hubs:
            await hub.stop()
        for bus in buses:
            await bus.stop()
        await engine.dispose()
