"""Postgres adapters of Khala: engine, tables, event log, stores and the read side.

Everything here works on SQLAlchemy Core with the async engine on psycopg 3; SQL is built
from SQLAlchemy constructs or ``text()`` with bound parameters, never by formatting strings.
What this is not: the projector loop (:mod:`oa_sync_server.worker`) or the HTTP server.
"""

from __future__ import annotations

from oa_sync_server.postgres.engine import create_engine, normalise_url

__all__ = ["create_engine", "normalise_url"]
