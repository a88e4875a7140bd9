"""``oa-sync version``: print the installed versions of both packages."""

from __future__ import annotations

import argparse
from importlib.metadata import version

NAME = "version"
HELP = "print the versions of oa-sync-core and oa-sync-server"


def register(parser: argparse.ArgumentParser) -> None:
    """No arguments."""
    del parser


def run(args: argparse.Namespace) -> int:
    """Print one line per package."""
    del args
    for dist in ("oa-sync-core", "oa-sync-server"):
        print(f"{dist} {version(dist)}")
    return 0
