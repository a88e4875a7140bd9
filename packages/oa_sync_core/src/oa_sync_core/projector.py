"""The :class:`Projector` protocol: a pure, deterministic fold of events into documents.

A projector routes an event to at most one document (:meth:`Projector.doc_key`) and folds it
in (:meth:`Projector.apply`). Folding must be a pure function of the document and the event:
no clock, no randomness, no I/O, and an event type it does not know is routed nowhere. Because
of that, the same events give byte-identical documents on every machine, and a document's
version is simply the number of events routed to it.

Bumping :attr:`Projector.version` declares that the fold changed: every checkpoint written by
another version is void and the projection is rebuilt from the log.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from oa_sync_core.codec import JsonObject
from oa_sync_core.events import Event

__all__ = ["Projector", "projection_of"]


@runtime_checkable
class Projector(Protocol):
    """Folds events into documents of one projection.

    Attributes:
        name: the projection, e.g. ``runtime/run_summary``; document keys are
            ``<name>:<id>``.
        version: the fold's version; bump it whenever ``apply`` changes behaviour.
    """

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> int: ...

    def doc_key(self, event: Event) -> str | None:
        """The key of the document this event folds into, or None to ignore the event."""
        ...

    def initial(self, doc_key: str) -> JsonObject:
        """The document before any event: canonical proto3 JSON of the empty projection."""
        ...

    def apply(self, doc: JsonObject, event: Event) -> JsonObject:
        """Fold one event into a document; returns a new document, never mutates ``doc``."""
        ...


def projection_of(doc_key: str) -> str:
    """The projection of a document key: ``runtime/run_summary:r1`` -> ``runtime/run_summary``.

    Raises:
        ValueError: the key has no ``:``.
    """
    projection, sep, rest = doc_key.partition(":")
    if not sep or not projection or not rest:
        raise ValueError(f"document key {doc_key!r} is not '<projection>:<id>'")
    return projection
