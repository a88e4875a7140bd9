"""Reprojection: refold documents from the log and repair what differs.

:func:`fold_log` is the reference fold: every event from the start of the log through a fresh
engine, giving the state each document *should* have. :func:`plan_reprojection` compares that
with a read model and lists the documents to rewrite; rewriting only what differs makes
reprojection idempotent (a healthy read model gets no writes and no spurious changes), and
documents (or checkpoints) the log no longer produces are listed for deletion. The caller
applies the plan in one transaction — :func:`apply_plan` does so for the in-memory adapters;
the Postgres adapters apply it under the projector lease.

This module holds no state and does no I/O beyond the ports it is given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from oa_sync_core.checkpoints import Checkpoint, CheckpointStore, DocId
from oa_sync_core.codec import canonical_json, content_hash
from oa_sync_core.engine import Fold, ProjectionEngine
from oa_sync_core.events import EventSource
from oa_sync_core.memory import MemoryCheckpointStore
from oa_sync_core.sinks import DocumentReader, DocumentUpdate, MemorySink, StoredDocument

__all__ = [
    "FoldResult",
    "ReprojectionPlan",
    "apply_plan",
    "fold_log",
    "plan_reprojection",
]

Progress = Callable[[int], None]
"""Called with the number of events folded so far, after each batch."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class FoldResult:
    """The reference state of every document, folded from the whole log.

    Attributes:
        documents: latest update per document.
        checkpoints: the matching checkpoints.
        events: events read from the log.
        last_position: the highest position read.
    """

    documents: dict[DocId, DocumentUpdate]
    checkpoints: dict[DocId, Checkpoint]
    events: int
    last_position: int


async def fold_log(
    source: EventSource,
    engine: ProjectionEngine,
    *,
    doc_key: str | None = None,
    batch_size: int = 20_000,
    progress: Progress | None = None,
) -> FoldResult:
    """Fold the whole log from scratch, in memory.

    Args:
        source: the log.
        engine: the projectors to fold with (see :meth:`ProjectionEngine.select`).
        doc_key: keep only this document.
        batch_size: events per read.
        progress: called after each batch with the events read so far.
    """
    fold = Fold(engine, {})  # one fold: each document is encoded once, after the last batch
    count = 0
    async for events in source.batches(batch_size=batch_size):
        fold.add(events)
        count += len(events)
        if progress is not None:
            progress(count)
    result = fold.result(with_states=False)  # nothing is kept between batches here
    documents: dict[DocId, DocumentUpdate] = {}
    checkpoints: dict[DocId, Checkpoint] = {}
    for update, checkpoint in zip(result.updates, result.checkpoints, strict=True):
        if doc_key is None or update.doc_key == doc_key:
            documents[update.id] = update
            checkpoints[update.id] = checkpoint
    return FoldResult(
        documents=documents,
        checkpoints=checkpoints,
        events=count,
        last_position=result.last_position,
    )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ReprojectionPlan:
    """What a reprojection would write.

    Attributes:
        rewrites: documents (with their checkpoints) that differ from the read model.
        unchanged: documents already equal to the fold.
        events: events folded to make the plan.
        orphans: documents in scope that the read model (or the checkpoint store) holds but
            the log no longer produces (drift's ``orphaned``); applying the plan deletes them
            and their checkpoints.
    """

    rewrites: tuple[tuple[DocumentUpdate, Checkpoint], ...]
    unchanged: int
    events: int
    orphans: tuple[DocId, ...] = ()


def _same(stored: StoredDocument | None, checkpoint: Checkpoint | None, ref: Checkpoint) -> bool:
    # The body is hashed too: a corrupted body under an intact stored hash must be rewritten.
    return (
        stored is not None
        and checkpoint is not None
        and stored.version == ref.version
        and stored.content_hash == ref.content_hash
        and checkpoint == ref
        and content_hash(canonical_json(stored.body)) == ref.content_hash
    )


async def plan_reprojection(
    source: EventSource,
    engine: ProjectionEngine,
    documents: DocumentReader,
    checkpoints: CheckpointStore,
    *,
    projection: str | None = None,
    doc_key: str | None = None,
    progress: Progress | None = None,
) -> ReprojectionPlan:
    """Refold and compare with a read model; nothing is written.

    Args:
        source: the log.
        engine: all projectors (narrowed here by ``projection`` / ``doc_key``).
        documents: the read model.
        checkpoints: its checkpoints.
        projection: only this projection.
        doc_key: only this document.
        progress: called after each batch.

    Raises:
        KeyError: no projector for ``projection`` / ``doc_key``.
    """
    selected = engine.select(projection, doc_key)
    folded = await fold_log(source, selected, doc_key=doc_key, progress=progress)
    ids = list(folded.documents)
    stored = await documents.get_documents(ids)
    held = await checkpoints.get_many(ids)
    rewrites: list[tuple[DocumentUpdate, Checkpoint]] = []
    unchanged = 0
    for doc_id, update in folded.documents.items():
        reference = folded.checkpoints[doc_id]
        if _same(stored.get(doc_id), held.get(doc_id), reference):
            unchanged += 1
        else:
            rewrites.append((update, reference))
    if doc_key is not None:
        (name,) = selected.projectors  # select() kept the document's projection only
        one = [(name, doc_key)]
        scope = set(await documents.get_documents(one)) | set(await checkpoints.get_many(one))
    else:
        scope = set()
        for name in selected.projectors:
            scope |= {d.id for d in await documents.all_documents(name)}
            scope |= {c.id for c in await checkpoints.all(name)}
    orphans = tuple(sorted(scope - set(folded.documents)))
    return ReprojectionPlan(
        rewrites=tuple(rewrites), unchanged=unchanged, events=folded.events, orphans=orphans
    )


async def apply_plan(
    plan: ReprojectionPlan, sink: MemorySink, checkpoints: MemoryCheckpointStore
) -> None:
    """Apply a plan to the in-memory adapters, overwriting whatever they hold."""
    for doc_id in plan.orphans:
        sink.documents.pop(doc_id, None)
        checkpoints.checkpoints.pop(doc_id, None)
    for update, _ in plan.rewrites:
        sink.documents.pop(update.id, None)
        await sink.publish([update])
    await checkpoints.put_many(checkpoint for _, checkpoint in plan.rewrites)
