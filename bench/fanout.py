"""Fan-out latency and throughput: WebSocket subscribers, paced appends, same-run bare baseline.

Topology: ``subscribers`` sockets, each subscribed to ``per_doc`` exact run-summary keys so
that every document has ``per_doc`` subscribers (2,000 appends/s x 5 = the issue's 10,000
deliveries/s at 1,000 subscribers). Two phases per server:

1. steady: a separate process appends ``run.step`` events at ``rate`` events/s for
   ``seconds`` through ``PostgresEventLog`` (batches every few ms); latency = client receipt
   minus the append's commit (``time.monotonic``, one clock for all processes);
2. burst: ``burst`` events appended as fast as possible; throughput = events x per_doc /
   (time from the burst's start until every subscriber holds every final version).

The sync server (``oa-sync serve --workers 1``: projector + hub + WebSocket sessions, one
process), then ``--workers N`` (``BENCH_WORKERS``, default the number of cores; ``workers_n_*``
figures, CPU summed over the processes), is then replaced by ``bench/_bare.py`` fed by the
same schedule over ``POST /publish``; its latency is measured from the POST's start.
Lost = (subscriber, document) pairs whose last version received is below the last version
appended, after a drain. Fewer frames than events x per_doc is not
loss: live updates coalesce when a document changes twice between two reads of the hub.

Appends while fanning out: the appender times each batch's append; the steady phase's p99 is
compared with the same schedule appended to the same server (``--workers 1``) with no
subscriber connected (``APPENDS_ALONE_SECONDS`` of it), target within 20 %.

Run alone: ``python bench/fanout.py [--quick]``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _clients import Fleet, appender_process, doc_key, publisher_process
from _common import (
    Result,
    admin_url,
    bar_plot,
    drop_database,
    git_revision,
    load_average,
    machine,
    quick,
)
from _load import copy_events, migrated_database, run_event
from _server import BareProcess, ServerProcess, token

DB_NAME = "oa_sync_bench_fanout"
CLIENT_PROCESSES = 2
BURST_BATCH = 500
LIGHT = (100, 100, 200, 10)
"""(subscribers, documents, appends/s, seconds) of the extra light run of the full suite."""
WORKERS = int(os.environ.get("BENCH_WORKERS", str(os.cpu_count() or 1)))
"""Worker processes of the second server run (``oa-sync serve --workers N``; 1: skipped)."""
FULL_RATE = int(os.environ.get("BENCH_FANOUT_RATE", "2000"))
"""Appends/s of the full run: the issue's 2,000 (x 5 subscribers = 10,000 deliveries/s)."""
APPENDS_ALONE_SECONDS = 15
"""Length of the run with no subscriber (the append latency it gives is the reference)."""


def drain_seconds() -> float:
    """How long to let deliveries drain after each load phase (a late update counts as lost)."""
    return 1.0 if quick() else 5.0


def topic_sets(subscribers: int, docs: int, per_doc: int) -> list[list[str]]:
    """Subscriber i follows ``per_doc`` runs spread evenly, so each run has per_doc followers."""
    stride = docs // per_doc
    return [[doc_key((i + k * stride) % docs) for k in range(per_doc)] for i in range(subscribers)]


