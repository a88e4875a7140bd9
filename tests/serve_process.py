"""A real ``oa-sync serve`` in a child process, for the end-to-end, TypeScript and browser tests.

:class:`ServeProcess` runs ``python -m oa_sync_server.cli serve`` on a database of the caller's
(``tests.pg``'s ``database_url`` fixture: a local Postgres, or the embedded one for a newcomer),
on a free port it keeps across :meth:`ServeProcess.restart` (its own origin allowed on the
WebSocket, as a browser page it serves needs), with an HS256 secret the tests mint tokens
with. It waits for the ``oa-sync serving on <url>`` line, never for a time.

What this is not: an in-process server (``tests.live`` is that); this one is the real CLI,
signals and all, which is what an npm user or a browser talks to.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import socket
import sys
from collections.abc import AsyncIterator, Sequence

__all__ = ["ServeProcess", "free_port", "serve_process"]

_SERVING = re.compile(r"oa-sync serving on (http://\S+)")
START_TIMEOUT_S = 60.0


class ServeProcess:
    """One ``oa-sync serve`` child process (see the module docstring).

    Attributes:
        url: ``http://127.0.0.1:<port>`` once started.
        secret: the HS256 secret.
        output: every line the process printed (stdout and stderr), for failure messages.
    """

    def __init__(
        self,
        database_url: str,
        *,
        origins: Sequence[str] = (),
        demo: bool = False,
        secret: str | None = None,
        allow_own_origin: bool = True,
        args: Sequence[str] = (),
    ) -> None:
        self.database_url = database_url
        self.args = tuple(args)
        self.origins = tuple(origins)
        self.allow_own_origin = allow_own_origin
        self.demo = demo
        self.secret = secret or secrets.token_urlsafe(48)
        self.url = ""
        self.port = 0
        self.output: list[str] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._printed = asyncio.Event()

    def env(self) -> dict[str, str]:
        """The environment of the child: the database, the secret, the allowed origins."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("OA_SYNC_")}
        env |= {
            "OA_SYNC_DATABASE_URL": self.database_url,
            "OA_SYNC_JWT_HS256_SECRET": self.secret,
            "OA_SYNC_HOST": "127.0.0.1",
            "OA_SYNC_LOG_FORMAT": "json",
        }
        origins = list(self.origins)
        if self.allow_own_origin:
            origins.append(f"http://127.0.0.1:{self.port}")
        if origins:
            env["OA_SYNC_ALLOWED_ORIGINS"] = ",".join(origins)
        return env

    async def start(self) -> str:
        """Start the process and return its URL once it serves (the port is kept for restarts)."""
        if not self.port:
            self.port = free_port()
        args = [sys.executable, "-m", "oa_sync_server.cli", "serve", "--port", str(self.port)]
        if self.demo:
            args.append("--demo")
        args += self.args
        self._proc = await asyncio.create_subprocess_exec(
            *args,
            env=self.env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        serving: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read(self._proc, serving))
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                self.url = await serving
        except TimeoutError:
            await self.stop()
            raise RuntimeError("oa-sync serve did not start:\n" + "\n".join(self.output)) from None
        return self.url

    async def _read(self, proc: asyncio.subprocess.Process, serving: asyncio.Future[str]) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.output.append(line)
            self._printed.set()
            match = _SERVING.search(line)
            if match and not serving.done():
                serving.set_result(match.group(1))
        if not serving.done():
            serving.set_exception(RuntimeError("oa-sync serve exited:\n" + "\n".join(self.output)))

    async def wait_for_line(
        self, pattern: re.Pattern[str], within_s: float = 30.0
    ) -> re.Match[str]:
        """The first line printed so far or from now on that matches ``pattern``."""
        async with asyncio.timeout(within_s):
            seen = 0
            while True:
                for line in self.output[seen:]:
                    match = pattern.search(line)
                    if match:
                        return match
                seen = len(self.output)
                self._printed.clear()
                await self._printed.wait()

    @property
    def pid(self) -> int:
        """The process id of the running ``oa-sync serve`` (the supervisor with ``--workers``)."""
        assert self._proc is not None, "not started"
        return self._proc.pid

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> int | None:
        """Send ``sig`` (SIGTERM: the graceful shutdown), wait, and return the exit code.

        A process that outlives 30 s after SIGTERM is killed. ``None`` when it was not running.
        """
        proc, self._proc = self._proc, None
        code = None
        if proc is not None:
            if proc.returncode is None:
                proc.send_signal(sig)
                try:
                    async with asyncio.timeout(30):
                        await proc.wait()
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
            code = proc.returncode
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader
            self._reader = None
        return code

    async def restart(self) -> str:
        """Stop and start again on the same port and database."""
        await self.stop()
        return await self.start()


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.asynccontextmanager
async def serve_process(
    database_url: str,
    *,
    origins: Sequence[str] = (),
    demo: bool = False,
    allow_own_origin: bool = True,
    secret: str | None = None,
    args: Sequence[str] = (),
) -> AsyncIterator[ServeProcess]:
    """A started :class:`ServeProcess`, stopped when the block exits."""
    server = ServeProcess(
        database_url,
        origins=origins,
        demo=demo,
        allow_own_origin=allow_own_origin,
        secret=secret,
        args=args,
    )
    try:
        await server.start()
        yield server
    finally:
        await server.stop()
