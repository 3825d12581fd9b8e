"""The suite's two XLA configurations (tests/compilers.py)."""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from tests import compilers


@pytest.mark.skipif(
    not compilers.fast(), reason="JAXNAN_TESTS_COMPILER=default: one configuration"
)
def test_behaviour_tests_compile_with_the_cheap_configuration():
    flags = os.environ["XLA_FLAGS"].split()
    assert set(compilers.FAST_XLA_FLAGS) <= set(flags)
    assert jax.config.read("jax_disable_most_optimizations") is True


@pytest.mark.default_compiler
def test_marked_tests_run_under_xla_defaults():
    # In the child (or everywhere under JAXNAN_TESTS_COMPILER=default): the
    # environment the suite was started with.
    assert os.environ[compilers.ENV] == "default"
    flags = os.environ.get("XLA_FLAGS", "").split()
    assert not set(compilers.FAST_XLA_FLAGS) & set(flags)
    assert "JAX_DISABLE_MOST_OPTIMIZATIONS" not in os.environ
    assert jax.config.read("jax_disable_most_optimizations") is False


def test_processes_of_a_run_share_one_compilation_cache():
    folder = os.environ["JAX_COMPILATION_CACHE_DIR"]
    if Path(folder).parent != Path(os.environ["JAXNAN_TESTS_RUN"]):
        pytest.skip(f"JAX_COMPILATION_CACHE_DIR={folder!r}: the user's own cache")
    assert jax.config.jax_compilation_cache_dir == folder
    hits = []

    def listen(event, **_):
        if event == "/jax/compilation_cache/cache_hits":
            hits.append(event)

    stamp = float(time.time_ns() % 1_000_003)  # a program no earlier run compiled

    def compile_fresh():
        # A new closure each time, as tests build their own steps.
        jax.jit(lambda x: jnp.sin(x) * stamp).lower(1.0).compile()

    jax.monitoring.register_event_listener(listen)
    try:
        compile_fresh()
        assert hits == []
        jax.clear_caches()  # as another process would start: nothing in memory
        compile_fresh()
    finally:
        jax.monitoring.unregister_event_listener(listen)
    assert hits == ["/jax/compilation_cache/cache_hits"]
    assert os.listdir(folder)


SCRATCH_CONFTEST = """
from tests import compilers
from tests.compilers import pytest_collection_modifyitems, pytest_configure

compilers.configure()
"""

SCRATCH_TESTS = """
import os
import pytest

mark = pytest.mark.default_compiler


@mark
def test_ok():
    assert os.environ["JAXNAN_TESTS_COMPILER"] == "default"


def test_here():
    assert "JAXNAN_TESTS_COMPILER" not in os.environ
    print("RUN=" + os.environ["JAXNAN_TESTS_RUN"] + "=")


@mark
def test_bad():
    assert 1 == 2


@mark
@pytest.mark.xfail(reason="one ulp", strict=True)
def test_known():
    assert 0


@mark
@pytest.mark.xfail(reason="fixed since", strict=True)
def test_xpass():
    pass


@mark
def test_skip():
    pytest.skip("no flax")


@pytest.fixture
def broken():
    raise RuntimeError("fixture broke")


class TestC:
    @mark
    def test_in_class(self, broken):
        pass


@mark
@pytest.mark.parametrize("x", ["a-b", "c d"])
def test_param(x):
    assert x != "c d"


@mark
def test_zz_crash():
    os._exit(3)
"""


def test_marked_tests_report_their_outcome_in_the_child(tmp_path):
    (tmp_path / "conftest.py").write_text(SCRATCH_CONFTEST)
    (tmp_path / "test_scratch.py").write_text(SCRATCH_TESTS)
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nmarkers =\n    default_compiler: under XLA's defaults\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAXNAN_TESTS")}
    env.pop("PYTEST_XDIST_WORKER", None)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env["PYTHONPATH"] = str(Path(__file__).parents[1])
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # xdist only: a quicker start
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "xdist", "-n", "2", "-rA"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = run.stdout
    lines = {}
    for line in out.splitlines():
        word, _, rest = line.partition(" ")
        if word in ("PASSED", "FAILED", "XFAIL", "SKIPPED", "ERROR") and "::" in rest:
            lines[rest.split(" - ")[0].split("::", 1)[1]] = word
    assert lines == {
        "test_ok": "PASSED",
        "test_here": "PASSED",
        "test_bad": "FAILED",
        "test_known": "XFAIL",
        "test_xpass": "FAILED",  # [XPASS(strict)]
        "TestC::test_in_class": "FAILED",
        "test_param[a-b]": "PASSED",
        "test_param[c d]": "FAILED",
        "test_zz_crash": "FAILED",
    }, out
    assert "SKIPPED [1]" in out  # test_skip, reported by its reason
    assert "failed under XLA's default configuration" in out
    assert "assert 1 == 2" in out  # the child's traceback
    assert "errored under XLA's default configuration" in out
    assert "RuntimeError: fixture broke" in out
    assert "[XPASS(strict)] fixed since" in out
    assert "crashed under XLA's default configuration" in out
    assert "Skipped: no flax" in out
    folder = out.split("RUN=")[1].split("=")[0]
    assert Path(folder).parent == Path(tempfile.gettempdir())
    assert not Path(folder).exists()  # removed at the end of the run
