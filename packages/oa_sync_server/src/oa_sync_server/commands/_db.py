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
from oa_sync_server.runtime import open_database, settle_collector

__all__ = ["Progress", "UsageError", "add_worker_option", "with_database"]

_T = TypeVar("_T")


async def with_database(work: Callable[[AsyncEngine], Awaitable[_T]]) -> _T:
    """Run ``work`` on the configured database (embedded when unset), migrated to head, with
    the collector settled (:func:`~oa_sync_server.runtime.settle_collector`) once it is open:
    imports, folds and drift checks churn millions of objects."""
    settings = Settings.from_env(os.environ)
    async with open_database(settings) as engine:
        settle_collector()
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
    """Reports progress to stderr at most once a second, once a run passes a second.

    Each report gives the count, the rate since the start and, when the fraction done is known
    (given, or ``count / total``), the percentage and an ETA:
    ``... 45,000 events appended (9,800/s, 52%, ETA 5 s)``. ``enabled=False`` silences it (e.g.
    when stderr is not a terminal).
    """

    def __init__(
        self,
        what: str = "events folded",
        *,
        every_s: float = 1.0,
        total: int | None = None,
        enabled: bool = True,
    ) -> None:
        self.what = what
        self.every_s = every_s
        self.total = total
        self.enabled = enabled
        self.started = time.monotonic()
        self.last = self.started
        self.shown = False

    def __call__(self, count: int, fraction: float | None = None) -> None:
        """Report ``count``; done is ``fraction`` or, given a total, ``count / total``."""
        now = time.monotonic()
        if not self.enabled or now - self.last < self.every_s:
            return
        if fraction is None and self.total:
            fraction = min(count / self.total, 1.0)
        self.last = now
        self.shown = True
        elapsed = now - self.started
        parts = [f"{count / elapsed:,.0f}/s"]
        if fraction is not None and 0 < fraction <= 1:
            parts.append(f"{fraction:.0%}, ETA {elapsed * (1 - fraction) / fraction:,.0f} s")
        else:
            parts.append(f"{elapsed:,.0f} s")
        print(f"... {count:,} {self.what} ({', '.join(parts)})", file=sys.stderr)
