"""The HTTP sink against a real aiohttp receiver on a real port and a real Postgres.

The receiver (:class:`Receiver`) verifies each request's signature, records every attempt
(monotonic arrival time, idempotency key, body) and applies each idempotency key's effect at
most once, like a well-behaved legacy endpoint; a script decides how the next requests are
answered. Documents and change rows are written directly (:func:`put_document`), as the
projector worker would write them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
from aiohttp import web
from oa_sync_core.codec import canonical_json, content_hash
from oa_sync_core.projectors import RUN_SUMMARY, WORKER_SUMMARY
from oa_sync_core.sinks import DocumentUpdate
from oa_sync_server.cli import main
from oa_sync_server.config import HttpSinkSettings, Secret, Settings, SinkKind
from oa_sync_server.errors import ConfigError
from oa_sync_server.metrics import Metrics
from oa_sync_server.postgres.tables import changes, documents
from oa_sync_server.sinks import (
    HttpDeliveryClient,
    HttpDeliveryLoop,
    HttpSinkOptions,
    RetryPolicy,
    compute_parity,
    list_dead_letters,
    plan_sinks,
    start_sink,
)
from oa_sync_server.sinks.http import (
    DeliveryRejectedError,
    HttpSink,
    is_retryable_status,
    parse_retry_after,
)
from oa_sync_server.sinks.parity import ParityMetrics
from oa_sync_server.sinks.signing import signature_headers, verify_signature
from oa_sync_server.sinks.tables import http_sink_checkpoints
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.live import make_live_server

SECRET = "s3cret-s3cret-s3cret-s3cret-s3cret!"

OK = "ok"
DROP_AFTER_COMMIT = "drop_after_commit"
Action = str
"""``ok``; ``drop_after_commit`` (apply the effect, then drop the connection unanswered);
``status:<code>`` (answer that status with body ``refused <code>``); ``429:<seconds>``
(answer 429 with ``Retry-After``)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Attempt:
    """One request that reached the receiver."""

    at: float
    key: str
    body: bytes
    signed: bool


