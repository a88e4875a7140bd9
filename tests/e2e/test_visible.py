"""Read-your-writes on the server: ``POST /v1/events?wait=visible`` answers once the batch is
projected, with the watermark at which its documents became visible, or a clear 504."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
import sqlalchemy as sa
from oa_sync_client import AppendError, SubscriptionRefusedError, SyncClient
from oa_sync_server.postgres.tables import events

from tests.e2e.test_http import call, run_event
from tests.live import LiveServer, make_live_server


async def test_wait_visible_answers_the_watermark_of_the_batch_documents(
    live_server: LiveServer,
) -> None:
    """The answer comes after projection: the document is readable at once, at that watermark."""
    token = live_server.token()
    async with aiohttp.ClientSession(live_server.url) as s:
        for step in range(1, 4):
            batch = [run_event("run.created", "r1")] if step == 1 else []
            batch.append(run_event("run.step", "r1", stepIndex=step))
            batch.append(
                {"streamId": "worker:w9", "type": "worker.heartbeat", "payload": {"workerId": "w9"}}
            )
            status, body = await call(
                s,
                "POST",
                "/v1/events",
                token=token,
                body={"events": batch},
                params={"wait": "visible", "timeoutMs": "10000"},
            )
            assert status == 200, body
            watermark = int(body["visibleWatermark"])
            status, run = await call(s, "GET", "/v1/docs/runtime/run_summary:r1", token=token)
            assert status == 200
            assert run["document"]["stepCount"] == step
            status, worker = await call(
                s, "GET", "/v1/docs/runtime/codex_worker_summary:w9", token=token
            )
            assert status == 200
            assert watermark == max(int(run["watermark"]), int(worker["watermark"]))
            assert body["epoch"] == live_server.state.hub.epoch


async def test_wait_visible_for_a_batch_that_changes_no_document_is_zero(
    live_server: LiveServer,
) -> None:
    """Events no projector routes answer at once with visibleWatermark 0."""
    token = live_server.token()
    async with aiohttp.ClientSession(live_server.url) as s:
        status, body = await call(
            s,
            "POST",
            "/v1/events",
            token=token,
            body={"events": [{"streamId": "misc:1", "type": "misc.thing", "payload": {"a": 1}}]},
            params={"wait": "visible"},
        )
    assert status == 200, body
    assert body["visibleWatermark"] == "0"
    assert len(body["positions"]) == 1


async def test_wait_visible_times_out_with_504_and_the_positions(database_url: str) -> None:
    """Without a projector the wait ends at timeoutMs with 504 not_visible; the events stay."""
    async with make_live_server(database_url, run_projector=False) as server:
        async with aiohttp.ClientSession(server.url) as s:
            status, body = await call(
                s,
                "POST",
                "/v1/events",
                token=server.token(),
                body={"events": [run_event("run.created", "r2")]},
                params={"wait": "visible", "timeoutMs": "300"},
            )
        assert status == 504
        assert body["error"]["code"] == "not_visible"
        assert "300 ms" in body["error"]["message"]
        async with server.engine.connect() as conn:
            count = (await conn.execute(sa.select(sa.func.count()).select_from(events))).scalar()
        assert len(body["error"]["positions"]) == 1
        assert count == 1


async def test_wait_parameters_are_validated_before_anything_is_written(
    live_server: LiveServer,
) -> None:
    """A bad wait or timeoutMs is a 400 naming the parameter, and nothing is appended."""
    token = live_server.token()
    async with aiohttp.ClientSession(live_server.url) as s:
        for params, field in (
            ({"wait": "soon"}, "wait"),
            ({"wait": "visible", "timeoutMs": "0"}, "timeoutMs"),
            ({"wait": "visible", "timeoutMs": "600001"}, "timeoutMs"),
        ):
            status, body = await call(
                s,
                "POST",
                "/v1/events",
                token=token,
                body={"events": [run_event("run.created", "r3")]},
                params=params,
            )
            assert status == 400, body
            assert body["error"]["field"] == field
    async with live_server.engine.connect() as conn:
        count = (await conn.execute(sa.select(sa.func.count()).select_from(events))).scalar()
    assert count == 0


async def test_python_client_append_visible_shows_the_write_in_the_cache(
    live_server: LiveServer,
) -> None:
    """SyncClient.append(visible=True) returns with the new version already in the cache."""
    token = live_server.token()
    async with SyncClient(live_server.url, token) as client:
        sub = client.subscribe(["runtime/run_summary:*"])
        async with asyncio.timeout(20):
            await sub.wait_synced()
        for step in range(1, 6):
            event = (
                run_event("run.created", "v1")
                if step == 1
                else run_event("run.step", "v1", stepIndex=step)
            )
            result = await client.append([event], visible=True, timeout_s=10)
            doc = sub.documents["runtime/run_summary:v1"]
            assert doc.version == step
            assert result.visible_watermark is not None
            assert doc.watermark >= result.visible_watermark
            assert len(result.positions) == 1


async def test_python_client_append_errors_are_typed(database_url: str) -> None:
    """A refused append is an AppendError with the server's code; a wait that times out is
    not_visible with the positions of the events that were appended."""
    async with (
        make_live_server(database_url, run_projector=False) as server,
        SyncClient(server.url, server.token()) as client,
    ):
        with pytest.raises(AppendError) as refused:
            await client.append([run_event("run.created", "x", bogus=1)])
        assert refused.value.status == 400
        assert refused.value.positions == ()
        with pytest.raises(AppendError) as late:
            await client.append([run_event("run.created", "x")], visible=True, timeout_s=0.3)
        assert late.value.status == 504
        assert late.value.code == "not_visible"
        assert len(late.value.positions) == 1


async def test_append_visible_ignores_a_subscription_the_server_refused(
    live_server: LiveServer,
) -> None:
    """A refused subscription (outside the grant) does not hold a visible append back."""
    token = live_server.token(topics=["runtime/run_summary:*"])
    async with SyncClient(live_server.url, token) as client:
        refused = client.subscribe(["runtime/codex_worker_summary:*"])
        sub = client.subscribe(["runtime/run_summary:*"])
        async with asyncio.timeout(20):
            await sub.wait_synced()
            with pytest.raises(SubscriptionRefusedError):
                async for _ in refused:
                    pass
        result = await client.append([run_event("run.created", "g1")], visible=True, timeout_s=10)
        assert result.visible_watermark is not None
        assert sub.documents["runtime/run_summary:g1"].version == 1


async def test_wait_visible_on_a_replayed_idempotency_key_answers_the_original(
    live_server: LiveServer,
) -> None:
    """Replaying an append (same idempotency keys) with wait=visible answers the original
    positions and the watermark of their documents."""
    token = live_server.token()
    batch = {
        "events": [
            run_event("run.created", "i1") | {"idempotencyKey": "i1:1"},
            run_event("run.created", "i2") | {"idempotencyKey": "i2:1"},
        ]
    }
    params = {"wait": "visible", "timeoutMs": "10000"}
    async with aiohttp.ClientSession(live_server.url) as s:
        status, first = await call(s, "POST", "/v1/events", token=token, body=batch, params=params)
        assert status == 200, first
        status, again = await call(s, "POST", "/v1/events", token=token, body=batch, params=params)
        assert status == 200, again
    assert again["positions"] == first["positions"]
    assert again["visibleWatermark"] == first["visibleWatermark"] != "0"
