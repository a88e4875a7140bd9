"""``oa-sync append`` as an import: any size, bounded transactions, ``--atomic``, progress."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import psycopg
import pytest
from oa_sync_server.cli import main
from oa_sync_server.commands._db import Progress

RUNS = 10_000
EVENTS = 100_000


def _count(url: str, query: str = "SELECT count(*) FROM oa_sync.events") -> int:
    with psycopg.connect(url.replace("+psycopg", "")) as conn:
        row = conn.execute(query).fetchone()  # type: ignore[arg-type]
    assert row is not None
    return int(row[0])


def _line(run: int, step: int) -> bytes:
    ident = f"r{run}"
    if step == 0:
        payload: dict[str, object] = {"runId": ident, "agentId": "importer"}
        kind = "run.created"
    else:
        payload = {"runId": ident, "stepIndex": step, "progressPercent": step * 10}
        kind = "run.step"
    return orjson.dumps({"streamId": f"run:{ident}", "type": kind, "payload": payload}) + b"\n"


def _write(path: Path, runs: int, per_run: int) -> None:
    """Runs interleaved the way an export of a busy system is: step by step across runs."""
    with path.open("wb") as handle:
        for step in range(per_run):
            handle.write(b"".join(_line(run, step) for run in range(runs)))


@pytest.mark.slow
def test_import_of_100k_events_over_10k_runs_succeeds_in_one_command(
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """100,000 events over 10,000 runs go in with one `oa-sync append FILE`, every stream
    gap-free (one advisory lock per stream used to exhaust Postgres' lock table)."""
    monkeypatch.setenv("OA_SYNC_DATABASE_URL", database_url)
    path = tmp_path / "import.jsonl"
    _write(path, RUNS, EVENTS // RUNS)
    assert main(["append", str(path)]) == 0
    captured = capsys.readouterr()
    positions = json.loads(captured.out)["positions"]
    assert len(positions) == EVENTS
    assert len(set(positions)) == EVENTS
    assert f"appended {EVENTS} events" in captured.err
    assert _count(database_url) == EVENTS
    assert (
        _count(
            database_url,
            "SELECT count(*) FROM (SELECT stream_id FROM oa_sync.events GROUP BY stream_id "
            "HAVING max(stream_seq) = 10 AND count(*) = 10) AS full_runs",
        )
        == RUNS
    )


def test_atomic_import_of_10k_streams_in_one_transaction(
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--atomic` appends 10,000 streams in one transaction (bucketed locks fit the lock
    table) and prints every position."""
    monkeypatch.setenv("OA_SYNC_DATABASE_URL", database_url)
    path = tmp_path / "import.jsonl"
    _write(path, RUNS, 1)
    assert main(["append", "--atomic", str(path)]) == 0
    assert len(json.loads(capsys.readouterr().out)["positions"]) == RUNS
    assert _count(database_url) == RUNS


def test_streamed_import_names_a_bad_line_and_keeps_earlier_transactions(
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A bad line stops a streamed import naming it; nothing of its transaction is written,
    the earlier transactions stay, and the message says how many events went in."""
    monkeypatch.setenv("OA_SYNC_DATABASE_URL", database_url)
    monkeypatch.setattr("oa_sync_server.commands.append.CHUNK", 3)
    path = tmp_path / "import.jsonl"
    lines = [_line(run, 0) for run in range(5)]
    lines.insert(4, b'{"streamId": "run:r9", "type": "run.created", "payload": {"runId": "x"}}\n')
    path.write_bytes(b"".join(lines))
    assert main(["append", str(path)]) == 2
    captured = capsys.readouterr()
    assert "line 5: " in captured.err
    assert "payload.runId" in captured.err
    assert "the 3 events before line 4 were" in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    assert len(json.loads(captured.out)["positions"]) == 3
    assert _count(database_url) == 3


def test_streamed_import_names_unparsable_line_after_a_committed_chunk(
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A line that is not JSON, after a committed transaction, is named with the count of
    events already appended."""
    monkeypatch.setenv("OA_SYNC_DATABASE_URL", database_url)
    monkeypatch.setattr("oa_sync_server.commands.append.CHUNK", 2)
    path = tmp_path / "import.jsonl"
    path.write_bytes(_line(0, 0) + _line(1, 0) + _line(2, 0) + b"{not json\n")
    assert main(["append", str(path)]) == 2
    err = capsys.readouterr().err
    assert "line 4: not JSON" in err
    assert "the 2 events before it were" in err
    assert _count(database_url) == 2


def test_atomic_import_writes_nothing_on_a_bad_line_in_a_later_chunk(
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With `--atomic`, a bad event in the third chunk leaves the log empty, named by line."""
    monkeypatch.setenv("OA_SYNC_DATABASE_URL", database_url)
    monkeypatch.setattr("oa_sync_server.commands.append.CHUNK", 2)
    path = tmp_path / "import.jsonl"
    bad = b'{"streamId": "run:r9", "type": "run.created", "payload": {"runId": "x"}}\n'
    path.write_bytes(b"".join(_line(run, 0) for run in range(4)) + bad)
    assert main(["append", "--atomic", str(path)]) == 2
    err = capsys.readouterr().err
    assert "nothing appended: line 5: " in err
    assert _count(database_url) == 0


def test_atomic_refuses_an_input_over_its_limit(
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--atomic` on an input larger than one transaction may hold says so and writes nothing."""
    monkeypatch.setenv("OA_SYNC_DATABASE_URL", database_url)
    monkeypatch.setattr("oa_sync_server.commands.append.ATOMIC_MAX_EVENTS", 2)
    path = tmp_path / "import.jsonl"
    path.write_bytes(b"".join(_line(run, 0) for run in range(3)))
    assert main(["append", "--atomic", str(path)]) == 2
    err = capsys.readouterr().err
    assert "more than 2 events: too many for one transaction (--atomic)" in err
    assert _count(database_url) == 0


def test_progress_reports_rate_share_and_eta(capsys: pytest.CaptureFixture[str]) -> None:
    """A progress line gives the count, the rate, the share done and an ETA when known."""
    progress = Progress("events appended", every_s=0.0)
    progress.started -= 10  # ten seconds into the run
    progress(5000, 0.25)
    progress(6000)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "... 5,000 events appended (500/s, 25%, ETA 30 s)"
    assert lines[1].startswith("... 6,000 events appended (600/s, 10 s)")


def test_progress_uses_a_total_and_can_be_silenced(capsys: pytest.CaptureFixture[str]) -> None:
    """With a total the share done comes from the count; disabled, nothing is printed."""
    progress = Progress("events folded", every_s=0.0, total=8000)
    progress.started -= 4
    progress(2000)
    Progress(every_s=0.0, enabled=False)(5)
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["... 2,000 events folded (500/s, 25%, ETA 12 s)"]
