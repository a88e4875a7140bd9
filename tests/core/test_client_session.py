"""The sans-IO client session: caches, resume, reset, backoff, close codes and token timing."""

from __future__ import annotations

import base64
import json
import random
from typing import Any, ClassVar

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from oa_sync_core.errors import ProtocolError
from oa_sync_core.protocol.client_session import (
    Backoff,
    BackoffPolicy,
    ClientSession,
    ConnectionState,
    DocumentChanged,
    GiveUp,
    Reconnect,
    SubscriptionError,
    SubscriptionReset,
    SubscriptionSynced,
    read_token_times,
)
from oa_sync_core.protocol.wire import (
    Authenticate,
    ClientFrame,
    ErrorFrame,
    Heartbeat,
    Pong,
    Reset,
    Resume,
    ServerFrame,
    Subscribe,
    Synced,
    Unsubscribe,
    UpdateFrame,
    Welcome,
)
from oa_sync_core.topics import parse_topic

from tests.profiles import examples

NOW = 1_700_000_000.0


def jwt(*, iat: float | None = NOW, exp: float | None = NOW + 600) -> str:
    """An unsigned JWT-shaped token with the given times (the session never verifies)."""

    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    claims: dict[str, Any] = {"sub": "t"}
    if iat is not None:
        claims["iat"] = iat
    if exp is not None:
        claims["exp"] = exp
    return f"{part({'alg': 'HS256'})}.{part(claims)}.sig"


def welcomed(session: ClientSession, *, epoch: str = "e1") -> list[ClientFrame]:
    """Drive a session through connect, open and welcome; returns the frames it sent."""
    if not session.has_token:
        session.set_token(jwt(), now=NOW)
    session.connecting()
    sent = session.opened(now=NOW)
    _, more = session.receive(Welcome("sess", epoch, 0, 15000))
    return sent + more


def state(session: ClientSession) -> ConnectionState:
    """The session's state, read through a call so that mypy does not narrow it."""
    return session.state


def update(sid: str, key: str, version: int, watermark: int) -> UpdateFrame:
    return UpdateFrame(sid, key, "p", version, watermark, f"h{version}", {"v": version})


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def test_opening_authenticates_then_subscribes_after_welcome() -> None:
    """authenticate goes first; subscribes wait for welcome (the server refuses them earlier)."""
    session = ClientSession()
    token = jwt()
    session.set_token(token, now=NOW)
    sid, frames = session.subscribe(["runtime/run_summary:*"])
    assert frames == []
    session.connecting()
    assert state(session) is ConnectionState.CONNECTING
    assert session.opened(now=NOW) == [Authenticate(token)]
    events, frames = session.receive(Welcome("x", "e1", 5, 15000))
    assert events == []
    assert frames == [Subscribe(sid, ("runtime/run_summary:*",), None)]
    assert state(session) is ConnectionState.SYNCING
    assert session.heartbeat_interval_s == 15.0
    events, _ = session.receive(Synced(sid, 5, "e1"))
    assert events == [SubscriptionSynced(subscription_id=sid, watermark=5, epoch="e1")]
    assert state(session) is ConnectionState.LIVE


def test_repeats_and_older_versions_are_dropped() -> None:
    """Per document, only strictly newer versions reach the application."""
    session = ClientSession()
    sid, _ = session.subscribe(["k:*"])
    welcomed(session)
    got = []
    for frame in (update(sid, "k:a", 2, 3), update(sid, "k:a", 2, 3), update(sid, "k:a", 1, 1)):
        events, _ = session.receive(frame)
        got.extend(events)
    assert [e.doc.version for e in got if isinstance(e, DocumentChanged)] == [2]
    assert session.stats.repeats_dropped == 2
    assert session.documents(sid)["k:a"].document == {"v": 2}


def test_resume_position_moves_at_synced_and_with_live_updates_only() -> None:
    """During catch-up the watermark holds; synced sets it; live updates advance it."""
    session = ClientSession()
    sid, _ = session.subscribe(["k:*"])
    welcomed(session)
    session.receive(update(sid, "k:a", 1, 7))
    assert session.position(sid) is None
    session.receive(Synced(sid, 9, "e1"))
    assert session.position(sid) == Resume("e1", 9)
    session.receive(update(sid, "k:b", 1, 12))
    assert session.position(sid) == Resume("e1", 12)
    session.receive(update(sid, "k:b", 1, 12))  # a repeat does not move it back
    session.receive(Heartbeat(40))  # nor does a heartbeat move it forward
    assert session.position(sid) == Resume("e1", 12)
    # The next connection resumes from there.
    assert isinstance(session.closed(1006), Reconnect)
    frames = welcomed(session)
    assert Subscribe(sid, ("k:*",), Resume("e1", 12)) in frames
    assert session.stats.resumes == 1


