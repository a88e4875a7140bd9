"""Checkpoints: how far each document's fold has got, and with which projector version.

A :class:`Checkpoint` is written in the same transaction as the document it describes. Events
at or below ``last_position`` are already folded into the document and are skipped, so
applying a batch twice changes nothing. A checkpoint written by another ``projector_version``
is void: the document is rebuilt from the log.

:class:`CheckpointStore` is the port; :class:`oa_sync_core.memory.MemoryCheckpointStore` and
``oa_sync_server.postgres.PostgresCheckpointStore`` implement it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Protocol, TypeAlias

__all__ = ["Checkpoint", "CheckpointStore", "DocId"]

DocId: TypeAlias = tuple[str, str]
"""(projection, doc_key): the identity of a document and of its checkpoint."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint:
    """Where the fold of one document stands.

    Attributes:
        projection: the projector's name.
        doc_key: the document.
        last_position: the log position of the last event folded in.
        projector_version: the version of the projector that folded it.
        content_hash: hash of the document after that event.
        version: number of events folded into the document (its version).
    """

    projection: str
    doc_key: str
    last_position: int
    projector_version: int
    content_hash: str
    version: int

    def __post_init__(self) -> None:
        if self.last_position < 0 or self.version < 0:
            raise ValueError("last_position and version must be >= 0")
        if not self.doc_key.startswith(self.projection + ":"):
            raise ValueError(f"{self.doc_key!r} is not a key of {self.projection!r}")

    @property
    def id(self) -> DocId:
        """(projection, doc_key)."""
        return (self.projection, self.doc_key)


class CheckpointStore(Protocol):
    """Reads and writes checkpoints. Implementations must make ``put_many`` atomic."""

    async def get_many(self, ids: Iterable[DocId]) -> Mapping[DocId, Checkpoint]:
        """Checkpoints of the given documents; documents without one are absent."""
        ...

    async def put_many(self, checkpoints: Iterable[Checkpoint]) -> None:
        """Store checkpoints, replacing those of the same documents."""
        ...

    async def all(self, projection: str | None = None) -> list[Checkpoint]:
        """Every checkpoint, or those of one projection, ordered by doc_key."""
        ...
