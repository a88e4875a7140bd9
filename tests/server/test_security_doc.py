"""docs/security.md stays true to the code: every close code, status, limit and refusal reason."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from oa_sync_core.protocol.codes import CloseCode, LimitKind
from oa_sync_server import errors
from oa_sync_server.config import ENV_PREFIX, Limits
from oa_sync_server.errors import AuthFailure, ErrorMapping

DOC = Path(__file__).resolve().parents[2] / "docs" / "security.md"
CONFIG_SOURCE = Path(errors.__file__).with_name("config.py").read_text()


def section(title: str) -> list[str]:
    """The table rows of the section headed ``## title``."""
    text = DOC.read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"docs/security.md has no section {title!r}"
    return [line for line in match.group(1).splitlines() if line.startswith("|")]


def cells(row: str) -> list[str]:
    return [cell.strip() for cell in row.strip("|").split("|")]


def all_mappings() -> list[ErrorMapping]:
    """Every ErrorMapping errors.py can return: its module constants and table values."""
    found: list[ErrorMapping] = []
    for value in vars(errors).values():
        candidates = value.values() if isinstance(value, dict) else [value]
        found.extend(v for v in candidates if isinstance(v, ErrorMapping))
    found.extend(errors.classify(errors.LimitExceededError(kind, 1)) for kind in LimitKind)
    return found


def all_close_codes() -> set[int]:
    codes = {int(c) for c in CloseCode}
    codes |= {m.close_code for m in all_mappings() if m.close_code is not None}
    return codes


def test_every_close_code_is_documented_with_its_error_code() -> None:
    """Each protocol close code has a row naming the error codes errors.py maps onto it."""
    rows = {int(cells(r)[0]): cells(r)[1] for r in section("Close codes") if cells(r)[0].isdigit()}
    assert all_close_codes() <= set(rows), sorted(all_close_codes() - set(rows))
    assert set(rows) <= all_close_codes(), sorted(set(rows) - all_close_codes())
    for mapping in all_mappings():
        if mapping.close_code is not None:
            assert f"`{mapping.code}`" in rows[mapping.close_code], mapping


def test_every_http_status_is_documented_with_its_error_code() -> None:
    """Each (status, code) pair errors.py can produce has a row in the HTTP table."""
    rows = {(cells(r)[0], cells(r)[1]) for r in section("HTTP statuses") if cells(r)[0].isdigit()}
    for mapping in all_mappings():
        assert (str(mapping.status), f"`{mapping.code}`") in rows, mapping


def test_the_server_table_maps_only_to_protocol_close_codes() -> None:
    """errors.classify never closes with a code the protocol vocabulary lacks."""
    mapped = {m.close_code for m in all_mappings() if m.close_code is not None}
    assert mapped <= {int(code) for code in CloseCode}


def test_every_limit_is_documented_with_variable_and_default() -> None:
    """Each Limits field's variable appears with its default; each LimitKind has a row."""
    text = DOC.read_text()
    rows = section("Limits")
    kinds = {cells(r)[0].strip("`") for r in rows}
    assert {kind.value for kind in LimitKind} <= kinds
    for field in dataclasses.fields(Limits):
        variable = ENV_PREFIX + field.name.upper()
        assert variable in text, variable
        assert f'"{field.name.upper()}"' in CONFIG_SOURCE, f"{variable} is not read by config"
        default = field.default
        shown = f"{default:g}" if isinstance(default, float) else str(default)
        holding = [line for line in text.splitlines() if variable in line]
        assert any(shown in line for line in holding), (variable, shown)


def test_every_refusal_reason_is_documented() -> None:
    """Each AuthFailure reason has a row in the refusal table."""
    reasons = {cells(r)[0].strip("`") for r in section("Authentication")}
    assert {reason.value for reason in AuthFailure} <= reasons
