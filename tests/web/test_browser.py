"""The inspector page and CORS in a real browser (headless Chromium) against a real
``oa-sync serve`` process on real Postgres."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from oa_sync_server.auth import mint_token

from tests.serve_process import ServeProcess, free_port, serve_process
from tests.web.browser import ARTIFACTS, Browser, build_js, npm_ready

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _row_version(key: str, version: int) -> str:
    """A page expression: the inspector's row of ``key`` shows ``version``."""
    selector = orjson.dumps(f'tr[data-key="{key}"]').decode()
    return f"document.querySelector({selector})?.dataset.version === '{version}'"


async def _append(server: ServeProcess, events: list[dict[str, Any]]) -> None:
    token = mint_token(server.secret, subject="t", topics=["*"], scopes=["sync:append"])
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{server.url}/v1/events",
            json={"events": events},
            headers={"Authorization": f"Bearer {token}"},
        ) as resp,
    ):
        assert resp.status == 200, await resp.text()


async def test_inspector_shows_documents_live_and_after_a_server_restart(
    database_url: str,
) -> None:
    """The page at / follows the token in its fragment: an appended document shows within
    2 s, new versions keep showing after the server restarts, the admin panel and the drift
    check answer; a screenshot is saved as an artifact."""
    npm_ready(browser=True)
    await build_js()
    async with serve_process(database_url) as server, Browser() as browser:
        token = mint_token(
            server.secret,
            subject="inspector",
            topics=["*"],
            scopes=["sync:read", "sync:admin"],
        )
        await browser.call("open", url=f"{server.url}/#token={token}&topic=*")
        live = "document.getElementById('state').textContent === 'live'"
        await browser.call("waitFor", js=live, timeoutMs=20_000)
        key = "runtime/run_summary:insp-1"
        await _append(
            server,
            [{"streamId": "run:insp-1", "type": "run.created", "payload": {"runId": "insp-1"}}],
        )
        await browser.call("waitFor", js=_row_version(key, 1), timeoutMs=2_000)
        fields = await browser.call(
            "eval", js=f"document.querySelector('tr[data-key=\"{key}\"]').children[4].textContent"
        )
        assert fields.startswith("CREATED")
        assert await browser.call(
            "eval", js="document.getElementById('transport').textContent"
        ) == ("websocket")
        await browser.call(
            "waitFor", js="document.getElementById('lag').textContent.includes('events')"
        )
        await browser.call("eval", js="document.getElementById('drift-check').click()")
        await browser.call(
            "waitFor", js="document.getElementById('drift').textContent.startsWith('no drift')"
        )

        await server.restart()
        for step in (1, 2):
            payload = {"runId": "insp-1", "stepIndex": step, "description": f"step {step}"}
            await _append(
                server, [{"streamId": "run:insp-1", "type": "run.step", "payload": payload}]
            )
        await browser.call("waitFor", js=_row_version(key, 3), timeoutMs=30_000)
        await browser.call("waitFor", js=live, timeoutMs=10_000)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "inspector.png"
        await browser.call("screenshot", path=str(shot))
        assert shot.stat().st_size > 1000
        assert not [c for c in browser.console if "inspector" in c.lower()], browser.console


async def _page_server(port: int) -> web.AppRunner:
    """A bare page on another origin (the app a web developer would write)."""

    async def page(request: web.Request) -> web.Response:
        return web.Response(
            text="<!doctype html><title>other origin</title>", content_type="text/html"
        )

    app = web.Application()
    app.router.add_get("/", page)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


_FETCH = """async () => {
  const headers = {Authorization: 'Bearer %(token)s', 'Content-Type': 'application/json'};
  try {
    const post = await fetch('%(url)s/v1/events?wait=visible', {method: 'POST', headers,
      body: JSON.stringify({events: [{streamId: 'run:cors-1', type: 'run.created',
                                       payload: {runId: 'cors-1'}}]})});
    const doc = await fetch('%(url)s/v1/docs/runtime/run_summary:cors-1', {headers});
    return {post: post.status, doc: doc.status, version: (await doc.json()).version};
  } catch (error) {
    return {error: String(error)};
  }
}"""


