"""The verified-token cache: a token verified once is served from the cache until its ``exp``
(checked again on every use), refused tokens are never cached, and the cache is bounded."""

from __future__ import annotations

import dataclasses

import jwt
import pytest
from oa_sync_server.auth import TokenVerifier
from oa_sync_server.config import JwtSettings, Secret
from oa_sync_server.errors import AuthError, AuthFailure

SECRET = "c" * 40
NOW = 1_900_000_000.0


@dataclasses.dataclass
class Clock:
    now: float

    def __call__(self) -> float:
        return self.now


def token(subject: str = "u", ttl_s: float = 600, **extra: object) -> str:
    claims = {
        "iss": "oa-sync",
        "aud": "oa-sync",
        "sub": subject,
        "iat": NOW,
        "exp": NOW + ttl_s,
        "oa_topics": ["*"],
        "oa_scopes": ["sync:read"],
        **extra,
    }
    return jwt.encode(claims, SECRET, algorithm="HS256")


def verifier(clock: Clock, cache_size: int = 10) -> TokenVerifier:
    settings = JwtSettings(hs256_secret=Secret(SECRET))
    return TokenVerifier(settings, clock=clock, cache_size=cache_size)


async def test_a_cached_token_still_expires() -> None:
    """The second verification is the cached principal; past ``exp`` plus the leeway the same
    token is refused as expired, cache or not."""
    clock = Clock(NOW)
    check = verifier(clock)
    text = token(ttl_s=60)
    first = await check.verify(text)
    assert await check.verify(text) is first
    clock.now = NOW + 60 + 31  # past exp and the default 30 s leeway
    with pytest.raises(AuthError) as refused:
        await check.verify(text)
    assert refused.value.reason is AuthFailure.EXPIRED


async def test_refused_tokens_are_not_cached_and_the_cache_is_bounded() -> None:
    """A token refused because it is not valid yet is accepted once it is (it was never
    cached as refused), and the cache never holds more than its size."""
    clock = Clock(NOW)
    check = verifier(clock, cache_size=3)
    early = token(nbf=NOW + 100)
    with pytest.raises(AuthError):
        await check.verify(early)
    clock.now = NOW + 100
    assert (await check.verify(early)).subject == "u"
    for i in range(10):
        await check.verify(token(subject=f"s{i}"))
    assert len(check._cache) == 3
    uncached = verifier(clock, cache_size=0)
    text = token()
    assert await uncached.verify(text) is not await uncached.verify(text)
