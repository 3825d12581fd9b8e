"""Structure targets of `jaxnan` (DESIGN.md): module size, import cycles, no
private names used across modules, complexity. Known offenders are listed; a
new one fails the test. Each checker also runs on a made-up offender, so that
a check that cannot fail is caught."""

import ast
import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "jaxnan"
SRC = PKG / "_src"

MAX_LINES = 700  # a module has fewer lines
# Radon cyclomatic complexity of the blocks (functions, methods, classes) of
# `jaxnan/`: at most MAX_COMPLEX_SHARE of them at COMPLEX or more, none at
# TOO_COMPLEX or more.
COMPLEX, TOO_COMPLEX, MAX_COMPLEX_SHARE = 11, 20, 0.04
# Known offenders, being split (issue 15); the lists may only shrink.
KNOWN_LONG: set = set()
KNOWN_CYCLES: set = set()
KNOWN_COMPLEX_20: set = set()
KNOWN_PRIVATE_USES: set = set()


def _modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every module under `root`."""
    out = {}
    for p in root.rglob("*.py"):
        parts = p.with_suffix("").relative_to(root.parent).parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


# -- module size ----------------------------------------------------------


def _long_modules(root: pathlib.Path) -> set[str]:
    return {
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if len(p.read_text().splitlines()) >= MAX_LINES
    }


def test_modules_are_small():
    long = _long_modules(PKG)
    assert long <= KNOWN_LONG, f"modules of {MAX_LINES}+ lines: {long - KNOWN_LONG}"


def test_long_module_finder_finds_one(tmp_path):
    (tmp_path / "big.py").write_text("x = 1\n" * MAX_LINES)
    (tmp_path / "small.py").write_text("x = 1\n" * (MAX_LINES - 1))
    assert _long_modules(tmp_path) == {"big.py"}


# -- import cycles --------------------------------------------------------


def _imports(path: pathlib.Path, mods) -> set[str]:
    """jaxnan modules imported anywhere in `path` (functions included)."""
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


def test_no_new_import_cycle():
    mods = _modules(SRC)
    edges = {
        m: {t for t in _imports(p, mods) if t != m and not m.startswith(t + ".")}
        for m, p in mods.items()
    }
    assert _cycles(edges) <= KNOWN_CYCLES


def test_cycle_finder_finds_a_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(edges) == {frozenset("abc")}


# -- private names --------------------------------------------------------


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_uses(module: str, source: str, mods) -> set[str]:
    """Private names of other jaxnan modules that `module` imports or reads.

    ``from jaxnan._src.core.tree import _flat`` and ``tree._flat`` (with
    ``tree`` an imported jaxnan module) both count; a module's own private
    names and dunders do not.
    """
    tree = ast.parse(source)
    aliases, out = {}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in mods:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in mods:
                    aliases[a.asname or a.name] = full
                elif _is_private(a.name) and node.module != module:
                    out.add(full)
        elif isinstance(node, ast.Import):
            aliases.update({a.asname: a.name for a in node.names if a.name in mods})
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and aliases.get(node.value.id, module) != module
            and _is_private(node.attr)
        ):
            out.add(f"{aliases[node.value.id]}.{node.attr}")
    return out


def test_no_private_name_used_across_modules():
    mods = _modules(PKG)
    used = set()
    for m, p in mods.items():
        used |= {f"{m}: {u}" for u in _private_uses(m, p.read_text(), mods)}
    assert used <= KNOWN_PRIVATE_USES, used - KNOWN_PRIVATE_USES


def test_private_use_finder_finds_both_spellings():
    mods = {"jaxnan._src.core.tree", "jaxnan._src.core", "jaxnan._src.core.dtypes"}
    source = (
        "from jaxnan._src.core.tree import _flat, all_finite\n"
        "from jaxnan._src.core import tree as t, dtypes\n"
        "t._size(1); dtypes.__name__; dtypes.leaf_dtype(1); _own()\n"
    )
    assert _private_uses("jaxnan._src.transforms.monitor", source, mods) == {
        "jaxnan._src.core.tree._flat",
        "jaxnan._src.core.tree._size",
    }
    assert _private_uses("jaxnan._src.core.tree", source, mods) == set()


# -- complexity -----------------------------------------------------------


def _complexity_failures(blocks: dict[str, int]) -> list[str]:
    """What breaks the targets, for block label -> radon complexity."""
    too = {k for k, c in blocks.items() if c >= TOO_COMPLEX} - KNOWN_COMPLEX_20
    out = [f"complexity >= {TOO_COMPLEX}: {sorted(too)}"] if too else []
    complex_blocks = sorted(k for k, c in blocks.items() if c >= COMPLEX)
    if len(complex_blocks) > MAX_COMPLEX_SHARE * len(blocks):
        out.append(
            f"{len(complex_blocks)} of {len(blocks)} blocks have complexity >= "
            f"{COMPLEX} (at most {MAX_COMPLEX_SHARE:.0%}): {complex_blocks}"
        )
    return out


@pytest.mark.skipif(importlib.util.find_spec("radon") is None, reason="no radon")
def test_complexity_targets():
    proc = subprocess.run(
        [sys.executable, "-m", "radon", "cc", "-j", str(PKG)],
        capture_output=True,
        text=True,
        check=True,
    )
    blocks = {}
    for path, found in json.loads(proc.stdout).items():
        assert isinstance(found, list), (path, found)  # radon's parse error
        name = str(pathlib.Path(path).relative_to(PKG))
        for b in found:
            label = f"{b['classname']}.{b['name']}" if b.get("classname") else b["name"]
            blocks[f"{name}:{label}:{b['lineno']}"] = b["complexity"]
    assert len(blocks) > 500, len(blocks)  # the whole package was read
    assert _complexity_failures(blocks) == []


def test_complexity_check_finds_offenders():
    simple = {f"m.py:f{i}": 3 for i in range(96)}
    assert (
        _complexity_failures({**simple, **{f"m.py:g{i}": 11 for i in range(4)}}) == []
    )
    assert (
        "5 of 101 blocks"
        in _complexity_failures({**simple, **{f"m.py:g{i}": 11 for i in range(5)}})[0]
    )
    assert _complexity_failures({**simple, "m.py:h": 20})[0].startswith(
        "complexity >= 20"
    )


# -- package layering -----------------------------------------------------

# Which packages of `jaxnan/_src` each package may import (DESIGN.md's
# layers, bottom up). A package not listed may import only `core`.
LAYERS: dict[str, set[str]] = {
    "core": set(),
    "frameworks": {"core"},
    "inspect": {"core"},
    "lint": {"core"},
    "transforms": {"core", "frameworks", "inspect"},
    "checks": {"core", "frameworks"},
    "locate": {"core", "frameworks", "inspect", "checks"},
    "guard": {"core", "frameworks", "inspect", "transforms", "checks", "locate"},
}


def _package_imports(src: pathlib.Path) -> set[tuple[str, str]]:
    """``(package, imported package)`` for every import across packages."""
    out = set()
    for p in src.rglob("*.py"):
        rel = p.relative_to(src).parts
        if len(rel) < 2:
            continue
        pkg = rel[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for n in names:
                parts = n.split(".")
                if parts[:2] == ["jaxnan", "_src"] and len(parts) > 2:
                    if parts[2] != pkg:
                        out.add((pkg, parts[2]))
    return out


def _layer_violations(imports: set[tuple[str, str]]) -> set[str]:
    return {f"{a} imports {b}" for a, b in imports if b not in LAYERS.get(a, {"core"})}


def test_packages_import_only_the_layers_below():
    assert not [p.name for p in SRC.glob("*.py") if p.name != "__init__.py"], (
        "every module of jaxnan/_src lives in a package"
    )
    assert _layer_violations(_package_imports(SRC)) == set()


def test_layer_checker_finds_an_upward_import(tmp_path):
    (tmp_path / "core").mkdir()
    (tmp_path / "locate").mkdir()
    (tmp_path / "core" / "tree.py").write_text("from jaxnan._src.locate import api\n")
    (tmp_path / "locate" / "api.py").write_text("from jaxnan._src.core import tree\n")
    assert _layer_violations(_package_imports(tmp_path)) == {"core imports locate"}
