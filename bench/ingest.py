"""Ingest: append latency (library and HTTP) beside a commit, and HTTP ingest of 100,000 events.

1. Same-run baselines on the same Postgres: the latency of one single-row ``INSERT`` committed
   (psycopg, autocommit), back to back and paced (each after the same 20 ms idle pause as the
   timed POSTs: an idle machine wakes Postgres and the client for each, ~0.25 ms more), and
   batched ``INSERT … ON CONFLICT`` rows/s (as ``projection.py``).
2. Library append latency: ``PostgresEventLog.append`` of 1 and of 5 events, one after the
   other on an idle database, p50/p95, with where the milliseconds go (validation, the
   ``append_events`` round trip, any other SQL, and the rest: the pool checkout with its
   pre-ping, and Python), timed around the log's psycopg call of ``append_events`` (which
   bypasses SQLAlchemy) and with SQLAlchemy's cursor events around any other statement.
3. HTTP append latency: ``POST /v1/events`` of 1 and of 5 events to ``oa-sync serve`` (its
   default ``--workers``, one per core, the projector running in one of them), one client, one
   request at a time, p50/p95; beside them ``GET /healthz`` (the HTTP round trip) and a
   ``POST`` of 5 events refused by validation (auth, parsing, validation; no database).
4. HTTP ingest: one client posts 100,000 events over 10,000 runs in batches of 500; the figure
   is events/s from the first request until the server's projector has folded the last event.

Targets (issue 13): a 5-event ``POST`` p50 at most 15 same-run commits, both timed after the
same idle pause (the issue's "on an idle server"; its own commit figure, 0.48 ms, is the paced
one: back to back a commit took 0.22 ms here, and the ratio to it is reported beside); the
library appends are timed back to back and compared with the back-to-back commit. HTTP ingest
at least 0.5 times the same-run upsert rows/s. Run alone: ``python bench/ingest.py [--quick]``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    Result,
    admin_url,
    bar_plot,
    drop_database,
    git_revision,
    load_average,
    machine,
    quick,
    upsert_baseline,
)
from _load import migrated_database
from _server import ServerProcess, token

DB_NAME = "oa_sync_bench_ingest"
TIMESTAMP = "2026-11-25T12:00:00Z"


def _ms(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(len(ordered) * share))]


PAUSE_S = 0.02
"""The pause before each timed request: the server (and Postgres) idle between requests, as
the issue's "on an idle server" means; the paced commit baseline waits the same."""