def test_reset_clears_only_that_subscription() -> None:
    """A reset empties its subscription's cache and position, and returns to SYNCING."""
    session = ClientSession()
    a, _ = session.subscribe(["a:*"])
    b, _ = session.subscribe(["b:*"])
    welcomed(session)
    session.receive(update(a, "a:1", 1, 1))
    session.receive(update(b, "b:1", 1, 2))
    session.receive(Synced(a, 2, "e1"))
    session.receive(Synced(b, 2, "e1"))
    assert state(session) is ConnectionState.LIVE
    events, _ = session.receive(Reset(a, "epoch_changed", "e2"))
    assert events == [SubscriptionReset(subscription_id=a, reason="epoch_changed", epoch="e2")]
    assert dict(session.documents(a)) == {}
    assert list(session.documents(b)) == ["b:1"]
    assert session.position(a) is None
    assert state(session) is ConnectionState.SYNCING
    session.receive(update(a, "a:1", 1, 1))  # the snapshot may repeat a version: shown again
    assert list(session.documents(a)) == ["a:1"]


def test_refused_subscription_does_not_block_live() -> None:
    """A forbidden subscribe is a fatal SubscriptionError; the others can still go live."""
    session = ClientSession()
    a, _ = session.subscribe(["secret:*"])
    b, _ = session.subscribe(["ok:*"])
    welcomed(session)
    events, _ = session.receive(ErrorFrame("forbidden", "not granted", a))
    assert events == [
        SubscriptionError(subscription_id=a, code="forbidden", message="not granted", fatal=True)
    ]
    session.receive(Synced(b, 0, "e1"))
    assert state(session) is ConnectionState.LIVE


def test_unsubscribe_and_late_frames() -> None:
    """Unsubscribe sends unsubscribe when open; frames for it afterwards are ignored."""
    session = ClientSession()
    sid, _ = session.subscribe(["k:*"])
    welcomed(session)
    assert session.unsubscribe(sid) == [Unsubscribe(sid)]
    assert session.receive(update(sid, "k:a", 1, 1)) == ([], [])
    assert state(session) is ConnectionState.LIVE
    assert session.unsubscribe("nope") == []


@pytest.mark.parametrize(
    ("code", "reconnect", "refresh"),
    [
        (None, True, False),
        (1000, True, False),
        (1001, True, False),
        (1006, True, False),
        (1011, True, False),
        (4401, True, True),
        (4408, True, False),
        (4429, True, False),
        (4400, False, False),
        (4403, False, False),
        (4413, False, False),
        (1008, False, False),
    ],
)
def test_close_code_policy(code: int | None, reconnect: bool, refresh: bool) -> None:
    """Close codes decide: reconnect, reconnect with a fresh token, or give up."""
    session = ClientSession()
    welcomed(session)
    decision = session.closed(code)
    if reconnect:
        assert isinstance(decision, Reconnect)
        assert decision.refresh_token is refresh
        assert state(session) is ConnectionState.BACKING_OFF
    else:
        assert isinstance(decision, GiveUp)
        assert state(session) is ConnectionState.CLOSED
        with pytest.raises(ProtocolError):
            session.connecting()


def test_backoff_grows_with_full_jitter_and_resets_only_on_synced() -> None:
    """Delays are uniform in [0, min(cap, base*2^n)]; welcome alone does not reset them."""
    session = ClientSession(backoff=BackoffPolicy(base_s=1, cap_s=8), rng=random.Random(3))
    sid, _ = session.subscribe(["k:*"])
    session.set_token(jwt(), now=NOW)
    ceilings = []
    for _ in range(6):
        ceilings.append(session.backoff.ceiling())
        session.connecting()
        session.opened(now=NOW)
        session.receive(Welcome("x", "e", 0, 0))  # accepted, then dropped before synced
        decision = session.closed(1006)
        assert isinstance(decision, Reconnect)
        assert 0 <= decision.delay_s <= ceilings[-1]
    assert ceilings == [1, 2, 4, 8, 8, 8]
    session.connecting()
    session.opened(now=NOW)
    session.receive(Welcome("x", "e", 0, 0))
    session.receive(Synced(sid, 0, "e"))
    assert session.backoff.ceiling() == 1


