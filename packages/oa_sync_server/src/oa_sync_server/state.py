"""The state one server app shares with its handlers: :class:`ServerState` under :data:`STATE`.

It lives apart from :mod:`oa_sync_server.app` so that handler modules (the
``transports``) can import it without importing the app factory that imports them.
``oa_sync_server.app`` re-exports both names.

What this is not: a place that creates anything; :func:`oa_sync_server.app.create_app` does.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from oa_sync_server.auth import TokenVerifier
from oa_sync_server.config import Settings
from oa_sync_server.fanout import Feed, Hub
from oa_sync_server.metrics import Metrics
from oa_sync_server.postgres.event_log import PostgresEventLog
from oa_sync_server.postgres.read_model import CatchUpReads

if TYPE_CHECKING:
    from oa_sync_server.postgres.replica import ReadRouter
    from oa_sync_server.worker import ProjectorWorker

__all__ = ["STATE", "ServerState"]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ServerState:
    """Everything a handler of one app may use.

    Attributes:
        settings: the validated settings.
        engine: the database engine.
        verifier: the bearer-token verifier.
        metrics: the app's Prometheus metrics.
        hub: the live fan-out.
        event_log: appends for ``POST /v1/events``.
        projector: the in-process projector worker, when this app runs one.
        stopping: set when the app begins shutting down.
        streams: the fan-out feeds of open SSE responses (closed on shutdown).
        reads: where snapshot and resume reads go (the replica when it has caught up).
        catch_up_reads: the snapshot and resume reads of every transport (WebSocket and SSE),
            batched per event-loop turn.
    """

    settings: Settings
    engine: AsyncEngine
    verifier: TokenVerifier
    metrics: Metrics
    hub: Hub
    event_log: PostgresEventLog
    projector: ProjectorWorker | None = None
    stopping: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    streams: set[Feed] = dataclasses.field(default_factory=set)
    reads: ReadRouter | None = None
    catch_up_reads: CatchUpReads = dataclasses.field(default_factory=CatchUpReads)

    async def catch_up_engine(self) -> AsyncEngine:
        """The engine of a snapshot or resume read starting now (see :class:`ReadRouter`)."""
        if self.reads is None:
            return self.engine
        return await self.reads.engine_for(self.hub.watermark, self.hub.epoch)


STATE = web.AppKey("oa_sync_state", ServerState)
"""The app's :class:`ServerState`."""
