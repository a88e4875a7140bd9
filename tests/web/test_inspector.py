"""The inspector's routes and admin endpoints on a real server, and the committed bundle
being exactly what ``nox -s inspector`` builds from packages/oa-sync-js."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp
import pytest
from oa_sync_server.config import HttpSinkSettings, Secret, SinkKind
from oa_sync_server.transports.inspector import ASSETS

from tests.live import LiveServer, make_live_server
from tests.serve_process import free_port, serve_process
from tests.web.browser import JS_PACKAGE, npm_ready

STATIC = JS_PACKAGE.parents[1] / "packages/oa_sync_server/src/oa_sync_server/static"


async def test_the_page_and_its_assets_are_served_with_a_strict_policy(
    live_server: LiveServer,
) -> None:
    """GET / is the inspector page; its assets are served from the package; nothing else is."""
    async with aiohttp.ClientSession(live_server.url) as http:
        async with http.get("/") as resp:
            assert resp.status == 200
            assert resp.content_type == "text/html"
            page = await resp.text()
            assert "/inspector/inspector.js" in page
            csp = resp.headers["Content-Security-Policy"]
            assert "script-src 'self'" in csp
            assert "default-src 'none'" in csp
        for name, kind in ASSETS.items():
            if name == "index.html":
                continue
            async with http.get(f"/inspector/{name}") as resp:
                assert resp.status == 200
                assert resp.content_type == kind
                assert await resp.read() == (STATIC / name).read_bytes()
        for missing in ("index.html", "..%2Fapp.py", "nope.js"):
            async with http.get(f"/inspector/{missing}") as resp:
                assert resp.status == 404


async def test_admin_endpoints_need_the_admin_scope(live_server: LiveServer) -> None:
    """/v1/admin/status and /v1/admin/drift answer 401 without a token, 403 without
    sync:admin, and their figures with it."""
    reader = live_server.token(scopes=["sync:read"])
    admin = live_server.token(scopes=["sync:read", "sync:admin"])
    await live_server.append(
        [{"streamId": "run:a1", "type": "run.created", "payload": {"runId": "a1"}}]
    )
    await live_server.settle()
    async with aiohttp.ClientSession(live_server.url) as http:
        for method, path in (("GET", "/v1/admin/status"), ("POST", "/v1/admin/drift")):
            async with http.request(method, path) as resp:
                assert resp.status == 401
            headers = {"Authorization": f"Bearer {reader}"}
            async with http.request(method, path, headers=headers) as resp:
                assert resp.status == 403
        headers = {"Authorization": f"Bearer {admin}"}
        async with http.get("/v1/admin/status", headers=headers) as resp:
            assert resp.status == 200
            status = await resp.json()
        assert status["projector"]["lagEvents"] == 0
        assert status["projector"]["inProcess"] is True
        assert status["projector"]["watermark"] == "1"
        assert status["sink"] == {"kind": "postgres", "lanes": ["postgres"], "parity": None}
        assert set(status["connections"]) == {"ws", "sse"}
        async with http.post("/v1/admin/drift", headers=headers) as resp:
            assert resp.status == 200
            report = await resp.json()
        assert report["ok"] is True
        assert report["documentsChecked"] == 1


@pytest.mark.slow
async def test_the_committed_inspector_bundle_is_fresh(tmp_path: Path) -> None:
    """Building packages/oa-sync-js/inspector with the pinned esbuild gives the committed
    static/inspector.js byte for byte (run `nox -s inspector` after changing the sources)."""
    npm_ready()
    out = tmp_path / "inspector.js"
    proc = await asyncio.create_subprocess_exec(
        "node",
        "scripts/build-inspector.mjs",
        str(out),
        cwd=JS_PACKAGE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await proc.communicate()
    assert proc.returncode == 0, output.decode(errors="replace")
    assert out.read_bytes() == (STATIC / "inspector.js").read_bytes(), (
        "packages/oa_sync_server/src/oa_sync_server/static/inspector.js is stale:"
        " run `nox -s inspector` and commit the result"
    )


async def test_serve_demo_prints_a_working_inspector_url(database_url: str) -> None:
    """`oa-sync serve --demo` prints the inspector URL with an admin token in its fragment:
    the page answers, and that token opens the admin panel."""
    async with serve_process(database_url, demo=True, allow_own_origin=False) as server:
        lines = await server.wait_for_line(re.compile(r"^\s+(http://\S+/#token=\S+)$"))
        url = lines.group(1)
        assert url.startswith(f"{server.url}/#token=")
        fragment = dict(part.split("=", 1) for part in url.split("#", 1)[1].split("&"))
        assert fragment["topic"] == "*"
        headers = {"Authorization": f"Bearer {fragment['token']}"}
        async with aiohttp.ClientSession(server.url) as http:
            async with http.get("/") as resp:
                assert resp.status == 200
            async with http.get("/v1/admin/status", headers=headers) as resp:
                assert resp.status == 200


async def test_admin_status_shows_both_lanes_and_parity_in_tee_mode(database_url: str) -> None:
    """With OA_SYNC_SINK=tee the status lists both lanes and the parity report; an HTTP lane
    that cannot deliver is reported out of parity."""
    http = HttpSinkSettings(url=f"http://127.0.0.1:{free_port()}/sink", secret=Secret("s" * 32))
    async with make_live_server(database_url, sink=SinkKind.TEE, http_sink=http) as server:
        await server.append(
            [{"streamId": "run:p1", "type": "run.created", "payload": {"runId": "p1"}}]
        )
        await server.settle()
        headers = {"Authorization": f"Bearer {server.token(scopes=['sync:admin'])}"}
        async with (
            aiohttp.ClientSession(server.url) as client,
            client.get("/v1/admin/status", headers=headers) as resp,
        ):
            assert resp.status == 200
            sink = (await resp.json())["sink"]
    assert sink["kind"] == "tee"
    assert sink["lanes"] == ["postgres", "http"]
    assert sink["parity"]["inParity"] is False
