"""Token verification: the JWT matrix of issue 5, JWKS caching over a real local server."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from oa_sync_server.auth import (
    MAX_GRANT_TOPICS,
    MAX_JWKS_BYTES,
    MAX_SUBJECT_LENGTH,
    MAX_TOKEN_BYTES,
    Principal,
    TokenVerifier,
    mint_token,
)
from oa_sync_server.config import JwtSettings, PublicKeySpec, Secret
from oa_sync_server.errors import AuthError, AuthFailure

from tests.profiles import examples

SECRET = "k" * 40
NOW = 1_900_000_000.0


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "sub": "user-1",
        "iss": "oa-sync",
        "aud": "oa-sync",
        "iat": int(NOW) - 10,
        "exp": int(NOW) + 600,
        "oa_topics": ["runtime/run_summary:*"],
        "oa_scopes": ["sync:read"],
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not _DROP}


_DROP = object()


def hs256(payload: dict[str, Any] | str, *, secret: bytes = SECRET.encode(), **header: Any) -> str:
    """Hand-craft an HS256 token (so claims of any JSON shape can be signed)."""
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", **header}).encode())
    body = b64((payload if isinstance(payload, str) else json.dumps(payload)).encode())
    signature = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(signature)}"


@dataclass
class FakeClock:
    now: float

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_key_2() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def hs_verifier(**jwt_settings: Any) -> TokenVerifier:
    return TokenVerifier(
        JwtSettings(hs256_secret=Secret(SECRET), **jwt_settings), clock=FakeClock(NOW)
    )


async def assert_refused(verifier: TokenVerifier, token: object, reason: AuthFailure) -> None:
    with pytest.raises(AuthError) as info:
        await verifier.verify(token)
    assert info.value.reason is reason, str(info.value)


# ---------------------------------------------------------------------------------------------
# The matrix
# ---------------------------------------------------------------------------------------------


async def test_valid_hs256_token_gives_a_principal() -> None:
    """A correctly signed token with every required claim yields its Principal."""
    token = mint_token(
        SECRET,
        subject="user-1",
        topics=["runtime/run_summary:*"],
        scopes=["sync:read", "sync:append", "other:thing"],
        now=NOW - 5,
    )
    principal = await hs_verifier().verify(token)
    assert isinstance(principal, Principal)
    assert principal.subject == "user-1"
    assert principal.grant.allows("runtime/run_summary:r1")
    assert not principal.grant.allows("runtime/codex_worker_summary:w1")
    assert principal.scopes == frozenset({"sync:read", "sync:append"})
    assert principal.expires_at == int(NOW - 5) + 3600
    assert principal.has_scope("sync:append")
    assert not principal.has_scope("sync:admin")


async def test_token_text_never_appears_in_errors() -> None:
    """AuthError messages never repeat the token."""
    token = hs256(claims(aud="elsewhere"))
    with pytest.raises(AuthError) as info:
        await hs_verifier().verify(token)
    assert token not in str(info.value)
    assert token.split(".")[1] not in str(info.value)


@pytest.mark.parametrize(
    ("name", "payload", "reason"),
    [
        ("expired", claims(exp=int(NOW) - 100), AuthFailure.EXPIRED),
        ("not yet valid", claims(nbf=int(NOW) + 100), AuthFailure.NOT_YET_VALID),
        ("issued in the future", claims(iat=int(NOW) + 100), AuthFailure.NOT_YET_VALID),
        ("missing exp", claims(exp=_DROP), AuthFailure.MISSING_CLAIM),
        ("missing iat", claims(iat=_DROP), AuthFailure.MISSING_CLAIM),
        ("missing iss", claims(iss=_DROP), AuthFailure.MISSING_CLAIM),
        ("missing aud", claims(aud=_DROP), AuthFailure.MISSING_CLAIM),
        ("missing sub", claims(sub=_DROP), AuthFailure.MISSING_CLAIM),
        ("wrong aud", claims(aud="another-service"), AuthFailure.WRONG_AUDIENCE),
        ("wrong aud in list", claims(aud=["a", "b"]), AuthFailure.WRONG_AUDIENCE),
        ("iss prefix", claims(iss="oa-syn"), AuthFailure.WRONG_ISSUER),
        ("iss superstring", claims(iss="oa-sync-evil"), AuthFailure.WRONG_ISSUER),
        ("iss with case", claims(iss="OA-SYNC"), AuthFailure.WRONG_ISSUER),
        ("exp list", claims(exp=[]), AuthFailure.INVALID_CLAIM),
        ("exp string", claims(exp="1900000600"), AuthFailure.INVALID_CLAIM),
        ("exp bool", claims(exp=True), AuthFailure.INVALID_CLAIM),
        ("exp huge int", claims(exp=10**30), AuthFailure.INVALID_CLAIM),
        ("exp negative", claims(exp=-1), AuthFailure.INVALID_CLAIM),
        ("nbf null", claims(nbf=None), AuthFailure.INVALID_CLAIM),
        ("iat object", claims(iat={}), AuthFailure.INVALID_CLAIM),
        ("aud non-strings", claims(aud=[1, 2]), AuthFailure.INVALID_CLAIM),
        ("aud mixed", claims(aud=["oa-sync", None]), AuthFailure.INVALID_CLAIM),
        ("aud empty list", claims(aud=[]), AuthFailure.INVALID_CLAIM),
        ("iss number", claims(iss=7), AuthFailure.INVALID_CLAIM),
        ("sub empty", claims(sub=""), AuthFailure.INVALID_CLAIM),
        ("sub number", claims(sub=12), AuthFailure.INVALID_CLAIM),
        ("topics string", claims(oa_topics="*"), AuthFailure.INVALID_CLAIM),
        ("topics bad pattern", claims(oa_topics=["a*b"]), AuthFailure.INVALID_CLAIM),
        ("topics non-strings", claims(oa_topics=[1]), AuthFailure.INVALID_CLAIM),
        ("scopes dict", claims(oa_scopes={"sync:read": True}), AuthFailure.INVALID_CLAIM),
    ],
)
async def test_bad_claims_are_refused_with_their_reason(
    name: str, payload: dict[str, Any], reason: AuthFailure
) -> None:
    """Correctly signed tokens with wrong, missing or mistyped claims raise AuthError."""
    await assert_refused(hs_verifier(), hs256(payload), reason)


async def test_leeway_accepts_small_skew_only() -> None:
    """An exp 20 s in the past passes with 30 s leeway; with 0 s leeway it is expired."""
    token = hs256(claims(exp=int(NOW) - 20))
    assert (await hs_verifier().verify(token)).subject == "user-1"
    await assert_refused(hs_verifier(leeway_s=0), token, AuthFailure.EXPIRED)


@pytest.mark.parametrize(
    ("name", "raw_payload", "reason"),
    [
        (
            "exp 1e400",
            '{"sub":"u","iss":"oa-sync","aud":"oa-sync","iat":1,"exp":1e400}',
            AuthFailure.MALFORMED,
        ),
        (
            "exp NaN",
            '{"sub":"u","iss":"oa-sync","aud":"oa-sync","iat":1,"exp":NaN}',
            AuthFailure.MALFORMED,
        ),
        (
            "duplicate exp",
            '{"sub":"u","iss":"oa-sync","aud":"oa-sync","iat":1,"exp":1,"exp":2000000000}',
            AuthFailure.MALFORMED,
        ),
        ("payload array", "[1, 2]", AuthFailure.MALFORMED),
        ("payload not json", "not json", AuthFailure.MALFORMED),
        ("deep nesting", '{"x":' * 100 + "1" + "}" * 100, AuthFailure.MALFORMED),
    ],
)
async def test_hand_crafted_payloads_are_malformed(
    name: str, raw_payload: str, reason: AuthFailure
) -> None:
    """Signed payloads that are not strict JSON objects are refused as malformed."""
    await assert_refused(hs_verifier(), hs256(raw_payload), reason)


async def test_alg_none_is_refused() -> None:
    """An unsigned token (alg none, empty signature) is refused."""
    head = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims()).encode())
    await assert_refused(hs_verifier(), f"{head}.{body}.", AuthFailure.UNSUPPORTED_ALGORITHM)
    await assert_refused(hs_verifier(), f"{head}.{body}.x", AuthFailure.UNSUPPORTED_ALGORITHM)
    head_none = b64(json.dumps({"alg": "None"}).encode())
    await assert_refused(hs_verifier(), f"{head_none}.{body}.", AuthFailure.UNSUPPORTED_ALGORITHM)


async def test_hs256_signed_with_the_rsa_public_key_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    """Algorithm confusion: HS256 keyed with the RSA public key never verifies."""
    pem = public_pem(rsa_key)
    forged = hs256(claims(), secret=pem)
    spec = PublicKeySpec(path=Path("rsa.pem"), algorithm="RS256", pem=pem)
    both = TokenVerifier(
        JwtSettings(hs256_secret=Secret(SECRET), public_key=spec), clock=FakeClock(NOW)
    )
    await assert_refused(both, forged, AuthFailure.BAD_SIGNATURE)
    rsa_only = TokenVerifier(JwtSettings(public_key=spec), clock=FakeClock(NOW))
    await assert_refused(rsa_only, forged, AuthFailure.UNSUPPORTED_ALGORITHM)
    genuine = jwt.encode(claims(), rsa_key, algorithm="RS256")
    assert (await rsa_only.verify(genuine)).subject == "user-1"


async def test_rs256_is_refused_where_only_hs256_is_configured(rsa_key: rsa.RSAPrivateKey) -> None:
    """A validly RS256-signed token is refused by a verifier holding only an HS256 secret."""
    token = jwt.encode(claims(), rsa_key, algorithm="RS256")
    await assert_refused(hs_verifier(), token, AuthFailure.UNSUPPORTED_ALGORITHM)


async def test_es256_public_key_file_is_pinned(
    ec_key: ec.EllipticCurvePrivateKey, rsa_key: rsa.RSAPrivateKey
) -> None:
    """An ES256 key accepts ES256 tokens and refuses RS256 and HS256 ones."""
    spec = PublicKeySpec(path=Path("ec.pem"), algorithm="ES256", pem=public_pem(ec_key))
    verifier = TokenVerifier(JwtSettings(public_key=spec), clock=FakeClock(NOW))
    assert (await verifier.verify(jwt.encode(claims(), ec_key, algorithm="ES256"))).subject
    await assert_refused(
        verifier,
        jwt.encode(claims(), rsa_key, algorithm="RS256"),
        AuthFailure.UNSUPPORTED_ALGORITHM,
    )
    await assert_refused(verifier, hs256(claims()), AuthFailure.UNSUPPORTED_ALGORITHM)
    other = ec.generate_private_key(ec.SECP256R1())
    await assert_refused(
        verifier, jwt.encode(claims(), other, algorithm="ES256"), AuthFailure.BAD_SIGNATURE
    )


async def test_wrong_secret_is_a_bad_signature() -> None:
    """An HS256 token signed with another secret is refused."""
    await assert_refused(
        hs_verifier(), hs256(claims(), secret=b"x" * 40), AuthFailure.BAD_SIGNATURE
    )


async def test_segment_counts_and_garbage_are_malformed() -> None:
    """Two- and four-segment tokens, bad base64 and non-JSON headers are malformed."""
    good = hs256(claims())
    head, body, sig = good.split(".")
    verifier = hs_verifier()
    for token in (
        f"{head}.{body}",
        f"{head}.{body}.{sig}.{sig}",
        "a.b.c",
        f"{head}.{body}.{sig}=",
        f"{head}!.{body}.{sig}",
        f"{b64(b'not json')}.{body}.{sig}",
        f"{b64(b'[1]')}.{body}.{sig}",
        f"{b64(json.dumps({'typ': 'JWT'}).encode())}.{body}.{sig}",
        f"{b64(json.dumps({'alg': 7}).encode())}.{body}.{sig}",
        "..",
        " " + good,
        "Bearer " + good,
    ):
        await assert_refused(verifier, token, AuthFailure.MALFORMED)
    for token in ("", None, 12, b"bytes", ["list"]):
        await assert_refused(verifier, token, AuthFailure.MISSING)


async def test_header_typ_and_crit_are_checked() -> None:
    """typ must be JWT or at+jwt when present; a crit header is refused."""
    verifier = hs_verifier()
    assert (await verifier.verify(hs256(claims(), typ="at+jwt"))).subject == "user-1"
    await assert_refused(verifier, hs256(claims(), typ="JWS"), AuthFailure.MALFORMED)
    await assert_refused(verifier, hs256(claims(), typ=1), AuthFailure.MALFORMED)
    await assert_refused(verifier, hs256(claims(), crit=["exp"]), AuthFailure.MALFORMED)
    await assert_refused(verifier, hs256(claims(), kid=""), AuthFailure.MALFORMED)


async def test_huge_token_is_refused_before_decoding() -> None:
    """A token longer than the limit is refused as too large."""
    token = hs256(claims(padding="x" * MAX_TOKEN_BYTES))
    await assert_refused(hs_verifier(), token, AuthFailure.TOO_LARGE)
    await assert_refused(hs_verifier(), "a" * 10_000_000, AuthFailure.TOO_LARGE)


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=300), st.binary(max_size=200).map(lambda b: b64(b) + ".e30.")))
async def test_arbitrary_text_only_ever_raises_auth_error(text: str) -> None:
    """No string, however malformed, makes verify raise anything but AuthError."""
    with pytest.raises(AuthError):
        await hs_verifier().verify(text)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


_CLAIMS: Final = ("sub", "iss", "aud", "iat", "exp", "nbf", "oa_topics", "oa_scopes")
_VALID: Final = "valid"
_ABSENT: Final = "absent"
# Per claim: keep the valid value (most often, so valid tokens do occur), drop it, or put any
# JSON value in its place.
_claim_plans = st.fixed_dictionaries(
    {name: st.one_of(st.just(_VALID), st.just(_VALID), st.just(_ABSENT), _json) for name in _CLAIMS}
)
_ALL_VALID: Final = dict.fromkeys(_CLAIMS, _VALID)


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_claim_plans)
@example(_ALL_VALID)
async def test_signed_claims_of_any_shape_never_crash(plan: dict[str, Any]) -> None:
    """Correctly signed tokens whose claims are each valid, absent or any JSON value give a
    Principal or an AuthError, never a crash; when every claim is valid, a Principal."""
    valid = claims(nbf=int(NOW) - 10)  # the verifier's clock is NOW
    payload = {
        name: valid[name] if choice == _VALID else choice
        for name, choice in plan.items()
        if choice != _ABSENT
    }
    try:
        principal = await hs_verifier().verify(hs256(payload))
    except AuthError:
        assert plan != _ALL_VALID
        return
    assert principal.subject == payload["sub"]


# ---------------------------------------------------------------------------------------------
# JWKS over a real local aiohttp server
# ---------------------------------------------------------------------------------------------


@dataclass
class JwksServer:
    url: str = ""
    keys: list[dict[str, Any]] = field(default_factory=list)
    hits: int = 0
    status: int = 200
    cache_control: str | None = None
    redirect: bool = False  # answer 302 to /moved.json, which serves the keys
    padding: int = 0  # bytes of filler in the document (to test the size cap)
    moved_hits: int = 0
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    requested: asyncio.Event = field(default_factory=asyncio.Event)


def jwk(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        data = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        data["alg"] = "RS256"
    else:
        data = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
        data["alg"] = "ES256"
    return {**data, "kid": kid, "use": "sig"}


@pytest.fixture
async def jwks_server() -> AsyncIterator[JwksServer]:
    server = JwksServer()
    server.gate.set()

    async def handle(_request: web.Request) -> web.Response:
        server.hits += 1
        server.requested.set()
        await server.gate.wait()
        headers = {"Cache-Control": server.cache_control} if server.cache_control else {}
        if server.redirect:
            raise web.HTTPFound("/moved.json")
        document: dict[str, Any] = {"keys": server.keys}
        if server.padding:
            document["padding"] = "x" * server.padding
        return web.json_response(document, status=server.status, headers=headers)

    async def moved(_request: web.Request) -> web.Response:
        server.moved_hits += 1
        return web.json_response({"keys": server.keys})

    app = web.Application()
    app.router.add_get("/jwks.json", handle)
    app.router.add_get("/moved.json", moved)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server.url = f"http://127.0.0.1:{port}/jwks.json"
    yield server
    server.gate.set()
    await runner.cleanup()


@pytest.fixture
async def http_session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def jwks_verifier(
    server: JwksServer, session: aiohttp.ClientSession, clock: FakeClock, **extra: Any
) -> TokenVerifier:
    jwt_settings = JwtSettings(
        jwks_url=server.url,
        jwks_cooldown_s=30,
        jwks_max_age_s=300,
        jwks_timeout_s=extra.pop("timeout", 2.0),
        **extra,
    )
    return TokenVerifier(jwt_settings, session=session, clock=FakeClock(NOW), monotonic=clock)


def signed(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str, **claim: Any) -> str:
    alg = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
    return jwt.encode(claims(**claim), key, algorithm=alg, headers={"kid": kid})


async def test_jwks_keys_verify_and_are_cached(
    jwks_server: JwksServer,
    http_session: aiohttp.ClientSession,
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    """RS256 and ES256 keys of a JWKS verify their tokens, fetched once and cached."""
    jwks_server.keys = [jwk(rsa_key, "r1"), jwk(ec_key, "e1")]
    verifier = jwks_verifier(jwks_server, http_session, FakeClock(0))
    for _ in range(5):
        assert (await verifier.verify(signed(rsa_key, "r1"))).subject == "user-1"
        assert (await verifier.verify(signed(ec_key, "e1"))).subject == "user-1"
    assert jwks_server.hits == 1
    # The kid's key is pinned to its own algorithm: an RS256 key cannot check ES256 claims.
    forged = jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "r1"})
    await assert_refused(verifier, forged, AuthFailure.UNSUPPORTED_ALGORITHM)
    # HS256 is never looked up in a JWKS, whatever kid it names.
    await assert_refused(verifier, hs256(claims(), kid="r1"), AuthFailure.UNSUPPORTED_ALGORITHM)
    # RS256 without a kid cannot pick a JWKS key.
    no_kid = jwt.encode(claims(), rsa_key, algorithm="RS256")
    await assert_refused(verifier, no_kid, AuthFailure.UNKNOWN_KEY)


async def test_jwks_rotation_is_accepted_after_one_refetch(
    jwks_server: JwksServer,
    http_session: aiohttp.ClientSession,
    rsa_key: rsa.RSAPrivateKey,
    rsa_key_2: rsa.RSAPrivateKey,
) -> None:
    """After the issuer rotates to a new kid, one refetch makes its tokens verify."""
    clock = FakeClock(0)
    jwks_server.keys = [jwk(rsa_key, "old")]
    verifier = jwks_verifier(jwks_server, http_session, clock)
    await verifier.verify(signed(rsa_key, "old"))
    assert jwks_server.hits == 1
    jwks_server.keys = [jwk(rsa_key_2, "new")]
    clock.now += 31  # past the unknown-kid cooldown, well within max age
    assert (await verifier.verify(signed(rsa_key_2, "new"))).subject == "user-1"
    assert jwks_server.hits == 2
    await assert_refused(verifier, signed(rsa_key, "old"), AuthFailure.UNKNOWN_KEY)
    assert jwks_server.hits == 2


async def test_random_kid_flood_fetches_at_most_once_per_cooldown(
    jwks_server: JwksServer, http_session: aiohttp.ClientSession, rsa_key: rsa.RSAPrivateKey
) -> None:
    """Hundreds of random kids cause one shared fetch per cooldown, each refused."""
    clock = FakeClock(0)
    jwks_server.keys = [jwk(rsa_key, "real")]
    verifier = jwks_verifier(jwks_server, http_session, clock)
    for round_ in range(3):
        tokens = [signed(rsa_key, uuid.uuid4().hex) for _ in range(100)]
        results = await asyncio.gather(
            *(verifier.verify(t) for t in tokens), return_exceptions=True
        )
        assert all(
            isinstance(r, AuthError) and r.reason is AuthFailure.UNKNOWN_KEY for r in results
        )
        assert jwks_server.hits == round_ + 1
        for _ in range(50):  # more floods inside the cooldown: no fetch at all
            await assert_refused(
                verifier, signed(rsa_key, uuid.uuid4().hex), AuthFailure.UNKNOWN_KEY
            )
        assert jwks_server.hits == round_ + 1
        assert (await verifier.verify(signed(rsa_key, "real"))).subject == "user-1"
        clock.now += 30


async def test_concurrent_misses_share_one_fetch(
    jwks_server: JwksServer, http_session: aiohttp.ClientSession, rsa_key: rsa.RSAPrivateKey
) -> None:
    """Many verifications on a cold cache wait for one fetch and then all pass."""
    jwks_server.keys = [jwk(rsa_key, "k")]
    verifier = jwks_verifier(jwks_server, http_session, FakeClock(0))
    token = signed(rsa_key, "k")
    principals = await asyncio.gather(*(verifier.verify(token) for _ in range(50)))
    assert {p.subject for p in principals} == {"user-1"}
    assert jwks_server.hits == 1


async def test_slow_jwks_endpoint_does_not_stall_other_verifications(
    jwks_server: JwksServer, http_session: aiohttp.ClientSession, rsa_key: rsa.RSAPrivateKey
) -> None:
    """While a refetch hangs, cached kids still verify at once; the hung fetch times out."""
    clock = FakeClock(0)
    jwks_server.keys = [jwk(rsa_key, "known")]
    verifier = jwks_verifier(jwks_server, http_session, clock, timeout=0.3)
    await verifier.verify(signed(rsa_key, "known"))
    jwks_server.gate.clear()
    jwks_server.requested.clear()
    clock.now += 31
    stuck = asyncio.create_task(verifier.verify(signed(rsa_key, "rotated")))
    await asyncio.wait_for(jwks_server.requested.wait(), timeout=5)  # refetch is now hanging
    known = signed(rsa_key, "known")
    async with asyncio.timeout(0.2):
        for _ in range(20):
            assert (await verifier.verify(known)).subject == "user-1"
    assert not stuck.done()
    with pytest.raises(AuthError):
        await asyncio.wait_for(stuck, timeout=5)


async def test_jwks_fails_closed(
    jwks_server: JwksServer, http_session: aiohttp.ClientSession, rsa_key: rsa.RSAPrivateKey
) -> None:
    """An unreachable or broken JWKS refuses tokens; a stale cache is not trusted."""
    clock = FakeClock(0)
    jwks_server.status = 500
    verifier = jwks_verifier(jwks_server, http_session, clock)
    token = signed(rsa_key, "k")
    await assert_refused(verifier, token, AuthFailure.KEYS_UNAVAILABLE)
    await assert_refused(verifier, token, AuthFailure.KEYS_UNAVAILABLE)  # no refetch storm
    assert jwks_server.hits == 1
    jwks_server.status = 200
    jwks_server.keys = [jwk(rsa_key, "k")]
    clock.now += 30
    assert (await verifier.verify(token)).subject == "user-1"
    jwks_server.status = 503
    clock.now += 301  # beyond max age: the cached key is stale and the refetch fails
    await assert_refused(verifier, token, AuthFailure.KEYS_UNAVAILABLE)


async def test_jwks_max_age_header_shortens_the_cache(
    jwks_server: JwksServer, http_session: aiohttp.ClientSession, rsa_key: rsa.RSAPrivateKey
) -> None:
    """A Cache-Control max-age below the configured maximum makes the cache expire sooner."""
    clock = FakeClock(0)
    jwks_server.keys = [jwk(rsa_key, "k")]
    jwks_server.cache_control = "public, max-age=60"
    verifier = jwks_verifier(jwks_server, http_session, clock)
    token = signed(rsa_key, "k")
    await verifier.verify(token)
    clock.now += 59
    await verifier.verify(token)
    assert jwks_server.hits == 1
    clock.now += 2
    await verifier.verify(token)
    assert jwks_server.hits == 2


async def test_jwks_skips_unusable_keys(
    jwks_server: JwksServer, http_session: aiohttp.ClientSession, rsa_key: rsa.RSAPrivateKey
) -> None:
    """Symmetric, encryption-use, weak and garbage JWKS entries never verify anything."""
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
    jwks_server.keys = [
        {"kty": "oct", "kid": "sym", "k": b64(SECRET.encode())},
        {**jwk(rsa_key, "enc"), "use": "enc"},
        jwk(weak, "weak"),
        {"kty": "RSA", "kid": "junk", "n": "!!", "e": "AQAB"},
        {**jwk(rsa_key, "mislabelled"), "alg": "ES256"},
        "not a dict",  # type: ignore[list-item]
    ]
    verifier = jwks_verifier(jwks_server, http_session, FakeClock(0))
    await assert_refused(verifier, hs256(claims(), kid="sym"), AuthFailure.UNSUPPORTED_ALGORITHM)
    with pytest.warns(jwt.warnings.InsecureKeyLengthWarning):
        weak_token = signed(weak, "weak")
    await assert_refused(verifier, weak_token, AuthFailure.UNKNOWN_KEY)
    for kid in ("enc", "junk", "mislabelled"):
        await assert_refused(verifier, signed(rsa_key, kid), AuthFailure.UNKNOWN_KEY)


async def test_jwks_redirects_are_not_followed(
    jwks_server: JwksServer, http_session: aiohttp.ClientSession, rsa_key: rsa.RSAPrivateKey
) -> None:
    """A JWKS URL answering a redirect is a failed fetch (keys unavailable): the verifier never
    asks the redirect's target for keys."""
    jwks_server.keys = [jwk(rsa_key, "k")]
    jwks_server.redirect = True
    verifier = jwks_verifier(jwks_server, http_session, FakeClock(0))
    await assert_refused(verifier, signed(rsa_key, "k"), AuthFailure.KEYS_UNAVAILABLE)
    assert (jwks_server.hits, jwks_server.moved_hits) == (1, 0)


