"""The server's settings: one validated, frozen object loaded from ``OA_SYNC_*`` variables.

:meth:`Settings.from_env` reads every variable of DESIGN.md "Configuration" plus the limits of
the hardening issue, validates each, and raises :class:`~oa_sync_server.errors.ConfigError`
with one line naming the variable at fault. ``repr`` of any settings object masks secrets and
the password of the database URL.

What this is not: a place that reads files or opens sockets at import. The only file it reads
is ``OA_SYNC_JWT_PUBLIC_KEY_FILE`` (to refuse a bad key at start-up, not at the first request).
"""

from __future__ import annotations

import dataclasses
import enum
import re
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final, TypeVar
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from oa_sync_core.events import MAX_APPEND_EVENTS

from oa_sync_server.errors import ConfigError

__all__ = [
    "ENV_PREFIX",
    "MIN_HS256_SECRET_BYTES",
    "FanoutKind",
    "HttpSinkSettings",
    "JwtSettings",
    "Limits",
    "LogFormat",
    "PublicKeySpec",
    "Secret",
    "Settings",
    "SinkKind",
    "redact_dsn",
]

ENV_PREFIX: Final = "OA_SYNC_"
MIN_HS256_SECRET_BYTES: Final = 32
MAX_JWT_LEEWAY_S: Final = 60
MIN_RSA_BITS: Final = 2048

_DSN_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:)[^@\s]*(?P<at>@)")
_T = TypeVar("_T")
_E = TypeVar("_E", bound=enum.StrEnum)


def redact_dsn(text: str) -> str:
    """Mask the password of every ``scheme://user:password@`` in a string."""
    return _DSN_PASSWORD.sub(r"\g<head>***\g<at>", text)


@dataclasses.dataclass(frozen=True, slots=True)
class Secret:
    """A secret string whose ``repr`` and ``str`` never show it; :meth:`reveal` does."""

    _value: str = dataclasses.field(repr=False)

    def reveal(self) -> str:
        """The secret itself, for the one call that needs it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"


class SinkKind(enum.StrEnum):
    """Where projected documents are published (DESIGN.md "Sinks")."""

    POSTGRES = "postgres"
    HTTP = "http"
    NOOP = "noop"
    TEE = "tee"


class FanoutKind(enum.StrEnum):
    """How committed changes reach every instance's hub (``OA_SYNC_FANOUT``)."""

    POSTGRES = "postgres"
    NATS = "nats"


