"""Test helpers of tests/scale: an appender over a fixed set of runs, and a WebSocket client
that records every update it receives and checks their order."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import orjson
import sqlalchemy as sa
from oa_sync_core import NewEvent
from oa_sync_core.testing import new_event
from oa_sync_server.postgres.event_log import PostgresEventLog
from sqlalchemy.ext.asyncio import AsyncEngine

from bench._server import token

RUNS = 40
TOPICS = ("runtime/run_summary:*",)


def step(run: int, index: int) -> NewEvent:
    """Event ``index`` of run ``r<run>`` (``run.created`` first, then steps)."""
    if index == 0:
        return new_event("run.created", f"r{run}", agentId="a", threadId=f"t{run}")
    return new_event(
        "run.step", f"r{run}", stepIndex=index, description=f"s{index}", progressPercent=index % 100
    )


class Appender:
    """Appends events round-robin over ``RUNS`` runs, remembering each run's next index."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.log = PostgresEventLog(engine)
        self.next = dict.fromkeys(range(RUNS), 0)

    async def append(self, total: int, batch: int = 20) -> None:
        """Append ``total`` events in batches of ``batch``."""
        order = [i % RUNS for i in range(total)]
        for i in range(0, total, batch):
            events = []
            for run in order[i : i + batch]:
                events.append(step(run, self.next[run]))
                self.next[run] += 1
            await self.log.append(events)


class Client:
    """One WebSocket client subscribed to every run summary, recording what it receives."""

    def __init__(self, ws_url: str) -> None:
        self.ws_url = ws_url
        self.frames: list[tuple[str, int, int]] = []  # (doc_key, version, watermark)
        self.latest: dict[str, int] = {}
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Client:
        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(self.ws_url, protocols=("oa-sync.v1.json",))
        await self._ws.send_str(orjson.dumps({"authenticate": {"token": token()}}).decode())
        subscribe = {"subscribe": {"subscriptionId": "s1", "topics": list(TOPICS)}}
        await self._ws.send_str(orjson.dumps(subscribe).decode())
        synced = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._read(synced))
        await asyncio.wait_for(synced, 30)
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._ws.close()
        await self._session.close()

    async def _read(self, synced: asyncio.Future[None]) -> None:
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = orjson.loads(msg.data)
            update = data.get("update")
            if update is not None:
                key, version = update["docKey"], int(update["version"])
                self.frames.append((key, version, int(update["watermark"])))
                self.latest[key] = max(self.latest.get(key, 0), version)
                self._changed.set()
            elif "synced" in data and not synced.done():
                synced.set_result(None)
            elif "error" in data:
                raise AssertionError(f"error frame: {data}")

    async def converge(self, expected: dict[str, int], within_s: float) -> None:
        """Wait until every document reached at least its expected version."""
        async with asyncio.timeout(within_s):
            while any(self.latest.get(k, 0) < v for k, v in expected.items()):
                self._changed.clear()
                await self._changed.wait()

    def check_order(self) -> None:
        """No duplicate or stale frame: versions only increase per document, watermarks
        only increase on the connection."""
        seen: dict[str, int] = {}
        last_watermark = 0
        for key, version, watermark in self.frames:
            assert version > seen.get(key, 0), f"stale or duplicate {key} v{version}"
            assert watermark > last_watermark, f"watermark went back at {key} v{version}"
            seen[key] = version
            last_watermark = watermark


async def expected_versions(engine: AsyncEngine) -> dict[str, int]:
    """Every document's version in Postgres (the truth clients must converge to)."""
    async with engine.connect() as conn:
        rows = await conn.execute(sa.text("SELECT doc_key, version FROM oa_sync.documents"))
        return {key: int(version) for key, version in rows}
