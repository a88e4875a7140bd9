"""Many instances on one Postgres: latency and Postgres load per change, with and without NATS.

For 1 and 3 ``oa-sync serve`` processes on one database, with ``OA_SYNC_FANOUT=postgres`` and
``nats`` (a private ``nats-server`` per run, never the machine's): WebSocket subscribers on
every instance, a paced appender, and per change

* the commit-to-receive latency at the subscribers (p50, p99; the appender and subscribers
  share one process and ``time.monotonic()``);
* the fan-out reads the hubs ran on Postgres (``oa_sync_hub_reads_total`` summed over the
  instances: pages and audits), divided by the changes;
* the database's statements and rows read (``pg_stat_database`` deltas: ``xact_commit`` and
  ``tup_returned + tup_fetched``, taken after the servers stopped so their statistics are
  flushed), divided by the changes: this includes appends and projection, the same in every
  configuration, so the differences are the fan-out's.

Compare configurations only within one run (the machine is shared): the JSON records the load
average before and after each configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psycopg

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import (  # noqa: E402
    Result,
    admin_url,
    bar_plot,
    drop_database,
    load_average,
    machine,
    quick,
)
from _load import migrated_database  # noqa: E402
from _nats import NATS_SERVER, NatsServer  # noqa: E402
from _server import ServerProcess, token  # noqa: E402

DB_NAME = "oa_sync_bench_instances"
RUNS = 40


def _event(run: int, index: int) -> Any:
    from oa_sync_core.testing import new_event  # noqa: PLC0415

    if index == 0:
        return new_event("run.created", f"r{run}", agentId="a", threadId=f"t{run}")
    return new_event(
        "run.step", f"r{run}", stepIndex=index, description=f"s{index}", progressPercent=index % 100
    )


def _metric(server: ServerProcess, name: str) -> float:
    """A counter summed over its labels, from the server's /metrics."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as answer:  # noqa: S310
        text = answer.read().decode()
    return sum(
        float(v) for v in re.findall(rf"^oa_sync_{name}_total(?:\{{[^}}]*\}})? (\S+)$", text, re.M)
    )


def _db_stats(admin: str) -> tuple[int, int]:
    with psycopg.connect(admin, autocommit=True) as conn:
        row = conn.execute(
            "SELECT xact_commit, tup_returned + tup_fetched FROM pg_stat_database"
            " WHERE datname = %s",
            (DB_NAME,),
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


async def _subscribe(
    ws_url: str, received: dict[tuple[str, int], float], ready: asyncio.Event
) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(ws_url, protocols=("oa-sync.v1.json",)) as ws,
    ):
        await ws.send_str(orjson.dumps({"authenticate": {"token": token()}}).decode())
        sub = {"subscribe": {"subscriptionId": "s1", "topics": ["runtime/run_summary:*"]}}
        await ws.send_str(orjson.dumps(sub).decode())
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = orjson.loads(msg.data)
            update = data.get("update")
            if update is not None:
                received.setdefault((update["docKey"], int(update["version"])), time.monotonic())
            elif "synced" in data:
                ready.set()


async def _drive(
    url: str, servers: list[ServerProcess], per_instance: int, rate: float, seconds: float
) -> dict[str, Any]:
    from oa_sync_server.postgres import create_engine  # noqa: PLC0415
    from oa_sync_server.postgres.event_log import PostgresEventLog  # noqa: PLC0415

    inboxes: list[dict[tuple[str, int], float]] = []
    tasks = []
    for server in servers:
        for _ in range(per_instance):
            inbox: dict[tuple[str, int], float] = {}
            ready = asyncio.Event()
            inboxes.append(inbox)
            tasks.append(asyncio.create_task(_subscribe(server.ws_url, inbox, ready)))
            await asyncio.wait_for(ready.wait(), 30)
    engine = create_engine(url, pool_size=2)
    log = PostgresEventLog(engine)
    commits: dict[tuple[str, int], float] = {}
    seqs = dict.fromkeys(range(RUNS), 0)
    batch = 10
    total = int(rate * seconds)
    try:
        start = time.monotonic()
        for k in range(0, total, batch):
            due = start + k / rate
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)  # pacing the load, not synchronising
            runs = [i % RUNS for i in range(k, min(total, k + batch))]
            events = []
            for run in runs:
                events.append(_event(run, seqs[run]))
                seqs[run] += 1
            await log.append(events)
            now = time.monotonic()
            for run in runs:
                commits[(f"runtime/run_summary:r{run}", seqs[run])] = now
        final = {(f"runtime/run_summary:r{r}", v) for r, v in seqs.items() if v}
        deadline = time.monotonic() + 60
        for inbox in inboxes:  # waiting for delivery, bounded (pacing the checks)
            while time.monotonic() < deadline and not all(key in inbox for key in final):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await engine.dispose()
    latencies = [
        (at - commits[key]) * 1000
        for inbox in inboxes
        for key, at in inbox.items()
        if key in commits
    ]
    latencies.sort()
    converged = sum(all(key in inbox for key in final) for inbox in inboxes)
    return {
        "events": total,
        "latency_p50_ms": statistics.median(latencies) if latencies else float("nan"),
        "latency_p99_ms": latencies[int(0.99 * (len(latencies) - 1))]
        if latencies
        else float("nan"),
        "clients_converged": converged,
        "clients": len(inboxes),
    }


