"""Tenant isolation: no topic spelling reaches another tenant's documents; refresh narrows."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from tests.e2e import raw_ws
from tests.live import LiveServer

RUN = "runtime/run_summary:"
ACME_KEYS = {f"{RUN}acme.r1", f"{RUN}acme.r2"}
EVIL_KEYS = {f"{RUN}evil.r1"}

# Topics an "evil" tenant (grant: runtime/run_summary:evil.*) might try to reach acme's keys.
HOSTILE_TOPICS = [
    f"{RUN}ACME.r1",  # case
    "RUNTIME/RUN_SUMMARY:acme.r1",
    f"{RUN}evil./../acme.r1",  # path traversal, kept literal
    f"{RUN}evil.r1/../../acme.r1",
    "runtime/./run_summary:acme.r1",
    f"{RUN}evil.*",  # their own wildcard
    f"{RUN}*",  # wider than the grant
    "runtime/*",
    "*",
    f"{RUN}acme.*",  # another tenant's wildcard
    f"{RUN}acme.r1",  # another tenant's exact key
]
REFUSED_TOPICS = [
    f"{RUN}acme%2Er1",  # percent-encoding is not decoded: '%' is not a topic character
    "runtime%2Frun_summary:acme.r1",
    f"{RUN}acme.r1\u0000",
    f"{RUN}acme.*.r1",  # '*' only at the end
    f"{RUN}acme.r1 ",
    f"{RUN}\uff41cme.r1",  # fullwidth letter a
]


def run_created(run_id: str) -> dict[str, Any]:
    return {"streamId": f"run:{run_id}", "type": "run.created", "payload": {"runId": run_id}}


def run_started(run_id: str) -> dict[str, Any]:
    return {"streamId": f"run:{run_id}", "type": "run.started", "payload": {"runId": run_id}}


async def seed(server: LiveServer) -> None:
    await server.append([run_created(r) for r in ("acme.r1", "acme.r2", "evil.r1", "shared.r1")])
    await server.settle()


def evil_token(server: LiveServer, *topics: str) -> str:
    return server.token(topics=topics or (f"{RUN}evil.*",), scopes=["sync:read"], subject="evil")


async def test_no_websocket_topic_reaches_another_tenant(live_server: LiveServer) -> None:
    """Case, traversal, wildcards and encodings in subscriptions never yield acme's documents."""
    await seed(live_server)
    async with raw_ws.session(live_server.ws_url, evil_token(live_server)) as client:
        for index, topic in enumerate(HOSTILE_TOPICS):
            sid = f"s{index}"
            await client.subscribe(sid, [topic])
            frames: list[tuple[str, dict[str, Any]]] = []
            while True:
                kind, body = await client.recv()
                if kind == "heartbeat":
                    continue
                frames.append((kind, body))
                if kind in ("synced", "error") and body.get("subscriptionId") in (sid, ""):
                    break
            keys = {body["docKey"] for kind, body in frames if kind == "update"}
            assert keys <= EVIL_KEYS, (topic, keys)
            if frames[-1][0] == "error":
                assert frames[-1][1]["code"] in ("forbidden", "invalid_subscription"), frames
        for index, topic in enumerate(REFUSED_TOPICS):
            await client.subscribe(f"r{index}", [topic])
            kind, body = await client.recv()
            assert kind == "error", (topic, kind, body)
            assert body["code"] in ("invalid_subscription", "forbidden"), (topic, body)
        # Live: acme's changes never arrive, evil's do.
        await live_server.append([run_started("acme.r1"), run_started("evil.r1")])
        live_keys = set()
        while True:
            kind, body = await client.recv()
            if kind == "update":
                live_keys.add(body["docKey"])
                if body["docKey"] == f"{RUN}evil.r1" and body["version"] == "2":
                    break
        assert live_keys == EVIL_KEYS
        await client.ping()