class LogFormat(enum.StrEnum):
    """Log rendering: human console lines or one JSON object per line."""

    CONSOLE = "console"
    JSON = "json"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PublicKeySpec:
    """A PEM public key loaded from ``OA_SYNC_JWT_PUBLIC_KEY_FILE`` and its pinned algorithm."""

    path: Path
    algorithm: str
    pem: bytes = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class JwtSettings:
    """How bearer tokens are verified (DESIGN.md "Auth").

    Attributes:
        hs256_secret: shared secret (at least 32 bytes) for HS256 tokens, if any.
        public_key: a PEM public key pinned to RS256 or ES256, if any.
        jwks_url: a JWKS document of RS256/ES256 keys, if any.
        issuer: the exact ``iss`` required.
        audience: the ``aud`` required (a string claim equal to it or a list containing it).
        leeway_s: clock skew allowed on ``exp``/``nbf``/``iat``, at most 60 s.
        jwks_max_age_s: longest a fetched JWKS is trusted (a shorter ``max-age`` wins).
        jwks_cooldown_s: least time between two fetches triggered by an unknown ``kid``.
        jwks_timeout_s: total time allowed for one JWKS fetch.
    """

    hs256_secret: Secret | None = None
    public_key: PublicKeySpec | None = None
    jwks_url: str | None = None
    issuer: str = "oa-sync"
    audience: str = "oa-sync"
    leeway_s: float = 30.0
    jwks_max_age_s: float = 300.0
    jwks_cooldown_s: float = 30.0
    jwks_timeout_s: float = 5.0

    @property
    def has_key(self) -> bool:
        """Whether at least one verification key is configured."""
        return bool(self.hs256_secret or self.public_key or self.jwks_url)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class HttpSinkSettings:
    """The HTTP sink (``SINK=http`` or ``tee``): where and how documents are POSTed."""

    url: str | None = None
    secret: Secret | None = None
    timeout_s: float = 10.0


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Per-connection and per-subject limits (issue 5); each breach has a close code + metric.

    Attributes:
        max_message_bytes: largest inbound WebSocket message (also the aiohttp max_msg_size).
        max_subscriptions: subscriptions one connection may hold.
        max_topics_per_subscription: topics in one ``subscribe``.
        max_connections_per_subject: concurrent connections of one token ``sub``.
        messages_per_second: sustained inbound messages per connection (token bucket rate).
        message_burst: inbound messages a connection may send at once (bucket size).
        auth_deadline_s: time from upgrade to a valid ``authenticate``.
        idle_timeout_s: time without any inbound message before the server closes.
        send_queue_messages: outbound messages queued per connection before it counts as slow.
        send_queue_bytes: outbound bytes queued per connection before it counts as slow (a
            connection full by either measure for the slow-consumer grace, or at twice either,
            is closed 4429).
        heartbeat_interval_s: interval of server ``heartbeat`` messages.
        max_body_bytes: largest HTTP request body (``POST /v1/events``).
        max_append_events: most events in one append (``POST /v1/events``, 413 above it).
    """

    max_message_bytes: int = 65536
    max_subscriptions: int = 64
    max_topics_per_subscription: int = 32
    max_connections_per_subject: int = 16
    messages_per_second: float = 50.0
    message_burst: int = 100
    auth_deadline_s: float = 10.0
    idle_timeout_s: float = 60.0
    send_queue_messages: int = 1024
    send_queue_bytes: int = 4 * 2**20
    heartbeat_interval_s: float = 15.0
    max_body_bytes: int = 1_048_576
    max_append_events: int = MAX_APPEND_EVENTS


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class Settings:
    """Every setting of the server, validated. Build with :meth:`from_env`.

    Attributes:
        database_url: Postgres URL; ``None`` means start an embedded Postgres.
        data_dir: where the embedded Postgres (and other local state) lives.
        host: address the HTTP server binds.
        port: port the HTTP server binds (0 picks a free one).
        sink: where projected documents are published.
        http_sink: the HTTP sink's settings.
        jwt: token verification settings.
        allowed_origins: ``Origin`` values accepted on the WebSocket upgrade; empty accepts
            requests without an ``Origin`` header only (non-browser clients); ``*`` accepts all.
        log_format: console or JSON lines.
        log_level: the least severe level logged.
        limits: connection limits.
        poll_interval_s: fan-out poll of ``changes`` when no NOTIFY hint arrives.
        changes_retention_s: how long change rows are kept for resume.
        fanout: ``postgres`` (each instance reads every change) or ``nats`` (the projector
            publishes each change to NATS JetStream, instances consume it).
        nats_url: the NATS server (required when ``fanout`` is ``nats``).
        read_replica_url: a Postgres replica for snapshot and resume reads (``None``: none).
    """

    database_url: str | None = None
    data_dir: Path = Path(".oa-sync")
    host: str = "127.0.0.1"
    port: int = 8787
    sink: SinkKind = SinkKind.POSTGRES
    http_sink: HttpSinkSettings = dataclasses.field(default_factory=HttpSinkSettings)
    jwt: JwtSettings = dataclasses.field(default_factory=JwtSettings)
    allowed_origins: tuple[str, ...] = ()
    log_format: LogFormat = LogFormat.CONSOLE
    log_level: str = "info"
    limits: Limits = dataclasses.field(default_factory=Limits)
    poll_interval_s: float = 1.0
    changes_retention_s: float = 7 * 24 * 3600.0
    fanout: FanoutKind = FanoutKind.POSTGRES
    nats_url: str | None = None
    read_replica_url: str | None = None

    def __repr__(self) -> str:
        parts = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            redacted = field.name in ("database_url", "read_replica_url", "nats_url")
            text = redact_dsn(value) if redacted and value else value
            parts.append(f"{field.name}={text!r}")
        return f"Settings({', '.join(parts)})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Load and validate settings from ``OA_SYNC_*`` variables.

        Unset and empty variables take their defaults. No JWT key is required here (commands
        such as ``migrate`` need none); :meth:`require_jwt_key` is the serve-time check.

        Args:
            environ: the environment, usually ``os.environ``.

        Returns:
            The validated settings.

        Raises:
            ConfigError: one line naming the first bad variable.
        """
        env = _Env(environ)
        sink = env.get("SINK", _choice(SinkKind), SinkKind.POSTGRES)
        http_sink = HttpSinkSettings(
            url=env.get("HTTP_SINK_URL", _url("http", "https"), None),
            secret=env.get("HTTP_SINK_SECRET", _secret(MIN_HS256_SECRET_BYTES), None),
            timeout_s=env.get("HTTP_SINK_TIMEOUT_S", _number(0.001, 3600), 10.0),
        )
        if sink in (SinkKind.HTTP, SinkKind.TEE):
            if http_sink.url is None:
                raise ConfigError(
                    ENV_PREFIX + "HTTP_SINK_URL", f"required when OA_SYNC_SINK is {sink.value!r}"
                )
            if http_sink.secret is None:
                raise ConfigError(
                    ENV_PREFIX + "HTTP_SINK_SECRET",
                    f"required when OA_SYNC_SINK is {sink.value!r}",
                )
        fanout = env.get("FANOUT", _choice(FanoutKind), FanoutKind.POSTGRES)
        nats_url = env.get("NATS_URL", _url("nats", "tls"), None)
        if fanout is FanoutKind.NATS and nats_url is None:
            raise ConfigError(ENV_PREFIX + "NATS_URL", "required when OA_SYNC_FANOUT is 'nats'")
        jwt = JwtSettings(
            hs256_secret=env.get("JWT_HS256_SECRET", _secret(MIN_HS256_SECRET_BYTES), None),
            public_key=env.get("JWT_PUBLIC_KEY_FILE", _public_key, None),
            jwks_url=env.get("JWT_JWKS_URL", _url("https", "http"), None),
            issuer=env.get("JWT_ISSUER", _text(256), "oa-sync"),
            audience=env.get("JWT_AUDIENCE", _text(256), "oa-sync"),
            leeway_s=env.get("JWT_LEEWAY_S", _number(0, MAX_JWT_LEEWAY_S), 30.0),
            jwks_max_age_s=env.get("JWKS_MAX_AGE_S", _number(1, 86400), 300.0),
            jwks_cooldown_s=env.get("JWKS_COOLDOWN_S", _number(0, 3600), 30.0),
            jwks_timeout_s=env.get("JWKS_TIMEOUT_S", _number(0.1, 60), 5.0),
        )
        limits = Limits(
            max_message_bytes=env.get("MAX_MESSAGE_BYTES", _integer(1024, 16 * 2**20), 65536),
            max_subscriptions=env.get("MAX_SUBSCRIPTIONS", _integer(1, 10_000), 64),
            max_topics_per_subscription=env.get(
                "MAX_TOPICS_PER_SUBSCRIPTION", _integer(1, 1000), 32
            ),
            max_connections_per_subject=env.get(
                "MAX_CONNECTIONS_PER_SUBJECT", _integer(1, 100_000), 16
            ),
            messages_per_second=env.get("MESSAGES_PER_SECOND", _number(0.1, 100_000), 50.0),
            message_burst=env.get("MESSAGE_BURST", _integer(1, 1_000_000), 100),
            auth_deadline_s=env.get("AUTH_DEADLINE_S", _number(0.1, 600), 10.0),
            idle_timeout_s=env.get("IDLE_TIMEOUT_S", _number(1, 86400), 60.0),
            send_queue_messages=env.get("SEND_QUEUE_MESSAGES", _integer(1, 1_000_000), 1024),
            send_queue_bytes=env.get("SEND_QUEUE_BYTES", _integer(4096, 1024 * 2**20), 4 * 2**20),
            heartbeat_interval_s=env.get("HEARTBEAT_INTERVAL_S", _number(0.1, 3600), 15.0),
            max_body_bytes=env.get("MAX_BODY_BYTES", _integer(1024, 256 * 2**20), 1_048_576),
            max_append_events=env.get(
                "MAX_APPEND_EVENTS", _integer(1, 1_000_000), MAX_APPEND_EVENTS
            ),
        )
        return cls(
            database_url=env.get("DATABASE_URL", _database_url, None),
            data_dir=env.get("DATA_DIR", Path, Path(".oa-sync")),
            host=env.get("HOST", _text(255), "127.0.0.1"),
            port=env.get("PORT", _integer(0, 65535), 8787),
            sink=sink,
            http_sink=http_sink,
            jwt=jwt,
            allowed_origins=env.get("ALLOWED_ORIGINS", _origins, ()),
            log_format=env.get("LOG_FORMAT", _choice(LogFormat), LogFormat.CONSOLE),
            log_level=env.get(
                "LOG_LEVEL", _choice_str("debug", "info", "warning", "error", "critical"), "info"
            ),
            limits=limits,
            poll_interval_s=env.get("POLL_INTERVAL_S", _number(0.01, 3600), 1.0),
            changes_retention_s=env.get(
                "CHANGES_RETENTION_S", _number(60, 10 * 365 * 86400), 7 * 24 * 3600.0
            ),
            fanout=fanout,
            nats_url=nats_url,
            read_replica_url=env.get("READ_REPLICA_URL", _database_url, None),
        )

    def require_jwt_key(self, *, dev: bool = False) -> Settings:
        """The serve-time check that tokens can be verified.

        Args:
            dev: development / ``--demo`` mode: with no key configured, generate a random
                HS256 secret for this process instead of refusing.

        Returns:
            These settings, or a copy holding the generated secret.

        Raises:
            ConfigError: no key is configured and ``dev`` is false.
        """
        if self.jwt.has_key:
            return self
        if not dev:
            raise ConfigError(
                ENV_PREFIX + "JWT_HS256_SECRET",
                "no JWT key configured (set OA_SYNC_JWT_HS256_SECRET, OA_SYNC_JWT_PUBLIC_KEY_FILE"
                " or OA_SYNC_JWT_JWKS_URL, or run with --demo)",
            )
        generated = Secret(secrets.token_urlsafe(48))
        return dataclasses.replace(self, jwt=dataclasses.replace(self.jwt, hs256_secret=generated))


