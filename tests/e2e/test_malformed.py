"""A hypothesis campaign of malformed client frames against a live server.

Each generated frame goes on its own authenticated connection; the server must close that
connection with the documented code (docs/security.md) within a bounded time, while a
bystander connection keeps being served, and the server holds no more connections, tasks or
memory afterwards than before.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
from typing import Any

import psutil
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oa_sync_server.config import Limits

from tests.e2e import raw_ws
from tests.live import LiveServer, make_live_server
from tests.profiles import DERANDOMIZE, examples

MAX_MESSAGE_BYTES = 4096
CLOSE_WITHIN_S = 2.0
EXAMPLES = 120
KINDS = ("authenticate", "subscribe", "unsubscribe", "ping")


@dataclasses.dataclass(frozen=True)
class Bad:
    """One malformed frame and the close code it must get."""

    what: str
    data: str | bytes
    code: int


def text(what: str, data: str, code: int = 4400) -> Bad:
    return Bad(what, data, code)


_wrong_for_string = st.one_of(
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
_wrong_for_list = st.one_of(
    st.text(max_size=5),
    st.integers(),
    st.lists(st.one_of(st.integers(), st.booleans(), st.lists(st.text(max_size=2))), min_size=1),
    st.dictionaries(st.text(max_size=3), st.text(max_size=3), min_size=1, max_size=2),
)


@st.composite
def wrong_types(draw: st.DrawFn) -> Bad:
    kind = draw(st.sampled_from(KINDS))
    if kind == "subscribe":
        body: dict[str, Any] = {"subscriptionId": "s", "topics": ["*"]}
        field = draw(st.sampled_from(["subscriptionId", "topics", "resume"]))
        if field == "topics":
            body[field] = draw(_wrong_for_list)
        elif field == "resume":
            body[field] = draw(
                st.one_of(
                    _wrong_for_list,
                    st.fixed_dictionaries({"epoch": _wrong_for_string, "watermark": st.just("1")}),
                    st.fixed_dictionaries(
                        {
                            "epoch": st.just("e"),
                            "watermark": st.one_of(st.booleans(), st.lists(st.integers())),
                        }
                    ),
                )
            )
        else:
            body[field] = draw(_wrong_for_string)
    else:
        field = {"authenticate": "token", "unsubscribe": "subscriptionId", "ping": "nonce"}[kind]
        body = {field: draw(_wrong_for_string)}
    whole = draw(
        st.one_of(st.just(body), _wrong_for_string.filter(lambda v: not isinstance(v, dict)))
    )
    return text(f"wrong type in {kind}", json.dumps({kind: whole}))


@st.composite
def unknown_kinds(draw: st.DrawFn) -> Bad:
    choice = draw(st.integers(0, 3))
    if choice == 0:
        kind = draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in KINDS))
        return text("unknown kind", json.dumps({kind: {}}))
    if choice == 1:
        a, b = draw(st.lists(st.sampled_from(KINDS), min_size=2, max_size=2, unique=True))
        return text("two kinds", json.dumps({a: {}, b: {}}))
    if choice == 2:
        return text(
            "unknown field",
            json.dumps({"ping": {"nonce": "n", draw(st.sampled_from(["x", "Nonce", "extra"])): 1}}),
        )
    return text("no kind", "{}")


_RESUME = '{"subscribe": {"subscriptionId": "s", "topics": ["*"], "resume": %s}}'


@st.composite
def numbers(draw: st.DrawFn) -> Bad:
    special = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e400"]))
    huge = str(draw(st.integers(min_value=2**64, max_value=10**300)))
    value = draw(st.sampled_from([special, huge]))
    frame = draw(
        st.sampled_from(
            [
                '{"ping": {"nonce": VALUE}}',
                _RESUME % '{"epoch": "e", "watermark": VALUE}',
                _RESUME % f'{{"epoch": "e", "watermark": "{huge}"}}',
            ]
        )
    )
    return text("bad number", frame.replace("VALUE", value))


@st.composite
def nesting(draw: st.DrawFn) -> Bad:
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    room = (MAX_MESSAGE_BYTES - 40) // (len(opener) + len(closer))
    depth = draw(st.integers(min_value=40, max_value=room))
    inner = opener * depth + "1" + closer * depth
    return text("deep nesting", '{"ping": {"nonce": ' + inner + "}}")


@st.composite
def surrogates(draw: st.DrawFn) -> Bad:
    lone = draw(st.sampled_from(["\\ud800", "\\udfff", "\\ud83d", "a\\udc00b"]))
    field = draw(
        st.sampled_from(
            [
                '{"ping": {"nonce": "%s"}}',
                '{"subscribe": {"subscriptionId": "%s", "topics": ["*"]}}',
            ]
        )
    )
    return text("lone surrogate", field % lone)


def not_a_frame(data: str) -> bool:
    try:
        value = json.loads(data)
    except ValueError:
        return True
    return not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in KINDS


malformed = st.one_of(
    st.text(max_size=200).filter(not_a_frame).map(lambda t: text("not json", t)),
    st.binary(max_size=200).map(lambda b: Bad("binary on the json subprotocol", b, 4400)),
    wrong_types(),
    unknown_kinds(),
    numbers(),
    nesting(),
    surrogates(),
    st.integers(MAX_MESSAGE_BYTES + 1, MAX_MESSAGE_BYTES * 4).map(
        lambda n: text("oversized", '{"ping": {"nonce": "' + "x" * n + '"}}', 4413)
    ),
    st.integers(MAX_MESSAGE_BYTES + 1, MAX_MESSAGE_BYTES * 4).map(
        lambda n: Bad("oversized binary", b"\x00" * n, 4413)
    ),
)


async def close_code_for(server: LiveServer, token: str, bad: Bad) -> tuple[int | None, float]:
    """Send ``bad`` on a fresh authenticated connection; the close code and how long it took."""
    async with raw_ws.session(server.ws_url, token) as client:
        loop = asyncio.get_running_loop()
        started = loop.time()
        if isinstance(bad.data, bytes):
            await client.send_bytes(bad.data)
        else:
            await client.send_text(bad.data)
        code = await client.close_code(within_s=CLOSE_WITHIN_S * 2)
        return code, loop.time() - started


def campaign(loop: asyncio.AbstractEventLoop, server: LiveServer, token: str) -> int:
    """Run the hypothesis campaign from a worker thread, each example on the server's loop."""
    seen = 0

    @settings(
        max_examples=examples(EXAMPLES),
        deadline=None,
        database=None,
        derandomize=DERANDOMIZE,
        suppress_health_check=list(HealthCheck),
    )
    @given(bad=malformed)
    def check(bad: Bad) -> None:
        nonlocal seen
        future = asyncio.run_coroutine_threadsafe(close_code_for(server, token, bad), loop)
        code, elapsed = future.result(timeout=30)
        assert code == bad.code, (bad.what, bad.data[:200], code)
        assert elapsed < CLOSE_WITHIN_S, (bad.what, elapsed)
        seen += 1

    check()
    return seen


