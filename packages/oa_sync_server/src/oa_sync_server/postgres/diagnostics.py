"""What Postgres says about the projector's progress: the read horizon's holder and the lease.

Transaction ids are cluster-wide, and the projector reads only below the oldest transaction
still in flight (the snapshot xmin), so a transaction holding an xid that stays open anywhere
on the server — another database included — holds projection back. :func:`read_horizon_holder`
names that backend from ``pg_stat_activity``; :func:`read_lease` reads the projector lease row
and says whether its holder has gone silent (killed without releasing it). The worker's
``projection_stalled`` warning, ``/readyz`` and ``/metrics`` use both.

What this is not: a fix. It reads and describes; ending a backend is the operator's decision
(docs/operations.md, "Projection is stalled").
"""

from __future__ import annotations

import dataclasses
import datetime as dt

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = ["HorizonHolder", "LeaseState", "read_horizon_holder", "read_lease"]

# The oldest transaction holding an xid, other than ours: it bounds the snapshot xmin.
_HORIZON_HOLDER = sa.text(
    "SELECT pid, datname, application_name, state, xact_start, query_start, "
    "EXTRACT(EPOCH FROM clock_timestamp() - xact_start) AS age_s "
    "FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() "
    "ORDER BY age(backend_xid) DESC, xact_start LIMIT 1"
)
_LEASE_STATE = sa.text(
    "SELECT holder, expires_at, heartbeat_at, "
    "EXTRACT(EPOCH FROM clock_timestamp() - heartbeat_at) AS heartbeat_age_s, "
    "EXTRACT(EPOCH FROM expires_at - heartbeat_at) AS duration_s, "
    "expires_at > clock_timestamp() AS live "
    "FROM oa_sync.projector_leases WHERE name = :name"
)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class HorizonHolder:
    """The backend whose open transaction holds the read horizon (from ``pg_stat_activity``).

    Attributes:
        pid: its backend process id (``pg_terminate_backend(pid)`` ends it).
        database: the database it is connected to (any on the server).
        application: its ``application_name`` (empty when unset).
        state: ``active``, ``idle in transaction``...
        age_s: seconds since its transaction began.
        xact_start: when its transaction began.
        query_start: when its last statement began.

    ``state``, ``age_s``, ``xact_start`` and ``query_start`` are ``None`` when the backend
    belongs to another role and ours lacks ``pg_read_all_stats`` (:attr:`visible` is false):
    Postgres then shows its pid, database, application and xid, nothing more.
    """

    pid: int
    database: str | None
    application: str
    state: str | None
    age_s: float | None
    xact_start: dt.datetime | None
    query_start: dt.datetime | None

    @property
    def visible(self) -> bool:
        """Whether this role may see the backend's transaction start (and so its age)."""
        return self.xact_start is not None

    def describe(self) -> str:
        """One line for readiness details: who holds the horizon, and for how long."""
        app = f"application {self.application!r}" if self.application else "no application_name"
        who = f"read horizon held by pid {self.pid} ({app}, database {self.database}"
        if self.age_s is None:
            return who + "; its age is not visible to this role: grant it pg_read_all_stats)"
        return who + f", {self.state}) for {self.age_s:.0f} seconds"

    def log_fields(self) -> dict[str, object]:
        """The fields of a ``projection_stalled`` warning (never the query text)."""
        return {
            "blocking_pid": self.pid,
            "blocking_database": self.database,
            "blocking_application": self.application,
            "blocking_state": self.state,
            "blocking_age_s": None if self.age_s is None else round(self.age_s, 1),
            "blocking_xact_start": _iso(self.xact_start),
            "blocking_query_start": _iso(self.query_start),
        }


def _iso(moment: dt.datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


async def read_horizon_holder(conn: AsyncConnection) -> HorizonHolder | None:
    """The oldest transaction holding an xid on the whole server (not ``conn``'s), if any.

    Without ``pg_read_all_stats`` (or superuser), another role's backend is found but its
    state and times are not visible (see :class:`HorizonHolder`): grant it to the server's
    role for complete diagnostics. A prepared transaction (``pg_prepared_xacts``) holds the
    horizon too but has no backend: it is not found here.
    """
    row = (await conn.execute(_HORIZON_HOLDER)).one_or_none()
    if row is None:
        return None
    return HorizonHolder(
        pid=int(row.pid),
        database=row.datname,
        application=row.application_name or "",
        state=row.state,
        age_s=None if row.age_s is None else float(row.age_s),
        xact_start=row.xact_start,
        query_start=row.query_start,
    )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LeaseState:
    """The projector lease row as seen now.

    Attributes:
        holder: who holds it (``None``: released).
        expires_at: when it lapses unless renewed.
        heartbeat_age_s: seconds since the holder last renewed it.
        live: not expired.
        silent: live, but the holder has not renewed it for over two thirds of its duration
            (a holder renews every third): most likely gone without releasing it (killed),
            and nobody projects until ``expires_at``.
    """

    holder: str | None
    expires_at: dt.datetime | None
    heartbeat_age_s: float
    live: bool
    silent: bool

    def describe(self) -> str:
        """One line for readiness details."""
        until = _iso(self.expires_at)
        return f"waiting for the lease held by {self.holder} until {until}"


async def read_lease(conn: AsyncConnection, name: str = "default") -> LeaseState | None:
    """The lease row ``name`` (``None`` when no worker ever took it)."""
    row = (await conn.execute(_LEASE_STATE, {"name": name})).one_or_none()
    if row is None:
        return None
    live = bool(row.live) and row.holder is not None
    age = float(row.heartbeat_age_s or 0.0)
    duration = float(row.duration_s or 0.0)
    return LeaseState(
        holder=row.holder,
        expires_at=row.expires_at,
        heartbeat_age_s=age,
        live=live,
        silent=live and duration > 0 and age > duration * 2 / 3,
    )
