"""Drift detection reports exactly the documents that differ from a fold of the log, and how."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st
from oa_sync_core.drift import DriftDetector, DriftKind, DriftReport
from oa_sync_core.engine import ProjectionEngine
from oa_sync_core.events import NewEvent
from oa_sync_core.projectors import RUN_SUMMARY, CodexWorkerSummaryProjector
from oa_sync_core.sinks import StoredDocument
from oa_sync_core.testing import event_sequences, new_event

from tests.core.test_replay import LIFECYCLE, R1, R2, W1, ReadModel, RunSummaryV2, read_model
from tests.profiles import examples

PROPERTY = settings(max_examples=examples(30), deadline=None)
"""Fewer examples than hypothesis's default: each one builds a log and a read model."""


async def check(model: ReadModel, projection: str | None = None) -> DriftReport:
    return await DriftDetector(model.engine).check(
        model.log, model.sink, model.checkpoints, projection=projection
    )


def kinds(report: DriftReport) -> list[tuple[DriftKind, tuple[str, str]]]:
    return [(i.kind, (i.projection, i.doc_key)) for i in report.items]


async def test_healthy_read_model_has_no_drift() -> None:
    """A read model fed by the engine equals the fold: no items, every document checked."""
    model = await read_model(LIFECYCLE)
    progress: list[int] = []
    report = await DriftDetector(model.engine).check(
        model.log, model.sink, model.checkpoints, progress=progress.append
    )
    assert report.ok
    assert (report.documents_checked, report.events_folded) == (3, 7)
    assert progress == [7]
    assert report.to_json() == {"ok": True, "documentsChecked": 3, "eventsFolded": 7, "items": []}


async def test_missing_document() -> None:
    """A document the log produces but the read model lacks is missing."""
    model = await read_model(LIFECYCLE)
    del model.sink.documents[R2]
    report = await check(model)
    assert kinds(report) == [(DriftKind.MISSING, R2)]
    (item,) = report.items
    assert (item.actual_version, item.actual_hash, item.expected_version) == (0, "", 2)


async def test_stale_document_behind_the_log() -> None:
    """Events appended but not yet projected make exactly their documents stale."""
    model = await read_model(LIFECYCLE)
    await model.log.append([new_event("run.step", "r1")])
    report = await check(model)
    assert kinds(report) == [(DriftKind.STALE, R1)]
    assert (report.items[0].actual_version, report.items[0].expected_version) == (3, 4)
    await model.project()
    assert (await check(model)).ok


async def test_stale_checkpoint_behind_the_document() -> None:
    """A document whose checkpoint is missing or behind is stale too."""
    model = await read_model(LIFECYCLE)
    del model.checkpoints.checkpoints[W1]
    behind = dataclasses.replace(model.checkpoints.checkpoints[R1], version=1)
    await model.checkpoints.put_many([behind])
    assert kinds(await check(model)) == [(DriftKind.STALE, W1), (DriftKind.STALE, R1)]


async def test_stale_after_a_projector_version_bump() -> None:
    """Documents written by another projector version are stale for the new one."""
    model = await read_model(LIFECYCLE)
    model.engine = ProjectionEngine([RunSummaryV2(), CodexWorkerSummaryProjector()])
    report = await check(model)
    assert kinds(report) == [(DriftKind.STALE, R1), (DriftKind.STALE, R2)]
    assert "projector version 1" in report.items[0].detail


async def test_corrupted_body_under_an_intact_hash() -> None:
    """A body edited behind the projector's back no longer matches its stored hash."""
    model = await read_model(LIFECYCLE)
    body = dict(model.sink.documents[R1].body, status="COMPLETED")
    model.corrupt(R1, body=body)
    report = await check(model)
    assert kinds(report) == [(DriftKind.HASH_MISMATCH, R1)]
    assert report.items[0].detail == "body does not match its stored hash"


