"""``oa-sync drift``: prove the read model equals a fold of the log; exit 1 when it does not.

Compares every document (or one projection's) and its checkpoint with a fresh fold of the
events the projector has folded, in one consistent snapshot. Writes nothing.
"""

from __future__ import annotations

import argparse
import asyncio

import orjson
from oa_sync_core import DriftReport
from sqlalchemy.ext.asyncio import AsyncEngine

from oa_sync_server.commands._db import Progress, UsageError, add_worker_option, with_database
from oa_sync_server.postgres.admin import check_drift

NAME = "drift"
HELP = "check the read model against a fold of the event log (exit 1 on drift)"


def register(parser: argparse.ArgumentParser) -> None:
    """``--projection P``, ``--json``, ``--worker NAME``."""
    parser.add_argument("--projection", metavar="P", help="only this projection")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    add_worker_option(parser)


def run(args: argparse.Namespace) -> int:
    """Check and report; 0 when clean, 1 on drift."""

    async def work(engine: AsyncEngine) -> DriftReport:
        try:
            return await check_drift(
                engine, projection=args.projection, worker=args.worker, progress=Progress()
            )
        except KeyError as exc:
            raise UsageError(str(exc.args[0])) from None

    report = asyncio.run(with_database(work))
    if args.json:
        print(orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2).decode())
    else:
        for item in report.items:
            print(f"{item.kind.value:14} {item.doc_key}: {item.detail}")
        state = "no drift" if report.ok else f"{len(report.items)} drifted"
        print(
            f"{state}: {report.documents_checked} documents checked, "
            f"{report.events_folded} events folded"
        )
    return 0 if report.ok else 1
