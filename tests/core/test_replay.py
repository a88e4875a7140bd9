"""Reprojection: rebuild all, one projection or one document — idempotent, equal to a pure fold."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from oa_sync_core.drift import DriftDetector
from oa_sync_core.engine import DocumentState, ProjectionEngine
from oa_sync_core.events import NewEvent
from oa_sync_core.memory import MemoryCheckpointStore, MemoryEventLog
from oa_sync_core.projectors import (
    DEFAULT_PROJECTORS,
    RUN_SUMMARY,
    WORKER_SUMMARY,
    CodexWorkerSummaryProjector,
    RunSummaryProjector,
)
from oa_sync_core.replay import apply_plan, fold_log, plan_reprojection
from oa_sync_core.sinks import MemorySink, StoredDocument
from oa_sync_core.testing import FixedClock, event_sequences, fold_events, new_event

from tests.profiles import examples

PROPERTY = settings(max_examples=examples(30), deadline=None)
"""Fewer examples than hypothesis's default: each one builds a log and a read model."""

R1 = (RUN_SUMMARY, f"{RUN_SUMMARY}:r1")
R2 = (RUN_SUMMARY, f"{RUN_SUMMARY}:r2")
W1 = (WORKER_SUMMARY, f"{WORKER_SUMMARY}:w1")

LIFECYCLE = [
    new_event("run.created", "r1"),
    new_event("worker.started", "w1"),
    new_event("run.started", "r1", workerId="w1"),
    new_event("run.created", "r2"),
    new_event("worker.request_received", "w1", runId="r1"),
    new_event("run.step", "r1", progressPercent=50),
    new_event("run.canceled", "r2", reason="user"),
]


GHOST = StoredDocument(
    projection=RUN_SUMMARY,
    doc_key=f"{RUN_SUMMARY}:ghost",
    version=1,
    content_hash="x",
    body={"runId": "ghost"},
)
"""A document no event produces."""


class RunSummaryV2(RunSummaryProjector):
    """The run projector with its version bumped (same fold)."""

    version = 2


@dataclasses.dataclass
class ReadModel:
    """An in-memory read model fed the way the projector worker feeds Postgres."""

    log: MemoryEventLog
    sink: MemorySink
    checkpoints: MemoryCheckpointStore
    engine: ProjectionEngine

    async def project(self, batch_size: int = 3) -> None:
        """Fold every event of the log into the read model, batch by batch."""
        async for events in self.log.batches(batch_size=batch_size):
            ids = self.engine.route(events)
            held = await self.checkpoints.get_many(ids)
            docs = await self.sink.get_documents(ids)
            states = {i: DocumentState.of(held.get(i), docs.get(i)) for i in ids}
            result = self.engine.apply(events, states)
            await self.sink.publish(result.updates)
            await self.checkpoints.put_many(result.checkpoints)

    def corrupt(self, doc_id: tuple[str, str], **changes: object) -> None:
        """Overwrite a stored document's fields behind the projector's back."""
        self.sink.documents[doc_id] = dataclasses.replace(self.sink.documents[doc_id], **changes)  # type: ignore[arg-type]


async def read_model(events: list[NewEvent], engine: ProjectionEngine | None = None) -> ReadModel:
    """A log holding ``events`` and a read model projected from it."""
    log = MemoryEventLog(clock=FixedClock())
    if events:
        await log.append(events)
    model = ReadModel(
        log, MemorySink(), MemoryCheckpointStore(), engine or ProjectionEngine(DEFAULT_PROJECTORS)
    )
    await model.project()
    return model


async def reproject(
    model: ReadModel, *, projection: str | None = None, doc_key: str | None = None
) -> int:
    """Plan and apply a reprojection; returns how many documents were rewritten."""
    plan = await plan_reprojection(
        model.log,
        model.engine,
        model.sink,
        model.checkpoints,
        projection=projection,
        doc_key=doc_key,
    )
    await apply_plan(plan, model.sink, model.checkpoints)
    return len(plan.rewrites)


def _bodies(model: ReadModel) -> dict[tuple[str, str], object]:
    return {k: (d.version, d.content_hash, d.body) for k, d in model.sink.documents.items()}


async def test_fold_log_equals_the_pure_fold() -> None:
    """fold_log over the memory log gives the reference fold, with progress reported."""
    model = await read_model(LIFECYCLE)
    seen: list[int] = []
    folded = await fold_log(model.log, model.engine, batch_size=2, progress=seen.append)
    assert seen == [2, 4, 6, 7]
    assert (folded.events, folded.last_position) == (7, 7)
    assert folded.documents == fold_events(model.log.events)
    only = await fold_log(model.log, model.engine, doc_key=R2[1])
    assert list(only.documents) == [R2]
    assert only.documents[R2] == folded.documents[R2]