class Receiver:
    """The legacy endpoint stand-in (see the module docstring)."""

    def __init__(self, secret: str = SECRET) -> None:
        self.secret = secret.encode()
        self.script: list[Action] = []
        self.attempts: list[Attempt] = []
        self.effects: dict[str, dict[str, Any]] = {}
        self.effect_count = 0
        self.echo_hash: dict[str, str] = {}
        self.url = ""
        self.changed = asyncio.Condition()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        signed = verify_signature(self.secret, request.headers, body, now=time.time())
        key = request.headers.get("Idempotency-Key", "")
        async with self.changed:
            self.attempts.append(Attempt(time.monotonic(), key, body, signed))
            self.changed.notify_all()
        if not signed:
            return web.Response(status=401, text="bad signature")
        action = self.script.pop(0) if self.script else OK
        if action.startswith("status:"):
            code = int(action.split(":")[1])
            return web.Response(status=code, text=f"refused {code}")
        if action.startswith("429:"):
            return web.Response(status=429, headers={"Retry-After": action.split(":")[1]})
        payload = json.loads(body)
        if key not in self.effects:
            self.effects[key] = payload
            self.effect_count += 1
        if action == DROP_AFTER_COMMIT:
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=200)
        echoed = self.echo_hash.get(payload["docKey"], payload["contentHash"])
        return web.json_response({"contentHash": echoed})

    async def wait_for(self, attempts: int) -> None:
        """Wait (at most 10 s) until at least ``attempts`` requests have arrived."""
        async with self.changed:
            await asyncio.wait_for(
                self.changed.wait_for(lambda: len(self.attempts) >= attempts), 10.0
            )


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A :class:`Receiver` serving on 127.0.0.1 on a free port."""
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/mutations", receiver._handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.Server)
    port = server.sockets[0].getsockname()[1]
    receiver.url = f"http://127.0.0.1:{port}/mutations"
    try:
        yield receiver
    finally:
        await runner.cleanup()


async def put_document(
    engine: AsyncEngine,
    doc_key: str,
    version: int,
    body: dict[str, Any] | None = None,
    *,
    projection: str = RUN_SUMMARY,
) -> int:
    """Upsert a document and append its change row as the projector would; its watermark."""
    body = body if body is not None else {"runId": doc_key.rsplit(":", 1)[-1], "v": version}
    digest = content_hash(canonical_json(body))
    async with engine.begin() as conn:
        last = sa.select(sa.func.max(documents.c.watermark)).union_all(
            sa.select(sa.func.max(changes.c.watermark))
        )
        watermark = max(int(w or 0) for w in (await conn.execute(last)).scalars()) + 1
        values = {
            "doc_key": doc_key,
            "projection": projection,
            "version": version,
            "watermark": watermark,
            "content_hash": digest,
            "body": body,
            "updated_at": sa.func.clock_timestamp(),
        }
        await conn.execute(sa.delete(documents).where(documents.c.doc_key == doc_key))
        await conn.execute(sa.insert(documents).values(**values))
        await conn.execute(
            sa.insert(changes).values(
                watermark=watermark,
                doc_key=doc_key,
                projection=projection,
                version=version,
                content_hash=digest,
                committed_at=sa.func.clock_timestamp(),
            )
        )
    return watermark


FAST = RetryPolicy(base_s=0.01, cap_s=0.05, max_attempts=6)


def options(url: str, *, secret: str = SECRET, retry: RetryPolicy = FAST) -> HttpSinkOptions:
    """Sink options for the test receiver with millisecond backoff."""
    return HttpSinkOptions(
        url=url, secret=Secret(secret), connect_timeout_s=2.0, read_timeout_s=5.0, retry=retry
    )


async def deliver(engine: AsyncEngine, url: str, **kwargs: Any) -> Any:
    """One delivery pass of a fresh loop against ``url``."""
    async with HttpDeliveryClient(options(url, **kwargs), rng=random.Random(7)) as client:
        return await HttpDeliveryLoop(engine, client).deliver_pending()


async def checkpoint(engine: AsyncEngine) -> int:
    """The HTTP lane's delivered watermark."""
    t = http_sink_checkpoints
    async with engine.connect() as conn:
        return int((await conn.execute(sa.select(t.c.last_watermark))).scalar_one())


def sink_env(monkeypatch: pytest.MonkeyPatch, database_url: str, url: str) -> None:
    """Environment of an ``oa-sync`` command run against the test database and receiver."""
    monkeypatch.setenv("OA_SYNC_DATABASE_URL", database_url)
    monkeypatch.setenv("OA_SYNC_SINK", "tee")
    monkeypatch.setenv("OA_SYNC_HTTP_SINK_URL", url)
    monkeypatch.setenv("OA_SYNC_HTTP_SINK_SECRET", SECRET)
    monkeypatch.setenv("OA_SYNC_HTTP_SINK_BACKOFF_BASE_S", "0.01")
    monkeypatch.setenv("OA_SYNC_HTTP_SINK_MAX_ATTEMPTS", "3")


async def test_500_three_times_then_200_is_delivered_once_with_one_key(
    engine: AsyncEngine, receiver: Receiver
) -> None:
    """Three 500s then a 200: four attempts, one idempotency key, one effect, checkpoint moved."""
    watermark = await put_document(engine, "runtime/run_summary:r1", 3)
    receiver.script = ["status:500", "status:500", "status:500"]
    result = await deliver(engine, receiver.url)
    assert result.delivered == 1
    assert [a.key for a in receiver.attempts] == ["runtime/run_summary:r1:3"] * 4
    assert len({a.body for a in receiver.attempts}) == 1
    assert all(a.signed for a in receiver.attempts)
    assert receiver.effect_count == 1
    assert await checkpoint(engine) == watermark
    again = await deliver(engine, receiver.url)
    assert (again.delivered, len(receiver.attempts)) == (0, 4)


