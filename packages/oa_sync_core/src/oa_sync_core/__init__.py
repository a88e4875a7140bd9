"""Khala core: the pure half of the OpenAgents sync engine.

Events, deterministic projectors, checkpoints, sinks, the sans-IO projection engine, drift
detection, reprojection and the wire codec. No I/O framework and no database driver: the
Postgres adapters and the server live in ``oa_sync_server``.

Fold events into a run summary::

    from oa_sync_core import (
        DEFAULT_PROJECTORS,
        MemoryEventLog,
        NewEvent,
        ProjectionEngine,
        fold_log,
    )

    log = MemoryEventLog()
    await log.append([NewEvent(stream_id="run:r1", type="run.started", payload={"runId": "r1"})])
    result = await fold_log(log, ProjectionEngine(DEFAULT_PROJECTORS))
    result.documents["runtime/run_summary", "runtime/run_summary:r1"].body["status"]  # 'RUNNING'
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from oa_sync_core.checkpoints import Checkpoint, CheckpointStore, DocId
from oa_sync_core.codec import canonical_json, content_hash, loads_strict, read_message
from oa_sync_core.drift import DriftDetector, DriftItem, DriftKind, DriftReport
from oa_sync_core.engine import DocumentState, ProjectionEngine, ProjectionResult
from oa_sync_core.errors import (
    AppendLimitError,
    CodecError,
    CodecErrorCode,
    ConcurrencyError,
    EventValidationError,
    OaSyncError,
    ProjectionError,
    ProtocolError,
)
from oa_sync_core.events import (
    EVENT_PAYLOADS,
    MAX_APPEND_EVENTS,
    AppendPlan,
    Event,
    EventLog,
    EventSource,
    NewEvent,
    plan_append,
    validate_new_event,
)
from oa_sync_core.memory import MemoryCheckpointStore, MemoryEventLog
from oa_sync_core.projector import Projector, projection_of
from oa_sync_core.projectors import (
    DEFAULT_PROJECTORS,
    RUN_SUMMARY,
    WORKER_SUMMARY,
    CodexWorkerSummaryProjector,
    RunSummaryProjector,
)
from oa_sync_core.protocol.server_session import ServerSession, SessionLimits
from oa_sync_core.protocol.wire import EncodedUpdate, WireError, WireFormat
from oa_sync_core.replay import (
    FoldResult,
    ReprojectionPlan,
    apply_plan,
    fold_log,
    plan_reprojection,
)
from oa_sync_core.sinks import (
    DocumentReader,
    DocumentUpdate,
    MemorySink,
    NoopSink,
    ParityRecord,
    Sink,
    StoredDocument,
    TeeSink,
)
from oa_sync_core.topics import Grant, Topic, parse_topic

try:
    __version__ = version("oa-sync-core")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "DEFAULT_PROJECTORS",
    "EVENT_PAYLOADS",
    "MAX_APPEND_EVENTS",
    "RUN_SUMMARY",
    "WORKER_SUMMARY",
    "AppendLimitError",
    "AppendPlan",
    "Checkpoint",
    "CheckpointStore",
    "CodecError",
    "CodecErrorCode",
    "CodexWorkerSummaryProjector",
    "ConcurrencyError",
    "DocId",
    "DocumentReader",
    "DocumentState",
    "DocumentUpdate",
    "DriftDetector",
    "DriftItem",
    "DriftKind",
    "DriftReport",
    "EncodedUpdate",
    "Event",
    "EventLog",
    "EventSource",
    "EventValidationError",
    "FoldResult",
    "Grant",
    "MemoryCheckpointStore",
    "MemoryEventLog",
    "MemorySink",
    "NewEvent",
    "NoopSink",
    "OaSyncError",
    "ParityRecord",
    "ProjectionEngine",
    "ProjectionError",
    "ProjectionResult",
    "Projector",
    "ProtocolError",
    "ReprojectionPlan",
    "RunSummaryProjector",
    "ServerSession",
    "SessionLimits",
    "Sink",
    "StoredDocument",
    "TeeSink",
    "Topic",
    "WireError",
    "WireFormat",
    "__version__",
    "apply_plan",
    "canonical_json",
    "content_hash",
    "fold_log",
    "loads_strict",
    "parse_topic",
    "plan_append",
    "plan_reprojection",
    "projection_of",
    "read_message",
    "validate_new_event",
]
