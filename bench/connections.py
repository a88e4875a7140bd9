"""Connections: 10,000 authenticated idle WebSocket connections, each with one subscription.

Figures: server RSS per connection (RSS with every socket synced minus RSS before, divided by
the sockets), time to connect, authenticate, subscribe and sync them all (from two client
processes, 50 handshakes in flight each), the server's CPU while they sit idle with
heartbeats every ``heartbeat_s``, and how many the server dropped during the idle window.
Same-run baseline: the bare aiohttp WebSocket server (``bench/_bare.py``) holding as many
sockets subscribed the same way.

Run alone: ``python bench/connections.py [--quick]``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _clients import CONNECT_CONCURRENCY, Fleet, doc_key
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
from oa_sync_server.config import Limits

DB_NAME = "oa_sync_bench_connections"
CLIENT_PROCESSES = 2
DOCS = 100
CONNECT_BUDGET_S = 100.0
"""Seconds allowed to open sockets (keeps the whole suite under 10 minutes); the rest are
reported as not attempted, never silently dropped."""


def hold(
    server: Any, ws_url: str, bearer: str, *, sockets: int, idle_s: float, budget_s: float
) -> dict[str, Any]:
    """Open ``sockets`` subscribed sockets against ``server``; measure RSS, time and idle CPU."""
    ps = server.ps
    time.sleep(1.0)  # let start-up allocations settle before the reading
    rss_before = ps.memory_info().rss
    sets = [[doc_key(i % DOCS)] for i in range(sockets)]
    fleet = Fleet(ws_url, bearer, sets, processes=CLIENT_PROCESSES, connect_budget_s=budget_s)
    try:
        started = fleet.start()
        rss_after = ps.memory_info().rss
        cpu0, wall0 = ps.cpu_times(), time.monotonic()
        time.sleep(idle_s)
        cpu1, wall1 = ps.cpu_times(), time.monotonic()
        rss_idle = ps.memory_info().rss
        stopped = fleet.stop()
    finally:
        fleet.kill()
    cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    return {
        "sockets": started["sockets"],
        "connect_all_seconds": started["connect_seconds"],
        "connections_per_s": started["sockets"] / started["connect_seconds"],
        "rss_before_mib": rss_before / 2**20,
        "rss_connected_mib": rss_after / 2**20,
        "rss_after_idle_mib": rss_idle / 2**20,
        "rss_per_connection_kib": (max(rss_after, rss_idle) - rss_before)
        / max(1, started["sockets"])
        / 1024,
        "idle_cpu_percent": 100 * cpu / (wall1 - wall0),
        "idle_cpu_ms_per_connection_per_s": 1000 * cpu / (wall1 - wall0) / sockets,
        "dropped_while_idle": stopped["dropped"],
        "failed_to_sync": started["failed"],
        "not_attempted_budget_exhausted": started["skipped"],
        "errors": started["errors"],
    }


def main() -> int:
    """Hold the connections on both servers; write bench/results/connections.json."""
    # The heartbeat interval is the server's default (what a deployment runs); the idle window
    # covers at least one interval, so every socket's heartbeat falls inside it.
    heartbeat_s = 1.0 if quick() else Limits().heartbeat_interval_s
    sockets, idle_s = (100, 2.0) if quick() else (10_000, max(10.0, heartbeat_s))
    budget_s = 20.0 if quick() else CONNECT_BUDGET_S
    admin = admin_url()
    facts = machine(admin)
    load_before = load_average()
    url = migrated_database(admin, DB_NAME)
    try:
        copy_events(url, [run_event(run, 0, 2) for run in range(DOCS)])
        with ServerProcess(
            url, heartbeat_interval_s=heartbeat_s, idle_timeout_s=600, auth_deadline_s=120
        ) as server:
            ours = hold(
                server,
                server.ws_url,
                token(),
                sockets=sockets,
                idle_s=idle_s,
                budget_s=budget_s,
            )
        with BareProcess() as bare:
            baseline = hold(
                bare,
                bare.ws_url,
                "unchecked",
                sockets=sockets,
                idle_s=idle_s,
                budget_s=budget_s,
            )
    finally:
        drop_database(admin, DB_NAME)
    errors = {"server": ours.pop("errors"), "bare": baseline.pop("errors")}
    result = Result(
        name="connections",
        parameters={
            "sockets": sockets,
            "subscriptions_per_socket": 1,
            "documents": DOCS,
            "client_processes": CLIENT_PROCESSES,
            "heartbeat_interval_s": heartbeat_s,
            "idle_window_s": idle_s,
            "connect_budget_s": budget_s,
            "handshakes_in_flight_per_process": CONNECT_CONCURRENCY,
            "subprotocol": "oa-sync.v1.json",
            "git": git_revision(),
            "load_average_before": load_before,
            "load_average_after": load_average(),
        },
        figures=ours,
        baseline={f"bare_{k}": v for k, v in baseline.items()},
    )
    for side, first_errors in errors.items():
        for error in first_errors:
            result.notes.append(f"{side}: a socket failed before synced: {error}")
    result.baseline["ratio_rss_per_connection_vs_bare"] = (
        ours["rss_per_connection_kib"] / baseline["rss_per_connection_kib"]
        if baseline["rss_per_connection_kib"] > 0
        else float("nan")
    )
    result.target(
        "connections held by one process",
        ours["sockets"] - ours["dropped_while_idle"],
        at_least=10_000,
    )
    accept_ratio = (
        ours["connections_per_s"] / baseline["connections_per_s"]
        if baseline["connections_per_s"] > 0
        else float("nan")
    )
    result.baseline["ratio_connections_per_s_vs_bare"] = accept_ratio
    result.target(
        "server memory per idle connection / bare",
        result.baseline["ratio_rss_per_connection_vs_bare"],
        at_most=1.25,
        unit="x",
    )
    result.target("sockets accepted per second / bare", accept_ratio, at_least=0.5, unit="x")
    result.target(
        f"idle CPU, {sockets:,} sockets, {heartbeat_s:g} s heartbeat"
        + ("" if quick() else " (the default)"),
        ours["idle_cpu_percent"],
        at_most=5,
        unit="% of a core",
    )
    plot = bar_plot(
        "connections",
        ["server KiB/conn", "bare KiB/conn"],
        [ours["rss_per_connection_kib"], baseline["rss_per_connection_kib"]],
        "KiB RSS per idle connection",
        f"{sockets:,} idle subscribed WebSockets",
    )
    result.write(facts, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