@pytest.mark.parametrize(
    "path",
    [
        f"/v1/docs/{RUN}acme.r1",
        f"/v1/docs/{RUN}ACME.r1",
        "/v1/docs/runtime%2Frun_summary%3Aacme.r1",
        f"/v1/docs/{RUN}evil.%2E%2E/acme.r1",
        f"/v1/docs/{RUN}evil.%2E%2E%2Facme.r1",
        f"/v1/docs/{RUN}evil.r1%2F..%2F..%2F{RUN}acme.r1",
        f"/v1/docs/{RUN}acme%2Er1",
    ],
)
async def test_no_http_document_path_reaches_another_tenant(
    live_server: LiveServer, path: str
) -> None:
    """GET /v1/docs with case, encodings and traversal answers 403 or 404, never acme's body."""
    await seed(live_server)
    headers = {"Authorization": f"Bearer {evil_token(live_server)}"}
    async with (
        aiohttp.ClientSession() as http,
        http.get(live_server.url + path, headers=headers) as response,
    ):
        body = await response.json()
    assert response.status in (403, 404), (path, response.status, body)
    assert "document" not in body


async def test_http_changes_stay_inside_the_grant(live_server: LiveServer) -> None:
    """GET /v1/changes with wide or foreign topics lists only the grant's documents."""
    await seed(live_server)
    headers = {"Authorization": f"Bearer {evil_token(live_server)}"}
    async with aiohttp.ClientSession() as http:
        for topic in ("*", "runtime/*", f"{RUN}*", f"{RUN}evil.*"):
            async with http.get(
                f"{live_server.url}/v1/changes", params={"topic": topic}, headers=headers
            ) as response:
                assert response.status == 200
                page = await response.json()
            assert {c["docKey"] for c in page.get("changes", [])} == EVIL_KEYS, topic
        for topic in (f"{RUN}acme.*", f"{RUN}ACME.r1", f"{RUN}acme%2Er1"):
            async with http.get(
                f"{live_server.url}/v1/changes", params={"topic": topic}, headers=headers
            ) as response:
                assert response.status in (400, 403), topic
                assert "changes" not in await response.json()


async def test_refreshed_token_with_fewer_topics_stops_the_lost_ones(
    live_server: LiveServer,
) -> None:
    """After re-authenticating with a narrower grant, lost topics get no more updates."""
    await seed(live_server)
    wide = evil_token(live_server, f"{RUN}evil.*", f"{RUN}shared.*")
    async with raw_ws.session(live_server.ws_url, wide) as client:
        wild = await client.snapshot("wild", [f"{RUN}*"])
        assert {u["docKey"] for u in wild} == EVIL_KEYS | {f"{RUN}shared.r1"}
        exact = await client.snapshot("exact", [f"{RUN}shared.r1"])
        assert [u["docKey"] for u in exact] == [f"{RUN}shared.r1"]

        await client.send({"authenticate": {"token": evil_token(live_server)}})
        # The exact subscription lost its only topic: a forbidden error names it.
        frames, error = await client.until("error")
        assert error["code"] == "forbidden"
        assert error["subscriptionId"] == "exact"
        assert all(kind != "update" for kind, _ in frames)

        # shared first, then evil: receiving evil's update proves shared's was not sent.
        await live_server.append([run_started("shared.r1")])
        await live_server.append([run_started("evil.r1")])
        frames, update = await client.until("update")
        assert update["docKey"] == f"{RUN}evil.r1"
        assert update["subscriptionId"] == "wild"
        assert all(kind != "update" for kind, _ in frames), frames
        await client.ping()


async def test_sse_snapshot_stays_inside_the_grant(live_server: LiveServer) -> None:
    """GET /v1/stream with wide topics sends only the grant's documents before synced."""
    await seed(live_server)
    headers = {"Authorization": f"Bearer {evil_token(live_server)}"}
    keys: set[str] = set()
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{live_server.url}/v1/stream", params={"topic": "*"}, headers=headers
        ) as response,
    ):
        assert response.status == 200
        async with asyncio.timeout(10):
            async for raw in response.content:
                line = raw.decode().rstrip("\n")
                if line == "event: synced":
                    break
                if line.startswith("data: ") and "docKey" in line:
                    keys.add(json.loads(line[len("data: ") :])["docKey"])
    assert keys == EVIL_KEYS
