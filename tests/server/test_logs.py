"""Log redaction (oa_sync_server.logs) and the suite-wide log guard (tests/log_guard.py)."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict
from oa_sync_server.auth import mint_token
from oa_sync_server.config import Secret, Settings
from oa_sync_server.logs import REDACTED, configure_logging, redact, scrub

from tests.log_guard import LeakDetector, guard
from tests.profiles import examples

SECRET = "log-test-secret-" + "z" * 24


@pytest.fixture
def token() -> str:
    return mint_token(SECRET, subject="logger", topics=["*"])


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    """Logging configured as the server does it, into a buffer; the session's set-up after."""
    stream = io.StringIO()
    configure_logging("json", "debug", stream=stream)
    yield stream
    configure_logging("json", "debug", stream=_Discard())
    guard.attach()


class _Discard(io.StringIO):
    def write(self, s: str) -> int:
        return len(s)


def test_scrub_masks_tokens_bearers_params_and_dsn_passwords(token: str) -> None:
    """JWTs, bearer credentials, token query parameters and URL passwords are masked in text."""
    text = (
        f"got {token} with Authorization: Bearer opaque-credential-123 "
        f"from /v1/stream?topic=a&access_token=opaque-query-token&x=1 "
        "db postgresql://app:hunter2-password@db:5432/khala "
        "libpq host=db password=libpq-password-9 user=app"
    )
    clean = scrub(text)
    for secret in (
        token,
        "opaque-credential-123",
        "opaque-query-token",
        "hunter2-password",
        "libpq-password-9",
    ):
        assert secret not in clean
    assert "postgresql://app:***@db:5432/khala" in clean
    assert "topic=a" in clean
    assert "x=1" in clean


def test_redact_masks_sensitive_keys_at_any_depth(token: str) -> None:
    """Authorization headers (also in a case-insensitive multidict), tokens and secrets by key."""
    headers = CIMultiDict({"authorization": f"Bearer {token}", "Accept": "text/plain"})
    event: dict[str, Any] = {
        "event": "request_received",
        "headers": headers,
        "nested": {"deeper": [{"api_key": "key-value-12345", "ok": 1}]},
        "access_token": "opaque",
        "client_secret": "cs",
        "Password": "pw",
        "exc": ValueError(f"refused {token}"),
        "raw": f"token={token}".encode(),
    }
    out = redact(None, "info", event)
    rendered = json.dumps(out, default=str)
    assert token not in rendered
    assert "key-value-12345" not in rendered
    assert out["headers"]["authorization"] == REDACTED
    assert out["headers"]["Accept"] == "text/plain"
    assert out["access_token"] == REDACTED
    assert out["client_secret"] == REDACTED
    assert out["Password"] == REDACTED
    assert out["nested"]["deeper"][0]["ok"] == 1


def test_configured_logging_never_writes_a_token(lines: io.StringIO, token: str) -> None:
    """structlog and stdlib records at DEBUG, exceptions included, come out redacted JSON."""
    log = structlog.get_logger("oa_sync_server.test")
    log.debug("token_seen", token=token, note=f"Bearer {token}")
    log.info("connected", dsn="postgresql://u:dsn-password-xyz@h/db")
    try:
        raise RuntimeError(f"bad token {token}")
    except RuntimeError:
        log.exception("handler_failed")
    logging.getLogger("aiohttp.access").debug(
        "GET /v1/stream?token=%s HTTP/1.1", "opaque-access-value"
    )
    logging.getLogger("some.library").warning("authorization: Bearer %s", token)
    text = lines.getvalue()
    records = [json.loads(line) for line in text.splitlines()]
    assert [r["event"] for r in records[:3]] == ["token_seen", "connected", "handler_failed"]
    assert records[0]["level"] == "debug"
    assert "RuntimeError" in records[2]["exception"]
    for secret in (token, "dsn-password-xyz", "opaque-access-value", token.split(".")[2]):
        assert secret not in text


def test_sqlalchemy_is_kept_quiet_at_debug(lines: io.StringIO) -> None:
    """At root level DEBUG, SQLAlchemy's loggers stay at WARNING (no statements, no rows)."""
    assert logging.getLogger().level == logging.DEBUG
    assert not logging.getLogger("sqlalchemy.engine.Engine").isEnabledFor(logging.INFO)


def test_settings_repr_masks_secrets() -> None:
    """Settings and Secret reprs show neither the JWT secret nor the database password."""
    settings = Settings.from_env(
        {
            "OA_SYNC_JWT_HS256_SECRET": SECRET,
            "OA_SYNC_DATABASE_URL": "postgresql://app:repr-password-1@db/khala",
        }
    )
    text = repr(settings) + str(settings.jwt.hs256_secret) + repr(Secret(SECRET))
    assert SECRET not in text
    assert "repr-password-1" not in text


