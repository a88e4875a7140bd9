"""The sans-IO server session: transition tables and a hypothesis state machine.

The tables pin each decision of :mod:`oa_sync_core.protocol.server_session` (auth, limits, resume,
catch-up, live, heartbeats); the state machine drives a session against a model change log with
random interleavings of appends, deliveries, subscriptions, catch-ups and token refreshes, and
checks that a client following the session's output never sees an older version after a newer
one, never sees a document outside its grant, and converges to the log.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from oa_sync_core.errors import ProtocolError
from oa_sync_core.protocol.codes import CloseCode
from oa_sync_core.protocol.server_session import (
    Action,
    CancelCatchUp,
    CatchUp,
    Close,
    Credentials,
    Send,
    SendUpdate,
    ServerSession,
    SessionLimits,
    SessionState,
    VerifyToken,
)
from oa_sync_core.protocol.wire import (
    Authenticate,
    ErrorFrame,
    Heartbeat,
    Ping,
    Pong,
    Reset,
    Resume,
    Subscribe,
    Synced,
    Unsubscribe,
    Welcome,
)
from oa_sync_core.topics import Grant

from tests.profiles import examples


@dataclasses.dataclass(frozen=True, slots=True)
class Doc:
    """A document version as the session sees it."""

    doc_key: str
    version: int
    watermark: int


@dataclasses.dataclass(frozen=True, slots=True)
class Meta:
    """Change-log metadata."""

    epoch: str
    watermark: int
    retained_from: int = 0


RUN_A = "runtime/run_summary:a"
RUN_B = "runtime/run_summary:b"
WORKER = "runtime/codex_worker_summary:w"
LIMITS = SessionLimits(
    auth_deadline_s=10,
    idle_timeout_s=60,
    heartbeat_interval_s=15,
    max_subscriptions=3,
    max_topics_per_subscription=3,
    messages_per_second=10,
    message_burst=5,
)


def creds(*patterns: str, expires_at: float = 1000.0, subject: str = "u") -> Credentials:
    """Credentials granting ``patterns``."""
    return Credentials(subject=subject, grant=Grant.parse(patterns), expires_at=expires_at)


def open_session(*patterns: str, now: float = 0.0) -> ServerSession[Doc]:
    """A session authenticated with a grant of ``patterns`` (default: everything)."""
    session: ServerSession[Doc] = ServerSession(LIMITS, now, session_id="s")
    assert session.receive(Authenticate("t"), now) == [VerifyToken("t")]
    session.authenticated(creds(*(patterns or ("*",))), now, epoch="e1", watermark=5)
    return session


def frames(actions: list[Action[Doc]]) -> list[Any]:
    """The frames of the Send actions."""
    return [a.frame for a in actions if isinstance(a, Send)]


def closes(actions: list[Action[Doc]]) -> list[tuple[int, str]]:
    """The (code, limit) of Close actions."""
    return [(a.code, a.limit) for a in actions if isinstance(a, Close)]


def state_of(session: ServerSession[Doc]) -> SessionState:
    """The session's state (read afresh: mypy would keep an earlier narrowing)."""
    return session.state


def ids_of(session: ServerSession[Doc]) -> tuple[str, ...]:
    """The session's subscription ids (read afresh)."""
    return session.subscription_ids


def subscribe(
    session: ServerSession[Doc], sid: str, *topics: str, now: float = 1.0
) -> list[Action[Doc]]:
    """Send a subscribe frame."""
    return session.receive(Subscribe(sid, tuple(topics)), now)


# -- auth ----------------------------------------------------------------------------------


def test_authenticate_then_welcome() -> None:
    """A valid token gives exactly one welcome with the epoch, watermark and heartbeat."""
    session: ServerSession[Doc] = ServerSession(LIMITS, 0.0, session_id="sid")
    assert session.receive(Authenticate("tok"), 1.0) == [VerifyToken("tok")]
    assert session.state is SessionState.VERIFYING
    out = session.authenticated(creds("*"), 1.0, epoch="e1", watermark=7)
    assert frames(out) == [
        Welcome(session_id="sid", epoch="e1", watermark=7, heartbeat_interval_ms=15000)
    ]
    assert state_of(session) is SessionState.OPEN


