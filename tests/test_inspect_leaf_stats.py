"""param_stats and grad_stats: exact values, flags, shared with monitor."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnan
from jaxnan._src.inspect import leaf_stats
from jaxnan._src.transforms import monitor as monitor_mod


def _params():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3)).astype(np.float32)
    w[0, :] = 0.0
    return {"dense": {"w": w, "b": np.zeros(3, np.float32)}, "s": np.float32(2.0)}


@pytest.mark.parametrize("use_jit", [False, True])
def test_param_stats_equal_numpy(use_jit):
    p = _params()
    s = (jax.jit(jaxnan.param_stats) if use_jit else jaxnan.param_stats)(p)
    w = p["dense"]["w"]
    np.testing.assert_allclose(s.norm["dense"]["w"], np.linalg.norm(w), rtol=1e-6)
    assert float(s.max_abs["dense"]["w"]) == float(np.abs(w).max())
    assert float(s.zero_fraction["dense"]["w"]) == 0.25
    assert float(s.zero_fraction["dense"]["b"]) == 1.0
    assert float(s.norm["s"]) == 2.0 and int(s.nonfinite["s"]) == 0


def test_nan_leaf_is_honest():
    p = {"w": jnp.ones(4096).at[1].set(jnp.nan), "v": jnp.array([1.0, jnp.inf])}
    s = jax.jit(jaxnan.param_stats)(p)
    assert np.isnan(s.max_abs["w"]) and int(s.nonfinite["w"]) == 1
    assert int(s.nonfinite["v"]) == 1 and np.isinf(s.norm["v"])


def test_monitor_uses_the_same_implementation():
    assert not hasattr(monitor_mod, "_stats")
    grads = {"a": jnp.array([3.0, -4.0]), "b": jnp.array([jnp.nan, 1.0])}
    tx = jaxnan.monitor()
    _, st = tx.update(grads, tx.init(grads))
    ps = jaxnan.param_stats(grads)
    for k in grads:
        np.testing.assert_array_equal(st.monitor_grad_norm[k], ps.norm[k])
        np.testing.assert_array_equal(st.monitor_grad_max_abs[k], ps.max_abs[k])
        np.testing.assert_array_equal(st.monitor_grad_nonfinite[k], ps.nonfinite[k])
    norms, _, _ = leaf_stats.norms_maxabs_nonfinite([grads["a"]])
    assert float(norms[0]) == 5.0


def test_grad_stats_flags_vanishing_and_exploding_relative_to_median():
    g = {
        "a": jnp.full(4, 1e-9),
        "b": jnp.ones(4),
        "c": jnp.full(4, 2.0),
        "d": jnp.full(4, 5e3),
        "e": jnp.array([1.0, jnp.nan, 0.0, 0.0]),
    }
    s = jax.jit(jaxnan.grad_stats)(g)
    # finite norms: 2e-9, 2, 4, 1e4 -> median 3
    assert {k for k in g if s.vanishing[k]} == {"a"}
    assert {k for k in g if s.exploding[k]} == {"d", "e"}
    assert float(s.zero_fraction["e"]) == 0.5
    assert np.isnan(s.update_ratio["a"])


def test_grad_stats_relative_to_params_and_update_ratio():
    params = {"w": jnp.full(4, 10.0), "b": jnp.zeros(4)}  # norms 20 and 0
    grads = {"w": jnp.full(4, 1e-6), "b": jnp.full(4, 0.5)}  # norms 2e-6, 1
    opt = optax.sgd(0.1)
    updates, _ = opt.update(grads, opt.init(params), params)
    s = jaxnan.grad_stats(grads, params, updates)
    assert bool(s.vanishing["w"]) and not bool(s.vanishing["b"])
    np.testing.assert_allclose(s.update_ratio["w"], 2e-7 / 20, rtol=1e-5)
    assert np.isinf(s.update_ratio["b"])  # zero parameter, nonzero update
    huge = {"w": jnp.full(4, 1e5), "b": jnp.full(4, 0.5)}
    assert bool(jaxnan.grad_stats(huge, params).exploding["w"])


def test_grad_stats_bad_input():
    with pytest.raises(ValueError, match="updates without params"):
        jaxnan.grad_stats({"w": jnp.ones(2)}, updates={"w": jnp.ones(2)})
    with pytest.raises(ValueError, match="positive relative thresholds"):
        jaxnan.grad_stats({"w": jnp.ones(2)}, vanishing=0.0)
    with pytest.raises(ValueError, match="different tree"):
        jaxnan.grad_stats({"w": jnp.ones(2)}, {"v": jnp.ones(2)})
    with pytest.raises(ValueError, match="params=None"):
        jaxnan.param_stats(None)


def test_grad_stats_names_a_leaf_whose_shape_differs_from_params():
    grads = {"b": jnp.ones(2), "w": jnp.ones((3, 2))}
    params = {"b": jnp.ones(2), "w": jnp.ones((2, 3))}
    with pytest.raises(
        ValueError, match=r"params\['w'\] has shape \(2, 3\).*grads\['w'\].*\(3, 2\)"
    ):
        jaxnan.grad_stats(grads, params)
    with pytest.raises(ValueError, match=r"updates\['b'\] has shape \(3,\)"):
        jaxnan.grad_stats(grads, grads, {"b": jnp.ones(3), "w": jnp.ones((3, 2))})
