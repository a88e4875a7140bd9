"""Drift, reprojection and the database commands (migrate, append, reproject, drift)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import secrets
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from oa_sync_core.testing import new_event
from oa_sync_server.cli import main
from oa_sync_server.postgres import create_engine
from oa_sync_server.postgres.admin import check_drift, prune_changes, reproject
from oa_sync_server.postgres.event_log import PostgresEventLog
from oa_sync_server.postgres.tables import changes, documents
from oa_sync_server.worker import ProjectorWorker
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.pg import drop_database, make_database
from tests.server.pg_projection import assert_matches_fold, read_model, wait_until

CORRUPT = sa.text(
    "UPDATE oa_sync.documents SET body = jsonb_set(body, '{status}', '\"FAILED\"') "
    "WHERE doc_key = :key"
)


async def _seed(engine: AsyncEngine, runs: int = 3) -> ProjectorWorker:
    log = PostgresEventLog(engine)
    for i in range(runs):
        await log.append(
            [
                new_event("run.created", f"r{i}"),
                new_event("run.started", f"r{i}"),
                new_event("run.step", f"r{i}", description="go", progressPercent=10 * i),
            ]
        )
    await log.append([new_event("worker.started", "w1"), new_event("worker.heartbeat", "w1")])
    worker = ProjectorWorker(engine)
    await worker.catch_up()
    await worker.release()
    return worker


# --- library: drift and reprojection -----------------------------------------------------------


async def test_reproject_over_a_live_read_model_is_byte_identical(engine: AsyncEngine) -> None:
    """Reprojecting a healthy read model rewrites nothing: same bytes, no new changes."""
    await _seed(engine)
    before = await read_model(engine)
    outcome = await reproject(engine)
    assert (outcome.rewritten, outcome.unchanged, outcome.events) == ((), 4, 11)
    assert await read_model(engine) == before
    assert (await check_drift(engine)).ok


async def test_drift_finds_exactly_the_corrupted_row_and_reproject_repairs_it(
    engine: AsyncEngine,
) -> None:
    """One corrupted body is the only drift item; reproject rewrites only it, with a new
    change row, and the read model equals the fold again."""
    await _seed(engine)
    key = "runtime/run_summary:r1"
    async with engine.begin() as conn:
        await conn.execute(CORRUPT, {"key": key})
    report = await check_drift(engine)
    assert [(i.kind.value, i.doc_key) for i in report.items] == [("hash_mismatch", key)]
    dry = await reproject(engine, dry_run=True)
    assert dry.rewritten == (key,)
    assert not (await check_drift(engine)).ok  # the dry run wrote nothing
    before = await read_model(engine)
    epoch = await _epoch(engine)
    outcome = await reproject(engine)
    assert (outcome.rewritten, outcome.epoch_changed) == ((key,), True)
    assert await _epoch(engine) != epoch  # clients holding version 3 must reset
    after = await assert_matches_fold(engine, repaired=True)
    assert after["changes"][:-1] == before["changes"]
    assert after["changes"][-1][:3] == (len(before["changes"]) + 1, key, 3)
    assert (await check_drift(engine)).ok


async def _epoch(engine: AsyncEngine) -> str:
    async with engine.connect() as conn:
        query = sa.text("SELECT value FROM oa_sync.sync_meta WHERE key = 'epoch'")
        return str((await conn.execute(query)).scalar_one())


async def test_drift_ignores_events_not_yet_projected(engine: AsyncEngine) -> None:
    """Drift folds only up to the projector's cursor: a backlog is not drift."""
    await _seed(engine)
    await PostgresEventLog(engine).append([new_event("run.step", "r0", description="later")])
    assert (await check_drift(engine)).ok
    assert (await check_drift(engine, projection="runtime/codex_worker_summary")).ok
    async with engine.begin() as conn:
        await conn.execute(
            sa.delete(documents).where(documents.c.doc_key == "runtime/run_summary:r2")
        )
    report = await check_drift(engine, projection="runtime/run_summary")
    assert [(i.kind.value, i.doc_key) for i in report.items] == [
        ("missing", "runtime/run_summary:r2")
    ]
    epoch = await _epoch(engine)
    outcome = await reproject(engine, doc_key="runtime/run_summary:r2")
    assert (outcome.rewritten, outcome.epoch_changed) == (("runtime/run_summary:r2",), False)
    assert await _epoch(engine) == epoch  # a missing document only moves forward
    await ProjectorWorker(engine).catch_up()
    await assert_matches_fold(engine, repaired=True)  # r2 at version 3 again: a repeat


