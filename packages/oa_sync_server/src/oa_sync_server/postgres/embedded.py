"""An embedded Postgres (the ``pgserver`` package) for ``oa-sync serve`` without a database URL.

:class:`EmbeddedPostgres` starts a private Postgres whose data lives in ``<data_dir>/pg``,
listening on a Unix socket only (no TCP port), and stops it on :meth:`EmbeddedPostgres.stop`.
Running as root works: ``pgserver`` creates an unprivileged ``pgserver`` system user and runs
``initdb``/``postgres`` as that user. ``pgserver`` is blocking, so start and stop run in a worker
thread and never block the event loop.

What this is not: a production database. Use ``OA_SYNC_DATABASE_URL`` for anything shared.
"""

from __future__ import annotations

import asyncio
import subprocess
import warnings
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

from oa_sync_server.errors import EmbeddedPostgresError, EmbeddedUnavailableError

__all__ = ["EmbeddedPostgres", "load_pgserver"]


def load_pgserver() -> ModuleType:
    """Import ``pgserver`` (the ``oa-sync-server[embedded]`` extra), quietly.

    The one place that imports it: the server, the commands and the test fixtures call this.

    Raises:
        EmbeddedUnavailableError: the extra is not installed.
    """
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset (containers, CI);
        # pgserver then uses /tmp/runtime-<uid>, which is what we want.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
        try:
            import pgserver  # noqa: PLC0415 - heavy import, only when the embedded server is used
        except ImportError:
            raise EmbeddedUnavailableError from None
    return pgserver


class EmbeddedPostgres:
    """A Postgres server owned by this process.

    Args:
        data_dir: the server's data directory root (``OA_SYNC_DATA_DIR``); created if absent.

    Use as ``async with EmbeddedPostgres(path) as pg: url = pg.url``, or call :meth:`start` and
    :meth:`stop`.
    """

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir).expanduser().resolve()
        self._server: Any = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        """The ``postgresql://`` URL of the running server (over its Unix socket).

        Raises:
            EmbeddedPostgresError: the server is not running.
        """
        if self._url is None:
            raise EmbeddedPostgresError("not started", data_dir=str(self.data_dir))
        return self._url

    async def start(self) -> str:
        """Start (or attach to an already running) embedded Postgres.

        Returns:
            Its URL.

        Raises:
            EmbeddedPostgresError: ``initdb`` or ``pg_ctl start`` failed.
            EmbeddedUnavailableError: the ``[embedded]`` extra is not installed.
        """
        if self._url is not None:
            return self._url
        self._server, url = await asyncio.to_thread(self._start_blocking, load_pgserver())
        self._url = url
        return url

    def _start_blocking(self, pgserver: Any) -> tuple[Any, str]:
        pgdata = self.data_dir / "pg"
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            server = pgserver.get_server(pgdata, cleanup_mode="stop")
            return server, str(server.get_uri())
        except (OSError, subprocess.SubprocessError, AssertionError) as exc:
            raise EmbeddedPostgresError(
                f"embedded Postgres failed to start ({type(exc).__name__}); see {pgdata}/log",
                data_dir=str(self.data_dir),
            ) from exc

    async def stop(self) -> None:
        """Stop the server (a no-op when it is not running)."""
        server, self._server, self._url = self._server, None, None
        if server is not None:
            await asyncio.to_thread(server.cleanup)

    async def __aenter__(self) -> EmbeddedPostgres:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