async def test_a_healthy_read_model_needs_no_rewrite() -> None:
    """Planning against a read model fed by the engine finds nothing to rewrite."""
    model = await read_model(LIFECYCLE)
    plan = await plan_reprojection(model.log, model.engine, model.sink, model.checkpoints)
    assert (plan.rewrites, plan.unchanged, plan.events) == ((), 3, 7)


@PROPERTY
@given(event_sequences(max_size=20))
async def test_reprojection_is_idempotent_and_equals_a_pure_fold(events: list[NewEvent]) -> None:
    """After any corruption, reprojecting all gives the pure fold; doing it again writes nothing."""
    model = await read_model(events)
    for doc_id in list(model.sink.documents)[::2]:
        model.corrupt(doc_id, body={"corrupted": True})
    reference = fold_events(model.log.events)
    model.sink.documents.pop(next(iter(reference), ("", "")), None)
    model.sink.documents[GHOST.id] = GHOST
    await reproject(model)
    assert {k: (d.version, d.content_hash, d.body) for k, d in model.sink.documents.items()} == {
        k: (u.version, u.content_hash, u.body) for k, u in reference.items()
    }
    assert await reproject(model) == 0
    report = await DriftDetector(model.engine).check(model.log, model.sink, model.checkpoints)
    assert report.ok, report


async def test_reproject_one_projection_leaves_the_other_alone() -> None:
    """Reprojecting the run summaries repairs them and touches no worker summary."""
    model = await read_model(LIFECYCLE)
    model.corrupt(R1, version=1)
    model.corrupt(W1, body={"workerId": "w1", "status": "FAILED"})
    assert await reproject(model, projection=RUN_SUMMARY) == 1
    report = await DriftDetector(model.engine).check(model.log, model.sink, model.checkpoints)
    assert [(i.projection, i.doc_key) for i in report.items] == [W1]
    assert await reproject(model, projection=RUN_SUMMARY) == 0


async def test_reproject_one_document_rewrites_only_it() -> None:
    """Reprojecting one document repairs it and leaves its drifted neighbours as they are."""
    model = await read_model(LIFECYCLE)
    model.corrupt(R1, body={"runId": "r1"})
    model.corrupt(R2, body={"runId": "r2"})
    before = _bodies(model)
    assert await reproject(model, doc_key=R2[1]) == 1
    after = _bodies(model)
    assert after[R1] == before[R1]
    assert after[W1] == before[W1]
    assert model.sink.documents[R2].body == fold_events(model.log.events)[R2].body
    assert await reproject(model, doc_key=R2[1]) == 0


async def test_reprojection_deletes_orphans_in_scope() -> None:
    """Documents and checkpoints the log does not produce are deleted, within the scope only."""
    model = await read_model(LIFECYCLE)
    model.sink.documents[GHOST.id] = GHOST
    ghost_checkpoint = dataclasses.replace(
        model.checkpoints.checkpoints[R1], doc_key=f"{RUN_SUMMARY}:ghost2"
    )
    await model.checkpoints.put_many([ghost_checkpoint])
    plan = await plan_reprojection(
        model.log, model.engine, model.sink, model.checkpoints, projection=WORKER_SUMMARY
    )
    assert plan.orphans == ()
    plan = await plan_reprojection(
        model.log, model.engine, model.sink, model.checkpoints, doc_key=GHOST.doc_key
    )
    assert (plan.rewrites, plan.orphans) == ((), (GHOST.id,))
    assert await reproject(model) == 0
    assert GHOST.id not in model.sink.documents
    assert ghost_checkpoint.id not in model.checkpoints.checkpoints
    report = await DriftDetector(model.engine).check(model.log, model.sink, model.checkpoints)
    assert report.ok
    plan = await plan_reprojection(model.log, model.engine, model.sink, model.checkpoints)
    assert (plan.rewrites, plan.orphans, plan.unchanged) == ((), (), 3)


async def test_reprojection_repairs_checkpoints_too() -> None:
    """A wrong checkpoint under a correct document is rewritten as well."""
    model = await read_model(LIFECYCLE)
    bad = dataclasses.replace(model.checkpoints.checkpoints[R1], last_position=1)
    await model.checkpoints.put_many([bad])
    assert await reproject(model) == 1
    assert model.checkpoints.checkpoints[R1].last_position == 6


