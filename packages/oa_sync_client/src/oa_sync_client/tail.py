"""``oa-sync-tail TOPIC...``: follow documents live and print each update as it arrives.

A readable table by default (time, key, version, watermark, a one-line document), JSON lines
with ``--json``. Connection states (connecting, syncing, live, backing off) go to stderr, so
stdout stays data. Ctrl-C exits cleanly with status 0.

The token comes from ``--token`` or ``OA_SYNC_TOKEN``. The server's ``oa-sync tail`` is this
same command with one more source: without a token, when the server's HS256 secret is set
(``OA_SYNC_JWT_HS256_SECRET``), it mints a short-lived read token for exactly the given topics
(development and demos); see :func:`run`'s ``provider`` argument.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import sys
from collections.abc import Callable, Sequence

from oa_sync_core.protocol.client_session import BackoffPolicy, ConnectionState, DocumentChanged
from oa_sync_core.protocol.client_session import SubscriptionReset as ResetEvent
from oa_sync_core.protocol.wire import WireFormat
from oa_sync_core.topics import parse_topic

from oa_sync_client.client import ClientClosedError, SubscriptionRefusedError, SyncClient

__all__ = ["HELP", "NAME", "TokenProvider", "main", "register", "run"]

TokenProvider = str | Callable[[], str]

NAME = "tail"
HELP = "follow documents live and print each update (Ctrl-C to stop)"
DEFAULT_URL = "http://127.0.0.1:8787"
_TOKEN_TTL_S = 900.0
_FIRST_FIELDS = ("status", "stepCount", "lastStepDescription", "toolCallCount", "updatedAt")


def register(parser: argparse.ArgumentParser) -> None:
    """TOPIC..., --url, --token, --json, --proto, --max-updates."""
    parser.add_argument(
        "topics",
        nargs="+",
        metavar="TOPIC",
        help="exact document keys or prefixes ending in '*' (quote them in the shell)",
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("OA_SYNC_URL", DEFAULT_URL),
        help=f"the server (default: $OA_SYNC_URL or {DEFAULT_URL})",
    )
    parser.add_argument(
        "--token",
        default=None,
        help="bearer token with sync:read (default: $OA_SYNC_TOKEN; `oa-sync tail` also mints "
        "one from $OA_SYNC_JWT_HS256_SECRET)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    parser.add_argument(
        "--proto", action="store_true", help="use the binary subprotocol (oa-sync.v1.proto)"
    )
    parser.add_argument(
        "--max-updates",
        type=int,
        default=None,
        metavar="N",
        help="exit after N updates (scripts and tests)",
    )


def run(
    args: argparse.Namespace,
    provider: Callable[[Sequence[str]], TokenProvider | None] | None = None,
) -> int:
    """Follow until Ctrl-C (exit 0), a refusal (exit 2) or ``--max-updates``.

    Args:
        args: the parsed arguments of :func:`register`.
        provider: where a token comes from when neither ``--token`` nor ``OA_SYNC_TOKEN`` gives
            one: called with the topics, it returns a token, a callable minting one, or
            ``None`` (no token: exit 2 with a line saying so).
    """
    for topic in args.topics:
        try:
            parse_topic(topic)
        except ValueError as exc:
            print(f"oa-sync tail: TOPIC: {topic!r}: {exc}", file=sys.stderr)
            return 2
    token: TokenProvider | None = args.token or os.environ.get("OA_SYNC_TOKEN")
    if not token and provider is not None:
        token = provider(args.topics)
    if not token:
        print(
            "oa-sync tail: --token: no token: pass --token or set OA_SYNC_TOKEN",
            file=sys.stderr,
        )
        return 2
    try:
        return asyncio.run(_tail(args, token))
    except KeyboardInterrupt:
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``oa-sync-tail``; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="oa-sync-tail", description=HELP)
    register(parser)
    return run(parser.parse_args(argv))


async def _tail(args: argparse.Namespace, provider: TokenProvider) -> int:
    fmt = WireFormat.PROTO if args.proto else WireFormat.JSON
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    width = shutil.get_terminal_size((120, 20)).columns
    count = 0
    client = SyncClient(args.url, provider, fmt=fmt, backoff=BackoffPolicy(base_s=0.5, cap_s=15))
    client.add_state_listener(_print_state)
    async with client:
        subscription = client.subscribe(args.topics)

        async def follow() -> None:
            nonlocal count
            async for event in subscription:
                if isinstance(event, DocumentChanged):
                    _print_update(event, as_json=args.json, width=width)
                    count += 1
                    if args.max_updates is not None and count >= args.max_updates:
                        return
                elif isinstance(event, ResetEvent):
                    _print_state_line(f"reset ({event.reason}); a fresh snapshot follows")

        follower = asyncio.create_task(follow())
        stopper = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait({follower, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            follower.cancel()
            stopper.cancel()
        if follower in done and not follower.cancelled() and follower.exception() is not None:
            error = follower.exception()
            if isinstance(error, SubscriptionRefusedError | ClientClosedError):
                print(f"oa-sync tail: {error}", file=sys.stderr)
                return 2
            assert error is not None
            raise error
    return 0


def _print_state(state: ConnectionState) -> None:
    _print_state_line(state.value.replace("_", " "))


def _print_state_line(text: str) -> None:
    print(f"-- {text}", file=sys.stderr, flush=True)


def _print_update(event: DocumentChanged, *, as_json: bool, width: int) -> None:
    doc = event.doc
    if as_json:
        line = json.dumps(
            {
                "docKey": doc.doc_key,
                "projection": doc.projection,
                "version": str(doc.version),
                "watermark": str(doc.watermark),
                "contentHash": doc.content_hash,
                "document": doc.document,
            },
            ensure_ascii=False,
            separators=(",", ":"),
            sort_keys=False,
        )
        print(line, flush=True)
        return
    clock = dt.datetime.now(dt.UTC).strftime("%H:%M:%S")
    head = f"{clock}  {doc.doc_key:<36}  v{doc.version:<5} @{doc.watermark:<8} "
    # The fields a person looks for first, then the rest in key order.
    first = [k for k in _FIRST_FIELDS if k in doc.document]
    ordered = {k: doc.document[k] for k in first + sorted(set(doc.document) - set(first))}
    body = json.dumps(ordered, ensure_ascii=False, separators=(",", ":"))
    room = max(width - len(head) - 1, 20)
    if len(body) > room:
        body = body[: room - 1] + "…"
    print(head + body, flush=True)
