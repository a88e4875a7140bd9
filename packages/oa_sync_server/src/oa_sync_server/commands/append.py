"""``oa-sync append [FILE] [--atomic]``: append events from JSON lines (stdin when no FILE).

Each non-empty line is one event object as ``POST /v1/events`` takes it::

    {
        "streamId": "run:r1",
        "type": "run.started",
        "payload": {"runId": "r1"},
        "idempotencyKey": "r1:2",
        "expectedSeq": "1",
    }

Imports of any size. By default the input is streamed: every :data:`CHUNK` events are appended
in a transaction of their own, so memory and the transaction stay bounded whatever the file
holds. A bad line (or an ``expectedSeq`` conflict) stops the command with the line named and
nothing of its transaction written; the message says how many events of the earlier lines were
appended, so the rest can be appended from the next line on (``tail -n +N FILE``).

``--atomic`` appends the whole input in one transaction, all or nothing: every line is read and
validated first, the append locks of all its streams are taken up front (so concurrent
appenders cannot deadlock), then the chunks are written. Inputs over :data:`ATOMIC_MAX_EVENTS`
are refused with a message saying so.

Prints the positions as ``{"positions": ["41", ...]}`` (an ``AppendResponse``; streamed, and
closed over what was appended when the command stops early). Long imports report progress on
stderr once a second (events, rate, ETA when the input is a file).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from oa_sync_core import (
    ConcurrencyError,
    EventValidationError,
    NewEvent,
    OaSyncError,
    loads_strict,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from oa_sync_server.commands._db import Progress, UsageError, with_database
from oa_sync_server.postgres.event_log import PostgresEventLog, StreamOrderConflict

NAME = "append"
HELP = "append events from JSON lines (a file, or stdin), streamed in bounded transactions"

MAX_LINE_BYTES = 1024 * 1024
CHUNK = 5000
"""Events per append (one transaction each by default; one statement each with ``--atomic``)."""
ATOMIC_MAX_EVENTS = 1_000_000
"""Most events ``--atomic`` holds in memory and in one transaction."""
RETRIES = 5
"""Attempts of an ``--atomic`` transaction when a concurrent appender got ahead on a stream."""
_FIELDS = {"streamId", "type", "payload", "idempotencyKey", "expectedSeq"}


def register(parser: argparse.ArgumentParser) -> None:
    """``FILE`` (optional; ``-`` or absent reads stdin) and ``--atomic``."""
    parser.add_argument("file", nargs="?", default="-", metavar="FILE", help="JSON lines file")
    parser.add_argument(
        "--atomic",
        action="store_true",
        help=f"all or nothing in one transaction (inputs up to {ATOMIC_MAX_EVENTS:,} events)",
    )


def _seq(value: object, line: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise UsageError(f"line {line}: expectedSeq must be a non-negative integer")


def parse_line(text: str | bytes, line: int) -> NewEvent:
    """One JSON line to an event (validated later, once, by the log's append).

    Raises:
        UsageError: the line is not an event object; the message names the line.
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
    return NewEvent(
        stream_id=obj["streamId"],  # checked by validate_new_event
        type=obj["type"],
        payload=obj["payload"],
        expected_seq=_seq(obj.get("expectedSeq"), line),
        idempotency_key=obj.get("idempotencyKey"),
    )


class _Input:
    """The input's lines as ``(line number, event)``, with how far into the input we are."""

    def __init__(self, handle: IO[bytes], size: int | None) -> None:
        self.handle = handle
        self.size = size
        self.read = 0

    def events(self) -> Iterator[tuple[int, NewEvent]]:
        for number, raw in enumerate(self.handle, start=1):
            self.read += len(raw)
            if len(raw) > MAX_LINE_BYTES:
                raise UsageError(f"line {number}: longer than {MAX_LINE_BYTES} bytes")
            if raw.strip():
                yield number, parse_line(raw, number)

    def fraction(self) -> float | None:
        return self.read / self.size if self.size else None


def _chunks(source: _Input) -> Iterator[list[tuple[int, NewEvent]]]:
    chunk: list[tuple[int, NewEvent]] = []
    for item in source.events():
        chunk.append(item)
        if len(chunk) >= CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class _Output:
    """Streams ``{"positions": [...]}`` to stdout; :meth:`close` ends it validly at any point."""

    def __init__(self) -> None:
        self.count = 0
        sys.stdout.write('{"positions": [')

    def add(self, positions: list[int]) -> None:
        if not positions:
            return
        text = ", ".join(f'"{p}"' for p in positions)
        sys.stdout.write((", " if self.count else "") + text)
        self.count += len(positions)

    def close(self) -> None:
        sys.stdout.write("]}\n")
        sys.stdout.flush()


def _refusal(exc: OaSyncError, chunk: list[tuple[int, NewEvent]], done: int, atomic: bool) -> str:
    """One line naming what was refused and what stands."""
    if isinstance(exc, EventValidationError) and exc.index is not None:
        what = f"line {chunk[exc.index][0]}: {exc}"
        what = what.replace(f"event {exc.index}: ", "", 1)
    else:
        what = f"lines {chunk[0][0]}-{chunk[-1][0]}: {exc}"
    if atomic or not done:
        return f"nothing appended: {what}"
    return (
        f"{what}; nothing of lines {chunk[0][0]}-{chunk[-1][0]} appended, the {done} events "
        f"before line {chunk[0][0]} were (append the rest with: tail -n +{chunk[0][0]} FILE)"
    )


async def _stream(engine: AsyncEngine, source: _Input, out: _Output, progress: Progress) -> None:
    # One kept autocommit connection for the chunks, as the server appends: no pool checkout,
    # pre-ping or autocommit switch per chunk.
    log = PostgresEventLog(engine, max_events=CHUNK, keep_connection=True)
    try:
        await _chunked(log, source, out, progress)
    finally:
        await log.close()


async def _chunked(log: PostgresEventLog, source: _Input, out: _Output, progress: Progress) -> None:
    chunks = _chunks(source)
    while True:
        try:
            chunk = next(chunks, None)
        except UsageError as exc:
            if not out.count:
                raise
            raise UsageError(
                f"{exc}; nothing of its transaction appended, the {out.count} events before it "
                "were (fix the line and append from the first event not yet appended)"
            ) from None
        if chunk is None:
            return
        try:
            positions = await log.append([event for _, event in chunk])
        except (EventValidationError, ConcurrencyError) as exc:
            raise UsageError(_refusal(exc, chunk, out.count, atomic=False)) from None
        out.add(positions)
        progress(out.count, source.fraction())


async def _atomic(engine: AsyncEngine, source: _Input, out: _Output, progress: Progress) -> None:
    items: list[tuple[int, NewEvent]] = []
    for item in source.events():
        if len(items) >= ATOMIC_MAX_EVENTS:
            raise UsageError(
                f"more than {ATOMIC_MAX_EVENTS:,} events: too many for one transaction "
                "(--atomic); without --atomic the input is appended in bounded transactions"
            )
        items.append(item)
    log = PostgresEventLog(engine, max_events=CHUNK)
    chunks = [items[i : i + CHUNK] for i in range(0, len(items), CHUNK)]
    for attempt in range(1, RETRIES + 1):
        positions: list[int] = []
        try:
            async with engine.begin() as conn:
                await log.lock_for(conn, (e for _, e in items))
                for chunk in chunks:
                    try:
                        positions += await log.append([e for _, e in chunk], conn=conn)
                    except (EventValidationError, ConcurrencyError) as exc:
                        if isinstance(exc, StreamOrderConflict):
                            raise
                        raise UsageError(_refusal(exc, chunk, 0, atomic=True)) from None
                    progress(len(positions), len(positions) / len(items))
        except StreamOrderConflict:
            if attempt == RETRIES:
                raise
            continue
        out.add(positions)
        return


def _open(file: str) -> tuple[IO[bytes], int | None]:
    if file == "-":
        return sys.stdin.buffer, None
    path = Path(file)
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    return handle, os.fstat(handle.fileno()).st_size


def run(args: argparse.Namespace) -> int:
    """Append the input (streamed, or ``--atomic``) and print the positions."""
    handle, size = _open(args.file)
    source = _Input(handle, size)
    progress = Progress("events appended")
    out = _Output()
    work = _atomic if args.atomic else _stream
    try:
        asyncio.run(with_database(lambda engine: work(engine, source, out, progress)))
    finally:
        out.close()
        if handle is not sys.stdin.buffer:
            handle.close()
    print(f"appended {out.count} events", file=sys.stderr)
    return 0
