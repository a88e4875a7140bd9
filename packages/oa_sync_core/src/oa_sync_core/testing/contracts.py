"""Contract test suites for the ports: ``EventLog``, ``CheckpointStore``, ``Sink``.

Written the way pyeventsourcing ships ``eventsourcing/tests/persistence.py``: one abstract
class per port, whose ``test_*`` methods state what every adapter must do. An embedder
subclasses one, names the subclass ``Test…`` and implements the factory; Khala runs the same
suites against its in-memory and Postgres adapters (``tests/core/test_memory_ports.py``,
``tests/server/test_postgres_ports.py``)::

    from oa_sync_core.testing import EventLogContract


    class TestMyEventLog(EventLogContract):
        async def make_event_log(self, *, max_events):
            return MyEventLog(self.database, max_events=max_events)

Why no pytest here: the core installs without pytest, and ``oa_sync_core.testing`` must stay
importable there. The suites use plain ``assert`` and ``async def`` methods, so any runner that
awaits coroutine tests runs them (pytest with pytest-asyncio in ``auto`` mode, or anyio's
plugin); per-test resources come from the subclass (a pytest fixture on it that stores an engine
on ``self`` works, see Khala's own Postgres subclasses). The base classes are not named
``Test…`` so a runner never collects them on their own.

What this is not: a test of one adapter's extras (Postgres' caller transactions, gap-safe reads
under concurrency); those stay in the adapter's own tests.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Any, Protocol, TypeVar

from oa_sync_core.checkpoints import Checkpoint, CheckpointStore
from oa_sync_core.codec import JsonObject, canonical_json, content_hash
from oa_sync_core.errors import AppendLimitError, ConcurrencyError, EventValidationError
from oa_sync_core.events import MAX_APPEND_EVENTS, Event, EventLog, NewEvent, validate_new_event
from oa_sync_core.sinks import DocumentReader, DocumentUpdate, Sink

__all__ = ["CheckpointStoreContract", "EventLogContract", "ReadableSink", "SinkContract"]


def _event(ident: str, kind: str = "run.created", **extra: object) -> NewEvent:
    payload: JsonObject = {"runId": ident}
    return validate_new_event(
        NewEvent(stream_id=f"run:{ident}", type=kind, payload=payload, **extra)  # type: ignore[arg-type]
    )


_E = TypeVar("_E", bound=BaseException)


async def _raises(expected: type[_E], call: Awaitable[Any]) -> _E:
    """The ``expected`` exception ``call`` raised (no pytest: see the module docstring)."""
    try:
        await call
    except expected as exc:
        return exc
    raise AssertionError(f"{expected.__name__} was not raised")


async def _all(log: EventLog, batch_size: int = 2) -> list[Event]:
    return [event async for batch in log.batches(batch_size=batch_size) for event in batch]


class EventLogContract:
    """What every :class:`~oa_sync_core.events.EventLog` adapter does."""

    async def make_event_log(self, *, max_events: int = MAX_APPEND_EVENTS) -> EventLog:
        """A new, empty log of the adapter under test (override)."""
        raise NotImplementedError

    async def settle(self, log: EventLog) -> None:
        """Wait until committed appends are readable (override when reads lag commits)."""

    async def test_append_gives_increasing_positions_and_gap_free_stream_seqs(self) -> None:
        """A batch gets increasing positions and per-stream sequence numbers 1, 2, ..."""
        log = await self.make_event_log()
        positions = await log.append(
            [_event("a"), _event("b"), _event("a", "run.started"), _event("a", "run.completed")]
        )
        assert positions == sorted(positions)
        assert len(set(positions)) == 4
        stream = await log.stream("run:a")
        assert [(e.stream_seq, e.type) for e in stream] == [
            (1, "run.created"),
            (2, "run.started"),
            (3, "run.completed"),
        ]
        assert [e.position for e in stream] == [positions[0], positions[2], positions[3]]
        assert await log.append([]) == []

    async def test_idempotency_key_replays_the_original_position(self) -> None:
        """A key seen before, or repeated inside a batch, answers the original position and
        writes nothing."""
        log = await self.make_event_log()
        [first] = await log.append([_event("a", idempotency_key="k1")])
        again = await log.append(
            [
                _event("a", idempotency_key="k1"),
                _event("b", idempotency_key="k2"),
                _event("b", "run.started", idempotency_key="k2"),
            ]
        )
        assert again[0] == first
        assert again[1] == again[2] != first
        assert len(await log.stream("run:a")) == 1
        assert len(await log.stream("run:b")) == 1

    async def test_expected_seq_checks_the_stream_and_a_mismatch_writes_nothing(self) -> None:
        """``expected_seq`` counts earlier events of the batch; a mismatch refuses the whole
        batch."""
        log = await self.make_event_log()
        await log.append([_event("a", expected_seq=0), _event("a", "run.started", expected_seq=1)])
        exc = await _raises(
            ConcurrencyError,
            log.append([_event("b"), _event("a", "run.completed", expected_seq=1)]),
        )
        assert (exc.stream_id, exc.expected_seq, exc.actual_seq) == ("run:a", 1, 2)
        assert await log.stream("run:b") == []
        assert len(await log.stream("run:a")) == 2

    async def test_an_invalid_event_writes_nothing(self) -> None:
        """A batch with one invalid event is refused whole, naming the event's index."""
        log = await self.make_event_log()
        bad = NewEvent(stream_id="run:b", type="run.created", payload={"runId": "other"})
        exc = await _raises(EventValidationError, log.append([_event("a"), bad]))
        assert exc.index == 1
        assert await log.stream("run:a") == []

    async def test_a_batch_over_the_limit_is_refused_naming_it(self) -> None:
        """More events than ``max_events`` raise :class:`AppendLimitError` and write nothing."""
        log = await self.make_event_log(max_events=2)
        exc = await _raises(AppendLimitError, log.append([_event("a"), _event("b"), _event("c")]))
        assert (exc.limit, exc.count) == (2, 3)
        assert "at most 2 events" in str(exc)
        assert await log.append([_event("a"), _event("b")]) != []
        assert await log.stream("run:c") == []

    async def test_batches_yield_every_event_in_log_order(self) -> None:
        """``batches`` pages through every recorded event once, positions increasing per
        stream, with payloads as validated."""
        log = await self.make_event_log()
        await log.append([_event("a"), _event("b")])
        await log.append([_event("a", "run.started"), _event("c")])
        await self.settle(log)
        found = await _all(log)
        assert sorted((e.stream_id, e.stream_seq) for e in found) == [
            ("run:a", 1),
            ("run:a", 2),
            ("run:b", 1),
            ("run:c", 1),
        ]
        for stream in ("run:a", "run:b", "run:c"):
            seqs = [e.stream_seq for e in found if e.stream_id == stream]
            assert seqs == sorted(seqs)
        assert found[0].payload == {"runId": found[0].stream_id.partition(":")[2]}
        assert all(e.recorded_at.tzinfo is not None for e in found)


