"""Khala server: Postgres adapters, projector worker, WebSocket/SSE/HTTP API and the CLI.

Usable as a library (the Postgres event log, stores and projector worker, embedded in a
runtime service) or as a process (``oa-sync serve``).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("oa-sync-server")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["__version__"]