def test_leak_detector_finds_each_kind_and_ignores_masks(token: str) -> None:
    """The guard's detector flags raw JWTs, unmasked passwords and registered secrets only."""
    detector = LeakDetector()
    detector.register("registered-secret-value")
    detector.register("short")  # too short to search for without false positives
    assert detector.kinds(f"x {token} y") == ["jwt"]
    assert detector.kinds("postgresql://u:pw@h/db") == ["password"]
    assert detector.kinds("host=h password=abc user=u") == ["password"]
    assert detector.kinds("a registered-secret-value b") == ["secret"]
    for clean in (
        scrub(f"x {token} y"),
        "postgresql://u:***@h/db",
        "postgresql://u@h/db",
        f"password={REDACTED}",
        "a short b",
        "runtime/run_summary:r1 version 3 watermark 9",
    ):
        assert detector.kinds(clean) == [], clean
    detector.check(f"x {token}", "t")
    assert [(leak.test, leak.kind) for leak in detector.leaks] == [("t", "jwt")]


def test_database_errors_are_logged_without_sql_parameters_or_traceback(
    lines: io.StringIO,
) -> None:
    """A SQLAlchemy error carrying a statement and parameters, logged with ``exc_info`` by
    structlog or by a library's plain ``logging`` call, keeps its type and SQLSTATE and loses
    its text and traceback; the guard's detector flags each of those when they do appear."""
    import psycopg.errors
    import sqlalchemy.exc

    orig = psycopg.errors.AdminShutdown("terminating connection due to administrator command")
    error = sqlalchemy.exc.OperationalError(
        "INSERT INTO oa_sync.events (payload) VALUES (%(payload)s)",
        {"payload": "secret-payload-text"},
        orig,
    )
    assert "[SQL: INSERT" in str(error)
    assert "[parameters:" in str(error)
    try:
        raise error
    except sqlalchemy.exc.OperationalError:
        structlog.get_logger("oa_sync_server.test").error("request_failed", exc_info=True)
        logging.getLogger("aiohttp.server").exception("Error handling request")
    text = lines.getvalue()
    records = [json.loads(line) for line in text.splitlines()]
    assert [r["event"] for r in records] == ["request_failed", "Error handling request"]
    for record in records:
        assert record["db_error"] == "AdminShutdown"
        assert record["sqlstate"] == "57P01"
        assert "exception" not in record
    for leak in ("INSERT", "secret-payload-text", "Traceback", "[SQL:", "[parameters:"):
        assert leak not in text, leak
    assert "[SQL redacted]" in scrub(f"failed: {error}")
    assert "secret-payload-text" not in scrub(f"failed: {error}")
    detector = LeakDetector()
    assert detector.kinds(str(error)) == ["sql", "parameters"]
    traceback = 'Traceback (most recent call last):\n  File "sqlalchemy/engine/base.py"'
    assert detector.kinds(traceback) == ["database traceback"]
    assert detector.kinds('Traceback (most recent call last):\n  File "app.py"') == []


@settings(max_examples=examples(200), deadline=None)
@given(
    # Digits only, so neither can occur by chance in the error's own words.
    statement=st.text(min_size=12, max_size=60, alphabet="0123456789 ,()=*"),
    value=st.text(min_size=8, max_size=40, alphabet="0123456789"),
)
def test_scrub_never_lets_a_statement_or_its_parameters_through(statement: str, value: str) -> None:
    """Whatever the statement and the bound values, the text of a SQLAlchemy error passed
    through scrub (alone or embedded in a longer line) holds neither."""
    import psycopg.errors
    import sqlalchemy.exc

    orig = psycopg.errors.QueryCanceled("canceling statement due to statement timeout")
    error = sqlalchemy.exc.OperationalError(statement, {"payload": value}, orig)
    for text in (str(error), f"before {error} after", repr(str(error))):
        clean = scrub(text)
        assert statement not in clean
        assert value not in clean
        assert "QueryCanceled" in clean


def test_session_guard_sees_debug_lines_and_registered_secrets(token: str) -> None:
    """The session guard is on the root logger at DEBUG and knows every Secret made."""
    before = guard.detector.lines
    leaks = len(guard.detector.leaks)
    structlog.get_logger("oa_sync_server.test").debug("guard_probe", bearer=f"Bearer {token}")
    assert guard.detector.lines > before
    assert len(guard.detector.leaks) == leaks  # redacted before the guard saw it
    Secret("freshly-made-secret-" + "q" * 12)
    assert "freshly-made-secret-" + "q" * 12 in guard.detector.secrets


def test_the_guard_fails_a_session_that_leaks(tmp_path: Path) -> None:
    """A pytest session whose test logs a Secret's value ends failed, naming test and kind only."""
    leaky = tmp_path / "test_leaky.py"
    leaky.write_text(
        "import logging\n"
        "from oa_sync_server.config import Secret\n\n\n"
        "def test_leaks() -> None:\n"
        '    secret = Secret("a-plain-secret-value-" + "9" * 16)\n'
        '    logging.getLogger("somewhere").debug("oops %s", secret.reveal())\n'
    )
    root = Path(__file__).resolve().parents[2]
    options = ["-q", "-p", "no:cacheprovider", "-p", "tests.log_guard", "--rootdir", str(root)]
    result = subprocess.run(  # noqa: S603 - the test runs this interpreter's pytest on a fixture
        [sys.executable, "-m", "pytest", *options, "-c", str(root / "pyproject.toml"), str(leaky)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 passed" in result.stdout
    assert "test_leaks: a secret appeared in a log line" in result.stdout
    assert "9" * 16 not in result.stdout + result.stderr
