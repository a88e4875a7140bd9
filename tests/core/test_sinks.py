"""Sinks: NoopSink, MemorySink (latest version wins) and TeeSink (parity between two lanes)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import pytest
from oa_sync_core.codec import JsonObject, canonical_json, content_hash
from oa_sync_core.projectors import RUN_SUMMARY
from oa_sync_core.sinks import (
    DocumentReader,
    DocumentUpdate,
    MemorySink,
    NoopSink,
    ParityRecord,
    Sink,
    TeeSink,
)


def _update(ident: str, version: int, body: JsonObject | None = None) -> DocumentUpdate:
    body = body if body is not None else {"runId": ident, "stepCount": version}
    canonical = canonical_json(body)
    return DocumentUpdate(
        projection=RUN_SUMMARY,
        doc_key=f"{RUN_SUMMARY}:{ident}",
        version=version,
        body=body,
        canonical=canonical,
        content_hash=content_hash(canonical),
        last_position=version * 10,
    )


class FlakySink:
    """A shadow lane that fails while ``broken`` is set; otherwise keeps what it is sent."""

    def __init__(self) -> None:
        self.broken = True
        self.received: list[DocumentUpdate] = []

    async def publish(self, updates: Sequence[DocumentUpdate]) -> None:
        if self.broken:
            raise ConnectionError("shadow down")
        self.received.extend(updates)


class PrimaryDown:
    """A primary lane that always fails."""

    async def publish(self, updates: Sequence[DocumentUpdate]) -> None:
        raise RuntimeError("primary down")


def test_sinks_satisfy_the_protocols() -> None:
    """All core sinks are Sinks; MemorySink can also be read back."""
    for sink in (NoopSink(), MemorySink(), TeeSink(NoopSink(), NoopSink()), FlakySink()):
        assert isinstance(sink, Sink)
    assert isinstance(MemorySink(), DocumentReader)
    assert not isinstance(NoopSink(), DocumentReader)


async def test_noop_sink_counts_and_keeps_nothing() -> None:
    """NoopSink discards updates but counts them."""
    sink = NoopSink()
    await sink.publish([_update("r1", 1), _update("r2", 1)])
    await sink.publish([])
    assert sink.published == 2


class ReadableSink(Sink, DocumentReader, Protocol):
    """A sink that can be read back (the read-model kind)."""


class ReadableSinkContract:
    """Behaviour every read-model sink must have; subclass with a ``sink`` fixture."""

    @pytest.fixture
    def sink(self) -> ReadableSink:
        raise NotImplementedError

    async def test_publish_then_read_back(self, sink: ReadableSink) -> None:
        """Published documents read back with their version, hash and body."""
        await sink.publish([_update("r1", 1), _update("r2", 3)])
        held = await sink.get_documents([_update("r1", 1).id, ("x", "x:absent")])
        assert list(held) == [_update("r1", 1).id]
        doc = held[_update("r1", 1).id]
        assert (doc.projection, doc.doc_key) == _update("r1", 1).id
        assert (doc.version, doc.content_hash, doc.body) == (
            1,
            _update("r1", 1).content_hash,
            _update("r1", 1).body,
        )

    async def test_not_newer_versions_are_ignored(self, sink: ReadableSink) -> None:
        """An update not newer than what the sink holds is ignored, so replays are harmless."""
        await sink.publish([_update("r1", 2)])
        await sink.publish([_update("r1", 1, {"runId": "r1", "stale": True})])
        await sink.publish([_update("r1", 2, {"runId": "r1", "same version": True})])
        (doc,) = (await sink.get_documents([_update("r1", 2).id])).values()
        assert (doc.version, doc.body) == (2, {"runId": "r1", "stepCount": 2})
        await sink.publish([_update("r1", 3)])
        (doc,) = (await sink.get_documents([_update("r1", 3).id])).values()
        assert doc.version == 3

    async def test_all_documents_ordered_and_filtered(self, sink: ReadableSink) -> None:
        """all_documents orders by doc_key and filters by projection."""
        await sink.publish([_update("r2", 1), _update("r1", 1)])
        await sink.publish([])
        keys = [f"{RUN_SUMMARY}:r1", f"{RUN_SUMMARY}:r2"]
        assert [d.doc_key for d in await sink.all_documents()] == keys
        assert [d.doc_key for d in await sink.all_documents(RUN_SUMMARY)] == keys
        assert await sink.all_documents("other") == []


class TestMemorySink(ReadableSinkContract):
    """MemorySink passes the read-model sink contract."""

    @pytest.fixture
    def sink(self) -> ReadableSink:
        return MemorySink()


async def test_memory_sink_records_batches() -> None:
    """MemorySink keeps every batch it was given, for tests to inspect."""
    sink = MemorySink()
    await sink.publish([_update("r1", 1)])
    await sink.publish([])
    assert sink.batches == [(_update("r1", 1),), ()]


async def test_tee_sink_in_parity_when_both_lanes_take_everything() -> None:
    """Two healthy lanes receive every update and the parity table shows no difference."""
    primary, shadow = MemorySink(), MemorySink()
    tee = TeeSink(primary, shadow)
    await tee.publish([_update("r1", 1), _update("r2", 1)])
    await tee.publish([_update("r1", 2)])
    assert primary.documents == shadow.documents
    assert tee.out_of_parity() == []
    assert tee.parity[f"{RUN_SUMMARY}:r1"] == ParityRecord(
        doc_key=f"{RUN_SUMMARY}:r1",
        primary_version=2,
        primary_hash=_update("r1", 2).content_hash,
        shadow_version=2,
        shadow_hash=_update("r1", 2).content_hash,
    )


async def test_tee_sink_records_a_failing_shadow_and_recovers() -> None:
    """A failing shadow never stops the primary; parity shows the gap until it catches up."""
    primary, shadow = MemorySink(), FlakySink()
    tee = TeeSink(primary, shadow)
    await tee.publish([_update("r1", 1)])
    await tee.publish([_update("r1", 2)])
    (record,) = tee.out_of_parity()
    assert (record.primary_version, record.shadow_version, record.shadow_hash) == (2, 0, "")
    assert record.shadow_error == "ConnectionError: shadow down"
    assert not record.in_parity
    assert primary.documents[RUN_SUMMARY, f"{RUN_SUMMARY}:r1"].version == 2
    shadow.broken = False
    await tee.publish([_update("r1", 3)])
    assert tee.out_of_parity() == []
    assert [u.version for u in shadow.received] == [3]


async def test_tee_sink_keeps_the_last_shadow_state_across_failures() -> None:
    """After a success then a failure, the record keeps what the shadow last held."""
    shadow = FlakySink()
    shadow.broken = False
    tee = TeeSink(MemorySink(), shadow)
    await tee.publish([_update("r1", 1)])
    shadow.broken = True
    await tee.publish([_update("r1", 2)])
    record = tee.parity[f"{RUN_SUMMARY}:r1"]
    assert (record.primary_version, record.shadow_version) == (2, 1)
    assert record.shadow_hash == _update("r1", 1).content_hash


async def test_tee_sink_detects_a_shadow_that_differs() -> None:
    """A readable shadow holding other content than the primary is out of parity."""
    primary, shadow = MemorySink(), MemorySink()
    await shadow.publish([_update("r1", 5, {"runId": "r1", "legacy": "yes"})])
    tee = TeeSink(primary, shadow)
    await tee.publish([_update("r1", 3), _update("r2", 1)])
    (record,) = tee.out_of_parity()
    assert record.doc_key == f"{RUN_SUMMARY}:r1"
    assert (record.primary_version, record.shadow_version) == (3, 5)
    assert record.shadow_hash != record.primary_hash
    assert record.shadow_error is None


async def test_tee_sink_primary_failure_propagates() -> None:
    """The primary's failure is the batch's failure; the shadow is not even tried."""
    shadow = MemorySink()
    tee = TeeSink(PrimaryDown(), shadow)
    with pytest.raises(RuntimeError, match="primary down"):
        await tee.publish([_update("r1", 1)])
    assert shadow.documents == {}
    assert tee.parity == {}