def test_no_authentication_in_time_closes_4408() -> None:
    """The auth deadline passing without a token closes with 4408."""
    session: ServerSession[Doc] = ServerSession(LIMITS, 0.0, session_id="s")
    assert session.next_deadline() == 10.0
    assert session.tick(9.9) == []
    assert closes(session.tick(10.0)) == [(CloseCode.TIMEOUT, "auth_deadline")]
    assert session.state is SessionState.CLOSED
    assert session.tick(11.0) == []
    assert session.receive(Ping("n"), 11.0) == []


@pytest.mark.parametrize(
    "frame", [Subscribe("s1", ("*",)), Unsubscribe("s1")], ids=["subscribe", "unsubscribe"]
)
def test_request_before_authentication_closes_4401(frame: Any) -> None:
    """Anything but authenticate or ping before authentication closes with 4401."""
    session: ServerSession[Doc] = ServerSession(LIMITS, 0.0, session_id="s")
    assert closes(session.receive(frame, 1.0)) == [(CloseCode.UNAUTHENTICATED, "")]


def test_ping_is_answered_before_authentication() -> None:
    """A ping gets its pong in any open state."""
    session: ServerSession[Doc] = ServerSession(LIMITS, 0.0, session_id="s")
    assert frames(session.receive(Ping("n1"), 1.0)) == [Pong(nonce="n1")]


def test_refused_token_closes_4401() -> None:
    """A token the driver refuses closes with 4401, first time or on refresh."""
    session: ServerSession[Doc] = ServerSession(LIMITS, 0.0, session_id="s")
    session.receive(Authenticate("bad"), 1.0)
    assert closes(session.auth_failed("expired", 1.0)) == [(CloseCode.UNAUTHENTICATED, "")]
    session = open_session()
    session.receive(Authenticate("bad"), 2.0)
    assert closes(session.auth_failed("bad_signature", 2.0)) == [(CloseCode.UNAUTHENTICATED, "")]


def test_token_expiry_closes_4401() -> None:
    """Without a refresh, the token's expiry closes the session with 4401."""
    session = open_session()
    assert session.next_deadline() == 15.0  # heartbeat first
    assert closes(session.tick(1000.0)) == [(CloseCode.UNAUTHENTICATED, "")]


def test_refresh_extends_expiry_in_place() -> None:
    """A refresh with a later expiry keeps the session and its subscriptions open."""
    session = open_session()
    subscribe(session, "s1", "*")
    session.receive(Authenticate("t2"), 900.0)
    assert (
        session.authenticated(creds("*", expires_at=5000.0), 900.0, epoch="e1", watermark=5) == []
    )
    assert session.tick(1000.0) == [Send(Heartbeat(watermark=5))]
    assert session.subscription_ids == ("s1",)


def test_refresh_for_another_subject_closes() -> None:
    """A refreshed token must speak for the same subject."""
    session = open_session()
    session.receive(Authenticate("t2"), 2.0)
    out = session.authenticated(creds("*", subject="other"), 2.0, epoch="e1", watermark=5)
    assert closes(out) == [(CloseCode.UNAUTHENTICATED, "")]


def test_refresh_with_fewer_topics_stops_the_lost_topics() -> None:
    """A narrower refreshed grant drops lost topics (forbidden error) and stops their data."""
    session = open_session("runtime/run_summary:*", WORKER)
    subscribe(session, "runs", RUN_B, "runtime/run_summary:*")
    subscribe(session, "both", "runtime/*")
    for serial in (1, 2):
        session.begin_catch_up(serial, Meta("e1", 5), 1.0)
        session.end_catch_up(serial, Meta("e1", 5), 1.0)
    session.receive(Authenticate("t2"), 2.0)
    out = session.authenticated(creds(RUN_A), 2.0, epoch="e1", watermark=5)
    assert [(f.code, f.subscription_id) for f in frames(out)] == [("forbidden", "runs")]
    assert session.subscription_ids == ("runs", "both")
    assert [t.text for t in session.topics_of("runs")] == ["runtime/run_summary:*"]
    live = session.on_live(Doc(RUN_B, 1, 6), 3.0) + session.on_live(Doc(WORKER, 1, 7), 3.0)
    assert live == []
    assert session.on_live(Doc(RUN_A, 1, 8), 3.0) == [
        SendUpdate("runs", Doc(RUN_A, 1, 8), live=True),
        SendUpdate("both", Doc(RUN_A, 1, 8), live=True),
    ]
    # A refresh that no longer reaches a subscription at all removes it.
    session.receive(Authenticate("t3"), 4.0)
    out = session.authenticated(creds(WORKER), 4.0, epoch="e1", watermark=8)
    assert [f.subscription_id for f in frames(out)] == ["runs"]
    assert ids_of(session) == ("both",)


