"""The HTTP API over a real socket and Postgres: append, documents, polling, ops endpoints,
and every documented error status with a JSON body and never a traceback."""

from __future__ import annotations

import io
from typing import Any

import aiohttp
import orjson
import sqlalchemy as sa
from oa_sync_server.config import Limits
from oa_sync_server.postgres.tables import sync_meta

from tests.live import LiveServer, make_live_server


def run_event(event_type: str, run_id: str, **fields: Any) -> dict[str, Any]:
    """A proto3 JSON ``AppendEvent`` on stream ``run:<run_id>``."""
    return {"streamId": f"run:{run_id}", "type": event_type, "payload": {"runId": run_id, **fields}}


def auth(token: str) -> dict[str, str]:
    """An Authorization header."""
    return {"Authorization": f"Bearer {token}"}


async def call(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    token: str | None = None,
    body: Any = None,
    raw: bytes | None = None,
    params: Any = None,
) -> tuple[int, Any]:
    """One request; returns the status and the decoded JSON body (checked to be JSON)."""
    data = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
    headers = auth(token) if token else {}
    if data is not None:
        headers["Content-Type"] = "application/json"
    async with session.request(method, url, data=data, headers=headers, params=params) as resp:
        text = await resp.read()
        assert resp.content_type == "application/json", text[:200]
        assert b"Traceback" not in text
        return resp.status, orjson.loads(text)


async def test_append_then_read_document_and_changes(live_server: LiveServer) -> None:
    """An HTTP append is projected; /v1/docs and /v1/changes show it with string int64s."""
    token = live_server.token()
    async with aiohttp.ClientSession(live_server.url) as s:
        status, body = await call(
            s,
            "POST",
            "/v1/events",
            token=token,
            body={
                "events": [
                    run_event("run.created", "r1", agentId="a1"),
                    run_event("run.started", "r1") | {"expectedSeq": "1", "idempotencyKey": "k2"},
                ]
            },
        )
        assert status == 200
        assert len(body["positions"]) == 2
        assert all(isinstance(p, str) for p in body["positions"])
        await live_server.settle()
        status, doc = await call(s, "GET", "/v1/docs/runtime/run_summary:r1", token=token)
        assert status == 200
        assert doc["docKey"] == "runtime/run_summary:r1"
        assert doc["version"] == "2"
        assert doc["document"]["runId"] == "r1"
        assert len(doc["contentHash"]) == 64
        status, page = await call(
            s, "GET", "/v1/changes", token=token, params={"topic": "runtime/run_summary:*"}
        )
        assert status == 200
        assert [c["docKey"] for c in page["changes"]] == ["runtime/run_summary:r1"]
        assert page["changes"][0]["version"] == "2"
        assert page["nextAfter"] == doc["watermark"]
        assert page["epoch"]
        # Idempotent replay returns the original position and writes nothing.
        status, again = await call(
            s,
            "POST",
            "/v1/events",
            token=token,
            body={"events": [run_event("run.started", "r1") | {"idempotencyKey": "k2"}]},
        )
        assert status == 200
        assert again["positions"] == body["positions"][1:]


async def test_changes_pages_are_coalesced_and_filtered_by_grant(live_server: LiveServer) -> None:
    """/v1/changes pages by watermark, one row per document at its latest version, and a topic
    wider than the grant only yields granted documents."""
    await live_server.append([run_event("run.created", f"r{i}") for i in range(5)])
    await live_server.append([run_event("run.started", "r0"), run_event("run.started", "r3")])
    await live_server.settle()
    token = live_server.token(topics=["runtime/run_summary:*"])
    seen: list[dict[str, Any]] = []
    after = "0"
    async with aiohttp.ClientSession(live_server.url) as s:
        while True:
            status, page = await call(
                s,
                "GET",
                "/v1/changes",
                token=token,
                params={"topic": "*", "after": after, "limit": "2"},
            )
            assert status == 200
            seen += page["changes"]
            after = page["nextAfter"]
            if not page["hasMore"]:
                break
        assert sorted(c["docKey"] for c in seen) == [f"runtime/run_summary:r{i}" for i in range(5)]
        marks = [int(c["watermark"]) for c in seen]
        assert marks == sorted(marks)
        assert {c["docKey"]: c["version"] for c in seen}["runtime/run_summary:r3"] == "2"
        narrow = live_server.token(topics=["runtime/run_summary:r1"])
        status, page = await call(s, "GET", "/v1/changes", token=narrow, params={"topic": "*"})
        assert [c["docKey"] for c in page["changes"]] == ["runtime/run_summary:r1"]
        status, page = await call(
            s, "GET", "/v1/changes", token=token, params={"topic": "*", "after": after}
        )
        assert status == 200
        assert page["changes"] == []
        assert page["nextAfter"] == after


