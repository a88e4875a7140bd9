"""One error tree per distribution: every exception class lives in its ``errors`` module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTIONS = {
    "oa_sync_core": ROOT / "packages/oa_sync_core/src/oa_sync_core",
    "oa_sync_client": ROOT / "packages/oa_sync_client/src/oa_sync_client",
    "oa_sync_server": ROOT / "packages/oa_sync_server/src/oa_sync_server",
}
# A queue sentinel, never raised to a caller.
NOT_ERRORS = {"SubscriptionClosed"}


def _exception_classes(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        bases = [ast.unparse(b) for b in node.bases]
        if any(b.endswith(("Error", "Exception", "Conflict", "Lost")) for b in bases):
            found.append(node.name)
    return found


@pytest.mark.parametrize("package", sorted(DISTRIBUTIONS))
def test_every_error_class_is_defined_in_the_errors_module(package: str) -> None:
    """No module but ``errors`` defines an exception class (the tree is in one place)."""
    base = DISTRIBUTIONS[package]
    stray = {
        f"{path.relative_to(base)}:{name}"
        for path in base.rglob("*.py")
        if path.name != "errors.py" and "contracts" not in path.parts
        for name in _exception_classes(path)
        if name not in NOT_ERRORS
    }
    assert not stray, sorted(stray)


@pytest.mark.parametrize("package", sorted(DISTRIBUTIONS))
def test_the_errors_docstring_draws_every_class(package: str) -> None:
    """The tree drawn in the errors module's docstring names each class it defines."""
    path = DISTRIBUTIONS[package] / "errors.py"
    module = ast.parse(path.read_text())
    doc = ast.get_docstring(module) or ""
    defined = {*_exception_classes(path), "OaSyncError"}
    classes = [n.name for n in module.body if isinstance(n, ast.ClassDef) and n.name in defined]
    missing = [name for name in classes if name not in doc]
    assert classes
    assert not missing, missing
