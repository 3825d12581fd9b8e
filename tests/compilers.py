"""Two XLA configurations for the suite: a cheap one, and XLA's default.

Most of the suite's time is XLA compiling for the CPU (three quarters of it in
a profile of the whole suite), and most tests assert behaviour that does not
depend on how XLA optimizes: which step is skipped, what is counted, which line
`locate` names. Those tests compile with XLA's cheapest CPU pipeline (fusion
emitters off, backend at -O0, codegen in one piece), which takes about 60% off
their compile time.

A test marked ``@pytest.mark.default_compiler`` compares a result bit for bit
with the same computation without jaxnan. Which rounding XLA's CPU code gives
depends on how it fuses (see `benchmarks/studies/fusion_rounding.py`), so that claim
is only worth something under the configuration users get: XLA's defaults.
XLA reads its flags once per process, so all the marked tests of a run go to
one child pytest with the environment the suite was started with. The first
process to finish collecting starts it in the background; the child writes
each test's outcome to a file as the test ends, and each marked item in the
workers reports the outcome it had there (passed, failed with the child's
traceback, xfailed, skipped). One child, not one per module, because each
pytest process pays several seconds of start-up before its first test. The
two hooks that do this (`pytest_collection_modifyitems`, `pytest_configure`)
live here; `conftest.py` imports them. What the marked tests do not compare,
a framework example's random init, compiles as one program at -O0 even there
(`cheap_init`).

``JAXNAN_TESTS_COMPILER=default`` runs the whole suite under XLA's defaults in
one process per worker, as before.

Under both configurations, the processes of one run (the xdist workers and the
child) share JAX's persistent compilation cache in the run's temporary folder:
many tests compile the same program (a model, a step, a small reduction) from
their own closures, and a compile done once by any of them serves the others.
The cache is keyed on the program, the XLA flags and the compile options, so
the two configurations never read each other's entries. A
``JAX_COMPILATION_CACHE_DIR`` set by the user is kept.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

try:
    import fcntl
except ImportError:  # not on Windows
    fcntl = None

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
_RUN = "JAXNAN_TESTS_RUN"  # the run's temporary folder
_OUTCOMES = "JAXNAN_TESTS_OUTCOMES"  # set in the child: where it writes outcomes
_O0 = "jax_disable_most_optimizations"  # the JAX option of _FAST_ENV's variable
_CACHE = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": 0.0,
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": 0,
}
T = TypeVar("T")


def fast() -> bool:
    """Whether this process compiles with the cheap configuration."""
    return os.environ.get(ENV, "fast") != "default"


def cheap_init(make: Callable[..., T], *args: Any, jit: Any = None) -> T:
    """``make(*args)`` (a model's random init) as one program compiled at -O0.

    For the default-configuration child, where the init is not what a
    bit-for-bit test compares (the plain and the guarded run start from the
    same values): under XLA's defaults each random initializer compiles on
    its own for 1-2 s per shape on a CPU (``jax.random.truncated_normal``:
    1.1-2.1 s, at -O0 0.2-0.4 s). One fresh program, not eager calls, because
    the option is not in JAX's in-memory cache key: an eager op compiled at
    -O0 would serve later computations of the same shape, and an initializer
    compiled earlier under the defaults would serve this one. The function
    is new at each call, so its program is compiled here, with this option,
    and served to no one else (the persistent cache keys on the option).

    Args:
        make: the init, e.g. ``model.init`` or an Equinox module's class.
        *args: its arguments.
        jit: how to compile it; `jax.jit` when None, ``eqx.filter_jit`` for a
            result holding more than arrays.
    """
    import jax

    jit = jax.jit if jit is None else jit
    before = jax.config.read(_O0)
    jax.config.update(_O0, True)
    try:
        return jit(lambda *a: make(*a))(*args)
    finally:
        jax.config.update(_O0, before)


def configure() -> None:
    """Sets the cheap configuration; call before JAX is imported.

    The environment carries it to subprocesses (xdist workers, the examples and
    the demo run as scripts).
    """
    _share_compiled(_run_folder())
    if not fast():
        return
    os.environ.setdefault(_USER_XLA_FLAGS, os.environ.get("XLA_FLAGS", ""))
    flags = os.environ.get("XLA_FLAGS", "").split()
    flags += [f for f in FAST_XLA_FLAGS if f not in flags]
    os.environ["XLA_FLAGS"] = " ".join(flags)
    os.environ.update(_FAST_ENV)
    import jax  # in case a plugin imported it before the variable was set

    jax.config.update(_O0, True)


def _run_folder() -> Path:
    """The run's temporary folder: made by the process pytest was started as,
    which removes it at exit; its workers and child find it in the environment.
    """
    if _RUN not in os.environ:
        folder = tempfile.mkdtemp(prefix="jaxnan-tests-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        os.environ[_RUN] = folder
    return Path(os.environ[_RUN])


def _share_compiled(run: Path) -> None:
    """Gives the processes of this run one persistent compilation cache."""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return  # the user's own, or this run's, inherited
    folder = str(run / "xla-cache")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    os.environ.update({name: str(value) for name, value in _CACHE.items()})
    import jax  # in case a plugin imported it before the variables were set

    jax.config.update("jax_compilation_cache_dir", folder)
    for name, value in _CACHE.items():
        jax.config.update(name.lower(), value)


# --- The workers' side: delegate the marked tests and read their outcomes. ---


@pytest.hookimpl(trylast=True)  # after -k, -m and --lf have deselected
def pytest_collection_modifyitems(config, items):
    """Runs the ``default_compiler`` tests under XLA's default configuration."""
    delegate(items)


def delegate(items: list[pytest.Item]) -> None:
    """Makes each marked test report the outcome of its run in the child.

    Call after deselection (``-k``, ``-m``, ``--lf``), so that the child runs
    exactly the marked tests of this session.
    """
    if not fast():
        return
    chosen = {
        item
        for item in items
        if isinstance(item, pytest.Function) and item.get_closest_marker(MARK)
    }
    # The workers take the other modules first, and a module's other tests
    # before its marked ones, so that the child is ahead when they need them.
    modules = {_module(item) for item in chosen}
    items.sort(key=lambda i: (_module(i) in modules, i in chosen))
    marked = [item for item in items if item in chosen]
    for item in marked:
        item.setup = _no_fixtures  # its fixtures are set up in the child
        item.runtest = _Delegated(item)
    if marked and not marked[0].config.option.collectonly:
        _start_child(marked[0].config.rootpath, [item.nodeid for item in marked])


def _module(item: pytest.Item) -> str:
    return item.nodeid.split("::")[0]


def _no_fixtures() -> None:
    pass


class _Delegated:
    def __init__(self, item: pytest.Function):
        self.item = item

    def __call__(self) -> None:
        __tracebackhide__ = True
        outcome, text = _wait_for(self.item.nodeid)
        if outcome in ("passed", "xpassed"):
            return  # passing here lets this item's own xfail(strict) fail
        if outcome == "skipped":
            pytest.skip(text)
        raise DefaultCompilerFailure(
            f"{outcome} under XLA's default configuration:\n{text}"
        )


class DefaultCompilerFailure(AssertionError):
    """A marked test failed (or xfailed) in the default-configuration child."""


def _outcomes_folder() -> Path:
    return _run_folder() / "default"


def _start_child(root: Path, nodeids: list[str]) -> None:
    """Starts the child once per run; the first process to ask starts it.

    The child inherits a descriptor holding an exclusive lock on ``alive``; the
    kernel drops the lock when the child ends, however it ends, which is how a
    waiting worker tells a crashed child from a slow one.
    """
    folder = _outcomes_folder()
    try:
        folder.mkdir()
    except FileExistsError:
        return  # another worker started it
    env = _default_env()
    env[_OUTCOMES] = str(folder)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", *nodeids]
    with open(folder / "alive", "w") as alive, open(folder / "log", "w") as log:
        if fcntl is not None:
            fcntl.flock(alive, fcntl.LOCK_EX)
        subprocess.Popen(
            cmd,
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            pass_fds=(alive.fileno(),) if fcntl is not None else (),
        )


def _wait_for(nodeid: str) -> tuple[str, str]:
    """The child's outcome of one test, as soon as it is written."""
    folder = _outcomes_folder()
    path = folder / _file_name(nodeid)
    while True:
        running = _running(folder)  # first: once it has ended, "done" is final
        done = (folder / "done").exists()
        if path.exists():
            return tuple(json.loads(path.read_text()))
        if done:
            return "missing", "the child pytest did not run it"
        if not running:
            tail = (folder / "log").read_text()[-4000:]
            return "crashed", f"the child pytest ended early:\n{tail}"
        time.sleep(0.1)


def _running(folder: Path) -> bool:
    if fcntl is None:  # no advisory locks: trust the child to say "done"
        return True
    try:
        alive = open(folder / "alive")
    except FileNotFoundError:
        return True  # the child is being started
    with alive:
        try:
            fcntl.flock(alive, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False


def _file_name(nodeid: str) -> str:
    return hashlib.sha1(nodeid.encode()).hexdigest() + ".json"


def _default_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _FAST_ENV and not k.startswith("PYTEST_XDIST")
    }
    env["XLA_FLAGS"] = env.pop(_USER_XLA_FLAGS, "")
    env[ENV] = "default"
    return env


# --- The child's side: write each outcome as the test ends. ---


def pytest_configure(config):
    """In the default-configuration child, writes each test's outcome."""
    plugin = child_plugin()
    if plugin is not None:
        config.pluginmanager.register(plugin, "jaxnan-default-compiler-child")


def child_plugin() -> ChildOutcomes | None:
    """The plugin that writes the outcomes, when this process is the child."""
    folder = os.environ.get(_OUTCOMES)
    return ChildOutcomes(Path(folder)) if folder else None


class ChildOutcomes:
    """Writes each test's outcome (one file, replaced atomically) as it ends,
    and ``done`` at the end of the session.

    It stops the session between tests once the run's folder is gone: the suite
    that started the child has ended (finished, stopped with ``-x``, or
    interrupted), and nobody reads what it would write.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.reports: dict[str, list[pytest.TestReport]] = {}

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item):
        if not self.folder.exists():
            item.session.shouldstop = "the suite that started this child ended"

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.reports.setdefault(report.nodeid, []).append(report)
        if report.when == "teardown":
            outcome = outcome_of(self.reports.pop(report.nodeid))
            tmp = self.folder / (_file_name(report.nodeid) + ".tmp")
            try:
                tmp.write_text(json.dumps(outcome))
                tmp.replace(self.folder / _file_name(report.nodeid))
            except FileNotFoundError:
                pass  # the run's folder is gone: this session is stopping

    def pytest_sessionfinish(self) -> None:
        if self.folder.exists():
            (self.folder / "done").touch()


def outcome_of(reports: list[pytest.TestReport]) -> tuple[str, str]:
    """One test's outcome from its setup, call and teardown reports.

    Returns ``(outcome, text)``: ``passed``, ``xpassed`` (a non-strict xfail
    that passed, or a strict one, whose failure the worker's own xfail mark
    gives), ``xfailed``, ``skipped``, ``failed`` (the call) or ``errored`` (a
    fixture), and the reason or traceback.
    """
    for report in reports:
        xfail = getattr(report, "wasxfail", None)
        if report.failed and report.longreprtext.startswith("[XPASS(strict)]"):
            return "xpassed", report.longreprtext
        if report.failed:
            kind = "failed" if report.when == "call" else "errored"
            return kind, report.longreprtext
        if report.skipped:
            if xfail is not None:
                return "xfailed", xfail
            return "skipped", report.longrepr[2] if report.longrepr else ""
        if report.when == "call" and xfail is not None:
            return "xpassed", xfail
    return "passed", ""
