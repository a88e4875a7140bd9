"""PostgresEventLog against real Postgres: appends, idempotency, expected_seq, gap-safe reads."""

from __future__ import annotations

import asyncio
import random

import orjson
import psycopg
import pytest
import sqlalchemy as sa
from oa_sync_core import ConcurrencyError, EventValidationError, NewEvent
from oa_sync_core.memory import MemoryEventLog
from oa_sync_core.testing import new_event
from oa_sync_server.postgres import create_engine
from oa_sync_server.postgres.engine import looks_usable
from oa_sync_server.postgres.event_log import (
    KEPT_CONNECTIONS,
    LogCursor,
    PostgresEventLog,
    StreamOrderConflict,
    read_committed,
)
from oa_sync_server.postgres.tables import EVENTS_CHANNEL, events
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.server.pg_projection import wait_for_horizon, wait_until


async def _count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(
            (await conn.execute(sa.select(sa.func.count()).select_from(events))).scalar_one()
        )


async def _read_all(engine: AsyncEngine, *, wait: bool = True) -> list[int]:
    if wait:
        await wait_for_horizon(engine)
    async with engine.connect() as conn:
        found, _ = await read_committed(conn, LogCursor(), 10_000)
    return [e.position for e in found]


async def test_append_assigns_positions_and_stream_seqs(engine: AsyncEngine) -> None:
    """A batch gets increasing positions and gap-free per-stream sequence numbers."""
    log = PostgresEventLog(engine)
    positions = await log.append(
        [
            new_event("run.created", "r1"),
            new_event("worker.started", "w1"),
            new_event("run.started", "r1"),
        ]
    )
    assert positions == sorted(positions)
    assert len(set(positions)) == 3
    run = await log.stream("run:r1")
    assert [(e.stream_seq, e.type) for e in run] == [(1, "run.created"), (2, "run.started")]
    assert run[0].payload == {"runId": "r1"}
    assert await log.append([]) == []


async def test_idempotency_key_replay_returns_original_position(engine: AsyncEngine) -> None:
    """A key seen before (or repeated in the batch) gives the original position, no new row."""
    log = PostgresEventLog(engine)
    first = await log.append([new_event("run.created", "r1", idempotency_key="k1")])
    again = await log.append(
        [
            new_event("run.created", "r1", idempotency_key="k1"),
            new_event("run.started", "r1", idempotency_key="k2"),
            new_event("run.started", "r1", idempotency_key="k2"),
        ]
    )
    assert again[0] == first[0]
    assert again[1] == again[2] != first[0]
    assert await _count(engine) == 2


async def test_expected_seq_conflict_writes_nothing(engine: AsyncEngine) -> None:
    """A mismatching expected_seq raises ConcurrencyError and the whole batch is discarded."""
    log = PostgresEventLog(engine)
    await log.append([new_event("run.created", "r1", expected_seq=0)])
    with pytest.raises(ConcurrencyError) as info:
        await log.append(
            [
                new_event("worker.started", "w1"),
                new_event("run.started", "r1", expected_seq=0),
            ]
        )
    assert (info.value.stream_id, info.value.actual_seq) == ("run:r1", 1)
    assert await _count(engine) == 1
    await log.append([new_event("run.started", "r1", expected_seq=1)])
    assert await _count(engine) == 2


async def test_invalid_event_is_refused_before_writing(engine: AsyncEngine) -> None:
    """A payload that does not match its proto is refused, naming the event, with no write."""
    log = PostgresEventLog(engine)
    bad = NewEvent(stream_id="run:r1", type="run.step", payload={"runId": "r1", "nope": 1})
    with pytest.raises(EventValidationError):
        await log.append([new_event("run.created", "r1"), bad])
    assert await _count(engine) == 0


async def test_append_in_callers_transaction_is_atomic_with_it(engine: AsyncEngine) -> None:
    """The outbox pattern: events roll back with the caller's transaction and commit with it."""
    log = PostgresEventLog(engine)
    async with engine.connect() as conn:
        async with conn.begin() as tx:
            await log.append([new_event("run.created", "r1")], conn=conn)
            await tx.rollback()
        assert await _count(engine) == 0
        async with conn.begin():
            await log.append([new_event("run.created", "r2")], conn=conn)
    assert await _count(engine) == 1


