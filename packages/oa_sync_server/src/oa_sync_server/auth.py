"""Bearer-token verification: JWTs in, a :class:`Principal` or an :class:`AuthError` out.

:class:`TokenVerifier` checks a JWT against the keys of :class:`~oa_sync_server.config.JwtSettings`
(DESIGN.md "Auth"):

* the algorithm is pinned per key: an HS256 token is only ever checked with the shared secret,
  an RS256/ES256 token only with the public-key file or the JWKS key of its ``kid`` whose own
  algorithm matches. ``none`` and every other algorithm are refused, so key confusion (HS256
  signed with an RSA public key) cannot verify;
* ``exp``, ``iat``, ``iss``, ``aud`` and ``sub`` are required; the registered claims are checked
  here, strictly, with their JSON types (``exp: []``, ``nbf: null``, ``exp: 1e400`` are
  malformed, not crashes) and at most 60 s of leeway; ``typ``, when present, is ``JWT`` or
  ``at+jwt``; ``crit`` is refused;
* ``oa_topics`` becomes a core :class:`~oa_sync_core.topics.Grant` and ``oa_scopes`` a set of
  scopes (unknown scope strings grant nothing and are ignored).

Every failure is an :class:`AuthError` carrying an :class:`AuthFailure` reason; nothing else
escapes :meth:`TokenVerifier.verify`. Error messages never contain the token.

Verified tokens are cached (:class:`TokenVerifier`, ``cache_size``) keyed by the SHA-256 of the
token, until the token's ``exp`` (plus the leeway): a token presented again (every append of a
service, every reconnect of a client) costs one hash and one dict lookup instead of a signature
check and a claims parse. Only tokens that passed every check are cached, and ``exp`` is checked
again on every hit; a refused token is never cached, so each refusal is counted and logged. The
trade-off: a JWKS key withdrawn before its tokens expire keeps verifying those tokens (already
verified, with that key) until they expire.

:class:`JwksCache` fetches a JWKS document with aiohttp (never blocking the event loop), keeps it
for its ``max-age`` (clamped to the configured bounds), shares one in-flight fetch between
concurrent misses, and refetches for an unknown ``kid`` at most once per cooldown. When no
fresh key set is available it fails closed.

What this is not: authorization of topics and scopes (the protocol session and the HTTP handlers
do that with the :class:`Principal`), nor a token issuer for production (:func:`mint_token` is
for development and tests).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import dataclasses
import hashlib
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import aiohttp
import jwt
import structlog
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.api_jws import PyJWS
from oa_sync_core.codec import loads_strict
from oa_sync_core.errors import CodecError
from oa_sync_core.topics import Grant

from oa_sync_server.config import MIN_HS256_SECRET_BYTES, MIN_RSA_BITS, JwtSettings, Secret
from oa_sync_server.errors import AuthError, AuthFailure, ConfigError
from oa_sync_server.metrics import Metrics

__all__ = [
    "MAX_TOKEN_BYTES",
    "SCOPES",
    "JwksCache",
    "Principal",
    "TokenVerifier",
    "mint_token",
]

MAX_TOKEN_BYTES: Final = 8192
"""Longest token accepted; anything longer is refused before any decoding."""
MAX_JWKS_BYTES: Final = 256 * 1024
MAX_SUBJECT_LENGTH: Final = 256
MAX_GRANT_TOPICS: Final = 256
MAX_NUMERIC_DATE: Final = 253402300799  # 9999-12-31T23:59:59Z
TOKEN_CACHE_SIZE: Final = 10_000
"""Verified tokens remembered per verifier (the oldest is forgotten first)."""
SCOPES: Final = frozenset({"sync:read", "sync:append", "sync:admin"})
_ASYMMETRIC: Final = frozenset({"RS256", "ES256"})
_TYP: Final = frozenset({"jwt", "at+jwt", "application/at+jwt"})
_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")

_log = structlog.get_logger(__name__)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Principal:
    """Who a verified token speaks for, and what it may do.

    Attributes:
        subject: the ``sub`` claim.
        grant: the topics the token may read (``oa_topics``).
        scopes: the known scopes of ``oa_scopes``.
        expires_at: ``exp``, seconds since the epoch.
        issued_at: ``iat``, seconds since the epoch.
    """

    subject: str
    grant: Grant
    scopes: frozenset[str]
    expires_at: float
    issued_at: float

    def has_scope(self, scope: str) -> bool:
        """Whether the token carries ``scope`` (``sync:admin`` implies every scope)."""
        return scope in self.scopes or "sync:admin" in self.scopes


# ---------------------------------------------------------------------------------------------
# JWKS
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Key:
    algorithm: str
    key: Any


def _parse_jwks(data: object) -> dict[str, _Key]:
    """Usable signing keys of a JWKS document by ``kid``; unusable entries are skipped."""
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError("not a JWKS document")
    keys: dict[str, _Key] = {}
    for jwk in data["keys"]:
        if not isinstance(jwk, dict):
            continue
        kid, kty, use, alg = (jwk.get(k) for k in ("kid", "kty", "use", "alg"))
        if not isinstance(kid, str) or not kid or use not in (None, "sig"):
            continue
        if kty == "RSA":
            expected = "RS256"
        elif kty == "EC" and jwk.get("crv") == "P-256":
            expected = "ES256"
        else:
            continue  # symmetric keys do not belong in a public JWKS; other curves unsupported
        if alg is not None and alg != expected:
            continue
        try:
            key = jwt.PyJWK(jwk, algorithm=expected).key
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            continue
        if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
            continue
        keys[kid] = _Key(expected, key)
    return keys


def _max_age(cache_control: str | None) -> float | None:
    if not cache_control:
        return None
    match = re.search(r"(?:^|[,\s])max-age\s*=\s*\"?([0-9]{1,9})", cache_control)
    return float(match.group(1)) if match else None


class JwksCache:
    """A JWKS document fetched on demand and cached.

    Args:
        url: the JWKS URL.
        session: the aiohttp session to fetch with.
        max_age_s: the longest a fetched document is trusted; a shorter ``max-age`` in the
            response wins, but never shorter than ``cooldown_s``.
        cooldown_s: the least time between two fetches (unknown ``kid``, or after a failure).
        timeout_s: total time of one fetch.
        clock: a monotonic clock (injectable for tests).
    """

    def __init__(
        self,
        url: str,
        *,
        session: aiohttp.ClientSession,
        max_age_s: float,
        cooldown_s: float,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._url = url
        self._session = session
        self._max_age_s = max_age_s
        self._cooldown_s = cooldown_s
        self._timeout_s = timeout_s
        self._clock = clock
        self._keys: dict[str, _Key] = {}
        self._expires_at = -math.inf
        self._last_fetch_at: float | None = None
        self._inflight: asyncio.Task[bool] | None = None
        self.fetches = 0
        """How many fetches were started (for tests and metrics)."""

    async def key_for(self, kid: str) -> _Key:
        """The key of ``kid``, fetching the JWKS if needed.

        Raises:
            AuthError: ``unknown_key`` when the fresh key set has no such ``kid``;
                ``keys_unavailable`` when no fresh key set could be had (fail closed).
        """
        now = self._clock()
        fresh = now < self._expires_at
        if fresh and kid in self._keys:
            return self._keys[kid]
        if self._inflight is None:
            recently = (
                self._last_fetch_at is not None and now - self._last_fetch_at < self._cooldown_s
            )
            if recently:
                if fresh:
                    raise AuthError(AuthFailure.UNKNOWN_KEY, "no key with this kid")
                raise AuthError(AuthFailure.KEYS_UNAVAILABLE, "signing keys unavailable")
            self._inflight = asyncio.create_task(self._fetch())
        ok = await asyncio.shield(self._inflight)
        if self._clock() < self._expires_at:
            if kid in self._keys:
                return self._keys[kid]
            raise AuthError(AuthFailure.UNKNOWN_KEY, "no key with this kid")
        raise AuthError(
            AuthFailure.KEYS_UNAVAILABLE if not ok else AuthFailure.UNKNOWN_KEY,
            "signing keys unavailable",
        )

    def fresh_key(self, kid: str) -> _Key | None:
        """The key of ``kid`` if the key set is fresh and has it; never fetches."""
        return self._keys.get(kid) if self._clock() < self._expires_at else None

    async def _fetch(self) -> bool:
        self.fetches += 1
        self._last_fetch_at = self._clock()
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._session.get(
                    self._url,
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=self._timeout_s),
                    headers={"Accept": "application/json"},
                ) as response:
                    if response.status != 200:
                        raise ValueError(f"status {response.status}")
                    # read(n) returns what has arrived, not n bytes: gather to the end.
                    body = bytearray()
                    async for chunk in response.content.iter_chunked(64 * 1024):
                        body += chunk
                        if len(body) > MAX_JWKS_BYTES:
                            raise ValueError("document too large")
                    header_age = _max_age(response.headers.get("Cache-Control"))
            keys = _parse_jwks(loads_strict(bytes(body), max_bytes=MAX_JWKS_BYTES))
        except (aiohttp.ClientError, TimeoutError, CodecError, ValueError) as exc:
            _log.warning("jwks_fetch_failed", url=self._url, error=type(exc).__name__)
            return False
        finally:
            self._inflight = None
        ttl = self._max_age_s if header_age is None else min(header_age, self._max_age_s)
        self._keys = keys
        self._expires_at = self._clock() + max(ttl, min(self._cooldown_s, self._max_age_s))
        _log.info("jwks_fetched", url=self._url, keys=len(keys))
        return True


# ---------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------


def _b64_json(segment: str, what: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        value = loads_strict(raw, max_bytes=MAX_TOKEN_BYTES)
    except (binascii.Error, ValueError):  # CodecError is a ValueError
        raise AuthError(AuthFailure.MALFORMED, f"{what} is not base64url JSON") from None
    if not isinstance(value, dict):
        raise AuthError(AuthFailure.MALFORMED, f"{what} is not a JSON object")
    return value


def _numeric_date(claims: Mapping[str, Any], name: str, *, required: bool) -> float | None:
    if name not in claims:
        if required:
            raise AuthError(AuthFailure.MISSING_CLAIM, f"{name} is required", claim=name)
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuthError(AuthFailure.INVALID_CLAIM, f"{name} must be a number", claim=name)
    if not (isinstance(value, int) or math.isfinite(value)) or not (0 <= value <= MAX_NUMERIC_DATE):
        raise AuthError(AuthFailure.INVALID_CLAIM, f"{name} is out of range", claim=name)
    return float(value)


def _required_date(claims: Mapping[str, Any], name: str) -> float:
    value = _numeric_date(claims, name, required=True)
    if value is None:  # pragma: no cover - _numeric_date raises first
        raise AuthError(AuthFailure.MISSING_CLAIM, f"{name} is required", claim=name)
    return value


def _string_list(claims: Mapping[str, Any], name: str, limit: int) -> list[str]:
    value = claims.get(name, [])
    if (
        not isinstance(value, list)
        or len(value) > limit
        or not all(isinstance(item, str) for item in value)
    ):
        raise AuthError(AuthFailure.INVALID_CLAIM, f"{name} must be a list of strings", claim=name)
    return value


class TokenVerifier:
    """Verifies bearer tokens against the configured keys.

    Args:
        settings: the JWT settings (at least one key must be configured for any token to pass).
        session: aiohttp session for JWKS fetches; one is created (and closed by
            :meth:`close`) when a JWKS URL is configured and none is given.
        clock: wall clock in seconds since the epoch, for ``exp``/``nbf``/``iat``.
        monotonic: monotonic clock for the JWKS cache.
        metrics: when given, every refused token counts in ``auth_failures`` by reason.
        cache_size: verified tokens remembered until their ``exp`` (0: verify every time).

    Raises:
        ConfigError: an HS256 secret shorter than 32 bytes (refused however the settings were
            built, not only from the environment).
    """

    def __init__(
        self,
        settings: JwtSettings,
        *,
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
        cache_size: int = TOKEN_CACHE_SIZE,
    ):
        self._settings = settings
        self._cache_size = cache_size
        # sha256(token) -> (principal, the JWKS kid and key it verified with, if any)
        self._cache: collections.OrderedDict[bytes, tuple[Principal, str | None, _Key | None]] = (
            collections.OrderedDict()
        )
        self._metrics = metrics
        self._clock = clock
        self._leeway = min(settings.leeway_s, 60.0)
        self._owned_session: aiohttp.ClientSession | None = None
        self._hs256 = settings.hs256_secret.reveal().encode() if settings.hs256_secret else None
        if self._hs256 is not None and len(self._hs256) < MIN_HS256_SECRET_BYTES:
            raise ConfigError(
                "OA_SYNC_JWT_HS256_SECRET",
                f"must be at least {MIN_HS256_SECRET_BYTES} bytes long (refusing a weak secret)",
            )
        self._public: _Key | None = None
        if settings.public_key is not None:
            pem_key = jwt.algorithms.get_default_algorithms()[
                settings.public_key.algorithm
            ].prepare_key(settings.public_key.pem)
            self._public = _Key(settings.public_key.algorithm, pem_key)
        self.jwks: JwksCache | None = None
        if settings.jwks_url is not None:
            if session is None:
                session = self._owned_session = aiohttp.ClientSession()
            self.jwks = JwksCache(
                settings.jwks_url,
                session=session,
                max_age_s=settings.jwks_max_age_s,
                cooldown_s=settings.jwks_cooldown_s,
                timeout_s=settings.jwks_timeout_s,
                clock=monotonic,
            )

    async def close(self) -> None:
        """Close the aiohttp session this verifier created, if any."""
        if self._owned_session is not None:
            await self._owned_session.close()

    async def verify(self, token: object) -> Principal:
        """Verify a bearer token.

        Args:
            token: the compact JWT (anything else is refused as malformed).

        Returns:
            The :class:`Principal` the token speaks for.

        Raises:
            AuthError: always with a reason, for every way a token can be wrong; never any
                other exception.
        """
        digest = b""
        if isinstance(token, str) and len(token) <= MAX_TOKEN_BYTES:
            digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        cached = self._cache.get(digest) if digest else None
        if cached is not None:
            principal, kid, key = cached
            still_current = kid is None or (
                self.jwks is not None and self.jwks.fresh_key(kid) is key
            )
            if still_current and self._clock() <= principal.expires_at + self._leeway:
                return principal
            del self._cache[digest]  # expired, or its key rotated out or not fresh: verify
        try:
            principal, kid, key = await self._verify(token)
        except AuthError as exc:
            if self._metrics is not None:
                self._metrics.auth_failures.labels(reason=exc.reason.value).inc()
            _log.debug("token_refused", reason=exc.reason.value, claim=exc.claim)
            raise
        if self._cache_size > 0 and digest:
            self._cache[digest] = (principal, kid, key)
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return principal

    async def _verify(self, token: object) -> tuple[Principal, str | None, _Key | None]:
        """The principal, and the JWKS ``kid`` and key it was verified with (``None, None``
        for a configured static key)."""
        if not isinstance(token, str) or not token:
            raise AuthError(AuthFailure.MISSING, "no token")
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthError(AuthFailure.TOO_LARGE, f"token longer than {MAX_TOKEN_BYTES}")
        segments = token.split(".")
        if len(segments) != 3 or not all(_SEGMENT.fullmatch(s) for s in segments):
            raise AuthError(AuthFailure.MALFORMED, "not a compact JWS of three segments")
        header = _b64_json(segments[0], "header")
        algorithm, kid = self._check_header(header)
        key = await self._key(algorithm, kid)
        try:
            decoded = PyJWS(algorithms=[key.algorithm]).decode_complete(
                token, key=key.key, algorithms=[key.algorithm]
            )
        except jwt.InvalidSignatureError:
            raise AuthError(AuthFailure.BAD_SIGNATURE, "signature does not verify") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise AuthError(AuthFailure.MALFORMED, "token does not decode") from None
        payload = decoded.get("payload")
        if not isinstance(payload, bytes):
            raise AuthError(AuthFailure.MALFORMED, "payload does not decode")
        try:
            claims = loads_strict(payload, max_bytes=MAX_TOKEN_BYTES)
        except CodecError:
            raise AuthError(AuthFailure.MALFORMED, "payload is not strict JSON") from None
        if not isinstance(claims, dict):
            raise AuthError(AuthFailure.MALFORMED, "payload is not a JSON object")
        from_jwks = kid is not None and self.jwks is not None and key.algorithm in _ASYMMETRIC
        if from_jwks and key is not self._public:
            return self._principal(claims), kid, key
        return self._principal(claims), None, None

    def _check_header(self, header: Mapping[str, Any]) -> tuple[str, str | None]:
        algorithm = header.get("alg")
        if not isinstance(algorithm, str):
            raise AuthError(AuthFailure.MALFORMED, "alg missing", claim="alg")
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.lower() not in _TYP):
            raise AuthError(AuthFailure.MALFORMED, "typ must be JWT or at+jwt", claim="typ")
        if "crit" in header:
            raise AuthError(AuthFailure.MALFORMED, "crit extensions unsupported", claim="crit")
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or not 0 < len(kid) <= 256):
            raise AuthError(AuthFailure.MALFORMED, "kid must be a short string", claim="kid")
        return algorithm, kid

    async def _key(self, algorithm: str, kid: str | None) -> _Key:
        if algorithm == "HS256" and self._hs256 is not None:
            return _Key("HS256", self._hs256)
        if algorithm in _ASYMMETRIC:
            if kid is not None and self.jwks is not None:
                key = await self.jwks.key_for(kid)
                if key.algorithm != algorithm:
                    raise AuthError(AuthFailure.UNSUPPORTED_ALGORITHM, "alg does not match key")
                return key
            if self._public is not None and self._public.algorithm == algorithm:
                return self._public
            if self.jwks is not None:
                raise AuthError(AuthFailure.UNKNOWN_KEY, "kid required", claim="kid")
        raise AuthError(AuthFailure.UNSUPPORTED_ALGORITHM, "algorithm not accepted", claim="alg")

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        now = self._clock()
        expires_at = _required_date(claims, "exp")
        issued_at = _required_date(claims, "iat")
        not_before = _numeric_date(claims, "nbf", required=False)
        if now > expires_at + self._leeway:
            raise AuthError(AuthFailure.EXPIRED, "token expired", claim="exp")
        if issued_at > now + self._leeway:
            raise AuthError(AuthFailure.NOT_YET_VALID, "issued in the future", claim="iat")
        if not_before is not None and not_before > now + self._leeway:
            raise AuthError(AuthFailure.NOT_YET_VALID, "not valid yet", claim="nbf")
        for name in ("iss", "aud", "sub"):
            if name not in claims:
                raise AuthError(AuthFailure.MISSING_CLAIM, f"{name} is required", claim=name)
        issuer = claims["iss"]
        if not isinstance(issuer, str):
            raise AuthError(AuthFailure.INVALID_CLAIM, "iss must be a string", claim="iss")
        if issuer != self._settings.issuer:
            raise AuthError(AuthFailure.WRONG_ISSUER, "issuer not accepted", claim="iss")
        audience = claims["aud"]
        audiences = [audience] if isinstance(audience, str) else audience
        if (
            not isinstance(audiences, list)
            or not audiences
            or not all(isinstance(a, str) for a in audiences)
        ):
            raise AuthError(
                AuthFailure.INVALID_CLAIM, "aud must be a string or strings", claim="aud"
            )
        if self._settings.audience not in audiences:
            raise AuthError(AuthFailure.WRONG_AUDIENCE, "audience not accepted", claim="aud")
        subject = claims["sub"]
        if (
            not isinstance(subject, str)
            or not 0 < len(subject) <= MAX_SUBJECT_LENGTH
            or not subject.isprintable()
        ):
            raise AuthError(AuthFailure.INVALID_CLAIM, "sub must be a short string", claim="sub")
        try:
            grant = Grant.parse(_string_list(claims, "oa_topics", MAX_GRANT_TOPICS))
        except ValueError:
            raise AuthError(
                AuthFailure.INVALID_CLAIM, "oa_topics holds a bad pattern", claim="oa_topics"
            ) from None
        scopes = frozenset(_string_list(claims, "oa_scopes", 64)) & SCOPES
        return Principal(
            subject=subject,
            grant=grant,
            scopes=scopes,
            expires_at=expires_at,
            issued_at=issued_at,
        )


def mint_token(
    secret: Secret | str,
    *,
    subject: str,
    topics: Iterable[str],
    scopes: Iterable[str] = ("sync:read",),
    ttl_s: float = 3600.0,
    issuer: str = "oa-sync",
    audience: str = "oa-sync",
    now: float | None = None,
) -> str:
    """Mint an HS256 token for development and tests.

    Args:
        secret: the shared secret (at least 32 bytes).
        subject: ``sub``.
        topics: ``oa_topics`` patterns.
        scopes: ``oa_scopes``.
        ttl_s: lifetime in seconds; the token is valid for at least this long (``exp`` is
            rounded up to the whole second, ``iat`` down: claims are integers).
        issuer: ``iss``.
        audience: ``aud``.
        now: issue time in seconds since the epoch (default: now).

    Returns:
        The compact JWT.

    Raises:
        ValueError: the secret is too short, or a topic pattern is malformed.
    """
    raw = secret.reveal() if isinstance(secret, Secret) else secret
    if len(raw.encode()) < MIN_HS256_SECRET_BYTES:
        raise ValueError(f"an HS256 secret is at least {MIN_HS256_SECRET_BYTES} bytes")
    topic_list = list(topics)
    Grant.parse(topic_list)
    moment = time.time() if now is None else now
    claims = {
        "sub": subject,
        "iss": issuer,
        "aud": audience,
        "iat": int(moment),
        "exp": math.ceil(moment + ttl_s),
        "oa_topics": topic_list,
        "oa_scopes": list(scopes),
    }
    return jwt.encode(claims, raw, algorithm="HS256", headers={"typ": "JWT"})
