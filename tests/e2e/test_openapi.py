"""The OpenAPI description is served and true: schemathesis against a live server."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from oa_sync_server.openapi import OPENAPI_PATH, document
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.live import LiveServer
from tests.profiles import DERANDOMIZE, examples

EXAMPLES_PER_OPERATION = 30
# Streams never end on their own: the SSE stream and the WebSocket are exercised by their own
# tests, not by a request/response fuzzer.
SKIPPED = frozenset({"/v1/stream", "/v1/sync"})
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def campaign(
    spec: dict[str, Any],
    base_url: str,
    headers: dict[str, str],
    mode: GenerationMode = GenerationMode.POSITIVE,
) -> list[str]:
    """Run every operation's generated cases; return the operations that were exercised.

    Positive cases fit the schema; negative ones break it (wrong types, missing required
    fields, bad bodies) and must be refused with a documented 4xx, never a 5xx.
    """
    schema = schemathesis.openapi.from_dict(spec)
    exercised = []
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()
            if operation.path in SKIPPED:
                continue

            @settings(
                max_examples=examples(EXAMPLES_PER_OPERATION),
                deadline=None,
                database=None,
                derandomize=DERANDOMIZE,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case: Any) -> None:
                response = case.call(
                    base_url=base_url, session=session, headers=headers, timeout=10
                )
                case.validate_response(response, checks=CHECKS)

            try:
                check()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE  # nothing to break: no inputs
                continue
            exercised.append(f"{operation.method.upper()} {operation.path}")
    return exercised


async def test_the_served_document_is_the_packaged_one(live_server: LiveServer) -> None:
    """GET /v1/openapi.json answers the OpenAPI 3.1 document, without a token."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(live_server.url + OPENAPI_PATH) as response,
    ):
        assert response.status == 200
        served = await response.json()
    assert served == document()
    assert served["openapi"] == "3.1.0"
    routes = {
        (route.method, route.resource.canonical)
        for route in live_server.app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    documented = {
        (method.upper(), path) for path, item in served["paths"].items() for method in item
    }
    assert routes == documented


async def test_schemathesis_finds_no_server_error_and_no_nonconformance(
    live_server: LiveServer,
) -> None:
    """Generated requests, with and without a token, get documented, conforming answers."""
    await live_server.append(
        [
            {"streamId": "run:r1", "type": "run.created", "payload": {"runId": "r1"}},
            {"streamId": "worker:w1", "type": "worker.started", "payload": {"workerId": "w1"}},
        ]
    )
    await live_server.settle()
    async with (
        aiohttp.ClientSession() as http,
        http.get(live_server.url + OPENAPI_PATH) as response,
    ):
        spec = await response.json()
    token = live_server.token(topics=["*"], scopes=["sync:read", "sync:append"])
    async with asyncio.timeout(90):
        with_token = await asyncio.to_thread(
            campaign, spec, live_server.url, {"Authorization": f"Bearer {token}"}
        )
        without = await asyncio.to_thread(campaign, spec, live_server.url, {})
        negative = await asyncio.to_thread(
            campaign,
            spec,
            live_server.url,
            {"Authorization": f"Bearer {token}"},
            GenerationMode.NEGATIVE,
        )
    assert "POST /v1/events" in with_token
    assert "GET /v1/changes" in with_token
    assert with_token == without
    assert {"POST /v1/events", "GET /v1/changes", "GET /v1/docs/{doc_key}"} <= set(negative)
