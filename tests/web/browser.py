"""Headless Chromium for the web tests: the Node driver packages/oa-sync-js/test/browser-driver.ts
(playwright-core on Debian's /usr/bin/chromium) as a child process, one JSON command per line.

What this is not: a browser download. ``apt-get install -y chromium`` provides the browser;
``npm ci`` in packages/oa-sync-js provides playwright-core (both done by ``.ci/run`` / nox).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson
import pytest

__all__ = ["ARTIFACTS", "JS_PACKAGE", "Browser", "build_js", "npm_ready"]

JS_PACKAGE = Path(__file__).resolve().parents[2] / "packages" / "oa-sync-js"
ARTIFACTS = Path(os.environ.get("OA_SYNC_TEST_ARTIFACTS", JS_PACKAGE.parents[1] / ".artifacts"))
"""Where screenshots go (``OA_SYNC_TEST_ARTIFACTS``, default ``.artifacts/`` in the checkout)."""
CHROMIUM = os.environ.get("OA_SYNC_CHROMIUM", "/usr/bin/chromium")


def npm_ready(*, browser: bool = False) -> None:
    """Fail with the fix when node/npm, the pinned npm packages or Chromium are missing."""
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.fail("Node 20 and npm are needed for the web tests (see .ci/run)")
    if not (JS_PACKAGE / "node_modules" / ".package-lock.json").exists():
        pytest.fail(f"run `npm ci` in {JS_PACKAGE} first (nox -s tests does)")
    if browser and not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (see .ci/run)")


async def build_js() -> None:
    """Compile the package and its tests (tsc) so build/test/browser-driver.js exists."""
    proc = await asyncio.create_subprocess_exec(
        "npm",
        "run",
        "build",
        cwd=JS_PACKAGE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode(errors="replace")


class BrowserError(AssertionError):
    """The driver answered ``ok: false``."""


class Browser:
    """The driver process; :meth:`call` sends one command and returns its ``value``."""

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None
        self.console: list[str] = []
        """Console errors the page logged so far."""

    async def __aenter__(self) -> Browser:
        self._proc = await asyncio.create_subprocess_exec(
            "node",
            "build/test/browser-driver.js",
            cwd=JS_PACKAGE,
            env=dict(os.environ) | {"OA_SYNC_CHROMIUM": CHROMIUM},
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=16 * 1024 * 1024,
        )
        return self

    async def call(self, cmd: str, timeout_s: float = 60.0, **args: Any) -> Any:
        """Run one command; raises :class:`BrowserError` with the driver's message on failure."""
        proc = self._proc
        assert proc is not None
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdin.write(orjson.dumps({"cmd": cmd, **args}) + b"\n")
        await proc.stdin.drain()
        async with asyncio.timeout(timeout_s):
            line = await proc.stdout.readline()
        if not line:
            raise BrowserError(f"the browser driver exited during {cmd}")
        answer = orjson.loads(line)
        self.console += answer.get("console", [])
        if not answer["ok"]:
            raise BrowserError(f"{cmd}: {answer['error']}")
        return answer.get("value")

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.returncode is None:
            try:
                self._proc = proc
                await self.call("close", timeout_s=10)
            except (BrowserError, TimeoutError, ConnectionError):
                proc.kill()
            finally:
                self._proc = None
        async with asyncio.timeout(20):
            await proc.wait()
