"""The docs are true to the code: variables, commands, flags, links and close codes.

Fast and database-free. What it proves:

- every ``OA_SYNC_*`` variable the packages read is documented in docs/configuration.md, and
  every variable named there (or anywhere in README.md and docs/*.md) is read somewhere;
- every ``oa-sync`` sub-command appears in README.md, every ``oa-sync <word>`` in the docs is a
  real sub-command, and every ``--flag`` shown after it on the same line exists in its parser;
- every relative Markdown link in README.md and docs/*.md points to an existing file;
- every close code (4xxx) named in docs/protocol.md or docs/security.md is in
  :mod:`oa_sync_server.errors`' table;
- every endpoint written as `` `GET /path` `` in the docs is a route the server registers;
- every `nox -s <session>` named in the docs is a session of noxfile.py;
- the Python example of README.md runs and prints the run summary it promises;
- the defaults, ranges and choices in docs/configuration.md's tables are what the code does:
  setting a variable to its documented default changes nothing, both ends of a documented range
  are accepted and the values just outside are refused, every documented choice is accepted.

What it does not prove: that the prose around those names is right.
"""

from __future__ import annotations

import argparse
import ast
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Final

import pytest
from oa_sync_core.protocol.codes import CloseCode
from oa_sync_server import errors
from oa_sync_server.cli import build_parser
from oa_sync_server.config import ENV_PREFIX, Settings
from oa_sync_server.errors import ConfigError
from oa_sync_server.sinks.selection import plan_sinks

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
MARKDOWN = [ROOT / "README.md", *DOCS]
CONFIGURATION = ROOT / "docs" / "configuration.md"
PACKAGE_SOURCES = sorted(
    p
    for base in (
        "packages/oa_sync_core/src",
        "packages/oa_sync_client/src",
        "packages/oa_sync_server/src",
    )
    for p in (ROOT / base).rglob("*.py")
    if "contracts" not in p.parts
)
# Sources whose variables are not the server's but may be named in the docs.
OTHER_SOURCES = sorted(
    [ROOT / "noxfile.py", *(ROOT / "tests").rglob("*.py"), *(ROOT / "bench").rglob("*.py")]
)

VARIABLE = re.compile(r"\bOA_SYNC_[A-Z0-9][A-Z0-9_]*[A-Z0-9]\b")
COMMAND = re.compile(r"(?<![\w./-])oa-sync ([a-z][a-z-]*)")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# "closes with 4400", "closed 4429", "close 4408": a code named after the word close.
CLOSE_CODE = re.compile(r"\bclose[sd]?\b[^.|;]{0,30}?\b(4\d{3})\b", re.IGNORECASE)
CLOSE_TABLE_ROW = re.compile(r"^\|\s*(4\d{3})\s*\|", re.MULTILINE)
ENDPOINT = re.compile(r"`(GET|POST|PUT|PATCH|DELETE) (/[^`\s?]*)")
ROUTE_CALLS = {"add_get": "GET", "add_post": "POST", "add_put": "PUT", "add_delete": "DELETE"}


class _RecordingEnviron(Mapping[str, str]):
    """An environment that remembers every variable looked up in it."""

    def __init__(self, values: Mapping[str, str]):
        self._values = dict(values)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def _settings_variables() -> set[str]:
    """The variables ``Settings.from_env`` and ``plan_sinks`` read, by running them."""
    read: set[str] = set()
    for values in (
        {},
        {
            "OA_SYNC_SINK": "tee",
            "OA_SYNC_HTTP_SINK_URL": "http://127.0.0.1:9/sink",
            "OA_SYNC_HTTP_SINK_SECRET": "s" * 40,
        },
    ):
        environ = _RecordingEnviron(values)
        plan_sinks(Settings.from_env(environ), environ)
        read |= environ.read
    return read


def _string_constants(paths: list[Path]) -> set[str]:
    """``"OA_SYNC_X"`` literals and ``ENV_PREFIX + "X"`` expressions in the sources."""
    found: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if VARIABLE.fullmatch(node.value):
                    found.add(node.value)
            elif (
                isinstance(node, ast.BinOp)
                and isinstance(node.op, ast.Add)
                and isinstance(node.left, ast.Name)
                and node.left.id == "ENV_PREFIX"
                and isinstance(node.right, ast.Constant)
                and isinstance(node.right.value, str)
            ):
                found.add(ENV_PREFIX + node.right.value)
    return found


def _code_variables() -> set[str]:
    return _settings_variables() | _string_constants(PACKAGE_SOURCES)


def _prose(path: Path) -> str:
    """The text of a Markdown file; fenced code blocks are kept (commands live there)."""
    return path.read_text(encoding="utf-8")


def _without_fences(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)


