"""The TypeScript client's own suite (``npm test`` in packages/oa-sync-js) against a real
``oa-sync serve`` on a fresh Postgres database: the pytest side of the harness."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from tests.serve_process import serve_process
from tests.web.browser import ARTIFACTS, JS_PACKAGE, npm_ready


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
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "npm-test.txt").write_text(report)  # per-test durations, for the record
    assert proc.returncode == 0, report[-20000:]
    assert "# fail 0" in report