def test_max_attempts_gives_up() -> None:
    """After max_attempts consecutive failures the session closes."""
    session = ClientSession(backoff=BackoffPolicy(base_s=0.1, cap_s=1, max_attempts=2))
    session.set_token(jwt(), now=NOW)
    decisions = []
    for _ in range(3):
        session.connecting()
        decisions.append(session.closed(None))
    assert [type(d) for d in decisions] == [Reconnect, Reconnect, GiveUp]
    assert state(session) is ConnectionState.CLOSED


def test_fifty_clients_spread_their_attempts() -> None:
    """Full jitter spreads 50 clients' n-th attempts across the window (no thundering herd)."""
    master = random.Random(11)
    for attempt in range(1, 6):
        delays = []
        for _ in range(50):
            backoff = Backoff(BackoffPolicy(base_s=0.5, cap_s=4), random.Random(master.random()))
            backoff.attempts = attempt
            delay = backoff.next_delay()
            assert delay is not None
            delays.append(delay)
        ceiling = min(4.0, 0.5 * 2**attempt)
        buckets = {int(d / ceiling * 5) for d in delays}
        assert len(buckets) == 5  # every fifth of the window is used
        assert max(delays) - min(delays) > ceiling / 2


def test_token_times_and_refresh_schedule() -> None:
    """Refresh is due a fifth of the lifetime before exp; opaque tokens have no schedule."""
    times = read_token_times(jwt(iat=NOW, exp=NOW + 100))
    assert times is not None
    assert times.refresh_at() == NOW + 80
    assert read_token_times("opaque") is None
    assert read_token_times("a.!!!.c") is None
    assert read_token_times(jwt(exp=None)) is None
    no_iat = read_token_times(jwt(iat=None, exp=NOW + 100))
    assert no_iat is not None
    assert no_iat.refresh_at() == NOW + 90
    session = ClientSession()
    session.set_token(jwt(iat=NOW, exp=NOW + 100), now=NOW)
    assert session.token_refresh_at() == NOW + 80
    assert not session.token_expired(NOW + 99)
    assert session.token_expired(NOW + 100)
    with pytest.raises(ValueError, match="expired"):
        session.set_token(jwt(iat=NOW - 100, exp=NOW - 1), now=NOW)


def test_refresh_is_in_band_only_when_open() -> None:
    """A new token is sent as authenticate on an open connection, kept for later otherwise."""
    session = ClientSession()
    assert session.set_token(jwt(), now=NOW) == []
    welcomed(session)
    fresh = jwt(iat=NOW + 1, exp=NOW + 700)
    assert session.set_token(fresh, now=NOW + 1) == [Authenticate(fresh)]
    assert session.stats.token_refreshes == 1
    session.closed(4401)
    assert session.set_token(jwt(iat=NOW + 2), now=NOW + 2) == []


def test_never_connects_with_an_expired_token() -> None:
    """opened() refuses to authenticate with a token known to be expired."""
    session = ClientSession()
    session.set_token(jwt(iat=NOW, exp=NOW + 10), now=NOW)
    session.connecting()
    with pytest.raises(ProtocolError) as info:
        session.opened(now=NOW + 11)
    assert info.value.code == "no_token"
    assert state(session) is ConnectionState.CONNECTING


@pytest.mark.parametrize(
    "frame", [Welcome("x", "e", 0, 0), update("s1", "k", 1, 1), Pong("n"), Heartbeat(1)]
)
def test_frames_without_a_connection_are_refused(frame: ServerFrame) -> None:
    """Input illegal in the state raises ProtocolError and leaves the state unchanged."""
    session = ClientSession()
    with pytest.raises(ProtocolError):
        session.receive(frame)
    assert state(session) is ConnectionState.IDLE
    session.set_token(jwt(), now=NOW)
    session.connecting()
    if not isinstance(frame, Welcome):
        with pytest.raises(ProtocolError):
            session.receive(frame)
        assert state(session) is ConnectionState.CONNECTING


