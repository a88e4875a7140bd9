"""Sinks: where folded documents are published.

A :class:`DocumentUpdate` is one document's new state after a batch. A :class:`Sink` publishes
a batch of them. The core ships :class:`NoopSink` (discards), :class:`MemorySink` (keeps the
latest of each document, for tests and embedding) and :class:`TeeSink` (a primary and a shadow
lane, recording per-document parity); the server package adds the Postgres read model and the
HTTP sink.

A sink is told each document's ``version``; a sink must ignore an update whose version is not
newer than what it holds, so a replayed batch is harmless.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

from oa_sync_core.checkpoints import DocId
from oa_sync_core.codec import JsonObject

__all__ = [
    "DocumentReader",
    "DocumentUpdate",
    "MemorySink",
    "NoopSink",
    "ParityRecord",
    "Sink",
    "StoredDocument",
    "TeeSink",
]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DocumentUpdate:
    """A document's state after a batch.

    Attributes:
        projection: the projector's name.
        doc_key: the document's key.
        version: events folded into it so far (strictly increasing per document).
        body: canonical proto3 JSON object of the document.
        canonical: ``canonical_json(body)``, computed once and shared by every consumer.
        content_hash: SHA-256 hex of ``canonical``.
        last_position: log position of the last event folded in.
    """

    projection: str
    doc_key: str
    version: int
    body: JsonObject
    canonical: bytes
    content_hash: str
    last_position: int

    @property
    def id(self) -> DocId:
        """(projection, doc_key)."""
        return (self.projection, self.doc_key)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StoredDocument:
    """A document as a read model holds it.

    Attributes:
        projection, doc_key, version, content_hash, body: as in :class:`DocumentUpdate`.
        watermark: the change-log watermark of this version (0 where the store has none).
    """

    projection: str
    doc_key: str
    version: int
    content_hash: str
    body: JsonObject
    watermark: int = 0

    @property
    def id(self) -> DocId:
        """(projection, doc_key)."""
        return (self.projection, self.doc_key)


@runtime_checkable
class Sink(Protocol):
    """Publishes document updates."""

    async def publish(self, updates: Sequence[DocumentUpdate]) -> None:
        """Publish a batch; updates not newer than what the sink holds are ignored."""
        ...


@runtime_checkable
class DocumentReader(Protocol):
    """Reads documents back from a read model (for folding and drift checks)."""

    async def get_documents(self, ids: Iterable[DocId]) -> Mapping[DocId, StoredDocument]:
        """The stored documents among ``ids``; absent ones are left out."""
        ...

    async def all_documents(self, projection: str | None = None) -> list[StoredDocument]:
        """Every stored document, or those of one projection, ordered by doc_key."""
        ...


class NoopSink:
    """Publishes nothing. Counts what it was given, so a test can tell it was called."""

    def __init__(self) -> None:
        self.published = 0

    async def publish(self, updates: Sequence[DocumentUpdate]) -> None:
        self.published += len(updates)


class MemorySink:
    """Keeps the latest version of every document in memory; also a :class:`DocumentReader`."""

    def __init__(self) -> None:
        self.documents: dict[DocId, StoredDocument] = {}
        self.batches: list[tuple[DocumentUpdate, ...]] = []

    async def publish(self, updates: Sequence[DocumentUpdate]) -> None:
        self.batches.append(tuple(updates))
        for update in updates:
            held = self.documents.get(update.id)
            if held is not None and held.version >= update.version:
                continue
            self.documents[update.id] = StoredDocument(
                projection=update.projection,
                doc_key=update.doc_key,
                version=update.version,
                content_hash=update.content_hash,
                body=update.body,
            )

    async def get_documents(self, ids: Iterable[DocId]) -> Mapping[DocId, StoredDocument]:
        return {i: self.documents[i] for i in ids if i in self.documents}

    async def all_documents(self, projection: str | None = None) -> list[StoredDocument]:
        docs = [d for d in self.documents.values() if projection in (None, d.projection)]
        return sorted(docs, key=lambda d: d.doc_key)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ParityRecord:
    """What each lane of a :class:`TeeSink` holds for one document after its last publish.

    For a lane that cannot be read back (not a :class:`DocumentReader`), what it was last sent.

    Attributes:
        doc_key: the document.
        primary_version, primary_hash: held by the primary lane (0 / "" if absent).
        shadow_version, shadow_hash: held by the shadow lane (0 / "" if never delivered).
        shadow_error: the shadow's last failure, if its last publish failed.
    """

    doc_key: str
    primary_version: int
    primary_hash: str
    shadow_version: int
    shadow_hash: str
    shadow_error: str | None = None

    @property
    def in_parity(self) -> bool:
        """Both lanes hold the same version with the same hash."""
        return (
            self.primary_version == self.shadow_version
            and self.primary_hash == self.shadow_hash
            and self.shadow_error is None
        )


async def _holdings(sink: Sink, updates: Sequence[DocumentUpdate]) -> dict[DocId, tuple[int, str]]:
    """(version, hash) of each updated document as the lane holds it after a publish.

    A lane that can be read back (a :class:`DocumentReader`) reports what it stores, so a lane
    that dropped or diverged from an update shows up; another lane is taken at its word.
    """
    if isinstance(sink, DocumentReader):
        held = await sink.get_documents([u.id for u in updates])
        return {
            u.id: (held[u.id].version, held[u.id].content_hash) if u.id in held else (0, "")
            for u in updates
        }
    return {u.id: (u.version, u.content_hash) for u in updates}


class TeeSink:
    """Publishes to a primary and a shadow sink and records parity per document.

    The primary's failure propagates (the batch is not done); the shadow's is recorded in the
    parity table and swallowed, so a broken shadow never stops the primary lane. A lane that
    is also a :class:`DocumentReader` is read back after publishing, so parity compares what
    each lane holds, not only what it was sent.
    """

    def __init__(self, primary: Sink, shadow: Sink) -> None:
        self.primary = primary
        self.shadow = shadow
        self.parity: dict[str, ParityRecord] = {}

    async def publish(self, updates: Sequence[DocumentUpdate]) -> None:
        await self.primary.publish(updates)
        primary = await _holdings(self.primary, updates)
        error: str | None = None
        shadow: dict[DocId, tuple[int, str]] = {}
        try:
            await self.shadow.publish(updates)
            shadow = await _holdings(self.shadow, updates)
        except Exception as exc:  # noqa: BLE001 - the shadow lane must never stop the primary
            error = f"{type(exc).__name__}: {exc}"
        for update in updates:
            before = self.parity.get(update.doc_key)
            kept = (before.shadow_version, before.shadow_hash) if before else (0, "")
            shadow_version, shadow_hash = shadow.get(update.id, kept)
            self.parity[update.doc_key] = ParityRecord(
                doc_key=update.doc_key,
                primary_version=primary[update.id][0],
                primary_hash=primary[update.id][1],
                shadow_version=shadow_version,
                shadow_hash=shadow_hash,
                shadow_error=error,
            )

    def out_of_parity(self) -> list[ParityRecord]:
        """Documents whose lanes disagree, ordered by key."""
        return sorted((r for r in self.parity.values() if not r.in_parity), key=lambda r: r.doc_key)
