"""``oa-sync dead-letters list|retry``: updates the HTTP endpoint refused, and re-sending them.

``list [--json]`` prints each dead letter (document, version, status, attempts, response body).
``retry [DOC_KEY ...]`` re-sends the current version of each (all by default) to the configured
endpoint (``OA_SYNC_SINK=http`` or ``tee``); a 2xx removes the dead letter. Exit 0 when none
remains among those retried, 1 otherwise, 2 on a usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os

from oa_sync_server.config import Settings
from oa_sync_server.sinks.admin import dead_letters, retry_dead_letters
from oa_sync_server.sinks.delivery import DEFAULT_SINK

NAME = "dead-letters"
HELP = "list the HTTP sink's dead letters, or retry them"


def register(parser: argparse.ArgumentParser) -> None:
    """Sub-actions ``list`` and ``retry``."""
    parser.add_argument("--sink", default=DEFAULT_SINK, help="the HTTP lane's name (%(default)s)")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="print the dead letters")
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    retry = actions.add_parser("retry", help="re-send the current version of dead letters")
    retry.add_argument("doc_keys", nargs="*", metavar="DOC_KEY", help="only these documents")


def run(args: argparse.Namespace) -> int:
    """List or retry; see the module docstring for exit codes."""
    settings = Settings.from_env(os.environ)
    if args.action == "list":
        letters = asyncio.run(dead_letters(settings, sink=args.sink))
        if args.json:
            print(json.dumps([dataclasses.asdict(x) for x in letters], indent=2, sort_keys=True))
            return 0
        for x in letters:
            body = x.response_body.replace("\n", " ")[:200]
            print(
                f"{x.doc_key} v{x.version} status {x.status} attempts {x.attempts}"
                f" at {x.created_at}: {body}"
            )
        print(f"{len(letters)} dead letter(s)")
        return 0
    retried, remaining = asyncio.run(
        retry_dead_letters(settings, doc_keys=args.doc_keys or None, sink=args.sink)
    )
    still = {x.doc_key for x in remaining}
    for x in retried:
        print(f"{x.doc_key}: {'still refused' if x.doc_key in still else 'delivered'}")
    print(
        f"retried {len(retried)}, delivered {len(retried) - len(remaining)}, left {len(remaining)}"
    )
    return 1 if remaining else 0
