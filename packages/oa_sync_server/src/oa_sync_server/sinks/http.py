"""The HTTP sink's client: one document update POSTed, signed, retried, and classified.

Theory of operation. :meth:`HttpDeliveryClient.deliver` sends one :class:`DeliveryRequest`::

    POST <url>
    Content-Type: application/json
    Idempotency-Key: <docKey>:<version>              the same on every attempt
    X-OA-Sync-Timestamp / X-OA-Sync-Signature        fresh per attempt (see signing.py)
    {"contentHash": ..., "docKey": ..., "document": {...}, "mutation": "runtime:upsert...",
     "projection": ..., "version": 7}                canonical JSON, built once per delivery

and returns or raises by the answer:

======================================  ==========================================
2xx                                     :class:`Delivered`
408, 429, 5xx, connection error,        retried after ``RetryPolicy.delay`` (exponential,
timeout                                 full jitter, never less than ``Retry-After``)
any other status (4xx, 3xx)             :class:`Rejected` with the (truncated) body
retries exhausted                       :class:`DeliveryUnavailableError` raised
stop event set while waiting            :class:`DeliveryStoppedError` raised
======================================  ==========================================

A receiver that echoes ``{"contentHash": "<hex>"}`` in a 2xx body tells the sink the hash of
what it stored; :class:`Delivered` carries it so the parity table can compare lanes.

:class:`HttpSink` wraps the client as a core :class:`~oa_sync_core.sinks.Sink` for library use
(no database); the server runs :class:`~oa_sync_server.sinks.delivery.HttpDeliveryLoop`, which
follows the change log, keeps its own checkpoint and dead-letters rejected updates.

Errors (all :class:`~oa_sync_server.errors.ServerError`)::

    HttpSinkError
    ├── DeliveryUnavailableError    retryable failures outlasted the retry budget
    ├── DeliveryRejectedError       HttpSink.publish only: the receiver refused an update (4xx)
    └── DeliveryStoppedError        the stop event was set during a backoff wait
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import email.utils
import random
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Final

import aiohttp
import structlog
from oa_sync_core.checkpoints import DocId
from oa_sync_core.codec import JsonObject, canonical_json, loads_strict
from oa_sync_core.errors import CodecError
from oa_sync_core.projectors import RUN_SUMMARY, WORKER_SUMMARY
from oa_sync_core.protocol.backoff import full_jitter
from oa_sync_core.sinks import DocumentUpdate

from oa_sync_server.config import Secret
from oa_sync_server.errors import (
    DeliveryRejectedError,
    DeliveryStoppedError,
    DeliveryUnavailableError,
    HttpSinkError,
)
from oa_sync_server.sinks.signing import signature_headers

__all__ = [
    "DEFAULT_MUTATIONS",
    "IDEMPOTENCY_HEADER",
    "Delivered",
    "DeliveryRejectedError",
    "DeliveryRequest",
    "DeliveryStoppedError",
    "DeliveryUnavailableError",
    "HttpDeliveryClient",
    "HttpSink",
    "HttpSinkError",
    "HttpSinkOptions",
    "Rejected",
    "RetryPolicy",
    "is_retryable_status",
    "parse_retry_after",
]

IDEMPOTENCY_HEADER: Final = "Idempotency-Key"
DEFAULT_MUTATIONS: Final[Mapping[str, str]] = {
    RUN_SUMMARY: "runtime:upsertRunSummary",
    WORKER_SUMMARY: "runtime:upsertCodexWorkerSummary",
}
_RETRYABLE_4XX: Final = frozenset({408, 429})
_log = structlog.get_logger("oa_sync_server.sinks.http")


def is_retryable_status(status: int) -> bool:
    """Whether an HTTP status is worth retrying: 408, 429 and every 5xx."""
    return status in _RETRYABLE_4XX or 500 <= status <= 599


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds to wait according to a ``Retry-After`` header.

    Args:
        value: the header: delay seconds (``"2"``) or an HTTP date.
        now: the current unix time, for the date form.

    Returns:
        A delay of at least 0, or ``None`` when absent or unparseable.
    """
    if value is None:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return float(int(text[:9]))
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:  # obsolete forms without a zone mean GMT
        moment = moment.replace(tzinfo=dt.UTC)
    return max(0.0, moment.timestamp() - now)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Exponential backoff with full jitter, bounded by attempts, honouring ``Retry-After``.

    The wait before attempt ``n + 1`` is ``uniform(0, min(cap_s, base_s * 2**(n-1)))``, raised
    to the server's ``Retry-After`` (itself clamped to ``max_retry_after_s``) when one was given.

    Attributes:
        base_s: the first backoff ceiling (tests use milliseconds).
        cap_s: the largest backoff ceiling.
        max_attempts: attempts per delivery, including the first.
        max_retry_after_s: the longest ``Retry-After`` obeyed.
    """

    base_s: float = 0.5
    cap_s: float = 30.0
    max_attempts: int = 8
    max_retry_after_s: float = 300.0

    def __post_init__(self) -> None:
        if self.base_s < 0 or self.cap_s < self.base_s:
            raise ValueError("backoff needs 0 <= base_s <= cap_s")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based).

        Args:
            attempt: the attempt that just failed.
            retry_after: the server's ``Retry-After`` in seconds, if it sent one.
            rng: the jitter source.

        Returns:
            The delay in seconds.
        """
        jittered = full_jitter(attempt - 1, base_s=self.base_s, cap_s=self.cap_s, rng=rng)
        if retry_after is None:
            return jittered
        return max(jittered, min(retry_after, self.max_retry_after_s))


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class HttpSinkOptions:
    """Everything the HTTP sink needs. Build from settings with :func:`options_from_settings`.

    Attributes:
        url: where updates are POSTed.
        secret: the HMAC secret (its ``repr`` is masked).
        connect_timeout_s: time allowed to open a connection.
        read_timeout_s: time allowed between bytes of the answer.
        mutations: remote mutation name per projection.
        retry: the retry policy.
        max_error_body_bytes: response bytes kept for a dead letter.
    """

    url: str
    secret: Secret
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    mutations: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_MUTATIONS)
    )
    retry: RetryPolicy = dataclasses.field(default_factory=RetryPolicy)
    max_error_body_bytes: int = 4096

    def __repr__(self) -> str:
        return (
            f"HttpSinkOptions(url={self.url!r}, secret={self.secret!r}, "
            f"connect_timeout_s={self.connect_timeout_s}, read_timeout_s={self.read_timeout_s}, "
            f"mutations={dict(self.mutations)!r}, retry={self.retry!r})"
        )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryRequest:
    """One document version to deliver.

    Attributes:
        projection, doc_key, version, content_hash: the document's identity and state.
        document: its proto3 JSON body.
    """

    projection: str
    doc_key: str
    version: int
    content_hash: str
    document: JsonObject

    @property
    def id(self) -> DocId:
        """(projection, doc_key)."""
        return (self.projection, self.doc_key)

    @property
    def idempotency_key(self) -> str:
        """``<docKey>:<version>``, the same on every attempt of this version."""
        return f"{self.doc_key}:{self.version}"

    def body(self, mutation: str) -> bytes:
        """The canonical JSON request body naming ``mutation``."""
        return canonical_json(
            {
                "mutation": mutation,
                "docKey": self.doc_key,
                "projection": self.projection,
                "version": self.version,
                "contentHash": self.content_hash,
                "document": self.document,
            }
        )

    @classmethod
    def of(cls, update: DocumentUpdate) -> DeliveryRequest:
        """The request for a core :class:`~oa_sync_core.sinks.DocumentUpdate`."""
        return cls(
            projection=update.projection,
            doc_key=update.doc_key,
            version=update.version,
            content_hash=update.content_hash,
            document=update.body,
        )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Delivered:
    """The receiver answered 2xx.

    Attributes:
        status: the status.
        attempts: attempts it took.
        remote_hash: the ``contentHash`` the receiver echoed, if it did.
    """

    status: int
    attempts: int
    remote_hash: str | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Rejected:
    """The receiver refused the update with a non-retryable status.

    Attributes:
        status: the status (0 when refused locally: no mutation configured).
        attempts: attempts made.
        body: the response body, truncated to the configured size.
    """

    status: int
    attempts: int
    body: str


