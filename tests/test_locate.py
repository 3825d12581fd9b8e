"""Tests of jaxnan.locate and Diagnosis: lines, phases, inputs, report text."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnan
from tests import helpers


def marker(tag):
    """The number of the line of this file ending with ``# <- tag``."""
    return helpers.tagged_line(__file__, tag)


def xent(params, batch):
    logits = batch["x"] @ params["w"]
    probs = jnp.exp(logits) / jnp.sum(jnp.exp(logits), -1, keepdims=True)
    return -jnp.mean(jnp.log(probs[:, 0]))  # <- log


def norm_loss(params, batch):
    return jnp.sum(jnp.sqrt(jnp.sum(params["w"] ** 2, 0)))  # <- sqrt


PARAMS = {"w": jnp.array([[-200.0, 1.0], [0.0, 0.0]])}
BATCH = {"x": jnp.array([[1.0, 0.0], [0.0, 0.0]])}


@pytest.fixture(scope="module")
def log_diag():
    return jaxnan.locate(jax.value_and_grad(xent))(PARAMS, BATCH)


def test_forward_event_names_primitive_line_and_cause(log_diag):
    d = log_diag
    assert d.found and d.primitive == "log" and d.phase == "forward"
    assert d.file == __file__ and d.line == marker("log")
    assert d.function == "xent"
    assert d.code == "return -jnp.mean(jnp.log(probs[:, 0]))  # <- log"
    assert d.cause == "unsafe_op" and "log" in d.fix
    assert d.inputs_seen.startswith("log received 0.0")
    assert d.dtype == "float32" and d.shapes == {"inputs": [(2,)], "outputs": [(2,)]}
    assert d.nonfinite_inputs == {}
    assert d.nonfinite_outputs["output[0]"] == (0, 1, 0)
    assert d.created == (0, 0, 1) and d.iteration is None and d.device is None


def test_str_and_to_dict(log_diag):
    text = str(log_diag)
    line = marker("log")
    assert text.startswith("jaxnan: `log` created the first nonfinite value (1 -inf)")
    assert f"test_locate.py:{line} (`jnp.log`)" in text
    for part in (
        "phase:   forward",
        "cause:   unsafe_op",
        "inputs:  log received 0.0",
        "nonfinite outputs:",
        "output[0]: 1 +inf",
        "in xent: return",
    ):
        assert part in text, part
    d = log_diag.to_dict()
    assert d["primitive"] == "log" and d["line"] == line and d["phase"] == "forward"
    assert d["nonfinite_outputs"]["output[0]"] == [0, 1, 0]
    assert d["shapes"] == {"inputs": [[2]], "outputs": [[2]]}
    import json

    json.dumps(d)  # plain values only


def test_backward_event_points_at_forward_line():
    params = {"w": jnp.array([[1.0, 0.0], [2.0, 0.0]])}
    d = jaxnan.locate(jax.value_and_grad(norm_loss))(params, BATCH)
    line = marker("sqrt")
    assert (d.primitive, d.phase, d.line) == ("div", "backward", line)
    assert d.user_function == "jnp.sqrt" and d.cause == "unsafe_op"
    assert f"gradient of `jnp.sqrt` at test_locate.py:{line}" in str(d)
    assert d.nonfinite_outputs == {"output[1]['w']": (2, 0, 0)}


def test_all_finite():
    d = jaxnan.locate(jax.value_and_grad(xent))({"w": jnp.eye(2)}, BATCH)
    assert not d.found and d.primitive is None and d.phase is None
    assert d.nonfinite_outputs == {} and d.nonfinite_inputs == {}
    assert str(d) == (
        "jaxnan: all finite: no NaN or Inf in the arguments, the intermediate "
        "values or the outputs of `xent`."
    )
    assert d.to_dict()["found"] is False


def test_input_phase_paths_and_causes():
    batch = {"x": jnp.array([[1.0, jnp.nan], [jnp.inf, -jnp.inf]])}
    d = jaxnan.locate(xent)({"w": jnp.eye(2)}, batch)
    assert d.found and d.phase == "input" and d.primitive is None
    assert d.nonfinite_inputs == {"batch['x']": (1, 1, 1)}
    assert d.cause == "input_data"
    assert "batch['x']: 1 nan, 1 +inf, 1 -inf" in str(d)
    p = {"w": jnp.array([[jnp.nan, 0.0], [0.0, 1.0]])}
    d = jaxnan.locate(xent)(p, BATCH)
    assert d.nonfinite_inputs == {"params['w']": (1, 0, 0)}
    assert d.cause == "poisoned_state"


def test_kwargs_and_static_argnums():
    def f(x, n, *, scale):
        return jnp.log(x * scale) * n  # <- kw

    d = jaxnan.locate(f, static_argnums=1)(jnp.ones(2), 3, scale=jnp.zeros(()))
    assert (d.primitive, d.line) == ("log", marker("kw"))
    d = jaxnan.locate(f, static_argnums=(1,))(jnp.ones(2), 3, scale=jnp.array(np.nan))
    assert d.nonfinite_inputs == {"scale": (1, 0, 0)}


def test_update_phase_in_train_step():
    tx = optax.sgd(1e38)

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(xent)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss  # <- step

    params = {"w": jnp.eye(2)}
    batch = {"x": jnp.array([[10.0, 0.0], [0.0, 10.0]])}  # gradients up to 5
    d = jaxnan.locate(step)(params, tx.init(params), batch)
    assert d.found and d.phase == "update", str(d)
    assert d.primitive == "mul" and d.cause == "update"
    assert set(d.nonfinite_outputs) == {"output[0]['w']"}


def test_inf_minus_inf_counts_as_creation():
    def attn(s, m):
        return jax.nn.softmax(jnp.where(m, s, -jnp.inf), axis=-1)  # <- masked

    m = jnp.array([[True, False], [False, False]])
    d = jaxnan.locate(attn)(jnp.ones((2, 2)), m)
    assert (d.primitive, d.line, d.phase) == ("sub", marker("masked"), "forward")
    assert d.user_function == "jax.nn.softmax"


@pytest.mark.parametrize(
    "dtype,x,cause", [("float16", 12.0, "precision"), ("bfloat16", 100.0, "overflow")]
)
def test_low_precision(dtype, x, cause):
    d = jaxnan.locate(lambda x: jnp.exp(x))(jnp.array([1.0, x], dtype))  # <- lowp
    assert (d.primitive, d.dtype, d.line) == ("exp", dtype, marker("lowp"))
    assert d.cause == cause


def test_float64():
    if not hasattr(jax, "enable_x64"):
        pytest.skip("jax.enable_x64 is not available")
    with jax.enable_x64(True):
        x = jnp.array([1.0, 0.0], jnp.float64)
        d = jaxnan.locate(lambda x: jnp.log(x))(x)  # <- f64
    assert (d.primitive, d.dtype, d.line) == ("log", "float64", marker("f64"))


def test_integers_pass_unchecked():
    def f(x, k):
        return jnp.log(x) + (k // 0)  # integer division by zero is not a NaN

    d = jaxnan.locate(f)(jnp.ones(2), jnp.arange(2))
    assert not d.found


def test_errors():
    with pytest.raises(
        TypeError, match=re.escape("jaxnan.locate(fn) needs a callable")
    ):
        jaxnan.locate(3)
    with pytest.raises(TypeError, match=re.escape("static_argnums='a'")):
        jaxnan.locate(xent, static_argnums="a")
