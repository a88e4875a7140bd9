"""Shared plumbing of the database commands (``migrate``, ``append``, ``reproject``, ``drift``).

Not a command itself (the leading underscore keeps it out of discovery).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from oa_sync_server.config import Settings
from oa_sync_server.errors import UsageError
from oa_sync_server.runtime import open_database

__all__ = ["Progress", "UsageError", "add_worker_option", "with_database"]

_T = TypeVar("_T")


async def with_database(work: Callable[[AsyncEngine], Awaitable[_T]]) -> _T:
    """Run ``work`` on the configured database (embedded when unset), migrated to head."""
    settings = Settings.from_env(os.environ)
    async with open_database(settings) as engine:
        return await work(engine)


def add_worker_option(parser: argparse.ArgumentParser) -> None:
    """``--worker NAME``: the projector lease whose cursor bounds the fold."""
    parser.add_argument(
        "--worker",
        default="default",
        metavar="NAME",
        help="projector lease whose cursor bounds the fold (default: %(default)s)",
    )


class Progress:
    """Reports events folded to stderr, at most once a second, once a run passes a second."""

    def __init__(self, what: str = "events folded", *, every_s: float = 1.0) -> None:
        self.what = what
        self.every_s = every_s
        self.started = time.monotonic()
        self.last = self.started
        self.shown = False

    def __call__(self, count: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self.shown = True
            print(f"... {count} {self.what} ({now - self.started:.0f} s)", file=sys.stderr)
