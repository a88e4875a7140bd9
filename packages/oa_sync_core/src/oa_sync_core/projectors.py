"""The runtime projectors: run summaries and Codex worker summaries.

Both fold canonical proto3 JSON payloads (see :mod:`oa_sync_core.events`) into canonical proto3
JSON documents of ``RunSummaryProjection`` and ``CodexWorkerSummaryProjection``
(``proto/openagents/sync/v1/projections.proto``): lowerCamelCase keys, 64-bit integers as
strings, default values omitted. Working on JSON rather than betterproto objects keeps the fold
cheap; tests prove every document parses as its proto message and re-encodes identically.

Timestamps come from the payload's ``occurredAt`` or else the event's ``recorded_at``, so a
fold depends on the log alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final

from oa_sync_core.codec import JsonObject, datetime_to_timestamp
from oa_sync_core.events import Event

__all__ = [
    "DEFAULT_PROJECTORS",
    "RUN_SUMMARY",
    "WORKER_SUMMARY",
    "CodexWorkerSummaryProjector",
    "RunSummaryProjector",
]

RUN_SUMMARY: Final = "runtime/run_summary"
WORKER_SUMMARY: Final = "runtime/codex_worker_summary"

_RUN_TERMINAL: Final = frozenset({"COMPLETED", "FAILED", "CANCELED"})
_WORKER_DOWN: Final = frozenset({"STOPPED", "FAILED"})


def _at(event: Event) -> str:
    occurred = event.payload.get("occurredAt")
    return occurred if isinstance(occurred, str) else datetime_to_timestamp(event.recorded_at)


_UINT64_MAX: Final = 2**64 - 1


def _put(doc: JsonObject, key: str, value: str | int | None) -> None:
    """Set a string or 32-bit field, or drop it at its proto3 default ("" or 0).

    Canonical JSON omits defaults. A string "0" is a value, not a default.
    """
    if value is None or value == "" or (isinstance(value, int) and value == 0):
        doc.pop(key, None)
    else:
        doc[key] = value


def _bump64(doc: JsonObject, key: str, by: int = 1) -> None:
    """Add to a uint64 counter (a decimal string in proto3 JSON), saturating at 2**64 - 1."""
    total = min(int(doc.get(key, "0")) + by, _UINT64_MAX)
    if total:
        doc[key] = str(total)
    else:
        doc.pop(key, None)


def _stamp(doc: JsonObject, event: Event) -> None:
    doc["updatedAt"] = _at(event)
    doc["lastEventPosition"] = str(event.position)
    doc["lastEventType"] = event.type


_Fold = Callable[[JsonObject, Event], None]


class _StreamProjector:
    """Shared routing: events of ``<stream_kind>:<id>`` with a known type go to ``<name>:<id>``."""

    name: str
    version: int
    _stream_kind: str
    _id_field: str
    _folds: Mapping[str, _Fold]

    def doc_key(self, event: Event) -> str | None:
        if event.type not in self._folds:
            return None
        kind, _, ident = event.stream_id.partition(":")
        if kind != self._stream_kind or not ident:
            return None
        return f"{self.name}:{ident}"

    def initial(self, doc_key: str) -> JsonObject:
        return {self._id_field: doc_key[len(self.name) + 1 :]}

    def apply(self, doc: JsonObject, event: Event) -> JsonObject:
        fold = self._folds.get(event.type)
        if fold is None:
            return doc
        new = dict(doc)
        fold(new, event)
        _stamp(new, event)
        return new

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, version={self.version})"


# --- run summary ------------------------------------------------------------------------------


def _run_active(doc: JsonObject) -> None:
    if doc.get("status") in (None, "CREATED"):
        doc["status"] = "RUNNING"


def _run_created(doc: JsonObject, event: Event) -> None:
    p = event.payload
    if "status" not in doc:
        doc["status"] = "CREATED"
    _put(doc, "agentId", p.get("agentId", ""))
    _put(doc, "threadId", p.get("threadId", ""))
    doc["createdAt"] = _at(event)


def _run_started(doc: JsonObject, event: Event) -> None:
    if doc.get("status") not in _RUN_TERMINAL:
        doc["status"] = "RUNNING"
    if event.payload.get("workerId"):
        doc["workerId"] = event.payload["workerId"]
    doc["startedAt"] = _at(event)


def _run_step(doc: JsonObject, event: Event) -> None:
    p = event.payload
    _run_active(doc)
    doc["stepCount"] = doc.get("stepCount", 0) + 1
    _put(doc, "lastStepDescription", p.get("description", ""))
    progress = min(int(p.get("progressPercent", 0)), 100)
    if progress:
        doc["progressPercent"] = progress


def _run_tool_call(doc: JsonObject, event: Event) -> None:
    _run_active(doc)
    doc["toolCallCount"] = doc.get("toolCallCount", 0) + 1
    _put(doc, "lastToolName", event.payload.get("toolName", ""))


def _run_finished(status: str) -> _Fold:
    def fold(doc: JsonObject, event: Event) -> None:
        if doc.get("status") in _RUN_TERMINAL:
            return
        p = event.payload
        doc["status"] = status
        doc["finishedAt"] = _at(event)
        if status == "COMPLETED":
            doc["progressPercent"] = 100
            _put(doc, "resultSummary", p.get("resultSummary", ""))
        elif status == "FAILED":
            doc["error"] = dict(p.get("error", {}))
        else:
            _put(doc, "cancelReason", p.get("reason", ""))

    return fold


class RunSummaryProjector(_StreamProjector):
    """Folds ``run:<run_id>`` streams into ``runtime/run_summary:<run_id>`` documents."""

    name = RUN_SUMMARY
    version = 1
    _stream_kind = "run"
    _id_field = "runId"
    _folds: Mapping[str, _Fold] = {
        "run.created": _run_created,
        "run.started": _run_started,
        "run.step": _run_step,
        "run.tool_call": _run_tool_call,
        "run.completed": _run_finished("COMPLETED"),
        "run.failed": _run_finished("FAILED"),
        "run.canceled": _run_finished("CANCELED"),
    }


# --- Codex worker summary ---------------------------------------------------------------------


def _worker_started(doc: JsonObject, event: Event) -> None:
    p = event.payload
    doc["status"] = "IDLE"
    _put(doc, "host", p.get("host", ""))
    _put(doc, "version", p.get("version", ""))
    doc["startedAt"] = _at(event)
    for key in ("stoppedAt", "stopReason", "inFlightRequests"):
        doc.pop(key, None)


def _worker_heartbeat(doc: JsonObject, event: Event) -> None:
    doc["lastHeartbeatAt"] = _at(event)


def _worker_idle_if_drained(doc: JsonObject) -> None:
    in_flight = max(doc.get("inFlightRequests", 0) - 1, 0)
    _put(doc, "inFlightRequests", in_flight)
    if in_flight == 0 and doc.get("status") == "BUSY":
        doc["status"] = "IDLE"


def _worker_request_received(doc: JsonObject, event: Event) -> None:
    _bump64(doc, "requestsReceived")
    doc["inFlightRequests"] = doc.get("inFlightRequests", 0) + 1
    if doc.get("status") not in _WORKER_DOWN:
        doc["status"] = "BUSY"
    if event.payload.get("runId"):
        doc["currentRunId"] = event.payload["runId"]


def _worker_request_completed(doc: JsonObject, event: Event) -> None:
    _bump64(doc, "requestsCompleted")
    _bump64(doc, "totalRequestDurationMs", int(event.payload.get("durationMs", "0")))
    _worker_idle_if_drained(doc)


def _worker_request_failed(doc: JsonObject, event: Event) -> None:
    _bump64(doc, "requestsFailed")
    doc["lastError"] = dict(event.payload.get("error", {}))
    _worker_idle_if_drained(doc)


def _worker_stopped(doc: JsonObject, event: Event) -> None:
    doc["status"] = "STOPPED"
    doc["stoppedAt"] = _at(event)
    _put(doc, "stopReason", event.payload.get("reason", ""))
    doc.pop("inFlightRequests", None)


def _worker_failed(doc: JsonObject, event: Event) -> None:
    doc["status"] = "FAILED"
    doc["stoppedAt"] = _at(event)
    doc["lastError"] = dict(event.payload.get("error", {}))
    doc.pop("inFlightRequests", None)


class CodexWorkerSummaryProjector(_StreamProjector):
    """Folds ``worker:<worker_id>`` streams into ``runtime/codex_worker_summary:<worker_id>``."""

    name = WORKER_SUMMARY
    version = 1
    _stream_kind = "worker"
    _id_field = "workerId"
    _folds: Mapping[str, _Fold] = {
        "worker.started": _worker_started,
        "worker.heartbeat": _worker_heartbeat,
        "worker.request_received": _worker_request_received,
        "worker.request_completed": _worker_request_completed,
        "worker.request_failed": _worker_request_failed,
        "worker.stopped": _worker_stopped,
        "worker.failed": _worker_failed,
    }


DEFAULT_PROJECTORS: Final = (RunSummaryProjector(), CodexWorkerSummaryProjector())
"""The projectors Khala runs unless told otherwise."""
