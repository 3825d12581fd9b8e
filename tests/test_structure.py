"""Structure targets of `jaxnan/_src` (DESIGN.md): module size, import cycles,
complexity. Known offenders are listed; a new one fails the test."""

import ast
import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "jaxnan" / "_src"

MAX_LINES = 700
# Known offenders, being split (issue 15); the lists may only shrink.
KNOWN_LONG: set = set()
KNOWN_CYCLES: set = set()
KNOWN_COMPLEX_20: set = set()


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = p.with_suffix("").relative_to(SRC.parents[1]).parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(path: pathlib.Path, mods) -> set[str]:
    """jaxnan._src modules imported anywhere in `path` (functions included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out.update(n for n in names if n in mods)
    return out


def _cycles(edges: dict[str, set[str]]) -> set[frozenset]:
    """The strongly connected components with more than one module."""
    index, low, stack, found = {}, {}, [], set()

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.add(frozenset(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_modules_are_small():
    long = {
        str(p.relative_to(SRC))
        for p in SRC.rglob("*.py")
        if len(p.read_text().splitlines()) > MAX_LINES
    }
    assert long <= KNOWN_LONG, f"modules over {MAX_LINES} lines: {long - KNOWN_LONG}"


def test_no_new_import_cycle():
    mods = _modules()
    edges = {
        m: {t for t in _imports(p, mods) if t != m and not m.startswith(t + ".")}
        for m, p in mods.items()
    }
    assert _cycles(edges) <= KNOWN_CYCLES


def test_cycle_finder_finds_a_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(edges) == {frozenset("abc")}


@pytest.mark.skipif(importlib.util.find_spec("radon") is None, reason="no radon")
def test_no_new_block_of_complexity_20():
    proc = subprocess.run(
        [sys.executable, "-m", "radon", "cc", "-j", "-n", "C", str(SRC)],
        capture_output=True,
        text=True,
        check=True,
    )
    complex_blocks = set()
    for path, blocks in json.loads(proc.stdout).items():
        name = str(pathlib.Path(path).relative_to(SRC))
        for b in blocks:
            if b["complexity"] >= 20:
                label = (
                    f"{b['classname']}.{b['name']}" if b.get("classname") else b["name"]
                )
                complex_blocks.add(f"{name}:{label}")
    assert complex_blocks <= KNOWN_COMPLEX_20
