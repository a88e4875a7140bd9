"""The client side of sync protocol v1, as a sans-IO state machine.

Theory of operation
-------------------
A :class:`ClientSession` is what a following client *knows*, without a socket: its
subscriptions with their (epoch, watermark) and cached documents, the token it presents and
when to refresh it, and what to do when a connection ends. The driver
(``oa_sync_client.client.SyncClient``) opens sockets, encodes the frames the session returns,
decodes what arrives and passes it in, and sleeps when told to. Nothing here awaits, reads a
clock or touches the network: every input that depends on time carries ``now`` (wall-clock
seconds, the clock of JWT ``exp``).

States (:class:`ConnectionState`)::

    IDLE --connecting()--> CONNECTING --welcome--> SYNCING --every synced--> LIVE
                              ^                       |  (a reset or a new subscribe: SYNCING)
                              |                       v
                          BACKING_OFF <--closed(code)-- any open state
                              \\--closed(fatal code) or attempts exhausted / close()--> CLOSED

On :meth:`opened` the session answers ``authenticate``; on ``welcome`` it sends one
``subscribe`` per subscription, with ``resume`` = its last (epoch, watermark) when it has one.
The server answers a coalesced catch-up, or ``reset`` (epoch changed or watermark no longer
retained: the subscription's cache is cleared) and a full snapshot, then ``synced``.

Per subscription and document, updates at or below the cached version are dropped (delivery
is at-least-once), so the application never sees a repeat or an older version after a newer
one. A subscription's resume watermark moves at ``synced`` and with each live update after it
(live updates arrive in watermark order), never during a catch-up.

Reconnects use exponential backoff with full jitter (:class:`Backoff`): the n-th consecutive
attempt waits ``uniform(0, min(cap, base * 2**n))``; the count returns to zero only on a
``synced``, so a server that accepts sockets and then fails still backs off. Close codes
decide (:meth:`closed`): 4400 / 4413 and policy refusals (1002, 1003, 1008, 4403) end the
client; 4401 asks for a fresh token before the next attempt; everything else reconnects.

Tokens: :meth:`set_token` reads ``iat`` / ``exp`` from a JWT's payload (without verifying it;
that is the server's job) and schedules a refresh a fifth of the token's lifetime before
``exp``; when connected, the new token is sent in-band as ``authenticate``. The driver never
connects with a token :meth:`token_expired` says is expired.

What this is not: a transport, a codec (frames come from :mod:`oa_sync_core.protocol.wire`) or a
token verifier.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import itertools
import json
import random
from collections.abc import Mapping, Sequence
from typing import Final, TypeAlias

from oa_sync_core.codec import JsonObject
from oa_sync_core.errors import ProtocolError
from oa_sync_core.protocol.backoff import Backoff, BackoffPolicy
from oa_sync_core.protocol.codes import FINAL_CLOSE_CODES, CloseCode, ErrorCode
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
    UpdateFrame,
    Welcome,
)

__all__ = [
    "Backoff",
    "BackoffPolicy",
    "CachedDocument",
    "ClientEvent",
    "ClientSession",
    "ConnectionState",
    "DocumentChanged",
    "GiveUp",
    "Reconnect",
    "SessionStats",
    "SubscriptionError",
    "SubscriptionReset",
    "SubscriptionSynced",
    "TokenTimes",
    "read_token_times",
]

_REFUSALS: Final = frozenset(
    {
        ErrorCode.FORBIDDEN,
        ErrorCode.INVALID_SUBSCRIPTION,
        ErrorCode.DUPLICATE_SUBSCRIPTION,
        ErrorCode.TOO_MANY_SUBSCRIPTIONS,
        ErrorCode.TOO_MANY_TOPICS,
    }
)


class ConnectionState(enum.Enum):
    """Where the client's connection stands."""

    IDLE = "idle"
    CONNECTING = "connecting"
    SYNCING = "syncing"
    LIVE = "live"
    BACKING_OFF = "backing_off"
    CLOSED = "closed"


# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TokenTimes:
    """When a token was issued and expires (seconds since the epoch), read from its claims."""

    issued_at: float | None
    expires_at: float

    def refresh_at(self, *, fraction: float = 0.2, default_leeway_s: float = 10.0) -> float:
        """When to fetch the next token: ``exp - fraction * (exp - iat)`` (or a fixed leeway)."""
        if self.issued_at is not None and self.expires_at > self.issued_at:
            leeway = fraction * (self.expires_at - self.issued_at)
        else:
            leeway = default_leeway_s
        return self.expires_at - leeway


