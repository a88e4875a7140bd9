"""Catch-up reads from a read replica (``OA_SYNC_READ_REPLICA_URL``), when it is current enough.

Theory of operation. A snapshot or resume must contain every change up to the watermark the
live feed starts after (the hub's watermark when the subscription attached), or a change would
fall between the two. A replica lags the primary by an unknown amount, so before each
catch-up :meth:`ReadRouter.engine_for` asks the replica, in one cheap statement, for its log
epoch and highest watermark: when the epoch is the hub's and the watermark has reached the one
needed, the catch-up reads the replica; otherwise (lag, another epoch, replica down) it reads
the primary, exactly as without a replica. The replica only moves forward, so every later page
of the same catch-up may read it too. The live feed never reads the replica.

What this is not: replication. The replica is fed by Postgres streaming replication (or, in
the tests, by the test itself); nothing here writes to it.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from oa_sync_server.postgres.read_model import log_position

__all__ = ["ReadRouter"]


_log = structlog.get_logger(__name__)


class ReadRouter:
    """Chooses the engine of a catch-up read: the replica when it has caught up, else the
    primary.

    Args:
        primary: the primary's engine.
        replica: the replica's engine (``None``: always the primary).
        on_choice: called with ``"replica"`` or ``"primary"`` after each choice (a metric).
    """

    def __init__(
        self,
        primary: AsyncEngine,
        replica: AsyncEngine | None = None,
        *,
        on_choice: Callable[[str], None] | None = None,
    ) -> None:
        self.primary = primary
        self.replica = replica
        self._on_choice = on_choice

    async def engine_for(self, watermark: int, epoch: str) -> AsyncEngine:
        """The engine to read a catch-up that must include every change up to ``watermark``
        of ``epoch``."""
        chosen = self.primary
        if self.replica is not None:
            try:
                async with self.replica.connect() as conn:
                    at_epoch, top = await log_position(conn)
                if at_epoch == epoch and top >= watermark:
                    chosen = self.replica
            except (sa.exc.SQLAlchemyError, OSError) as exc:
                _log.warning("replica_unavailable", error=type(exc).__name__)
        if self._on_choice is not None:
            self._on_choice("replica" if chosen is self.replica else "primary")
        return chosen
