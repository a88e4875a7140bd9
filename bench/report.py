"""Render bench/results/*.json as Markdown tables (for docs/benchmarks.md and the README).

Usage: ``python bench/report.py [--write docs/benchmarks.md]``. Without ``--write`` the tables
go to stdout. With it, the text between ``<!-- results:begin -->`` and
``<!-- results:end -->`` in that file is replaced, so hand-written notes around the tables
stay as they are and the figures always come from the result files.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import RESULTS  # noqa: E402
from run_all import BENCHMARKS  # noqa: E402

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _number(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def render(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: the machine, one verdict table for every target, then each benchmark's figures."""
    lines: list[str] = []
    if not results:
        return "_No results yet: run `nox -s bench`._\n"
    with_db = [d for d in results.values() if "postgres" in d["machine"]]
    m = (with_db or list(results.values()))[0]["machine"]
    lines += [
        f"Machine: {m.get('cores')} cores ({m.get('cpu')}), {m.get('memory_gib')} GiB, "
        f"Python {m.get('python')}, Postgres {m.get('postgres', 'n/a')} "
        f"({m.get('postgres_cluster', 'n/a')}); {m.get('platform')}.",
        "",
        "| benchmark | target | figure | bound | verdict | measured (UTC) | load avg 1/5/15 |",
        "|---|---|---:|---|---|---|---|",
    ]
    for name, doc in results.items():
        load = doc["machine"].get("load_average", [])
        for t in doc["targets"]:
            bound = f"≥ {t['at_least']:,}" if t["at_least"] is not None else f"≤ {t['at_most']:,}"
            lines.append(
                f"| {name} | {t['label']} | {_number(t['figure'])} {t['unit']} | {bound} "
                f"{t['unit']} | **{t['verdict']}** | {doc['measured_at']} | "
                f"{' / '.join(str(x) for x in load)} |"
            )
    for name, doc in results.items():
        mode = " (--quick: NOT the full parameters)" if doc["parameters"].get("quick") else ""
        lines += ["", f"### {name}{mode}", ""]
        params = ", ".join(
            f"{k}={v}" for k, v in doc["parameters"].items() if not isinstance(v, dict | list)
        )
        lines += [f"Parameters: {params}.", "", "| figure | value |", "|---|---:|"]
        lines += [f"| {k} | {_number(v)} |" for k, v in doc["figures"].items()]
        lines += [f"| baseline: {k} | {_number(v)} |" for k, v in doc["baseline"].items()]
        if doc.get("plot"):
            lines += ["", f"![{name}](../bench/results/{doc['plot']})"]
        for note in doc.get("notes", []):
            lines += ["", f"> {note}"]
    return "\n".join(lines) + "\n"


def load() -> dict[str, dict[str, Any]]:
    """Every result file present, in the suite's order."""
    found: dict[str, dict[str, Any]] = {}
    for name in BENCHMARKS:
        path = RESULTS / f"{name}.json"
        if path.exists():
            found[name] = json.loads(path.read_text("utf-8"))
    return found


def main(argv: list[str] | None = None) -> int:
    """Print the tables, or splice them into a Markdown file between the markers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="Markdown file holding the markers")
    args = parser.parse_args(argv)
    text = render(load())
    if args.write is None:
        print(text)
        return 0
    doc = args.write.read_text("utf-8")
    if BEGIN not in doc or END not in doc:
        print(f"{args.write}: markers {BEGIN} / {END} not found", file=sys.stderr)
        return 2
    head, _, rest = doc.partition(BEGIN)
    _, _, tail = rest.partition(END)
    args.write.write_text(f"{head}{BEGIN}\n{text}{END}{tail}", "utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