async def test_response_lost_after_commit_is_recognised_by_its_key(
    engine: AsyncEngine, receiver: Receiver
) -> None:
    """Receiver applies, then drops the connection: the retry has the same key, no second effect."""
    await put_document(engine, "runtime/run_summary:r2", 1)
    receiver.script = [DROP_AFTER_COMMIT]
    result = await deliver(engine, receiver.url)
    assert result.delivered == 1
    assert [a.key for a in receiver.attempts] == ["runtime/run_summary:r2:1"] * 2
    assert receiver.effect_count == 1


async def test_429_retry_after_delays_the_next_attempt(
    engine: AsyncEngine, receiver: Receiver
) -> None:
    """``429`` with ``Retry-After: 2``: the next attempt arrives at least 2 s later."""
    await put_document(engine, "runtime/run_summary:r3", 1)
    receiver.script = ["429:2"]
    result = await deliver(engine, receiver.url)
    assert result.delivered == 1
    first, second = receiver.attempts
    assert second.at - first.at >= 2.0
    assert first.key == second.key


async def test_400_goes_to_dead_letters_and_cli_retry_resends(
    engine: AsyncEngine,
    receiver: Receiver,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A 400 is dead-lettered with its body, passed over, and ``dead-letters retry`` re-sends it."""
    await put_document(engine, "runtime/run_summary:bad", 2)
    last = await put_document(engine, "runtime/run_summary:good", 1)
    receiver.script = ["status:400"]
    result = await deliver(engine, receiver.url)
    assert (result.dead_lettered, result.delivered) == (1, 1)
    assert await checkpoint(engine) == last
    (letter,) = await list_dead_letters(engine)
    assert (letter.doc_key, letter.version, letter.status) == ("runtime/run_summary:bad", 2, 400)
    assert letter.response_body == "refused 400"
    assert (await deliver(engine, receiver.url)).delivered == 0  # not re-sent by the loop

    sink_env(monkeypatch, database_url, receiver.url)
    assert await asyncio.to_thread(main, ["dead-letters", "list"]) == 0
    assert "refused 400" in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["dead-letters", "retry"]) == 0
    assert "runtime/run_summary:bad: delivered" in capsys.readouterr().out
    assert await list_dead_letters(engine) == []
    assert receiver.attempts[-1].key == "runtime/run_summary:bad:2"
    assert set(receiver.effects) == {"runtime/run_summary:bad:2", "runtime/run_summary:good:1"}


async def test_receiver_verifies_signature_and_refuses_a_tampered_body(
    engine: AsyncEngine, receiver: Receiver
) -> None:
    """Signed deliveries verify; the headers over a tampered body, or a wrong secret, do not."""
    await put_document(engine, "runtime/run_summary:r4", 1)
    await deliver(engine, receiver.url)
    (good,) = receiver.attempts
    assert good.signed
    tampered = good.body.replace(b'"version":1', b'"version":9')
    assert tampered != good.body
    headers = {
        **signature_headers(SECRET.encode(), int(time.time()), good.body),
        "Idempotency-Key": good.key,
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(receiver.url, data=tampered, headers=headers) as response,
    ):
        assert response.status == 401
    assert not receiver.attempts[-1].signed
    assert receiver.effect_count == 1
    now = time.time()
    assert not verify_signature(b"x" * 32, headers, good.body, now=now)
    odd = {**headers, "X-OA-Sync-Timestamp": "\u00b2"}
    assert not verify_signature(SECRET.encode(), odd, good.body, now=now)
    stale = signature_headers(SECRET.encode(), int(now) - 3600, good.body)
    assert not verify_signature(SECRET.encode(), stale, good.body, now=now)

    await put_document(engine, "runtime/run_summary:r5", 1)
    result = await deliver(engine, receiver.url, secret="w" * 40)
    assert result.dead_lettered == 1
    assert receiver.effect_count == 1


async def test_older_version_never_follows_a_newer_one(
    engine: AsyncEngine, receiver: Receiver
) -> None:
    """Three changes before a pass go out once, at the latest version, even if pruned."""
    for version in (1, 2, 3):
        await put_document(engine, "runtime/run_summary:r6", version)
    async with engine.begin() as conn:  # retention pruned the change rows meanwhile
        await conn.execute(sa.delete(changes))
    result = await deliver(engine, receiver.url)
    assert (result.delivered, result.skipped) == (1, 0)
    await put_document(engine, "runtime/run_summary:r6", 4)
    await deliver(engine, receiver.url)
    assert [a.key for a in receiver.attempts] == [
        "runtime/run_summary:r6:3",
        "runtime/run_summary:r6:4",
    ]


async def test_parity_reports_one_diverged_document_exactly(
    engine: AsyncEngine,
    receiver: Receiver,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """One document stored differently by the shadow lane is named, counted, exported; exit 1."""
    await put_document(engine, "runtime/run_summary:a", 2)
    await put_document(engine, "runtime/run_summary:b", 1)
    await put_document(engine, "runtime/codex_worker_summary:w", 5, projection=WORKER_SUMMARY)
    await deliver(engine, receiver.url)
    sink_env(monkeypatch, database_url, receiver.url)
    assert (await compute_parity(engine)).in_parity
    assert await asyncio.to_thread(main, ["parity"]) == 0
    assert "in parity" in capsys.readouterr().out

    receiver.echo_hash["runtime/run_summary:b"] = "f" * 64
    await put_document(engine, "runtime/run_summary:b", 2)
    await deliver(engine, receiver.url)
    report = await compute_parity(engine)
    assert not report.in_parity
    (divergence,) = report.divergences
    assert (divergence.doc_key, divergence.kind) == ("runtime/run_summary:b", "hash_mismatch")
    assert (divergence.primary_version, divergence.shadow_version) == (2, 2)
    assert divergence.shadow_hash == "f" * 64
    runs, workers = report.projections[1], report.projections[0]
    assert (runs.projection, runs.hash_mismatches, runs.behind) == (RUN_SUMMARY, 1, 0)
    assert (runs.primary_documents, runs.shadow_documents) == (2, 2)
    assert workers.in_parity

    assert await asyncio.to_thread(main, ["parity", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["inParity"] is False
    assert [d["docKey"] for d in out["divergences"]] == ["runtime/run_summary:b"]

    metrics = Metrics()
    ParityMetrics(metrics.registry).update(report)
    text = metrics.render()[0].decode()
    assert f'oa_sync_parity_hash_mismatches{{projection="{RUN_SUMMARY}"}} 1.0' in text
    assert "oa_sync_parity_in_parity 0.0" in text


async def test_behind_documents_are_counted_with_their_version_gap(
    engine: AsyncEngine, receiver: Receiver
) -> None:
    """A document two versions ahead of the shadow lane is reported behind by 2."""
    await put_document(engine, "runtime/run_summary:c", 1)
    await deliver(engine, receiver.url)
    await put_document(engine, "runtime/run_summary:c", 3)
    report = await compute_parity(engine)
    (runs,) = report.projections
    assert (runs.behind, runs.versions_behind, runs.max_versions_behind) == (1, 2, 2)
    assert [d.kind for d in report.divergences] == ["behind"]


def test_misconfigured_sink_fails_with_one_line_naming_the_variable() -> None:
    """Bad sink settings raise ConfigError naming the variable; postgres/noop need nothing."""
    base = {"OA_SYNC_SINK": "http", "OA_SYNC_HTTP_SINK_SECRET": SECRET}
    with pytest.raises(ConfigError, match=r"^OA_SYNC_HTTP_SINK_URL: "):
        Settings.from_env(base)
    env = {**base, "OA_SYNC_HTTP_SINK_URL": "http://127.0.0.1:1/x"}
    settings = Settings.from_env(env)
    bad = {**env, "OA_SYNC_HTTP_SINK_MAX_ATTEMPTS": "lots"}
    with pytest.raises(ConfigError, match=r"^OA_SYNC_HTTP_SINK_MAX_ATTEMPTS: ") as caught:
        plan_sinks(settings, bad)
    assert "\n" not in str(caught.value)
    assert plan_sinks(settings, env).runs_http_lane
    noop = plan_sinks(Settings.from_env({"OA_SYNC_SINK": "noop"}), {})
    assert (noop.kind, noop.runs_http_lane) == (SinkKind.NOOP, False)


async def test_start_sink_delivers_in_the_background_and_stops(
    engine: AsyncEngine, receiver: Receiver
) -> None:
    """In tee mode start_sink runs the loop until exit and refreshes the parity gauges."""
    env = {"OA_SYNC_SINK": "tee", "OA_SYNC_HTTP_SINK_URL": receiver.url}
    settings = Settings.from_env({**env, "OA_SYNC_HTTP_SINK_SECRET": SECRET})
    metrics = Metrics()
    async with start_sink(
        settings, engine, metrics=metrics, environ=env, poll_interval_s=0.05, parity_refresh_s=0
    ) as runtime:
        assert runtime.plan.is_parity_run
        await put_document(engine, "runtime/run_summary:bg", 1)
        await receiver.wait_for(1)
    assert runtime.loop is not None
    assert receiver.effect_count == 1
    assert runtime.parity is not None
    text = metrics.render()[0].decode()
    assert f'oa_sync_parity_documents{{lane="shadow",projection="{RUN_SUMMARY}"}} 1.0' in text
    assert 'oa_sync_http_sink_deliveries_total{outcome="delivered"} 1.0' in text
    async with start_sink(Settings.from_env({}), engine) as idle:
        assert idle.loop is None
    with pytest.raises(ConfigError, match=r"^OA_SYNC_HTTP_SINK_CONNECT_TIMEOUT_S: "):
        async with start_sink(
            settings, engine, environ={"OA_SYNC_HTTP_SINK_CONNECT_TIMEOUT_S": "0"}
        ):
            pass


async def test_exhausted_retries_block_the_pass_until_the_receiver_recovers(
    engine: AsyncEngine, receiver: Receiver
) -> None:
    """503s past the budget stop the pass before that change; the next pass delivers it."""
    first = await put_document(engine, "runtime/run_summary:d1", 1)
    await put_document(engine, "runtime/run_summary:d2", 1)
    receiver.script = ["ok"] + ["status:503"] * 3
    result = await deliver(engine, receiver.url, retry=RetryPolicy(base_s=0.001, max_attempts=3))
    assert result.delivered == 1
    assert result.blocked is not None
    assert "HTTP 503" in result.blocked
    assert await checkpoint(engine) == first
    (divergence,) = (await compute_parity(engine)).divergences
    assert (divergence.doc_key, divergence.last_error) == ("runtime/run_summary:d2", "HTTP 503")
    again = await deliver(engine, receiver.url)
    assert (again.delivered, again.blocked) == (1, None)
    assert (await compute_parity(engine)).in_parity
    assert receiver.effect_count == 2


async def test_one_deliverer_per_sink(engine: AsyncEngine, receiver: Receiver) -> None:
    """While one pass holds the sink's lock, a second loop's pass does nothing."""
    await put_document(engine, "runtime/run_summary:e", 1)
    receiver.script = ["429:1"]
    async with HttpDeliveryClient(options(receiver.url)) as client:
        holder = asyncio.create_task(HttpDeliveryLoop(engine, client).deliver_pending())
        await receiver.wait_for(1)
        second = await HttpDeliveryLoop(engine, client).deliver_pending()
        assert second.locked_out
        assert (await holder).delivered == 1
    assert receiver.effect_count == 1


def test_retry_after_parsing_and_backoff_bounds() -> None:
    """Retry-After in seconds or as an HTTP date; backoff stays within its jittered ceiling."""
    assert parse_retry_after("2", now=0.0) == 2.0
    assert parse_retry_after("Thu, 01 Jan 1970 00:00:10 GMT", now=4.0) == 6.0
    assert parse_retry_after("soon", now=0.0) is None
    assert parse_retry_after("\u00b2", now=0.0) is None  # a digit, but not an ASCII one
    assert parse_retry_after(None, now=0.0) is None
    policy = RetryPolicy(base_s=0.5, cap_s=4.0)
    rng = random.Random(1)
    for attempt in range(1, 10):
        assert 0.0 <= policy.delay(attempt, None, rng) <= min(4.0, 0.5 * 2 ** (attempt - 1))
    assert policy.delay(1, 2.0, rng) >= 2.0
    assert policy.delay(1, 10_000.0, rng) == policy.max_retry_after_s
    assert not is_retryable_status(404)
    assert all(is_retryable_status(s) for s in (408, 429, 500, 503))


async def test_library_http_sink_publishes_core_updates_once(receiver: Receiver) -> None:
    """The core-Sink wrapper POSTs new versions, skips replays, and raises on a refusal."""
    body = {"runId": "lib"}
    canonical = canonical_json(body)

    def update(version: int) -> DocumentUpdate:
        return DocumentUpdate(
            projection=RUN_SUMMARY,
            doc_key="runtime/run_summary:lib",
            version=version,
            body=body,
            canonical=canonical,
            content_hash=content_hash(canonical),
            last_position=version,
        )

    async with HttpDeliveryClient(options(receiver.url)) as client:
        sink = HttpSink(client)
        await sink.publish([update(1), update(2)])
        await sink.publish([update(2)])
        assert [a.key for a in receiver.attempts] == [
            "runtime/run_summary:lib:1",
            "runtime/run_summary:lib:2",
        ]
        receiver.script = ["status:422"]
        with pytest.raises(DeliveryRejectedError) as caught:
            await sink.publish([update(3)])
    assert (caught.value.status, caught.value.body) == (422, "refused 422")


async def test_tee_server_delivers_projected_documents_in_parity(
    database_url: str, engine: AsyncEngine, receiver: Receiver
) -> None:
    """A live server in tee mode projects appended events and the HTTP lane ends in parity."""
    http = HttpSinkSettings(url=receiver.url, secret=Secret(SECRET))
    async with make_live_server(
        database_url, sink=SinkKind.TEE, http_sink=http, poll_interval_s=0.05
    ) as server:
        await server.append(
            [
                {"streamId": "run:t1", "type": "run.created", "payload": {"runId": "t1"}},
                {"streamId": "run:t1", "type": "run.started", "payload": {"runId": "t1"}},
                {"streamId": "run:t2", "type": "run.created", "payload": {"runId": "t2"}},
            ]
        )
        await server.settle()
        async with receiver.changed:
            await asyncio.wait_for(
                receiver.changed.wait_for(
                    lambda: (
                        {"runtime/run_summary:t1:2", "runtime/run_summary:t2:1"}
                        <= set(receiver.effects)
                    )
                ),
                10.0,
            )
        async with (
            aiohttp.ClientSession(server.url) as session,
            session.get("/metrics") as response,
        ):
            assert "oa_sync_parity_in_parity" in await response.text()
    report = await compute_parity(engine)
    assert report.in_parity
    (runs,) = report.projections
    assert (runs.primary_documents, runs.shadow_documents) == (2, 2)
    assert receiver.effects["runtime/run_summary:t1:2"]["document"]["runId"] == "t1"