async def test_reads_stop_below_an_open_transaction(engine: AsyncEngine) -> None:
    """An event committed after an older, still open append stays unread until that commits."""
    log = PostgresEventLog(engine)
    async with engine.connect() as a:
        await a.begin()
        [first] = await log.append([new_event("run.created", "ra")], conn=a)
        [second] = await log.append([new_event("run.created", "rb")])
        assert second > first
        assert await _read_all(engine, wait=False) == []
        await a.commit()
    assert await _read_all(engine) == [first, second]


async def test_rolled_back_appends_leave_holes_that_do_not_block(engine: AsyncEngine) -> None:
    """Positions taken by a rolled-back append are never read and never hold the cursor."""
    log = PostgresEventLog(engine)
    [p1] = await log.append([new_event("run.created", "r1")])
    async with engine.connect() as conn, conn.begin() as tx:
        await log.append([new_event("run.created", "hole")], conn=conn)
        await tx.rollback()
    [p3] = await log.append([new_event("run.created", "r3")])
    assert p3 > p1 + 1
    assert await _read_all(engine) == [p1, p3]


async def test_cursor_reads_in_log_order_batch_by_batch(engine: AsyncEngine) -> None:
    """batches() yields every event once, in (tx_id, position) order."""
    log = PostgresEventLog(engine)
    for i in range(5):
        await log.append([new_event("run.created", f"r{i}"), new_event("run.started", f"r{i}")])
    await wait_for_horizon(engine)
    seen = [e.position async for batch in log.batches(batch_size=3) for e in batch]
    assert seen == sorted(seen)
    assert len(seen) == 10


async def test_older_transaction_cannot_append_behind_a_newer_one(engine: AsyncEngine) -> None:
    """The per-stream order guard: an older open transaction appending after a newer commit."""
    log = PostgresEventLog(engine)
    async with engine.connect() as a:
        await a.begin()
        await log.append([new_event("worker.started", "w-old")], conn=a)  # takes an xid now
        await log.append([new_event("run.created", "r1")])  # a newer transaction commits
        with pytest.raises(StreamOrderConflict):
            await log.append([new_event("run.started", "r1")], conn=a)
        await a.rollback()
    # the log's own transaction retries and succeeds
    await log.append([new_event("run.started", "r1")])
    assert [e.stream_seq for e in await log.stream("run:r1")] == [1, 2]


async def test_concurrent_appends_to_one_stream_are_gap_free(engine: AsyncEngine) -> None:
    """Appenders racing on one stream serialise: stream_seq 1..N with no duplicates."""
    log = PostgresEventLog(engine)
    await log.append([new_event("run.created", "r1")])

    async def writer(n: int) -> None:
        for i in range(10):
            await log.append([new_event("run.step", "r1", description=f"{n}-{i}")])

    await asyncio.gather(*(writer(n) for n in range(4)))
    seqs = [e.stream_seq for e in await log.stream("run:r1")]
    assert seqs == list(range(1, 42))
    positions = [e.position for e in await log.stream("run:r1")]
    assert positions == sorted(positions)


async def test_append_notifies_on_commit(engine: AsyncEngine, database_url: str) -> None:
    """A committed append sends the oa_sync_events hint; a rolled-back one sends nothing."""
    log = PostgresEventLog(engine)
    listener = await psycopg.AsyncConnection.connect(
        database_url.replace("+psycopg", ""), autocommit=True
    )
    async with listener:
        await listener.execute("LISTEN oa_sync_events")
        async with engine.connect() as conn, conn.begin() as tx:
            await log.append([new_event("run.created", "hole")], conn=conn)
            await tx.rollback()
        # A marker committed after the rollback: notifications arrive in commit order, so a
        # hint leaked by the rolled-back append would come before it.
        await listener.execute("SELECT pg_notify('oa_sync_events', 'marker')")
        await log.append([new_event("run.created", "r1")])
        gen = listener.notifies(timeout=10, stop_after=2)
        got = [(n.channel, n.payload) async for n in gen]
    assert got == [(EVENTS_CHANNEL, "marker"), (EVENTS_CHANNEL, "")]


