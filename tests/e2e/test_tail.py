"""``oa-sync tail`` as a real process against a real server."""

from __future__ import annotations

import asyncio
import json
import signal
import sys

from oa_sync_core.testing import new_event

from tests.live import make_live_server

TOPIC = "runtime/run_summary:*"


async def _spawn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "oa_sync_server.cli",
        "tail",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _read_line(stream: asyncio.StreamReader | None, within_s: float = 30) -> str:
    assert stream is not None
    async with asyncio.timeout(within_s):
        return (await stream.readline()).decode()


async def test_tail_prints_json_lines(database_url: str) -> None:
    """--json prints one JSON object per update (snapshot then live); states go to stderr."""
    async with make_live_server(database_url) as server:
        await server.append([new_event("run.started", "r1")])
        await server.settle()
        token = server.token(topics=[TOPIC], scopes=["sync:read"])
        proc = await _spawn(
            TOPIC, "--url", server.url, "--token", token, "--json", "--max-updates", "2"
        )
        first = json.loads(await _read_line(proc.stdout))
        assert first["docKey"] == "runtime/run_summary:r1"
        assert first["version"] == "1"
        await server.append([new_event("run.step", "r1", description="planning")])
        second = json.loads(await _read_line(proc.stdout))
        assert second["version"] == "2"
        assert second["document"]["runId"] == "r1"
        async with asyncio.timeout(30):
            _, err = await proc.communicate()
        assert proc.returncode == 0
        assert "-- live" in err.decode()


async def test_tail_table_and_ctrl_c(database_url: str) -> None:
    """The default table shows key and version; SIGINT exits 0 without a traceback."""
    async with make_live_server(database_url) as server:
        await server.append([new_event("run.started", "r7")])
        await server.settle()
        token = server.token(topics=[TOPIC], scopes=["sync:read"])
        proc = await _spawn(TOPIC, "--url", server.url, "--token", token, "--proto")
        line = await _read_line(proc.stdout)
        assert "runtime/run_summary:r7" in line
        assert " v1 " in line
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            _, err = await proc.communicate()
        assert proc.returncode == 0
        assert "Traceback" not in err.decode()


async def test_tail_refusals_exit_2() -> None:
    """A bad topic or a missing token is a one-line user error (exit 2)."""
    proc = await _spawn("bad topic*x", "--token", "t")
    async with asyncio.timeout(30):
        _, err = await proc.communicate()
    assert proc.returncode == 2
    assert err.decode().startswith("oa-sync tail: ")