async def test_stale_polling_position_answers_reset(live_server: LiveServer) -> None:
    """A different epoch, or a watermark older than the retained log, answers 410 ``reset``."""
    token = live_server.token()
    async with aiohttp.ClientSession(live_server.url) as s:
        status, body = await call(
            s, "GET", "/v1/changes", token=token, params={"topic": "*", "epoch": "other"}
        )
        assert status == 410
        assert body["error"]["code"] == "reset"
        assert body["error"]["epoch"]
        async with live_server.engine.begin() as conn:
            await conn.execute(
                sa.update(sync_meta).where(sync_meta.c.key == "retained_from").values(value="50")
            )
        status, body = await call(
            s, "GET", "/v1/changes", token=token, params={"topic": "*", "after": "10"}
        )
        assert status == 410
        assert body["error"]["code"] == "reset"


async def test_auth_errors_are_401_and_403(live_server: LiveServer) -> None:
    """No, malformed, wrong-key and expired tokens give 401; a missing scope or topic 403."""
    other = make_token_with_other_secret()
    expired = live_server.token(ttl_s=-600)
    read_only = live_server.token(scopes=["sync:read"])
    narrow = live_server.token(topics=["runtime/run_summary:r1"])
    batch = {"events": [run_event("run.created", "r1")]}
    async with aiohttp.ClientSession(live_server.url) as s:
        for token in (None, "not-a-jwt", other, expired):
            status, body = await call(s, "POST", "/v1/events", token=token, body=batch)
            assert status == 401
            assert body["error"]["code"] == "unauthenticated"
            status, body = await call(s, "GET", "/v1/docs/runtime/run_summary:r1", token=token)
            assert status == 401
        async with s.get("/v1/changes", headers={"Authorization": "Basic abc"}) as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"] == "Bearer"
        status, body = await call(s, "POST", "/v1/events", token=read_only, body=batch)
        assert status == 403
        assert body["error"]["code"] == "forbidden"
        status, body = await call(s, "GET", "/v1/docs/runtime/run_summary:r2", token=narrow)
        assert status == 403
        status, body = await call(
            s,
            "GET",
            "/v1/changes",
            token=narrow,
            params={"topic": "runtime/codex_worker_summary:*"},
        )
        assert status == 403
    metrics = live_server.state.metrics
    assert metrics.auth_failures.labels(reason="expired")._value.get() >= 1


def make_token_with_other_secret() -> str:
    """A well-formed token signed with a key the server does not know."""
    from oa_sync_server.auth import mint_token

    return mint_token("x" * 48, subject="intruder", topics=["*"], scopes=["sync:append"])