def read_token_times(token: str) -> TokenTimes | None:
    """Read ``iat`` and ``exp`` from a JWT without verifying it.

    Returns:
        The times, or ``None`` for a token that is not a JWT or has no numeric ``exp``
        (an opaque token: refreshed only when the server closes with 4401).
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError):
        return None
    if not isinstance(payload, dict):
        return None
    exp, iat = payload.get("exp"), payload.get("iat")
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    issued = float(iat) if isinstance(iat, int | float) and not isinstance(iat, bool) else None
    return TokenTimes(issued_at=issued, expires_at=float(exp))


# ---------------------------------------------------------------------------------------------
# Values the session returns
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CachedDocument:
    """A document as the client holds it."""

    doc_key: str
    projection: str
    version: int
    watermark: int
    content_hash: str
    document: JsonObject


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DocumentChanged:
    """A newer version of a document arrived for a subscription (snapshot, catch-up or live)."""

    subscription_id: str
    doc: CachedDocument


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SubscriptionReset:
    """The subscription's cache was cleared (``reason``: ``epoch_changed``, ...); a snapshot
    follows."""

    subscription_id: str
    reason: str
    epoch: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SubscriptionSynced:
    """The subscription holds every matching change up to ``watermark`` of ``epoch``."""

    subscription_id: str
    watermark: int
    epoch: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SubscriptionError:
    """The server refused something; ``fatal`` when the subscription does not exist on it."""

    subscription_id: str
    code: str
    message: str
    fatal: bool


ClientEvent: TypeAlias = (
    DocumentChanged | SubscriptionReset | SubscriptionSynced | SubscriptionError
)
"""What :meth:`ClientSession.receive` reports to the application."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Reconnect:
    """Connect again after ``delay_s``; fetch a fresh token first when ``refresh_token``."""

    delay_s: float
    refresh_token: bool
    code: int | None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class GiveUp:
    """Do not reconnect: the client is closed."""

    reason: str
    code: int | None


@dataclasses.dataclass(slots=True)
class SessionStats:
    """Counters a driver can expose and tests can assert on."""

    connections: int = 0
    snapshots: int = 0
    resumes: int = 0
    resets: int = 0
    updates: int = 0
    repeats_dropped: int = 0
    token_refreshes: int = 0


@dataclasses.dataclass(slots=True)
class _Subscription:
    sid: str
    topics: tuple[str, ...]
    epoch: str = ""
    watermark: int | None = None  # None: nothing applied yet, subscribe without resume
    synced: bool = False
    failed: bool = False
    cache: dict[str, CachedDocument] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# The session
# ---------------------------------------------------------------------------------------------


