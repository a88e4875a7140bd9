"""One log follower: LISTEN for hints, poll as a fallback, reconnect with backoff.

Theory of operation. Three loops of the server wait for the same thing, "something new may be
in a table": the projector worker (new events, channel ``oa_sync_events``), the fan-out hub
(new documents, ``oa_sync_changes``) and the HTTP sink's delivery loop. A
:class:`LogFollower` is that wait, once:

* a task holds a dedicated psycopg connection (outside any pool, autocommit) that ``LISTEN``s
  on the channel; every notification sets :attr:`LogFollower.hint`. A NOTIFY is only a hint
  (DESIGN.md rule 5): it carries no data. :meth:`LogFollower.wait` hands the consumer the
  payloads of the notifications it woke for (the projector's name the epoch and watermark it
  committed), so a consumer that already holds what they name may skip its read; a wake that
  names nothing (a reconnect, :meth:`LogFollower.wake`, the poll interval) returns ``None``:
  read;
* when the connection fails (network, restart, ``pg_terminate_backend``) the task logs it,
  sets the hint (the consumer looks now: anything may have been missed), waits a full-jitter
  backoff (:class:`oa_sync_core.protocol.backoff.Backoff`) and reconnects; after re-``LISTEN``
  it sets the hint again, so what was committed while it was deaf is re-read;
* :meth:`LogFollower.wait` returns at the first hint, at ``stop``, or after the poll interval
  (the fallback when hints are lost): the consumer then re-reads from its own position.

What this is not: a reader of the log. The consumer reads (from its watermark or position);
the follower only says when.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Final, LiteralString

import psycopg
import structlog
from oa_sync_core.protocol.backoff import Backoff, BackoffPolicy
from sqlalchemy.ext.asyncio import AsyncEngine

from oa_sync_server.postgres.tables import CHANGES_CHANNEL, EVENTS_CHANNEL

__all__ = ["FOLLOWER_BACKOFF", "LogFollower", "libpq_url"]

_LISTEN: Final[dict[str, LiteralString]] = {
    EVENTS_CHANNEL: "LISTEN oa_sync_events",
    CHANGES_CHANNEL: "LISTEN oa_sync_changes",
}
"""The channels there are, and their statements (written out: no SQL is composed)."""

FOLLOWER_BACKOFF: Final = BackoffPolicy(base_s=0.1, cap_s=5.0)
"""Reconnect schedule of the LISTEN connection (full jitter, forever)."""

MAX_PAYLOADS: Final = 64
"""Distinct payloads kept between two waits; beyond them the wake names nothing (read)."""

_log = structlog.get_logger(__name__)


def libpq_url(engine: AsyncEngine) -> str:
    """The engine's URL as libpq takes it (for the raw psycopg LISTEN connection)."""
    url = engine.url.set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


class LogFollower:
    """Hints that a table may have grown: LISTEN on ``channel``, poll fallback, reconnect.

    Args:
        url: libpq URL of the database (a dedicated connection is opened; not a pool's).
        channel: the NOTIFY channel: ``oa_sync_events`` or ``oa_sync_changes``.
        poll_interval_s: the longest :meth:`wait` lasts without a hint.
        backoff: the reconnect schedule.
        on_reconnect: called before each reconnect attempt (e.g. a metric).
        name: for log lines.

    Use :meth:`start` and :meth:`stop` (or ``async with``).
    """

    def __init__(
        self,
        url: str,
        channel: str,
        *,
        poll_interval_s: float,
        backoff: BackoffPolicy = FOLLOWER_BACKOFF,
        on_reconnect: Callable[[], None] | None = None,
        name: str = "",
    ) -> None:
        if channel not in _LISTEN:
            raise ValueError(f"unknown channel {channel!r}")
        if poll_interval_s <= 0:
            raise ValueError("poll_interval_s must be > 0")
        self._url = url
        self._channel = channel
        self.poll_interval_s = poll_interval_s
        self._backoff = Backoff(backoff)
        self._on_reconnect = on_reconnect
        self._name = name or channel
        self._task: asyncio.Task[None] | None = None
        self.hint = asyncio.Event()
        """Set by every notification and every (re)connect; the consumer clears it."""
        self._payloads: set[str] = set()  # of the notifications since the last wait
        self._blind = True  # since the last wait: a wake that names nothing
        self.listening = asyncio.Event()
        """Set while the LISTEN connection is up."""
        self.backend_pid: int | None = None
        """Backend pid of the LISTEN connection while it is up (tests terminate it)."""

    async def __aenter__(self) -> LogFollower:
        self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    def start(self) -> None:
        """Start listening (in a task)."""
        if self._task is None:
            self._task = asyncio.create_task(self._listen(), name=f"oa-sync-follow-{self._name}")

    async def stop(self) -> None:
        """Stop listening and close the connection."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def wake(self, *, read: bool = True) -> None:
        """Set the hint (as a notification would).

        Args:
            read: the wake names nothing, so the consumer reads (``False``: the waker
                delivered what it woke for itself; only notifications decide the read).
        """
        if read:
            self._blind = True
        self.hint.set()

    async def wait(
        self, stop: asyncio.Event | None = None, timeout_s: float | None = None
    ) -> frozenset[str] | None:
        """Until a hint, ``stop``, or ``timeout_s`` (default: the poll interval) passes.

        The hint is cleared on return, before the consumer reads: a notification that arrives
        during the read sets it again, so the next wait returns at once.

        Returns:
            The payloads of the notifications this wake stands for (empty: only a
            ``wake(read=False)``), or ``None`` when it names nothing the consumer could skip a
            read for: the poll interval passed, ``stop``, a (re)connect, a plain :meth:`wake`,
            or more than :data:`MAX_PAYLOADS` distinct payloads.
        """
        waiters = [asyncio.ensure_future(self.hint.wait())]
        if stop is not None:
            waiters.append(asyncio.ensure_future(stop.wait()))
        try:
            await asyncio.wait(
                waiters,
                timeout=self.poll_interval_s if timeout_s is None else timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            for waiter in waiters:
                waiter.cancel()
        named = None if self._blind or not self.hint.is_set() else frozenset(self._payloads)
        self.hint.clear()
        self._payloads.clear()
        self._blind = False
        return named

    def _notified(self, payload: str) -> None:
        payloads = self._payloads
        if not self._blind:
            if len(payloads) >= MAX_PAYLOADS:
                self._blind = True
                payloads.clear()
            else:
                payloads.add(payload)
        self.hint.set()

    async def _listen(self) -> None:
        first = True
        while True:
            if not first and self._on_reconnect is not None:
                self._on_reconnect()
            first = False
            try:
                conn = await psycopg.AsyncConnection.connect(self._url, autocommit=True)
                async with conn:
                    await conn.execute(_LISTEN[self._channel])
                    self.backend_pid = conn.info.backend_pid
                    self.listening.set()
                    self._backoff.reset()
                    self.wake()  # re-read whatever was committed while not listening
                    async for notify in conn.notifies():
                        self._notified(notify.payload)
            except (psycopg.Error, OSError) as exc:
                _log.warning("listener_lost", follower=self._name, error=type(exc).__name__)
            except Exception as exc:  # noqa: BLE001 - a bug must not silence the hints
                _log.error("listener_failed", follower=self._name, error=type(exc).__name__)
            finally:
                self.listening.clear()
                self.backend_pid = None
            self.wake()  # look now: the poll fallback covers the gap
            await asyncio.sleep(self._backoff.next_delay() or FOLLOWER_BACKOFF.cap_s)
