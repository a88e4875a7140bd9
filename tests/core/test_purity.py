"""The core stays pure: importing it loads no I/O framework, driver, logger or JWT library."""

from __future__ import annotations

import json
import subprocess
import sys

import oa_sync_core

FORBIDDEN = ("aiohttp", "sqlalchemy", "psycopg", "structlog", "jwt", "asyncpg")
"""orjson is allowed since issue 13: a C extension, not a framework (canonical bytes at C speed)."""


def test_importing_the_core_loads_no_framework() -> None:
    """Every public module of oa_sync_core imports with none of the forbidden packages."""
    code = (
        "import json, sys, pkgutil, importlib, oa_sync_core\n"
        "for m in pkgutil.walk_packages(oa_sync_core.__path__, 'oa_sync_core.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(  # noqa: S603 - runs this interpreter on a literal
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    loaded = json.loads(out)
    offenders = [m for m in loaded if m.split(".")[0] in FORBIDDEN]
    assert offenders == []


def test_all_is_honest() -> None:
    """The public API lists each name once and only names that exist (ruff RUF022 sorts it)."""
    assert len(set(oa_sync_core.__all__)) == len(oa_sync_core.__all__)
    for name in oa_sync_core.__all__:
        assert hasattr(oa_sync_core, name), name
