"""Read-your-writes: ``POST /v1/events?wait=visible`` latency, alone and beside a busy neighbour.

A runtime service that appends inside a request and then reads its own write asks the server to
answer only once the projector has applied the batch (``?wait=visible``). That answer waits for
the projector, and the projector reads the log only below the cluster-wide transaction horizon
(DESIGN.md rule 1): on a Postgres shared with other services, a neighbour's writing transaction
holds projection back until it ends, and the horizon clearing sends no NOTIFY.

1. Same-run baseline: the same ``POST`` of one event without ``wait`` (the append alone), p50,
   p95, p99, one request at a time against ``oa-sync serve`` (its projector running).
2. ``?wait=visible``, one request at a time, on an otherwise idle cluster.
3. ``?wait=visible`` while another database of the same cluster runs a neighbour: short writing
   transactions (an INSERT, then ``pg_sleep`` of ``NEIGHBOUR_TX_MS``) back to back, as a
   neighbouring service on a shared Postgres would.

Target (derived, no issue sets one): a busy neighbour at most triples the ``wait=visible`` p95 of
an idle cluster (before the projector re-checked the horizon by itself it was ~20x: every such
append waited for the next append or for the 1 s poll). Run alone:
``python bench/visible.py [--quick]``.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
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
    temp_database,
)
from _load import migrated_database
from _server import ServerProcess, token

DB_NAME = "oa_sync_bench_visible"
NEIGHBOUR_DB = "oa_sync_bench_neighbour"
NEIGHBOUR_TX_MS = 20


def _ms(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(len(ordered) * share))]


def _summary(timings: list[float]) -> dict[str, float]:
    return {f"p{int(q * 100)}_ms": _ms(timings, q) for q in (0.5, 0.95, 0.99)}


class Neighbour:
    """Writing transactions of ``NEIGHBOUR_TX_MS`` back to back in another database, in a thread.

    Each holds an xid from its INSERT until it commits, so the cluster's ``pg_snapshot_xmin``
    stays behind it: exactly what a busy service sharing the Postgres server does.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.transactions = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="neighbour", daemon=True)

    def _run(self) -> None:
        with psycopg.connect(self.url) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS busy (id bigserial primary key, at float8)")
            conn.commit()
            while not self._stop.is_set():
                conn.execute("INSERT INTO busy (at) VALUES (%s)", (time.time(),))
                conn.execute("SELECT pg_sleep(%s)", (NEIGHBOUR_TX_MS / 1000,))
                conn.commit()
                self.transactions += 1

    def __enter__(self) -> Neighbour:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


async def post_one_at_a_time(base: str, rounds: int, *, visible: bool, first: int) -> list[float]:
    """Seconds of each ``POST /v1/events`` of one event (a new run each time), in sequence."""
    import aiohttp  # noqa: PLC0415

    headers = {"Authorization": f"Bearer {token()}"}
    params = {"wait": "visible"} if visible else {}
    timings: list[float] = []
    async with aiohttp.ClientSession(headers=headers) as session:
        for i in range(first, first + rounds + 10):
            body = {
                "events": [
                    {"streamId": f"run:v{i}", "type": "run.created", "payload": {"runId": f"v{i}"}}
                ]
            }
            t0 = time.perf_counter()
            async with session.post(base + "/v1/events", json=body, params=params) as answer:
                payload: dict[str, Any] = await answer.json()
                assert answer.status == 200, (answer.status, payload)
                assert not visible or "visibleWatermark" in payload, payload
            if i - first >= 10:  # the first ten warm the pool and the caches
                timings.append(time.perf_counter() - t0)
    return timings


def main() -> int:
    """Run the three series; write bench/results/visible.json."""
    rounds = 40 if quick() else 300
    admin = admin_url()
    facts = machine(admin)
    load_before = load_average()
    url = migrated_database(admin, DB_NAME)
    neighbour_url = temp_database(admin, NEIGHBOUR_DB)
    try:
        with ServerProcess(url) as server:
            plain = asyncio.run(post_one_at_a_time(server.url, rounds, visible=False, first=0))
            alone = asyncio.run(
                post_one_at_a_time(server.url, rounds, visible=True, first=1_000_000)
            )
            load_neighbour = load_average()
            with Neighbour(neighbour_url) as neighbour:
                busy = asyncio.run(
                    post_one_at_a_time(server.url, rounds, visible=True, first=2_000_000)
                )
            neighbour_transactions = neighbour.transactions
    finally:
        drop_database(admin, DB_NAME)
        drop_database(admin, NEIGHBOUR_DB)
    series = {"append": _summary(plain), "visible": _summary(alone), "neighbour": _summary(busy)}
    figures = {
        f"{name}_{key}": value for name, summary in series.items() for key, value in summary.items()
    }
    figures["neighbour_transactions"] = float(neighbour_transactions)
    ratio = series["neighbour"]["p95_ms"] / series["visible"]["p95_ms"]
    result = Result(
        name="visible",
        parameters={
            "rounds": rounds,
            "events_per_post": 1,
            "neighbour": f"INSERT + pg_sleep({NEIGHBOUR_TX_MS} ms) per transaction, back to back,"
            " in another database of the same cluster",
            "server": "oa-sync serve --workers 1 (projector in the same process), one client",
            "git": git_revision(),
            "load_average_before": load_before,
            "load_average_with_neighbour": load_neighbour,
            "load_average_after": load_average(),
        },
        figures=figures,
        baseline={
            "append_p50_ms": series["append"]["p50_ms"],
            "ratio_visible_p50_vs_append_p50": series["visible"]["p50_ms"]
            / series["append"]["p50_ms"],
            "ratio_neighbour_p95_vs_visible_p95": ratio,
        },
    )
    result.target(
        "wait=visible p95 beside a writing neighbour / idle cluster", ratio, at_most=3.0, unit="x"
    )
    plot = bar_plot(
        "visible",
        ["append", "visible", "visible + neighbour"],
        [series["append"]["p95_ms"], series["visible"]["p95_ms"], series["neighbour"]["p95_ms"]],
        "p95 ms",
        "POST /v1/events of 1, one at a time",
    )
    result.write(facts, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
