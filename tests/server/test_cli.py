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
from oa_sync_server.commands import serve


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


class _Writes:
    """A stream that records each write call (what reaches the pipe as one write)."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_serve_prints_each_line_in_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """With --workers every process shares stdout; a line and its newline go in one write, so
    another process's log line cannot land inside it (print writes them apart when unbuffered)."""
    out, err = _Writes(), _Writes()
    monkeypatch.setattr("sys.stdout", out)
    monkeypatch.setattr("sys.stderr", err)
    serve._say("oa-sync serving on http://127.0.0.1:1")
    serve._say("oa-sync stopped", err=True)
    assert out.writes == ["oa-sync serving on http://127.0.0.1:1\n"]
    assert err.writes == ["oa-sync stopped\n"]