@pytest.mark.parametrize("key_share", [0.4, 0.0])
async def test_append_function_plans_batches_as_plan_append_does(
    engine: AsyncEngine, key_share: float
) -> None:
    """Random batches (idempotency keys repeated within and across batches, right and wrong
    expected_seqs) give the same answers from Postgres' append_events as from plan_append
    (the memory log): the same events written at the same stream_seqs, replays answered with
    the original event, the same ConcurrencyError (stream, expected, actual), nothing written;
    through both of the function's branches (a batch with a key, and one without: key_share 0
    takes only the second)."""
    rnd = random.Random(13)
    memory, log = MemoryEventLog(), PostgresEventLog(engine)
    conflicts = replays = keyless = 0
    for _ in range(150):
        batch = []
        for _ in range(rnd.randint(1, 6)):
            ident = rnd.choice(("a", "b", "c"))
            seq = rnd.randint(0, 6) if rnd.random() < 0.1 else None
            key = f"k{rnd.randint(0, 9)}" if rnd.random() < key_share else None
            batch.append(
                new_event("run.step", ident, expected_seq=seq, idempotency_key=key, stepIndex=1)
            )
        keyless += all(e.idempotency_key is None for e in batch)
        outcomes = []
        for target in (memory, log):
            try:
                positions = await target.append(batch)
            except ConcurrencyError as exc:  # (never the order guard: one writer at a time)
                outcomes.append((type(exc), exc.stream_id, exc.expected_seq, exc.actual_seq))
                continue
            where = {
                e.position: (e.stream_id, e.stream_seq)
                for ident in ("a", "b", "c")
                for e in await target.stream(f"run:{ident}")
            }
            outcomes.append([where[p] for p in positions])
        assert outcomes[0] == outcomes[1]
        conflicts += isinstance(outcomes[0], tuple)
        replays += isinstance(outcomes[0], list) and len(set(outcomes[0])) < len(outcomes[0])
    assert conflicts > 5  # both decisions were exercised
    assert keyless > 5
    if key_share:
        assert replays > 5
        assert 150 - keyless > 5


async def test_append_function_reads_explicit_nulls_as_unset(engine: AsyncEngine) -> None:
    """Rows that spell an unset expected_seq or idempotency_key as null (as callers before
    migration 0006 did) are read as rows that leave them out: the batch takes the branch
    without keys and is written in batch order; a key next to nulls takes the other."""
    call = sa.text(
        "SELECT status, positions FROM oa_sync.append_events(1, '{}', CAST(:rows AS jsonb))"
    )
    nulls = [
        {
            "stream_id": s,
            "type": "run.step",
            "payload": {"runId": s[4:]},
            "expected_seq": None,
            "idempotency_key": None,
        }
        for s in ("run:a", "run:b", "run:a")
    ]
    keyed = [{**nulls[0], "idempotency_key": "k1"}, nulls[1], {**nulls[2], "expected_seq": 3}]
    async with engine.connect() as conn:
        status, first = (await conn.execute(call, {"rows": orjson.dumps(nulls).decode()})).one()
        assert status == "ok"
        status, second = (await conn.execute(call, {"rows": orjson.dumps(keyed).decode()})).one()
        assert status == "ok"
        await conn.commit()
    assert first == sorted(first)
    assert second == sorted(second)
    assert first[-1] < second[0]
    log = PostgresEventLog(engine)
    assert [(e.position, e.stream_seq) for e in await log.stream("run:a")] == [
        (first[0], 1),
        (first[2], 2),
        (second[0], 3),
        (second[2], 4),
    ]
    assert [(e.position, e.stream_seq) for e in await log.stream("run:b")] == [
        (first[1], 1),
        (second[1], 2),
    ]