def tree_cpu_seconds(process: Any) -> float:
    """User + system CPU seconds of a process and its children (the ``--workers`` processes)."""
    total = 0.0
    for proc in [process, *process.children(recursive=True)]:
        with contextlib.suppress(Exception):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of sorted ``values``."""
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(len(values) * p / 100))]


def run_phase(
    ws_url: str,
    bearer: str,
    sets: list[list[str]],
    load: Any,
    load_kwargs: dict[str, Any],
    *,
    rate: float,
    seconds: float,
    burst: int,
    server_pid: int,
    docs: int,
    start_seq: int,
    batch: int,
    burst_batch: int,
) -> dict[str, Any]:
    """Connect the subscribers, drive the steady and burst loads, collect every receipt."""
    import psutil  # noqa: PLC0415

    steady_events = int(rate * seconds)
    if steady_events % docs or burst % docs:
        raise ValueError("steady and burst event counts must be multiples of the documents")
    burst_seq = start_seq + steady_events // docs

    ctx = multiprocessing.get_context("spawn")
    fleet = Fleet(ws_url, bearer, sets, processes=CLIENT_PROCESSES)
    try:
        started = fleet.start()
        connect_seconds = started["connect_seconds"]
        server = psutil.Process(server_pid)
        with ProcessPoolExecutor(1, mp_context=ctx) as pool:
            pool.submit(int).result()  # start the worker before timing anything
            cpu0, wall0 = tree_cpu_seconds(server), time.monotonic()
            steady = pool.submit(
                load,
                rate=rate,
                seconds=seconds,
                start_seq=start_seq,
                batch=batch,
                **load_kwargs,
            ).result()
            cpu1, wall1 = tree_cpu_seconds(server), time.monotonic()
            time.sleep(drain_seconds())
            burst_result = pool.submit(
                load,
                rate=0,
                seconds=burst,
                start_seq=burst_seq,
                batch=burst_batch,
                **load_kwargs,
            ).result()
            time.sleep(drain_seconds())
        collected = fleet.stop()
    finally:
        fleet.kill()
    records = collected["records"]
    received = collected["bytes"]
    closed = collected["dropped"]
    return {
        "subscribers_failed": started["failed"],
        "sockets_closed_by_server": closed,
        "subscriber_errors": started["errors"],
        "connect_seconds": connect_seconds,
        "steady": steady,
        "burst": burst_result,
        "records": records,
        "bytes_received": received,
        "server_cpu_percent_steady": 100 * (cpu1 - cpu0) / (wall1 - wall0),
    }


def analyse(phase: dict[str, Any], sets: list[list[str]], per_doc: int) -> dict[str, float]:
    """Latency percentiles, delivery rates, loss and burst throughput of one phase."""
    steady_commits = {(k, v): t for k, v, t in phase["steady"]["commits"]}
    burst_commits = phase["burst"]["commits"]
    latencies = sorted(
        1000 * (t - steady_commits[k, v])
        for _, k, v, t in phase["records"]
        if (k, v) in steady_commits
    )
    final: dict[str, int] = {}
    for k, v, _ in [*phase["steady"]["commits"], *burst_commits]:
        final[k] = max(final.get(k, 0), v)
    best: dict[tuple[int, str], int] = defaultdict(int)
    final_seen: dict[tuple[int, str], float] = {}
    for conn, k, v, t in phase["records"]:
        best[conn, k] = max(best[conn, k], v)
        if v == final.get(k) and (conn, k) not in final_seen:
            final_seen[conn, k] = t
    pairs = [(i, k) for i, keys in enumerate(sets) for k in keys if k in final]
    lost = sum(1 for pair in pairs if best[pair] < final[pair[1]])
    burst_start = phase["burst"]["start"]
    complete = max((final_seen.get(pair, float("inf")) for pair in pairs), default=float("inf"))
    burst_events = phase["burst"]["events"]
    figures: dict[str, float] = {}
    if "append_ms" in phase["steady"]:  # the appender's (the bare server's publisher has none)
        append_ms = sorted(phase["steady"]["append_ms"])
        figures["append_p50_ms"] = percentile(append_ms, 50)
        figures["append_p99_ms"] = percentile(append_ms, 99)
    return figures | {
        "latency_p50_ms": percentile(latencies, 50),
        "latency_p95_ms": percentile(latencies, 95),
        "latency_p99_ms": percentile(latencies, 99),
        "latency_max_ms": latencies[-1] if latencies else float("nan"),
        "appended_per_s": phase["steady"]["events"] / phase["steady"]["seconds"],
        "deliveries_per_s": len(latencies) / phase["steady"]["seconds"],
        "expected_deliveries_per_s": len(steady_commits) * per_doc / phase["steady"]["seconds"],
        "coalesced_fraction": 1 - len(latencies) / max(1, len(steady_commits) * per_doc),
        "lost": lost,
        "burst_effective_deliveries_per_s": burst_events * per_doc / (complete - burst_start),
        "burst_load_per_s": burst_events / phase["burst"]["seconds"],
        "connect_seconds": phase["connect_seconds"],
        "subscribers_failed": phase["subscribers_failed"],
        "sockets_closed_by_server": phase["sockets_closed_by_server"],
        "server_cpu_percent_steady": phase["server_cpu_percent_steady"],
        "load_batches_behind": phase["steady"]["batches_behind"],
    }


def server_phase(
    url: str,
    sets: list[list[str]],
    *,
    docs: int,
    rate: float,
    seconds: float,
    batch: int,
    burst: int,
    workers: int = 1,
) -> dict[str, Any]:
    """Preload one event per run, start ``oa-sync serve``, run both load phases against it."""
    copy_events(url, [run_event(run, 0, 2) for run in range(docs)])
    with ServerProcess(url, workers=workers) as server:
        return run_phase(
            server.ws_url,
            token(),
            sets,
            appender_process,
            {"url": url, "docs": docs},
            rate=rate,
            seconds=seconds,
            burst=burst,
            server_pid=server.ps.pid,
            docs=docs,
            start_seq=1,
            batch=batch,
            burst_batch=BURST_BATCH,
        )


def appends_alone(url: str, *, docs: int, rate: float, seconds: float, batch: int) -> list[float]:
    """The steady schedule appended to ``oa-sync serve --workers 1`` with no subscriber: the
    duration of each batch's append, sorted (the reference for appends while fanning out)."""
    copy_events(url, [run_event(run, 0, 2) for run in range(docs)])
    steady_events = int(rate * seconds)
    seconds = (steady_events - steady_events % docs) / rate  # whole rounds of the runs
    ctx = multiprocessing.get_context("spawn")
    with ServerProcess(url), ProcessPoolExecutor(1, mp_context=ctx) as pool:
        pool.submit(int).result()  # start the worker before timing anything
        steady = pool.submit(
            appender_process,
            url=url,
            docs=docs,
            rate=rate,
            seconds=seconds,
            start_seq=1,
            batch=batch,
        ).result()
    return sorted(steady["append_ms"])