def test_live_reaches_exact_and_prefix_subscriptions_in_creation_order() -> None:
    """A change goes to every subscription whose topics match, exact keys and prefixes alike,
    in the order the subscriptions were made, and no longer to one unsubscribed."""
    limits = dataclasses.replace(LIMITS, max_subscriptions=5, message_burst=10)
    session: ServerSession[Doc] = ServerSession(limits, 0.0, session_id="s")
    session.receive(Authenticate("t"), 0.0)
    session.authenticated(creds("*"), 0.0, epoch="e1", watermark=5)
    subscribe(session, "exact", RUN_A)
    subscribe(session, "prefix", "runtime/run_summary:*")
    subscribe(session, "other", WORKER)
    subscribe(session, "mixed", WORKER, RUN_A)
    subscribe(session, "both", RUN_B, "runtime/*")
    for serial in range(1, 6):
        session.begin_catch_up(serial, Meta("e1", 5), 1.0)
        session.end_catch_up(serial, Meta("e1", 5), 1.0)
    doc = Doc(RUN_A, 1, 6)
    assert session.on_live(doc, 2.0) == [
        SendUpdate(sid, doc, live=True) for sid in ("exact", "prefix", "mixed", "both")
    ]
    session.receive(Unsubscribe("prefix"), 3.0)
    session.receive(Unsubscribe("exact"), 3.0)
    doc = Doc(RUN_A, 2, 7)
    assert session.on_live(doc, 4.0) == [
        SendUpdate(sid, doc, live=True) for sid in ("mixed", "both")
    ]
    assert session.on_live(Doc(WORKER, 1, 8), 4.0) == [
        SendUpdate(sid, Doc(WORKER, 1, 8), live=True) for sid in ("other", "mixed", "both")
    ]


def test_refresh_never_widens_a_subscription() -> None:
    """A wider refreshed grant does not add documents to an existing subscription."""
    session = open_session(RUN_A)
    subscribe(session, "s", "runtime/*")
    session.begin_catch_up(1, Meta("e1", 5), 1.0)
    session.end_catch_up(1, Meta("e1", 5), 1.0)
    session.receive(Authenticate("t2"), 2.0)
    session.authenticated(creds("*"), 2.0, epoch="e1", watermark=5)
    assert session.on_live(Doc(RUN_B, 1, 6), 3.0) == []


# -- subscriptions -------------------------------------------------------------------------


def test_forbidden_topic_is_an_error_frame_not_a_close() -> None:
    """A topic outside the grant gives a forbidden error and no subscription."""
    session = open_session("runtime/run_summary:*")
    out = subscribe(session, "s1", RUN_A, WORKER)
    assert [(f.code, f.subscription_id) for f in frames(out)] == [("forbidden", "s1")]
    assert session.subscription_ids == ()
    assert session.state is SessionState.OPEN


