"""Tests of jaxnan.locate and Diagnosis: lines, phases, inputs, report text."""

import os
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


HERE = os.path.relpath(__file__)  # as messages print it: the suite runs from the root
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
    assert f"gradient of `jnp.sqrt` at {HERE}:{line}" in str(d)
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


# -- locate v2: conventions from real reports -------------------------------


def test_nan_created_in_a_while_condition_is_found():
    def newton(x):
        def cond(c):
            i, y = c
            return (i < 5) & (jnp.log(y - 2.0) < 10.0)  # <- while-cond

        def body(c):
            i, y = c
            return i + 1, y * 0.5

        return jax.lax.while_loop(cond, body, (0, x))[1]

    d = jaxnan.locate(newton)(jnp.float32(8.0))
    assert d.found and d.primitive == "log" and d.line == marker("while-cond")
    assert d.iteration == (2,)  # 8 -> 4 -> 2: log(0) before the body's step 2
    assert d.nonfinite_outputs == {}  # the loop stopped: outputs finite


def test_minus_inf_bias_argument_is_not_the_event():
    def attend(scores, bias):
        w = jax.nn.softmax(scores + bias, axis=-1)  # <- bias-softmax
        return jnp.sum(w)

    bias = jnp.array([[0.0, -jnp.inf], [-jnp.inf, -jnp.inf]])
    d = jaxnan.locate(attend)(jnp.ones((2, 2)), bias)
    assert (d.phase, d.cause, d.primitive) == ("forward", "unsafe_op", "sub")
    assert d.line == marker("bias-softmax")
    assert d.nonfinite_inputs == {"bias": (0, 0, 3)}
    # a NaN argument still is the root, reported with its element and consumer
    nan_bias = bias.at[0, 0].set(jnp.nan)
    d = jaxnan.locate(attend)(jnp.ones((2, 2)), nan_bias)
    assert (d.phase, d.cause) == ("input", "input_data")
    assert d.input_elements["bias"][0] == (0, 0)
    used = d.consumed_by["bias"]
    assert (used["primitive"], used["line"]) == ("add", marker("bias-softmax"))
    assert "bias: 1 nan, 3 -inf at (0, 0), (0, 1), (1, 0), ..." in str(d)


def test_nan_in_params_is_poisoned_state_with_element():
    def loss(params, x):
        return jnp.sum(x @ params["w"])  # <- poisoned

    params = {"w": jnp.ones((3, 2)).at[2, 1].set(jnp.nan)}
    d = jaxnan.locate(loss)(params, jnp.ones((4, 3)))
    assert (d.phase, d.cause) == ("input", "poisoned_state")
    assert d.input_elements == {"params['w']": [(2, 1)]}
    assert d.consumed_by["params['w']"]["line"] == marker("poisoned")


def test_inf_then_nan_names_both():
    def loss(x):
        e = jnp.exp(x)  # <- exp-inf
        return jnp.sum(e * 0.0 + (x - x))  # <- then-nan

    d = jaxnan.locate(loss)(jnp.array([1.0, 100.0]))
    assert (d.primitive, d.line, d.created) == ("exp", marker("exp-inf"), (0, 1, 0))
    assert d.nan_event["primitive"] == "mul"
    assert d.nan_event["line"] == marker("then-nan")
    assert f"then:    `mul` made the first NaN at {HERE}:" in str(d)


def test_event_in_the_cone_of_the_loss_not_a_residual_beside_it():
    def loss(p, x):
        # value_and_grad computes log(x) for d/dp x**p beside the loss
        return jnp.sum(x**p) + jnp.sum(jnp.log(x[1:] - 1.0))  # <- cone

    d = jaxnan.locate(jax.value_and_grad(loss))(jnp.float32(2.0), jnp.array([0.0, 1.0]))
    assert (d.primitive, d.phase) == ("log", "forward")
    assert d.inputs_seen == "log received 0.0 at 1 of 1 position"


def test_phase_is_what_the_user_observes_for_a_custom_vjp():
    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)

    def f_fwd(x):
        return jnp.sin(x), jnp.cos(x)

    def f_bwd(c, g):
        return (g / (c - c),)

    f.defvjp(f_fwd, f_bwd)
    # jax traces the bwd function where the custom_vjp is called
    d = jaxnan.locate(jax.value_and_grad(lambda x: f(x).sum()))(jnp.ones(2))  # <- bwd
    assert (d.primitive, d.phase, d.line) == ("div", "backward", marker("bwd"))


