"""The ``oa-sync`` entry point: discovery, usage errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
from oa_sync_server.cli import build_parser, main


def test_every_command_module_is_a_subcommand() -> None:
    parser = build_parser()
    assert "version" in parser.format_help()


def test_version_prints_both_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    out = capsys.readouterr().out
    assert "oa-sync-core" in out
    assert "oa-sync-server" in out


def test_unknown_command_is_a_usage_error() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "oa_sync_server.cli", "frobnicate"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "invalid choice" in done.stderr
