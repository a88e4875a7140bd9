"""The bare baseline: an aiohttp WebSocket broadcast server with nothing else in it.

No database, no auth check, no protocol state machine, no per-subscriber framing: a client
sends ``authenticate`` (answered with ``welcome``, unchecked) and ``subscribe`` with exact
document keys (answered with ``synced``); ``POST /publish`` takes a JSON list of updates and
sends each one, encoded once, to every socket subscribed to its key. This is the ceiling the
sync server's fan-out is compared with in the same run.
"""

from __future__ import annotations

import os
from collections import defaultdict

import orjson
from aiohttp import WSMsgType, web

SUBSCRIBERS: web.AppKey[defaultdict[str, list[web.WebSocketResponse]]] = web.AppKey("subs")


async def ready(request: web.Request) -> web.Response:
    """Readiness probe."""
    return web.Response(text="ok")


async def sync(request: web.Request) -> web.WebSocketResponse:
    """A subscriber socket."""
    ws = web.WebSocketResponse(protocols=("oa-sync.v1.json",), max_msg_size=1 << 20)
    await ws.prepare(request)
    subs = request.app[SUBSCRIBERS]
    keys: list[str] = []
    try:
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                break
            data = orjson.loads(msg.data)
            if "authenticate" in data:
                await ws.send_str('{"welcome":{"sessionId":"bare","epoch":"e","watermark":"0"}}')
            elif "subscribe" in data:
                for key in data["subscribe"]["topics"]:
                    subs[key].append(ws)
                    keys.append(key)
                await ws.send_str('{"synced":{"subscriptionId":"s1","watermark":"0","epoch":"e"}}')
    finally:
        for key in keys:
            subs[key].remove(ws)
    return ws


async def publish(request: web.Request) -> web.Response:
    """Broadcast each update to its key's subscribers (one encode per update)."""
    subs = request.app[SUBSCRIBERS]
    updates = orjson.loads(await request.read())
    for update in updates:
        frame = orjson.dumps({"update": update}).decode()
        for ws in subs.get(update["docKey"], ()):
            await ws.send_str(frame)
    return web.Response(text="ok")


def main() -> None:
    """Serve on BENCH_PORT until terminated."""
    app = web.Application(client_max_size=64 * 2**20)
    app[SUBSCRIBERS] = defaultdict(list)
    app.router.add_get("/", ready)
    app.router.add_get("/v1/sync", sync)
    app.router.add_post("/publish", publish)
    web.run_app(app, host="127.0.0.1", port=int(os.environ["BENCH_PORT"]), print=None, backlog=4096)


if __name__ == "__main__":
    main()