async def test_bad_requests_are_400_with_index_and_field(live_server: LiveServer) -> None:
    """Malformed JSON, unknown fields and invalid events give 400 naming the event and field."""
    token = live_server.token()
    async with aiohttp.ClientSession(live_server.url) as s:
        status, body = await call(s, "POST", "/v1/events", token=token, raw=b"{not json")
        assert status == 400
        assert body["error"]["code"] == "malformed"
        status, body = await call(s, "POST", "/v1/events", token=token, body={"evts": []})
        assert status == 400
        status, body = await call(s, "POST", "/v1/events", token=token, body={"events": []})
        assert status == 400
        assert body["error"]["field"] == "events"
        bad = {
            "events": [
                run_event("run.created", "r1"),
                {"streamId": "run:r2", "type": "run.created", "payload": {"runId": "r3"}},
            ]
        }
        status, body = await call(s, "POST", "/v1/events", token=token, body=bad)
        assert status == 400
        assert body["error"]["index"] == 1
        assert body["error"]["field"] == "payload.runId"
        unknown = {"events": [run_event("run.created", "r1") | {"colour": "red"}]}
        status, body = await call(s, "POST", "/v1/events", token=token, body=unknown)
        assert status == 400
        assert body["error"]["index"] == 0
        status, body = await call(
            s, "GET", "/v1/changes", token=token, params={"topic": "*", "limit": "0"}
        )
        assert status == 400
        assert body["error"]["field"] == "limit"
        status, body = await call(s, "GET", "/v1/changes", token=token)
        assert status == 400
        assert body["error"]["field"] == "topic"
        status, body = await call(
            s, "GET", "/v1/changes", token=token, params={"topic": "bad topic!"}
        )
        assert status == 400
        async with s.get(
            "/v1/changes", params={"topic": "*", "after": "-1"}, headers=auth(token)
        ) as r:
            assert r.status == 400
    async with live_server.engine.connect() as conn:
        count = (await conn.execute(sa.text("SELECT count(*) FROM oa_sync.events"))).scalar()
    assert count == 0  # nothing of a refused batch was written


async def test_sequence_conflict_is_409_and_missing_document_404(live_server: LiveServer) -> None:
    """A wrong expectedSeq answers 409; an absent document or route answers 404 in JSON."""
    token = live_server.token()
    async with aiohttp.ClientSession(live_server.url) as s:
        ok = {"events": [run_event("run.created", "r1") | {"expectedSeq": "0"}]}
        assert (await call(s, "POST", "/v1/events", token=token, body=ok))[0] == 200
        conflict = {"events": [run_event("run.started", "r1") | {"expectedSeq": "5"}]}
        status, body = await call(s, "POST", "/v1/events", token=token, body=conflict)
        assert status == 409
        assert body["error"]["code"] == "conflict"
        status, body = await call(s, "GET", "/v1/docs/runtime/run_summary:nope", token=token)
        assert status == 404
        assert body["error"]["code"] == "not_found"
        status, body = await call(s, "GET", "/v1/nothing-here", token=token)
        assert status == 404


async def test_oversized_body_is_413(database_url: str) -> None:
    """A body over OA_SYNC_MAX_BODY_BYTES answers 413 before anything is parsed."""
    async with make_live_server(database_url, limits=Limits(max_body_bytes=2048)) as server:
        token = server.token()
        big = {"events": [run_event("run.created", "r1", agentId="x" * 4000)]}
        async with aiohttp.ClientSession(server.url) as s:
            status, body = await call(s, "POST", "/v1/events", token=token, body=big)
            assert status == 413
            assert body["error"]["code"] == "too_large"

            async def chunks() -> Any:
                yield b'{"events": ['
                for _ in range(100):
                    yield b" " * 100
                yield b"]}"

            headers = auth(token) | {"Content-Type": "application/json"}
            async with s.post("/v1/events", data=chunks(), headers=headers) as resp:
                assert resp.status == 413


async def test_health_readiness_and_metrics(live_server: LiveServer) -> None:
    """/healthz and /readyz answer 200 (database up, projector caught up); /metrics is
    Prometheus text with the request counter and projector lag."""
    async with aiohttp.ClientSession(live_server.url) as s:
        async with s.get("/healthz") as resp:
            assert resp.status == 200
        await live_server.append([run_event("run.created", "r1")])
        await live_server.settle()
        async with s.get("/readyz") as resp:
            body = await resp.json()
            assert resp.status == 200
            assert body["database"] is True
            assert body["projectorLagEvents"] == 0
        async with s.get("/metrics") as resp:
            text = await resp.text()
            assert resp.status == 200
            assert "oa_sync_projector_lag_events 0.0" in text
            assert 'oa_sync_http_requests_total{route="/readyz",status="200"}' in text