async def test_jwks_documents_over_256_kib_are_refused(
    jwks_server: JwksServer, http_session: aiohttp.ClientSession, rsa_key: rsa.RSAPrivateKey
) -> None:
    """A JWKS document a little over 256 KiB is not used (keys unavailable); one a little
    under it is read whole and verifies."""
    clock = FakeClock(0)
    jwks_server.keys = [jwk(rsa_key, "k")]
    jwks_server.padding = MAX_JWKS_BYTES
    verifier = jwks_verifier(jwks_server, http_session, clock)
    await assert_refused(verifier, signed(rsa_key, "k"), AuthFailure.KEYS_UNAVAILABLE)
    jwks_server.padding = MAX_JWKS_BYTES - 4096
    clock.now += 31  # past the refetch cooldown
    assert (await verifier.verify(signed(rsa_key, "k"))).subject == "user-1"


async def test_jwks_ec_key_on_another_curve_is_ignored(
    jwks_server: JwksServer, http_session: aiohttp.ClientSession
) -> None:
    """An EC key on P-384 labelled ES256 is skipped: ES256 is P-256 only."""
    p384 = ec.generate_private_key(ec.SECP384R1())
    entry = {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(p384.public_key())), "kid": "p384"}
    jwks_server.keys = [entry | {"alg": "ES256", "use": "sig"}]
    verifier = jwks_verifier(jwks_server, http_session, FakeClock(0))
    real = jwt.encode(claims(), p384, algorithm="ES384", headers={"kid": "p384"})
    head = b64(json.dumps({"alg": "ES256", "typ": "JWT", "kid": "p384"}).encode())
    relabelled = head + real[real.index(".") :]
    await assert_refused(verifier, relabelled, AuthFailure.UNKNOWN_KEY)


