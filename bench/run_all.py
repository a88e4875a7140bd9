"""Run every benchmark, each in its own process, and print one summary table.

Usage: ``python bench/run_all.py [--quick] [--only name,name] [--timeout SECONDS]``.

Each benchmark is a standalone script (``python bench/<name>.py [--quick]``) that writes
``bench/results/<name>.json`` and a PNG. This runner starts them one after the other (never
in parallel: they would measure each other), collects their result files and prints every
target with its verdict. It exits non-zero when a benchmark fails to produce its result; a
missed target is a finding, not a failure, and is shown as such.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import RESULTS  # noqa: E402

BENCHMARKS = (
    "wire_codec",
    "projection",
    "rebuild",
    "ingest",
    "visible",
    "fanout",
    "connections",
    "resume",
    "instances",
)
NEEDS_POSTGRES = frozenset(BENCHMARKS) - {"wire_codec"}


@contextlib.contextmanager
def private_postgres(wanted: bool) -> Iterator[str | None]:
    """A Postgres cluster of the run's own (pgserver), unless one is configured or not wanted.

    The projector reads the log only below the cluster-wide transaction horizon (DESIGN.md
    rule 1), so any transaction open in *another* database of a shared cluster (a test suite
    dropping databases, say) delays projection. A private cluster keeps the figures about
    this code, not about the neighbours. ``OA_SYNC_BENCH_DATABASE_URL`` wins when set.
    """
    if not wanted or os.environ.get("OA_SYNC_BENCH_DATABASE_URL"):
        yield None
        return
    import pgserver  # noqa: PLC0415 - only when a private cluster is wanted

    with tempfile.TemporaryDirectory(prefix="oa-sync-bench-pg-") as data_dir:
        server = pgserver.get_server(data_dir, cleanup_mode="stop")
        try:
            yield str(server.get_uri())
        finally:
            server.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks; returns the number of benchmarks that failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small parameters (CI smoke)")
    parser.add_argument("--only", default="", help="comma-separated benchmark names")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per benchmark")
    parser.add_argument(
        "--shared-postgres",
        action="store_true",
        help="use OA_SYNC_TEST_DATABASE_URL's cluster instead of a private pgserver one",
    )
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    wanted = not args.shared_postgres and bool(NEEDS_POSTGRES & set(names))
    with private_postgres(wanted) as url:
        env = dict(os.environ)
        if url is not None:
            env["OA_SYNC_BENCH_DATABASE_URL"] = url
            env["OA_SYNC_BENCH_PRIVATE_POSTGRES"] = "1"
        return _run(names, args, env)


def _run(names: list[str], args: argparse.Namespace, env: dict[str, str]) -> int:
    failed: list[str] = []
    summary: list[tuple[str, float, str]] = []
    for name in names:
        script = HERE / f"{name}.py"
        if not script.exists():
            failed.append(name)
            summary.append((name, 0.0, "missing script"))
            continue
        result_file = RESULTS / f"{name}.json"
        before = result_file.stat().st_mtime if result_file.exists() else 0.0
        command = [sys.executable, str(script), *(["--quick"] if args.quick else [])]
        print(f"\n### {name}: {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        try:
            code = subprocess.run(  # noqa: S603 - our own scripts
                command, check=False, timeout=args.timeout, env=env
            ).returncode
        except subprocess.TimeoutExpired:
            code = -1
        elapsed = time.perf_counter() - start
        fresh = result_file.exists() and result_file.stat().st_mtime > before
        if code != 0 or not fresh:
            failed.append(name)
            summary.append((name, elapsed, f"FAILED (exit {code}, result written: {fresh})"))
        else:
            summary.append((name, elapsed, "ok"))
    print("\n== summary ==")
    for name, elapsed, status in summary:
        print(f"  {name:<14} {elapsed:7.1f} s  {status}")
        result_file = RESULTS / f"{name}.json"
        if status == "ok":
            for target in json.loads(result_file.read_text("utf-8"))["targets"]:
                bound = (
                    f">= {target['at_least']}"
                    if target["at_least"] is not None
                    else f"<= {target['at_most']}"
                )
                print(
                    f"      {target['label'][:60]:<60} {target['figure']:>12,.2f} {bound}"
                    f" {target['unit']}  [{target['verdict']}]"
                )
    return len(failed)


if __name__ == "__main__":
    raise SystemExit(main())