def test_compiled_and_replay_disagree_is_said():
    # A primitive whose compiled lowering is finite while its locate rule (the
    # replay) is not: the report must say which program it describes.
    from jax.extend.core import Primitive
    from jax.interpreters import mlir

    twice_p = Primitive("jaxnan_test_twice")
    twice_p.def_abstract_eval(lambda x: x)
    mlir.register_lowering(
        twice_p, mlir.lower_fun(lambda x: x * 2.0, multiple_results=False)
    )

    @jaxnan.register_rule(twice_p)
    def _twice_rule(ctx, x):
        return ctx, jnp.log(x - x)

    def loss(x):
        return jnp.sum(twice_p.bind(x))  # <- twice

    d = jaxnan.locate(loss)(jnp.ones(3))
    assert (d.primitive, d.line) == ("jaxnan_test_twice", marker("twice"))
    assert d.nonfinite_outputs == {"output": (0, 0, 1)}
    assert d.compiled_outputs == {}
    assert (
        "program: this replay follows JAX semantics equation by equation; the "
        "compiled function gave different outputs (all finite)"
    ) in str(d)
    assert d.to_dict()["compiled_outputs"] == {}
    assert (
        jaxnan.locate(loss, check_compiled=False)(jnp.ones(3)).compiled_outputs is None
    )
    # where both agree (here XLA's select rewrite of x * mask applies to both)
    x, mask = jnp.ones(4).at[1].set(jnp.nan), jnp.ones(4, bool).at[1].set(False)
    d = jaxnan.locate(lambda x, m: jnp.sum(x * m.astype(x.dtype)))(x, mask)
    assert d.compiled_outputs is None and "program:" not in str(d)


def test_clear_errors_for_strings_and_transforms():
    def say(x):
        return "nan"

    with pytest.raises(TypeError, match=r"say`\): the function returned a str"):
        jaxnan.locate(say)(jnp.ones(2))
    with pytest.raises(TypeError, match="cannot itself be transformed by jax.vmap"):
        jax.vmap(jaxnan.locate(jnp.log))(jnp.ones((2, 3)))
    with pytest.raises(TypeError, match="history="):
        jaxnan.locate(jnp.log, history=[1.0, 2.0])


def test_report_reads_well():
    def model(params, x):
        h = x @ params["w"]
        return jnp.sum(jnp.sqrt(h))  # <- read-well

    d = jaxnan.locate(jax.grad(model))({"w": jnp.zeros((2, 2))}, jnp.ones((3, 2)))
    text = str(d)
    assert f"{HERE}:{marker('read-well')}" in text  # relative to the cwd
    assert d.where == f"{__file__}:{marker('read-well')}"  # the record: full path
    assert "jvp(" not in text and "transpose(" not in text
    assert d.signature == "(f32[], f32[3,2]) -> f32[3,2]"
    assert d.to_dict()["phase"] == "backward" and d.to_dict()["cause"] == "unsafe_op"


def test_check_compiled_reuses_the_users_jit_and_keeps_donated_buffers(caplog):
    def loss(w, x):
        return jnp.sum(jnp.log(x * w))  # <- jitted

    step = jax.jit(jax.value_and_grad(loss))
    w, x = jnp.ones(3), jnp.arange(3.0)
    step(w, x)  # the training step ran: jax holds its compiled program
    caplog.set_level("DEBUG")
    with jax.log_compiles():
        d = jaxnan.locate(step)(w, x)
    assert (d.primitive, d.line, d.compiled_outputs) == ("log", marker("jitted"), None)
    compiled = [r.getMessage() for r in caplog.records if "ompil" in r.getMessage()]
    assert compiled and not [m for m in compiled if "flat_fn" in m], compiled
    # a step donating its arguments is compiled afresh: the user's buffers live
    donating = jax.jit(jax.value_and_grad(loss), donate_argnums=0)
    w = jnp.ones(3)
    d = jaxnan.locate(donating)(w, x)
    assert d.primitive == "log" and d.compiled_outputs is None
    assert not w.is_deleted()
    np.testing.assert_array_equal(w, np.ones(3))


class _Model:
    """A callable object, as a Flax NNX or Equinox module is."""

    def __init__(self):
        self.w = jnp.ones(3)

    def __call__(self, x):
        return jnp.log(x * self.w)  # <- model log


def test_a_module_called_directly_is_named_by_its_class():
    d = jaxnan.locate(_Model())(-jnp.ones(3))
    assert (d.primitive, d.line, d.fn_name) == ("log", marker("model log"), "_Model")
    assert "forward pass of `_Model`." in str(d)
