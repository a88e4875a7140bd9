"""Shared benchmark plumbing: machine facts, result files, plots and Postgres baselines.

Every benchmark writes ``bench/results/<name>.json`` with the machine it ran on, its
parameters, its figures, the same-run baseline and the ratio, plus a PNG plot, and prints a
short table. Nothing here is timed as a unit test: benchmarks run only via ``nox -s bench`` or
by hand.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psutil
import psycopg

RESULTS = Path(os.environ.get("OA_SYNC_BENCH_RESULTS", Path(__file__).resolve().parent / "results"))
"""Where result files go (``OA_SYNC_BENCH_RESULTS`` overrides, e.g. for the smoke test)."""
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def admin_url() -> str:
    """The Postgres server to benchmark against (OA_SYNC_BENCH_DATABASE_URL or the local one)."""
    return os.environ.get(
        "OA_SYNC_BENCH_DATABASE_URL",
        os.environ.get("OA_SYNC_TEST_DATABASE_URL", DEFAULT_ADMIN_URL),
    )


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (other work on a shared machine shows here)."""
    return [round(x, 2) for x in os.getloadavg()]


def machine(conn_url: str | None = None) -> dict[str, Any]:
    """Facts about the machine a figure was measured on (load average taken at call time)."""
    facts: dict[str, Any] = {
        "cores": os.cpu_count(),
        "load_average": load_average(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    facts["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if conn_url is not None:
        with psycopg.connect(conn_url, autocommit=True) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            facts["postgres"] = row[0] if row else "unknown"
        facts["postgres_cluster"] = (
            "private (pgserver, started by run_all)"
            if os.environ.get("OA_SYNC_BENCH_PRIVATE_POSTGRES")
            else "configured (OA_SYNC_BENCH_DATABASE_URL / OA_SYNC_TEST_DATABASE_URL)"
        )
    return facts


@dataclass
class Result:
    """One benchmark's outcome; ``write`` stores it and prints the table."""

    name: str
    parameters: dict[str, Any]
    figures: dict[str, float] = field(default_factory=dict)
    baseline: dict[str, float] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def target(
        self,
        label: str,
        figure: float,
        *,
        at_least: float | None = None,
        at_most: float | None = None,
        unit: str = "",
    ) -> None:
        """Record a target with its verdict."""
        ok = (at_least is None or figure >= at_least) and (at_most is None or figure <= at_most)
        self.targets.append(
            {
                "label": label,
                "figure": round(figure, 3),
                "at_least": at_least,
                "at_most": at_most,
                "unit": unit,
                "verdict": "met" if ok else "missed",
            }
        )

    def write(self, machine_facts: Mapping[str, Any], plot: Path | None = None) -> Path:
        """Write the JSON file and print a short table; returns the file's path."""
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"{self.name}.json"
        document = {
            "name": self.name,
            "measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": dict(machine_facts),
            "parameters": {**self.parameters, "quick": quick()},
            "figures": self.figures,
            "baseline": self.baseline,
            "targets": self.targets,
            "notes": self.notes,
            "plot": plot.name if plot else None,
        }
        path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n", "utf-8")
        print(f"\n== {self.name} ==")
        for key, value in {
            **self.figures,
            **{f"baseline.{k}": v for k, v in self.baseline.items()},
        }.items():
            print(f"  {key:<40} {value:>14,.2f}")
        for t in self.targets:
            bound = f">= {t['at_least']}" if t["at_least"] is not None else f"<= {t['at_most']}"
            print(
                f"  target {t['label']:<33} {t['figure']:>14,.2f} {bound} {t['unit']}"
                f"  [{t['verdict']}]"
            )
        return path


def bar_plot(
    name: str, labels: Sequence[str], values: Sequence[float], ylabel: str, title: str
) -> Path:
    """Save a simple bar chart as bench/results/<name>.png."""
    import matplotlib  # noqa: PLC0415 - optional, heavy, only for plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.bar(
        list(labels),
        list(values),
        color=["#4c72b0", "#dd8452", "#55a868", "#c44e52"][: len(values)],
    )
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    for i, v in enumerate(values):
        ax.annotate(f"{v:,.0f}", (i, v), ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def temp_database(url: str, name: str) -> str:
    """Create (replacing) a database for a benchmark and return its URL."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                psycopg.sql.Identifier(name)
            )
        )
        conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


def drop_database(url: str, name: str) -> None:
    """Drop a benchmark database."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                psycopg.sql.Identifier(name)
            )
        )


def copy_baseline(url: str, rows: int, streams: int) -> float:
    """Raw COPY rows/s into a table shaped like the event log (the same-run ceiling)."""
    payload = json.dumps({"runId": "r", "description": "step", "progressPercent": 40})
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_copy")
        conn.execute(
            "CREATE UNLOGGED TABLE bench_copy (position bigint generated always as identity"
            " primary key, stream_id text, stream_seq bigint, type text, payload jsonb,"
            " unique (stream_id, stream_seq))"
        )
        start = time.perf_counter()
        with (
            conn.cursor() as cur,
            cur.copy("COPY bench_copy (stream_id, stream_seq, type, payload) FROM STDIN") as copy,
        ):
            for i in range(rows):
                copy.write_row((f"run:{i % streams}", i // streams + 1, "run.step", payload))
        elapsed = time.perf_counter() - start
        conn.execute("DROP TABLE bench_copy")
    return rows / elapsed


def upsert_baseline(url: str, rows: int, keys: int, batch: int = 1000) -> float:
    """Batched INSERT ... ON CONFLICT DO UPDATE rows/s into a document-shaped table."""
    body = json.dumps({"runId": "r", "status": "RUNNING", "stepCount": 3})
    with psycopg.connect(url) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_upsert")
        conn.execute(
            "CREATE TABLE bench_upsert (doc_key text primary key, version bigint,"
            " content_hash text, body jsonb)"
        )
        conn.commit()
        start = time.perf_counter()
        with conn.cursor() as cur:
            for offset in range(0, rows, batch):
                seen: dict[str, tuple[str, int, str, str]] = {}
                for i in range(offset, min(offset + batch, rows)):
                    key = f"runtime/run_summary:{i % keys}"
                    seen[key] = (key, i, "h" * 64, body)
                cur.executemany(
                    "INSERT INTO bench_upsert (doc_key, version, content_hash, body)"
                    " VALUES (%s, %s, %s, %s) ON CONFLICT (doc_key) DO UPDATE SET"
                    " version = excluded.version, content_hash = excluded.content_hash,"
                    " body = excluded.body",
                    list(seen.values()),
                )
                conn.commit()
        elapsed = time.perf_counter() - start
        conn.execute("DROP TABLE bench_upsert")
        conn.commit()
    return rows / elapsed


def git_revision() -> str:
    """The commit the benchmark ran on (or 'unknown')."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],  # noqa: S607 - git from PATH
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def quick() -> bool:
    """Whether --quick was given (smaller parameters for a CI smoke run)."""
    return "--quick" in sys.argv