async def test_corrupted_stored_hash() -> None:
    """A stored hash that does not match the body is a hash mismatch."""
    model = await read_model(LIFECYCLE)
    model.corrupt(W1, content_hash="0" * 64)
    report = await check(model)
    assert kinds(report) == [(DriftKind.HASH_MISMATCH, W1)]
    assert report.items[0].actual_hash == "0" * 64


async def test_consistent_but_wrong_content() -> None:
    """Body and hash agree with each other but not with the fold: content differs."""
    model = await read_model(LIFECYCLE)
    other = model.sink.documents[R1]
    model.sink.documents[R2] = dataclasses.replace(
        other, doc_key=R2[1], version=model.sink.documents[R2].version
    )
    report = await check(model)
    assert kinds(report) == [(DriftKind.HASH_MISMATCH, R2)]
    assert report.items[0].detail == "content differs from the fold"


async def test_checkpoint_that_differs_from_the_fold() -> None:
    """A right document under a wrong checkpoint (hash or position) is reported."""
    model = await read_model(LIFECYCLE)
    wrong = dataclasses.replace(model.checkpoints.checkpoints[R1], last_position=2)
    await model.checkpoints.put_many([wrong])
    report = await check(model)
    assert kinds(report) == [(DriftKind.HASH_MISMATCH, R1)]
    assert report.items[0].detail == "checkpoint differs from the fold"


async def test_orphaned_document() -> None:
    """A stored document the log does not produce is orphaned."""
    model = await read_model(LIFECYCLE)
    ghost = StoredDocument(
        projection=RUN_SUMMARY,
        doc_key=f"{RUN_SUMMARY}:ghost",
        version=1,
        content_hash="x",
        body={"runId": "ghost"},
    )
    model.sink.documents[ghost.id] = ghost
    report = await check(model)
    assert kinds(report) == [(DriftKind.ORPHANED, ghost.id)]
    assert report.to_json()["items"] == [
        {
            "kind": "orphaned",
            "projection": RUN_SUMMARY,
            "docKey": ghost.doc_key,
            "expectedVersion": 0,
            "expectedHash": "",
            "actualVersion": 1,
            "actualHash": "x",
            "detail": "the log produces no such document",
        }
    ]
    assert report.documents_checked == 4


async def test_orphaned_checkpoint() -> None:
    """A checkpoint with no document, of a key the log does not produce, is orphaned too."""
    model = await read_model(LIFECYCLE)
    stray = dataclasses.replace(model.checkpoints.checkpoints[R1], doc_key=f"{RUN_SUMMARY}:gone")
    await model.checkpoints.put_many([stray])
    report = await check(model)
    assert kinds(report) == [(DriftKind.ORPHANED, stray.id)]
    assert report.items[0].detail == "a checkpoint of a document the log does not produce"


async def test_check_one_projection() -> None:
    """Limiting the check to one projection ignores drift elsewhere."""
    model = await read_model(LIFECYCLE)
    del model.sink.documents[W1]
    assert (await check(model, RUN_SUMMARY)).ok
    assert kinds(await check(model)) == [(DriftKind.MISSING, W1)]


@PROPERTY
@given(
    event_sequences(min_size=1, max_size=20),
    st.integers(0, 1000),
    st.sampled_from(["body", "hash", "delete"]),
)
async def test_drift_names_exactly_the_corrupted_document(
    events: list[NewEvent], pick: int, how: str
) -> None:
    """Corrupting any one stored document yields exactly one item, naming that document."""
    model = await read_model(events)
    if not model.sink.documents:
        return
    doc_id = sorted(model.sink.documents)[pick % len(model.sink.documents)]
    if how == "body":
        model.corrupt(doc_id, body={"tampered": True})
        expected = DriftKind.HASH_MISMATCH
    elif how == "hash":
        model.corrupt(doc_id, content_hash="f" * 64)
        expected = DriftKind.HASH_MISMATCH
    else:
        del model.sink.documents[doc_id]
        expected = DriftKind.MISSING
    assert kinds(await check(model)) == [(expected, doc_id)]
