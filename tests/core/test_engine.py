"""The sans-IO projection engine: idempotent, split-invariant, and rebuilding on a version bump."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from oa_sync_core.checkpoints import Checkpoint, DocId
from oa_sync_core.codec import JsonObject
from oa_sync_core.engine import DocumentState, ProjectionEngine
from oa_sync_core.errors import ProjectionError
from oa_sync_core.events import Event, NewEvent
from oa_sync_core.projectors import (
    DEFAULT_PROJECTORS,
    RUN_SUMMARY,
    WORKER_SUMMARY,
    CodexWorkerSummaryProjector,
    RunSummaryProjector,
)
from oa_sync_core.sinks import DocumentUpdate, StoredDocument
from oa_sync_core.testing import (
    event_sequences,
    fold_events,
    new_event,
    record_events,
)

from tests.profiles import examples

PROPERTY = settings(max_examples=examples(50), deadline=None)
"""Fewer examples than hypothesis's default: generating valid event sequences is the cost."""

RUN = (RUN_SUMMARY, f"{RUN_SUMMARY}:r1")


class RunSummaryV2(RunSummaryProjector):
    """The run projector with its version bumped (same fold)."""

    version = 2


class MutatingProjector(RunSummaryProjector):
    """Breaks the contract: returns the document it was given."""

    def apply(self, doc: JsonObject, event: Event) -> JsonObject:
        return doc


class StrayKeyProjector(RunSummaryProjector):
    """Breaks the contract: routes to a key outside its projection."""

    def doc_key(self, event: Event) -> str | None:
        key = super().doc_key(event)
        return None if key is None else key.replace(RUN_SUMMARY, RUN_SUMMARY + "_other", 1)


def _engine() -> ProjectionEngine:
    return ProjectionEngine(DEFAULT_PROJECTORS)


def _states(updates: dict[DocId, DocumentUpdate], engine: ProjectionEngine) -> dict[DocId, Any]:
    """Document states as a store would hold them after writing ``updates``."""
    states: dict[DocId, DocumentState] = {}
    for doc_id, update in updates.items():
        checkpoint = Checkpoint(
            projection=update.projection,
            doc_key=update.doc_key,
            last_position=update.last_position,
            projector_version=engine.projectors[update.projection].version,
            content_hash=update.content_hash,
            version=update.version,
        )
        states[doc_id] = DocumentState(
            checkpoint=checkpoint, body=update.body, version=update.version
        )
    return states


def _splits(events: list[Event], cuts: list[int]) -> list[list[Event]]:
    points = sorted({c % (len(events) + 1) for c in cuts})
    bounds = [0, *points, len(events)]
    return [events[a:b] for a, b in itertools.pairwise(bounds)]


@PROPERTY
@given(event_sequences())
def test_applying_a_batch_twice_changes_nothing(events: list[NewEvent]) -> None:
    """A batch already covered by the checkpoints is skipped entirely: no updates at all."""
    engine = _engine()
    recorded = record_events(events)
    states: dict[DocId, DocumentState] = {}
    once = fold_events(recorded, engine, states=states)
    again = engine.apply(recorded, states)
    assert again.updates == ()
    assert again.checkpoints == ()
    assert again.applied == 0
    assert again.skipped == sum(len(engine.route([e])) for e in recorded)
    assert fold_events(recorded, engine, states=states) == {}
    assert {k: s.body for k, s in states.items()} == {k: u.body for k, u in once.items()}


@PROPERTY
@given(event_sequences(), st.lists(st.integers(0, 1000), max_size=4))
def test_result_states_are_what_a_store_holds_after_the_write(
    events: list[NewEvent], cuts: list[int]
) -> None:
    """``ProjectionResult.states`` (what the worker keeps between batches) equals the states a
    store gives back after writing the result, batch after batch."""
    engine = _engine()
    held: dict[DocId, DocumentState] = {}
    for batch in _splits(record_events(events), cuts):
        result = engine.apply(batch, held)
        written = _states({u.id: u for u in result.updates}, engine)
        assert dict(result.states) == written
        held.update(result.states)


