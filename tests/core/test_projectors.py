"""The runtime projectors: deterministic, pure folds into canonical proto3 JSON documents."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import betterproto
import pytest
from hypothesis import given, settings
from oa_sync_core.codec import canonical_json, content_hash, read_message
from oa_sync_core.contracts import v1
from oa_sync_core.engine import ProjectionEngine
from oa_sync_core.events import Event, NewEvent
from oa_sync_core.projector import Projector, projection_of
from oa_sync_core.projectors import (
    DEFAULT_PROJECTORS,
    RUN_SUMMARY,
    WORKER_SUMMARY,
    CodexWorkerSummaryProjector,
    RunSummaryProjector,
)
from oa_sync_core.testing import (
    FIXED_EPOCH,
    UNKNOWN_EVENT_TYPES,
    event_sequences,
    fold_events,
    new_event,
    new_events_for,
    record_events,
)

from tests.profiles import examples

PROPERTY = settings(max_examples=examples(50), deadline=None)
"""Fewer examples than hypothesis's default: generating valid event sequences is the cost."""

MESSAGES: dict[str, type[betterproto.Message]] = {
    RUN_SUMMARY: v1.RunSummaryProjection,
    WORKER_SUMMARY: v1.CodexWorkerSummaryProjection,
}
RUN = (RUN_SUMMARY, f"{RUN_SUMMARY}:r1")
WORKER = (WORKER_SUMMARY, f"{WORKER_SUMMARY}:w1")

# A scenario whose documents are pinned byte for byte: any change to a fold shows up here
# (and must come with a projector version bump).
SCENARIO = [
    new_event("run.created", "r1", agentId="a1", threadId="t1"),
    new_event("worker.started", "w1", host="h1", version="1.2.3"),
    new_event("run.started", "r1", workerId="w1"),
    new_event("worker.request_received", "w1", requestId="q1", runId="r1"),
    new_event("run.step", "r1", stepIndex=0, description="planning", progressPercent=40),
    new_event("run.tool_call", "r1", toolName="shell", callId="c1"),
    new_event("worker.request_completed", "w1", requestId="q1", durationMs="1500"),
    new_event("run.completed", "r1", resultSummary="done", occurredAt="2026-01-02T00:00:00+01:00"),
    new_event("worker.heartbeat", "w1"),
    new_event("worker.stopped", "w1", reason="drain"),
]
GOLDEN_HASHES = {
    RUN: "e2faa90cf7316d82da332bdcc81688cd200b0c3c8da9a14133a96fa0cdee1b3d",
    WORKER: "71c2450b632172600fd559fc26464979707223ef887401dcfd0f40396b316dbe",
}


def _doc_counts(events: list[Event]) -> Counter[tuple[str, str]]:
    engine = ProjectionEngine(DEFAULT_PROJECTORS)
    return Counter(doc_id for e in events for doc_id in engine.route([e]))


def test_projectors_satisfy_the_protocol() -> None:
    """Both projectors are Projector instances with the documented names and versions."""
    for projector in DEFAULT_PROJECTORS:
        assert isinstance(projector, Projector)
        assert projector.version >= 1
    assert [p.name for p in DEFAULT_PROJECTORS] == [RUN_SUMMARY, WORKER_SUMMARY]
    assert projection_of(f"{RUN_SUMMARY}:r1:x") == RUN_SUMMARY
    for bad in ("nokey", ":r1", "p:"):
        with pytest.raises(ValueError, match="not"):
            projection_of(bad)


def test_scenario_documents() -> None:
    """A full run and worker lifecycle fold into the documented summaries."""
    docs = fold_events(record_events(SCENARIO))
    assert docs[RUN].body == {
        "runId": "r1",
        "status": "COMPLETED",
        "agentId": "a1",
        "threadId": "t1",
        "workerId": "w1",
        "createdAt": "2026-01-01T00:00:00Z",
        "startedAt": "2026-01-01T00:00:02Z",
        "finishedAt": "2026-01-01T23:00:00Z",
        "updatedAt": "2026-01-01T23:00:00Z",
        "stepCount": 1,
        "toolCallCount": 1,
        "lastStepDescription": "planning",
        "lastToolName": "shell",
        "progressPercent": 100,
        "resultSummary": "done",
        "lastEventPosition": "8",
        "lastEventType": "run.completed",
    }
    assert docs[RUN].version == 5
    assert docs[WORKER].body == {
        "workerId": "w1",
        "status": "STOPPED",
        "host": "h1",
        "version": "1.2.3",
        "startedAt": "2026-01-01T00:00:01Z",
        "lastHeartbeatAt": "2026-01-01T00:00:08Z",
        "stoppedAt": "2026-01-01T00:00:09Z",
        "updatedAt": "2026-01-01T00:00:09Z",
        "requestsReceived": "1",
        "requestsCompleted": "1",
        "totalRequestDurationMs": "1500",
        "currentRunId": "r1",
        "stopReason": "drain",
        "lastEventPosition": "10",
        "lastEventType": "worker.stopped",
    }
    assert docs[WORKER].version == 5


