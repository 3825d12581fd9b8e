"""The suite's two XLA configurations (tests/compilers.py)."""

import os
import time
import xml.etree.ElementTree as ET

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
    assert jax.config.jax_compilation_cache_dir == folder
    assert os.path.isdir(folder)
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


JUNIT = """<testsuites><testsuite>
<testcase classname="tests.frameworks.test_m" name="test_ok"/>
<testcase classname="tests.frameworks.test_m" name="test_bad[a-b]">
  <failure message="AssertionError: 1 != 2">trace</failure></testcase>
<testcase classname="tests.frameworks.test_m" name="test_known">
  <skipped type="pytest.xfail" message="1 ulp"/></testcase>
<testcase classname="tests.frameworks.test_m" name="test_xpass">
  <failure message="[XPASS(strict)] 1 ulp"/></testcase>
<testcase classname="tests.frameworks.test_m" name="test_skip">
  <skipped type="pytest.skip" message="no flax"/></testcase>
<testcase classname="tests.frameworks.test_m.TestC" name="test_in_class">
  <error message="fixture failed">setup trace</error></testcase>
</testsuite></testsuites>"""


def test_child_outcomes_are_read_per_node_id():
    tree = ET.ElementTree(ET.fromstring(JUNIT))
    got = compilers._parse(tree, "tests/frameworks/test_m.py")
    m = "tests/frameworks/test_m.py::"
    assert got == {
        m + "test_ok": ("passed", ""),
        m + "test_bad[a-b]": ("failed", "AssertionError: 1 != 2\ntrace"),
        m + "test_known": ("xfailed", "1 ulp"),
        m + "test_xpass": ("failed", "[XPASS(strict)] 1 ulp"),
        m + "test_skip": ("skipped", "no flax"),
        m + "TestC::test_in_class": ("errored", "fixture failed\nsetup trace"),
    }