async def test_claim_and_header_lengths_are_bounded() -> None:
    """``sub`` over 256 characters or empty, more than 256 ``oa_topics`` patterns, and a ``kid``
    over 256 characters are refused; exactly 256 of each is accepted."""
    verifier = hs_verifier()
    assert (await verifier.verify(hs256(claims(sub="s" * MAX_SUBJECT_LENGTH)))).subject
    for sub in ("s" * (MAX_SUBJECT_LENGTH + 1), ""):
        await assert_refused(verifier, hs256(claims(sub=sub)), AuthFailure.INVALID_CLAIM)
    topics = [f"t{i}" for i in range(MAX_GRANT_TOPICS)]
    assert await verifier.verify(hs256(claims(oa_topics=topics)))
    too_many = hs256(claims(oa_topics=[*topics, "extra"]))
    await assert_refused(verifier, too_many, AuthFailure.INVALID_CLAIM)
    assert await verifier.verify(hs256(claims(), kid="k" * 256))
    await assert_refused(verifier, hs256(claims(), kid="k" * 257), AuthFailure.MALFORMED)


async def test_refusals_are_counted_by_reason() -> None:
    """With metrics given, each refused token counts once under its reason label."""
    from oa_sync_server.metrics import Metrics

    metrics = Metrics()
    verifier = TokenVerifier(
        JwtSettings(hs256_secret=Secret(SECRET)), clock=FakeClock(NOW), metrics=metrics
    )
    await assert_refused(verifier, hs256(claims(exp=int(NOW) - 100)), AuthFailure.EXPIRED)
    await assert_refused(verifier, hs256(claims(exp=int(NOW) - 100)), AuthFailure.EXPIRED)
    await assert_refused(verifier, "a.b", AuthFailure.MALFORMED)
    await verifier.verify(hs256(claims()))
    sample = metrics.registry.get_sample_value
    assert sample("oa_sync_auth_failures_total", {"reason": "expired"}) == 2
    assert sample("oa_sync_auth_failures_total", {"reason": "malformed"}) == 1


def test_a_short_hs256_secret_refuses_to_start() -> None:
    """A verifier built with an HS256 secret under 32 bytes raises ConfigError, naming no secret."""
    from oa_sync_server.errors import ConfigError

    with pytest.raises(ConfigError, match="OA_SYNC_JWT_HS256_SECRET") as info:
        TokenVerifier(JwtSettings(hs256_secret=Secret("s" * 31)))
    assert "s" * 31 not in str(info.value)
    TokenVerifier(JwtSettings(hs256_secret=Secret("s" * 32)))
