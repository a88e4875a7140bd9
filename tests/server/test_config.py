"""Settings load from OA_SYNC_* variables; every bad value fails with one line naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from oa_sync_server.config import FanoutKind, LogFormat, Settings, SinkKind, redact_dsn
from oa_sync_server.errors import ConfigError

SECRET = "s" * 32


def test_defaults_match_the_documented_limits() -> None:
    """An empty environment gives the defaults of DESIGN.md and issue 5."""
    settings = Settings.from_env({})
    assert settings.database_url is None
    assert settings.port == 8787
    assert settings.host == "127.0.0.1"
    assert settings.sink is SinkKind.POSTGRES
    assert settings.log_format is LogFormat.CONSOLE
    limits = settings.limits
    assert limits.max_message_bytes == 65536
    assert limits.max_subscriptions == 64
    assert limits.max_topics_per_subscription == 32
    assert limits.max_connections_per_subject == 16
    assert (limits.messages_per_second, limits.message_burst) == (50.0, 100)
    assert limits.auth_deadline_s == 10.0
    assert limits.idle_timeout_s == 60.0
    assert limits.send_queue_messages == 1024
    assert limits.heartbeat_interval_s == 15.0
    assert not settings.jwt.has_key


def test_values_are_parsed_and_typed() -> None:
    """Each variable is read into its typed field."""
    settings = Settings.from_env(
        {
            "OA_SYNC_DATABASE_URL": "postgresql://app:pw@db:5432/khala",
            "OA_SYNC_PORT": "9000",
            "OA_SYNC_DATA_DIR": "/var/lib/khala",
            "OA_SYNC_SINK": "TEE",
            "OA_SYNC_HTTP_SINK_URL": "https://legacy.example/api",
            "OA_SYNC_HTTP_SINK_SECRET": SECRET,
            "OA_SYNC_JWT_HS256_SECRET": SECRET,
            "OA_SYNC_ALLOWED_ORIGINS": "https://app.example, http://localhost:3000/",
            "OA_SYNC_LOG_FORMAT": "json",
            "OA_SYNC_MAX_MESSAGE_BYTES": "4096",
            "OA_SYNC_POLL_INTERVAL_S": "0.25",
            "OA_SYNC_FANOUT": "nats",
            "OA_SYNC_NATS_URL": "nats://127.0.0.1:4222",
            "OA_SYNC_READ_REPLICA_URL": "postgresql://app:pw@replica:5432/khala",
        }
    )
    assert settings.fanout is FanoutKind.NATS
    assert settings.nats_url == "nats://127.0.0.1:4222"
    assert settings.read_replica_url == "postgresql://app:pw@replica:5432/khala"
    assert "pw" not in repr(settings)
    assert settings.port == 9000
    assert settings.data_dir == Path("/var/lib/khala")
    assert settings.sink is SinkKind.TEE
    assert settings.allowed_origins == ("https://app.example", "http://localhost:3000")
    assert settings.log_format is LogFormat.JSON
    assert settings.limits.max_message_bytes == 4096
    assert settings.poll_interval_s == 0.25
    assert settings.jwt.hs256_secret is not None
    assert settings.jwt.hs256_secret.reveal() == SECRET


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"OA_SYNC_PORT": "abc"}, "OA_SYNC_PORT"),
        ({"OA_SYNC_PORT": "70000"}, "OA_SYNC_PORT"),
        ({"OA_SYNC_PORT": "1e3"}, "OA_SYNC_PORT"),
        ({"OA_SYNC_SINK": "kafka"}, "OA_SYNC_SINK"),
        ({"OA_SYNC_LOG_FORMAT": "xml"}, "OA_SYNC_LOG_FORMAT"),
        ({"OA_SYNC_LOG_LEVEL": "loud"}, "OA_SYNC_LOG_LEVEL"),
        ({"OA_SYNC_DATABASE_URL": "mysql://u:p@h/db"}, "OA_SYNC_DATABASE_URL"),
        ({"OA_SYNC_JWT_HS256_SECRET": "short"}, "OA_SYNC_JWT_HS256_SECRET"),
        ({"OA_SYNC_JWT_JWKS_URL": "ftp://keys"}, "OA_SYNC_JWT_JWKS_URL"),
        ({"OA_SYNC_JWT_LEEWAY_S": "61"}, "OA_SYNC_JWT_LEEWAY_S"),
        ({"OA_SYNC_JWT_PUBLIC_KEY_FILE": "/nonexistent/key.pem"}, "OA_SYNC_JWT_PUBLIC_KEY_FILE"),
        ({"OA_SYNC_ALLOWED_ORIGINS": "app.example"}, "OA_SYNC_ALLOWED_ORIGINS"),
        ({"OA_SYNC_MAX_MESSAGE_BYTES": "-1"}, "OA_SYNC_MAX_MESSAGE_BYTES"),
        ({"OA_SYNC_MESSAGES_PER_SECOND": "nan"}, "OA_SYNC_MESSAGES_PER_SECOND"),
        ({"OA_SYNC_IDLE_TIMEOUT_S": "inf"}, "OA_SYNC_IDLE_TIMEOUT_S"),
        ({"OA_SYNC_SINK": "http"}, "OA_SYNC_HTTP_SINK_URL"),
        ({"OA_SYNC_FANOUT": "redis"}, "OA_SYNC_FANOUT"),
        ({"OA_SYNC_FANOUT": "nats"}, "OA_SYNC_NATS_URL"),
        ({"OA_SYNC_FANOUT": "nats", "OA_SYNC_NATS_URL": "http://n:4222"}, "OA_SYNC_NATS_URL"),
        ({"OA_SYNC_READ_REPLICA_URL": "mysql://u:p@h/db"}, "OA_SYNC_READ_REPLICA_URL"),
        (
            {"OA_SYNC_SINK": "http", "OA_SYNC_HTTP_SINK_URL": "https://x.example"},
            "OA_SYNC_HTTP_SINK_SECRET",
        ),
    ],
)
def test_bad_value_names_the_variable_in_one_line(env: dict[str, str], variable: str) -> None:
    """A bad value raises ConfigError whose single-line message starts with the variable."""
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert info.value.variable == variable
    message = str(info.value)
    assert message.startswith(f"{variable}: ")
    assert "\n" not in message


def test_port_error_reads_as_documented() -> None:
    """The port error is exactly the one line the brief shows."""
    with pytest.raises(ConfigError, match=r"^OA_SYNC_PORT: must be an integer between 0 and"):
        Settings.from_env({"OA_SYNC_PORT": "abc"})


def test_secret_errors_never_echo_the_secret() -> None:
    """A refused secret is not repeated in the error message."""
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"OA_SYNC_JWT_HS256_SECRET": "hunter2-too-short"})
    assert "hunter2" not in str(info.value)


def test_repr_hides_secrets_and_dsn_password() -> None:
    """repr(settings) shows neither the JWT/sink secrets nor the database password."""
    settings = Settings.from_env(
        {
            "OA_SYNC_DATABASE_URL": "postgresql://app:dbpass-xyz@db/khala",
            "OA_SYNC_JWT_HS256_SECRET": "jwt-secret-" + "x" * 32,
            "OA_SYNC_SINK": "http",
            "OA_SYNC_HTTP_SINK_URL": "https://legacy.example",
            "OA_SYNC_HTTP_SINK_SECRET": "sink-secret-" + "y" * 32,
        }
    )
    text = repr(settings)
    assert "dbpass-xyz" not in text
    assert "jwt-secret" not in text
    assert "sink-secret" not in text
    assert "postgresql://app:***@db/khala" in text
    assert str(settings.jwt.hs256_secret) == "***"


def test_redact_dsn_masks_every_password() -> None:
    """Every user:password@ in a string is masked, the rest kept."""
    text = "a postgresql://u:p1@h/db and http://x:p2@y/z then mailto:me"
    assert redact_dsn(text) == "a postgresql://u:***@h/db and http://x:***@y/z then mailto:me"


def test_serve_refuses_without_a_key_unless_dev() -> None:
    """No JWT key refuses to serve; dev mode generates a fresh random 32+ byte secret."""
    settings = Settings.from_env({})
    with pytest.raises(ConfigError, match=r"^OA_SYNC_JWT_HS256_SECRET: no JWT key"):
        settings.require_jwt_key()
    dev = settings.require_jwt_key(dev=True)
    other = settings.require_jwt_key(dev=True)
    assert dev.jwt.hs256_secret is not None
    assert other.jwt.hs256_secret is not None
    assert len(dev.jwt.hs256_secret.reveal()) >= 32
    assert dev.jwt.hs256_secret.reveal() != other.jwt.hs256_secret.reveal()
    configured = Settings.from_env({"OA_SYNC_JWT_HS256_SECRET": SECRET})
    assert configured.require_jwt_key() is configured


def test_public_key_file_pins_its_algorithm(tmp_path: Path) -> None:
    """An RSA key file pins RS256, a P-256 key ES256; a weak RSA key is refused."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    ec_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()  # noqa: S505 - the weak key under test
    for name, key in (("rsa", rsa_key), ("ec", ec_key), ("weak", weak)):
        (tmp_path / f"{name}.pem").write_bytes(
            key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    env = "OA_SYNC_JWT_PUBLIC_KEY_FILE"
    rsa_spec = Settings.from_env({env: str(tmp_path / "rsa.pem")}).jwt.public_key
    ec_spec = Settings.from_env({env: str(tmp_path / "ec.pem")}).jwt.public_key
    assert rsa_spec is not None
    assert rsa_spec.algorithm == "RS256"
    assert ec_spec is not None
    assert ec_spec.algorithm == "ES256"
    with pytest.raises(ConfigError, match=r"^OA_SYNC_JWT_PUBLIC_KEY_FILE: RSA key of 1024"):
        Settings.from_env({env: str(tmp_path / "weak.pem")})
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(ConfigError, match="is not a PEM public key"):
        Settings.from_env({env: str(tmp_path / "junk.pem")})
