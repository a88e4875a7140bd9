"""``oa-sync parity [--json]``: do the Postgres lane and the HTTP (shadow) lane agree?

Prints, per projection, the documents in each lane, how many are behind on the HTTP lane (and
by how many versions, and how long), hash mismatches and dead letters; then each divergent
document. Exit 0 in parity, 1 out of parity, 2 on a usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os

from oa_sync_server.config import Settings
from oa_sync_server.sinks.admin import parity_report
from oa_sync_server.sinks.delivery import DEFAULT_SINK
from oa_sync_server.sinks.parity import DEFAULT_DIVERGENCE_LIMIT, ParityReport

NAME = "parity"
HELP = "compare the Postgres read model with what the HTTP sink delivered; exit 1 if they differ"


def register(parser: argparse.ArgumentParser) -> None:
    """``--json``, ``--sink``, ``--limit``."""
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--sink", default=DEFAULT_SINK, help="the HTTP lane's name (%(default)s)")
    parser.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_DIVERGENCE_LIMIT,
        help="most divergent documents listed (%(default)s)",
    )


def _print_text(report: ParityReport) -> None:
    state = "in parity" if report.in_parity else "OUT OF PARITY"
    print(f"sink {report.sink}: {state}")
    for p in report.projections:
        print(
            f"  {p.projection}: primary {p.primary_documents}, shadow {p.shadow_documents},"
            f" behind {p.behind} (versions {p.versions_behind}, max {p.max_versions_behind},"
            f" lag {p.lag_s:.1f}s), hash mismatches {p.hash_mismatches},"
            f" dead letters {p.dead_letters}"
        )
    for d in report.divergences:
        extra = " [dead letter]" if d.dead_lettered else ""
        print(
            f"  {d.kind} {d.doc_key}: primary v{d.primary_version} {d.primary_hash[:12]}"
            f" / shadow v{d.shadow_version} {d.shadow_hash[:12] or '-'}{extra}"
        )
    if report.truncated:
        print(f"  ... more than {len(report.divergences)} divergent documents")


def run(args: argparse.Namespace) -> int:
    """Print the report; 0 in parity, 1 out of parity."""
    settings = Settings.from_env(os.environ)
    report = asyncio.run(parity_report(settings, sink=args.sink, limit=max(0, args.limit)))
    if args.json:
        print(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        _print_text(report)
    return 0 if report.in_parity else 1
