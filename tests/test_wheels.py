"""The three distributions as users install them: built wheels, fresh virtualenvs, no checkout.

One module-scoped build: ``pip wheel`` builds ``oa-sync-core``, ``oa-sync-client`` and
``oa-sync-server``; two virtualenvs under a temporary directory get them the way users do
(``pip install`` of the wheel files, dependencies from the index, no editable install, no
``OA_SYNC_*`` path override), and every command runs with that directory as its working
directory, so nothing can be read from the repository by accident.

* the **server venv** (core + client + server, without the ``[embedded]`` extra) migrates a
  fresh database, serves it, runs ``examples/embed.py`` (copied out of the checkout), refuses to
  serve with no database URL (one line naming the variable and the extra), and names a missing
  migration directory in one line;
* the **client venv** (core + client only) follows a document live with ``SyncClient`` while the
  server venv's ``oa-sync serve`` appends to it, and has no SQLAlchemy, psycopg, alembic,
  pgserver, jwt or server package installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from oa_sync_server.auth import mint_token
from oa_sync_server.config import Secret

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["oa_sync_core", "oa_sync_client", "oa_sync_server"]
INSTALL_TIMEOUT_S = 600
SECRET = "wheel-test-secret-" + "x" * 24
START_TIMEOUT_S = 60.0


def _run(
    argv: list[str], cwd: Path, *, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - our own interpreters and commands
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without any OA_SYNC_* variable (nothing points back at the checkout)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OA_SYNC_", "PYTHON"))}
    return env | extra


def _venv(where: Path, wheels: list[Path]) -> Path:
    _run([sys.executable, "-m", "venv", str(where)], where.parent).check_returncode()
    python = where / "bin" / "python"
    done = _run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        + [str(w) for w in wheels],
        where.parent,
        env=_clean_env(),
        timeout=INSTALL_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return python


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory outside the checkout."""
    where = tmp_path_factory.mktemp("outside")
    assert ROOT not in where.parents
    return where


@pytest.fixture(scope="module")
def wheels(outside: Path) -> dict[str, Path]:
    """The three wheels, built from the packages' own metadata."""
    dist = outside / "dist"
    built = _run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dist)]
        + [str(ROOT / "packages" / name) for name in PACKAGES],
        outside,
        env=_clean_env(),
        timeout=INSTALL_TIMEOUT_S,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    return {name: next(dist.glob(f"{name}-*.whl")) for name in PACKAGES}


@pytest.fixture(scope="module")
def server_python(outside: Path, wheels: dict[str, Path]) -> Path:
    """A virtualenv with the server's wheel (and its dependencies), without [embedded]."""
    return _venv(outside / "server-venv", list(wheels.values()))


@pytest.fixture(scope="module")
def client_python(outside: Path, wheels: dict[str, Path]) -> Path:
    """A virtualenv with only the core and the client."""
    return _venv(outside / "client-venv", [wheels["oa_sync_core"], wheels["oa_sync_client"]])


