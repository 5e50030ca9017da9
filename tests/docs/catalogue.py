"""What docs/operations.md must list, read from the code: every structlog event name with
its level, the modules that log it and the fields they pass, and every configuration key.

``python -m tests.docs.catalogue`` prints the event table's rows (markdown) for pasting, with
``-`` where the catalogue's "when" column needs a human's words.
"""

import ast
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).parents[2]
PACKAGES: Final = ("protocol", "runtime", "fog", "cloud", "edge", "fogpay")
LEVELS: Final = frozenset({"debug", "info", "warning", "error", "exception", "critical"})
EVENT_NAME: Final = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)+")
OPERATIONS_MD: Final = ROOT / "docs" / "operations.md"


@dataclass(slots=True)
class Event:
    levels: set[str] = field(default_factory=set)
    modules: set[str] = field(default_factory=set)
    fields: set[str] = field(default_factory=set)


def source_files() -> Iterator[Path]:
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def code_events() -> dict[str, Event]:
    """Calls ``<x>.<level>("snake_case_event", key=...)``: structlog's shape. stdlib logging
    messages are sentences, never a bare snake_case name, so they do not match."""
    events: dict[str, Event] = {}
    for path in source_files():
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in LEVELS
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
                and EVENT_NAME.fullmatch(node.args[0].value)
            ):
                continue
            e = events.setdefault(node.args[0].value, Event())
            e.levels.add("error" if node.func.attr == "exception" else node.func.attr)
            e.modules.add(module)
            e.fields.update(k.arg for k in node.keywords if k.arg is not None)
    return events


def code_strings() -> set[str]:
    """Every string literal in the code (an event logged through a variable is one)."""
    out: set[str] = set()
    for path in source_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.add(node.value)
    return out


def _section(text: str, title: str) -> str:
    """The text under the ``## [N. ]title`` heading, up to the next ``## `` heading."""
    match = re.search(rf"^## (\d+\. )?{re.escape(title)}$", text, re.M)
    assert match is not None, f"docs/operations.md: no section {title!r}"
    end = text.find("\n## ", match.end())
    return text[match.end() : end if end != -1 else len(text)]


def table_rows(text: str) -> list[list[str]]:
    """Markdown table rows whose first cell is a `code` name, as lists of cells."""
    rows = []
    for line in text.splitlines():
        if line.startswith("| `"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def catalogue(text: str | None = None) -> dict[str, list[str]]:
    """docs/operations.md's event catalogue: event -> its row's cells."""
    text = OPERATIONS_MD.read_text() if text is None else text
    rows = table_rows(_section(text, "Log event catalogue"))
    return {r[0].split("`")[1]: r for r in rows}


def config_reference(component: str, text: str | None = None) -> dict[str, list[str]]:
    """docs/operations.md's configuration reference of ``fog`` or ``cloud``: key -> cells."""
    text = OPERATIONS_MD.read_text() if text is None else text
    part = _section(text, "Configuration reference")
    start = part.index(f"\n### {component} ")
    end = part.find("\n### ", start + 1)
    rows = table_rows(part[start : end if end != -1 else len(part)])
    return {r[0].split("`")[1]: r for r in rows}


def _main() -> int:
    events = code_events()
    have = catalogue() if OPERATIONS_MD.exists() else {}
    only_missing = "--missing" in sys.argv
    for name in sorted(events):
        if only_missing and name in have:
            continue
        e = events[name]
        fields = ", ".join(f"`{f}`" for f in sorted(e.fields)) or "-"
        modules = ", ".join(sorted(m.rsplit(".", 1)[-1] if "." in m else m for m in e.modules))
        print(f"| `{name}` | {'/'.join(sorted(e.levels))} | {modules} | {fields} | - |")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
