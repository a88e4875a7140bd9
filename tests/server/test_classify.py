"""classify's view of database errors: which are transient outages (503) and which are not."""

from __future__ import annotations

import psycopg
import psycopg.errors
import pytest
import sqlalchemy.exc as sa_exc
from oa_sync_server.errors import RETRY_AFTER_S, classify, is_database_unavailable


def _wrapped(orig: BaseException, *, invalidated: bool = False) -> sa_exc.DBAPIError:
    return sa_exc.DBAPIError.instance(
        "SELECT 1", {}, orig, psycopg.Error, connection_invalidated=invalidated
    )


TRANSIENT = [
    psycopg.errors.AdminShutdown("terminating connection due to administrator command"),
    psycopg.errors.CannotConnectNow("the database system is starting up"),
    psycopg.errors.SerializationFailure("could not serialize access"),
    psycopg.errors.DeadlockDetected("deadlock detected"),
    psycopg.errors.TooManyConnections("too many clients already"),
    psycopg.OperationalError("connection failed: connection refused"),  # no SQLSTATE
    psycopg.InterfaceError("the connection is closed"),
]
PERMANENT = [
    psycopg.errors.UniqueViolation("duplicate key"),
    psycopg.errors.UndefinedTable("relation does not exist"),
    psycopg.errors.SyntaxError("syntax error"),
    ValueError("a bug"),
]


@pytest.mark.parametrize("orig", TRANSIENT, ids=lambda e: type(e).__name__)
def test_transient_database_errors_are_503_with_retry_after(orig: BaseException) -> None:
    """Connection failures, shutdowns, serialization failures and exhausted connections are
    503 ``unavailable`` with ``Retry-After``, raised bare or wrapped by SQLAlchemy."""
    for exc in (orig, _wrapped(orig)):
        assert is_database_unavailable(exc)
        mapping = classify(exc)
        assert (mapping.status, mapping.code) == (503, "unavailable")
        assert mapping.retry_after_s == RETRY_AFTER_S


@pytest.mark.parametrize("orig", PERMANENT, ids=lambda e: type(e).__name__)
def test_other_errors_stay_500(orig: BaseException) -> None:
    """A constraint violation, a missing table, bad SQL or a bug is a 500 ``internal``, not a
    retryable 503; an invalidated connection is transient whatever the error."""
    exc: BaseException = _wrapped(orig) if isinstance(orig, psycopg.Error) else orig
    assert not is_database_unavailable(exc)
    assert (classify(exc).status, classify(exc).retry_after_s) == (500, None)
    if isinstance(orig, psycopg.Error):
        assert is_database_unavailable(_wrapped(orig, invalidated=True))


def test_an_exhausted_pool_is_transient() -> None:
    """SQLAlchemy's pool timeout (no connection to give) is a 503."""
    assert classify(sa_exc.TimeoutError("QueuePool limit reached")).status == 503