def commit_latency(url: str, rounds: int, pause_s: float = 0.0) -> list[float]:
    """Seconds of each single-row INSERT committed on its own (autocommit), after a warm-up;
    with ``pause_s``, each after that long idle (the cadence of the timed POSTs)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE bench_commit (id bigserial primary key, body jsonb)")
        timings = []
        for i in range(rounds + 20):
            if pause_s:
                time.sleep(pause_s)  # pacing the load like the POSTs, not waiting on a condition
            t0 = time.perf_counter()
            conn.execute("INSERT INTO bench_commit (body) VALUES (%s)", ('{"runId": "r"}',))
            if i >= 20:
                timings.append(time.perf_counter() - t0)
        conn.execute("DROP TABLE bench_commit")
    return timings


def _events(run: int, count: int, start: int = 0) -> list[dict[str, Any]]:
    """``count`` proto3 JSON events of run ``r<run>``: created, then steps."""
    out = []
    for index in range(start, start + count):
        payload: dict[str, Any] = {"runId": f"r{run}", "occurredAt": TIMESTAMP}
        if index == 0:
            kind = "run.created"
            payload["agentId"] = f"agent-{run % 50}"
        else:
            kind = "run.step"
            payload.update(stepIndex=index, description=f"step {index}", progressPercent=index)
        out.append({"streamId": f"run:r{run}", "type": kind, "payload": payload})
    return out


async def library_latency(url: str, rounds: int) -> dict[str, Any]:
    """Append 1 and 5 events ``rounds`` times each; latency and a per-phase breakdown."""
    import sqlalchemy as sa  # noqa: PLC0415
    from oa_sync_core import NewEvent, validate_new_event  # noqa: PLC0415
    from oa_sync_server.postgres import create_engine, event_log  # noqa: PLC0415

    engine = create_engine(url, pool_size=2)
    phases: dict[str, float] = defaultdict(float)
    started: list[float] = []

    def before(*_: Any) -> None:
        started.append(time.perf_counter())

    def after(*_: Any) -> None:
        phases["other SQL"] += time.perf_counter() - started.pop()

    sa.event.listen(engine.sync_engine, "before_cursor_execute", before)
    sa.event.listen(engine.sync_engine, "after_cursor_execute", after)
    call = event_log._run  # the statement's round trip on the psycopg connection

    async def timed_run(*args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return await call(*args)
        finally:
            phases["append_events (locks, plan, insert, commit)"] += time.perf_counter() - t0

    event_log._run = timed_run
    log = event_log.PostgresEventLog(engine)
    out: dict[str, Any] = {}
    try:
        await log.append([NewEvent(**_new(e)) for e in _events(999_999, 1)])  # warm up
        for size in (1, 5):
            phases.clear()
            timings, validation = [], 0.0
            for run in range(rounds):
                batch = [NewEvent(**_new(e)) for e in _events(size * 100_000 + run, size)]
                t0 = time.perf_counter()
                for i, event in enumerate(batch):
                    validate_new_event(event, index=i)
                validation += time.perf_counter() - t0
                t0 = time.perf_counter()
                await log.append(batch)
                timings.append(time.perf_counter() - t0)
            total = sum(timings)
            breakdown = {"validation": validation, **phases}
            breakdown["pool checkout + pre-ping, Python"] = total - sum(breakdown.values())
            out[size] = {
                "p50_ms": _ms(timings, 0.5),
                "p95_ms": _ms(timings, 0.95),
                "breakdown_ms": {k: 1000 * v / rounds for k, v in breakdown.items()},
            }
    finally:
        event_log._run = call
        await engine.dispose()
    return out


def _new(event: dict[str, Any]) -> dict[str, Any]:
    return {"stream_id": event["streamId"], "type": event["type"], "payload": event["payload"]}


async def http_latency(base: str, rounds: int) -> dict[Any, dict[str, float]]:
    """``POST /v1/events`` of 1 and 5 events, one at a time; p50/p95 ms.

    Beside them, to show where a request's time goes (same client, same connection):
    ``GET /healthz`` (the HTTP round trip through aiohttp, no auth, no body) and a ``POST`` of
    5 events whose last is invalid (auth, body read, parsing and validating all 5, the 400
    answer; no database).
    """
    import aiohttp  # noqa: PLC0415

    headers = {"Authorization": f"Bearer {token()}"}
    out: dict[Any, dict[str, float]] = {}
    async with aiohttp.ClientSession(headers=headers) as session:
        floor: dict[str, list[float]] = {"healthz": [], "refused_5": []}
        bad = _events(3_000_000, 5)
        bad[-1]["payload"]["stepIndex"] = "not a number"
        for run in range(rounds + 10):
            for name, request in (
                ("healthz", lambda: session.get(base + "/healthz")),
                ("refused_5", lambda: session.post(base + "/v1/events", json={"events": bad})),
            ):
                t0 = time.perf_counter()
                async with request() as answer:
                    await answer.read()
                    assert answer.status in (200, 400), answer.status
                if run >= 10:
                    floor[name].append(time.perf_counter() - t0)
            await asyncio.sleep(PAUSE_S)
        for name, timings in floor.items():
            out[name] = {"p50_ms": _ms(timings, 0.5), "p95_ms": _ms(timings, 0.95)}
        for size in (1, 5):
            timings = []
            for run in range(rounds + 10):
                body = {"events": _events(size * 1_000_000 + run, size)}
                t0 = time.perf_counter()
                async with session.post(base + "/v1/events", json=body) as answer:
                    await answer.read()
                    assert answer.status == 200, answer.status
                if run >= 10:
                    timings.append(time.perf_counter() - t0)
                await asyncio.sleep(PAUSE_S)  # idle server: let the projector finish the last one
            out[size] = {"p50_ms": _ms(timings, 0.5), "p95_ms": _ms(timings, 0.95)}
    return out


async def http_ingest(base: str, url: str, total: int, runs: int, batch: int) -> dict[str, float]:
    """Post ``total`` events over ``runs`` runs in batches; seconds until all are projected."""
    import aiohttp  # noqa: PLC0415

    per_run = total // runs
    events = [e for step in range(per_run) for run in range(runs) for e in _events(run, 1, step)]
    with psycopg.connect(url, autocommit=True) as conn:
        before = conn.execute("SELECT coalesce(sum(version), 0) FROM oa_sync.documents").fetchone()
    folded_before = int(before[0]) if before else 0
    headers = {"Authorization": f"Bearer {token()}"}
    posted_at = 0.0
    async with aiohttp.ClientSession(headers=headers) as session:
        start = time.perf_counter()
        for offset in range(0, len(events), batch):
            body = {"events": events[offset : offset + batch]}
            async with session.post(base + "/v1/events", json=body) as answer:
                await answer.read()
                assert answer.status == 200, answer.status
        posted_at = time.perf_counter() - start
    with psycopg.connect(url, autocommit=True) as conn:
        while True:  # a benchmark's wait, not a test's: poll the read model every 20 ms
            row = conn.execute("SELECT coalesce(sum(version), 0) FROM oa_sync.documents").fetchone()
            if row and int(row[0]) - folded_before >= total:
                break
            if time.perf_counter() - start > 600:
                raise RuntimeError("projection did not catch up within 600 s")
            await asyncio.sleep(0.02)
    return {"seconds": time.perf_counter() - start, "posted_seconds": posted_at}


def main() -> int:
    """Run the baselines, the latencies and the ingest; write bench/results/ingest.json."""
    rounds = 40 if quick() else 300
    total, runs = (5_000, 500) if quick() else (100_000, 10_000)
    admin = admin_url()
    facts = machine(admin)
    load_before = load_average()
    url = migrated_database(admin, DB_NAME)
    try:
        commit = commit_latency(url, rounds)
        paced = commit_latency(url, rounds, PAUSE_S)
        upsert_rate = upsert_baseline(url, total, runs)
        library = asyncio.run(library_latency(url, rounds))
        load_server = load_average()
        with ServerProcess(url, workers=None) as server:  # the default: one per core
            http = asyncio.run(http_latency(server.url, rounds))
            ingest = asyncio.run(http_ingest(server.url, url, total, runs, 500))
    finally:
        drop_database(admin, DB_NAME)
    back_to_back_p50 = _ms(commit, 0.5)
    commit_p50 = _ms(paced, 0.5)
    ingest_rate = total / ingest["seconds"]
    figures: dict[str, float] = {
        "commit_p50_ms": back_to_back_p50,
        "commit_p95_ms": _ms(commit, 0.95),
        "commit_paced_p50_ms": commit_p50,
        "commit_paced_p95_ms": _ms(paced, 0.95),
        "http_ingest_events_per_s": ingest_rate,
        "http_ingest_posting_events_per_s": total / ingest["posted_seconds"],
    }
    for name in ("healthz", "refused_5"):
        figures[f"http_{name}_p50_ms"] = http[name]["p50_ms"]
        figures[f"http_{name}_p95_ms"] = http[name]["p95_ms"]
    for size in (1, 5):
        figures[f"library_append_{size}_p50_ms"] = library[size]["p50_ms"]
        figures[f"library_append_{size}_p95_ms"] = library[size]["p95_ms"]
        figures[f"http_append_{size}_p50_ms"] = http[size]["p50_ms"]
        figures[f"http_append_{size}_p95_ms"] = http[size]["p95_ms"]
        for phase, ms in library[size]["breakdown_ms"].items():
            figures[f"library_append_{size}_mean_ms.{phase}"] = ms
    result = Result(
        name="ingest",
        parameters={
            "rounds": rounds,
            "http_ingest_events": total,
            "http_ingest_runs": runs,
            "http_ingest_batch": 500,
            "server": (
                f"oa-sync serve with its default --workers (one per core: {os.cpu_count()}; "
                "the projector runs in one of them), one client"
            ),
            "git": git_revision(),
            "load_average_before": load_before,
            "load_average_at_server_start": load_server,
            "load_average_after": load_average(),
        },
        figures=figures,
        baseline={
            "upsert_rows_per_s": upsert_rate,
            "ratio_http_append_5_p50_vs_commit": http[5]["p50_ms"] / commit_p50,
            "ratio_http_append_5_p50_vs_back_to_back_commit": http[5]["p50_ms"] / back_to_back_p50,
            "ratio_library_append_5_p50_vs_commit": library[5]["p50_ms"] / back_to_back_p50,
            "ratio_http_ingest_vs_upsert": ingest_rate / upsert_rate,
        },
    )
    result.target(
        "POST /v1/events of 5, p50 / same-run commit p50 (both after a 20 ms idle pause)",
        http[5]["p50_ms"] / commit_p50,
        at_most=15.0,
        unit="x",
    )
    result.target(
        "HTTP ingest (projected) / same-run batched upsert",
        ingest_rate / upsert_rate,
        at_least=0.5,
        unit="x",
    )
    plot = bar_plot(
        "ingest",
        ["commit", "lib 1", "lib 5", "HTTP 1", "HTTP 5"],
        [
            commit_p50,
            library[1]["p50_ms"],
            library[5]["p50_ms"],
            http[1]["p50_ms"],
            http[5]["p50_ms"],
        ],
        "p50 ms",
        "append latency (one at a time)",
    )
    result.write(facts, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
