"""The read model's topic ∩ grant narrowing (a table) and its queries on real Postgres: prefix
matching is literal (``_`` is not a wildcard), snapshots and catch-up are in watermark order."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
import sqlalchemy as sa
from oa_sync_core.topics import Grant, parse_topic
from oa_sync_server.postgres import read_model
from oa_sync_server.postgres.tables import documents
from sqlalchemy.ext.asyncio import AsyncEngine


@pytest.mark.parametrize(
    ("topics", "grant", "expected"),
    [
        (["*"], ["runtime/run_summary:r1"], ["runtime/run_summary:r1"]),
        (["runtime/*"], ["runtime/run_summary:*"], ["runtime/run_summary:*"]),
        (["runtime/run_summary:*"], ["runtime/*"], ["runtime/run_summary:*"]),
        (["runtime/run_summary:r1"], ["runtime/*"], ["runtime/run_summary:r1"]),
        (["runtime/run_summary:*"], ["runtime/codex_worker_summary:*"], []),
        (["runtime/run_summary:r1"], ["runtime/run_summary:r2"], []),
        (["runtime/*", "runtime/run_summary:r1"], ["*"], ["runtime/*"]),
        (["*"], ["a:*", "b:1"], ["a:*", "b:1"]),
    ],
)
def test_effective_topics_are_inside_both(
    topics: list[str], grant: list[str], expected: list[str]
) -> None:
    """Each requested topic is narrowed to the grant; redundant patterns are dropped."""
    got = read_model.effective_topics([parse_topic(t) for t in topics], Grant.parse(grant))
    assert sorted(t.text for t in got) == sorted(expected)


async def _put(engine: AsyncEngine, *rows: tuple[str, int], body: object = None) -> None:
    now = dt.datetime.now(dt.UTC)
    async with engine.begin() as conn:
        await conn.execute(
            sa.insert(documents),
            [
                {
                    "doc_key": key,
                    "projection": key.partition(":")[0],
                    "version": 1,
                    "watermark": mark,
                    "content_hash": "h",
                    "body": {"key": key} if body is None else body,
                    "updated_at": now,
                }
                for key, mark in rows
            ],
        )


async def test_prefixes_are_literal_and_results_ordered(engine: AsyncEngine) -> None:
    """``a_b*`` matches ``a_b...`` only (no LIKE wildcard), ``%`` never appears, rows come in
    watermark order, ``after`` gives the catch-up and ``limit`` pages."""
    await _put(engine, ("p/a_b:1", 3), ("p/aXb:1", 1), ("p/a_b:2", 2), ("q/z:1", 4))
    grant = Grant.parse(["*"])
    async with engine.connect() as conn:
        rows = await read_model.documents_matching(
            conn, [parse_topic("p/a_b*")], grant, after=None, limit=10
        )
        assert [r.doc_key for r in rows] == ["p/a_b:2", "p/a_b:1"]
        assert rows[0].body == b'{"key":"p/a_b:2"}'
        rows = await read_model.documents_matching(
            conn, [parse_topic("*")], grant, after=2, limit=10
        )
        assert [r.watermark for r in rows] == [3, 4]
        rows = await read_model.documents_matching(
            conn, [parse_topic("*")], Grant.parse(["q/*"]), after=None, limit=10
        )
        assert [r.doc_key for r in rows] == ["q/z:1"]
        rows = await read_model.documents_after(conn, 0, 2)
        assert [r.watermark for r in rows] == [1, 2]
        meta = await read_model.read_meta(conn)
        assert meta.watermark == 4
        assert meta.retained_from == 0
        assert meta.epoch
        assert await read_model.document(conn, "nope") is None
        with pytest.raises(ValueError, match="limit"):
            await read_model.documents_after(conn, 0, 0)


async def test_catch_up_reads_of_one_turn_equal_each_read_alone(engine: AsyncEngine) -> None:
    """Reads made in the same event-loop turn (shared connection, one ``IN`` statement for the
    exact-key ones, one meta read) each return exactly what :func:`documents_matching` returns
    alone: exact keys and prefixes, snapshots and catch-ups from different watermarks, a grant
    narrowing, a key that does not exist, more keys than the limit (paged on its own)."""
    await _put(engine, *((f"p/a:{i}", 2 * i + 1) for i in range(10)))
    await _put(engine, *((f"q/b:{i}", 2 * i + 2) for i in range(10)))
    everything = Grant.parse(["*"])
    cases: list[tuple[list[str], Grant, int | None, int]] = [
        (["p/a:1", "q/b:3", "p/a:7"], everything, None, 10),
        (["p/a:1", "q/b:3", "p/a:7"], everything, 5, 10),
        (["q/b:3"], everything, 8, 10),
        (["p/a:2", "p/a:missing"], everything, None, 10),
        (["p/a:1", "p/a:2", "p/a:3"], everything, None, 2),
        (["p/a:1", "q/b:1"], Grant.parse(["q/*"]), None, 10),
        (["p/*"], everything, None, 10),
        (["p/*", "q/b:9"], everything, 9, 4),
        (["*"], Grant.parse(["q/b:2", "p/a:4"]), 0, 10),
        (["r/*"], everything, None, 10),
    ]
    reads = read_model.CatchUpReads()
    meta, *batched = await asyncio.gather(
        reads.meta(engine),
        *(
            reads.documents(
                engine, [parse_topic(t) for t in topics], grant, after=after, limit=limit
            )
            for topics, grant, after, limit in cases
        ),
    )
    async with engine.connect() as conn:
        assert meta == await read_model.read_meta(conn)
        for (topics, grant, after, limit), rows in zip(cases, batched, strict=True):
            alone = await read_model.documents_matching(
                conn, [parse_topic(t) for t in topics], grant, after=after, limit=limit
            )
            assert rows == alone, (topics, after, limit)
    with pytest.raises(ValueError, match="limit"):
        await reads.documents(engine, [parse_topic("*")], everything, after=None, limit=0)
    await reads.close()


async def test_catch_up_reads_equal_documents_matching_on_awkward_keys_and_bodies(
    engine: AsyncEngine,
) -> None:
    """The plain-SQL catch-up reads treat ``_`` in a prefix literally and give the same
    canonical body bytes as :func:`documents_matching` for floats, integers past 64 bits,
    nulls and escaped or non-ASCII text."""
    body = {
        "big": 123456789012345678901234567890,
        "neg": -(2**63) - 1,
        "f": [1.0, 2.5, 1e-7, 1e300],
        "n": None,
        "s": 'é\n"\\',
        "z": {"b": 1, "a": [True, False]},
    }
    await _put(engine, ("a_b:1", 1), ("axb:2", 2), ("a.b:3", 3), ("a-b_c:4", 4), body=body)
    everything = Grant.parse(["*"])
    cases = [["a_b*"], ["a-b_*"], ["a*"], ["a_b:1", "a.b:3", "nope"], ["*"]]
    reads = read_model.CatchUpReads()
    batched = await asyncio.gather(
        *(
            reads.documents(
                engine, [parse_topic(t) for t in topics], everything, after=None, limit=10
            )
            for topics in cases
        )
    )
    async with engine.connect() as conn:
        for topics, rows in zip(cases, batched, strict=True):
            alone = await read_model.documents_matching(
                conn, [parse_topic(t) for t in topics], everything, after=None, limit=10
            )
            assert rows == alone, topics
            assert rows, topics
    await reads.close()


async def test_catch_up_reads_survive_a_kept_connection_dying(engine: AsyncEngine) -> None:
    """A kept read connection that the server closed meanwhile is replaced: the next read is
    answered on a new one, not failed."""
    await _put(engine, ("k:1", 1))
    reads = read_model.CatchUpReads()
    everything = Grant.parse(["*"])
    first = await reads.documents(engine, [parse_topic("k:1")], everything, after=None, limit=5)
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        )
    again = await reads.documents(engine, [parse_topic("k:1")], everything, after=None, limit=5)
    assert again == first
    assert [r.doc_key for r in first] == ["k:1"]
    await reads.close()