async def test_reprojection_after_a_version_bump_rewrites_that_projection() -> None:
    """A bumped projector makes every one of its documents stale; reprojection rebuilds them."""
    model = await read_model(LIFECYCLE)
    bumped = ProjectionEngine([RunSummaryV2(), CodexWorkerSummaryProjector()])
    assert bumped.stale_projections(model.checkpoints.checkpoints.values()) == {RUN_SUMMARY}
    model.engine = bumped
    assert await reproject(model) == 2
    assert {c.projector_version for c in await model.checkpoints.all(RUN_SUMMARY)} == {2}
    assert bumped.stale_projections(model.checkpoints.checkpoints.values()) == set()
    assert await reproject(model) == 0
    # The rebuilt documents are the fold of the log, not a continuation of the old fold.
    assert model.sink.documents[R1].version == 3


async def test_reprojection_scope_errors() -> None:
    """An unknown projection, or a key of another projection, is a KeyError."""
    model = await read_model(LIFECYCLE)
    with pytest.raises(KeyError):
        await reproject(model, projection="runtime/nope")
    with pytest.raises(KeyError):
        await reproject(model, projection=RUN_SUMMARY, doc_key=W1[1])


def test_the_readme_library_example_runs() -> None:
    """The README's library example folds two events into the documented run summary."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    match = re.search(r"## Use it as a library.*?```python\n(.*?)```", readme, re.DOTALL)
    assert match is not None, "README lost its library example"
    out = subprocess.run(  # noqa: S603 - runs this interpreter on the README's own code
        [sys.executable, "-c", match.group(1)], check=True, capture_output=True, text=True
    ).stdout
    body = ast.literal_eval(out.strip())
    assert body["status"] == "RUNNING"
    assert (body["runId"], body["agentId"], body["progressPercent"]) == ("r1", "a1", 40)
    assert (body["stepCount"], body["lastEventPosition"]) == (1, "2")


class ReadModelMachine(RuleBasedStateMachine):
    """Appends, projections, corruption and repairs in any order keep drift honest.

    Invariants: once everything appended is projected and nothing was corrupted since, drift
    finds nothing; after a full reprojection the read model equals the pure fold, whatever
    happened before.
    """

    def __init__(self) -> None:
        super().__init__()
        self.model = asyncio.run(read_model([]))
        self.dirty = False  # corrupted since the last full reprojection
        self.behind = False  # events appended since the last projection

    @rule(events=event_sequences(max_size=6))
    def append(self, events: list[NewEvent]) -> None:
        if events:
            asyncio.run(self.model.log.append(events))
            self.behind = True

    @rule(batch_size=st.integers(1, 7))
    def project(self, batch_size: int) -> None:
        asyncio.run(self.model.project(batch_size))
        self.behind = False

    @rule(pick=st.integers(0, 100), how=st.sampled_from(["body", "hash", "delete", "ghost"]))
    def corrupt(self, pick: int, how: str) -> None:
        docs = sorted(self.model.sink.documents)
        if how == "ghost":
            self.model.sink.documents[GHOST.id] = GHOST
        elif not docs:
            return
        elif how == "body":
            self.model.corrupt(docs[pick % len(docs)], body={"tampered": pick})
        elif how == "hash":
            self.model.corrupt(docs[pick % len(docs)], content_hash=f"{pick:064x}")
        else:
            del self.model.sink.documents[docs[pick % len(docs)]]
        self.dirty = True

    @rule()
    def reproject_all(self) -> None:
        asyncio.run(reproject(self.model))
        self.dirty = self.behind = False
        reference = fold_events(self.model.log.events)
        assert {k: (d.version, d.body) for k, d in self.model.sink.documents.items()} == {
            k: (u.version, u.body) for k, u in reference.items()
        }

    @invariant()
    def drift_is_honest(self) -> None:
        report = asyncio.run(
            DriftDetector(self.model.engine).check(
                self.model.log, self.model.sink, self.model.checkpoints
            )
        )
        if not self.dirty and not self.behind:
            assert report.ok, report
        if self.dirty or self.behind:
            # Whatever drift says, a reprojection plan repairs exactly what it names.
            plan = asyncio.run(
                plan_reprojection(
                    self.model.log, self.model.engine, self.model.sink, self.model.checkpoints
                )
            )
            named = {(i.projection, i.doc_key) for i in report.items}
            assert {u.id for u, _ in plan.rewrites} | set(plan.orphans) == named


TestReadModelMachine = ReadModelMachine.TestCase
TestReadModelMachine.settings = settings(
    max_examples=examples(25), stateful_step_count=12, deadline=None
)