def test_wider_pattern_only_yields_granted_documents() -> None:
    """A pattern wider than the grant is accepted but filtered to the grant."""
    session = open_session(RUN_A)
    out = subscribe(session, "s1", "*")
    assert isinstance(out[0], CatchUp)
    assert out[0].grant == Grant.parse([RUN_A])
    session.begin_catch_up(1, Meta("e1", 5), 1.0)
    rows = [Doc(RUN_A, 1, 1), Doc(RUN_B, 1, 2), Doc(WORKER, 1, 3)]
    assert session.catch_up_rows(1, rows, 1.0) == [SendUpdate("s1", rows[0])]


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (Subscribe("", ("*",)), "invalid_subscription"),
        (Subscribe("x" * 129, ("*",)), "invalid_subscription"),
        (Subscribe("s", ()), "invalid_subscription"),
        (Subscribe("s", ("a*b",)), "invalid_subscription"),
        (Subscribe("s", ("a", "b", "c", "d")), "too_many_topics"),
        (Unsubscribe("nope"), "unknown_subscription"),
    ],
)
def test_bad_requests_are_error_frames(frame: Any, code: str) -> None:
    """Invalid subscriptions are refused with an error frame; the session stays open."""
    session = open_session()
    assert [f.code for f in frames(session.receive(frame, 1.0))] == [code]
    assert session.state is SessionState.OPEN


def test_subscription_limits() -> None:
    """Duplicate ids and more than max_subscriptions are refused."""
    session = open_session()
    for sid in ("a", "b", "c"):
        assert isinstance(subscribe(session, sid, "*")[0], CatchUp)
    assert [f.code for f in frames(subscribe(session, "a", "*"))] == ["duplicate_subscription"]
    assert [f.code for f in frames(subscribe(session, "d", "*"))] == ["too_many_subscriptions"]


def test_unsubscribe_during_catch_up_cancels_it() -> None:
    """Unsubscribing a catching-up subscription cancels its catch-up; later results are void."""
    session = open_session()
    subscribe(session, "s", "*")
    assert session.receive(Unsubscribe("s"), 2.0) == [CancelCatchUp(1)]
    plan = session.begin_catch_up(1, Meta("e1", 5), 2.0)
    assert plan.cancelled
    assert session.catch_up_rows(1, [Doc(RUN_A, 1, 1)], 2.0) == []
    assert session.end_catch_up(1, Meta("e1", 5), 2.0) == []


def test_begin_catch_up_twice_is_a_protocol_error() -> None:
    """The driver may begin a catch-up once."""
    session = open_session()
    subscribe(session, "s", "*")
    session.begin_catch_up(1, Meta("e1", 5), 1.0)
    with pytest.raises(ProtocolError):
        session.begin_catch_up(1, Meta("e1", 5), 1.0)


# -- resume and catch-up -------------------------------------------------------------------


def test_reset_then_snapshot_then_synced() -> None:
    """A refused resume sends reset before the snapshot, then synced."""
    session = open_session()
    session.receive(Subscribe("s", ("*",), Resume("old", 3)), 1.0)
    plan = session.begin_catch_up(1, Meta("e2", 9), 1.0)
    assert plan.after is None
    assert frames(plan.actions) == [Reset(subscription_id="s", reason="epoch_changed", epoch="e2")]
    assert session.catch_up_rows(1, [Doc(RUN_A, 2, 9)], 1.0) == [SendUpdate("s", Doc(RUN_A, 2, 9))]
    assert frames(session.end_catch_up(1, Meta("e2", 9), 1.0)) == [
        Synced(subscription_id="s", watermark=9, epoch="e2")
    ]


def test_live_during_catch_up_is_buffered_and_deduplicated() -> None:
    """Live changes during catch-up follow synced, coalesced, only if newer than the snapshot."""
    session = open_session()
    subscribe(session, "s", "*")
    session.begin_catch_up(1, Meta("e1", 10), 1.0)
    assert session.on_live(Doc(RUN_A, 3, 9), 1.0) == []  # already in the snapshot
    assert session.on_live(Doc(RUN_B, 1, 11), 1.0) == []
    assert session.on_live(Doc(WORKER, 1, 12), 1.0) == []
    assert session.on_live(Doc(RUN_B, 2, 13), 1.0) == []
    assert session.catch_up_rows(1, [Doc(RUN_A, 3, 9)], 1.0) == [SendUpdate("s", Doc(RUN_A, 3, 9))]
    out = session.end_catch_up(1, Meta("e1", 10), 1.0)
    assert out == [
        Send(Synced(subscription_id="s", watermark=10, epoch="e1")),
        SendUpdate("s", Doc(WORKER, 1, 12), live=True),
        SendUpdate("s", Doc(RUN_B, 2, 13), live=True),
    ]
    # Repeats and older versions are dropped; newer ones pass.
    assert session.on_live(Doc(RUN_B, 2, 13), 2.0) == []
    assert session.on_live(Doc(RUN_B, 3, 14), 2.0) == [
        SendUpdate("s", Doc(RUN_B, 3, 14), live=True)
    ]