def _checkpoint(doc_key: str, position: int, projection: str = "p1") -> Checkpoint:
    return Checkpoint(
        projection=projection,
        doc_key=doc_key,
        last_position=position,
        projector_version=1,
        content_hash=f"{position:064x}",
        version=position,
    )


class CheckpointStoreContract:
    """What every :class:`~oa_sync_core.checkpoints.CheckpointStore` adapter does."""

    async def make_checkpoint_store(self) -> CheckpointStore:
        """A new, empty store of the adapter under test (override)."""
        raise NotImplementedError

    async def test_put_then_get_round_trips_and_leaves_absent_ids_out(self) -> None:
        """Stored checkpoints come back equal; ids never stored are absent."""
        store = await self.make_checkpoint_store()
        one, two = _checkpoint("p1:a", 3), _checkpoint("p1:b", 5)
        await store.put_many([one, two])
        found = await store.get_many([one.id, two.id, ("p1", "p1:zz")])
        assert dict(found) == {one.id: one, two.id: two}
        assert await store.get_many([]) == {}

    async def test_put_replaces_the_same_document_and_the_last_of_a_call_wins(self) -> None:
        """A second checkpoint of a document replaces the first, also within one call."""
        store = await self.make_checkpoint_store()
        await store.put_many([_checkpoint("p1:a", 3)])
        await store.put_many([_checkpoint("p1:a", 4), _checkpoint("p1:a", 7)])
        assert (await store.get_many([("p1", "p1:a")]))["p1", "p1:a"].last_position == 7

    async def test_all_lists_by_doc_key_and_filters_by_projection(self) -> None:
        """``all`` is ordered by doc_key and can be limited to one projection."""
        store = await self.make_checkpoint_store()
        await store.put_many(
            [_checkpoint("p1:b", 1), _checkpoint("p2:a", 2, "p2"), _checkpoint("p1:a", 3)]
        )
        assert [c.doc_key for c in await store.all()] == ["p1:a", "p1:b", "p2:a"]
        assert [c.doc_key for c in await store.all("p1")] == ["p1:a", "p1:b"]
        assert await store.all("p3") == []


