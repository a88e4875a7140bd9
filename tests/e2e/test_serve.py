"""``oa-sync serve --demo`` as a real process on the embedded Postgres: it prints a working
token and command, becomes ready, shows live demo updates, and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web
from oa_sync_server.app import create_app
from oa_sync_server.auth import TokenVerifier
from oa_sync_server.cli import main
from oa_sync_server.config import JwtSettings, Secret, Settings
from oa_sync_server.errors import ConfigError

from tests.live import make_live_server
from tests.serve_process import serve_process

START_TIMEOUT_S = 60.0


async def _read_until(stream: asyncio.StreamReader, pattern: re.Pattern[str]) -> re.Match[str]:
    while True:
        line = await stream.readline()
        if not line:
            raise AssertionError(f"output ended before {pattern.pattern!r}")
        match = pattern.search(line.decode())
        if match:
            return match


@pytest.mark.slow
async def test_serve_demo_on_embedded_postgres(tmp_path: Path) -> None:
    """serve --demo starts an embedded Postgres, answers /readyz 200, streams demo documents
    to the printed token, its printed tail command works pasted into a shell whose PATH lacks
    the venv, and it exits 0 on SIGTERM."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OA_SYNC_")}
    env |= {"OA_SYNC_DATA_DIR": str(tmp_path / "data"), "OA_SYNC_LOG_FORMAT": "json"}
    # The console script, as `nox -s serve` runs it (its directory is not on a user's PATH).
    errors = tmp_path / "stderr.log"
    with errors.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "oa-sync"),
            "serve",
            "--demo",
            "--port",
            "0",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            try:
                found = await _read_until(proc.stdout, re.compile(r"serving on (http://\S+)"))
            except AssertionError:
                # Say why it never served (the process's own last lines), not only that it did not.
                raise AssertionError(errors.read_text()[-3000:]) from None
            url = found[1]
            token = (await _read_until(proc.stdout, re.compile(r"demo token .*: (\S+)$")))[1]
            tail = (await _read_until(proc.stdout, re.compile(r"^\s+(\S+ tail .*)$")))[1]
            assert f"--url {url}" in tail
            assert f"--token {token}" in tail
            async with aiohttp.ClientSession(url) as http:
                while True:
                    async with http.get("/readyz") as resp:
                        if resp.status == 200:
                            break
                    await asyncio.sleep(0.1)  # polling readiness, bounded by the timeout
                headers = {"Authorization": f"Bearer {token}"}
                async with http.get(
                    "/v1/stream", params={"topic": "runtime/run_summary:*"}, headers=headers
                ) as resp:
                    assert resp.status == 200
                    async for line in resp.content:
                        if line.startswith(b"event: update"):
                            break
            # The printed command, pasted as printed into a shell without the venv on PATH.
            pasted = await asyncio.create_subprocess_exec(
                "/bin/sh",
                "-c",
                f"{tail} --json --max-updates 1",
                env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await pasted.communicate()
            assert pasted.returncode == 0, err.decode()
            assert orjson.loads(out.splitlines()[0])["docKey"].startswith("runtime/run_summary:")
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_token_command_mints_a_verifiable_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``oa-sync token`` prints one token the server verifies with the same secret; without a
    secret, or with a bad topic, it exits 2 with one line."""
    secret = "d" * 40
    monkeypatch.setenv("OA_SYNC_JWT_HS256_SECRET", secret)
    argv = ["token", "--sub", "alice", "--topic", "runtime/run_summary:*"]
    assert main([*argv, "--scope", "sync:append", "--ttl", "60"]) == 0
    token = capsys.readouterr().out.strip()
    principal = await TokenVerifier(JwtSettings(hs256_secret=Secret(secret))).verify(token)
    assert principal.subject == "alice"
    assert principal.scopes == frozenset({"sync:append"})
    assert principal.grant.allows("runtime/run_summary:r1")
    assert not principal.grant.allows("runtime/codex_worker_summary:w1")
    assert main(["token", "--topic", "bad topic"]) == 2
    monkeypatch.delenv("OA_SYNC_JWT_HS256_SECRET")
    assert main(["token"]) == 2
    err = capsys.readouterr().err
    assert "OA_SYNC_JWT_HS256_SECRET" in err
    assert secret not in err


def test_serve_without_a_jwt_key_refuses_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``oa-sync serve`` with no JWT key configured (and no --demo) exits 2 naming the variable."""
    for name in ("OA_SYNC_JWT_HS256_SECRET", "OA_SYNC_JWT_PUBLIC_KEY_FILE", "OA_SYNC_JWT_JWKS_URL"):
        monkeypatch.delenv(name, raising=False)
    assert main(["serve", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "OA_SYNC_JWT_HS256_SECRET" in err[0]


@pytest.mark.slow
async def test_two_server_processes_on_one_database(database_url: str) -> None:
    """An ``oa-sync serve`` process and an in-process server share one database: an SSE client
    on each receives every update appended through either."""
    async with serve_process(database_url, allow_own_origin=False) as other:
        async with make_live_server(database_url, secret=other.secret) as local:
            token = local.token()
            headers = {"Authorization": f"Bearer {token}"}
            async with asyncio.timeout(START_TIMEOUT_S), aiohttp.ClientSession() as http:
                streams = [
                    await http.get(f"{base}/v1/stream", params={"topic": "*"}, headers=headers)
                    for base in (local.url, other.url)
                ]
                for resp in streams:
                    assert resp.status == 200
                    async for line in resp.content:
                        if line.startswith(b"event: synced"):
                            break
                for i, base in enumerate((local.url, other.url, local.url)):
                    body = {
                        "events": [
                            {
                                "streamId": f"run:p{i}",
                                "type": "run.created",
                                "payload": {"runId": f"p{i}"},
                            }
                        ]
                    }
                    async with http.post(f"{base}/v1/events", json=body, headers=headers) as r:
                        assert r.status == 200
                for resp in streams:
                    seen: set[str] = set()
                    async for line in resp.content:
                        if line.startswith(b"data: ") and b'"docKey"' in line:
                            seen.add(orjson.loads(line[6:])["docKey"])
                            if len(seen) == 3:
                                break
                    assert seen == {f"runtime/run_summary:p{i}" for i in range(3)}
                    resp.close()
        assert await other.stop() == 0


async def test_create_app_owns_an_engine_from_the_url(database_url: str) -> None:
    """create_app without an engine builds one from the URL (and disposes of it); without a
    URL or a JWT key it refuses with a ConfigError naming the variable."""
    secret = Secret("k" * 48)
    settings = Settings(database_url=database_url, jwt=JwtSettings(hs256_secret=secret))
    app = create_app(settings, run_projector=False)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/readyz") as resp,
        ):
            assert resp.status == 200
    finally:
        await runner.cleanup()
    with pytest.raises(ConfigError, match="OA_SYNC_DATABASE_URL"):
        create_app(Settings(jwt=JwtSettings(hs256_secret=secret)))
    with pytest.raises(ConfigError, match="OA_SYNC_JWT_HS256_SECRET"):
        create_app(Settings(database_url=database_url))


@pytest.mark.slow
async def test_serve_says_how_to_allow_a_browser_and_demo_allows_its_own_origin(
    database_url: str,
) -> None:
    """Without allowed origins the start-up output names OA_SYNC_ALLOWED_ORIGINS and a dev
    origin to put in it; with --demo a page from the server's own origin gets its WebSocket
    upgraded and CORS headers, while another origin still gets 403."""
    async with serve_process(database_url, allow_own_origin=False) as server:
        hint = (await server.wait_for_line(re.compile(r"^browsers: .*"), START_TIMEOUT_S))[0]
    assert "OA_SYNC_ALLOWED_ORIGINS=http://localhost:5173" in hint

    async with serve_process(database_url, demo=True, allow_own_origin=False) as server:
        url = server.url
        line = (await server.wait_for_line(re.compile(r"^browsers: .*"), START_TIMEOUT_S))[0]
        found = await server.wait_for_line(re.compile(r"demo token .*: (\S+)$"), START_TIMEOUT_S)
        token = found[1]
        port = server.port
        assert url in line
        assert f"http://localhost:{port}" in line
        async with aiohttp.ClientSession(url) as http:
            for origin in (url, f"http://localhost:{port}"):
                async with http.ws_connect(
                    "/v1/sync", protocols=["oa-sync.v1.json"], headers={"Origin": origin}
                ) as ws:
                    await ws.send_str(orjson.dumps({"authenticate": {"token": token}}).decode())
                async with http.get(
                    "/v1/changes",
                    params={"topic": "*"},
                    headers={"Origin": origin, "Authorization": f"Bearer {token}"},
                ) as resp:
                    assert resp.headers["Access-Control-Allow-Origin"] == origin
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect("/v1/sync", headers={"Origin": "http://evil.example"})
            assert refused.value.status == 403