# ---------------------------------------------------------------------------------------------
# State machine against a model server
# ---------------------------------------------------------------------------------------------

KEYS = [f"doc:{c}:{i}" for c in "ab" for i in range(3)]
TOPIC_SETS = [("doc:*",), ("doc:a:*",), ("doc:b:1", "doc:a:0")]


class ModelServer:
    """A change log with epochs, retention and at-least-once delivery, in memory."""

    def __init__(self) -> None:
        self.epoch = "e0"
        self.watermark = 0
        self.retained_from = 0
        self.docs: dict[str, tuple[int, int]] = {}  # key -> (version, watermark)
        self.subs: dict[str, tuple[str, ...]] = {}
        self.outbox: list[ServerFrame] = []
        self.sent_updates: list[UpdateFrame] = []
        self.epochs = 0

    @staticmethod
    def matches(topics: tuple[str, ...], key: str) -> bool:
        return any(parse_topic(t).matches(key) for t in topics)

    def frame(self, sid: str, key: str) -> UpdateFrame:
        version, watermark = self.docs[key]
        return UpdateFrame(sid, key, "p", version, watermark, f"h{version}", {"v": version})

    def append(self, key: str) -> None:
        self.watermark += 1
        version = self.docs.get(key, (0, 0))[0] + 1
        self.docs[key] = (version, self.watermark)
        for sid, topics in self.subs.items():
            if self.matches(topics, key):
                self.outbox.append(self.frame(sid, key))

    def handle(self, frame: ClientFrame) -> None:
        if isinstance(frame, Authenticate):
            self.outbox.append(Welcome("sess", self.epoch, self.watermark, 1000))
        elif isinstance(frame, Subscribe):
            self.subs[frame.subscription_id] = frame.topics
            after = 0
            resume = frame.resume
            if resume is not None:
                if resume.epoch == self.epoch and resume.watermark >= self.retained_from:
                    after = resume.watermark
                else:
                    reason = "epoch_changed" if resume.epoch != self.epoch else "watermark_expired"
                    self.outbox.append(Reset(frame.subscription_id, reason, self.epoch))
            rows = sorted(
                (wm, key)
                for key, (_, wm) in self.docs.items()
                if wm > after and self.matches(frame.topics, key)
            )
            self.outbox.extend(self.frame(frame.subscription_id, key) for _, key in rows)
            self.outbox.append(Synced(frame.subscription_id, self.watermark, self.epoch))
        elif isinstance(frame, Unsubscribe):
            self.subs.pop(frame.subscription_id, None)

    def drop_connection(self) -> None:
        self.subs.clear()
        self.outbox.clear()

    def rebuild(self) -> None:
        """A new epoch: watermarks restart, documents keep their versions."""
        self.epochs += 1
        self.epoch = f"e{self.epochs}"
        self.watermark = 0
        for key in sorted(self.docs):
            self.watermark += 1
            self.docs[key] = (self.docs[key][0], self.watermark)
        self.retained_from = self.watermark