class ReadableSink(Sink, DocumentReader, Protocol):
    """A sink that also reads its documents back (the shape :class:`SinkContract` checks)."""


def _update(doc_key: str, version: int, projection: str = "p1") -> DocumentUpdate:
    body: JsonObject = {"key": doc_key, "version": str(version)}
    canonical = canonical_json(body)
    return DocumentUpdate(
        projection=projection,
        doc_key=doc_key,
        version=version,
        body=body,
        canonical=canonical,
        content_hash=content_hash(canonical),
        last_position=version,
    )


class SinkContract:
    """What every readable :class:`~oa_sync_core.sinks.Sink` adapter does."""

    async def make_sink(self) -> ReadableSink:
        """A new, empty sink of the adapter under test (override)."""
        raise NotImplementedError

    async def _versions(self, sink: ReadableSink, keys: Sequence[str]) -> dict[str, int]:
        found = await sink.get_documents(("p1", k) for k in keys)
        return {doc_id[1]: doc.version for doc_id, doc in found.items()}

    async def test_published_documents_read_back_equal(self) -> None:
        """A published update reads back with its version, hash and body."""
        sink = await self.make_sink()
        update = _update("p1:a", 1)
        await sink.publish([update, _update("p1:b", 2)])
        [held] = (await sink.get_documents([update.id])).values()
        assert (held.version, held.content_hash, held.body) == (
            1,
            update.content_hash,
            update.body,
        )
        assert await self._versions(sink, ["p1:a", "p1:b", "p1:c"]) == {"p1:a": 1, "p1:b": 2}
        await sink.publish([])

    async def test_an_update_not_newer_than_the_stored_one_is_ignored(self) -> None:
        """Publishing an older or equal version changes nothing; a newer one replaces it."""
        sink = await self.make_sink()
        await sink.publish([_update("p1:a", 3)])
        await sink.publish([_update("p1:a", 2), _update("p1:a", 3)])
        assert await self._versions(sink, ["p1:a"]) == {"p1:a": 3}
        await sink.publish([_update("p1:a", 4), _update("p1:a", 5)])
        assert await self._versions(sink, ["p1:a"]) == {"p1:a": 5}

    async def test_all_documents_by_doc_key_and_projection(self) -> None:
        """``all_documents`` is ordered by doc_key and can be limited to one projection."""
        sink = await self.make_sink()
        await sink.publish([_update("p1:b", 1), _update("p2:a", 1, "p2"), _update("p1:a", 1)])
        assert [d.doc_key for d in await sink.all_documents()] == ["p1:a", "p1:b", "p2:a"]
        assert [d.doc_key for d in await sink.all_documents("p1")] == ["p1:a", "p1:b"]
