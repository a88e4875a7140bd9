"""Drift detection: prove a read model still equals a fold of the log.

:class:`DriftDetector` refolds documents from the log (:func:`oa_sync_core.replay.fold_log`)
and compares each with the read model and its checkpoint. Drift is a value, not an exception:
the :class:`DriftReport` lists every document that is

* ``missing`` — the log folds into it but the read model has no such document;
* ``stale`` — the read model (or its checkpoint) is behind the log, or was written by another
  projector version;
* ``hash_mismatch`` — same version, different content, or a body that does not match its own
  stored hash (a corrupted row);
* ``orphaned`` — the read model holds a document (or a checkpoint) the log does not produce.
"""

from __future__ import annotations

import dataclasses
import enum
import functools

from oa_sync_core.checkpoints import CheckpointStore
from oa_sync_core.codec import canonical_json, content_hash
from oa_sync_core.engine import ProjectionEngine
from oa_sync_core.events import EventSource
from oa_sync_core.replay import Progress, fold_log
from oa_sync_core.sinks import DocumentReader

__all__ = ["DriftDetector", "DriftItem", "DriftKind", "DriftReport"]


class DriftKind(enum.StrEnum):
    """How a document differs from the fold of the log."""

    MISSING = "missing"
    STALE = "stale"
    HASH_MISMATCH = "hash_mismatch"
    ORPHANED = "orphaned"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DriftItem:
    """One drifted document.

    Attributes:
        kind: how it drifted.
        projection: its projection.
        doc_key: its key.
        expected_version, expected_hash: what the log folds to (0 / "" if orphaned).
        actual_version, actual_hash: what the read model holds (0 / "" if missing).
        detail: a sentence for humans.
    """

    kind: DriftKind
    projection: str
    doc_key: str
    expected_version: int
    expected_hash: str
    actual_version: int
    actual_hash: str
    detail: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DriftReport:
    """The outcome of a drift check.

    Attributes:
        items: drifted documents, ordered by (projection, doc_key).
        documents_checked: documents compared.
        events_folded: events read from the log.
    """

    items: tuple[DriftItem, ...]
    documents_checked: int
    events_folded: int

    @property
    def ok(self) -> bool:
        """No drift found."""
        return not self.items

    def to_json(self) -> dict[str, object]:
        """A JSON-ready summary (for ``oa-sync drift --json``)."""
        return {
            "ok": self.ok,
            "documentsChecked": self.documents_checked,
            "eventsFolded": self.events_folded,
            "items": [
                {
                    "kind": i.kind.value,
                    "projection": i.projection,
                    "docKey": i.doc_key,
                    "expectedVersion": i.expected_version,
                    "expectedHash": i.expected_hash,
                    "actualVersion": i.actual_version,
                    "actualHash": i.actual_hash,
                    "detail": i.detail,
                }
                for i in self.items
            ],
        }


class DriftDetector:
    """Compares a read model with a fresh fold of the log.

    Args:
        engine: all projectors.
    """

    def __init__(self, engine: ProjectionEngine) -> None:
        self.engine = engine

    async def check(
        self,
        source: EventSource,
        documents: DocumentReader,
        checkpoints: CheckpointStore,
        *,
        projection: str | None = None,
        progress: Progress | None = None,
    ) -> DriftReport:
        """Refold and compare.

        Args:
            source: the log.
            documents: the read model.
            checkpoints: its checkpoints.
            projection: only this projection.
            progress: called after each batch of the refold.

        Raises:
            KeyError: no projector named ``projection``.
        """
        engine = self.engine.select(projection)
        folded = await fold_log(source, engine, progress=progress)
        held = {c.id: c for name in engine.projectors for c in await checkpoints.all(name)}
        stored = {
            d.id: d for name in engine.projectors for d in await documents.all_documents(name)
        }
        items: list[DriftItem] = []
        everything = set(folded.documents) | set(stored) | set(held)
        for doc_id in sorted(everything):
            projection_name, key = doc_id
            ref = folded.checkpoints.get(doc_id)
            doc = stored.get(doc_id)

            item = functools.partial(
                DriftItem,
                projection=projection_name,
                doc_key=key,
                expected_version=ref.version if ref else 0,
                expected_hash=ref.content_hash if ref else "",
                actual_version=doc.version if doc else 0,
                actual_hash=doc.content_hash if doc else "",
            )

            if ref is None:
                detail = "the log produces no such document"
                if doc is None:
                    detail = "a checkpoint of a document the log does not produce"
                items.append(item(kind=DriftKind.ORPHANED, detail=detail))
                continue
            if doc is None:
                items.append(
                    item(kind=DriftKind.MISSING, detail="the read model has no such document")
                )
                continue
            checkpoint = held.get(doc_id)
            body_hash = content_hash(canonical_json(doc.body))
            if doc.version < ref.version or checkpoint is None or checkpoint.version < ref.version:
                items.append(
                    item(kind=DriftKind.STALE, detail=f"version {doc.version} < {ref.version}")
                )
            elif checkpoint.projector_version != ref.projector_version:
                items.append(
                    item(
                        kind=DriftKind.STALE,
                        detail=f"written by projector version {checkpoint.projector_version}",
                    )
                )
            elif body_hash != doc.content_hash:
                items.append(
                    item(kind=DriftKind.HASH_MISMATCH, detail="body does not match its stored hash")
                )
            elif doc.content_hash != ref.content_hash or doc.version != ref.version:
                items.append(
                    item(kind=DriftKind.HASH_MISMATCH, detail="content differs from the fold")
                )
            elif (
                checkpoint.content_hash != ref.content_hash
                or checkpoint.version != ref.version
                or checkpoint.last_position != ref.last_position
            ):
                items.append(
                    item(kind=DriftKind.HASH_MISMATCH, detail="checkpoint differs from the fold")
                )
        return DriftReport(
            items=tuple(items),
            documents_checked=len(everything),
            events_folded=folded.events,
        )