def test_epoch_change_resets_every_subscription() -> None:
    """An epoch change sends reset and restarts each subscription's catch-up from scratch."""
    session = open_session()
    subscribe(session, "a", "*")
    subscribe(session, "b", RUN_A)
    session.begin_catch_up(1, Meta("e1", 5), 1.0)
    session.end_catch_up(1, Meta("e1", 5), 1.0)
    out = session.epoch_changed("e2", 2.0)
    assert out == [
        Send(Reset(subscription_id="a", reason="epoch_changed", epoch="e2")),
        CatchUp("a", 3, session.topics_of("a"), Grant.parse(["*"])),
        Send(Reset(subscription_id="b", reason="epoch_changed", epoch="e2")),
        CancelCatchUp(2),
        CatchUp("b", 4, session.topics_of("b"), Grant.parse(["*"])),
    ]
    plan = session.begin_catch_up(3, Meta("e2", 1), 2.0)
    assert plan.after is None
    assert not plan.cancelled
    assert session.catch_up_rows(3, [Doc(RUN_A, 1, 1)], 2.0) == [SendUpdate("a", Doc(RUN_A, 1, 1))]


# -- limits and time -----------------------------------------------------------------------


def test_rate_limit_closes_4429() -> None:
    """More messages than the bucket holds close with 4429; the bucket refills with time."""
    session = open_session()
    for _ in range(4):  # the authenticate took one of five tokens
        assert closes(session.receive(Ping("n"), 0.0)) == []
    assert closes(session.receive(Ping("n"), 0.5)) == []  # 5 tokens/0.5 s refilled
    session2 = open_session()
    for _ in range(4):
        session2.receive(Ping("n"), 0.0)
    assert closes(session2.receive(Ping("n"), 0.0)) == [(CloseCode.RATE_LIMITED, "rate")]


def test_idle_timeout_only_without_subscriptions() -> None:
    """A quiet session without subscriptions closes with 4408; one with a subscription stays."""
    session = open_session()
    assert closes(session.tick(60.0)) == [(CloseCode.TIMEOUT, "idle")]
    session = open_session()
    subscribe(session, "s", "*", now=1.0)
    assert closes(session.tick(500.0)) == []


def test_heartbeat_after_quiet_interval() -> None:
    """A heartbeat goes out once nothing was sent for the interval, with the newest watermark."""
    session = open_session()
    subscribe(session, "s", "*")
    assert session.tick(14.0) == []
    assert session.tick(15.0, watermark=42) == [Send(Heartbeat(watermark=42))]
    assert session.next_deadline() == 30.0
    assert session.tick(16.0) == []


def test_close_by_driver_cancels_catch_ups() -> None:
    """A driver-side close (shutdown) cancels catch-ups and ends the session."""
    session = open_session()
    subscribe(session, "s", "*")
    assert session.close(CloseCode.GOING_AWAY, "shutdown") == [
        CancelCatchUp(1),
        Close(CloseCode.GOING_AWAY, "shutdown"),
    ]
    assert session.close(CloseCode.GOING_AWAY, "again") == []


# -- the state machine ---------------------------------------------------------------------

KEYS = (RUN_A, RUN_B, "runtime/run_summary:c", WORKER, "runtime/codex_worker_summary:x")
TOPICS = (RUN_A, WORKER, "runtime/run_summary:*", "runtime/*", "*")
GRANTS = (("*",), ("runtime/run_summary:*",), (RUN_A, WORKER), ("runtime/*",))


