"""Resume: a client that missed many changes reconnects; time to ``synced`` and bytes sent.

Setup: ``docs`` run summaries exist; a client's position is taken (epoch + watermark from a
``welcome``); then ``changes_per_doc`` more events per run are bulk-loaded and projected by the
server, so the client has missed ``docs x changes_per_doc`` changes. Scenarios, each a fresh
socket that authenticates and subscribes with ``resume``:

A. the whole prefix ``runtime/run_summary:*``, from before every missed change (issue 8: 50,000
   changes across 5,000 documents; the server sends each changed document once, coalesced);
B. the same subscription from ``10,000`` changes back (target: synced within 3 x a raw
   ``SELECT`` of the same rows);
C. ``simultaneous`` sockets at once, each following 5 runs, from 10,000 changes back (target:
   all synced in 5 s; measured from the first connect to the last ``synced``).

Same-run baseline: the coalesced catch-up read straight from Postgres with psycopg (``SELECT``
of the changed documents in watermark order), i.e. the database's share of scenarios A and B.

Run alone: ``python bench/resume.py [--quick]``.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _clients import Fleet, doc_key, welcome
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
from _load import copy_events, interleaved_events, migrated_database
from _server import ServerProcess, token

DB_NAME = "oa_sync_bench_resume"
PREFIX = "runtime/run_summary:*"


def wait_projected(url: str, events: int, timeout: float = 300) -> int:
    """Wait until the documents have folded ``events`` events; returns the last watermark."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(url, autocommit=True) as conn:
        while True:
            row = conn.execute(
                "SELECT coalesce(sum(version), 0), coalesce(max(watermark), 0)"
                " FROM oa_sync.documents"
            ).fetchone()
            assert row is not None
            if row[0] >= events:
                return int(row[1])
            if time.monotonic() > deadline:
                raise TimeoutError(f"projected {row[0]} of {events} events in {timeout} s")
            time.sleep(0.1)


def raw_catch_up(url: str, after: int) -> tuple[float, int]:
    """Seconds and rows to read the coalesced catch-up straight from Postgres."""
    with psycopg.connect(url, autocommit=True) as conn:
        start = time.perf_counter()
        rows = conn.execute(
            "SELECT doc_key, projection, version, watermark, content_hash, body"
            " FROM oa_sync.documents WHERE watermark > %s ORDER BY watermark",
            (after,),
        ).fetchall()
        return time.perf_counter() - start, len(rows)


def main() -> int:
    """Run the three resume scenarios; write bench/results/resume.json."""
    docs, per_doc, recent, simultaneous = (
        (500, 10, 1_000, 50) if quick() else (5_000, 10, 10_000, 1_000)
    )
    admin = admin_url()
    facts = machine(admin)
    load_before = load_average()
    url = migrated_database(admin, DB_NAME)
    bearer = token()
    try:
        everything = interleaved_events(docs * (per_doc + 1), docs)
        copy_events(url, everything[:docs])
        with ServerProcess(url) as server:
            w0 = wait_projected(url, docs)
            hello = asyncio.run(welcome(server.ws_url, bearer))
            epoch = hello["epoch"]
            copy_events(url, everything[docs:], start_seq=1)
            w_end = wait_projected(url, len(everything))

            def resume_from(after: int) -> dict[str, str]:
                return {"epoch": epoch, "watermark": str(after)}

            fleet = Fleet(server.ws_url, bearer, [[PREFIX]], processes=1, resume=resume_from(w0))
            a = fleet.start()
            a_updates = len(fleet.stop()["records"])
            fleet = Fleet(
                server.ws_url, bearer, [[PREFIX]], processes=1, resume=resume_from(w_end - recent)
            )
            b = fleet.start()
            b_updates = len(fleet.stop()["records"])
            stride = docs // 5
            sets = [
                [doc_key((i + k * stride) % docs) for k in range(5)] for i in range(simultaneous)
            ]
            fleet = Fleet(
                server.ws_url, bearer, sets, processes=2, resume=resume_from(w_end - recent)
            )
            c = fleet.start()
            c_updates = len(fleet.stop()["records"])
        raw_seconds, raw_rows = raw_catch_up(url, w0)
        raw_b_seconds, raw_b_rows = raw_catch_up(url, w_end - recent)
    finally:
        drop_database(admin, DB_NAME)
    missed = w_end - w0
    result = Result(
        name="resume",
        parameters={
            "documents": docs,
            "missed_changes_a": missed,
            "missed_changes_b_c": recent,
            "simultaneous_resumes": simultaneous,
            "topics_a_b": [PREFIX],
            "topics_c": "5 exact run keys per socket",
            "subprotocol": "oa-sync.v1.json",
            "timing": "subscribe sent -> synced received, in the client process",
            "git": git_revision(),
            "load_average_before": load_before,
            "load_average_after": load_average(),
        },
        figures={
            "a_synced_ms": 1000 * a["sync_seconds"][0],
            "a_bytes_received": a["bytes"],
            "a_updates": a_updates,
            "b_synced_ms": 1000 * b["sync_seconds"][0],
            "b_bytes_received": b["bytes"],
            "b_updates": b_updates,
            "c_all_synced_s": c["connect_seconds"],
            "c_slowest_synced_ms": 1000 * max(c["sync_seconds"]),
            "c_updates": c_updates,
        },
        baseline={
            "raw_select_catch_up_ms": 1000 * raw_seconds,
            "raw_select_rows": raw_rows,
            "ratio_a_vs_raw_select": a["sync_seconds"][0] / raw_seconds,
            "raw_select_b_ms": 1000 * raw_b_seconds,
            "raw_select_b_rows": raw_b_rows,
            "ratio_b_vs_raw_select": b["sync_seconds"][0] / raw_b_seconds,
        },
    )
    result.target(
        f"{recent:,} missed changes -> synced / raw SELECT of the same rows",
        b["sync_seconds"][0] / raw_b_seconds,
        at_most=3,
        unit="x",
    )
    result.target(
        f"{simultaneous:,} simultaneous resumes -> all synced",
        c["connect_seconds"],
        at_most=5,
        unit="s",
    )
    if b_updates != raw_b_rows:
        result.notes.append(
            f"CHECK: scenario B received {b_updates} updates, {raw_b_rows} expected"
        )
    if a_updates != raw_rows:
        result.notes.append(f"CHECK: scenario A received {a_updates} updates, {raw_rows} expected")
    plot = bar_plot(
        "resume",
        [f"A {missed // 1000}k missed", f"B {recent // 1000}k missed", "raw SELECT (A)"],
        [1000 * a["sync_seconds"][0], 1000 * b["sync_seconds"][0], 1000 * raw_seconds],
        "ms to synced",
        f"resume over {docs:,} documents",
    )
    result.write(facts, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
