"""The server side of one sync connection, as a sans-IO state machine.

Theory of operation
-------------------
A :class:`ServerSession` is what one WebSocket connection *means*, without the socket. The
driver (``oa_sync_server.transports.ws``) feeds it decoded client frames, the results of the
work it asked for, live document changes and the passing of time; each call returns a list of
actions for the driver to perform, in order. The session never awaits, reads a clock or touches the
network or the database: every input carries ``now`` (seconds, any monotonic origin).

States (:class:`SessionState`)::

    AWAITING_AUTH --authenticate--> VERIFYING --authenticated()--> OPEN --close--> CLOSED
          |  deadline passed: Close 4408     \\--auth_failed(): Close 4401
          \\ any other request: Close 4401

``authenticate`` yields :class:`VerifyToken`; the driver checks the token and answers with
:meth:`ServerSession.authenticated` (first time: a ``welcome``) or
:meth:`ServerSession.auth_failed`. A later ``authenticate`` refreshes the credentials in place;
topics the new grant no longer reaches are dropped from their subscriptions with a
``forbidden`` error frame. The token's expiry closes the session with 4401 (checked by
:meth:`ServerSession.tick` and on every input).

A ``subscribe`` is validated (id, topic syntax, limits, grant: a topic the grant does not reach
at all gives a ``forbidden`` error frame and no subscription) and yields :class:`CatchUp`. The
driver reads the change-log metadata and calls :meth:`ServerSession.begin_catch_up`, which
decides between a coalesced catch-up after the client's watermark and a ``reset`` + full
snapshot (:func:`oa_sync_core.protocol.resume.decide_resume`); it then hands the matching documents
over in watermark order (:meth:`ServerSession.catch_up_rows`) and finishes with
:meth:`ServerSession.end_catch_up`, which emits ``synced`` and then the live changes that arrived
meanwhile (buffered, coalesced per document, and only those newer than the snapshot).

Live changes (:meth:`ServerSession.on_live`) go to every subscription whose topics match and
whose grant allows the document; the session finds them through an index (subscriptions of
exact keys by key, those with a ``*`` topic tested one by one), rebuilt after any change of
its subscriptions. Per subscription and document, versions strictly increase:
an update at or below the version already sent is dropped, so a client never sees an older
version after a newer one, and repeats are not sent twice by one session.

Limits: inbound messages pass a token bucket (empty: close 4429); a session that holds no
subscription and has received nothing for ``idle_timeout_s`` is closed with 4408; a
``heartbeat`` goes out when nothing was sent for ``heartbeat_interval_s``.
:meth:`ServerSession.next_deadline` tells the driver when to call :meth:`tick` next.

What this is not: a codec (frames come decoded, from :mod:`oa_sync_core.protocol.wire`), a token
verifier, or a reader of documents. Slow consumers (a full send queue) are the driver's to
detect; the session only decides what should be sent.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterable, Sequence
from typing import Final, Generic, NamedTuple, Protocol, TypeAlias, TypeVar

from oa_sync_core.errors import ProtocolError
from oa_sync_core.protocol.codes import CloseCode, ErrorCode, ResetReason
from oa_sync_core.protocol.resume import LogMeta, Position, decide_resume
from oa_sync_core.protocol.wire import (
    Authenticate,
    ClientFrame,
    ErrorFrame,
    Heartbeat,
    Ping,
    Pong,
    Reset,
    Resume,
    ServerFrame,
    Subscribe,
    Synced,
    Unsubscribe,
    Welcome,
)
from oa_sync_core.topics import Grant, Topic, parse_topic

__all__ = [
    "MAX_SUBSCRIPTION_ID_LENGTH",
    "Action",
    "CancelCatchUp",
    "CatchUp",
    "CatchUpPlan",
    "Close",
    "Credentials",
    "DocVersion",
    "Send",
    "SendUpdate",
    "ServerSession",
    "SessionLimits",
    "SessionState",
    "VerifyToken",
]

MAX_SUBSCRIPTION_ID_LENGTH: Final = 128


class SessionState(enum.Enum):
    """Where a session is in its life (see the module docstring)."""

    AWAITING_AUTH = "awaiting_auth"
    VERIFYING = "verifying"
    OPEN = "open"
    CLOSED = "closed"


class DocVersion(Protocol):
    """What the session needs to know of a document version (a row or an encoded update)."""

    @property
    def doc_key(self) -> str: ...

    @property
    def version(self) -> int: ...

    @property
    def watermark(self) -> int: ...


U = TypeVar("U", bound=DocVersion)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SessionLimits:
    """The per-connection limits the session enforces (a subset of the server's limits).

    Attributes:
        auth_deadline_s: time from connection to a successful ``authenticate``.
        idle_timeout_s: time without inbound messages before a session with no subscription
            is closed.
        heartbeat_interval_s: quiet time after which a ``heartbeat`` is sent.
        max_subscriptions: open subscriptions per session.
        max_topics_per_subscription: topics in one ``subscribe``.
        messages_per_second: token-bucket refill rate of inbound messages.
        message_burst: token-bucket size.
    """

    auth_deadline_s: float = 10.0
    idle_timeout_s: float = 60.0
    heartbeat_interval_s: float = 15.0
    max_subscriptions: int = 64
    max_topics_per_subscription: int = 32
    messages_per_second: float = 50.0
    message_burst: int = 100

    def __post_init__(self) -> None:
        for name in ("auth_deadline_s", "idle_timeout_s", "heartbeat_interval_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not (math.isfinite(self.messages_per_second) and self.messages_per_second > 0):
            raise ValueError("messages_per_second must be a positive number")
        for name in ("max_subscriptions", "max_topics_per_subscription", "message_burst"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Credentials:
    """What a verified token lets the session do.

    Attributes:
        subject: the token's ``sub``; a refresh must keep it.
        grant: the topics the token may read.
        expires_at: when the token expires, on the same clock as ``now``.
    """

    subject: str
    grant: Grant
    expires_at: float


# ---------------------------------------------------------------------------------------------
# Actions: what the driver must do, in order.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Send:
    """Send one server frame."""

    frame: ServerFrame


class SendUpdate(NamedTuple, Generic[U]):
    """Send ``update`` (a document version) as an ``update`` frame of one subscription.

    A named tuple, not a frozen dataclass like the other actions: one is made per delivery
    (every subscriber of every change), and a frozen dataclass's ``__init__`` (one
    ``object.__setattr__`` per field) cost three times as much (~0.64 vs ~0.2 us).

    Attributes:
        subscription_id: the subscription it is for.
        update: the document version exactly as handed to the session.
        live: whether it came from :meth:`ServerSession.on_live` (for latency metrics).
    """

    subscription_id: str
    update: U
    live: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Close:
    """Close the connection. Nothing is sent after it.

    Attributes:
        code: the close code.
        reason: a short reason (never a token).
        limit: the breached limit's kind (``rate``, ``auth_deadline``, ``idle``) for metrics,
            or ``""``.
    """

    code: CloseCode
    reason: str
    limit: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class VerifyToken:
    """Verify ``token``; answer with :meth:`ServerSession.authenticated` or ``auth_failed``."""

    token: str = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True, slots=True)
class CatchUp:
    """Start the catch-up of a new subscription (see :meth:`ServerSession.begin_catch_up`).

    Attributes:
        subscription_id: the subscription.
        serial: identifies this subscription among reuses of the same id; pass it back.
        topics: what it covers.
        grant: the grant at subscribe time; documents outside it must not be read.
        resume: the subscription resumes from a client's position, so
            :meth:`ServerSession.begin_catch_up` decides from the log's metadata as read from
            the database (epoch, retention horizon, newest watermark). Without it only the epoch
            and the watermark ``synced`` announces matter: any position whose every change the
            documents read afterwards cover (e.g. what the live feed has delivered) will do.
    """

    subscription_id: str
    serial: int
    topics: tuple[Topic, ...]
    grant: Grant
    resume: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class CancelCatchUp:
    """Stop the catch-up of ``serial`` (its subscription was removed)."""

    serial: int


Action: TypeAlias = Send | SendUpdate[U] | Close | VerifyToken | CatchUp | CancelCatchUp


@dataclasses.dataclass(frozen=True, slots=True)
class CatchUpPlan(Generic[U]):
    """What :meth:`ServerSession.begin_catch_up` decided.

    Attributes:
        after: read documents with a watermark above this (``None``: a full snapshot);
            ``None`` also when ``cancelled``.
        cancelled: the subscription is gone; read nothing.
        actions: to perform before sending any document (a ``reset`` frame, or nothing).
    """

    after: int | None
    cancelled: bool
    actions: list[Action[U]]


class _SubState(enum.Enum):
    CATCHING_UP = "catching_up"
    LIVE = "live"


@dataclasses.dataclass(slots=True)
class _Subscription(Generic[U]):
    subscription_id: str
    serial: int
    topics: tuple[Topic, ...]
    grant: Grant
    resume: Resume | None
    state: _SubState = _SubState.CATCHING_UP
    began: bool = False
    synced_at: int = -1
    sent: dict[str, int] = dataclasses.field(default_factory=dict)
    buffered: dict[str, U] = dataclasses.field(default_factory=dict)
    # Whether every topic lies within both grants, for the credentials it was computed for
    # (then no document it matches needs a grant check).
    covered_for: object = None
    covered: bool = False

    def matches(self, doc_key: str) -> bool:
        return any(t.matches(doc_key) for t in self.topics)


class ServerSession(Generic[U]):
    """The sans-IO state machine of one server connection (see the module docstring).

    Args:
        limits: the limits to enforce.
        now: the connection time (starts the auth deadline and the idle clock).
        session_id: the id announced in ``welcome``.

    Attributes:
        state: the current :class:`SessionState`.
        credentials: the current credentials, once authenticated.
        epoch: the epoch announced in ``welcome`` (``""`` before).
        watermark: the newest watermark the session has heard of.
    """

    __slots__ = (
        "_bucket_at",
        "_by_serial",
        "_connected_at",
        "_last_inbound",
        "_last_sent",
        "_routes",
        "_serial",
        "_subs",
        "_tokens",
        "credentials",
        "epoch",
        "limits",
        "session_id",
        "state",
        "watermark",
    )

    def __init__(self, limits: SessionLimits, now: float, *, session_id: str) -> None:
        self.limits = limits
        self.session_id = session_id
        self.state = SessionState.AWAITING_AUTH
        self.credentials: Credentials | None = None
        self.epoch = ""
        self.watermark = 0
        self._connected_at = now
        self._last_inbound = now
        self._last_sent = now
        self._tokens = float(limits.message_burst)
        self._bucket_at = now
        self._subs: dict[str, _Subscription[U]] = {}
        self._by_serial: dict[int, _Subscription[U]] = {}
        self._serial = 0
        # Which subscriptions a document key may concern (see _candidates); rebuilt on first
        # use after any change of the subscriptions or their topics.
        self._routes: _Routes[U] | None = None

    # -- introspection ---------------------------------------------------------------------

    @property
    def subscription_ids(self) -> tuple[str, ...]:
        """The ids of the open subscriptions, in creation order."""
        return tuple(self._subs)

    def topics_of(self, subscription_id: str) -> tuple[Topic, ...]:
        """The topics a subscription still covers (empty when it does not exist)."""
        sub = self._subs.get(subscription_id)
        return sub.topics if sub else ()

    def next_deadline(self) -> float:
        """The latest time :meth:`tick` should next be called (``inf`` once closed)."""
        if self.state is SessionState.CLOSED:
            return math.inf
        if self.credentials is None:
            return self._connected_at + self.limits.auth_deadline_s
        times = [
            self.credentials.expires_at,
            self._last_sent + self.limits.heartbeat_interval_s,
        ]
        if not self._subs:
            times.append(self._last_inbound + self.limits.idle_timeout_s)
        return min(times)

    # -- inputs ----------------------------------------------------------------------------

    def receive(self, frame: ClientFrame, now: float) -> list[Action[U]]:
        """Handle one decoded client frame.

        Returns:
            The actions to perform; a :class:`Close` is always the last one.
        """
        if self.state is SessionState.CLOSED:
            return []
        self._last_inbound = now
        if closed := self._check_clock(now):
            return closed
        if not self._take_token(now):
            return self._close(CloseCode.RATE_LIMITED, "too many messages", limit="rate")
        if isinstance(frame, Authenticate):
            if self.state is SessionState.VERIFYING:
                return self._close(CloseCode.MALFORMED, "authenticate while verifying")
            if self.state is SessionState.AWAITING_AUTH:
                self.state = SessionState.VERIFYING
            return [VerifyToken(frame.token)]
        if isinstance(frame, Ping):
            return self._sent([Send(Pong(nonce=frame.nonce))], now)
        if self.credentials is None:
            return self._close(CloseCode.UNAUTHENTICATED, "authenticate first")
        if isinstance(frame, Subscribe):
            return self._sent(self._subscribe(frame), now)
        if isinstance(frame, Unsubscribe):
            return self._sent(self._unsubscribe(frame), now)
        raise ProtocolError("unknown_frame", f"not a client frame: {type(frame).__name__}")

    def authenticated(
        self, credentials: Credentials, now: float, *, epoch: str, watermark: int
    ) -> list[Action[U]]:
        """The token of the last :class:`VerifyToken` is valid.

        Args:
            credentials: what it grants.
            now: the current time.
            epoch: the change log's epoch (announced in the first ``welcome``).
            watermark: the newest watermark.

        Returns:
            ``welcome`` the first time; on a refresh, ``forbidden`` error frames for topics
            the new grant no longer reaches. A token already expired, or a refresh for another
            subject, closes with 4401.
        """
        if self.state is SessionState.CLOSED:
            return []
        if credentials.expires_at <= now:
            return self._close(CloseCode.UNAUTHENTICATED, "token expired")
        self.watermark = max(self.watermark, watermark)
        previous = self.credentials
        if previous is None:
            self.credentials = credentials
            self.state = SessionState.OPEN
            self.epoch = epoch
            welcome = Welcome(
                session_id=self.session_id,
                epoch=epoch,
                watermark=self.watermark,
                heartbeat_interval_ms=round(self.limits.heartbeat_interval_s * 1000),
            )
            return self._sent([Send(welcome)], now)
        if credentials.subject != previous.subject:
            return self._close(CloseCode.UNAUTHENTICATED, "refreshed token has another subject")
        self.credentials = credentials
        return self._sent(self._narrow(credentials.grant), now)

    def auth_failed(self, reason: str, now: float) -> list[Action[U]]:
        """The token of the last :class:`VerifyToken` was refused: close 4401."""
        del now
        if self.state is SessionState.CLOSED:
            return []
        return self._close(CloseCode.UNAUTHENTICATED, reason or "invalid token")

    def begin_catch_up(self, serial: int, meta: LogMeta, now: float) -> CatchUpPlan[U]:
        """Decide how the subscription of ``serial`` catches up, given the log's metadata.

        Call once, before reading any document, with metadata read in the same database
        snapshot as the documents that follow.
        """
        sub = self._by_serial.get(serial)
        if sub is None or self.state is SessionState.CLOSED:
            return CatchUpPlan(None, True, [])
        if sub.began:
            raise ProtocolError("catch_up_started", f"catch-up {serial} already began")
        sub.began = True
        position = None
        if sub.resume is not None:
            position = Position(watermark=sub.resume.watermark, epoch=sub.resume.epoch)
        after, reason = decide_resume(position, meta)
        actions: list[Action[U]] = []
        if reason is not None:
            reset = Reset(
                subscription_id=sub.subscription_id, reason=reason.value, epoch=meta.epoch
            )
            actions = self._sent([Send(reset)], now)
        return CatchUpPlan(after, False, actions)

    def catch_up_rows(self, serial: int, rows: Sequence[U], now: float) -> list[Action[U]]:
        """Documents read for a catch-up, in watermark order: the ones to send."""
        sub = self._by_serial.get(serial)
        if sub is None or self.state is SessionState.CLOSED or self.credentials is None:
            return []
        actions: list[Action[U]] = [
            SendUpdate(sub.subscription_id, row)
            for row in rows
            if self._covers(sub, row.doc_key) and self._newer(sub, row)
        ]
        return self._sent(actions, now) if actions else actions

    def end_catch_up(self, serial: int, meta: LogMeta, now: float) -> list[Action[U]]:
        """The catch-up read everything up to ``meta.watermark``: ``synced``, then the live
        changes that arrived meanwhile and are newer than that."""
        sub = self._by_serial.get(serial)
        if sub is None or self.state is SessionState.CLOSED or self.credentials is None:
            return []
        sub.state = _SubState.LIVE
        sub.synced_at = meta.watermark
        self.watermark = max(self.watermark, meta.watermark)
        actions: list[Action[U]] = [
            Send(
                Synced(
                    subscription_id=sub.subscription_id,
                    watermark=meta.watermark,
                    epoch=meta.epoch,
                )
            )
        ]
        actions.extend(
            SendUpdate(sub.subscription_id, update, live=True)
            for update in sorted(sub.buffered.values(), key=lambda u: u.watermark)
            if update.watermark > sub.synced_at
            and self._covers(sub, update.doc_key)
            and self._newer(sub, update)
        )
        sub.buffered.clear()
        return self._sent(actions, now)

    def on_live(self, update: U, now: float) -> list[Action[U]]:
        """A document changed: updates for every subscription that should see it."""
        if self.state is SessionState.CLOSED:
            return []
        credentials = self.credentials
        # The clock's checks (auth deadline, expiry, idleness) can only close a session that
        # is not authenticated, expired or holds no subscription: test that much inline.
        if (credentials is None or now >= credentials.expires_at or not self._subs) and (
            closed := self._check_clock(now)
        ):
            return closed
        watermark = update.watermark
        self.watermark = max(self.watermark, watermark)
        if credentials is None:
            return []
        doc_key = update.doc_key
        routes = self._routes
        candidates = (
            routes.exact.get(doc_key, ())
            if routes is not None and not routes.prefixed
            else self._candidates(doc_key)
        )
        actions: list[Action[U]] = []
        for sub in candidates:
            if not (sub.covered and sub.covered_for is credentials) and not self._granted(
                sub, doc_key
            ):
                continue
            if sub.state is _SubState.CATCHING_UP:
                held = sub.buffered.get(doc_key)
                if held is None or held.version < update.version:
                    sub.buffered[doc_key] = update
                continue
            if watermark > sub.synced_at:  # and newer than what was sent (_newer, inline)
                sent = sub.sent
                version = update.version
                if sent.get(doc_key, -1) < version:
                    sent[doc_key] = version
                    actions.append(SendUpdate(sub.subscription_id, update, True))
        if actions and now > self._last_sent:
            self._last_sent = now
        return actions

    def tick(self, now: float, *, watermark: int | None = None) -> list[Action[U]]:
        """Time passed: deadlines, token expiry, idleness and heartbeats.

        Args:
            now: the current time.
            watermark: the newest watermark known to the driver, for the ``heartbeat``.
        """
        if self.state is SessionState.CLOSED:
            return []
        if watermark is not None:
            self.watermark = max(self.watermark, watermark)
        if closed := self._check_clock(now):
            return closed
        if self.credentials is not None and now - self._last_sent >= (
            self.limits.heartbeat_interval_s
        ):
            return self._sent([Send(Heartbeat(watermark=self.watermark))], now)
        return []

    def epoch_changed(self, epoch: str, now: float) -> list[Action[U]]:
        """The change log restarted its watermarks (rebuild, restore).

        Every subscription gets a ``reset`` (``epoch_changed``), forgets what it sent and
        starts over with a full snapshot: the actions hold the ``reset`` frames, a
        :class:`CancelCatchUp` for catch-ups under way and a new :class:`CatchUp` for each
        subscription. The driver must attach a new live feed before performing them.
        """
        if self.state is SessionState.CLOSED or self.credentials is None:
            return []
        self.epoch = epoch
        self.watermark = 0
        actions: list[Action[U]] = []
        for sub in self._subs.values():
            actions.append(
                Send(
                    Reset(
                        subscription_id=sub.subscription_id,
                        reason=ResetReason.EPOCH_CHANGED.value,
                        epoch=epoch,
                    )
                )
            )
            if sub.state is _SubState.CATCHING_UP:
                actions.append(CancelCatchUp(sub.serial))
            del self._by_serial[sub.serial]
            self._serial += 1
            sub.serial = self._serial
            sub.state = _SubState.CATCHING_UP
            sub.began = False
            sub.resume = None
            sub.synced_at = -1
            sub.sent.clear()
            sub.buffered.clear()
            self._by_serial[sub.serial] = sub
            actions.append(CatchUp(sub.subscription_id, sub.serial, sub.topics, sub.grant))
        return self._sent(actions, now)

    def close(self, code: CloseCode, reason: str) -> list[Action[U]]:
        """Close from the driver's side (shutdown, slow consumer): the final action."""
        if self.state is SessionState.CLOSED:
            return []
        return self._close(code, reason)

    # -- internals -------------------------------------------------------------------------

    def _close(self, code: CloseCode, reason: str, *, limit: str = "") -> list[Action[U]]:
        self.state = SessionState.CLOSED
        cancels: list[Action[U]] = [
            CancelCatchUp(s.serial) for s in self._subs.values() if s.state is _SubState.CATCHING_UP
        ]
        self._subs.clear()
        self._by_serial.clear()
        self._routes = None
        return [*cancels, Close(code, reason, limit)]

    def _check_clock(self, now: float) -> list[Action[U]]:
        if self.credentials is None:
            if now >= self._connected_at + self.limits.auth_deadline_s:
                return self._close(
                    CloseCode.TIMEOUT, "no authentication in time", limit="auth_deadline"
                )
            return []
        if now >= self.credentials.expires_at:
            return self._close(CloseCode.UNAUTHENTICATED, "token expired")
        if not self._subs and now - self._last_inbound >= self.limits.idle_timeout_s:
            return self._close(CloseCode.TIMEOUT, "idle", limit="idle")
        return []

    def _take_token(self, now: float) -> bool:
        elapsed = max(0.0, now - self._bucket_at)
        self._bucket_at = max(self._bucket_at, now)
        self._tokens = min(
            float(self.limits.message_burst),
            self._tokens + elapsed * self.limits.messages_per_second,
        )
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def _sent(self, actions: list[Action[U]], now: float) -> list[Action[U]]:
        if any(isinstance(a, Send | SendUpdate) for a in actions):
            self._last_sent = max(self._last_sent, now)
        return actions

    def _candidates(self, doc_key: str) -> Sequence[_Subscription[U]]:
        """The subscriptions whose topics match ``doc_key``, in creation order.

        An index, not a scan: subscriptions of exact keys only are found by the key, the others
        (any ``*`` topic) are tested one by one.
        """
        routes = self._routes
        if routes is None:
            routes = self._routes = _Routes.of(self._subs.values())
        found = routes.exact.get(doc_key, ())
        if not routes.prefixed:
            return found
        matching = [sub for sub in routes.prefixed if sub.matches(doc_key)]
        if not found:
            return matching
        if not matching:
            return found
        return [sub for sub in self._subs.values() if sub.matches(doc_key)]  # keep the order

    def _covers(self, sub: _Subscription[U], doc_key: str) -> bool:
        # The subscription's topics, within both the grant it was made under and the current
        # one: a refresh can narrow what a subscription yields, never widen it.
        return sub.matches(doc_key) and self._granted(sub, doc_key)

    def _granted(self, sub: _Subscription[U], doc_key: str) -> bool:
        # Whether both grants allow a document the subscription's topics match.
        credentials = self.credentials
        assert credentials is not None
        if sub.covered_for is not credentials:
            sub.covered_for = credentials
            sub.covered = all(
                sub.grant.covers(t) and credentials.grant.covers(t) for t in sub.topics
            )
        return sub.covered or (sub.grant.allows(doc_key) and credentials.grant.allows(doc_key))

    @staticmethod
    def _newer(sub: _Subscription[U], update: U) -> bool:
        if sub.sent.get(update.doc_key, -1) >= update.version:
            return False
        sub.sent[update.doc_key] = update.version
        return True

    def _error(self, code: ErrorCode, message: str, subscription_id: str = "") -> Action[U]:
        return Send(ErrorFrame(code=code, message=message, subscription_id=subscription_id))

    def _subscribe(self, frame: Subscribe) -> list[Action[U]]:
        assert self.credentials is not None
        sid = frame.subscription_id
        if not sid or len(sid) > MAX_SUBSCRIPTION_ID_LENGTH or not sid.isprintable():
            return [
                self._error(
                    ErrorCode.INVALID_SUBSCRIPTION,
                    f"a subscription id is 1 to {MAX_SUBSCRIPTION_ID_LENGTH} printable characters",
                )
            ]
        if sid in self._subs:
            return [
                self._error(ErrorCode.DUPLICATE_SUBSCRIPTION, "subscription id already open", sid)
            ]
        if len(self._subs) >= self.limits.max_subscriptions:
            return [
                self._error(
                    ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                    f"at most {self.limits.max_subscriptions} subscriptions per connection",
                    sid,
                )
            ]
        if not frame.topics:
            return [self._error(ErrorCode.INVALID_SUBSCRIPTION, "no topics", sid)]
        if len(frame.topics) > self.limits.max_topics_per_subscription:
            return [
                self._error(
                    ErrorCode.TOO_MANY_TOPICS,
                    f"at most {self.limits.max_topics_per_subscription} topics per subscription",
                    sid,
                )
            ]
        topics: list[Topic] = []
        for text in frame.topics:
            try:
                topic = parse_topic(text)
            except ValueError as exc:
                return [self._error(ErrorCode.INVALID_SUBSCRIPTION, str(exc), sid)]
            if topic not in topics:
                topics.append(topic)
        grant = self.credentials.grant
        refused = [t.text for t in topics if not grant.intersects(t)]
        if refused:
            return [self._error(ErrorCode.FORBIDDEN, f"not granted: {', '.join(refused)}", sid)]
        self._serial += 1
        sub: _Subscription[U] = _Subscription(sid, self._serial, tuple(topics), grant, frame.resume)
        self._subs[sid] = sub
        self._by_serial[sub.serial] = sub
        self._routes = None
        return [CatchUp(sid, sub.serial, sub.topics, grant, resume=frame.resume is not None)]

    def _unsubscribe(self, frame: Unsubscribe) -> list[Action[U]]:
        sub = self._subs.pop(frame.subscription_id, None)
        self._routes = None
        if sub is None:
            return [
                self._error(
                    ErrorCode.UNKNOWN_SUBSCRIPTION, "no such subscription", frame.subscription_id
                )
            ]
        del self._by_serial[sub.serial]
        if sub.state is _SubState.CATCHING_UP:
            return [CancelCatchUp(sub.serial)]
        return []

    def _narrow(self, grant: Grant) -> list[Action[U]]:
        self._routes = None  # topics may be dropped below
        actions: list[Action[U]] = []
        for sid in list(self._subs):
            sub = self._subs[sid]
            sub.grant = _intersect(sub.grant, grant)
            lost = [t for t in sub.topics if not grant.intersects(t)]
            if not lost:
                continue
            kept = tuple(t for t in sub.topics if t not in lost)
            names = ", ".join(t.text for t in lost)
            actions.append(self._error(ErrorCode.FORBIDDEN, f"no longer granted: {names}", sid))
            if kept:
                sub.topics = kept
                continue
            del self._subs[sid]
            del self._by_serial[sub.serial]
            if sub.state is _SubState.CATCHING_UP:
                actions.append(CancelCatchUp(sub.serial))
        return actions


