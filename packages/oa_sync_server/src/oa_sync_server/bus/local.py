"""The in-process fan-out bus: a projector's commits handed to the hub of its own process.

Without it, the hub of the process that runs the projector learns of each commit from the
commit's NOTIFY and reads the changed documents back from Postgres (one statement per page,
and each body's ``jsonb`` text parsed and canonicalised again), although the projector held
exactly those rows, canonical bodies included, a moment before. With it (``oa-sync serve``
with ``OA_SYNC_FANOUT=postgres``, the default), the worker publishes each committed batch's
rows here after the commit, and the hub delivers them under the bus rules of
:mod:`oa_sync_server.fanout`: only a change that carries the next watermark of the hub's epoch
is delivered; a gap or another epoch makes the hub read Postgres instead.

The bus is not :attr:`~LocalBus.complete`: another process's projector (``--workers N``, a
second machine) or a reprojection commits changes that never pass through it. The hub reads
Postgres for those when their notification names a watermark it has not delivered (the
payload ``<epoch>:<watermark>``, :func:`oa_sync_server.postgres.tables.changes_hint`), and
after any wake that names nothing (a reconnect, the poll interval), as without a bus.

What this is not: a queue. Nothing is buffered or retried here; a change the hub does not
take (it was behind, or not started) is read from Postgres like any other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final

from oa_sync_server.bus.changes import BusChange

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["LocalBus"]


class LocalBus:
    """Hands published changes to the subscribers of this process, synchronously."""

    complete: Final = False
    connected: Final = True

    def __init__(self) -> None:
        self._handlers: list[Callable[[BusChange], None]] = []
        self.published = 0
        """Changes published since start."""

    def subscribe(self, handler: Callable[[BusChange], None]) -> None:
        """Hand every change published from now on to ``handler``."""
        self._handlers.append(handler)

    async def publish(self, changes: Iterable[BusChange]) -> int:
        """Hand ``changes`` to every subscriber, in order; returns how many."""
        count = 0
        handlers = self._handlers
        for change in changes:
            for handler in handlers:
                handler(change)
            count += 1
        self.published += count
        return count

    async def republish(self, engine: AsyncEngine) -> int:
        """Nothing to do: a hub of this process reads Postgres for what it did not get."""
        return 0
