"""The layering of issue 10: no circle of imports, and the arrows point down.

protocol <- runtime <- {fog, cloud, edge} <- fogpay. Every import statement counts, also one
inside a function (it is an edge the moment that function runs)."""

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("protocol", "runtime", "fog", "cloud", "edge", "fogpay")
ALLOWED = {
    "protocol": set(),
    "runtime": {"protocol"},
    "fog": {"protocol", "runtime"},
    "cloud": {"protocol", "runtime"},
    "edge": {"protocol", "runtime"},
    "fogpay": set(PACKAGES),
}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names
                ]
            for target in targets:
                resolved = resolve(target)
                if resolved and resolved != name:
                    edges[name].add(resolved)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles() -> None:
    assert cycles(graph()) == []


def test_imports_point_down() -> None:
    forbidden = [
        f"{src} -> {dst}"
        for src, dsts in sorted(graph().items())
        for dst in sorted(dsts)
        if src.split(".")[0] != dst.split(".")[0]
        and dst.split(".")[0] not in ALLOWED[src.split(".")[0]]
    ]
    assert forbidden == []


def test_checker_sees_a_circle_and_a_forbidden_edge() -> None:
    """The checker itself can fail: a planted circle and an upward edge are found."""
    edges = {"fog.a": {"fog.b"}, "fog.b": {"fog.a", "fogpay.cli"}}
    assert cycles(edges) == [["fog.a", "fog.b"]]
    assert "fogpay" not in ALLOWED["fog"]


def test_protocol_loads_no_io_and_no_upper_layer() -> None:
    code = (
        "import sys, protocol, protocol.messages, protocol.signing, protocol.batch;"
        "import protocol.leasing, protocol.merkle, protocol.topics;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in"
        " {'asyncio', 'runtime', 'fog', 'cloud', 'edge', 'fogpay'});"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
