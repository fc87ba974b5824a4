"""The layout rules of DESIGN.md, checked on the source: no library module over 600
lines, no function over 150 lines of code, no import cycle (module- or function-level,
in the library, its example trainer, the tests and the benchmarks), and no underscore
name imported from another module of the library."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 150


def _modules(folder: str) -> dict[str, Path]:
    """dotted name -> path of every Python file under ``folder``."""
    out = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


LIBRARY = _modules("jxent")
EVERYTHING = {**LIBRARY, **_modules("benchmarks")}


@functools.cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _imports(name: str, path: Path) -> set[str]:
    """The modules of ``EVERYTHING`` that ``name`` imports, anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in EVERYTHING and t != name)
    return found


def test_no_library_module_is_over_600_lines():
    sizes = {n: len(p.read_text().splitlines()) for n, p in LIBRARY.items()}
    assert {n: s for n, s in sizes.items() if s > MAX_MODULE_LINES} == {}


def _code_lines(fn: ast.AST, source: list[str]) -> int:
    """Lines of ``fn`` that hold code: its docstring, blank lines and comments excluded."""
    skip = set()
    body = getattr(fn, "body", [])
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        skip.update(range(body[0].lineno, body[0].end_lineno + 1))
    lines = range(fn.lineno, fn.end_lineno + 1)
    return sum(
        1
        for i in lines
        if i not in skip and source[i - 1].strip() and not source[i - 1].strip().startswith("#")
    )


@pytest.mark.parametrize("name", sorted(LIBRARY))
def test_no_function_is_over_150_lines_of_code(name):
    path = LIBRARY[name]
    source = path.read_text().splitlines()
    long = {
        node.name: _code_lines(node, source)
        for node in ast.walk(_tree(path))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and _code_lines(node, source) > MAX_FUNCTION_LINES
    }
    assert long == {}


def test_no_import_cycle():
    graph = {name: _imports(name, path) for name, path in EVERYTHING.items()}
    # A package imports its own modules to re-export them; that is not a cycle.
    graph = {n: {t for t in ts if not t.startswith(n + ".")} for n, ts in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_no_underscore_name_crosses_a_module_boundary():
    crossing = []
    for name, path in LIBRARY.items():
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jxent"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                # Importing a private *module* (jxent._fused, _validation) is the layout;
                # a private name defined inside another module is not.
                private = [p for p in private if f"{node.module}.{p}" not in LIBRARY]
                crossing += [f"{name}: from {node.module} import {p}" for p in private]
    assert crossing == []