def test_golden_hashes_are_the_same_in_a_fresh_interpreter() -> None:
    """The pinned scenario hashes hold here and in another process with another hash seed."""
    docs = fold_events(record_events(SCENARIO))
    assert {k: u.content_hash for k, u in docs.items()} == GOLDEN_HASHES
    code = (
        "import json\n"
        "from tests.core.test_projectors import SCENARIO\n"
        "from oa_sync_core.testing import fold_events, record_events\n"
        "docs = fold_events(record_events(SCENARIO))\n"
        "print(json.dumps(sorted(u.content_hash for u in docs.values())))\n"
    )
    out = subprocess.run(  # noqa: S603 - runs this interpreter on a literal
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONHASHSEED": "12345"},
        cwd=Path(__file__).resolve().parents[2],
    ).stdout
    assert json.loads(out) == sorted(GOLDEN_HASHES.values())


@PROPERTY
@given(event_sequences())
def test_same_events_give_byte_identical_documents(events: list[NewEvent]) -> None:
    """Folding the same events twice gives the same bytes, hashes and versions."""
    recorded = record_events(events)
    first = fold_events(recorded)
    second = fold_events(list(recorded))
    assert {k: (u.canonical, u.content_hash, u.version) for k, u in first.items()} == {
        k: (u.canonical, u.content_hash, u.version) for k, u in second.items()
    }
    for update in first.values():
        assert update.canonical == canonical_json(update.body)
        assert update.content_hash == content_hash(update.canonical)


@PROPERTY
@given(event_sequences())
def test_documents_are_canonical_proto3_json_of_their_message(events: list[NewEvent]) -> None:
    """Every document parses as its projection message and re-encodes to the same JSON."""
    for update in fold_events(record_events(events)).values():
        message = MESSAGES[update.projection]
        assert read_message(message, update.body) == update.body
        assert (
            update.body["runId" if update.projection == RUN_SUMMARY else "workerId"]
            == update.doc_key.partition(":")[2]
        )


@PROPERTY
@given(event_sequences())
def test_version_is_the_number_of_events_folded(events: list[NewEvent]) -> None:
    """A document's version equals the number of events routed to it."""
    recorded = record_events(events)
    docs = fold_events(recorded)
    assert {k: u.version for k, u in docs.items()} == dict(_doc_counts(recorded))


@PROPERTY
@given(event_sequences(unknown=True))
def test_unknown_event_types_are_ignored(events: list[NewEvent]) -> None:
    """Removing unknown-type events (positions kept) changes no document."""
    recorded = record_events(events)
    known = [e for e in recorded if e.type not in UNKNOWN_EVENT_TYPES]
    assert fold_events(recorded) == fold_events(known)
    for event in recorded:
        if event.type in UNKNOWN_EVENT_TYPES:
            assert all(p.doc_key(event) is None for p in DEFAULT_PROJECTORS)


@PROPERTY
@given(event_sequences())
def test_events_for_one_document_never_change_another(events: list[NewEvent]) -> None:
    """Each document equals the fold of only its own stream's events."""
    recorded = record_events(events)
    everything = fold_events(recorded)
    for doc_id, update in everything.items():
        ident = doc_id[1].partition(":")[2]
        kind = "run" if doc_id[0] == RUN_SUMMARY else "worker"
        alone = fold_events([e for e in recorded if e.stream_id == f"{kind}:{ident}"])
        assert alone == {doc_id: update}


def test_timestamps_come_from_occurred_at_or_recorded_at() -> None:
    """occurredAt wins; without it the log's recorded_at is used; no wall clock is read."""
    events = record_events(
        [
            new_event("run.created", "r1"),
            new_event("run.started", "r1", occurred_at=dt.datetime(2020, 5, 5, tzinfo=dt.UTC)),
        ]
    )
    body = fold_events(events)[RUN].body
    assert body["createdAt"] == "2026-01-01T00:00:00Z"
    assert body["startedAt"] == body["updatedAt"] == "2020-05-05T00:00:00Z"
    recorded_late = [
        Event(
            position=e.position,
            stream_id=e.stream_id,
            stream_seq=e.stream_seq,
            type=e.type,
            payload=e.payload,
            recorded_at=FIXED_EPOCH + dt.timedelta(days=1),
        )
        for e in events
    ]
    assert fold_events(recorded_late)[RUN].body["createdAt"] == "2026-01-02T00:00:00Z"