# --- the commands -------------------------------------------------------------------------------


def _env(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("OA_SYNC_DATABASE_URL", url)


def _count(url: str, table: str) -> int:
    with psycopg.connect(url.replace("+psycopg", "")) as conn:
        row = conn.execute(f"SELECT count(*) FROM oa_sync.{table}").fetchone()  # noqa: S608
    assert row is not None
    return int(row[0])


def test_migrate_creates_the_schema_once(
    pg_server_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`oa-sync migrate` on an empty database creates the schema and is idempotent."""
    name = "oa_cli_" + secrets.token_hex(6)
    url = make_database(pg_server_url, name)
    try:
        _env(monkeypatch, url)
        assert main(["migrate"]) == 0
        assert main(["migrate"]) == 0
        assert _count(url, "events") == 0
        assert "at head" in capsys.readouterr().out
    finally:
        drop_database(pg_server_url, name)


LINES = [
    '{"streamId": "run:r1", "type": "run.created", "payload": {"runId": "r1"}}',
    "",
    '{"streamId": "run:r1", "type": "run.started", "payload": {"runId": "r1"},'
    ' "idempotencyKey": "r1:2", "expectedSeq": "1"}',
]


def test_append_from_a_file_and_stdin(
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """JSON lines from a file or stdin are appended (in chunks); positions are printed; keys
    replay."""
    _env(monkeypatch, database_url)
    monkeypatch.setattr("oa_sync_server.commands.append.CHUNK", 1)
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(LINES) + "\n")
    assert main(["append", str(path)]) == 0
    first = json.loads(capsys.readouterr().out)["positions"]
    assert len(first) == 2
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(LINES[2].encode() + b"\n")))
    assert main(["append"]) == 0
    assert json.loads(capsys.readouterr().out)["positions"] == [first[1]]
    assert _count(database_url, "events") == 2


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 2: not JSON"),
        ('{"streamId": "run:r2", "type": "run.created"}', "line 2: missing 'payload'"),
        ('{"streamId": "run:r2", "type": "run.created", "payload": {}, "x": 1}', "unknown field"),
        ('{"streamId": "run:r2", "type": "run.created", "payload": {"runId": "r9"}}', "line 2:"),
        (
            '{"streamId": "run:r1", "type": "run.step", "payload": {"runId": "r1"},'
            ' "expectedSeq": "5"}',
            "nothing appended",
        ),
    ],
)
def test_append_bad_line_names_it_and_writes_nothing(  # noqa: PLR0917 - pytest fixtures
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    line: str,
    message: str,
) -> None:
    """A bad line (or a seq conflict) exits 2 with one message and appends nothing at all."""
    _env(monkeypatch, database_url)
    path = tmp_path / "events.jsonl"
    path.write_text(LINES[0] + "\n" + line + "\n")
    assert main(["append", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert _count(database_url, "events") == 0


def test_drift_exits_1_on_a_corrupted_row_and_reproject_fixes_it(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`oa-sync drift` exits 0 on a healthy model, 1 naming the corrupted row, and 0 again
    after `oa-sync reproject`; --dry-run and --json behave."""

    async def seed() -> None:
        engine = create_engine(database_url)
        try:
            await _seed(engine)
        finally:
            await engine.dispose()

    asyncio.run(seed())
    _env(monkeypatch, database_url)
    assert main(["drift"]) == 0
    assert "no drift" in capsys.readouterr().out
    assert main(["reproject"]) == 0
    assert "rewrote 0 documents, 4 unchanged" in capsys.readouterr().out
    with psycopg.connect(database_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(
            "UPDATE oa_sync.documents SET body = jsonb_set(body, '{status}', '\"FAILED\"') "
            "WHERE doc_key = 'runtime/run_summary:r2'"
        )
    assert main(["drift", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert [i["docKey"] for i in report["items"]] == ["runtime/run_summary:r2"]
    assert main(["drift", "--projection", "runtime/codex_worker_summary"]) == 0
    capsys.readouterr()
    assert main(["reproject", "--dry-run", "--projection", "runtime/run_summary"]) == 0
    assert "would rewrite runtime/run_summary:r2" in capsys.readouterr().out
    assert main(["drift"]) == 1
    capsys.readouterr()
    assert main(["reproject", "--doc", "runtime/run_summary:r2"]) == 0
    assert "rewrote 1 documents" in capsys.readouterr().out
    assert main(["drift"]) == 0
    assert _count(database_url, "changes") == 5


def test_database_commands_report_user_errors_in_one_line(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unknown projection or an unreachable database exits 2 with one line, no URL."""
    _env(monkeypatch, database_url)
    assert main(["drift", "--projection", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    monkeypatch.setenv("OA_SYNC_DATABASE_URL", "postgresql://u:sekrit@127.0.0.1:1/x")
    assert main(["drift"]) == 2
    err = capsys.readouterr().err
    assert "database unavailable" in err
    assert "sekrit" not in err
    assert len(err.strip().splitlines()) == 1


async def test_changes_and_documents_tables_agree(engine: AsyncEngine) -> None:
    """documents.watermark is the watermark of the document's latest change row."""
    await _seed(engine)
    async with engine.connect() as conn:
        query = sa.select(changes.c.doc_key, sa.func.max(changes.c.watermark)).group_by(
            changes.c.doc_key
        )
        latest = {r[0]: r[1] for r in await conn.execute(query)}
        held = {
            r[0]: r[1]
            for r in await conn.execute(sa.select(documents.c.doc_key, documents.c.watermark))
        }
    assert latest == held


async def test_prune_changes_keeps_watermarks_and_undelivered_sink_rows(
    engine: AsyncEngine,
) -> None:
    """Old change rows go and retained_from rises; rows an HTTP sink still needs stay;
    watermarks continue from the last one."""
    await _seed(engine)  # 4 documents in one batch: change rows 1..4
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(
                "UPDATE oa_sync.changes SET committed_at = now() - interval '2 days' "
                "WHERE watermark <= 3"
            )
        )
        await conn.execute(
            sa.text(
                "INSERT INTO oa_sync.http_sink_checkpoints (sink, last_watermark) "
                "VALUES ('legacy', 2)"
            )
        )
    assert await prune_changes(engine, older_than_s=86400) == 2
    async with engine.begin() as conn:
        await conn.execute(sa.text("UPDATE oa_sync.http_sink_checkpoints SET last_watermark = 11"))
    assert await prune_changes(engine, older_than_s=86400) == 3
    assert await prune_changes(engine, older_than_s=86400) == 3
    model = await read_model(engine)
    assert [r[0] for r in model["changes"]] == [4]
    assert (await check_drift(engine)).ok
    await PostgresEventLog(engine).append([new_event("run.completed", "r0")])
    await ProjectorWorker(engine).catch_up()
    assert (await read_model(engine))["changes"][-1][:2] == (5, "runtime/run_summary:r0")


async def test_drift_and_reproject_are_exact_while_the_worker_runs(engine: AsyncEngine) -> None:
    """With appends flowing and the worker projecting, every drift check is clean and every
    reprojection finds nothing to rewrite: both read one consistent snapshot."""
    log = PostgresEventLog(engine)
    worker = ProjectorWorker(engine, batch_size=7, poll_interval_s=0.05)
    stop = asyncio.Event()
    runner = asyncio.create_task(worker.run(stop))

    async def holds_lease() -> bool:
        return worker.epoch != 0

    # Before the lease exists a drift check folds the whole log (no cursor bounds it) and
    # rightly finds unprojected events missing: start appending once the worker holds it.
    await wait_until(holds_lease, within=30, what="the worker to take the lease")

    async def appender() -> None:
        for i in range(40):
            await log.append(
                [
                    new_event("run.created", f"live{i}"),
                    new_event("run.step", f"live{i // 2}", description=str(i))
                    if i
                    else new_event("run.started", "live0"),
                ]
            )

    writing = asyncio.create_task(appender())
    try:
        checks = 0
        while not writing.done() or checks < 3:
            assert (await check_drift(engine)).ok
            assert (await reproject(engine)).rewritten == ()
            checks += 1
        await writing
    finally:
        writing.cancel()  # a failed check leaves no appender behind holding a connection
        with contextlib.suppress(asyncio.CancelledError):
            await writing
        stop.set()
        await asyncio.wait_for(runner, 30)
    await ProjectorWorker(engine).catch_up()
    await assert_matches_fold(engine)
