"""pytest plugin: no token, secret, DSN password or SQL may appear in any log line of the suite.

For the whole session, logging is configured as the server configures it
(:func:`oa_sync_server.logs.configure_logging`, JSON lines) at DEBUG, and one extra handler on
the root logger renders every record — structlog events and plain ``logging`` records of
libraries alike — with the server's own formatter (:func:`oa_sync_server.logs.build_formatter`),
so it sees exactly what a production log would hold. Each line is checked as it is written:

* nothing shaped like a JWT (a base64url JSON header, a payload and a signature);
* no ``scheme://user:password@`` URL whose password is not masked, and no
  ``password=...`` keyword that is not masked;
* none of the secret strings the suite created: the value of every
  :class:`oa_sync_server.server_config.Secret` constructed during the session (at least 12
  characters) and the password of ``OA_SYNC_TEST_DATABASE_URL``;
* no SQL statement or bound parameters (SQLAlchemy's ``[SQL: …]`` and ``[parameters: …]``)
  and no traceback through the database driver (``sqlalchemy``/``psycopg`` frames): those
  carry statements and event payloads.

A leak does not fail the test that caused it (the test may have passed for good reasons); the
session fails at its end with a report naming the tests and the kind of leak, never the secret.

What this is not: a check of ``print`` output or of text a test writes to its own streams.
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

import pytest
from oa_sync_server import config as server_config
from oa_sync_server.logs import REDACTED, build_formatter, configure_logging, quiet_libraries

__all__ = ["LeakDetector", "LogGuardHandler", "guard"]

MIN_SECRET_LENGTH: Final = 12
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_DSN_PASSWORD = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:(?P<password>[^@\s]*)@")
_KEYWORD_PASSWORD = re.compile(r"(?i)\bpassword\s*=\s*(?P<password>[^\s&'\"]+)")
_MASKS: Final = ("***", REDACTED, "")
_SQL = re.compile(r"\[SQL: ")
_PARAMETERS = re.compile(r"\[parameters: ")
_DB_TRACEBACK = re.compile(r"Traceback \(most recent call last\).*(?:sqlalchemy|psycopg)", re.S)


@dataclass(frozen=True, slots=True)
class Leak:
    """One leaked line: which test, what kind of secret (never the secret itself)."""

    test: str
    kind: str


@dataclass
class LeakDetector:
    """Finds tokens, registered secrets and unmasked DSN passwords in rendered log lines."""

    secrets: set[str] = field(default_factory=set)
    lines: int = 0
    leaks: list[Leak] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def register(self, secret: str) -> None:
        """Remember a secret string; lines holding it count as leaks."""
        if len(secret) >= MIN_SECRET_LENGTH:
            with self._lock:
                self.secrets.add(secret)

    def kinds(self, line: str) -> list[str]:
        """The kinds of secret in ``line`` (empty when it is clean)."""
        found = []
        if _JWT.search(line):
            found.append("jwt")
        for pattern in (_DSN_PASSWORD, _KEYWORD_PASSWORD):
            if any(m.group("password") not in _MASKS for m in pattern.finditer(line)):
                found.append("password")
                break
        with self._lock:
            secrets = list(self.secrets)
        if any(secret in line for secret in secrets):
            found.append("secret")
        if _SQL.search(line):
            found.append("sql")
        if _PARAMETERS.search(line):
            found.append("parameters")
        if _DB_TRACEBACK.search(line):
            found.append("database traceback")
        return found

    def check(self, line: str, test: str) -> None:
        """Record every leak of ``line`` against ``test``."""
        kinds = self.kinds(line)
        with self._lock:
            self.lines += 1
            self.leaks.extend(Leak(test, kind) for kind in kinds)


class LogGuardHandler(logging.Handler):
    """A root-logger handler that renders each record as the server would and checks it."""

    def __init__(self, detector: LeakDetector, current_test: Callable[[], str]):
        super().__init__(level=logging.DEBUG)
        self.set_name("oa_sync_log_guard")
        self.setFormatter(build_formatter("json"))
        self._detector = detector
        self._current_test = current_test

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - a record that cannot render must not break a test
            line = str(record.msg)
        self._detector.check(line, self._current_test())


class _Discard(io.StringIO):
    def write(self, s: str) -> int:
        return len(s)


@dataclass
class _Guard:
    detector: LeakDetector = field(default_factory=LeakDetector)
    test: str = "<session>"
    handler: LogGuardHandler | None = None
    _original_secret_init: Any = None

    def install(self) -> None:
        database_url = os.environ.get("OA_SYNC_TEST_DATABASE_URL", "")
        password = urlsplit(database_url).password if database_url else None
        if password:
            self.detector.register(password)
        original = server_config.Secret.__init__
        detector = self.detector

        def recording_init(secret: server_config.Secret, *args: Any, **kwargs: Any) -> None:
            original(secret, *args, **kwargs)
            if isinstance(secret.reveal(), str):
                detector.register(secret.reveal())

        self._original_secret_init = original
        server_config.Secret.__init__ = recording_init  # type: ignore[method-assign]
        configure_logging("json", "debug", stream=_Discard())
        self.handler = LogGuardHandler(self.detector, lambda: self.test)
        self.attach()

    def attach(self) -> None:
        """Keep the handler on the root logger at DEBUG, whatever a test reconfigured."""
        root = logging.getLogger()
        if self.handler is not None and self.handler not in root.handlers:
            root.addHandler(self.handler)
        root.setLevel(logging.DEBUG)
        quiet_libraries()

    def uninstall(self) -> None:
        if self.handler is not None:
            logging.getLogger().removeHandler(self.handler)
        if self._original_secret_init is not None:
            server_config.Secret.__init__ = self._original_secret_init  # type: ignore[method-assign]


guard = _Guard()
"""The session's guard (tests of the guard itself read ``guard.detector``)."""


def pytest_configure(config: pytest.Config) -> None:
    guard.install()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    guard.test = item.nodeid
    guard.attach()
    yield
    guard.test = "<session>"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    guard.attach()  # fixtures may have reconfigured logging during setup
    yield


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if guard.detector.leaks:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    leaks = guard.detector.leaks
    if not leaks:
        return
    terminalreporter.section("log guard: secrets in logs", red=True)
    seen: set[Leak] = set()
    for leak in leaks:
        if leak not in seen:
            seen.add(leak)
            terminalreporter.write_line(f"{leak.test}: a {leak.kind} appeared in a log line")
    terminalreporter.write_line(
        f"{len(leaks)} leak(s) in {guard.detector.lines} log lines checked at DEBUG"
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    guard.uninstall()