# ---------------------------------------------------------------------------------------------
# Parsers: each takes the raw text and returns a value or raises ValueError with the reason.
# ---------------------------------------------------------------------------------------------


class _Env:
    def __init__(self, environ: Mapping[str, str]):
        self._environ = environ

    def get(self, name: str, parse: Callable[[str], _T], default: _T) -> _T:
        variable = ENV_PREFIX + name
        raw = self._environ.get(variable)
        if raw is None or raw.strip() == "":
            return default
        try:
            return parse(raw.strip())
        except ValueError as exc:
            raise ConfigError(variable, str(exc)) from None


def _shown(raw: str) -> str:
    return repr(raw if len(raw) <= 40 else raw[:40] + "...")


def _integer(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        if not re.fullmatch(r"[+-]?[0-9]{1,12}", raw) or not low <= int(raw) <= high:
            raise ValueError(f"must be an integer between {low} and {high}, got {_shown(raw)}")
        return int(raw)

    return parse


def _number(low: float, high: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        if not re.fullmatch(r"[+-]?([0-9]{1,12}(\.[0-9]*)?|\.[0-9]+)", raw) or not (
            low <= float(raw) <= high
        ):
            raise ValueError(f"must be a number between {low:g} and {high:g}, got {_shown(raw)}")
        return float(raw)

    return parse


def _choice(kind: type[_E]) -> Callable[[str], _E]:
    def parse(raw: str) -> _E:
        try:
            return kind(raw.lower())
        except ValueError:
            allowed = " | ".join(str(m.value) for m in kind)
            raise ValueError(f"must be one of {allowed}, got {_shown(raw)}") from None

    return parse


def _choice_str(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw.lower() not in allowed:
            raise ValueError(f"must be one of {' | '.join(allowed)}, got {_shown(raw)}")
        return raw.lower()

    return parse


def _text(max_length: int) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if len(raw) > max_length or not raw.isprintable():
            raise ValueError(f"must be printable text of at most {max_length} characters")
        return raw

    return parse


def _secret(min_bytes: int) -> Callable[[str], Secret]:
    def parse(raw: str) -> Secret:
        # Never echo the value: it is a secret even when it is a bad one.
        if len(raw.encode("utf-8")) < min_bytes:
            raise ValueError(f"must be at least {min_bytes} bytes long (refusing a weak secret)")
        return Secret(raw)

    return parse


def _url(*schemes: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        try:
            parts = urlsplit(raw)
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in schemes or not parts.hostname:
            raise ValueError(
                f"must be a {' or '.join(schemes)} URL with a host, got {_shown(redact_dsn(raw))}"
            )
        return raw

    return parse


def _database_url(raw: str) -> str:
    try:
        scheme = urlsplit(raw).scheme
    except ValueError:
        scheme = ""
    if scheme not in ("postgresql", "postgres", "postgresql+psycopg"):
        raise ValueError(
            f"must be a postgresql:// URL, got {_shown(redact_dsn(raw))}"
            " (leave unset for the embedded Postgres)"
        )
    return raw


def _origins(raw: str) -> tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/") for o in raw.split(",") if o.strip())
    for origin in origins:
        if origin == "*":
            continue
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path:
            raise ValueError(
                f"each origin must be scheme://host[:port] or '*', got {_shown(origin)}"
            )
    return origins


def _public_key(raw: str) -> PublicKeySpec:
    path = Path(raw)
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {str(path)!r}: {exc.strerror}") from None
    try:
        key = load_pem_public_key(pem)
    except (ValueError, TypeError):
        raise ValueError(f"{str(path)!r} is not a PEM public key") from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"RSA key of {key.key_size} bits; at least {MIN_RSA_BITS} needed")
        return PublicKeySpec(path=path, algorithm="RS256", pem=pem)
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return PublicKeySpec(path=path, algorithm="ES256", pem=pem)
    raise ValueError(f"{str(path)!r} must hold an RSA (RS256) or P-256 (ES256) public key")