@contextlib.asynccontextmanager
async def _serve(python: Path, cwd: Path, database_url: str) -> AsyncIterator[str]:
    oa_sync = python.parent / "oa-sync"
    env = _clean_env(
        OA_SYNC_DATABASE_URL=database_url,
        OA_SYNC_JWT_HS256_SECRET=SECRET,
        OA_SYNC_PORT="0",
        OA_SYNC_LOG_FORMAT="json",
    )
    proc = await asyncio.create_subprocess_exec(
        str(oa_sync),
        "serve",
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            while True:
                line = (await proc.stdout.readline()).decode()
                assert line, "oa-sync serve exited before serving"
                if match := re.search(r"serving on (http://\S+)", line):
                    break
            url = match[1]
            async with aiohttp.ClientSession(url) as http:
                while True:
                    async with http.get("/readyz") as resp:
                        if resp.status == 200:
                            break
                    await asyncio.sleep(0.1)  # polling readiness, bounded by the timeout
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()
            async with asyncio.timeout(20):
                await proc.wait()


def _token(scopes: list[str]) -> str:
    return mint_token(Secret(SECRET), subject="wheels", topics=["*"], scopes=scopes, ttl_s=600)


async def test_migrate_and_serve_from_the_wheel(
    server_python: Path, outside: Path, empty_database: str
) -> None:
    """``oa-sync migrate`` then ``oa-sync serve`` from the installed wheel, outside the checkout,
    on a fresh database: the schema is created, an appended event becomes a document, and the
    inspector page and its bundle are served from the wheel."""
    migrate = _run(
        [str(server_python.parent / "oa-sync"), "migrate"],
        outside,
        env=_clean_env(OA_SYNC_DATABASE_URL=empty_database),
    )
    assert migrate.returncode == 0, migrate.stderr
    async with _serve(server_python, outside, empty_database) as url:
        headers = {"Authorization": f"Bearer {_token(['sync:append', 'sync:read'])}"}
        event = {"streamId": "run:w1", "type": "run.created", "payload": {"runId": "w1"}}
        async with aiohttp.ClientSession(url, headers=headers) as http:
            async with http.post("/v1/events", json={"events": [event]}) as resp:
                assert resp.status == 200, await resp.text()
            async with asyncio.timeout(20):
                while True:
                    async with http.get("/v1/docs/runtime/run_summary:w1") as resp:
                        if resp.status == 200:
                            assert (await resp.json())["version"] == "1"
                            break
                    await asyncio.sleep(0.05)  # polling the read model, bounded
            for path in ("/", "/inspector/inspector.js"):  # the inspector ships in the wheel
                async with http.get(path) as resp:
                    assert resp.status == 200, path


async def test_client_only_install_follows_a_live_document(
    client_python: Path, server_python: Path, outside: Path, empty_database: str
) -> None:
    """A venv with only oa-sync-core and oa-sync-client follows a document live from a served
    database, and has none of the server's dependencies."""
    missing = _run(
        [
            str(client_python),
            "-c",
            "import importlib.util as u, sys; "
            "names = ['sqlalchemy', 'psycopg', 'alembic', 'pgserver', 'jwt', 'oa_sync_server']; "
            "print(','.join(n for n in names if u.find_spec(n)))",
        ],
        outside,
    )
    assert missing.returncode == 0, missing.stderr
    assert missing.stdout.strip() == ""
    follower = outside / "follow.py"
    follower.write_text(
        textwrap.dedent(
            """
            import asyncio, sys
            from oa_sync_client import DocumentChanged, SyncClient

            async def main() -> None:
                async with SyncClient(sys.argv[1], sys.argv[2]) as client:
                    print("subscribed", flush=True)
                    async for event in client.subscribe(["runtime/run_summary:w2"]):
                        if isinstance(event, DocumentChanged) and event.doc.version >= 2:
                            print(event.doc.document["status"], flush=True)
                            return

            asyncio.run(main())
            """
        )
    )
    async with _serve(server_python, outside, empty_database) as url:
        proc = await asyncio.create_subprocess_exec(
            str(client_python),
            str(follower),
            url,
            _token(["sync:read"]),
            cwd=outside,
            env=_clean_env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(30):
                assert (await proc.stdout.readline()).strip() == b"subscribed"
                headers = {"Authorization": f"Bearer {_token(['sync:append'])}"}
                events = [
                    {"streamId": "run:w2", "type": "run.created", "payload": {"runId": "w2"}},
                    {"streamId": "run:w2", "type": "run.started", "payload": {"runId": "w2"}},
                ]
                async with (
                    aiohttp.ClientSession(url, headers=headers) as http,
                    http.post("/v1/events", json={"events": events}) as resp,
                ):
                    assert resp.status == 200, await resp.text()
                out, err = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0, err.decode()[-2000:]
        assert out.decode().strip() == "RUNNING"


def test_embedding_example_runs_from_the_wheel(
    server_python: Path, outside: Path, empty_database: str
) -> None:
    """examples/embed.py, copied out of the checkout, runs on the installed wheels."""
    example = outside / "embed.py"
    shutil.copyfile(ROOT / "examples" / "embed.py", example)
    done = _run(
        [str(server_python), str(example)],
        outside,
        env=_clean_env(OA_SYNC_DATABASE_URL=empty_database),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "'status': 'RUNNING'" in done.stdout


def test_serve_without_a_database_or_the_embedded_extra_says_what_to_do(
    server_python: Path, outside: Path
) -> None:
    """Without OA_SYNC_DATABASE_URL and without [embedded], serve exits 2 with one line."""
    done = _run(
        [str(server_python.parent / "oa-sync"), "serve"],
        outside,
        env=_clean_env(OA_SYNC_JWT_HS256_SECRET=SECRET, OA_SYNC_DATA_DIR=str(outside / "d")),
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "OA_SYNC_DATABASE_URL" in lines[0]
    assert "oa-sync-server[embedded]" in lines[0]


def test_a_missing_migration_directory_is_named(
    server_python: Path, outside: Path, empty_database: str
) -> None:
    """A broken install (migrations deleted) fails migrate with one line naming the directory."""
    found = _run(
        [
            str(server_python),
            "-c",
            "import oa_sync_server.postgres.migrate as m, pathlib; "
            "print(pathlib.Path(m.__file__).with_name('migrations'))",
        ],
        outside,
    )
    assert found.returncode == 0, found.stderr
    migrations = Path(found.stdout.strip())
    broken = migrations.with_name("migrations-moved")
    migrations.rename(broken)
    try:
        done = _run(
            [str(server_python.parent / "oa-sync"), "migrate"],
            outside,
            env=_clean_env(OA_SYNC_DATABASE_URL=empty_database),
        )
    finally:
        broken.rename(migrations)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "migration scripts missing" in lines[0]
    assert str(migrations) in lines[0]
