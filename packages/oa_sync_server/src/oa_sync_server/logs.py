"""Logging: structlog configured once for the server, with secrets redacted from every line.

:func:`configure_logging` sets up structlog and routes the standard library's loggers (aiohttp,
alembic, asyncio) through the same processors, so every line — ours or a library's — passes
:func:`redact` and is rendered as console text (development) or one JSON object per line
(``OA_SYNC_LOG_FORMAT=json``). Events are snake_case, past tense (``token_refused``), with
keyword fields.

:func:`redact` masks:

* the value of any key whose name contains ``token``, ``authorization``, ``secret``,
  ``password``, ``passwd``, ``cookie`` or ``api_key`` (case-insensitive), at any depth;
* in every string, anything shaped like a JWT (three base64url segments), a bearer credential,
  the value of a ``token=`` / ``access_token=`` / ``secret=`` query or form parameter, and the
  password of a ``scheme://user:password@`` URL (also a libpq ``password=...`` keyword).

:func:`guard_database_errors` keeps database errors to their type and SQLSTATE: SQLAlchemy's
exception text carries the statement (``[SQL: …]``) and its bound parameters (``[parameters:
…]``, i.e. event payloads), and a traceback repeats them, so a record whose ``exc_info`` is a
database error (or caused by one) loses the traceback and gains ``error`` and ``sqlstate``
fields instead; any ``[SQL: …]``/``[parameters: …]`` text left in a string is cut by
:func:`scrub`. :func:`error_fields` gives the same fields for a handler that logs an error
itself.

:func:`build_formatter` is the stdlib formatter of that pipeline, for any extra handler that
must see exactly what the server writes (the test suite's log guard uses it).

What this is not: a place that decides what to log. The core does not log at all; the server
modules call ``structlog.get_logger(__name__)``.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping
from typing import IO, Any, Final

import psycopg
import sqlalchemy.exc as sa_exc
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from oa_sync_server.config import LogFormat, redact_dsn

__all__ = [
    "REDACTED",
    "build_formatter",
    "configure_logging",
    "error_fields",
    "guard_database_errors",
    "quiet_libraries",
    "redact",
    "scrub",
]

REDACTED: Final = "[redacted]"
_SENSITIVE_KEY = re.compile(r"token|authorization|secret|password|passwd|cookie|api_?key", re.I)
# A JWT: a header segment (always starts "eyJ" when produced by a JSON encoder, but be wide),
# then two more base64url segments. Short dotted words (hostnames, event types) do not match.
_JWT = re.compile(
    r"(?:eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*|[A-Za-z0-9_-]{16,}\.[A-Za-z0-9_-]{4,})"
    r"\.[A-Za-z0-9_-]*"
)
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+")
_PARAM = re.compile(
    r"(?i)(?P<name>\b(?:access_token|id_token|refresh_token|token|secret|password|passwd)=)"
    r"(?P<value>[^&\s'\"]+)"
)
# SQLAlchemy renders "<message>\n[SQL: <statement>]\n[parameters: <values>]\n(Background on
# this error at: <url>)": cut from the first bracket to the background link or the end.
_STATEMENT = re.compile(r"\[(?:SQL|parameters): .*?(?=\(Background on this error at|\Z)", re.S)
SQL_REDACTED: Final = "[SQL redacted] "
_MAX_DEPTH: Final = 8
_HANDLER_NAME: Final = "oa_sync"
_QUIET: Final = ("sqlalchemy", "pgserver")


def scrub(text: str) -> str:
    """Mask JWTs, bearer credentials and URL passwords inside a string."""
    text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    text = _JWT.sub(REDACTED, text)
    text = redact_dsn(text)
    text = _STATEMENT.sub(SQL_REDACTED, text)
    return _PARAM.sub(lambda m: m.group("name") + REDACTED, text)


def _database_error(exc: BaseException | None) -> BaseException | None:
    """The first database error in ``exc``'s chain (itself, its cause or its context)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, sa_exc.SQLAlchemyError | psycopg.Error):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def error_fields(exc: BaseException) -> dict[str, str]:
    """Log fields naming an error without its text: ``error`` (type) and ``sqlstate``.

    For a database error the text holds SQL and parameters; this is what may be logged.
    """
    fields = {"error": type(exc).__name__}
    db = _database_error(exc)
    if db is not None:
        orig = getattr(db, "orig", None) or db
        fields["db_error"] = type(orig).__name__
        sqlstate = getattr(orig, "sqlstate", None)
        if isinstance(sqlstate, str):
            fields["sqlstate"] = sqlstate
    return fields


