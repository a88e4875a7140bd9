"""The sans-IO projection engine.

Theory of operation: the caller reads a batch of committed events (in log order), asks
:meth:`ProjectionEngine.route` which documents they touch, loads those documents' checkpoints
and bodies, and hands everything to :meth:`ProjectionEngine.apply`. The engine folds each event
into its document unless the document's checkpoint already covers it (same projector version
and ``last_position`` at or past the event), and returns the document updates and checkpoint
advances to write — in one transaction — with no I/O of its own.

A checkpoint written by another projector version does not count: the document restarts from
``initial`` and the caller is expected to feed the whole log (see :mod:`oa_sync_core.replay`);
:meth:`ProjectionEngine.stale_projections` tells a caller when that is due.

Everything here is deterministic: the same events and states give the same updates, bytes
and hashes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

from oa_sync_core.checkpoints import Checkpoint, DocId
from oa_sync_core.codec import JsonObject, canonical_json, content_hash
from oa_sync_core.errors import ProjectionError
from oa_sync_core.events import Event
from oa_sync_core.projector import Projector
from oa_sync_core.sinks import DocumentUpdate, StoredDocument

__all__ = ["DocumentState", "Fold", "ProjectionEngine", "ProjectionResult"]

_new_object = object.__new__
_set_field = object.__setattr__  # how a frozen dataclass sets its own fields


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DocumentState:
    """A document as it stands before a batch.

    Attributes:
        checkpoint: its checkpoint, or None if it was never folded.
        body: its current body, or None if absent (the fold starts from ``initial``).
        version: its current version (0 if absent).
    """

    checkpoint: Checkpoint | None = None
    body: JsonObject | None = None
    version: int = 0

    @classmethod
    def of(cls, checkpoint: Checkpoint | None, document: StoredDocument | None) -> DocumentState:
        """Combine a stored checkpoint and document into a state."""
        if document is None:
            return cls(checkpoint=checkpoint)
        return cls(checkpoint=checkpoint, body=document.body, version=document.version)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ProjectionResult:
    """What one batch changes.

    Attributes:
        updates: one per changed document, in order of each document's last event.
        checkpoints: the matching checkpoint advances.
        applied: events folded into some document.
        skipped: events already covered by a checkpoint.
        ignored: events no projector routes anywhere.
        last_position: the highest position in the batch (0 for an empty batch).
        states: each changed document's state once the result is written, by document (what
            a caller that keeps states between batches remembers; built with the updates;
            empty when :meth:`Fold.result` was asked for none).
    """

    updates: tuple[DocumentUpdate, ...]
    checkpoints: tuple[Checkpoint, ...]
    applied: int
    skipped: int
    ignored: int
    last_position: int
    states: Mapping[DocId, DocumentState] = dataclasses.field(
        default_factory=dict, compare=False, hash=False
    )


class ProjectionEngine:
    """Folds batches of events through a set of projectors.

    Args:
        projectors: the projectors; names must be unique.

    Raises:
        ValueError: two projectors share a name.
    """

    def __init__(self, projectors: Iterable[Projector]) -> None:
        self.projectors: dict[str, Projector] = {}
        for projector in projectors:
            if projector.name in self.projectors:
                raise ValueError(f"two projectors are named {projector.name!r}")
            self.projectors[projector.name] = projector

    def __repr__(self) -> str:
        return f"ProjectionEngine({list(self.projectors.values())!r})"

    def select(self, projection: str | None = None, doc_key: str | None = None) -> ProjectionEngine:
        """An engine limited to one projection (and, if given, one document's projection).

        Raises:
            KeyError: no projector has that name.
        """
        if doc_key is not None:
            name = doc_key.partition(":")[0]
            if projection is not None and projection != name:
                raise KeyError(f"{doc_key!r} does not belong to {projection!r}")
            projection = name
        if projection is None:
            return self
        if projection not in self.projectors:
            raise KeyError(f"no projector named {projection!r}")
        return ProjectionEngine([self.projectors[projection]])

    def route(self, events: Iterable[Event]) -> list[DocId]:
        """The documents a batch touches, in order of first touch, without repeats."""
        seen: dict[DocId, None] = {}
        for event in events:
            for projector in self.projectors.values():
                key = projector.doc_key(event)
                if key is not None:
                    seen.setdefault((projector.name, key), None)
        return list(seen)

    def stale_projections(self, checkpoints: Iterable[Checkpoint]) -> set[str]:
        """Projections with a checkpoint written by another projector version."""
        stale: set[str] = set()
        for checkpoint in checkpoints:
            projector = self.projectors.get(checkpoint.projection)
            if projector is not None and checkpoint.projector_version != projector.version:
                stale.add(checkpoint.projection)
        return stale

    def apply(
        self, events: Sequence[Event], states: Mapping[DocId, DocumentState]
    ) -> ProjectionResult:
        """Fold a batch of events.

        Args:
            events: committed events in log order. Positions may interleave across streams
                (Postgres log order is by transaction), but increase within each document,
                which is what makes ``last_position`` a valid checkpoint.
            states: the state of (at least) every document :meth:`route` names for them;
                a missing one counts as never folded.

        Returns:
            The updates and checkpoint advances to write in one transaction.

        Raises:
            ProjectionError: a projector broke its contract.
        """
        fold = Fold(self, states)
        fold.add(events)
        return fold.result()


class Fold:
    """Folds batch after batch, and encodes each changed document once, at the end.

    :meth:`ProjectionEngine.apply` is one :meth:`add` and :meth:`result`. A rebuild adds every
    batch of the log to one fold, so a document touched in every batch is still canonicalised
    and hashed once (the bytes and hash are those of its final body: the same as folding batch
    by batch, since encoding is a pure function of the body).

    Args:
        engine: the projectors.
        states: the documents' states before the first batch (see
            :meth:`ProjectionEngine.apply`).
    """

    def __init__(self, engine: ProjectionEngine, states: Mapping[DocId, DocumentState]) -> None:
        self.engine = engine
        self.states = states
        self.working: dict[DocId, tuple[JsonObject, int, int]] = {}  # body, version, covered
        self.touched: dict[DocId, int] = {}  # document -> tick of its last folded event
        self.applied = self.skipped = self.ignored = 0
        self.last_position = 0
        self.events = 0
        self._tick = 0

    def _start(self, projector: Projector, doc_id: DocId) -> tuple[JsonObject, int, int]:
        """A document's working state before its first event in this fold."""
        state = self.states.get(doc_id) or DocumentState()
        checkpoint = state.checkpoint
        if checkpoint is None or checkpoint.projector_version != projector.version:
            return (projector.initial(doc_id[1]), 0, 0)
        if state.body is None:
            return (projector.initial(doc_id[1]), 0, 0)
        return (state.body, state.version, checkpoint.last_position)

    def add(self, events: Sequence[Event]) -> None:
        """Fold a batch (in log order) into the working documents.

        Raises:
            ProjectionError: a projector broke its contract.
        """
        # The inner loop runs once per event and projector: locals, no attribute lookups.
        routes = [(p.doc_key, p.name, p) for p in self.engine.projectors.values()]
        working, touched = self.working, self.touched
        applied = skipped = ignored = 0
        last, tick = self.last_position, self._tick
        for event in events:
            position = event.position
            last = max(last, position)
            routed = False
            for doc_key, name, projector in routes:
                key = doc_key(event)
                if key is None:
                    continue
                routed = True
                doc_id = (name, key)
                current = working.get(doc_id)
                if current is None:
                    current = self._start(projector, doc_id)
                body, version, covered = current
                if position <= covered:
                    skipped += 1
                    working[doc_id] = current
                    continue
                new_body = projector.apply(body, event)
                if new_body is body:
                    raise ProjectionError(
                        f"apply() returned its input for {event.type}; return a new document",
                        projection=name,
                        position=position,
                    )
                working[doc_id] = (new_body, version + 1, position)
                tick += 1
                touched[doc_id] = tick
                applied += 1
            if not routed:
                ignored += 1
        self.events += len(events)
        self.applied += applied
        self.skipped += skipped
        self.ignored += ignored
        self.last_position, self._tick = last, tick

    def result(self, *, with_states: bool = True) -> ProjectionResult:
        """The updates and checkpoint advances of everything added, each document encoded once.

        Args:
            with_states: also build each document's state after the result is written
                (``ProjectionResult.states``, for a caller that keeps states between batches;
                a whole-log fold that keeps none saves an object per document).

        Raises:
            ValueError: a projector routed an event to a key outside its projection (the
                :class:`~oa_sync_core.Checkpoint` rule, checked here once per document).
        """
        # Once per changed document: the values are built without their dataclass __init__
        # (the fields are known valid here: positions and versions are positive, and the
        # one rule Checkpoint checks is checked below), about half the cost.
        updates: list[DocumentUpdate] = []
        checkpoints: list[Checkpoint] = []
        states: dict[DocId, DocumentState] = {}
        versions = {name: p.version for name, p in self.engine.projectors.items()}
        working = self.working
        new, put = _new_object, _set_field
        for doc_id in sorted(self.touched, key=self.touched.__getitem__):
            body, version, covered = working[doc_id]
            projection, key = doc_id
            if not key.startswith(projection) or key[len(projection) : len(projection) + 1] != ":":
                raise ValueError(f"{key!r} is not a key of {projection!r}")
            canonical = canonical_json(body)
            digest = content_hash(canonical)
            update = new(DocumentUpdate)
            put(update, "projection", projection)
            put(update, "doc_key", key)
            put(update, "version", version)
            put(update, "body", body)
            put(update, "canonical", canonical)
            put(update, "content_hash", digest)
            put(update, "last_position", covered)
            updates.append(update)
            checkpoint = new(Checkpoint)
            put(checkpoint, "projection", projection)
            put(checkpoint, "doc_key", key)
            put(checkpoint, "last_position", covered)
            put(checkpoint, "projector_version", versions[projection])
            put(checkpoint, "content_hash", digest)
            put(checkpoint, "version", version)
            checkpoints.append(checkpoint)
            if with_states:
                state = new(DocumentState)
                put(state, "checkpoint", checkpoint)
                put(state, "body", body)
                put(state, "version", version)
                states[doc_id] = state
        return ProjectionResult(
            updates=tuple(updates),
            checkpoints=tuple(checkpoints),
            applied=self.applied,
            skipped=self.skipped,
            ignored=self.ignored,
            last_position=self.last_position,
            states=states,
        )