def run_one(
    admin: str, instances: int, fanout: str, *, per_instance: int, rate: float, seconds: float
) -> dict[str, Any]:
    """One configuration on a fresh database; returns its figures."""
    url = migrated_database(admin, DB_NAME)
    with contextlib.ExitStack() as stack:
        env: dict[str, str] = {"poll_interval_s": "1"}
        if fanout == "nats":
            nats = NatsServer(Path(stack.enter_context(tempfile.TemporaryDirectory())))
            nats.start()
            stack.callback(nats.stop)
            env |= {"fanout": "nats", "nats_url": nats.url}
        load_before = load_average()
        servers = [stack.enter_context(ServerProcess(url, **env)) for _ in range(instances)]
        stats_before = _db_stats(admin)
        figures = asyncio.run(_drive(url, servers, per_instance, rate, seconds))
        changes = sum(_metric(s, "hub_changes") for s in servers) / instances
        figures["hub_reads_per_change"] = sum(_metric(s, "hub_reads") for s in servers) / max(
            changes, 1
        )
        figures["bus_share"] = _bus(servers) / max(changes * instances, 1)
        figures["changes"] = changes
        figures["load_before"] = load_before[0]
    stats_after = _db_stats(admin)  # the servers stopped: their statistics are flushed
    figures["xacts_per_change"] = (stats_after[0] - stats_before[0]) / max(changes, 1)
    figures["rows_read_per_change"] = (stats_after[1] - stats_before[1]) / max(changes, 1)
    figures["load_after"] = load_average()[0]
    drop_database(admin, DB_NAME)
    return figures


def _bus(servers: list[ServerProcess]) -> float:
    total = 0.0
    for server in servers:
        with urllib.request.urlopen(server.url + "/metrics", timeout=10) as answer:  # noqa: S310
            text = answer.read().decode()
        found = re.search(r'^oa_sync_hub_changes_total\{source="bus"\} (\S+)$', text, re.M)
        total += float(found.group(1)) if found else 0.0
    return total


def main() -> int:
    """Run 1 and 3 instances, Postgres and NATS fan-out; write bench/results/instances.json."""
    per_instance, rate, seconds = (2, 100.0, 4.0) if quick() else (5, 200.0, 15.0)
    admin = admin_url()
    facts = machine(admin)
    configs = [(1, "postgres"), (3, "postgres")]
    if Path(NATS_SERVER).exists():
        configs += [(1, "nats"), (3, "nats")]
    result = Result(
        name="instances",
        parameters={
            "subscribers_per_instance": per_instance,
            "events_per_second": rate,
            "seconds": seconds,
            "documents": RUNS,
            "poll_interval_s": 1,
        },
    )
    if len(configs) == 2:
        result.notes.append("nats-server absent: the NATS configurations were not run")
    for instances, fanout in configs:
        figures = run_one(
            admin, instances, fanout, per_instance=per_instance, rate=rate, seconds=seconds
        )
        for key, value in figures.items():
            result.figures[f"{fanout}_{instances}.{key}"] = round(float(value), 3)
    for fanout in ("postgres", "nats"):
        if f"{fanout}_3.hub_reads_per_change" in result.figures:
            result.target(
                f"{fanout}: 3 instances converge",
                result.figures[f"{fanout}_3.clients_converged"],
                at_least=3 * per_instance,
            )
    if "nats_3.hub_reads_per_change" in result.figures:
        result.target(
            "nats: hub reads per change, 3 instances",
            result.figures["nats_3.hub_reads_per_change"],
            at_most=0.1,
        )
    labels = [f"{f} x{n}" for n, f in configs]
    plot = bar_plot(
        "instances",
        labels,
        [result.figures[f"{f}_{n}.hub_reads_per_change"] for n, f in configs],
        "hub reads of Postgres per change (all instances)",
        "Fan-out reads per change",
    )
    result.write(facts, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
