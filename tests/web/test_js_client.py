"""The TypeScript client's own suite (``npm test`` in packages/oa-sync-js) against a real
``oa-sync serve`` on a fresh Postgres database: the pytest side of the harness."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.web.serve_process import serve_process

JS_PACKAGE = Path(__file__).resolve().parents[2] / "packages" / "oa-sync-js"


def npm_ready() -> None:
    """Fail with the fix when node/npm or the package's pinned dependencies are missing."""
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.fail("Node 20 and npm are needed for the TypeScript tests (nox -s tests installs)")
    if not (JS_PACKAGE / "node_modules" / ".package-lock.json").exists():
        pytest.fail(f"run `npm ci` in {JS_PACKAGE} first (nox -s tests does)")


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_typescript_client_suite_passes_against_a_real_server(database_url: str) -> None:
    """`npm test` (snapshot, live, resume, reset, token refresh, chaos cuts, strict JSON) passes."""
    npm_ready()
    async with serve_process(database_url) as server:
        env = dict(os.environ) | {
            "OA_SYNC_JS_URL": server.url,
            "OA_SYNC_JS_SECRET": server.secret,
            "OA_SYNC_JS_DATABASE_URL": database_url,
            "OA_SYNC_JS_PYTHON": sys.executable,
        }
        proc = await asyncio.create_subprocess_exec(
            "npm",
            "test",
            cwd=JS_PACKAGE,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
    report = out.decode(errors="replace")
    assert proc.returncode == 0, report[-20000:]
    assert "# fail 0" in report
