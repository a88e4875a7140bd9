"""Developer sessions: tests, deep, lint, typecheck, proto, proto_check, inspector, serve, bench.

Every session installs what it needs into its own virtualenv from the pins in the root
``pyproject.toml`` (dependency groups) and the two packages' own metadata, so a machine with
only Python 3.11+ and nox can run all of them.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import tempfile
from pathlib import Path

import nox

nox.options.sessions = ["lint", "typecheck", "proto_check", "tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = False

ROOT = Path(__file__).parent
PYPROJECT = nox.project.load_toml(ROOT / "pyproject.toml")
PROTO_ROOT = ROOT / "proto"
PROTO_FILES = sorted(str(p) for p in (PROTO_ROOT / "openagents/sync/v1").glob("*.proto"))
GENERATED = ROOT / "packages/oa_sync_core/src/oa_sync_core/contracts/v1.py"
JS_PACKAGE = ROOT / "packages/oa-sync-js"
GENERATED_TS = JS_PACKAGE / "src/gen"
"""protobuf-es output (``*_pb.ts``), committed beside the TypeScript client."""
INSPECTOR_ASSET = ROOT / "packages/oa_sync_server/src/oa_sync_server/static/inspector.js"
"""The inspector page's bundle (esbuild of packages/oa-sync-js/inspector), shipped in the wheel."""
PACKAGES = [
    "-e",
    "packages/oa_sync_core",
    "-e",
    "packages/oa_sync_client",
    "-e",
    "packages/oa_sync_server[embedded]",
]


def _install(session: nox.Session, *groups: str, packages: bool = True) -> None:
    requirements: list[str] = []
    for group in groups:
        requirements += nox.project.dependency_groups(PYPROJECT, group)
    if packages:
        session.install(*PACKAGES, *requirements)
    else:
        session.install(*requirements)


@nox.session
def tests(session: nox.Session) -> None:
    """Run the whole test suite with line and branch coverage, failing under the floor.

    Real Postgres: see tests/pg.py for how it is found. The floor is
    ``[tool.coverage.report] fail_under`` in pyproject.toml. Arguments (``nox -s tests --
    tests/core -x``) run just those tests, without the coverage floor. The TypeScript client's
    `npm test` and the browser tests run inside it (tests/web) against a real `oa-sync serve`;
    their pinned npm tools are installed here first.
    """
    _install(session, "test")
    _npm_ci(session)
    if session.posargs:
        session.run("pytest", *session.posargs)
        return
    session.run("pytest", "--cov", "--cov-report=term", "--cov-report=xml:coverage.xml")


@nox.session
def deep(session: nox.Session) -> None:
    """The property tests with the ``deep`` Hypothesis profile: 10x examples, random seeds.

    Runs the tests that use Hypothesis (the core's folds, codecs and state machines, the token
    verifier, the malformed-frame and OpenAPI campaigns); see tests/profiles.py.
    """
    _install(session, "test")
    tests = sorted(
        str(path.relative_to(ROOT))
        for path in (ROOT / "tests").rglob("test_*.py")
        if "from hypothesis" in path.read_text(encoding="utf-8")
    )
    args = session.posargs or tests
    session.run("pytest", "--timeout=1800", *args, env={"HYPOTHESIS_PROFILE": "deep"})


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff lint and format check on the whole tree."""
    _install(session, "lint", packages=False)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on both packages (configuration in pyproject.toml)."""
    _install(session, "typecheck")
    session.run("mypy")


def _generate(session: nox.Session, out_file: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # The betterproto plugin must be on PATH for protoc to find it.
        bin_dir = Path(session.bin)
        env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
        session.run(
            "python",
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_betterproto_out={tmp}",
            *PROTO_FILES,
            env=env,
            silent=True,
        )
        source = Path(tmp) / "openagents/sync/v1/__init__.py"
        out_file.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, out_file)
    session.run("ruff", "format", "--quiet", "--isolated", str(out_file))


def _npm_ci(session: nox.Session) -> None:
    """Install the TypeScript package's pinned tools (package-lock.json) once per session."""
    with session.chdir(JS_PACKAGE):
        session.run(
            "npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund", external=True, silent=True
        )


def _generate_ts(session: nox.Session, out_dir: Path) -> None:
    """protobuf-es bindings of proto/ into ``out_dir`` (run by grpcio-tools' protoc)."""
    plugin = JS_PACKAGE / "node_modules/.bin/protoc-gen-es"
    out_dir.mkdir(parents=True, exist_ok=True)
    session.run(
        "python",
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--plugin=protoc-gen-es={plugin}",
        f"--es_out={out_dir}",
        "--es_opt=target=ts,import_extension=js",
        *PROTO_FILES,
        silent=True,
    )


def _same_tree(left: Path, right: Path) -> bool:
    """Whether two directories hold the same files with the same bytes."""
    names = {p.relative_to(left) for p in left.rglob("*") if p.is_file()}
    if names != {p.relative_to(right) for p in right.rglob("*") if p.is_file()}:
        return False
    return all(filecmp.cmp(left / n, right / n, shallow=False) for n in names)


@nox.session
def proto(session: nox.Session) -> None:
    """Regenerate both bindings from proto/: betterproto (Python) and protobuf-es (TypeScript)."""
    _install(session, "proto", packages=False)
    _npm_ci(session)
    _generate(session, GENERATED)
    shutil.rmtree(GENERATED_TS, ignore_errors=True)
    _generate_ts(session, GENERATED_TS)


@nox.session
def proto_check(session: nox.Session) -> None:
    """Fail when either committed binding (Python or TypeScript) differs from a fresh one."""
    _install(session, "proto", packages=False)
    _npm_ci(session)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "v1.py"
        _generate(session, fresh)
        if not filecmp.cmp(fresh, GENERATED, shallow=False):
            session.error(
                f"{GENERATED.relative_to(ROOT)} is stale: run `nox -s proto` and commit the result"
            )
        fresh_ts = Path(tmp) / "gen"
        _generate_ts(session, fresh_ts)
        if not _same_tree(fresh_ts, GENERATED_TS):
            stale = GENERATED_TS.relative_to(ROOT)
            session.error(f"{stale} is stale: run `nox -s proto` and commit the result")


@nox.session
def inspector(session: nox.Session) -> None:
    """Bundle the inspector page (esbuild, pinned in package-lock.json) into the server's
    static/inspector.js; tests/web/test_inspector_asset.py proves the committed file fresh."""
    _npm_ci(session)
    with session.chdir(JS_PACKAGE):
        session.run("node", "scripts/build-inspector.mjs", str(INSPECTOR_ASSET), external=True)


@nox.session
def serve(session: nox.Session) -> None:
    """Run `oa-sync serve --demo` on the embedded Postgres (or OA_SYNC_DATABASE_URL)."""
    session.install(*PACKAGES)
    session.run("oa-sync", "serve", "--demo", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Run the benchmarks in bench/ and write bench/results/*.json."""
    _install(session, "bench")
    session.run("python", "bench/run_all.py", *session.posargs)