def test_run_terminal_status_is_sticky() -> None:
    """After completed/failed/canceled, later lifecycle events do not change the status."""
    events = record_events(
        [
            new_event("run.created", "r1"),
            new_event("run.failed", "r1", error={"code": "tool_timeout", "message": "slow"}),
            new_event("run.started", "r1"),
            new_event("run.completed", "r1", resultSummary="late"),
            new_event("run.canceled", "r1", reason="late"),
        ]
    )
    body = fold_events(events)[RUN].body
    assert body["status"] == "FAILED"
    assert body["error"] == {"code": "tool_timeout", "message": "slow"}
    assert "resultSummary" not in body
    assert "cancelReason" not in body
    assert body["finishedAt"] == "2026-01-01T00:00:01Z"


def test_progress_without_lifecycle_means_running() -> None:
    """A step or tool call before run.started moves the run to RUNNING; progress caps at 100."""
    body = fold_events(record_events([new_event("run.step", "r1", progressPercent=120)]))[RUN].body
    assert body["status"] == "RUNNING"
    assert body["progressPercent"] == 100
    assert body["stepCount"] == 1


def test_worker_busy_idle_and_counters() -> None:
    """Requests in flight make a worker BUSY; draining them makes it IDLE again."""
    events = new_events_for("w1", "worker.started", "worker.request_received")
    events += [
        new_event("worker.request_received", "w1", runId="r9"),
        new_event("worker.request_failed", "w1", error={"code": "oom"}),
    ]
    docs = fold_events(record_events(events))
    body = docs[WORKER].body
    assert (body["status"], body["inFlightRequests"], body["currentRunId"]) == ("BUSY", 1, "r9")
    assert (body["requestsReceived"], body["requestsFailed"]) == ("2", "1")
    assert body["lastError"] == {"code": "oom"}
    events.append(new_event("worker.request_completed", "w1", durationMs=7))
    body = fold_events(record_events(events))[WORKER].body
    assert body["status"] == "IDLE"
    assert "inFlightRequests" not in body
    assert body["totalRequestDurationMs"] == "7"


def test_worker_failed_then_restarted() -> None:
    """worker.failed records the error; a new worker.started clears stop fields and revives it."""
    events = [
        new_event("worker.started", "w1"),
        new_event("worker.request_received", "w1"),
        new_event("worker.failed", "w1", error={"code": "crash"}),
        new_event("worker.request_received", "w1"),
    ]
    body = fold_events(record_events(events))[WORKER].body
    assert body["status"] == "FAILED"
    assert body["inFlightRequests"] == 1
    events.append(new_event("worker.started", "w1", host="h2"))
    body = fold_events(record_events(events))[WORKER].body
    assert body["status"] == "IDLE"
    assert "stoppedAt" not in body
    assert "inFlightRequests" not in body
    assert body["host"] == "h2"


def test_uint64_counters_saturate() -> None:
    """Durations add as unsigned 64-bit integers and saturate instead of overflowing."""
    big = str(2**64 - 1)
    events = [
        new_event("worker.request_completed", "w1", durationMs=big),
        new_event("worker.request_completed", "w1", durationMs=big),
    ]
    body = fold_events(record_events(events))[WORKER].body
    assert body["totalRequestDurationMs"] == big
    assert read_message(v1.CodexWorkerSummaryProjection, body) == body


def test_routing_ignores_other_streams_and_unknown_types() -> None:
    """Run events on other stream kinds, and unknown types on run streams, route nowhere."""
    run, worker = RunSummaryProjector(), CodexWorkerSummaryProjector()
    base = record_events([new_event("run.started", "r1")])[0]
    foreign = Event(
        position=1,
        stream_id="job:r1",
        stream_seq=1,
        type="run.started",
        payload={"runId": "r1"},
        recorded_at=FIXED_EPOCH,
    )
    assert run.doc_key(base) == f"{RUN_SUMMARY}:r1"
    assert worker.doc_key(base) is None
    assert run.doc_key(foreign) is None
    for unknown in UNKNOWN_EVENT_TYPES:
        strange = record_events(
            [NewEvent(stream_id="run:r1", type=unknown, payload={"note": "x"})]
        )[0]
        assert run.doc_key(strange) is None
        assert worker.doc_key(strange) is None
        doc = run.initial(f"{RUN_SUMMARY}:r1")
        assert run.apply(doc, strange) is doc


def test_apply_never_mutates_its_input() -> None:
    """apply returns a new document and leaves the one it was given untouched."""
    events = record_events(SCENARIO)
    for projector in DEFAULT_PROJECTORS:
        doc = None
        for event in events:
            key = projector.doc_key(event)
            if key is None:
                continue
            doc = doc if doc is not None else projector.initial(key)
            snapshot = json.dumps(doc, sort_keys=True)
            new = projector.apply(doc, event)
            assert json.dumps(doc, sort_keys=True) == snapshot
            assert new is not doc
            doc = new