async def test_kept_connection_replaced_after_its_backend_is_terminated(
    engine: AsyncEngine,
) -> None:
    """keep_connection: appends reuse one connection; a terminated one is noticed without a
    round trip before the next append, which runs on a new connection (nothing lost)."""
    log = PostgresEventLog(engine, keep_connection=True)
    try:
        await log.append([new_event("run.created", "r1")])
        await log.append([new_event("run.started", "r1")])
        (kept,) = log._idle
        pid = kept.info.backend_pid
        async with engine.connect() as conn:
            await conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        async with asyncio.timeout(10):  # the backend's FATAL message and EOF reach the socket
            while not kept.closed and not kept.broken:
                await asyncio.sleep(0.01)
                if not looks_usable(kept):
                    break
        await log.append([new_event("run.step", "r1", stepIndex=1)])
        (again,) = log._idle
        assert again is not kept
        assert again.info.backend_pid != pid
        assert [e.stream_seq for e in await log.stream("run:r1")] == [1, 2, 3]
    finally:
        await log.close()
    assert log._idle == []


async def test_kept_connection_refusals_and_concurrency(engine: AsyncEngine) -> None:
    """keep_connection: expected_seq and order-guard refusals as on the pooled path; more
    concurrent appenders than kept connections fall back to the pool; the log keeps at most
    KEPT_CONNECTIONS."""
    log = PostgresEventLog(engine, keep_connection=True)
    try:
        await log.append([new_event("run.created", "r1", expected_seq=0)])
        with pytest.raises(ConcurrencyError):
            await log.append([new_event("run.started", "r1", expected_seq=0)])
        async with engine.connect() as a:
            await a.begin()
            await log.append([new_event("worker.started", "w-old")], conn=a)
            await log.append([new_event("run.started", "r1")])  # newer, on a kept connection
            with pytest.raises(StreamOrderConflict):
                await log.append([new_event("run.step", "r1", stepIndex=1)], conn=a)
            await a.rollback()

        async def writer(n: int) -> None:
            for i in range(10):
                await log.append([new_event("run.step", "r1", description=f"{n}-{i}")])

        await asyncio.gather(*(writer(n) for n in range(4)))
        assert [e.stream_seq for e in await log.stream("run:r1")] == list(range(1, 43))
        assert 1 <= len(log._idle) <= KEPT_CONNECTIONS
    finally:
        await log.close()


async def test_pooled_append_killed_in_flight_drops_its_connection(database_url: str) -> None:
    """The pooled path runs the statement on the driver connection: an append whose backend
    is terminated mid-statement raises psycopg's OperationalError, nothing is written, and
    the broken connection is not handed out again (with no pre-ping and one pooled
    connection, the next append still works)."""
    engine = create_engine(database_url, pool_size=1, max_overflow=0, pool_pre_ping=False)
    plain = database_url.replace("+psycopg", "")
    log = PostgresEventLog(engine)
    try:
        await log.append([new_event("run.created", "r1")])
        async with (
            await psycopg.AsyncConnection.connect(plain) as locker,
            await psycopg.AsyncConnection.connect(plain, autocommit=True) as admin,
        ):
            await locker.execute("LOCK TABLE oa_sync.events IN ACCESS EXCLUSIVE MODE")
            pending = asyncio.ensure_future(log.append([new_event("run.started", "r1")]))
            blocked: list[int] = []

            async def parked() -> bool:
                cursor = await admin.execute(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND query LIKE '%append_events(%' AND pid <> pg_backend_pid()"
                )
                blocked[:] = [row[0] for row in await cursor.fetchall()]
                return bool(blocked)

            await wait_until(parked, within=30, what="the append to wait on the table lock")
            for pid in blocked:
                await admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            await locker.rollback()
            with pytest.raises(psycopg.OperationalError):
                await pending
        await log.append([new_event("run.step", "r1", stepIndex=1)])
        assert [e.stream_seq for e in await log.stream("run:r1")] == [1, 2]
    finally:
        await engine.dispose()
