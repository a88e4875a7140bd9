"""Smoke test of the benchmark suite: the cheap benchmarks run in --quick mode and write results.

It proves the scripts still import and run against the current APIs; the figures are not
checked (a shared CI machine measures nothing). Results go to a temporary directory so the
committed ``bench/results`` stay untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHEAP = ("wire_codec",)


def test_quick_benchmarks_write_results(tmp_path: Path) -> None:
    """`bench/run_all.py --quick` on the cheap benchmarks exits 0 and writes JSON + PNG."""
    env = {**os.environ, "OA_SYNC_BENCH_RESULTS": str(tmp_path), "MPLBACKEND": "Agg"}
    done = subprocess.run(  # noqa: S603 - our own script, with this interpreter
        [sys.executable, str(ROOT / "bench/run_all.py"), "--quick", "--only", ",".join(CHEAP)],
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for name in CHEAP:
        result = json.loads((tmp_path / f"{name}.json").read_text("utf-8"))
        assert result["figures"] or result["baseline"], result
        assert result["machine"]["cores"] >= 1
        assert (tmp_path / f"{name}.png").exists()
