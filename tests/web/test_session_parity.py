"""The TypeScript ClientSession decides exactly as the Python one: hypothesis drives both
with the same operations and server frames (proto3 JSON) and compares every answer — events,
frames to send, reconnect decisions, errors — and the whole state after each step.

The TypeScript session is a port (the clients run in different languages); this test is what
keeps the two one decision instead of two that drift apart.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oa_sync_core.errors import ProtocolError
from oa_sync_core.protocol.backoff import BackoffPolicy
from oa_sync_core.protocol.client_session import (
    ClientSession,
    DocumentChanged,
    GiveUp,
    SubscriptionReset,
    SubscriptionSynced,
)
from oa_sync_core.protocol.wire import WireFormat, decode_server, encode_client

from tests.web.browser import JS_PACKAGE, build_js, npm_ready

SIDS = ("s1", "s2", "s3")
TOPICS = {"s1": ["runtime/run_summary:*"], "s2": ["a", "b"], "s3": ["c"]}
EPOCHS = ("e1", "e2")
HASH = "ab" * 32
NOW = 1_000.0
# exp far ahead, iat now: a JWT shape both sessions read the same way (signature unused).
TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJpYXQiOjEwMDAsImV4cCI6OTk5OTk5OTk5OX0.c2ln"


@pytest.fixture(scope="module")
def replay() -> Iterator[subprocess.Popen[str]]:
    """The Node process replaying operations on the TypeScript session."""
    npm_ready()
    asyncio.run(build_js())
    with subprocess.Popen(
        ["node", "build/test/session-replay.js"],  # noqa: S607
        cwd=JS_PACKAGE,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:  # the with block closes both pipes and waits
        yield proc
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=20)


def _ts(proc: subprocess.Popen[str], op: dict[str, Any]) -> dict[str, Any]:
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.write(json.dumps(op) + "\n")
    proc.stdin.flush()
    answer: dict[str, Any] = json.loads(proc.stdout.readline())
    return answer


def _plain(value: Any) -> Any:
    """proto3 JSON without defaults (writers may or may not spell out "", "0", [], false)."""
    if isinstance(value, dict):
        kept = {k: _plain(v) for k, v in value.items()}
        return {k: v for k, v in kept.items() if v not in ("", "0", 0, [], {}, False, None)}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _event(event: Any) -> dict[str, Any]:
    sid = event.subscription_id
    if isinstance(event, DocumentChanged):
        d = event.doc
        return {
            "type": "changed",
            "sid": sid,
            "doc": [d.doc_key, d.version, d.watermark, d.content_hash],
        }
    if isinstance(event, SubscriptionReset):
        return {"type": "reset", "sid": sid, "reason": event.reason, "epoch": event.epoch}
    if isinstance(event, SubscriptionSynced):
        return {"type": "synced", "sid": sid, "watermark": event.watermark, "epoch": event.epoch}
    return {
        "type": "error",
        "sid": sid,
        "code": event.code,
        "message": event.message,
        "fatal": event.fatal,
    }


def _frames(frames: list[Any]) -> list[Any]:
    return [_plain(json.loads(encode_client(f, WireFormat.JSON))) for f in frames]


def _snapshot(session: ClientSession) -> dict[str, Any]:
    subs = {}
    for sid in session.subscription_ids():
        docs = {
            k: [d.version, d.watermark, d.content_hash] for k, d in session.documents(sid).items()
        }
        position = session.position(sid)
        subs[sid] = {
            "docs": docs,
            "position": None if position is None else [position.epoch, position.watermark],
            "synced": session.is_synced(sid),
        }
    s = session.stats
    return {
        "state": session.state.value,
        "stats": {
            "connections": s.connections,
            "snapshots": s.snapshots,
            "resumes": s.resumes,
            "resets": s.resets,
            "updates": s.updates,
            "repeatsDropped": s.repeats_dropped,
            "tokenRefreshes": s.token_refreshes,
        },
        "attempts": session.backoff.attempts,
        "lastWatermarkSeen": session.last_watermark_seen,
        "subs": subs,
    }


def _py(session: ClientSession, op: dict[str, Any]) -> dict[str, Any]:
    try:
        kind = op["op"]
        out: dict[str, Any] = {}
        if kind == "token":
            out = {"frames": _frames(session.set_token(op["token"], now=op["now"]))}
        elif kind == "subscribe":
            _, frames = session.subscribe(op["topics"], subscription_id=op["sid"])
            out = {"frames": _frames(frames)}
        elif kind == "unsubscribe":
            out = {"frames": _frames(session.unsubscribe(op["sid"]))}
        elif kind == "connecting":
            session.connecting()
        elif kind == "opened":
            out = {"frames": _frames(session.opened(now=op["now"]))}
        elif kind == "receive":
            frame = decode_server(op["frame"], WireFormat.JSON, max_bytes=1 << 20)
            events, frames = session.receive(frame)
            out = {"events": [_event(e) for e in events], "frames": _frames(frames)}
        elif kind == "closed":
            d = session.closed(op["code"])
            if isinstance(d, GiveUp):
                out = {"decision": {"type": "give_up", "code": d.code}}
            else:
                out = {
                    "decision": {"type": "reconnect", "refresh": d.refresh_token, "code": d.code}
                }
        elif kind == "close":
            session.close()
        result: dict[str, Any] = {"ok": out}
    except ProtocolError as exc:
        result = {"error": f"protocol:{exc.code}"}
    except ValueError:
        result = {"error": "value"}
    return result | {"snapshot": _snapshot(session)}


_wm = st.integers(0, 30)
_sid = st.sampled_from(SIDS)
_epoch = st.sampled_from(EPOCHS)
_server_frame = st.one_of(
    st.builds(
        lambda e, w, h: {
            "welcome": {"sessionId": "x", "epoch": e, "watermark": str(w), "heartbeatIntervalMs": h}
        },
        _epoch,
        _wm,
        st.sampled_from([0, 15000]),
    ),
    st.builds(
        lambda s, k, v, w: {
            "update": {
                "subscriptionId": s,
                "docKey": k,
                "projection": "p",
                "version": str(v),
                "watermark": str(w),
                "contentHash": HASH,
                "document": {"v": v},
            }
        },
        _sid,
        st.sampled_from(["a", "b", "c"]),
        st.integers(1, 6),
        _wm,
    ),
    st.builds(
        lambda s, w, e: {"synced": {"subscriptionId": s, "watermark": str(w), "epoch": e}},
        _sid,
        _wm,
        _epoch,
    ),
    st.builds(
        lambda s, e: {"reset": {"subscriptionId": s, "reason": "epoch_changed", "epoch": e}},
        _sid,
        _epoch,
    ),
    st.builds(
        lambda s, c: {"error": {"code": c, "message": "m", "subscriptionId": s}},
        _sid,
        st.sampled_from(["forbidden", "too_many_topics", "unknown_subscription", "x"]),
    ),
    st.builds(lambda w: {"heartbeat": {"watermark": str(w)}}, _wm),
    st.just({"pong": {"nonce": "n"}}),
)
_receive = st.builds(lambda f: {"op": "receive", "frame": json.dumps(f)}, _server_frame)
_op = st.one_of(
    _receive,
    _receive,
    _receive,
    st.builds(lambda s: {"op": "subscribe", "sid": s, "topics": TOPICS[s]}, _sid),
    st.builds(lambda s: {"op": "unsubscribe", "sid": s}, _sid),
    st.just({"op": "connecting"}),
    st.just({"op": "opened", "now": NOW}),
    st.builds(
        lambda c: {"op": "closed", "code": c},
        st.sampled_from(
            [None, 1000, 1001, 1002, 1003, 1006, 1008, 1011, 4400, 4401, 4403, 4408, 4413, 4429]
        ),
    ),
    st.just({"op": "close"}),
)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    prefix=st.sampled_from([1, 5, 5, 5]),
    max_attempts=st.sampled_from([None, 1, 3]),
    ops=st.lists(
        st.one_of(_op, _op, _op, st.just({"op": "token", "token": TOKEN, "now": NOW})), max_size=40
    ),
)
def test_the_typescript_session_decides_as_the_python_one(
    replay: subprocess.Popen[str],
    prefix: int,
    max_attempts: int | None,
    ops: list[dict[str, Any]],
) -> None:
    """Every operation answers the same in both sessions and leaves the same state."""
    session = ClientSession(backoff=BackoffPolicy(max_attempts=max_attempts))
    _ts(replay, {"op": "new", "maxAttempts": max_attempts})
    welcome = {"welcome": {"sessionId": "x", "epoch": "e1", "watermark": "3"}}
    opening = [
        {"op": "token", "token": TOKEN, "now": NOW},
        {"op": "subscribe", "sid": "s1", "topics": TOPICS["s1"]},
        {"op": "connecting"},
        {"op": "opened", "now": NOW},
        {"op": "receive", "frame": json.dumps(welcome)},
    ]
    for op in [*opening[:prefix], *ops]:
        expected = _py(session, op)
        got = _ts(replay, op)
        assert got == expected, f"after {op}"
