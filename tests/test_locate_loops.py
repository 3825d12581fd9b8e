"""`jaxnan.locate` in loops: a `while` condition under vmap, a `where` in a scan."""

import jax
import jax.numpy as jnp
from jax import lax

import jaxnan
from tests import helpers


def _bisect(width, shrink):
    def cond(state):
        i, lo, hi = state
        return (jnp.sqrt(hi - lo) > 0.5) | (i < 4)  # <- cond

    def body(state):
        i, lo, hi = state
        return i + 1, lo + shrink, hi

    _, lo, hi = lax.while_loop(cond, body, (0, jnp.zeros_like(width), width))
    return hi - lo


def _line(marker):
    """The line of `marker`'s code (its first occurrence; the asserts follow)."""
    return helpers.marker_lines(__file__, marker)[0]


def test_vmapped_while_condition_nan_is_found():
    # Under vmap the predicate is batched (bool[3]): the loop runs while any
    # lane's holds, and the third lane's bracket goes negative at step 3.
    width = jnp.array([4.0, 4.0, 1.25])
    shrink = jnp.array([0.5, 0.25, 0.5])
    d = jaxnan.locate(jax.vmap(_bisect))(width, shrink)
    assert (d.found, d.primitive, d.line) == (True, "sqrt", _line("# <- cond"))
    assert d.iteration == (3,) and d.cause == "unsafe_op"
    assert "min -0.25" in d.inputs_seen
    # The loop itself matches lax.while_loop's lane-wise semantics.
    got = jax.jit(jax.vmap(_bisect))(width, shrink)
    assert got.tolist() == [0.0, 0.25, -0.75]


def test_while_condition_nan_under_jit_and_in_a_scan():
    x = jnp.float32(1.25)
    d = jaxnan.locate(jax.jit(lambda x: _bisect(x, jnp.float32(0.5))))(x)
    assert (d.primitive, d.iteration) == ("sqrt", (3,))

    def outer(x):
        step = lambda c, _: (_bisect(c, jnp.float32(0.5)) + 1.25, None)  # noqa: E731
        return lax.scan(step, x, length=2)[0]

    d = jaxnan.locate(outer)(x)
    assert (d.primitive, d.iteration) == ("sqrt", (0, 3))


def test_where_masked_nan_reports_the_iteration_that_escaped():
    def total(probs):
        def body(acc, p):
            logp = jnp.where(p > -3.0, jnp.log(p), 0.0)  # <- scan log
            return acc + logp, logp

        return lax.scan(body, 0.0, probs)

    probs = jnp.array([0.5, -4.0, 0.25, -1.0, 0.125])
    d = jaxnan.locate(total)(probs)
    assert (d.primitive, d.line) == ("log", _line("# <- scan log"))
    # Iteration 1 made a NaN that the where masked; iteration 3's got out.
    assert d.iteration == (3,)
    assert "min -1.0" in d.inputs_seen


def test_where_masked_nan_alone_is_still_reported():
    def total(probs):
        def body(acc, p):
            return acc + jnp.where(p > 0, jnp.log(p), 0.0), None

        return lax.scan(body, 0.0, probs)[0]

    d = jaxnan.locate(total)(jnp.array([0.5, -4.0, 0.25]))
    assert d.found and d.primitive == "log" and d.iteration == (1,)
    assert not d.nonfinite_outputs