def _sub_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of a parser and of its nested sub-parsers (``dead-letters list``)."""
    options = {o for action in parser._actions for o in action.option_strings}
    for child in _sub_parsers(parser).values():
        options |= _options(child)
    return options


COMMANDS = _sub_parsers(build_parser())


def _command_mentions() -> Iterator[tuple[str, int, str, str]]:
    """``(file, line number, sub-command, the rest of its command line)`` for each mention.

    The rest is the command line: inside inline code up to its closing backtick, on a line of a
    fenced block up to a pipe, ``&&``, ``;`` or comment; in plain prose it is empty.
    """
    for path in MARKDOWN:
        fenced = False
        for number, line in enumerate(_prose(path).splitlines(), start=1):
            fenced ^= line.startswith("```")
            for match in COMMAND.finditer(line):
                rest = line[match.end() :]
                if line.count("`", 0, match.start()) % 2 == 1:
                    rest = rest.split("`", 1)[0]
                elif not fenced:
                    rest = ""
                rest = re.split(r"\s(?:\||&&|;|#)\s", rest, maxsplit=1)[0]
                yield path.name, number, match.group(1), rest


def test_the_settings_scan_finds_the_variables() -> None:
    """The scan itself works: a sample of well-known variables is among those found."""
    found = _code_variables()
    assert {
        "OA_SYNC_DATABASE_URL",
        "OA_SYNC_PORT",
        "OA_SYNC_JWT_HS256_SECRET",
        "OA_SYNC_MAX_MESSAGE_BYTES",
        "OA_SYNC_HTTP_SINK_MAX_ATTEMPTS",
        "OA_SYNC_TOKEN",
    } <= found
    assert len(found) >= 40


def test_every_variable_read_is_documented() -> None:
    documented = set(VARIABLE.findall(_prose(CONFIGURATION)))
    missing = sorted(_code_variables() - documented)
    assert not missing, f"read in the code but not in docs/configuration.md: {missing}"


def test_every_documented_variable_is_read() -> None:
    known = _code_variables() | _string_constants(OTHER_SOURCES)
    unknown = {
        f"{path.name}: {name}"
        for path in MARKDOWN
        for name in VARIABLE.findall(_prose(path))
        if name not in known
    }
    assert not unknown, f"named in the docs but read nowhere: {sorted(unknown)}"


def test_every_sub_command_is_in_the_readme() -> None:
    named = set(COMMAND.findall(_prose(ROOT / "README.md")))
    missing = sorted(set(COMMANDS) - named)
    assert not missing, f"oa-sync sub-commands missing from README.md: {missing}"


def test_every_sub_command_named_in_the_docs_exists() -> None:
    unknown = [
        f"{name}:{number}: oa-sync {command}"
        for name, number, command, _ in _command_mentions()
        if command not in COMMANDS
    ]
    assert not unknown, f"not an oa-sync sub-command: {unknown}"


def test_every_flag_shown_exists() -> None:
    mentions = list(_command_mentions())
    assert mentions
    wrong = [
        f"{name}:{number}: oa-sync {command} {flag}"
        for name, number, command, rest in mentions
        if command in COMMANDS
        for flag in FLAG.findall(rest)
        if flag not in _options(COMMANDS[command])
    ]
    assert not wrong, f"flags the parser does not have: {wrong}"


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: p.name)
def test_relative_links_resolve(path: Path) -> None:
    broken = []
    for target in LINK.findall(_without_fences(_prose(path))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # absolute URL, mailto:, or an anchor in the same file
        file_part = target.split("#", 1)[0]
        if not (path.parent / file_part).exists():
            broken.append(target)
    assert not broken, f"{path.name}: links to missing files: {broken}"


def _close_codes_in_table() -> set[int]:
    codes: set[object] = {int(code) for code in CloseCode}
    for value in vars(errors).values():
        mappings = value.values() if isinstance(value, dict) else [value]
        codes |= {m.close_code for m in mappings if isinstance(m, errors.ErrorMapping)}
    return {c for c in codes if isinstance(c, int)}


@pytest.mark.parametrize("name", ["protocol.md", "security.md"])
def test_close_codes_in_the_docs_exist(name: str) -> None:
    text = " ".join(_prose(ROOT / "docs" / name).split())  # a code may follow a line break
    named = {int(c) for c in CLOSE_CODE.findall(text)}
    named |= {int(c) for c in CLOSE_TABLE_ROW.findall(_prose(ROOT / "docs" / name))}
    assert len(named) >= 4, f"found too few close codes in docs/{name}: {sorted(named)}"
    unknown = sorted(named - _close_codes_in_table())
    assert not unknown, (
        f"docs/{name} names close codes oa_sync_core.protocol.codes lacks: {unknown}"
    )


def _routes() -> set[tuple[str, str]]:
    """``(method, path template)`` of every ``router.add_get("/path", ...)``-style call."""
    constants: dict[str, str] = {}
    routes: set[tuple[str, str]] = set()
    for path in PACKAGE_SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.AnnAssign | ast.Assign)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
            ):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Name):
                        constants[target.id] = node.value.value
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ROUTE_CALLS
                and node.args
            ):
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    routes.add((ROUTE_CALLS[node.func.attr], arg.value))
                elif isinstance(arg, ast.Name) and arg.id in constants:
                    routes.add((ROUTE_CALLS[node.func.attr], constants[arg.id]))
    return routes


def _route_pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[^}]*\})", template)
    regex = "".join(
        (".+" if ":.+" in part else "[^/]+") if part.startswith("{") else re.escape(part)
        for part in parts
    )
    return re.compile(regex)


def test_every_endpoint_named_in_the_docs_exists() -> None:
    routes = _routes()
    assert ("GET", "/v1/sync") in routes
    assert ("POST", "/v1/events") in routes
    patterns = {(method, _route_pattern(template)) for method, template in routes}
    unknown = set()
    named = 0
    for path in MARKDOWN:
        for method, target in ENDPOINT.findall(_prose(path)):
            named += 1
            concrete = re.sub(r"\{[^}]*\}", "x", target)
            if not any(m == method and p.fullmatch(concrete) for m, p in patterns):
                unknown.add(f"{path.name}: {method} {target}")
    assert named >= 5
    assert not unknown, f"endpoints the server does not register: {sorted(unknown)}"


def test_the_readme_library_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    blocks = re.findall(r"^```python\n(.*?)^```", _prose(ROOT / "README.md"), re.M | re.S)
    assert blocks, "README.md lost its Python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme_example"})  # noqa: S102
    printed = capsys.readouterr().out
    assert "'runId': 'r1'" in printed
    assert "'progressPercent': 40" in printed


# A complete tee configuration, so the HTTP sink's extra variables are read too.
TEE_ENV: Final = {
    "OA_SYNC_SINK": "tee",
    "OA_SYNC_HTTP_SINK_URL": "http://127.0.0.1:9/sink",
    "OA_SYNC_HTTP_SINK_SECRET": "s" * 40,
}
TABLE_ROW = re.compile(r"^\| `(OA_SYNC_[A-Z0-9_]+)` \|[^|]*\| ([^|]*) \| ([^|]*) \|$", re.M)
RANGE = re.compile(r"(integer )?([0-9][0-9.]*) \u2013 ([0-9][0-9.]*)")  # an en dash


def _configured(environ: Mapping[str, str]) -> tuple[object, object]:
    settings = Settings.from_env(environ)
    return settings, plan_sinks(settings, environ)


def _configuration_rows() -> list[tuple[str, str, str]]:
    """``(variable, default cell, valid-values cell)`` of the tables read by ``Settings``."""
    read = _settings_variables()
    rows = [row for row in TABLE_ROW.findall(_prose(CONFIGURATION)) if row[0] in read]
    assert len(rows) >= 35
    return rows


def test_documented_defaults_are_the_defaults() -> None:
    checked = 0
    for variable, default, _ in _configuration_rows():
        literal = re.match(r"`([^`]+)`", default)
        if literal is None or literal.group(1).startswith(ENV_PREFIX):
            continue  # "unset", "the defaults", or another variable's value
        base = {k: v for k, v in TEE_ENV.items() if k != variable}
        assert _configured({**base, variable: literal.group(1)}) == _configured(base), variable
        checked += 1
    assert checked >= 30


def test_documented_ranges_and_choices_are_enforced() -> None:
    checked = 0
    for variable, _, valid in _configuration_rows():
        accepted: list[str] = []
        refused: list[str] = []
        if (found := RANGE.fullmatch(valid)) is not None:
            integer, low, high = found.groups()
            accepted = [low, high]
            if integer:
                refused = [str(int(low) - 1), str(int(high) + 1), f"{low}.5"]
            else:
                refused = [repr(float(low) - 0.5), repr(float(high) + 0.5)]
        elif valid.startswith("`") and "://" not in valid:
            accepted = re.findall(r"`([^`]+)`", valid)
            refused = ["no-such-choice"]
        else:
            continue
        for value in accepted:
            _configured({**TEE_ENV, variable: value})
        for value in refused:
            with pytest.raises(ConfigError, match=variable) as refusal:
                _configured({**TEE_ENV, variable: value})
            assert refusal.value.variable == variable, f"{variable}={value}"
        checked += 1
    assert checked >= 25


def _nox_sessions() -> set[str]:
    tree = ast.parse((ROOT / "noxfile.py").read_text(encoding="utf-8"))
    return {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef)
        for decorator in node.decorator_list
        if "nox.session" in ast.unparse(decorator)
    }


def test_every_nox_session_named_exists() -> None:
    sessions = _nox_sessions()
    assert {"tests", "serve"} <= sessions
    unknown = set()
    for path in MARKDOWN:
        fenced = False
        for line in _prose(path).splitlines():
            fenced ^= line.startswith("```")
            for match in re.finditer(r"nox -s ([a-z_]+(?: [a-z_]+)*)(`|\s*$|\s+#)?", line):
                # Several sessions only in code: inline up to a backtick, or a fenced line up to
                # a comment or its end. In prose the words after the first are prose.
                names = match.group(1).split()
                code = match.group(2) == "`" or (fenced and match.group(2) is not None)
                for name in names if code else names[:1]:
                    if name not in sessions:
                        unknown.add(f"{path.name}: {name}")
    assert not unknown, f"not a nox session: {sorted(unknown)}"
