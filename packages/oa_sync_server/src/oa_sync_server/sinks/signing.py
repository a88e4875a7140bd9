"""Request signatures of the HTTP sink: HMAC-SHA256 over ``timestamp + "." + body``.

Every POST of the HTTP sink carries two headers::

    X-OA-Sync-Timestamp: 1764052800                    unix seconds, when the attempt was sent
    X-OA-Sync-Signature: v1=<hex hmac-sha256(secret, b"1764052800." + body)>

A receiver recomputes the MAC over the exact body bytes it read and compares in constant time,
and refuses a timestamp too far from its own clock (replay window). :func:`verify_signature` is
that check, usable by a receiver written in Python (the tests' receiver uses it).

What this is not: encryption, or a substitute for TLS; and not the idempotency key, which stays
the same across retries while the timestamp and signature change with each attempt.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Final

__all__ = [
    "SIGNATURE_HEADER",
    "SIGNATURE_VERSION",
    "TIMESTAMP_HEADER",
    "sign",
    "signature_headers",
    "verify_signature",
]

TIMESTAMP_HEADER: Final = "X-OA-Sync-Timestamp"
SIGNATURE_HEADER: Final = "X-OA-Sync-Signature"
SIGNATURE_VERSION: Final = "v1"


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The hex HMAC-SHA256 of ``f"{timestamp}." + body`` under ``secret``.

    Args:
        secret: the shared secret (at least 32 bytes in any configured sink).
        timestamp: unix seconds.
        body: the exact request body bytes.

    Returns:
        Lowercase hex digest (64 characters).
    """
    message = str(timestamp).encode("ascii") + b"." + body
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def signature_headers(secret: bytes, timestamp: int, body: bytes) -> dict[str, str]:
    """The two signature headers for one attempt.

    Args:
        secret: the shared secret.
        timestamp: unix seconds of this attempt.
        body: the exact request body bytes.

    Returns:
        ``{TIMESTAMP_HEADER: ..., SIGNATURE_HEADER: "v1=<hex>"}``.
    """
    return {
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: f"{SIGNATURE_VERSION}={sign(secret, timestamp, body)}",
    }


def verify_signature(
    secret: bytes,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float,
    tolerance_s: float = 300.0,
) -> bool:
    """Check a request's signature headers the way a receiver should.

    Args:
        secret: the shared secret.
        headers: the request headers (a case-insensitive mapping such as aiohttp's).
        body: the exact body bytes received.
        now: the receiver's clock, unix seconds.
        tolerance_s: largest accepted distance between ``now`` and the signed timestamp.

    Returns:
        ``True`` only if the timestamp is an integer within the tolerance and some ``v1=``
        signature in the header matches (compared in constant time).
    """
    raw_ts = headers.get(TIMESTAMP_HEADER, "")
    if not (raw_ts.isascii() and raw_ts.isdigit()) or len(raw_ts) > 12:
        return False
    timestamp = int(raw_ts)
    if abs(now - timestamp) > tolerance_s:
        return False
    expected = sign(secret, timestamp, body)
    offered = [
        part.strip()[len(SIGNATURE_VERSION) + 1 :]
        for part in headers.get(SIGNATURE_HEADER, "").split(",")
        if part.strip().startswith(SIGNATURE_VERSION + "=")
    ]
    return any(hmac.compare_digest(expected, candidate) for candidate in offered)