@dataclasses.dataclass(frozen=True, slots=True)
class _Routes(Generic[U]):
    """The subscriptions by what their topics are: ``exact`` maps a document key to the
    subscriptions (in creation order) whose topics are all exact keys and include it;
    ``prefixed`` holds those with a ``*`` topic."""

    exact: dict[str, tuple[_Subscription[U], ...]]
    prefixed: tuple[_Subscription[U], ...]

    @classmethod
    def of(cls, subs: Iterable[_Subscription[U]]) -> _Routes[U]:
        exact: dict[str, tuple[_Subscription[U], ...]] = {}
        prefixed: list[_Subscription[U]] = []
        for sub in subs:
            if any(t.wildcard for t in sub.topics):
                prefixed.append(sub)
                continue
            for topic in sub.topics:
                exact[topic.prefix] = (*exact.get(topic.prefix, ()), sub)
        return cls(exact, tuple(prefixed))


def _intersect(a: Grant, b: Grant) -> Grant:
    """The documents both grants allow, as a grant (patterns are exact keys or prefixes, so two
    overlapping patterns intersect in the narrower one)."""
    narrowed: list[Topic] = []
    for x in a.topics:
        for y in b.topics:
            if x.overlaps(y):
                topic = x if x.within(y) else y
                if topic not in narrowed:
                    narrowed.append(topic)
    return Grant(tuple(narrowed))
