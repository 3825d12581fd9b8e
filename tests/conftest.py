"""Test configuration: 8 forced CPU devices, set before any JAX computation.

XLA's cheap CPU configuration for most tests, XLA's defaults for the tests
marked ``default_compiler`` (see `tests/compilers.py`); one line per finished
test file instead of dots (`tests/progress.py`).
"""

from tests import compilers

compilers.configure()  # before JAX starts its backend

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")

import functools  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import NamedTuple  # noqa: E402

import pytest  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from tests import helpers, progress  # noqa: E402
from tests.compilers import (  # noqa: E402, F401 - the two configurations' hooks
    pytest_collection_modifyitems,
)


def pytest_configure(config):
    """The default-compiler child's outcomes (`tests/compilers.py`) and one
    line per finished test file (`tests/progress.py`)."""
    compilers.pytest_configure(config)
    progress.pytest_configure(config)


@pytest.fixture(scope="session")
def mesh8():
    """A 1-D mesh over the 8 forced CPU devices, axis name 'd'."""
    return helpers.mesh_of(8)


def _add_axis(tree):
    return jax.tree.map(lambda x: jax.numpy.asarray(x)[None], tree)


def _drop_axis(tree):
    return jax.tree.map(lambda x: x[0], tree)


def _eager(fn):
    return fn


def _vmap(fn):
    """`fn` on a batch of one (a new leading axis on every input), under jit."""

    @jax.jit
    def batched(*args):
        return _drop_axis(jax.vmap(fn)(*_add_axis(args)))

    return batched


def _shard_map(fn):
    """`fn` on every device of an 8-device mesh, inputs and outputs replicated."""
    mesh = helpers.mesh_of(8)

    @functools.wraps(fn)
    def replicated(*args):
        spec = jax.tree.map(lambda _: P(), args)
        out_spec = jax.tree.map(lambda _: P(), jax.eval_shape(fn, *args))
        return helpers.shard_map_over(mesh, fn, spec, out_spec)(*args)

    return replicated


class Variant(NamedTuple):
    """How a test runs its function; ``variant(fn)`` is the wrapped fn."""

    name: str
    wrap: Callable

    def __call__(self, fn):
        return self.wrap(fn)


VARIANTS = {"eager": _eager, "jit": jax.jit, "vmap": _vmap, "shard_map": _shard_map}


@pytest.fixture(params=list(VARIANTS))
def variant(request):
    """Runs a test eager, under jit, under vmap (a batch of one) and under
    shard_map (replicated over 8 devices)."""
    return Variant(request.param, VARIANTS[request.param])