class SessionMachine(RuleBasedStateMachine):
    """A session against a model log, with a model client applying what it is sent."""

    @initialize(grant=st.sampled_from(GRANTS))
    def start(self, grant: tuple[str, ...]) -> None:
        """Open an authenticated session."""
        self.now = 0.0
        self.log: list[Doc] = []  # every change, watermark = index + 1
        self.delivered = 0  # changes handed to on_live so far
        self.versions: dict[str, int] = {}
        self.retained_from = 0
        self.epoch = "e0"
        self.session: ServerSession[Doc] = ServerSession(
            dataclasses.replace(LIMITS, max_subscriptions=4, message_burst=10**6),
            0.0,
            session_id="m",
        )
        self.session.receive(Authenticate("t"), 0.0)
        self.grant = Grant.parse(grant)
        self.sub_grant: dict[str, list[Grant]] = {}  # every grant since subscribing
        self.session.authenticated(
            Credentials(subject="u", grant=self.grant, expires_at=1e9),
            0.0,
            epoch=self.epoch,
            watermark=0,
        )
        self.catch_ups: dict[int, dict[str, Any]] = {}  # serial -> progress
        self.views: dict[str, dict[str, int]] = {}  # sid -> doc_key -> version
        self.synced: set[str] = set()
        self.counter = 0

    def meta(self) -> Meta:
        """The model log's metadata."""
        return Meta(self.epoch, len(self.log), self.retained_from)

    def perform(self, actions: list[Action[Doc]]) -> None:
        """Apply actions to the model client, checking the invariants of every update."""
        for action in actions:
            assert not isinstance(action, Close), action
            if isinstance(action, CatchUp):
                self.catch_ups[action.serial] = {"action": action}
            elif isinstance(action, CancelCatchUp):
                self.catch_ups.pop(action.serial, None)
            elif isinstance(action, SendUpdate):
                sid, doc = action.subscription_id, action.update
                view = self.views[sid]
                assert doc.version > view.get(doc.doc_key, 0), "older or repeated version"
                assert self.grant.allows(doc.doc_key), "document outside the grant"
                assert all(g.allows(doc.doc_key) for g in self.sub_grant[sid])
                assert any(t.matches(doc.doc_key) for t in self.session.topics_of(sid))
                view[doc.doc_key] = doc.version
            elif isinstance(action, Send):
                frame = action.frame
                if isinstance(frame, Reset):
                    self.views[frame.subscription_id] = {}
                elif isinstance(frame, Synced):
                    self.synced.add(frame.subscription_id)
                elif (
                    isinstance(frame, ErrorFrame)
                    and frame.subscription_id in self.views
                    and frame.subscription_id not in self.session.subscription_ids
                ):
                    del self.views[frame.subscription_id]
                    self.synced.discard(frame.subscription_id)

    def state_at(self, watermark: int) -> dict[str, Doc]:
        """Each document's latest version up to ``watermark``."""
        docs: dict[str, Doc] = {}
        for doc in self.log[:watermark]:
            docs[doc.doc_key] = doc
        return docs

    @rule(key=st.sampled_from(KEYS))
    def append(self, key: str) -> None:
        """The projector committed a change."""
        self.versions[key] = self.versions.get(key, 0) + 1
        self.log.append(Doc(key, self.versions[key], len(self.log) + 1))

    @precondition(lambda self: self.delivered < len(self.log))
    @rule()
    def deliver(self) -> None:
        """The hub delivers the next change, coalesced like the documents table reads."""
        self.delivered += 1
        latest = self.state_at(self.delivered)[self.log[self.delivered - 1].doc_key]
        if latest.watermark == self.delivered:
            self.now += 0.01
            self.perform(self.session.on_live(latest, self.now))

    @rule(
        topics=st.lists(st.sampled_from(TOPICS), min_size=1, max_size=3, unique=True),
        resume_at=st.none() | st.integers(min_value=0, max_value=40),
    )
    def subscribe(self, topics: list[str], resume_at: int | None) -> None:
        """The client subscribes, possibly resuming with a view as of a past watermark."""
        self.counter += 1
        sid = f"s{self.counter}"
        resume = None
        if resume_at is not None:
            resume = Resume(self.epoch, min(resume_at, len(self.log)))
        actions = self.session.receive(Subscribe(sid, tuple(topics), resume), self.now)
        if any(isinstance(a, CatchUp) for a in actions):
            self.sub_grant[sid] = [self.grant]
            view: dict[str, int] = {}
            if resume is not None:
                parsed = self.session.topics_of(sid)
                view = {
                    k: d.version
                    for k, d in self.state_at(resume.watermark).items()
                    if self.grant.allows(k) and any(t.matches(k) for t in parsed)
                }
            self.views[sid] = view
        self.perform(actions)

    @precondition(lambda self: bool(self.session.subscription_ids))
    @rule(data=st.data())
    def unsubscribe(self, data: st.DataObject) -> None:
        """The client ends a subscription."""
        sid = data.draw(st.sampled_from(self.session.subscription_ids))
        self.perform(self.session.receive(Unsubscribe(sid), self.now))
        del self.views[sid]
        self.synced.discard(sid)

    @precondition(lambda self: bool(self.catch_ups))
    @rule(data=st.data())
    def step_catch_up(self, data: st.DataObject) -> None:
        """Advance one catch-up: begin, one page of rows, or end."""
        serial = data.draw(st.sampled_from(sorted(self.catch_ups)))
        progress = self.catch_ups[serial]
        action: CatchUp = progress["action"]
        if "meta" not in progress:
            meta = self.meta()
            plan = self.session.begin_catch_up(serial, meta, self.now)
            assert not plan.cancelled
            self.perform(plan.actions)
            rows = [
                d
                for d in sorted(self.state_at(meta.watermark).values(), key=lambda d: d.watermark)
                if (plan.after is None or d.watermark > plan.after)
                and action.grant.allows(d.doc_key)
                and any(t.matches(d.doc_key) for t in action.topics)
            ]
            progress.update(meta=meta, rows=rows)
        elif progress["rows"]:
            page, progress["rows"] = progress["rows"][:2], progress["rows"][2:]
            self.perform(self.session.catch_up_rows(serial, page, self.now))
        else:
            del self.catch_ups[serial]
            self.perform(self.session.end_catch_up(serial, progress["meta"], self.now))

    @rule(grant=st.sampled_from(GRANTS))
    def refresh(self, grant: tuple[str, ...]) -> None:
        """The client refreshes its token with another grant."""
        self.session.receive(Authenticate("t2"), self.now)
        self.grant = Grant.parse(grant)
        for grants in self.sub_grant.values():
            grants.append(self.grant)
        self.perform(
            self.session.authenticated(
                Credentials(subject="u", grant=self.grant, expires_at=1e9),
                self.now,
                epoch=self.epoch,
                watermark=self.delivered,
            )
        )

    @rule()
    def rebuild(self) -> None:
        """A rebuild restarts the watermarks under a new epoch; the hub jumps to its end."""
        latest = sorted(self.state_at(len(self.log)).values(), key=lambda d: d.doc_key)
        self.log = [Doc(d.doc_key, d.version, i + 1) for i, d in enumerate(latest)]
        self.delivered = len(self.log)
        self.retained_from = 0
        self.epoch = f"e{int(self.epoch[1:]) + 1}"
        self.now += 0.01
        self.perform(self.session.epoch_changed(self.epoch, self.now))

    @rule(retained=st.integers(min_value=0, max_value=10))
    def expire_changes(self, retained: int) -> None:
        """Retention moves the oldest resumable watermark."""
        self.retained_from = min(len(self.log), max(self.retained_from, retained))

    @invariant()
    def converged_when_quiet(self) -> None:
        """With everything delivered and caught up, each view equals the log within its grant."""
        if self.delivered < len(self.log) or self.catch_ups:
            return
        latest = self.state_at(len(self.log))
        for sid in self.session.subscription_ids:
            assert sid in self.synced
            topics = self.session.topics_of(sid)
            want = {
                k: d.version
                for k, d in latest.items()
                if self.grant.allows(k)
                and all(g.allows(k) for g in self.sub_grant[sid])
                and any(t.matches(k) for t in topics)
            }
            got = {k: v for k, v in self.views[sid].items() if k in want}
            assert got == want, (sid, got, want)


TestSessionMachine = SessionMachine.TestCase
TestSessionMachine.settings = settings(
    max_examples=examples(200), stateful_step_count=50, deadline=None
)
