"""``oa-sync append [FILE]``: append events from JSON lines (stdin when no FILE).

Each non-empty line is one event object as ``POST /v1/events`` takes it::

    {
        "streamId": "run:r1",
        "type": "run.started",
        "payload": {"runId": "r1"},
        "idempotencyKey": "r1:2",
        "expectedSeq": "1",
    }

Every line is parsed and validated before anything is written; a bad line stops the command
with its line number and nothing is appended. All events go in one transaction. Prints the
positions as ``{"positions": ["41", ...]}`` (an ``AppendResponse``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import IO

import orjson
from oa_sync_core import (
    ConcurrencyError,
    EventValidationError,
    NewEvent,
    OaSyncError,
    loads_strict,
    validate_new_event,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from oa_sync_server.commands._db import Progress, UsageError, with_database
from oa_sync_server.postgres.event_log import PostgresEventLog, StreamOrderConflict

NAME = "append"
HELP = "append events from JSON lines (a file, or stdin)"

MAX_LINE_BYTES = 1024 * 1024
CHUNK = 5000
"""Events per INSERT statement; all chunks share one transaction."""
RETRIES = 5
"""Attempts of the whole transaction when a concurrent appender got ahead on a stream."""
_FIELDS = {"streamId", "type", "payload", "idempotencyKey", "expectedSeq"}


def register(parser: argparse.ArgumentParser) -> None:
    """``FILE`` (optional; ``-`` or absent reads stdin)."""
    parser.add_argument("file", nargs="?", default="-", metavar="FILE", help="JSON lines file")


def _seq(value: object, line: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise UsageError(f"line {line}: expectedSeq must be a non-negative integer")


def parse_line(text: str, line: int) -> NewEvent:
    """One JSON line to a validated event.

    Raises:
        UsageError: the line is not a valid event object; the message names the line.
    """
    try:
        obj = loads_strict(text, max_bytes=MAX_LINE_BYTES)
    except OaSyncError as exc:
        raise UsageError(f"line {line}: not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise UsageError(f"line {line}: expected a JSON object")
    unknown = sorted(set(obj) - _FIELDS)
    if unknown:
        raise UsageError(f"line {line}: unknown field {unknown[0]!r}")
    for required in ("streamId", "type", "payload"):
        if required not in obj:
            raise UsageError(f"line {line}: missing {required!r}")
    event = NewEvent(
        stream_id=obj["streamId"],  # checked by validate_new_event
        type=obj["type"],
        payload=obj["payload"],
        expected_seq=_seq(obj.get("expectedSeq"), line),
        idempotency_key=obj.get("idempotencyKey"),
    )
    try:
        return validate_new_event(event)
    except EventValidationError as exc:
        raise UsageError(f"line {line}: {exc}") from None


def read_events(stream: IO[str]) -> list[NewEvent]:
    """Every event of a JSON-lines stream, validated; blank lines are skipped."""
    events: list[NewEvent] = []
    for number, text in enumerate(stream, start=1):
        if text.strip():
            events.append(parse_line(text, number))
    return events


def run(args: argparse.Namespace) -> int:
    """Parse everything, then append it in one transaction and print the positions."""
    if args.file == "-":
        events = read_events(sys.stdin)
    else:
        path = Path(args.file)
        try:
            with path.open(encoding="utf-8") as handle:
                events = read_events(handle)
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise UsageError(f"{path} is not UTF-8 text") from None

    async def append(engine: AsyncEngine) -> list[int]:
        log = PostgresEventLog(engine)
        progress = Progress("events appended")
        for attempt in range(1, RETRIES + 1):
            positions: list[int] = []
            try:
                async with engine.begin() as conn:  # one transaction, written in chunks
                    for start in range(0, len(events), CHUNK):
                        positions += await log.append(events[start : start + CHUNK], conn=conn)
                        progress(len(positions))
            except StreamOrderConflict:
                if attempt == RETRIES:
                    raise
                continue
            break
        return positions

    try:
        positions = asyncio.run(with_database(append)) if events else []
    except ConcurrencyError as exc:
        raise UsageError(f"nothing appended: {exc}") from None
    sys.stdout.write(orjson.dumps({"positions": [str(p) for p in positions]}).decode() + "\n")
    print(f"appended {len(positions)} events", file=sys.stderr)
    return 0
