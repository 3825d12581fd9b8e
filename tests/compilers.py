"""Two XLA configurations for the suite: a cheap one, and XLA's default.

Most of the suite's time is XLA compiling for the CPU (three quarters of it in
a profile of the whole suite), and most tests assert behaviour that does not
depend on how XLA optimizes: which step is skipped, what is counted, which line
`locate` names. Those tests compile with XLA's cheapest CPU pipeline (fusion
emitters off, backend at -O0, codegen in one piece), which takes about 60% off
their compile time.

A test marked ``@pytest.mark.default_compiler`` compares a result bit for bit
with the same computation without jaxnan. Which rounding XLA's CPU code gives
depends on how it fuses (see `benchmarks/fusion_rounding.py`), so that claim
is only worth something under the configuration users get: XLA's defaults.
XLA reads its flags once per process, so the marked tests of a module run
together in one child pytest with the environment the suite was started with,
and each one reports the outcome it had there (passed, failed with the child's
traceback, xfailed, skipped).

``JAXNAN_TESTS_COMPILER=default`` runs the whole suite under XLA's defaults in
one process per worker, as before.

Under both configurations, the processes of one run (the xdist workers and the
children) share JAX's persistent compilation cache in a temporary folder: many
tests compile the same program (a model, a step, a small reduction) from their
own closures, and a compile done once by any of them serves the others. The
cache is keyed on the program, the XLA flags and the compile options, so the two
configurations never read each other's entries. A ``JAX_COMPILATION_CACHE_DIR``
set by the user is kept.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

MARK = "default_compiler"
ENV = "JAXNAN_TESTS_COMPILER"
FAST_XLA_FLAGS = (
    "--xla_cpu_use_fusion_emitters=false",
    # One LLVM module per program: splitting it for parallel codegen only adds
    # threads on a machine whose cores the xdist workers already keep busy.
    "--xla_cpu_parallel_codegen_split_count=1",
)
_USER_XLA_FLAGS = "JAXNAN_TESTS_USER_XLA_FLAGS"  # XLA_FLAGS as the suite got it
_FAST_ENV = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}


def fast() -> bool:
    """Whether this process compiles with the cheap configuration."""
    return os.environ.get(ENV, "fast") != "default"


_CACHE = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": 0.0,
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": 0,
}


def share_compiled() -> None:
    """Gives the processes of this run one persistent compilation cache.

    The process pytest was started as makes the folder and removes it at exit;
    the workers and children inherit it through the environment, which JAX reads
    when it is imported. A cache the user set up is left as it is.
    """
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    folder = tempfile.mkdtemp(prefix="jaxnan-tests-xla-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    os.environ.update({name: str(value) for name, value in _CACHE.items()})
    import jax  # in case a plugin imported it before the variables were set

    jax.config.update("jax_compilation_cache_dir", folder)
    for name, value in _CACHE.items():
        jax.config.update(name.lower(), value)


def configure() -> None:
    """Sets the cheap configuration; call before JAX is imported.

    The environment carries it to subprocesses (xdist workers, the examples and
    the demo run as scripts).
    """
    share_compiled()
    if not fast():
        return
    os.environ.setdefault(_USER_XLA_FLAGS, os.environ.get("XLA_FLAGS", ""))
    flags = os.environ.get("XLA_FLAGS", "").split()
    flags += [f for f in FAST_XLA_FLAGS if f not in flags]
    os.environ["XLA_FLAGS"] = " ".join(flags)
    os.environ.update(_FAST_ENV)
    import jax  # in case a plugin imported it before the variable was set

    jax.config.update("jax_disable_most_optimizations", True)


def _default_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _FAST_ENV and not k.startswith("PYTEST_XDIST")
    }
    env["XLA_FLAGS"] = env.pop(_USER_XLA_FLAGS, "")
    env[ENV] = "default"
    return env


def delegate(items: list[pytest.Item]) -> None:
    """Makes each marked test report the outcome of its run in the child."""
    if not fast():
        return
    for item in items:
        if isinstance(item, pytest.Function) and item.get_closest_marker(MARK):
            item.setup = _no_fixtures  # its fixtures are set up in the child
            item.runtest = _Delegated(item)


def _no_fixtures() -> None:
    pass


class _Delegated:
    def __init__(self, item: pytest.Function):
        self.item = item

    def __call__(self) -> None:
        __tracebackhide__ = True
        outcome, text = _results(self.item).get(
            self.item.nodeid, ("missing", "the child pytest did not report it")
        )
        if outcome == "passed" or text.startswith("[XPASS(strict)]"):
            return  # passing here lets this item's own xfail(strict) fail
        if outcome == "skipped":
            pytest.skip(text)
        raise DefaultCompilerFailure(
            f"{outcome} under XLA's default configuration:\n{text}"
        )


class DefaultCompilerFailure(AssertionError):
    """A marked test failed (or xfailed) in the default-configuration child."""


_OUTCOME = {"failure": "failed", "error": "errored", "skipped": "skipped"}
_RESULTS: dict[str, dict[str, tuple[str, str]]] = {}


def _results(item: pytest.Function) -> dict[str, tuple[str, str]]:
    module = item.nodeid.split("::")[0]
    if module not in _RESULTS:
        marked = [
            i.nodeid
            for i in item.session.items
            if i.nodeid.split("::")[0] == module and i.get_closest_marker(MARK)
        ]
        _RESULTS[module] = _run_child(item.config.rootpath, module, marked)
    return _RESULTS[module]


def _run_child(root: Path, module: str, nodeids: list[str]):
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "results.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist"]
        proc = subprocess.run(
            [*cmd, f"--junitxml={xml}", *nodeids],
            cwd=root,
            env=_default_env(),
            capture_output=True,
            text=True,
        )
        if not os.path.exists(xml):
            tail = (proc.stdout + proc.stderr)[-4000:]
            return {n: ("crashed", tail) for n in nodeids}
        return _parse(ET.parse(xml), module)


def _parse(tree: ET.ElementTree, module: str) -> dict[str, tuple[str, str]]:
    prefix = module[: -len(".py")].replace("/", ".")
    out = {}
    for case in tree.iter("testcase"):
        inner = case.get("classname", "")[len(prefix) + 1 :]
        name = "::".join(p for p in (inner, case.get("name", "")) if p)
        outcome, text = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                text = node.get("message", "") + "\n" + (node.text or "")
                kind = node.get("type", "")
                outcome = "xfailed" if kind == "pytest.xfail" else _OUTCOME[tag]
                break
        out[f"{module}::{name}"] = (outcome, text.strip())
    return out