def _exception(exc_info: Any) -> BaseException | None:
    if isinstance(exc_info, BaseException):
        return exc_info
    if isinstance(exc_info, tuple) and len(exc_info) == 3:
        value = exc_info[1]
        return value if isinstance(value, BaseException) else None
    if exc_info is True:
        return sys.exc_info()[1]
    return None


def guard_database_errors(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: a database error is logged by type and SQLSTATE, no traceback.

    Runs before ``format_exc_info``; other exceptions keep their traceback.
    """
    exc = _exception(event_dict.get("exc_info"))
    if exc is None or _database_error(exc) is None:
        return event_dict
    del event_dict["exc_info"]
    for key, value in error_fields(exc).items():
        event_dict.setdefault(key, value)
    return event_dict


def _clean(value: Any, depth: int) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if depth >= _MAX_DEPTH:
        return value if isinstance(value, int | float | bool | None) else REDACTED
    if isinstance(value, Mapping):
        return {
            k: REDACTED if isinstance(k, str) and _SENSITIVE_KEY.search(k) else _clean(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_clean(v, depth + 1) for v in value]
    if isinstance(value, bytes | bytearray):
        return scrub(bytes(value).decode("utf-8", "replace"))
    if isinstance(value, int | float | bool | None):
        return value
    return scrub(repr(value) if not isinstance(value, BaseException) else str(value))


def redact(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: mask secrets in keys and values (see the module docstring)."""
    for key in list(event_dict):
        if key in ("exc_info", "stack_info"):
            continue  # rendered to text by format_exc_info before this processor runs
        if _SENSITIVE_KEY.search(key):
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _clean(event_dict[key], 0)
    return event_dict


def _drop_color_message(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    event_dict.pop("color_message", None)
    return event_dict


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        guard_database_errors,
        structlog.processors.format_exc_info,
        _drop_color_message,
        redact,
    ]


def build_formatter(log_format: LogFormat | str = LogFormat.CONSOLE) -> logging.Formatter:
    """The formatter of :func:`configure_logging`'s handler: every record redacted, rendered.

    It renders both structlog events (routed through the standard library by
    :func:`configure_logging`) and plain ``logging`` records of libraries.

    Args:
        log_format: ``console`` or ``json``.

    Raises:
        ValueError: an unknown format.
    """
    fmt = LogFormat(log_format)
    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if fmt is LogFormat.JSON
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )


def configure_logging(
    log_format: LogFormat | str = LogFormat.CONSOLE,
    level: str = "info",
    *,
    stream: IO[str] | None = None,
) -> None:
    """Configure structlog and the standard library's logging for the server.

    Safe to call again (tests do): it replaces the handler it installed before.

    Args:
        log_format: ``console`` or ``json``.
        level: the least severe level written (``debug`` ... ``critical``).
        stream: where lines go (default: standard error).

    Raises:
        ValueError: an unknown format or level.
    """
    formatter = build_formatter(log_format)
    numeric = logging.getLevelNamesMapping().get(level.upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}")
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    quiet_libraries()


def quiet_libraries() -> None:
    """Keep SQLAlchemy's and pgserver's loggers at WARNING whatever the root level.

    SQLAlchemy logs every statement with its bound parameters (event payloads) as soon as its
    logger is enabled for INFO, and result rows at DEBUG: too much, and data, not diagnostics.
    pgserver logs every ``initdb``/``pg_ctl`` command line and its output at INFO, which buries
    what ``oa-sync serve --demo`` prints (the token and the commands to paste).
    """
    for name in _QUIET:
        logger = logging.getLogger(name)
        if logger.level < logging.WARNING:
            logger.setLevel(logging.WARNING)