def main() -> int:
    """Run both servers under the same load; write bench/results/fanout.json."""
    if quick():
        subscribers, docs, per_doc, rate, seconds, batch, burst = 100, 100, 5, 200, 2, 10, 1_000
    else:
        subscribers, docs, per_doc, rate, seconds, batch, burst = (
            1_000,
            1_000,
            5,
            FULL_RATE,
            30,
            40,
            10_000,
        )
    sets = topic_sets(subscribers, docs, per_doc)
    admin = admin_url()
    facts = machine(admin)
    load_before = load_average()
    url = migrated_database(admin, DB_NAME)
    try:
        khala = server_phase(
            url, sets, docs=docs, rate=rate, seconds=seconds, batch=batch, burst=burst
        )
        workers = 1 if quick() else WORKERS
        multi: dict[str, float] = {}
        if workers > 1:
            # The same load on `oa-sync serve --workers N` (SO_REUSEPORT, one hub per process).
            drop_database(admin, DB_NAME)
            url = migrated_database(admin, DB_NAME)
            multi = analyse(
                server_phase(
                    url,
                    sets,
                    docs=docs,
                    rate=rate,
                    seconds=seconds,
                    batch=batch,
                    burst=burst,
                    workers=workers,
                ),
                sets,
                per_doc,
            )
        # The same appends with no subscriber: the reference for appends while fanning out.
        drop_database(admin, DB_NAME)
        url = migrated_database(admin, DB_NAME)
        alone_ms = appends_alone(
            url,
            docs=docs,
            rate=rate,
            seconds=seconds if quick() else APPENDS_ALONE_SECONDS,
            batch=batch,
        )
        light: dict[str, float] = {}
        if not quick():
            # The same code at a tenth of the subscribers, to show where it stops scaling.
            drop_database(admin, DB_NAME)
            url = migrated_database(admin, DB_NAME)
            light_sets = topic_sets(LIGHT[0], LIGHT[1], per_doc)
            light = analyse(
                server_phase(
                    url,
                    light_sets,
                    docs=LIGHT[1],
                    rate=LIGHT[2],
                    seconds=LIGHT[3],
                    batch=10,
                    burst=1_000,
                ),
                light_sets,
                per_doc,
            )
        body = dict(run_event(0, 0, 2).payload)
        with BareProcess() as bare:
            baseline = run_phase(
                bare.ws_url,
                "unchecked",
                sets,
                publisher_process,
                {"url": bare.url, "docs": docs, "body": body},
                rate=rate,
                seconds=seconds,
                burst=burst,
                server_pid=bare.ps.pid,
                docs=docs,
                start_seq=1,
                batch=batch,
                burst_batch=BURST_BATCH,
            )
    finally:
        drop_database(admin, DB_NAME)
    ours = analyse(khala, sets, per_doc)
    ours.update({f"light_{k}": v for k, v in light.items() if k.startswith(("latency", "lost"))})
    ours.update({f"workers_n_{k}": v for k, v in multi.items()})
    ours["alone_append_p50_ms"] = percentile(alone_ms, 50)
    ours["alone_append_p99_ms"] = percentile(alone_ms, 99)
    bare_figures = analyse(baseline, sets, per_doc)
    result = Result(
        name="fanout",
        parameters={
            "subscribers": subscribers,
            "documents": docs,
            "subscribers_per_document": per_doc,
            "append_rate_per_s": rate,
            "issue_append_rate_per_s": 2_000,
            "light_scenario": None
            if quick()
            else {
                "subscribers": LIGHT[0],
                "documents": LIGHT[1],
                "rate": LIGHT[2],
                "seconds": LIGHT[3],
            },
            "steady_seconds": seconds,
            "appends_alone_seconds": seconds if quick() else APPENDS_ALONE_SECONDS,
            "append_batch": batch,
            "burst_events": burst,
            "client_processes": CLIENT_PROCESSES,
            "drain_seconds": drain_seconds(),
            "burst_batch": BURST_BATCH,
            "subprotocol": "oa-sync.v1.json",
            "server": "oa-sync serve --workers 1 (projector + hub + sessions in one process);"
            " workers_n_*: oa-sync serve --workers N",
            "workers_n": workers,
            "git": git_revision(),
            "load_average_before": load_before,
            "load_average_after": load_average(),
        },
        figures=ours,
        baseline={f"bare_{k}": v for k, v in bare_figures.items()},
    )
    ratio = (
        ours["burst_effective_deliveries_per_s"] / bare_figures["burst_effective_deliveries_per_s"]
    )
    result.baseline["ratio_throughput_vs_bare"] = ratio
    cpu_ratio = ours["server_cpu_percent_steady"] / bare_figures["server_cpu_percent_steady"]
    result.baseline["ratio_server_cpu_vs_bare"] = cpu_ratio
    append_ratio = ours["append_p99_ms"] / ours["alone_append_p99_ms"]
    result.baseline["ratio_append_p99_fanning_out_vs_alone"] = append_ratio
    for side, phase in (("server", khala), ("bare", baseline)):
        for error in phase["subscriber_errors"]:
            result.notes.append(f"{side}: a subscriber failed before synced: {error}")
    result.target("fan-out latency p95", ours["latency_p95_ms"], at_most=50, unit="ms")
    result.target("fan-out latency p99", ours["latency_p99_ms"], at_most=150, unit="ms")
    result.target("updates lost", ours["lost"], at_most=0)
    result.target(
        "deliveries/s offered and held (issue: 10,000 at 1,000 subscribers)",
        ours["expected_deliveries_per_s"],
        at_least=10_000,
        unit="/s",
    )
    result.target("throughput vs bare aiohttp broadcast", ratio, at_least=0.7, unit="x")
    result.target("server CPU vs bare (steady)", cpu_ratio, at_most=2.0, unit="x")
    result.target(
        "append p99 while fanning out vs with no subscriber", append_ratio, at_most=1.2, unit="x"
    )
    if multi:
        result.baseline["ratio_throughput_vs_bare_workers_n"] = (
            multi["burst_effective_deliveries_per_s"]
            / bare_figures["burst_effective_deliveries_per_s"]
        )
        result.target(
            f"fan-out latency p95, {workers} workers",
            multi["latency_p95_ms"],
            at_most=50,
            unit="ms",
        )
        result.target(
            f"fan-out latency p99, {workers} workers",
            multi["latency_p99_ms"],
            at_most=150,
            unit="ms",
        )
        result.target(f"updates lost, {workers} workers", multi["lost"], at_most=0)
        result.target(
            f"throughput vs bare, {workers} workers",
            result.baseline["ratio_throughput_vs_bare_workers_n"],
            at_least=0.7,
            unit="x",
        )
    plot = bar_plot(
        "fanout",
        ["p50", "p95", "p99", "bare p99"],
        [
            ours["latency_p50_ms"],
            ours["latency_p95_ms"],
            ours["latency_p99_ms"],
            bare_figures["latency_p99_ms"],
        ],
        "ms, append commit -> client receipt",
        f"{subscribers:,} subscribers, {rate:,} appends/s x {per_doc}",
    )
    result.write(facts, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