async def test_unexpected_failure_is_a_bare_500(live_server: LiveServer) -> None:
    """A database failure inside a handler answers 500 ``internal`` without any detail."""
    token = live_server.token()
    async with live_server.engine.begin() as conn:
        await conn.execute(sa.text("ALTER TABLE oa_sync.documents RENAME TO documents_gone"))
    async with aiohttp.ClientSession(live_server.url) as s:
        status, body = await call(s, "GET", "/v1/docs/runtime/run_summary:r1", token=token)
    assert status == 500
    assert body == {"error": {"code": "internal", "message": "internal error"}}


async def test_cors_only_for_allowed_origins(database_url: str) -> None:
    """A listed Origin gets a preflight answer and Access-Control-Allow-Origin (SSE included);
    any other Origin gets no CORS headers."""
    origins = ("https://app.example",)
    async with make_live_server(database_url, allowed_origins=origins) as server:
        token = server.token()
        good = {"Origin": "https://app.example"}
        async with aiohttp.ClientSession(server.url) as s:
            preflight = good | {"Access-Control-Request-Method": "GET"}
            async with s.options("/v1/changes", headers=preflight) as resp:
                assert resp.status == 204
                assert "Authorization" in resp.headers["Access-Control-Allow-Headers"]
            params = {"topic": "*"}
            async with s.get("/v1/changes", params=params, headers=good | auth(token)) as resp:
                assert resp.status == 200
                assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
            async with s.get("/v1/stream", params=params, headers=good | auth(token)) as resp:
                assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
            evil = {"Origin": "https://evil.example"}
            async with s.get("/v1/changes", params=params, headers=evil | auth(token)) as resp:
                assert "Access-Control-Allow-Origin" not in resp.headers
            async with s.options(
                "/v1/changes", headers=evil | {"Access-Control-Request-Method": "GET"}
            ) as resp:
                assert resp.status == 405


async def test_readyz_is_503_while_the_projector_lags(database_url: str) -> None:
    """With no projector running and an event older than the readiness bound, /readyz is 503
    and reports the lag; /healthz stays 200."""
    async with make_live_server(database_url, run_projector=False) as server:
        await server.append([run_event("run.created", "r1")])
        async with server.engine.begin() as conn:
            await conn.execute(
                sa.text("UPDATE oa_sync.events SET recorded_at = now() - interval '5 minutes'")
            )
        async with aiohttp.ClientSession(server.url) as s:
            async with s.get("/readyz") as resp:
                body = await resp.json()
                assert resp.status == 503
                assert body["status"] == "lagging"
                assert body["projectorLagEvents"] == 1
                assert body["projectorLagSeconds"] >= 290
            async with s.get("/healthz") as resp:
                assert resp.status == 200


async def test_append_over_the_event_limit_is_413_naming_it(database_url: str) -> None:
    """A POST with more events than OA_SYNC_MAX_APPEND_EVENTS answers 413 naming the limit,
    appends nothing and counts the breach; a batch at the limit is accepted."""
    async with make_live_server(database_url, limits=Limits(max_append_events=2)) as server:
        token = server.token()
        events = [run_event("run.created", f"r{i}") for i in range(3)]
        async with aiohttp.ClientSession(server.url) as s:
            status, body = await call(s, "POST", "/v1/events", token=token, body={"events": events})
            assert status == 413
            assert body["error"]["code"] == "too_large"
            assert "at most 2 events" in body["error"]["message"]
            status, body = await call(
                s, "POST", "/v1/events", token=token, body={"events": events[:2]}
            )
            assert status == 200
            assert len(body["positions"]) == 2
            async with s.get("/metrics") as resp:
                text = await resp.text()
    assert 'oa_sync_limit_breaches_total{kind="append_events"} 1.0' in text