async def wait_until_connections(server: LiveServer, count: int) -> None:
    gauge = server.state.metrics.registry.get_sample_value
    async with asyncio.timeout(10):
        while (gauge("oa_sync_connections", {"transport": "ws"}) or 0) != count:  # noqa: ASYNC110
            await asyncio.sleep(0.02)  # a gauge has no event: poll, bounded above


async def wait_until_tasks_at_most(count: int, within_s: float = 5.0) -> None:
    try:
        async with asyncio.timeout(within_s):
            while len(asyncio.all_tasks()) > count:  # noqa: ASYNC110
                await asyncio.sleep(0.02)  # tasks ending have no event: poll, bounded above
    except TimeoutError:
        pending = [task.get_coro() for task in asyncio.all_tasks()]
        raise AssertionError(f"tasks still running after {within_s}s: {pending}") from None


async def test_malformed_frames_close_with_their_code_and_harm_no_one(database_url: str) -> None:
    """Every malformed frame closes only its own connection, with its code, promptly."""
    limits = Limits(
        max_message_bytes=MAX_MESSAGE_BYTES, messages_per_second=1000, message_burst=1000
    )
    async with make_live_server(database_url, limits=limits) as server:
        token = server.token()
        async with raw_ws.session(server.ws_url, server.token(subject="bystander")) as bystander:
            assert await bystander.snapshot("b", ["runtime/run_summary:*"]) == []
            # Warm up so one-off allocations (codecs, pools) are not counted as growth.
            await close_code_for(server, token, text("warm-up", "{"))
            await wait_until_connections(server, 1)
            gc.collect()
            rss_before = psutil.Process().memory_info().rss
            tasks_before = len(asyncio.all_tasks())

            loop = asyncio.get_running_loop()
            seen = await asyncio.to_thread(campaign, loop, server, token)
            assert seen >= EXAMPLES // 2

            await wait_until_connections(server, 1)
            gc.collect()
            growth = psutil.Process().memory_info().rss - rss_before
            assert growth < 64 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB"
            # A closed connection's handler task ends a moment after the gauge drops: wait
            # for that (bounded), so only tasks that never end count as leaked.
            await wait_until_tasks_at_most(tasks_before + 2)
            # The bystander was never disturbed and is still served live.
            await server.append(
                [{"streamId": "run:r1", "type": "run.created", "payload": {"runId": "r1"}}]
            )
            frames, update = await bystander.until("update")
            assert update["docKey"] == "runtime/run_summary:r1"
            assert frames == []
            await bystander.ping()


async def test_malformed_before_authentication(live_server: LiveServer) -> None:
    """Malformed frames before authenticate close 4400; a text frame on the proto one too."""
    for data in ("{", "[]", '{"ping": {"nonce": NaN}}', b"\x00\x01"):
        async with raw_ws.connect(live_server.ws_url) as client:
            if isinstance(data, bytes):
                await client.send_bytes(data)
            else:
                await client.send_text(data)
            assert await client.close_code(within_s=5) == 4400, data
    async with raw_ws.connect(live_server.ws_url, protocols=("oa-sync.v1.proto",)) as client:
        await client.send_text('{"ping": {"nonce": "n"}}')
        assert await client.close_code(within_s=5) == 4400


async def test_transport_level_violations_close_the_connection(live_server: LiveServer) -> None:
    """A compressed (RSV1) frame without negotiation and invalid UTF-8 text close 4400."""
    async with raw_ws.session(live_server.ws_url, live_server.token()) as client:
        bomb = json.dumps({"ping": {"nonce": "0" * 1_000_000}}).encode()
        await client.ws._writer.send_frame(bomb, 0x1, compress=15)
        assert await client.close_code(within_s=5) == 4400
    async with raw_ws.session(live_server.ws_url, live_server.token()) as client:
        await client.ws._writer.send_frame(b'{"ping": {"nonce": "\xed\xa0\x80"}}', 0x1)
        assert await client.close_code(within_s=5) == 4400