@PROPERTY
@given(event_sequences(), st.lists(st.integers(0, 1000), max_size=6))
def test_any_split_into_batches_equals_one_pass(events: list[NewEvent], cuts: list[int]) -> None:
    """Folding batch by batch, split anywhere, gives the same documents as one batch."""
    recorded = record_events(events)
    one_pass = fold_events(recorded)
    batched = fold_events(_splits(recorded, cuts))
    assert batched == one_pass


@PROPERTY
@given(event_sequences(), st.lists(st.integers(0, 1000), max_size=4), st.integers(0, 1000))
def test_overlapping_replays_are_harmless(
    events: list[NewEvent], cuts: list[int], back: int
) -> None:
    """Re-delivering any suffix of what was already folded, then the rest, changes nothing."""
    recorded = record_events(events)
    engine = _engine()
    states: dict[DocId, DocumentState] = {}
    latest: dict[DocId, DocumentUpdate] = {}
    done = 0
    for batch in _splits(recorded, cuts):
        start = max(done - back % (done + 1), 0)
        latest |= fold_events([recorded[start:done], batch], engine, states=states)
        done += len(batch)
    assert latest == fold_events(recorded)


@PROPERTY
@given(event_sequences(), st.randoms(use_true_random=False))
def test_stream_interleaving_does_not_matter(events: list[NewEvent], rnd: Any) -> None:
    """Any log order keeping each stream's order (as Postgres commit order does) gives the same."""
    recorded = record_events(events)
    by_stream: dict[str, list[Event]] = {}
    for event in recorded:
        by_stream.setdefault(event.stream_id, []).append(event)
    queues = list(by_stream.values())
    shuffled: list[Event] = []
    while queues:
        queue = rnd.choice(queues)
        shuffled.append(queue.pop(0))
        queues = [q for q in queues if q]
    assert fold_events(shuffled) == fold_events(recorded)


def test_projector_version_bump_rebuilds() -> None:
    """Checkpoints of another version are void: the engine refolds from initial."""
    recorded = record_events(
        [
            new_event("run.created", "r1"),
            new_event("run.step", "r1"),
            new_event("run.started", "r2"),
        ]
    )
    old = _engine()
    states: dict[DocId, DocumentState] = {}
    fold_events(recorded, old, states=states)
    bumped = ProjectionEngine([RunSummaryV2(), CodexWorkerSummaryProjector()])
    assert old.stale_projections(s.checkpoint for s in states.values() if s.checkpoint) == set()
    assert bumped.stale_projections(s.checkpoint for s in states.values() if s.checkpoint) == {
        RUN_SUMMARY
    }
    result = bumped.apply(recorded, states)
    assert result.skipped == 0
    assert result.applied == 3
    rebuilt = {u.id: u for u in result.updates}
    fresh = fold_events(recorded, bumped)
    assert rebuilt == fresh
    assert rebuilt[RUN].version == 2  # not 4: the old fold is discarded, not continued
    assert {c.projector_version for c in result.checkpoints} == {2}
    # Once rebuilt, the same log is covered again.
    fold_events(recorded, bumped, states=states)
    assert bumped.apply(recorded, states).updates == ()


def test_a_checkpoint_without_a_body_refolds() -> None:
    """A checkpoint whose document body is missing restarts the document from initial."""
    recorded = record_events([new_event("run.created", "r1"), new_event("run.started", "r1")])
    states: dict[DocId, DocumentState] = {}
    fold_events(recorded, states=states)
    checkpoint = states[RUN].checkpoint
    result = _engine().apply(recorded, {RUN: DocumentState(checkpoint=checkpoint)})
    assert [u.version for u in result.updates] == [2]
    assert DocumentState.of(checkpoint, None) == DocumentState(checkpoint=checkpoint)
    stored = StoredDocument(
        projection=RUN_SUMMARY, doc_key=RUN[1], version=2, content_hash="h", body={"runId": "r1"}
    )
    assert DocumentState.of(checkpoint, stored).body == {"runId": "r1"}