async def test_a_page_on_an_allowed_origin_appends_and_reads_with_a_bearer_header(
    database_url: str,
) -> None:
    """From a page on an allowed origin, fetch with Authorization appends and reads a document
    (CORS preflight passes); the same page on a refused origin is blocked by the browser."""
    npm_ready(browser=True)
    await build_js()
    port = free_port()
    allowed = f"http://127.0.0.1:{port}"
    runner = await _page_server(port)
    try:
        async with (
            serve_process(database_url, origins=[allowed]) as server,
            Browser() as browser,
        ):
            token = mint_token(
                server.secret, subject="web", topics=["*"], scopes=["sync:read", "sync:append"]
            )
            script = _FETCH % {"token": token, "url": server.url}
            await browser.call("open", url=f"{allowed}/")
            result = await browser.call("eval", js=f"({script})()")
            assert result == {"post": 200, "doc": 200, "version": "1"}
            await browser.call("open", url=f"http://localhost:{port}/")
            refused = await browser.call("eval", js=f"({script})()")
            assert "error" in refused
            assert "Failed to fetch" in refused["error"]
            async with aiohttp.ClientSession() as http:
                for origin, expected in ((allowed, allowed), (f"http://localhost:{port}", None)):
                    async with http.options(
                        f"{server.url}/v1/events",
                        headers={
                            "Origin": origin,
                            "Access-Control-Request-Method": "POST",
                            "Access-Control-Request-Headers": "authorization,content-type",
                        },
                    ) as resp:
                        assert resp.headers.get("Access-Control-Allow-Origin") == expected
                        if expected:
                            allow = resp.headers["Access-Control-Allow-Headers"].lower()
                            assert "authorization" in allow
    finally:
        await runner.cleanup()


async def test_inspector_falls_back_to_sse_when_its_origin_is_refused(database_url: str) -> None:
    """Served by a server whose WebSocket refuses the page's origin, the inspector follows the
    documents over the SSE fallback (a fetch stream with the bearer header) instead."""
    npm_ready(browser=True)
    await build_js()
    async with (
        serve_process(database_url, allow_own_origin=False) as server,
        Browser() as browser,
    ):
        token = mint_token(server.secret, subject="inspector", topics=["*"], scopes=["sync:read"])
        await browser.call("open", url=f"{server.url}/#token={token}&topic=runtime/run_summary:*")
        transport = "document.getElementById('transport').textContent.startsWith('sse')"
        await browser.call("waitFor", js=transport, timeoutMs=30_000)
        payload = {"runId": "sse-1"}
        await _append(
            server, [{"streamId": "run:sse-1", "type": "run.created", "payload": payload}]
        )
        key = "runtime/run_summary:sse-1"
        await browser.call("waitFor", js=_row_version(key, 1), timeoutMs=10_000)
        assert not await browser.call(
            "eval", js="document.getElementById('admin').hidden === false"
        )


async def test_the_demo_url_shows_the_demo_runs_moving(database_url: str) -> None:
    """The inspector URL `oa-sync serve --demo` prints (several worker processes) opens on the
    WebSocket and shows the demo's run documents gaining versions."""
    npm_ready(browser=True)
    await build_js()
    async with (
        serve_process(database_url, demo=True, allow_own_origin=False) as server,
        Browser() as browser,
    ):
        url = (await server.wait_for_line(re.compile(r"^\s+(http://\S+/#token=\S+)$")))[1]
        await browser.call("open", url=url)
        rows = "document.querySelectorAll('#docs tr[data-key^=\"runtime/run_summary:\"]')"
        versions = f"[...{rows}].reduce((n, tr) => n + Number(tr.dataset.version), 0)"
        before = await browser.call("waitFor", js=f"{versions} > 0 && {versions}", timeoutMs=30_000)
        await browser.call("waitFor", js=f"{versions} > {before}", timeoutMs=30_000)
        transport = await browser.call(
            "eval", js="document.getElementById('transport').textContent"
        )
        assert transport == "websocket"
        await browser.call("waitFor", js="!document.getElementById('admin').hidden")