def _remote_hash(raw: bytes) -> str | None:
    if not raw:
        return None
    try:
        value = loads_strict(raw, max_bytes=len(raw))
    except CodecError:
        return None
    if isinstance(value, dict) and isinstance(value.get("contentHash"), str):
        return str(value["contentHash"])
    return None


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """Up to ``limit`` bytes of a response body (the rest is left unread)."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await response.content.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


class HttpDeliveryClient:
    """Delivers :class:`DeliveryRequest` objects to one URL. Use as an async context manager.

    Args:
        options: the sink options.
        session: an aiohttp session to use (not closed by this client); by default the client
            opens its own on ``__aenter__`` and closes it on ``__aexit__``.
        rng: jitter source (a seeded ``random.Random`` makes backoff reproducible).
        clock: unix time, for signature timestamps and ``Retry-After`` dates.
    """

    def __init__(
        self,
        options: HttpSinkOptions,
        *,
        session: aiohttp.ClientSession | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.options = options
        self._session = session
        self._owns_session = session is None
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._clock = clock
        self._secret = options.secret.reveal().encode("utf-8")
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=options.connect_timeout_s,
            sock_connect=options.connect_timeout_s,
            sock_read=options.read_timeout_s,
        )

    async def __aenter__(self) -> HttpDeliveryClient:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session if this client opened it."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def deliver(
        self, request: DeliveryRequest, *, stop: asyncio.Event | None = None
    ) -> Delivered | Rejected:
        """POST one document version until it is accepted, refused, or the budget runs out.

        Args:
            request: the document version.
            stop: when set during a backoff wait, give up at once.

        Returns:
            :class:`Delivered` on a 2xx, :class:`Rejected` on any other non-retryable status.

        Raises:
            DeliveryUnavailableError: every attempt failed with 408/429/5xx or a connection error.
            DeliveryStoppedError: ``stop`` was set while waiting to retry.
        """
        if self._session is None:
            raise RuntimeError("HttpDeliveryClient used outside 'async with'")
        mutation = self.options.mutations.get(request.projection)
        if mutation is None:
            return Rejected(
                status=0, attempts=0, body=f"no mutation configured for {request.projection!r}"
            )
        body = request.body(mutation)
        policy = self.options.retry
        attempt = 0
        while True:
            attempt += 1
            status: int | None = None
            retry_after: float | None = None
            try:
                headers = {
                    "Content-Type": "application/json",
                    IDEMPOTENCY_HEADER: request.idempotency_key,
                    **signature_headers(self._secret, int(self._clock()), body),
                }
                async with self._session.post(
                    self.options.url,
                    data=body,
                    headers=headers,
                    timeout=self._timeout,
                    allow_redirects=False,
                ) as response:
                    status = response.status
                    raw = await _read_capped(response, self.options.max_error_body_bytes)
                    if 200 <= status <= 299:
                        return Delivered(
                            status=status, attempts=attempt, remote_hash=_remote_hash(raw)
                        )
                    if not is_retryable_status(status):
                        text = raw.decode("utf-8", errors="replace")
                        _log.warning(
                            "http_sink_update_rejected",
                            doc_key=request.doc_key,
                            version=request.version,
                            status=status,
                        )
                        return Rejected(status=status, attempts=attempt, body=text)
                    retry_after = parse_retry_after(
                        response.headers.get("Retry-After"), now=self._clock()
                    )
                    error = f"HTTP {status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            if attempt >= policy.max_attempts:
                raise DeliveryUnavailableError(
                    doc_key=request.doc_key,
                    version=request.version,
                    attempts=attempt,
                    last_status=status,
                    last_error=error,
                )
            delay = policy.delay(attempt, retry_after, self._rng)
            _log.info(
                "http_sink_attempt_failed",
                doc_key=request.doc_key,
                version=request.version,
                attempt=attempt,
                status=status,
                error=error,
                retry_in_s=round(delay, 3),
            )
            await self._wait(delay, stop, request)

    async def _wait(
        self, delay: float, stop: asyncio.Event | None, request: DeliveryRequest
    ) -> None:
        if stop is None:
            await asyncio.sleep(delay)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)  # at once when already set
        if stop.is_set():
            raise DeliveryStoppedError("stopped", doc_key=request.doc_key, version=request.version)


class HttpSink:
    """A core :class:`~oa_sync_core.sinks.Sink` that POSTs each update (library use).

    Updates not newer than the version this sink last delivered for a document are skipped, so
    a replayed batch is harmless. There is no dead-letter table here: a refused update raises
    :class:`DeliveryRejectedError`. The server uses the database-backed delivery loop instead.

    Args:
        client: an entered :class:`HttpDeliveryClient`.
    """

    def __init__(self, client: HttpDeliveryClient):
        self.client = client
        self.delivered: dict[DocId, Delivered] = {}
        self._versions: dict[DocId, int] = {}

    async def publish(self, updates: Sequence[DocumentUpdate]) -> None:
        """POST each update in order.

        Raises:
            DeliveryRejectedError: the receiver refused an update (4xx); earlier ones stay
                delivered.
            DeliveryUnavailableError: retries exhausted.
        """
        for update in updates:
            if self._versions.get(update.id, 0) >= update.version:
                continue
            outcome = await self.client.deliver(DeliveryRequest.of(update))
            if isinstance(outcome, Rejected):
                raise DeliveryRejectedError(
                    doc_key=update.doc_key,
                    version=update.version,
                    status=outcome.status,
                    body=outcome.body,
                )
            self._versions[update.id] = update.version
            self.delivered[update.id] = outcome