@dataclasses.dataclass(frozen=True)
class Step:
    """One row of the engine's (state, input) -> effects table."""

    name: str
    covered: int  # the document's checkpoint position before the batch (0: none)
    batch: tuple[int, ...]  # positions of run:r1 events in the batch
    applied: int
    skipped: int
    version: int | None  # the update's version, None when no update is expected


TABLE = [
    Step("fresh document", 0, (1, 2, 3), 3, 0, 3),
    Step("batch already covered", 3, (1, 2, 3), 0, 3, None),
    Step("partly covered", 2, (1, 2, 3), 1, 2, 3),
    Step("empty batch", 2, (), 0, 0, None),
]


@pytest.mark.parametrize("step", TABLE, ids=[s.name for s in TABLE])
def test_engine_transition_table(step: Step) -> None:
    """Given a checkpoint and a batch, the engine applies and skips exactly the expected events."""
    log = record_events(
        [
            new_event("run.created", "r1"),
            new_event("run.started", "r1"),
            new_event("run.step", "r1"),
        ]
    )
    states: dict[DocId, DocumentState] = {}
    if step.covered:
        fold_events(log[: step.covered], states=states)
    batch = [log[p - 1] for p in step.batch]
    result = _engine().apply(batch, states)
    assert (result.applied, result.skipped, result.ignored) == (step.applied, step.skipped, 0)
    assert result.last_position == max(step.batch, default=0)
    if step.version is None:
        assert result.updates == ()
    else:
        (update,) = result.updates
        (checkpoint,) = result.checkpoints
        assert update.version == checkpoint.version == step.version
        assert update.last_position == checkpoint.last_position == max(step.batch)
        assert update.content_hash == checkpoint.content_hash
        assert update.body == fold_events(log)[RUN].body


def test_result_counts_and_update_order() -> None:
    """Ignored events are counted; updates come in order of each document's last event."""
    recorded = record_events(
        [
            new_event("run.created", "r1"),
            new_event("worker.started", "w1"),
            NewEvent(stream_id="audit:x", type="audit.note", payload={}),
            new_event("run.started", "r1"),
        ]
    )
    result = _engine().apply(recorded, {})
    assert (result.applied, result.skipped, result.ignored, result.last_position) == (3, 0, 1, 4)
    assert [u.doc_key for u in result.updates] == [
        f"{WORKER_SUMMARY}:w1",
        f"{RUN_SUMMARY}:r1",
    ]
    assert _engine().route(recorded) == [RUN, (WORKER_SUMMARY, f"{WORKER_SUMMARY}:w1")]


def test_engine_refuses_projectors_that_break_the_contract() -> None:
    """A projector returning its input is a ProjectionError; duplicate names are refused, and
    so is a key outside the projector's own projection (ValueError, as a Checkpoint would)."""
    engine = ProjectionEngine([MutatingProjector()])
    with pytest.raises(ProjectionError) as info:
        engine.apply(record_events([new_event("run.created", "r1")]), {})
    assert (info.value.projection, info.value.position) == (RUN_SUMMARY, 1)
    with pytest.raises(ValueError, match="two projectors"):
        ProjectionEngine([RunSummaryProjector(), RunSummaryV2()])
    with pytest.raises(ValueError, match="is not a key of"):  # the Checkpoint rule, kept
        ProjectionEngine([StrayKeyProjector()]).apply(
            record_events([new_event("run.created", "r1")]), {}
        )


def test_select_narrows_the_engine() -> None:
    """select() keeps one projection, or the projection of one document."""
    engine = _engine()
    assert engine.select() is engine
    assert list(engine.select(RUN_SUMMARY).projectors) == [RUN_SUMMARY]
    assert list(engine.select(doc_key=f"{WORKER_SUMMARY}:w1").projectors) == [WORKER_SUMMARY]
    with pytest.raises(KeyError):
        engine.select("nope")
    with pytest.raises(KeyError):
        engine.select(RUN_SUMMARY, doc_key=f"{WORKER_SUMMARY}:w1")
    assert "RunSummaryProjector" in repr(engine)