class ClientSession:
    """Subscriptions, caches, tokens and reconnect decisions of one client (sans-IO).

    Args:
        backoff: reconnect timing.
        rng: randomness for jitter (seed it in tests).
        refresh_fraction: refresh a token this fraction of its lifetime before ``exp``.
    """

    def __init__(
        self,
        *,
        backoff: BackoffPolicy | None = None,
        rng: random.Random | None = None,
        refresh_fraction: float = 0.2,
    ):
        self.backoff = Backoff(backoff or BackoffPolicy(), rng)
        self.stats = SessionStats()
        self.state = ConnectionState.IDLE
        self.server_epoch = ""
        self.heartbeat_interval_s: float | None = None
        self.last_watermark_seen = 0
        self.refresh_fraction = refresh_fraction
        self._token: str | None = None
        self._token_times: TokenTimes | None = None
        self._subs: dict[str, _Subscription] = {}
        self._ids = itertools.count(1)
        self._welcomed = False

    # -- subscriptions -------------------------------------------------------------------------

    def subscribe(
        self, topics: Sequence[str], *, subscription_id: str | None = None
    ) -> tuple[str, list[ClientFrame]]:
        """Add a subscription.

        Returns:
            Its id and the frames to send now (a ``subscribe`` when the connection is open).

        Raises:
            ValueError: no topics, or the id is already in use.
        """
        if not topics:
            raise ValueError("subscribe needs at least one topic")
        if isinstance(topics, str):
            raise TypeError("topics is a sequence of strings, not one string")
        sid = subscription_id or f"s{next(self._ids)}"
        if sid in self._subs:
            raise ValueError(f"subscription id {sid!r} is in use")
        sub = _Subscription(sid, tuple(topics))
        self._subs[sid] = sub
        if not self._welcomed:
            return sid, []
        if self.state is ConnectionState.LIVE:
            self.state = ConnectionState.SYNCING
        return sid, [self._subscribe_frame(sub)]

    def unsubscribe(self, subscription_id: str) -> list[ClientFrame]:
        """Drop a subscription and its cache; returns the ``unsubscribe`` to send, if open."""
        if self._subs.pop(subscription_id, None) is None or not self._welcomed:
            return []
        self._settle_state()
        return [Unsubscribe(subscription_id)]

    def subscription_ids(self) -> list[str]:
        """The ids of the current subscriptions."""
        return list(self._subs)

    def documents(self, subscription_id: str) -> Mapping[str, CachedDocument]:
        """The cached documents of a subscription, by key (read-only view)."""
        return self._sub(subscription_id).cache

    def position(self, subscription_id: str) -> Resume | None:
        """The (epoch, watermark) a subscription would resume from, if any."""
        sub = self._sub(subscription_id)
        return None if sub.watermark is None else Resume(sub.epoch, sub.watermark)

    def is_synced(self, subscription_id: str) -> bool:
        """Whether the subscription finished its catch-up on the current connection."""
        return self._sub(subscription_id).synced

    # -- tokens ----------------------------------------------------------------------------------

    def set_token(self, token: str, *, now: float) -> list[ClientFrame]:
        """Use a new token; returns an in-band ``authenticate`` when the connection is open.

        Raises:
            ValueError: the token is empty or already expired at ``now``.
        """
        if not token:
            raise ValueError("empty token")
        times = read_token_times(token)
        if times is not None and times.expires_at <= now:
            raise ValueError("the token provider returned an expired token")
        refreshed = self._token is not None
        self._token, self._token_times = token, times
        if refreshed:
            self.stats.token_refreshes += 1
        return [Authenticate(token)] if self._welcomed else []

    @property
    def has_token(self) -> bool:
        """Whether a token was set."""
        return self._token is not None

    def token_refresh_at(self) -> float | None:
        """When the current token should be replaced (``None``: opaque token or none)."""
        if self._token_times is None:
            return None
        return self._token_times.refresh_at(fraction=self.refresh_fraction)

    def token_expired(self, now: float) -> bool:
        """Whether there is no token, or it is known to have expired at ``now``."""
        if self._token is None:
            return True
        return self._token_times is not None and self._token_times.expires_at <= now

    # -- connection lifecycle -------------------------------------------------------------------

    def connecting(self) -> None:
        """The driver starts opening a socket.

        Raises:
            ProtocolError: ``closed`` after :meth:`close`, ``busy`` when already connected.
        """
        if self.state is ConnectionState.CLOSED:
            raise ProtocolError("closed", "the client is closed")
        if self.state not in (ConnectionState.IDLE, ConnectionState.BACKING_OFF):
            raise ProtocolError("busy", f"cannot connect while {self.state.value}")
        self.state = ConnectionState.CONNECTING

    def opened(self, *, now: float) -> list[ClientFrame]:
        """The socket is open: returns the ``authenticate`` to send first.

        Raises:
            ProtocolError: ``not_connecting`` outside CONNECTING; ``no_token`` when there is
                no token or it is known to be expired.
        """
        if self.state is not ConnectionState.CONNECTING:
            raise ProtocolError("not_connecting", f"opened while {self.state.value}")
        if self._token is None or self.token_expired(now):
            raise ProtocolError("no_token", "no unexpired token to authenticate with")
        self.stats.connections += 1
        return [Authenticate(self._token)]

    def receive(self, frame: ServerFrame) -> tuple[list[ClientEvent], list[ClientFrame]]:
        """Apply a frame from the server.

        Returns:
            The events for the application and the frames to send back (the ``subscribe``
            messages after ``welcome``).

        Raises:
            ProtocolError: ``not_connected`` when no connection is open (state unchanged).
        """
        if self.state not in (
            ConnectionState.CONNECTING,
            ConnectionState.SYNCING,
            ConnectionState.LIVE,
        ):
            raise ProtocolError("not_connected", f"frame received while {self.state.value}")
        if isinstance(frame, Welcome):
            return [], self._on_welcome(frame)
        if not self._welcomed:
            raise ProtocolError("not_welcomed", f"{type(frame).__name__} before welcome")
        if isinstance(frame, UpdateFrame):
            return self._on_update(frame), []
        if isinstance(frame, Synced):
            return self._on_synced(frame), []
        if isinstance(frame, Reset):
            return self._on_reset(frame), []
        if isinstance(frame, ErrorFrame):
            return self._on_error(frame), []
        if isinstance(frame, Heartbeat):
            self.last_watermark_seen = max(self.last_watermark_seen, frame.watermark)
            return [], []
        assert isinstance(frame, Pong)  # exhaustive over ServerFrame
        return [], []

    def closed(self, code: int | None) -> Reconnect | GiveUp:
        """The connection ended (``code`` from the close frame; ``None``: no close frame).

        Returns:
            :class:`Reconnect` (state BACKING_OFF) or :class:`GiveUp` (state CLOSED).
        """
        self._welcomed = False
        for sub in self._subs.values():
            sub.synced = False
        if self.state is ConnectionState.CLOSED:
            return GiveUp(reason="closed by the application", code=code)
        if code in FINAL_CLOSE_CODES:
            self.state = ConnectionState.CLOSED
            return GiveUp(reason=f"the server refused the client (close {code})", code=code)
        delay = self.backoff.next_delay()
        if delay is None:
            self.state = ConnectionState.CLOSED
            return GiveUp(reason=f"gave up after {self.backoff.attempts} attempts", code=code)
        self.state = ConnectionState.BACKING_OFF
        return Reconnect(delay_s=delay, refresh_token=code == CloseCode.UNAUTHENTICATED, code=code)

    def close(self) -> None:
        """The application closes the client: state CLOSED, nothing reconnects."""
        self._welcomed = False
        self.state = ConnectionState.CLOSED

    def ping(self, nonce: str) -> list[ClientFrame]:
        """A ``ping`` to send when open (keeps an idle connection alive)."""
        return [Ping(nonce)] if self._welcomed else []

    # -- frame handlers --------------------------------------------------------------------------

    def _on_welcome(self, frame: Welcome) -> list[ClientFrame]:
        if self._welcomed:  # a later welcome would mean the server restarted the session
            raise ProtocolError("duplicate_welcome", "welcome received twice")
        self._welcomed = True
        self.server_epoch = frame.epoch
        self.last_watermark_seen = frame.watermark
        self.heartbeat_interval_s = frame.heartbeat_interval_ms / 1000 or None
        frames: list[ClientFrame] = []
        for sub in self._subs.values():
            sub.synced = False
            sub.failed = False
            frames.append(self._subscribe_frame(sub))
        self.state = ConnectionState.SYNCING
        self._settle_state()
        return frames

    def _subscribe_frame(self, sub: _Subscription) -> Subscribe:
        if sub.watermark is None:
            self.stats.snapshots += 1
            return Subscribe(sub.sid, sub.topics, None)
        self.stats.resumes += 1
        return Subscribe(sub.sid, sub.topics, Resume(sub.epoch, sub.watermark))

    def _on_update(self, frame: UpdateFrame) -> list[ClientEvent]:
        sub = self._subs.get(frame.subscription_id)
        if sub is None:  # unsubscribed meanwhile
            return []
        if sub.synced and frame.watermark > (sub.watermark or 0):
            sub.watermark = frame.watermark  # live updates come in watermark order
        self.last_watermark_seen = max(self.last_watermark_seen, frame.watermark)
        held = sub.cache.get(frame.doc_key)
        if held is not None and frame.version <= held.version:
            self.stats.repeats_dropped += 1
            return []
        doc = CachedDocument(
            doc_key=frame.doc_key,
            projection=frame.projection,
            version=frame.version,
            watermark=frame.watermark,
            content_hash=frame.content_hash,
            document=frame.document,
        )
        sub.cache[frame.doc_key] = doc
        self.stats.updates += 1
        return [DocumentChanged(subscription_id=sub.sid, doc=doc)]

    def _on_synced(self, frame: Synced) -> list[ClientEvent]:
        sub = self._subs.get(frame.subscription_id)
        if sub is None:
            return []
        if frame.epoch != sub.epoch or sub.watermark is None:
            sub.watermark = frame.watermark
        else:
            sub.watermark = max(frame.watermark, sub.watermark)
        sub.epoch = frame.epoch
        sub.synced = True
        self.backoff.reset()
        self._settle_state()
        return [
            SubscriptionSynced(subscription_id=sub.sid, watermark=sub.watermark, epoch=sub.epoch)
        ]

    def _on_reset(self, frame: Reset) -> list[ClientEvent]:
        sub = self._subs.get(frame.subscription_id)
        if sub is None:
            return []
        sub.cache.clear()
        sub.epoch = frame.epoch
        sub.watermark = None
        sub.synced = False
        self.stats.resets += 1
        if self.state is ConnectionState.LIVE:
            self.state = ConnectionState.SYNCING
        return [SubscriptionReset(subscription_id=sub.sid, reason=frame.reason, epoch=frame.epoch)]

    def _on_error(self, frame: ErrorFrame) -> list[ClientEvent]:
        sub = self._subs.get(frame.subscription_id)
        fatal = sub is not None and not sub.synced and frame.code in _REFUSALS
        if sub is not None and fatal:
            sub.failed = True
            self._settle_state()
        return [
            SubscriptionError(
                subscription_id=frame.subscription_id,
                code=frame.code,
                message=frame.message,
                fatal=fatal,
            )
        ]

    def _settle_state(self) -> None:
        if self.state in (ConnectionState.SYNCING, ConnectionState.LIVE):
            pending = any(not s.synced and not s.failed for s in self._subs.values())
            self.state = ConnectionState.SYNCING if pending else ConnectionState.LIVE

    def _sub(self, subscription_id: str) -> _Subscription:
        try:
            return self._subs[subscription_id]
        except KeyError:
            raise KeyError(f"no subscription {subscription_id!r}") from None
