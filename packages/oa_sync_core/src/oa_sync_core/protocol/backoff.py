"""The one reconnect and retry schedule: exponential backoff with full jitter.

Attempt ``n`` (counted from 0) waits ``uniform(0, min(cap, base * 2**n))``: the AWS
"full jitter" schedule, which spreads a crowd of reconnecting clients evenly instead of in
waves. The Python client, the server's log follower and the HTTP sink's deliveries all draw
their delays here.

What this is not: deciding *whether* to retry (close-code policy lives in the client session,
``Retry-After`` in the HTTP sink).
"""

from __future__ import annotations

import dataclasses
import random

__all__ = ["Backoff", "BackoffPolicy", "full_jitter"]


def full_jitter(attempt: int, *, base_s: float, cap_s: float, rng: random.Random) -> float:
    """The delay before retry number ``attempt`` (0 for the first retry), in seconds."""
    return rng.uniform(0.0, min(cap_s, base_s * 2.0 ** min(attempt, 64)))


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class BackoffPolicy:
    """Reconnect timing: exponential backoff with full jitter.

    Attributes:
        base_s: the first attempt's ceiling, in seconds.
        cap_s: the largest ceiling.
        max_attempts: consecutive failed attempts (without a success) before giving up;
            ``None`` retries forever.
    """

    base_s: float = 0.5
    cap_s: float = 30.0
    max_attempts: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.base_s <= self.cap_s:
            raise ValueError("backoff needs 0 < base_s <= cap_s")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")


class Backoff:
    """Counts consecutive failed attempts and draws each delay (full jitter)."""

    def __init__(self, policy: BackoffPolicy, rng: random.Random | None = None):
        self.policy = policy
        self.attempts = 0
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography

    def ceiling(self) -> float:
        """The upper bound of the next delay: ``min(cap, base * 2**attempts)``."""
        return min(self.policy.cap_s, self.policy.base_s * 2.0 ** min(self.attempts, 64))

    def next_delay(self) -> float | None:
        """Draw the next delay and count the attempt; ``None`` once attempts are exhausted."""
        limit = self.policy.max_attempts
        if limit is not None and self.attempts >= limit:
            return None
        delay = full_jitter(
            self.attempts, base_s=self.policy.base_s, cap_s=self.policy.cap_s, rng=self._rng
        )
        self.attempts += 1
        return delay

    def reset(self) -> None:
        """Back to the base delay (after a success)."""
        self.attempts = 0
