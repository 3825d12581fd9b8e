"""A skipped step never hangs in the inner optimizer (galore's SVD of +-Inf).

LAPACK's gesdd, which `jnp.linalg.svd` calls on the CPU, never returns on
some matrices mixing +-Inf with finite entries (Reference-LAPACK
lapack#1409, numpy/numpy#32591): ``optax.contrib.galore``'s step on such a
gradient hangs. The guards evaluate the inner optimizer on the step they
skip, so they hung too. Each hang check runs in a subprocess with a timeout,
so that a hang fails this test instead of stalling the suite.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnan
from jaxnan._src.transforms import hazards

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The gradient of the 3x4 leaf: normal entries, +Inf first (gesdd never
# returns on it; found by scanning the positions).
_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np, optax
    import jaxnan

    def grads(kind):
        x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
        if kind == "inf":
            x.reshape(-1)[0] = np.inf
        return {"w": jnp.asarray(x), "b": jnp.ones(4)}

    params = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(3, 4)),
                                jnp.float32), "b": jnp.zeros(4)}
    out = {}
    make = {"galore": lambda: optax.contrib.galore(1e-2),
            "scale_by_galore": lambda: optax.contrib.scale_by_galore()}
    for name, build in make.items():
        for exact in (False, True):
            tx = jaxnan.skip_nonfinite(build(), exact=exact)
            s0 = tx.init(params)
            step = jax.jit(lambda g, s, p: tx.update(g, s, p))
            u, s1 = step(grads("inf"), s0, params)
            same = [np.asarray(a).tobytes() == np.asarray(b).tobytes()
                    for a, b in zip(jax.tree_util.tree_leaves(s0.inner_state),
                                    jax.tree_util.tree_leaves(s1.inner_state))]
            out[f"{name}-exact={exact}"] = {
                "skipped": int(s1.nonfinite_total),
                "updates": sorted({str(v) for v in
                                   np.concatenate([np.asarray(x).ravel() for x in
                                                   jax.tree_util.tree_leaves(u)])}),
                "state_kept": all(same),
                "signbit": bool(all(np.signbit(np.asarray(x)).all()
                                    for x in jax.tree_util.tree_leaves(u))),
            }

    tx = jaxnan.skip_nonfinite(optax.contrib.galore(1e-2))

    def train_step(params, opt_state, batch):
        def loss_fn(p):
            return jnp.sum(batch["x"] * p["w"]) + jnp.sum(p["b"] ** 2)
        loss, g = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(g, opt_state, params, loss=loss)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jaxnan.guard(train_step, verbose=False)
    p, s = params, tx.init(params)
    for kind in ("healthy", "inf", "healthy"):
        p, s, _ = step(p, s, {"x": grads(kind)["w"]})
    out["guard"] = {"steps": step.summary()["steps"],
                    "skipped": step.summary()["skipped"],
                    "finite": bool(jnp.isfinite(p["w"]).all())}
    print(json.dumps(out))
    """
)


def test_galore_skip_of_an_inf_gradient_returns():
    """Default and exact variant, galore and scale_by_galore, and the guard."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _SCRIPT],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("a skipped galore step with a +Inf gradient entry hung")
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for name in ("galore", "scale_by_galore"):
        for exact in (False, True):
            case = out[f"{name}-exact={exact}"]
            assert case == {
                "skipped": 1,
                "updates": ["-0.0"],
                "state_kept": True,
                "signbit": True,
            }, (name, exact)
    assert out["guard"] == {"steps": 3, "skipped": 1, "finite": True}


def _galore_case():
    params = {
        "w": jnp.asarray(np.random.default_rng(1).normal(size=(3, 4)), jnp.float32),
        "b": jnp.zeros(4),
    }
    g = {
        "w": jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), jnp.float32),
        "b": jnp.ones(4),
    }
    return params, g


def test_galore_healthy_steps_are_the_unguarded_ones_bit_for_bit():
    params, g = _galore_case()
    opt = optax.contrib.galore(1e-2)
    tx = jaxnan.skip_nonfinite(opt)

    @jax.jit
    def guarded(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    @jax.jit
    def plain(p, s, g):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    p_run, s_run, p_ref, s_ref = params, tx.init(params), params, opt.init(params)
    for i in range(3):
        gi = jax.tree_util.tree_map(lambda x, k=i + 1: x * k, g)
        p_run, s_run = guarded(p_run, s_run, gi)
        p_ref, s_ref = plain(p_ref, s_ref, gi)
    bits = [np.asarray(x).tobytes() for x in jax.tree_util.tree_leaves(p_run)]
    assert bits == [np.asarray(x).tobytes() for x in jax.tree_util.tree_leaves(p_ref)]
    assert [
        np.asarray(x).tobytes() for x in jax.tree_util.tree_leaves(s_run.inner_state)
    ] == [np.asarray(x).tobytes() for x in jax.tree_util.tree_leaves(s_ref)]
    assert int(s_run.nonfinite_total) == 0


def _jaxpr_of(tx, params, g):
    return jax.make_jaxpr(lambda: tx.update(g, tx.init(params), params))().jaxpr


def test_hang_risk_is_found_in_galore_and_not_in_adam():
    params, g = _galore_case()
    assert hazards.hangs_on_nonfinite(
        _jaxpr_of(optax.contrib.galore(1e-2), params, g)
    ) == ("svd",)
    assert hazards.hangs_on_nonfinite(_jaxpr_of(optax.adam(1e-2), params, g)) == ()
    # Inside a jit and a cond branch too.
    nested = jax.make_jaxpr(
        lambda x: jax.lax.cond(
            x[0, 0] > 0, lambda y: jax.jit(jnp.linalg.svd)(y)[1], lambda y: y[:, 0], x
        )
    )(g["w"]).jaxpr
    assert hazards.hangs_on_nonfinite(nested) == ("svd",)


def test_sanitized_inputs_zero_only_the_nonfinite_entries():
    x = jnp.array([1.5, jnp.inf, -jnp.inf, jnp.nan, -0.0], jnp.float32)
    c = jnp.array([1 + 2j, complex(jnp.inf, 0), complex(0, jnp.nan)], jnp.complex64)
    out = hazards.finite_or_zero({"x": x, "c": c, "i": jnp.arange(2)})
    np.testing.assert_array_equal(
        np.asarray(out["x"]).view(np.uint32),
        np.array([1.5, 0.0, 0.0, 0.0, -0.0], np.float32).view(np.uint32),
    )
    np.testing.assert_array_equal(out["c"], np.array([1 + 2j, 0, 0], np.complex64))
    assert out["i"].dtype == jnp.arange(2).dtype
