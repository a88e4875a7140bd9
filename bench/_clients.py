"""Load-generator processes: WebSocket subscribers, a paced appender and a paced publisher.

Each function named ``*_process`` runs in its own child process (multiprocessing, spawn) so
the load is generated outside the server. Times are ``time.monotonic()``, which on Linux is
one clock for every process of the machine, so a commit time taken in the appender and a
receipt time taken in a subscriber can be subtracted.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
import orjson

JSON_PROTOCOL = "oa-sync.v1.json"
CONNECT_CONCURRENCY = 50
"""Handshakes in flight per client process (more only queues them inside the server)."""


def doc_key(run: int) -> str:
    """The run summary document of run ``r<run>``."""
    return f"runtime/run_summary:r{run}"


# ---------------------------------------------------------------------------------------------
# Subscribers
# ---------------------------------------------------------------------------------------------


def subscriber_process(
    ws_url: str,
    token: str,
    *,
    topic_sets: Sequence[Sequence[str]],
    control: Any,
    results: Any,
    resume: dict[str, Any] | None = None,
    first_index: int = 0,
    connect_budget_s: float | None = None,
) -> None:
    """Open one authenticated, subscribed socket per topic set, record every update received.

    Protocol with the parent: puts ``("ready", connected, seconds, sync_times)`` on
    ``results`` once every socket is synced, then waits for ``"stop"`` on ``control`` and
    puts ``("records", [(conn, doc_key, version, t_received), ...], bytes_received)``;
    ``conn`` counts from ``first_index``. With ``connect_budget_s``, sockets whose handshake
    would start after that many seconds are not opened (counted in ``skipped``).
    """
    try:
        _run_subscribers(
            ws_url,
            token,
            topic_sets=topic_sets,
            control=control,
            results=results,
            resume=resume,
            first_index=first_index,
            connect_budget_s=connect_budget_s,
        )
    except BaseException as exc:
        results.put(("error", f"{type(exc).__name__}: {exc}"))
        raise


def _run_subscribers(ws_url: str, token: str, **kwargs: Any) -> None:
    asyncio.run(_subscribers(ws_url, token, **kwargs))


async def _subscribers(
    ws_url: str,
    token: str,
    *,
    topic_sets: Sequence[Sequence[str]],
    control: Any,
    results: Any,
    resume: dict[str, Any] | None,
    first_index: int,
    connect_budget_s: float | None,
) -> None:
    records: list[tuple[int, str, int, float]] = []
    received = [0]
    failures: list[str] = []
    skipped = [0]
    start = time.monotonic()
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def until_synced(index: int, ws: aiohttp.ClientWebSocketResponse) -> None:
            while True:
                msg = await ws.receive()
                if msg.type != aiohttp.WSMsgType.TEXT:
                    raise RuntimeError(f"socket {index} ended before synced: {msg.type} {msg.data}")
                received[0] += len(msg.data)
                data = orjson.loads(msg.data)
                update = data.get("update")
                if update is not None:
                    records.append(
                        (index, update["docKey"], int(update["version"]), time.monotonic())
                    )
                elif "synced" in data:
                    return
                elif "error" in data:
                    raise RuntimeError(f"socket {index}: {data}")

        async def connect(
            index: int, topics: Sequence[str]
        ) -> tuple[aiohttp.ClientWebSocketResponse, float] | None:
            async with gate:
                if connect_budget_s is not None and time.monotonic() - start > connect_budget_s:
                    skipped[0] += 1
                    return None
                try:
                    ws = await session.ws_connect(
                        ws_url, protocols=(JSON_PROTOCOL,), max_msg_size=16 * 2**20, autoping=True
                    )
                    await ws.send_str(orjson.dumps({"authenticate": {"token": token}}).decode())
                    subscribe: dict[str, Any] = {"subscriptionId": "s1", "topics": list(topics)}
                    if resume is not None:
                        subscribe["resume"] = resume
                    t0 = time.monotonic()
                    await ws.send_str(orjson.dumps({"subscribe": subscribe}).decode())
                    await until_synced(index, ws)
                except (aiohttp.ClientError, RuntimeError, OSError, TimeoutError) as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")
                    return None
                return ws, time.monotonic() - t0

        start = time.monotonic()
        attempts = await asyncio.gather(
            *(connect(first_index + i, t) for i, t in enumerate(topic_sets))
        )
        opened = [a for a in attempts if a is not None]
        connected = time.monotonic() - start
        sockets = [ws for ws, _ in opened]
        results.put(
            (
                "ready",
                len(sockets),
                connected,
                [s for _, s in opened],
                received[0],
                len(failures),
                failures[0] if failures else "",
                skipped[0],
            )
        )

        async def read(index: int, ws: aiohttp.ClientWebSocketResponse) -> None:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                now = time.monotonic()
                received[0] += len(msg.data)
                update = orjson.loads(msg.data).get("update")
                if update is not None:
                    records.append((index, update["docKey"], int(update["version"]), now))

        readers = [asyncio.create_task(read(first_index + i, ws)) for i, ws in enumerate(sockets)]
        loop = asyncio.get_running_loop()
        while True:
            try:
                command = await loop.run_in_executor(None, control.get, True, 0.5)
            except queue.Empty:
                continue
            if command == "stop":
                break
        dropped = sum(1 for task in readers if task.done())
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    results.put(("records", records, received[0], dropped))


class Fleet:
    """Subscriber processes driven from the parent: ``start`` until all synced, then ``stop``.

    Args:
        ws_url: the server's WebSocket URL.
        token: the bearer token every socket authenticates with.
        sets: one topic list per socket.
        processes: how many client processes share the sockets (contiguous slices).
        resume: a ``resume`` object sent with every subscription, if any.
        connect_budget_s: open no new socket after this many seconds (``skipped``).
    """

    def __init__(
        self,
        ws_url: str,
        token: str,
        sets: Sequence[Sequence[str]],
        *,
        processes: int,
        resume: dict[str, Any] | None = None,
        connect_budget_s: float | None = None,
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._results = ctx.Queue()
        self._controls = [ctx.Queue() for _ in range(processes)]
        size = -(-len(sets) // processes)
        self._procs = [
            ctx.Process(
                target=subscriber_process,
                args=(ws_url, token),
                kwargs={
                    "topic_sets": list(sets[i * size : (i + 1) * size]),
                    "control": control,
                    "results": self._results,
                    "resume": resume,
                    "first_index": i * size,
                    "connect_budget_s": connect_budget_s,
                },
            )
            for i, control in enumerate(self._controls)
        ]

    def start(self, timeout: float = 600) -> dict[str, Any]:
        """Start the processes; wait until every socket is synced.

        Returns:
            ``connect_seconds`` (slowest process, first connect to last synced),
            ``sync_seconds`` (per socket: subscribe sent to synced), ``bytes`` received so far,
            ``sockets`` synced, ``failed`` (sockets refused or closed before synced) and
            ``errors`` (the first failure of each process).
        """
        for proc in self._procs:
            proc.start()
        connect, syncs, received, sockets, failures, errors = 0.0, [], 0, 0, 0, []
        skipped = 0
        try:
            for _ in self._procs:
                message = self._results.get(timeout=timeout)
                if message[0] == "error":
                    raise RuntimeError(f"subscriber process failed: {message[1]}")
                _, count, seconds, sync_times, got, failed, first_error, skip = message
                connect = max(connect, seconds)
                syncs.extend(sync_times)
                received += got
                sockets += count
                failures += failed
                skipped += skip
                errors += [first_error] if first_error else []
        except BaseException:
            self.kill()
            raise
        return {
            "connect_seconds": connect,
            "sync_seconds": syncs,
            "bytes": received,
            "sockets": sockets,
            "failed": failures,
            "errors": errors,
            "skipped": skipped,
        }

    def stop(self, timeout: float = 300) -> dict[str, Any]:
        """Stop and collect ``records`` [(socket, doc_key, version, t)], ``bytes``, ``dropped``."""
        for control in self._controls:
            control.put("stop")
        records: list[tuple[int, str, int, float]] = []
        received = dropped = 0
        try:
            for _ in self._procs:
                message = self._results.get(timeout=timeout)
                if message[0] == "error":
                    raise RuntimeError(f"subscriber process failed: {message[1]}")
                _, chunk, got, lost = message
                records.extend(chunk)
                received += got
                dropped += lost
            for proc in self._procs:
                proc.join(30)
        finally:
            self.kill()
        return {"records": records, "bytes": received, "dropped": dropped}

    def kill(self) -> None:
        """Terminate any process still alive."""
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()


async def welcome(ws_url: str, token: str) -> dict[str, Any]:
    """Authenticate once and return the ``welcome`` frame (epoch, watermark)."""
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(ws_url, protocols=(JSON_PROTOCOL,)) as ws,
    ):
        await ws.send_str(orjson.dumps({"authenticate": {"token": token}}).decode())
        while True:
            msg = await ws.receive(timeout=30)
            data = orjson.loads(msg.data)
            if "welcome" in data:
                return dict(data["welcome"])
            if "error" in data:
                raise RuntimeError(str(data))


# ---------------------------------------------------------------------------------------------
# Paced load: the appender (sync server) and the publisher (bare baseline)
# ---------------------------------------------------------------------------------------------


def _step_payload(run: int, seq: int) -> dict[str, Any]:
    return {
        "runId": f"r{run}",
        "stepIndex": seq,
        "description": f"step {seq}: editing files",
        "progressPercent": seq % 100,
        "occurredAt": "2026-11-25T12:00:00Z",
    }


def _schedule(total: int, batch: int, docs: int) -> list[list[int]]:
    """Batches of run indexes, round-robin over ``docs`` (distinct runs when batch <= docs)."""
    order = [i % docs for i in range(total)]
    return [order[i : i + batch] for i in range(0, total, batch)]


def appender_process(
    url: str, *, docs: int, rate: float, seconds: float, batch: int, start_seq: int
) -> dict[str, Any]:
    """Append ``run.step`` events at ``rate`` events/s for ``seconds`` through the event log.

    ``rate <= 0`` appends as fast as possible. Every run ``r0..r<docs-1>`` must already hold
    ``start_seq`` events (so the version of the n-th new event of a run is known).

    Returns:
        ``{"commits": [(doc_key, version, t_commit)], "seconds": elapsed, "events": n,
        "append_ms": [duration of each batch's append]}``.
    """
    return asyncio.run(
        _append_paced(url, docs=docs, rate=rate, seconds=seconds, batch=batch, start_seq=start_seq)
    )


async def _append_paced(
    url: str, *, docs: int, rate: float, seconds: float, batch: int, start_seq: int
) -> dict[str, Any]:
    from oa_sync_core import NewEvent  # noqa: PLC0415
    from oa_sync_server.postgres import create_engine  # noqa: PLC0415
    from oa_sync_server.postgres.event_log import PostgresEventLog  # noqa: PLC0415

    total = int(rate * seconds) if rate > 0 else int(seconds)
    plan = _schedule(total, batch, docs)
    seqs = dict.fromkeys(range(docs), start_seq)
    commits: list[tuple[str, int, float]] = []
    append_ms: list[float] = []
    engine = create_engine(url, pool_size=2)
    log = PostgresEventLog(engine)
    behind = 0
    try:
        interval = batch / rate if rate > 0 else 0.0
        start = time.monotonic()
        for k, runs in enumerate(plan):
            due = start + k * interval
            now = time.monotonic()
            if now < due:
                await asyncio.sleep(due - now)
            elif interval and now - due > interval:
                behind += 1
            events = []
            versions = []
            for run in runs:
                seqs[run] += 1
                versions.append((doc_key(run), seqs[run]))
                events.append(
                    NewEvent(
                        stream_id=f"run:r{run}",
                        type="run.step",
                        payload=_step_payload(run, seqs[run]),
                    )
                )
            began = time.monotonic()
            await log.append(events)
            t = time.monotonic()
            append_ms.append(1000 * (t - began))
            commits.extend((key, version, t) for key, version in versions)
        elapsed = time.monotonic() - start
    finally:
        await engine.dispose()
    return {
        "commits": commits,
        "seconds": elapsed,
        "events": total,
        "batches_behind": behind,
        "start": start,
        "append_ms": append_ms,
    }


def publisher_process(
    url: str,
    *,
    docs: int,
    rate: float,
    seconds: float,
    batch: int,
    start_seq: int,
    body: dict[str, Any],
) -> dict[str, Any]:
    """The bare baseline's load: POST the same updates to ``/publish`` at the same pace."""
    return asyncio.run(
        _publish_paced(
            url,
            docs=docs,
            rate=rate,
            seconds=seconds,
            batch=batch,
            start_seq=start_seq,
            body=body,
        )
    )


async def _publish_paced(
    url: str,
    *,
    docs: int,
    rate: float,
    seconds: float,
    batch: int,
    start_seq: int,
    body: dict[str, Any],
) -> dict[str, Any]:
    total = int(rate * seconds) if rate > 0 else int(seconds)
    plan = _schedule(total, batch, docs)
    seqs = dict.fromkeys(range(docs), start_seq)
    commits: list[tuple[str, int, float]] = []
    interval = batch / rate if rate > 0 else 0.0
    async with aiohttp.ClientSession() as session:
        start = time.monotonic()
        for k, runs in enumerate(plan):
            due = start + k * interval
            now = time.monotonic()
            if now < due:
                await asyncio.sleep(due - now)
            items = []
            sent = time.monotonic()
            for run in runs:
                seqs[run] += 1
                key = doc_key(run)
                items.append(
                    {
                        "subscriptionId": "s1",
                        "docKey": key,
                        "projection": "runtime/run_summary",
                        "version": str(seqs[run]),
                        "watermark": str(k * batch),
                        "contentHash": "0" * 64,
                        "document": {**body, "runId": f"r{run}", "stepCount": seqs[run]},
                    }
                )
                commits.append((key, seqs[run], sent))
            async with session.post(url + "/publish", data=orjson.dumps(items)) as answer:
                answer.raise_for_status()
        elapsed = time.monotonic() - start
    return {
        "commits": commits,
        "seconds": elapsed,
        "events": total,
        "batches_behind": 0,
        "start": start,
    }
