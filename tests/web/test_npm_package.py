"""What a web developer does: pack the npm package from the checkout, install the tarball into
a fresh app (with ``ws``), and follow a run live with the ten lines of docs/client.md against a
real ``oa-sync serve``."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import aiohttp
import pytest
from oa_sync_server.auth import mint_token

from tests.serve_process import serve_process
from tests.web.browser import JS_PACKAGE, npm_ready

FOLLOW = """\
import WebSocket from "ws";
import { runSummary, SyncClient } from "@openagents/oa-sync";

const [url, token, runId] = process.argv.slice(2);
const client = new SyncClient({ url, token, WebSocket });
client.subscribe([`runtime/run_summary:${runId}`]).on((event) => {
  if (event.type === "changed") {
    const run = runSummary(event.doc); // the generated RunSummaryProjection
    console.log(event.doc.version, run.runId, run.stepCount);
    if (event.doc.version >= 2) void client.close();
  }
});
client.start();
"""


def _app(tmp_path: Path) -> tuple[Path, str, Path]:
    """The packed tarball, the pinned ``ws`` version, and a fresh app directory."""
    (tarball,) = tmp_path.glob("openagents-oa-sync-*.tgz")
    ws_version = json.loads((JS_PACKAGE / "node_modules/ws/package.json").read_text())["version"]
    app = tmp_path / "app"
    app.mkdir()
    (app / "package.json").write_text('{"name": "app", "version": "1.0.0", "type": "module"}')
    (app / "follow.mjs").write_text(FOLLOW)
    return tarball, str(ws_version), app


async def _run(*args: str, cwd: Path) -> str:
    proc = await asyncio.create_subprocess_exec(
        *args, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"{' '.join(args)}:\n{text}"
    return text


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_the_packed_package_follows_a_run_in_a_fresh_app(
    database_url: str, tmp_path: Path
) -> None:
    """npm pack + npm install of the tarball give a working client: the docs' ten lines see a
    run's versions 1 and 2 from a real server, typed by the generated RunSummaryProjection."""
    npm_ready()
    await _run("npm", "pack", "--pack-destination", str(tmp_path), cwd=JS_PACKAGE)
    tarball, ws_version, app = _app(tmp_path)
    # The packages are in npm's cache after `npm ci` in packages/oa-sync-js.
    await _run(
        "npm", "install", "--prefer-offline", "--no-audit", "--no-fund",
        str(tarball), f"ws@{ws_version}", cwd=app,
    )  # fmt: skip
    async with serve_process(database_url) as server:
        token = mint_token(
            server.secret, subject="app", topics=["*"], scopes=["sync:read", "sync:append"]
        )

        async def append(event_type: str, **fields: int) -> None:
            event = {"streamId": "run:npm1", "type": event_type, "payload": {"runId": "npm1"}}
            event["payload"] |= fields
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    f"{server.url}/v1/events?wait=visible",
                    json={"events": [event]},
                    headers={"Authorization": f"Bearer {token}"},
                ) as resp,
            ):
                assert resp.status == 200, await resp.text()

        await append("run.created")
        proc = await asyncio.create_subprocess_exec(
            "node", "follow.mjs", server.url, token, "npm1",
            cwd=app, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            first = (await proc.stdout.readline()).decode()
            assert re.fullmatch(r"1 npm1 0\n", first), first
            await append("run.step", stepIndex=1)
            second = (await proc.stdout.readline()).decode()
            assert re.fullmatch(r"2 npm1 1\n", second), second
            assert await proc.wait() == 0