async def test_append_refuses_any_body_but_json_with_415(live_server: LiveServer) -> None:
    """POST /v1/events with text/plain, a form, XML or no Content-Type answers 415
    ``unsupported_media_type`` and appends nothing; ``application/json; charset=utf-8`` is taken."""
    token = live_server.token()
    body = orjson.dumps({"events": [run_event("run.created", "r1")]})
    async with aiohttp.ClientSession(live_server.url) as s:
        for media_type in (
            "text/plain",
            "application/x-www-form-urlencoded",
            "application/xml",
            None,
        ):
            headers = auth(token) | ({"Content-Type": media_type} if media_type else {})
            # skip_auto_headers: aiohttp would otherwise declare application/octet-stream.
            async with s.post(
                "/v1/events", data=body, headers=headers, skip_auto_headers=["Content-Type"]
            ) as resp:
                assert resp.status == 415, media_type
                error = (await resp.json())["error"]
                assert error["code"] == "unsupported_media_type"
                assert "application/json" in error["message"]
        async with live_server.engine.connect() as conn:
            count = sa.select(sa.func.count()).select_from(sa.text("oa_sync.events"))
            assert (await conn.execute(count)).scalar_one() == 0
        headers = auth(token) | {"Content-Type": "application/json; charset=utf-8"}
        async with s.post("/v1/events", data=body, headers=headers) as resp:
            assert resp.status == 200


async def test_413_is_counted_and_names_the_limit_as_an_integer(live_server: LiveServer) -> None:
    """A body over the default 1 MiB limit answers 413 whose message prints 1048576 (not
    1.04858e+06) and counts in ``oa_sync_limit_breaches_total{kind="body_size"}``; too many
    topics count under ``topics``."""
    token = live_server.token()
    big = {"events": [run_event("run.created", "r1", agentId="x" * 1_100_000)]}
    headers = auth(token) | {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(live_server.url) as s:
        data = io.BytesIO(orjson.dumps(big))
        async with s.post("/v1/events", data=data, headers=headers) as resp:
            assert resp.status == 413
            body = await resp.json()
        assert body["error"]["message"] == "body_size limit of 1048576 exceeded"
        topics = [("topic", f"t{i}") for i in range(33)]
        status, _ = await call(s, "GET", "/v1/changes", token=token, params=topics)
        assert status == 400
        async with s.get("/metrics") as resp:
            text = await resp.text()
    assert 'oa_sync_limit_breaches_total{kind="body_size"} 1.0' in text
    assert 'oa_sync_limit_breaches_total{kind="topics"} 1.0' in text


async def test_405_names_the_allowed_methods(live_server: LiveServer) -> None:
    """A method a path does not serve answers 405 with an ``Allow`` header listing the ones
    it does."""
    async with aiohttp.ClientSession(live_server.url) as s:
        status, body = await call(s, "PUT", "/v1/events", body={})
        assert status == 405
        assert body["error"]["code"] == "method_not_allowed"
        async with s.delete("/v1/changes") as resp:
            assert resp.status == 405
            assert set(resp.headers["Allow"].split(",")) >= {"GET"}
        async with s.put("/v1/events") as resp:
            assert resp.headers["Allow"] == "POST"


async def test_cors_exposes_www_authenticate_and_retry_after(database_url: str) -> None:
    """An allowed Origin's responses carry ``Access-Control-Expose-Headers`` naming
    ``WWW-Authenticate`` and ``Retry-After``, so a page can read why it was refused."""
    origins = ("https://app.example",)
    async with (
        make_live_server(database_url, allowed_origins=origins) as server,
        aiohttp.ClientSession(server.url) as s,
    ):
        headers = {"Origin": "https://app.example"}
        async with s.get("/v1/changes", params={"topic": "*"}, headers=headers) as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"] == "Bearer"
            exposed = resp.headers["Access-Control-Expose-Headers"]
    assert {h.strip() for h in exposed.split(",")} >= {"WWW-Authenticate", "Retry-After"}
