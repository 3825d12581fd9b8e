import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnan


def loss_fn(params, batch):
    h = jnp.tanh(batch["x"] @ params["dense"]["kernel"] + params["dense"]["bias"])
    return jnp.mean(jnp.log(h**2))


PARAMS = {"dense": {"kernel": jnp.ones((3, 2)) * 0.1, "bias": jnp.ones(2) * 0.1}}
GOOD = {"x": jnp.ones((4, 3))}


@pytest.mark.default_compiler
def test_healthy_loss_report_ok_and_output_unchanged():
    report, value = jax.jit(jaxnan.check(loss_fn))(PARAMS, GOOD)
    assert bool(report.ok)
    assert value == jax.jit(loss_fn)(PARAMS, GOOD)
    report.throw()  # nothing raised
    assert report.message() is None
    assert report.input_paths == (
        "params['dense']['bias']",
        "params['dense']['kernel']",
        "batch['x']",
    )


def test_created_inside_names_output_leaves():
    batch = {"x": jnp.zeros((4, 3))}
    params = {"dense": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}
    report, (value, grads) = jax.jit(jaxnan.check(jax.value_and_grad(loss_fn)))(
        params, batch
    )
    assert not bool(report.ok) and bool(report.inputs_ok)
    assert report.nonfinite_inputs() == {}
    outs = report.nonfinite_outputs()
    assert outs["output[0]"] == (0, 0, 1)
    assert set(outs) >= {"output[1]['dense']['bias']"}
    with pytest.raises(jaxnan.NonFiniteError, match=re.escape("created inside")) as e:
        report.throw()
    msg = str(e.value)
    assert msg.startswith("jaxnan: ")
    assert "output[0]: 1 -inf" in msg
    assert "jaxnan.locate(loss_fn)" in msg
    assert e.value.details["outputs"] == outs


def test_input_leaf_named_by_argument_and_path():
    batch = {"x": jnp.ones((4, 3)).at[1, 2].set(jnp.nan).at[0, 0].set(jnp.inf)}
    report, _ = jaxnan.check(loss_fn)(PARAMS, batch)
    assert report.nonfinite_inputs() == {"batch['x']": (1, 1, 0)}
    with pytest.raises(jaxnan.NonFiniteError) as e:
        report.throw()
    msg = str(e.value)
    assert "came in with the inputs of `loss_fn`" in msg
    assert "batch['x']: 1 nan, 1 +inf" in msg
    assert "output: " in msg  # reached the output


def test_kwargs_and_extra_positional_names():
    def f(a, *rest, scale):
        return a * scale + sum(rest)

    report, _ = jaxnan.check(f)(jnp.ones(2), jnp.ones(2), scale=jnp.array(jnp.nan))
    assert report.nonfinite_inputs() == {"scale": (1, 0, 0)}
    assert report.input_paths == ("a", "args[1]", "scale")


def test_throw_inside_jit_is_clear():
    def step(x):
        report, out = jaxnan.check(jnp.log)(x)
        report.throw()
        return out

    with pytest.raises(TypeError, match=re.escape("call report.throw() outside it")):
        jax.jit(step)(jnp.ones(2))


def test_vmap_report_sums_over_batch():
    xs = jnp.ones((5, 3)).at[2, 0].set(0.0).at[4, 1].set(0.0)
    report, out = jax.vmap(jaxnan.check(jnp.log))(xs)
    assert report.output_counts.shape == (5, 1, 3)
    np.testing.assert_array_equal(report.output_counts[:, 0, 2], [0, 0, 1, 0, 1])
    assert report.nonfinite_outputs() == {"output": (0, 0, 2)}


def test_scan_carries_reports():
    def body(c, x):
        report, y = jaxnan.check(lambda c, x: c * x)(c, x)
        return y, report

    xs = jnp.array([1.0, 2.0, jnp.inf, 1.0])
    _, reports = jax.lax.scan(body, jnp.float32(1.0), xs)
    np.testing.assert_array_equal(reports.ok, [True, True, False, False])
    np.testing.assert_array_equal(reports.inputs_ok, [True, True, False, False])


def test_whole_train_step_and_no_host_transfer():
    tx = optax.adam(1e-2)
    state = tx.init(PARAMS)

    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(jaxnan.check(train_step))
    report, _ = step(PARAMS, state, GOOD)
    with jax.transfer_guard("disallow"):
        report, (params, state2, loss) = step(PARAMS, state, GOOD)
    assert bool(report.ok)
    assert any(p.startswith("opt_state") for p in report.input_paths)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, PARAMS)
    bad, _ = step(zeros, tx.init(zeros), {"x": jnp.zeros((4, 3))})
    assert "output[2]" in bad.nonfinite_outputs()


def test_check_rejects_non_callable():
    with pytest.raises(TypeError, match=re.escape("jaxnan.check(fn) needs a callable")):
        jaxnan.check(None)
