"""A CI check: no SQL is built by string formatting anywhere in the packages.

SQL reaches Postgres only through SQLAlchemy constructs or ``text()`` with bound parameters.
This test walks the syntax tree of every module and fails on a call to ``text``,
``execute``, ``exec_driver_sql``, ``executemany`` or psycopg's ``sql.SQL`` whose statement is
an f-string, a ``%``/``+`` expression or a ``.format()`` call.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(
    p
    for base in (
        "packages/oa_sync_core/src",
        "packages/oa_sync_server/src",
        "packages/oa_sync_client/src",
        "bench",
    )
    for p in (ROOT / base).rglob("*.py")
    if "contracts" not in p.parts
)
SQL_CALLS = {"text", "execute", "exec_driver_sql", "executemany", "SQL", "executescript"}


def _call_name(node: ast.Call) -> str | None:
    if isinstance(node.func, ast.Name):
        return node.func.id
    if isinstance(node.func, ast.Attribute):
        return node.func.attr
    return None


def _is_formatted(node: ast.expr) -> bool:
    if isinstance(node, ast.JoinedStr):
        return any(isinstance(v, ast.FormattedValue) for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod | ast.Add):
        return isinstance(node.left, ast.Constant | ast.JoinedStr | ast.BinOp) or isinstance(
            node.right, ast.Constant | ast.JoinedStr
        )
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return node.func.attr == "format" and isinstance(node.func.value, ast.Constant)
    return False


def formatted_sql(source: str, filename: str) -> list[str]:
    """Places in ``source`` where an SQL call receives a formatted string."""
    return [
        f"{filename}:{node.lineno}"
        for node in ast.walk(ast.parse(source, filename))
        if isinstance(node, ast.Call)
        and _call_name(node) in SQL_CALLS
        and node.args
        and _is_formatted(node.args[0])
    ]


@pytest.mark.parametrize(
    ("snippet", "bad"),
    [
        ('conn.execute(text(f"select * from t where k = {k}"))', True),
        ('conn.execute(text("select * from t where k = %s" % k))', True),
        ('conn.execute(text("select * from t where k = {}".format(k)))', True),
        ('cur.execute("select " + col)', True),
        ('conn.execute(text("select * from t where k = :k"), {"k": k})', False),
        ("conn.execute(select(table).where(table.c.k == k))", False),
    ],
)
def test_checker_tells_formatted_sql_from_parameters(snippet: str, bad: bool) -> None:
    """The checker flags each way of formatting SQL and passes parameterised statements."""
    assert bool(formatted_sql(snippet, "<snippet>")) is bad


def test_no_sql_is_built_by_string_formatting() -> None:
    """No module of the packages, migrations or benchmarks formats SQL text."""
    offenders = [
        hit
        for path in SOURCES
        for hit in formatted_sql(path.read_text("utf-8"), str(path.relative_to(ROOT)))
    ]
    assert offenders == []