class ClientSessionMachine(RuleBasedStateMachine):
    """Random appends, deliveries, repeats, cuts, epoch changes and compaction."""

    converged_total: ClassVar[int] = 0
    """Convergence checks that ran to the end, over every run (see the test below)."""

    def __init__(self) -> None:
        super().__init__()
        self.server = ModelServer()
        self.session = ClientSession(
            backoff=BackoffPolicy(base_s=0.1, cap_s=2), rng=random.Random(0)
        )
        self.session.set_token(jwt(), now=NOW)
        self.subs: dict[str, tuple[str, ...]] = {}
        self.seen: dict[tuple[str, str], int] = {}  # highest version shown since the last reset
        self.converged_checks = 0

    @rule(topics=st.sampled_from(TOPIC_SETS))
    def subscribe(self, topics: tuple[str, ...]) -> None:
        if len(self.subs) >= 3:
            return
        sid, frames = self.session.subscribe(topics)
        self.subs[sid] = topics
        for frame in frames:
            self.server.handle(frame)

    @precondition(lambda self: len(self.subs) > 1)
    @rule()
    def unsubscribe(self) -> None:
        sid = sorted(self.subs)[0]
        del self.subs[sid]
        for key in [k for k in self.seen if k[0] == sid]:
            del self.seen[key]
        for frame in self.session.unsubscribe(sid):
            self.server.handle(frame)

    @precondition(
        lambda self: self.session.state in (ConnectionState.IDLE, ConnectionState.BACKING_OFF)
    )
    @rule()
    def connect(self) -> None:
        self.session.connecting()
        for frame in self.session.opened(now=NOW):
            self.server.handle(frame)

    @rule(key=st.sampled_from(KEYS))
    def append(self, key: str) -> None:
        self.server.append(key)

    @precondition(lambda self: bool(self.server.outbox))
    @rule(count=st.integers(min_value=1, max_value=8))
    def deliver(self, count: int) -> None:
        for _ in range(min(count, len(self.server.outbox))):
            frame = self.server.outbox.pop(0)
            if isinstance(frame, UpdateFrame):
                self.server.sent_updates.append(frame)
            events, replies = self.session.receive(frame)
            for event in events:
                self.check_event(event)
            for reply in replies:
                self.server.handle(reply)

    @precondition(lambda self: bool(self.server.outbox))
    @rule()
    def deliver_all(self) -> None:
        """The network catches up: everything in flight arrives (replies included)."""
        while self.server.outbox:
            self.deliver(1)

    @precondition(lambda self: bool(self.server.sent_updates) and bool(self.server.subs))
    @rule(index=st.integers(min_value=0))
    def repeat(self, index: int) -> None:
        """At-least-once: an update already sent comes again, possibly after newer ones."""
        frame = self.server.sent_updates[index % len(self.server.sent_updates)]
        if frame.subscription_id in self.server.subs:
            self.server.outbox.append(frame)

    @precondition(
        lambda self: (
            self.session.state
            in (ConnectionState.CONNECTING, ConnectionState.SYNCING, ConnectionState.LIVE)
        )
    )
    @rule(code=st.sampled_from([None, 1001, 1006, 4401, 4408, 4429]))
    def cut(self, code: int | None) -> None:
        self.server.drop_connection()
        self.server.sent_updates.clear()
        decision = self.session.closed(code)
        assert isinstance(decision, Reconnect)
        assert decision.refresh_token is (code == 4401)

    @precondition(lambda self: self.session.state is ConnectionState.BACKING_OFF)
    @rule()
    def rebuild(self) -> None:
        self.server.rebuild()

    @rule()
    def compact(self) -> None:
        self.server.retained_from = self.server.watermark

    def check_event(self, event: object) -> None:
        if isinstance(event, DocumentChanged):
            key = (event.subscription_id, event.doc.doc_key)
            assert event.doc.version > self.seen.get(key, 0), "older or repeated version shown"
            self.seen[key] = event.doc.version
            assert self.server.matches(self.subs[event.subscription_id], event.doc.doc_key)
        elif isinstance(event, SubscriptionReset):
            for key in [k for k in self.seen if k[0] == event.subscription_id]:
                del self.seen[key]

    @invariant()
    def caches_converge_when_quiet(self) -> None:
        if self.session.state is not ConnectionState.LIVE or self.server.outbox:
            return
        self.converged_checks += 1
        for sid, topics in self.subs.items():
            expected = {
                key: version
                for key, (version, _) in self.server.docs.items()
                if self.server.matches(topics, key)
            }
            got = {key: doc.version for key, doc in self.session.documents(sid).items()}
            assert got == expected
            position = self.session.position(sid)
            assert position is not None
            assert position.epoch == self.server.epoch

    @invariant()
    def state_is_consistent(self) -> None:
        assert self.session.state is not ConnectionState.CLOSED
        assert set(self.session.subscription_ids()) == set(self.subs)

    def teardown(self) -> None:
        type(self).converged_total += self.converged_checks


TestClientSessionMachine = ClientSessionMachine.TestCase
TestClientSessionMachine.settings = settings(max_examples=examples(150), stateful_step_count=60)


def test_the_convergence_invariant_actually_runs() -> None:
    """The machine reaches quiet LIVE states often enough that ``caches_converge_when_quiet``
    compares the caches with the model (an invariant that always returned early proves
    nothing)."""
    ClientSessionMachine.converged_total = 0
    run_state_machine_as_test(
        ClientSessionMachine,
        settings=settings(max_examples=examples(30), stateful_step_count=60, deadline=None),
    )
    assert ClientSessionMachine.converged_total >= examples(30)
