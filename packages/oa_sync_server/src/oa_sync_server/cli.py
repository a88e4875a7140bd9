"""The ``oa-sync`` command line: one sub-command per module of :mod:`oa_sync_server.commands`.

Each command module defines ``NAME`` (the sub-command), ``HELP`` (one line), ``register(parser)``
(adds its arguments) and ``run(args) -> int`` (the exit code). Discovery is by module listing,
so adding a command is adding a file. Errors the user can fix (bad configuration, bad input,
an unreachable database) print one line to stderr and exit 2; drift or parity findings exit 1.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Protocol, cast

from oa_sync_core import OaSyncError

from oa_sync_server import commands

__all__ = ["Command", "build_parser", "main"]


class Command(Protocol):
    """What a module under :mod:`oa_sync_server.commands` provides."""

    NAME: str
    HELP: str

    def register(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


def _commands() -> list[Command]:
    found: list[Command] = []
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module: ModuleType = importlib.import_module(f"{commands.__name__}.{info.name}")
        found.append(cast(Command, module))
    return found


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every discovered sub-command."""
    parser = argparse.ArgumentParser(
        prog="oa-sync", description="Khala, the OpenAgents sync engine."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in _commands():
        child = sub.add_parser(command.NAME, help=command.HELP, description=command.HELP)
        command.register(child)
        child.set_defaults(_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``oa-sync``; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args))
    except KeyboardInterrupt:
        return 130
    except OaSyncError as exc:
        print(f"oa-sync {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
