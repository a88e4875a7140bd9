"""The ``oa-sync`` entry point: discovery, usage errors."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from oa_sync_server import commands
from oa_sync_server.cli import build_parser, main


def test_every_command_module_is_a_subcommand() -> None:
    """Each public module file under ``oa_sync_server/commands/`` is a sub-command of the
    parser under its ``NAME``, with its ``HELP``, and there is no other sub-command."""
    folder = Path(commands.__file__).parent
    modules = [
        importlib.import_module(f"{commands.__name__}.{path.stem}")
        for path in sorted(folder.glob("*.py"))
        if not path.stem.startswith("_")
    ]
    assert len(modules) >= 10
    parser = build_parser()
    (choices,) = [
        action.choices
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
    ]
    assert set(choices) == {module.NAME for module in modules}
    for module in modules:
        assert choices[module.NAME].description == module.HELP


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
