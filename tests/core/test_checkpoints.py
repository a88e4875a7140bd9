"""Checkpoints: the value type, and a contract suite every CheckpointStore must pass.

:class:`CheckpointStoreContract` is written against the port only; the in-memory store runs it
here, and a Postgres store can run it by subclassing with its own ``store`` fixture.
"""

from __future__ import annotations

import dataclasses

import pytest
from oa_sync_core.checkpoints import Checkpoint, CheckpointStore
from oa_sync_core.memory import MemoryCheckpointStore
from oa_sync_core.projectors import RUN_SUMMARY, WORKER_SUMMARY


def _checkpoint(projection: str, ident: str, position: int = 1, **kw: int | str) -> Checkpoint:
    fields: dict[str, object] = {
        "projection": projection,
        "doc_key": f"{projection}:{ident}",
        "last_position": position,
        "projector_version": 1,
        "content_hash": f"h{position}",
        "version": position,
    }
    return Checkpoint(**(fields | kw))  # type: ignore[arg-type]


def test_checkpoint_validates_its_fields() -> None:
    """Negative positions or versions and keys outside the projection are refused."""
    good = _checkpoint(RUN_SUMMARY, "r1")
    assert good.id == (RUN_SUMMARY, f"{RUN_SUMMARY}:r1")
    for bad in ({"last_position": -1}, {"version": -1}, {"doc_key": f"{WORKER_SUMMARY}:w1"}):
        with pytest.raises(ValueError, match=r"must be|is not a key"):
            dataclasses.replace(good, **bad)
    with pytest.raises(ValueError, match="is not a key"):
        dataclasses.replace(good, doc_key=RUN_SUMMARY + "x:r1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        good.version = 3  # type: ignore[misc]


class CheckpointStoreContract:
    """Behaviour every CheckpointStore implementation must have."""

    @pytest.fixture
    def store(self) -> CheckpointStore:
        raise NotImplementedError

    async def test_empty_store(self, store: CheckpointStore) -> None:
        """A new store holds nothing."""
        assert await store.get_many([(RUN_SUMMARY, f"{RUN_SUMMARY}:r1")]) == {}
        assert await store.all() == []

    async def test_put_then_get(self, store: CheckpointStore) -> None:
        """Stored checkpoints come back equal; absent ids are left out."""
        a, b = _checkpoint(RUN_SUMMARY, "r1"), _checkpoint(WORKER_SUMMARY, "w1", 2)
        await store.put_many([a, b])
        got = await store.get_many([a.id, b.id, (RUN_SUMMARY, f"{RUN_SUMMARY}:absent")])
        assert dict(got) == {a.id: a, b.id: b}

    async def test_put_replaces_the_same_document(self, store: CheckpointStore) -> None:
        """A second checkpoint for the same document replaces the first."""
        await store.put_many([_checkpoint(RUN_SUMMARY, "r1", 1)])
        newer = _checkpoint(RUN_SUMMARY, "r1", 7, projector_version=2)
        await store.put_many([newer])
        assert await store.all() == [newer]

    async def test_all_is_ordered_and_filtered(self, store: CheckpointStore) -> None:
        """all() orders by doc_key and can be limited to one projection."""
        items = [
            _checkpoint(RUN_SUMMARY, "r2"),
            _checkpoint(WORKER_SUMMARY, "w1"),
            _checkpoint(RUN_SUMMARY, "r1"),
        ]
        await store.put_many(items)
        assert [c.doc_key for c in await store.all()] == sorted(c.doc_key for c in items)
        assert [c.doc_key for c in await store.all(RUN_SUMMARY)] == [
            f"{RUN_SUMMARY}:r1",
            f"{RUN_SUMMARY}:r2",
        ]
        assert await store.all("unknown") == []

    async def test_put_nothing(self, store: CheckpointStore) -> None:
        """Putting an empty batch is a no-op."""
        await store.put_many([])
        assert await store.all() == []


class TestMemoryCheckpointStore(CheckpointStoreContract):
    """The in-memory store passes the contract."""

    @pytest.fixture
    def store(self) -> CheckpointStore:
        return MemoryCheckpointStore()
