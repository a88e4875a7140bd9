"""Smoke test of the benchmark suite: the cheap benchmarks run in --quick mode and write results.

It proves the scripts still import and run against the current APIs, and that the report
generator renders their files; the figures are not checked (a shared CI machine measures
nothing). Results go to a temporary directory so the committed ``bench/results`` stay untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHEAP = ("wire_codec", "rebuild", "projection")


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """One `bench/run_all.py --quick` run of the cheap benchmarks: (results dir, env)."""
    results = tmp_path_factory.mktemp("bench-results")
    env = {**os.environ, "OA_SYNC_BENCH_RESULTS": str(results), "MPLBACKEND": "Agg"}
    done = subprocess.run(  # noqa: S603 - our own script, with this interpreter
        [sys.executable, str(ROOT / "bench/run_all.py"), "--quick", "--only", ",".join(CHEAP)],
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return results, env


def test_quick_benchmarks_write_results(quick_results: tuple[Path, dict[str, str]]) -> None:
    """`bench/run_all.py --quick` on the cheap benchmarks exits 0 and writes JSON + PNG."""
    results, _ = quick_results
    for name in CHEAP:
        result = json.loads((results / f"{name}.json").read_text("utf-8"))
        # Ours and the target's verdict, not only the baseline: an import the benchmark could
        # not make once left its own figures out silently.
        assert result["figures"], result
        assert result["baseline"], result
        assert result["targets"], result
        assert result["machine"]["cores"] >= 1
        assert result["parameters"]["quick"] is True
        assert (results / f"{name}.png").exists()


def test_report_splices_tables_between_markers(
    quick_results: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """`bench/report.py --write` replaces only the text between the markers."""
    _, env = quick_results
    doc = tmp_path / "doc.md"
    stale = "intro\n<!-- results:begin -->\nSTALE-TABLE-TEXT\n<!-- results:end -->\nnotes\n"
    doc.write_text(stale, "utf-8")
    report = [sys.executable, str(ROOT / "bench/report.py"), "--write", str(doc)]
    assert subprocess.run(report, env=env, timeout=60, check=False).returncode == 0  # noqa: S603
    text = doc.read_text("utf-8")
    assert text.startswith("intro\n<!-- results:begin -->\n")
    assert text.endswith("<!-- results:end -->\nnotes\n")
    assert "STALE-TABLE-TEXT" not in text
    assert "### wire_codec (--quick: NOT the full parameters)" in text
