"""``oa-sync reproject``: refold documents from the log and rewrite those that differ.

Runs in one transaction under the projector lease row (a live worker pauses meanwhile); a
healthy read model is left untouched. ``--dry-run`` lists what would be rewritten. On a
terminal, progress goes to stderr once a second: events folded, events/s, and the share done
and ETA against the planner's estimate of the log's size (``pg_class.reltuples``, no scan).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from oa_sync_server.commands._db import Progress, UsageError, add_worker_option, with_database
from oa_sync_server.postgres.admin import ReprojectionOutcome, reproject

_ESTIMATE = sa.text("SELECT reltuples FROM pg_class WHERE oid = 'oa_sync.events'::regclass")

NAME = "reproject"
HELP = "refold documents from the event log and repair the ones that differ"


def register(parser: argparse.ArgumentParser) -> None:
    """``--projection P``, ``--doc KEY``, ``--dry-run``, ``--worker NAME``."""
    parser.add_argument("--projection", metavar="P", help="only this projection")
    parser.add_argument("--doc", metavar="KEY", help="only this document")
    parser.add_argument("--dry-run", action="store_true", help="list rewrites, write nothing")
    add_worker_option(parser)


def run(args: argparse.Namespace) -> int:
    """Reproject and report; exit 0."""

    async def work(engine: AsyncEngine) -> ReprojectionOutcome:
        async with engine.connect() as conn:
            estimate = (await conn.execute(_ESTIMATE)).scalar_one()
        progress = Progress(total=max(int(estimate), 0) or None, enabled=sys.stderr.isatty())
        try:
            return await reproject(
                engine,
                projection=args.projection,
                doc_key=args.doc,
                dry_run=args.dry_run,
                worker=args.worker,
                progress=progress,
            )
        except KeyError as exc:
            raise UsageError(str(exc.args[0])) from None

    outcome = asyncio.run(with_database(work))
    verb = "would rewrite" if outcome.dry_run else "rewrote"
    for key in outcome.rewritten:
        print(f"{verb} {key}")
    print(
        f"{verb} {len(outcome.rewritten)} documents, {outcome.unchanged} unchanged, "
        f"{outcome.events} events folded"
    )
    return 0
