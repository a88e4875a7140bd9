"""Server processes for the benchmarks: the real sync server and a bare aiohttp baseline.

:class:`ServerProcess` runs ``oa-sync serve`` (or, in a checkout without the ``serve``
command, ``bench/_serve.py``, which builds the same ``create_app``) as a child process on a
temporary database and waits for ``/readyz``. :class:`BareProcess` runs ``bench/_bare.py``: a
WebSocket broadcast server with no database, no auth and no protocol state — the same-run
ceiling for fan-out. Both expose the child's pid for RSS and CPU readings.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
SECRET = "bench-only-hs256-secret-0123456789abcdefghijklmnop"
SERVE_COMMAND = HERE.parent / "packages/oa_sync_server/src/oa_sync_server/commands/serve.py"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def token(
    *, subject: str = "bench", topics: tuple[str, ...] = ("*",), ttl_s: float = 3600.0
) -> str:
    """An HS256 token the benchmark server accepts."""
    from oa_sync_server.auth import mint_token  # noqa: PLC0415

    return mint_token(
        SECRET, subject=subject, topics=topics, scopes=("sync:read", "sync:append"), ttl_s=ttl_s
    )


class _Child:
    """A child process with its log in a temporary file; terminated on exit."""

    command: list[str]
    env: dict[str, str]
    ready_path = "/"

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in __exit__
            prefix="oa-sync-bench-", suffix=".log", delete=False
        )

    @property
    def ws_url(self) -> str:
        """The WebSocket URL of the sync endpoint."""
        return self.url.replace("http://", "ws://") + "/v1/sync"

    @property
    def ps(self) -> psutil.Process:
        """The child as a psutil process (RSS, CPU times)."""
        assert self.process is not None
        return psutil.Process(self.process.pid)

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the child's output (for error messages)."""
        return Path(self._log.name).read_text("utf-8", "replace")[-chars:]

    def __enter__(self) -> _Child:
        self.process = subprocess.Popen(  # noqa: S603 - our own command line
            self.command, env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 90
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=2) as answer:  # noqa: S310
                    if answer.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready in 90 s:\n{self.log_tail()}")
            time.sleep(0.2)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            print(f"--- end of {self.command[-1]} output ---\n{self.log_tail()}", file=sys.stderr)
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        with contextlib.suppress(OSError):
            os.unlink(self._log.name)


class ServerProcess(_Child):
    """``oa-sync serve --workers N`` on ``database_url`` with benchmark settings (``env``
    overrides; ``workers`` server processes on the port, 1 by default; ``None``: the command's
    own default, one per core)."""

    ready_path = "/readyz"

    def __init__(self, database_url: str, *, workers: int | None = 1, **env: Any) -> None:
        super().__init__()
        self.workers = workers
        self.env = {
            **os.environ,
            "OA_SYNC_DATABASE_URL": database_url,
            "OA_SYNC_HOST": "127.0.0.1",
            "OA_SYNC_PORT": str(self.port),
            "OA_SYNC_JWT_HS256_SECRET": SECRET,
            "OA_SYNC_LOG_LEVEL": "warning",
            "OA_SYNC_LOG_FORMAT": "json",
            "OA_SYNC_MAX_CONNECTIONS_PER_SUBJECT": "100000",
            "OA_SYNC_POLL_INTERVAL_S": os.environ.get("BENCH_POLL", "1"),
            **{f"OA_SYNC_{k.upper()}": str(v) for k, v in env.items()},
        }
        cli = shutil.which("oa-sync", path=str(Path(sys.executable).parent))
        if SERVE_COMMAND.exists() and cli is not None:
            self.command = [cli, "serve"]
            if workers is not None:
                self.command += ["--workers", str(workers)]
        else:
            self.command = [sys.executable, str(HERE / "_serve.py")]


class BareProcess(_Child):
    """The bare aiohttp broadcast server (``bench/_bare.py``)."""

    def __init__(self) -> None:
        super().__init__()
        self.env = {**os.environ, "BENCH_PORT": str(self.port)}
        self.command = [sys.executable, str(HERE / "_bare.py")]
