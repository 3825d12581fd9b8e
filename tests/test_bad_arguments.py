"""Strings and Python objects in a loss's arguments: static, or a clear error.

`checked` and `locate` pass non-array leaves (a str label, a dict holding a
str, any Python object, None) through to the function as static values, and
still check and locate the arrays beside them; the guard, which compiles
the step once and keeps the batch for replay, refuses them with a
`TypeError` that names the argument, the leaf and the fix.
"""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnan


class Tokenizer:
    """A Python object a batch may carry."""


EXTRAS = {
    "str": ({"label": "cat"}, "batch['label']", "a str"),
    "dict with str": ({"meta": {"name": "a"}}, "batch['meta']['name']", "a str"),
    "object": ({"tok": Tokenizer()}, "batch['tok']", "a Tokenizer"),
    "None": ({"mask": None}, None, None),
}


def loss(w, batch):
    return jnp.sum(jnp.log(w) * batch["x"])


LOSS_LINE = loss.__code__.co_firstlineno + 1


def batch_with(kind, x=None):
    extra, _, _ = EXTRAS[kind]
    return {"x": jnp.arange(1.0, 4.0) if x is None else x, **extra}


@pytest.mark.parametrize("kind", list(EXTRAS))
def test_checked_passes_them_through_and_checks_the_arrays(kind):
    w = jnp.asarray([1.0, 2.0, 4.0])
    batch = batch_with(kind)
    plain_value, plain_grad = jax.value_and_grad(loss)(w, batch)
    value, grad = jax.value_and_grad(jaxnan.checked(loss))(w, batch)
    np.testing.assert_array_equal(np.asarray(value), np.asarray(plain_value))
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(plain_grad))
    # The arrays beside them are still checked: a NaN in x is named.
    bad = batch_with(kind, x=jnp.asarray([1.0, jnp.nan, 3.0]))
    with pytest.raises(jaxnan.NonFiniteError, match=r"batch\['x'\]: 1 nan"):
        jaxnan.checked(loss)(w, bad)


@pytest.mark.parametrize("kind", list(EXTRAS))
def test_locate_passes_them_through_and_names_the_line(kind):
    w = jnp.asarray([1.0, 0.0, 4.0])  # log(0) = -inf, times 2 is -inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        d = jaxnan.locate(loss)(w, batch_with(kind))
    assert (d.found, d.primitive, d.line) == (True, "log", LOSS_LINE)
    assert not jaxnan.locate(loss)(jnp.ones(3), batch_with(kind)).found


def sqrt_loss(w, batch, n=3):
    safe = jnp.where(w > 0, jnp.sqrt(w), 0.0)  # where-nan-grad
    return jnp.sum(safe[:n] * batch["x"][:n])


SQRT_LINE = sqrt_loss.__code__.co_firstlineno + 1


@pytest.mark.parametrize("kind", list(EXTRAS))
def test_lint_passes_them_through_and_finds_the_pattern(kind):
    # Before, jax.make_jaxpr took a str, a Python object or the int `n`
    # (a slice bound) for an abstract array and failed deep inside.
    for args in [(batch_with(kind),), (batch_with(kind), 2)]:
        found = jaxnan.lint(sqrt_loss, jnp.ones(3), *args)
        assert [(f.rule, f.line) for f in found] == [("where-nan-grad", SQRT_LINE)]


def test_lint_passes_functions_bytes_and_text_arrays_through():
    def fn(w, act, tag, names):
        del tag, names
        return jnp.sum(jnp.where(w > 0, jnp.sqrt(act(w)), 0.0))

    found = jaxnan.lint(fn, jnp.ones(3), jnp.sin, b"run", np.array(["a", "b"]))
    assert [f.rule for f in found] == ["where-nan-grad"]


tx = jaxnan.skip_nonfinite(optax.sgd(0.1))


def train_step(params, opt_state, batch):
    value, grads = jax.value_and_grad(loss)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params, loss=value)
    return optax.apply_updates(params, updates), opt_state, value


@pytest.mark.parametrize("kind", list(EXTRAS))
def test_guard_names_the_argument_and_the_fix(kind):
    _, path, what = EXTRAS[kind]
    step = jaxnan.guard(jax.jit(train_step))
    params = jnp.ones(3)
    opt_state = tx.init(params)
    if path is None:  # None leaves are accepted, as by jax.jit
        new, _, value = step(params, opt_state, batch_with(kind))
        assert float(value) == 0.0 and bool(
            jnp.all(new == 1 - 0.1 * batch_with(kind)["x"])
        )
        return
    msg = (
        f"argument `batch` of `train_step` holds {what} at {re.escape(path)}"
        r".*pass arrays \(numpy or jax\), or bind constants with functools.partial"
    )
    with pytest.raises(TypeError, match=msg):
        step(params, opt_state, batch_with(kind))
    # Nothing was lost: the caller's arrays are alive.
    assert float(jnp.sum(params)) == 3.0


# Options of the transforms. `exact="no"` was taken for True, and an int
# axis name (`axis_name=0`, a habit of positional axes) failed deep inside
# lax.psum with "Too many indices" or "reduction axes out of bounds".
AXIS_TRANSFORMS = {
    "skip_nonfinite": lambda **kw: jaxnan.skip_nonfinite(optax.sgd(0.1), **kw),
    "skip_spikes": lambda **kw: jaxnan.skip_spikes(optax.sgd(0.1), **kw),
    "dynamic_loss_scale": lambda **kw: jaxnan.dynamic_loss_scale(optax.sgd(0.1), **kw),
    "monitor": lambda **kw: jaxnan.monitor(optax.sgd(0.1), **kw),
    "zscore_clip": lambda **kw: jaxnan.zscore_clip(**kw),
    "adagc": lambda **kw: jaxnan.adagc(**kw),
}


@pytest.mark.parametrize("name", sorted(AXIS_TRANSFORMS))
@pytest.mark.parametrize("axis_name", [0, -1, True, 2.5, ["batch"]])
def test_axis_name_must_be_a_name(name, axis_name):
    msg = rf"jaxnan.{name}: axis_name must be a str .* got {re.escape(repr(axis_name))}"
    with pytest.raises(TypeError, match=msg):
        AXIS_TRANSFORMS[name](axis_name=axis_name)


@pytest.mark.parametrize("name", sorted(AXIS_TRANSFORMS))
def test_axis_name_may_be_a_tuple_of_names(name):
    AXIS_TRANSFORMS[name](axis_name=("data", "fsdp"))


@pytest.mark.parametrize("exact", ["no", 1, None, np.float32(0.0)])
def test_skip_nonfinite_exact_must_be_a_bool(exact):
    with pytest.raises(TypeError, match=r"exact must be True or False, got"):
        jaxnan.skip_nonfinite(optax.sgd(0.1), exact=exact)
