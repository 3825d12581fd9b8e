"""What a wrapper forwards to its inner optimizer, and whose error a user sees.

`skip_nonfinite` passes its extra arguments, ``loss=`` included, on to the
inner transformation. ``optax.lbfgs``'s zoom line search passes unknown
extra arguments on to the user's ``value_fn``: one without a ``loss``
parameter fails, and the user must see that failure, not a complaint about
the shape of lbfgs's memory (which has a leading memory axis by design).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnan


def _problem():
    params = {"w": jnp.zeros((3, 4))}
    target = jnp.arange(12.0).reshape(3, 4)

    def value_fn(p):
        return jnp.sum((p["w"] - target) ** 2)

    def value_fn_with_loss(p, loss=None):
        del loss
        return value_fn(p)

    return params, value_fn, value_fn_with_loss


def test_lbfgs_value_fn_without_loss_gets_optax_error_with_the_fix():
    params, value_fn, _ = _problem()
    tx = jaxnan.skip_nonfinite(optax.lbfgs())
    state = tx.init(params)
    value, grad = jax.value_and_grad(value_fn)(params)
    with pytest.raises(TypeError) as info:
        tx.update(
            grad, state, params, loss=value, value=value, grad=grad, value_fn=value_fn
        )
    msg = str(info.value)
    assert msg.startswith("jaxnan.skip_nonfinite: the inner transformation's update")
    assert "grad=, loss=, value=, value_fn=" in msg
    assert "not consumed by `value_fn`: ['loss']" in msg  # optax's own words
    assert "def value_fn(params, loss=None)" in msg
    assert "diff_params_memory" not in msg and "shape" not in msg
    assert isinstance(info.value.__cause__, TypeError)
    assert "scale_by_zoom_linesearch" in str(info.value.__cause__)


def test_lbfgs_value_fn_taking_loss_runs_bit_for_bit_as_lbfgs():
    params, _, value_fn = _problem()
    opt = optax.lbfgs()
    tx = jaxnan.skip_nonfinite(opt)

    def step_of(t):
        @jax.jit
        def step(p, s):
            value, grad = jax.value_and_grad(value_fn)(p)
            u, s = t.update(
                grad, s, p, loss=value, value=value, grad=grad, value_fn=value_fn
            )
            return optax.apply_updates(p, u), s

        return step

    guarded, plain = step_of(tx), step_of(opt)

    p_run, s_run, p_ref, s_ref = params, tx.init(params), params, opt.init(params)
    for _ in range(3):
        p_run, s_run = guarded(p_run, s_run)
        p_ref, s_ref = plain(p_ref, s_ref)
    assert np.asarray(p_run["w"]).tobytes() == np.asarray(p_ref["w"]).tobytes()
    assert int(s_run.nonfinite_total) == 0
    assert float(value_fn(p_run)) < 1e-3  # lbfgs solves the quadratic


def test_lbfgs_state_of_other_params_still_names_the_leaf():
    params, _, value_fn = _problem()
    tx = jaxnan.skip_nonfinite(optax.lbfgs())
    state = tx.init({"w": jnp.zeros((2, 4))})  # another model's state
    value, grad = jax.value_and_grad(value_fn)(params)
    with pytest.raises(ValueError, match=r"params\['w'\] has shape \(2, 4\)"):
        tx.update(
            grad, state, params, loss=value, value=value, grad=grad, value_fn=value_fn
        )
