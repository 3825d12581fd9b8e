"""Unit tests of the cause taxonomy on creation events built from real jaxprs."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnan._src.core import primitives
from jaxnan._src.core.primitives import Domain
from jaxnan._src.locate import causes, precision
from jaxnan._src.locate.cause_rules import classify
from jaxnan._src.locate.causes import CAUSES, Cause, Event, Phase, classify_inputs


def eqn_of(fn, *args, primitive):
    """The first equation named `primitive` in the jaxpr of fn(*args)."""
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    stack = [jaxpr]
    while stack:
        for eqn in stack.pop(0).eqns:
            if eqn.primitive.name == primitive:
                return eqn
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                stack.append(sub)
    raise AssertionError(f"no {primitive} in {jaxpr}")


def event(fn, *args, primitive, inputs, phase="forward", user_function=None):
    """An Event for the `primitive` equation of fn, re-run on concrete inputs."""
    eqn = eqn_of(fn, *args, primitive=primitive)
    inputs = [np.asarray(a) for a in inputs]
    with np.errstate(all="ignore"):
        out = eqn.primitive.bind(*[jnp.asarray(a) for a in inputs], **eqn.params)
    outs = out if eqn.primitive.multiple_results else [out]
    outputs = [np.asarray(o) for o in outs]
    return Event(eqn, primitive, phase, inputs, outputs, user_function)


def test_taxonomy_is_the_registry():
    assert CAUSES == tuple(Cause)
    assert [str(c) for c in Cause] == [
        "input_data",
        "poisoned_state",
        "unsafe_op",
        "overflow",
        "exploding_gradient",
        "update",
        "precision",
        "learning_rate",
        "nondeterministic",
        "growth",
        "underflow",
        "injected",
    ]
    # One vocabulary: the guard's incidents speak the same enum.
    from jaxnan._src.guard import incidents

    assert incidents.Cause is Cause
    assert Cause.GROWTH == "growth" and Cause.NONDETERMINISTIC == "nondeterministic"
    assert [str(p) for p in Phase] == ["input", "forward", "backward", "update"]
    for cause in Cause:  # each fix is whole sentences, ending with a period
        assert cause.fix[0].isupper() and cause.fix.endswith("."), cause
        assert len(cause.fix) > 40 and "  " not in cause.fix, cause
        assert Cause(cause.value) is cause and cause == cause.value
    assert Cause.PRECISION.fix == (
        "Compute this step in float32 where it lost the value (the "
        "normalization, the mask, the reduction: x.astype(jnp.float32), "
        "preferred_element_type=jnp.float32), use constants that float16 can "
        "hold (eps >= 1e-5, a mask of jnp.finfo(dtype).min), or a loss scale."
    )
    # one rule per domain of primitives (primitives.DOMAINS), registered
    # beside its definition: every domain but the angle has one
    assert set(causes.RULES) == set(Domain) - {Domain.ANGLE}
    for name in ("log", "log1p", "sqrt", "rsqrt", "div", "pow", "exp", "mul"):
        assert causes.rule_for(name) is causes.RULES[primitives.domain_of(name)]
    assert causes.rule_for("tanh") is None


def test_log_of_zero_counts_positions():
    x = np.ones(4096, np.float32)
    x[[5, 77, 4000]] = 0.0
    ev = event(jnp.log, jnp.ones(4096), primitive="log", inputs=[x])
    cause, fix, seen = classify(ev)
    assert cause == "unsafe_op"
    assert seen == "log received 0.0 at 3 of 4096 positions"
    assert "jax.nn.log_softmax" in fix


def test_log_of_negative_and_log1p_of_minus_one():
    x = np.array([1.0, -2.5, 3.0], np.float32)
    _, _, seen = classify(event(jnp.log, x, primitive="log", inputs=[x]))
    assert seen == "log received values below 0.0 (min -2.5) at 1 of 3 positions"
    y = np.array([-1.0, 0.5], np.float32)
    cause, _, seen = classify(event(jnp.log1p, y, primitive="log1p", inputs=[y]))
    assert (cause, seen) == ("unsafe_op", "log1p received -1.0 at 1 of 2 positions")


def test_div_says_zero_over_zero_or_x_over_zero():
    num = np.array([0.0, 2.0, 1.0, 0.0], np.float32)
    den = np.array([0.0, 0.0, 4.0, 0.0], np.float32)
    ev = event(jnp.divide, num, den, primitive="div", inputs=[num, den])
    cause, fix, seen = classify(ev)
    assert cause == "unsafe_op"
    assert seen == (
        "div received a zero denominator: 0/0 at 2 of 4 positions, "
        "x/0 (e.g. 2.0/0) at 1 of 4 positions"
    )
    assert "jnp.maximum(d, eps)" in fix


def test_div_in_backward_is_the_derivative_at_zero():
    # the jvp of sqrt computes 0.5 / sqrt(x): a literal numerator and a zero
    fn = jax.grad(lambda x: jnp.sqrt(x).sum())
    x = np.zeros(3, np.float32)
    eqn = eqn_of(fn, x, primitive="div")
    ev = Event(
        eqn, "div", "backward", [np.float32(0.5), x], [np.full(3, np.inf)], "jnp.sqrt"
    )
    cause, fix, seen = classify(ev)
    assert cause == "unsafe_op"
    assert seen == (
        "div received a zero denominator: x/0 (e.g. 0.5/0) at 3 of 3 positions "
        "(gradient of jnp.sqrt: its derivative divides by 0 there)"
    )
    assert "double-where" in fix and "optax.safe_norm" in fix


def test_atan2_backward_zero_over_zero():
    fn = jax.grad(lambda x, y: jnp.arctan2(y, x).sum())
    z = np.zeros(2, np.float32)
    eqn = eqn_of(fn, z, z, primitive="div")
    ev = Event(eqn, "div", "backward", [z, z], [np.full(2, np.nan)], "jnp.arctan2")
    cause, _, seen = classify(ev)
    assert cause == "unsafe_op"
    assert seen.startswith("div received a zero denominator: 0/0 at 2 of 2 positions")
    assert "gradient of jnp.arctan2" in seen


def test_sqrt_of_negative_and_rsqrt_at_zero():
    x = np.array([4.0, -1.0, -9.0], np.float32)
    cause, fix, seen = classify(event(jnp.sqrt, x, primitive="sqrt", inputs=[x]))
    assert cause == "unsafe_op"
    assert seen == "sqrt received negative values (min -9.0) at 2 of 3 positions"
    z = np.array([0.0, 1.0], np.float32)
    cause, fix, seen = classify(event(jax.lax.rsqrt, z, primitive="rsqrt", inputs=[z]))
    assert (cause, seen) == ("unsafe_op", "rsqrt received 0.0 at 1 of 2 positions")
    assert "1e-5" in fix


def test_rsqrt_in_backward_of_arccos_at_one():
    fn = jax.grad(lambda x: jnp.arccos(x).sum())
    x = np.ones(2, np.float32)
    eqn = eqn_of(fn, x, primitive="rsqrt")
    zero = np.zeros(2, np.float32)
    ev = Event(eqn, "rsqrt", "backward", [zero], [np.full(2, np.inf)], "jnp.arccos")
    cause, fix, seen = classify(ev)
    assert cause == "unsafe_op"
    assert seen.startswith(
        "rsqrt received 0.0 at 2 of 2 positions (gradient of jnp.arccos"
    )
    assert "jnp.clip(x, -1 + 1e-6, 1 - 1e-6)" in fix
    ev.user_function = "lax.rsqrt"
    assert "double-where" in classify(ev)[1]


def test_pow_negative_base_and_zero_base_in_backward():
    x = np.array([-2.0, 3.0], np.float32)
    y = np.float32(1.5)
    ev = event(jnp.power, x, y, primitive="pow", inputs=[x, y])
    cause, fix, seen = classify(ev)
    assert cause == "unsafe_op"
    assert seen == (
        "pow received a negative base (min -2.0) with a fractional exponent (1.5) "
        "at 1 of 2 positions"
    )
    assert "jax.nn.relu(x) ** p" in fix
    z = np.zeros(2, np.float32)
    ev = event(
        jnp.power,
        z,
        np.float32(-0.5),
        primitive="pow",
        inputs=[z, np.float32(-0.5)],
        phase="backward",
        user_function="x ** 0.5",
    )
    cause, fix, seen = classify(ev)
    assert cause == "unsafe_op"
    assert seen == (
        "pow received 0.0 with a negative exponent (-0.5) at 2 of 2 positions "
        "(gradient of x ** 0.5 at 0)"
    )


def test_integer_pow_negative_exponent_at_zero():
    x = np.array([0.0, 2.0], np.float32)
    ev = event(lambda v: v**-2, x, primitive="integer_pow", inputs=[x])
    cause, _, seen = classify(ev)
    assert (cause, seen) == (
        "unsafe_op",
        "integer_pow received 0.0 with exponent -2 at 1 of 2 positions",
    )


@pytest.mark.parametrize(
    ("fn", "prim", "x", "seen"),
    [
        (
            jnp.arccos,
            "acos",
            [0.5, 1.25],
            "acos received values outside [-1, 1] (max |x| 1.25) at 1 of 2 positions",
        ),
        (
            jnp.arcsin,
            "asin",
            [-1.5, 0.0],
            "asin received values outside [-1, 1] (max |x| 1.5) at 1 of 2 positions",
        ),
        (jnp.arctanh, "atanh", [1.0, 0.5], "atanh received +/-1.0 at 1 of 2 positions"),
    ],
)
def test_inverse_trig_outside_domain(fn, prim, x, seen):
    x = np.array(x, np.float32)
    cause, fix, got = classify(event(fn, x, primitive=prim, inputs=[x]))
    assert (cause, got) == ("unsafe_op", seen)
    assert "jnp.clip" in fix


@pytest.mark.parametrize(
    ("fn", "prim"),
    [(jax.scipy.special.gammaln, "lgamma"), (jax.scipy.special.digamma, "digamma")],
)
def test_poles(fn, prim):
    x = np.array([0.0, 2.5, -3.0], np.float32)
    cause, fix, seen = classify(event(fn, x, primitive=prim, inputs=[x]))
    assert cause == "unsafe_op"
    assert seen == (
        f"{prim} received a pole (non-positive integer, e.g. 0.0) at 2 of 3 positions"
    )
    assert "softplus" in fix


def test_cholesky_not_positive_definite():
    k = np.array([[1.0, 2.0], [2.0, 1.0]], np.float32)  # eigenvalues 3, -1
    ev = event(jnp.linalg.cholesky, k, primitive="cholesky", inputs=[k])
    cause, fix, seen = classify(ev)
    assert cause == "unsafe_op"
    assert seen == (
        "cholesky received a 2x2 matrix that is not positive definite "
        "(min eigenvalue -1.0)"
    )
    assert "jitter" in fix


def test_exp_overflow_message_and_phase():
    x = np.array([1.0, 91.3, 3.0], np.float32)
    cause, fix, seen = classify(event(jnp.exp, x, primitive="exp", inputs=[x]))
    assert cause == "overflow"
    assert seen == (
        "exp received max 91.3, overflow above 88.7 for float32 (1 of 3 positions)"
    )
    assert "jax.nn.softmax" in fix
    ev = event(jnp.exp, x, primitive="exp", inputs=[x], phase="backward")
    cause, fix, _ = classify(ev)
    assert cause == "overflow"
    assert fix == (
        "exp overflows in a value the gradient needs: compute the derivative "
        "from a bounded quantity (e.g. s * (1 - s) from the sigmoid s) or clip "
        "the argument of exp below 88.7."
    )


def test_exp_overflow_in_float64_is_not_precision():
    x = np.array([800.0], np.float64)
    with jax.enable_x64(True):
        cause, _, seen = classify(event(jnp.exp, x, primitive="exp", inputs=[x]))
    assert cause == "overflow"
    assert seen == "exp received max 800.0, overflow above 710 for float64"


def test_sum_and_dot_overflow_forward_and_backward():
    big = np.full(4, 2e38, np.float32)
    ev = event(jnp.sum, big, primitive="reduce_sum", inputs=[big])
    cause, fix, seen = classify(ev)
    assert cause == "overflow"
    assert seen == (
        "reduce_sum received max |x| 2e+38 and overflowed float32 (max 3.4e+38) "
        "at 1 of 1 position"
    )
    assert fix == Cause.OVERFLOW.fix
    a = np.full((2, 2), 3e19, np.float32)
    ev = event(jnp.dot, a, a, primitive="dot_general", inputs=[a, a], phase="backward")
    cause, fix, seen = classify(ev)
    assert cause == "exploding_gradient"
    assert "optax.clip_by_global_norm" in fix
    assert seen.startswith("dot_general received max |x| 3e+19 and overflowed float32")


def test_mul_overflow_forward():
    a = np.array([1e20, 1.0], np.float32)
    ev = event(jnp.multiply, a, a, primitive="mul", inputs=[a, a])
    assert classify(ev)[0] == "overflow"


def test_inf_minus_inf_and_zero_times_inf():
    a = np.array([-np.inf, 1.0], np.float32)
    ev = event(jnp.subtract, a, a, primitive="sub", inputs=[a, a])
    cause, fix, seen = classify(ev)
    assert (cause, seen) == (
        "unsafe_op",
        "sub received -inf - -inf at 1 of 2 positions",
    )
    assert "jnp.finfo(x.dtype).min" in fix
    b = np.array([np.inf, -np.inf], np.float32)
    ev = event(jnp.add, b, b[::-1].copy(), primitive="add", inputs=[b, b[::-1].copy()])
    assert classify(ev)[2] == "add received inf + -inf at 2 of 2 positions"
    z = np.array([0.0, 2.0], np.float32)
    i = np.array([np.inf, 1.0], np.float32)
    ev = event(jnp.multiply, z, i, primitive="mul", inputs=[z, i])
    cause, fix, seen = classify(ev)
    assert (cause, seen) == ("unsafe_op", "mul received 0 * inf at 1 of 2 positions")
    assert "jnp.where" in fix


def test_update_phase_is_update_whatever_the_primitive():
    m = np.zeros(3, np.float32)
    ev = event(jnp.divide, m, m, primitive="div", inputs=[m, m], phase="update")
    cause, fix, seen = classify(ev)
    assert cause == "update"
    assert "eps=1e-8" in fix
    assert seen == "div received a zero denominator: 0/0 at 3 of 3 positions"
    big = np.array([3e38], np.float32)
    ev = event(jnp.add, big, big, primitive="add", inputs=[big, big], phase="update")
    cause, fix, seen = classify(ev)
    assert cause == "update" and "lower the learning rate" in fix
    assert seen.startswith("add received max |x| 3e+38 and overflowed float32")
    x = np.array([np.nan], np.float32)
    ev = Event(None, "custom", "update", [x], [x], None)
    assert classify(ev)[:2] == ("update", Cause.UPDATE.fix)


def test_precision_when_the_step_is_finite_in_float32():
    x = np.array([1.0, 12.0], np.float16)
    ev = event(jnp.exp, x, primitive="exp", inputs=[x])
    assert ev.outputs[0].dtype == np.float16 and np.isinf(ev.outputs[0][1])
    assert classify(ev).cause == "overflow"  # no experiment: the rule alone
    ev.finite_in_float32 = True
    cause, fix, seen = classify(ev)
    assert cause == "precision"
    assert fix == (
        "`exp` overflows float16 (max 65504.0) where float32 does not: compute it "
        "in bfloat16, which has float32's range, or in float32 "
        "(x.astype(jnp.float32) before it), then cast back."
    )
    assert seen == (
        "exp received max 12.0, overflow above 11.1 for float16 (1 of 2 positions); "
        "the same step is finite in float32 (float16 is too narrow here)"
    )


def test_precision_names_the_lost_constant():
    z = np.zeros(2, np.float16)
    ev = event(jax.lax.rsqrt, z, primitive="rsqrt", inputs=[z])
    ev.lost_constant = "1e-12 is 0.0 in float16"
    cause, _, seen = classify(ev)
    assert cause == "precision"
    assert seen == (
        "rsqrt received 0.0 at 2 of 2 positions; the constant 1e-12 is 0.0 in float16"
    )


def test_lost_constant_reads_the_line_and_its_defaults(tmp_path):
    src = tmp_path / "model.py"
    src.write_text(
        "def norm(x, eps=1e-12):\n"
        "    return x * jax.lax.rsqrt(x.var() + eps)\n"
        "bias = jnp.full(s, -1e10).astype(dtype)\n"
    )
    f = str(src)
    assert precision.lost_constant(f, 2, "float16", []) == "1e-12 is 0.0 in float16"
    assert precision.lost_constant(f, 2, "float32", []) is None
    assert precision.lost_constant(f, 2, "bfloat16", []) is None  # bf16 holds it
    assert precision.lost_constant(f, 3, "float16", []) == "-1e+10 is -inf in float16"
    const = [np.full(3, -1e9, np.float32)]
    assert precision.lost_constant(None, None, "float16", const) == (
        "-1e+09 is -inf in float16"
    )


def test_precision_experiment_upcasts_the_whole_step():
    def f(x):
        h = x.astype(jnp.float16) * 300.0
        return jnp.sum(h * h)  # 9e4 * 4: inf in float16, finite in float32

    x = jnp.ones(4)
    closed = jax.make_jaxpr(f)(x)
    assert precision.finite_in_float32(closed, closed.consts, [x]) is True
    closed = jax.make_jaxpr(lambda v: jnp.log(v - 1.0))(x)
    assert precision.finite_in_float32(closed, closed.consts, [x]) is None  # f32


def test_history_turns_an_overflow_into_learning_rate():
    big = np.full(4, 2e38, np.float32)
    ev = event(jnp.sum, big, primitive="reduce_sum", inputs=[big])
    ev.history = {
        "loss": [1.0, 50.0, 4e4, 3e9],
        "grad_norm": [1.0, 30.0, 900.0, 3e4],
        "param_norm": [1.0, 12.0, 150.0, 2e3],
    }
    cause, fix, seen = classify(ev)
    assert cause == "learning_rate" and fix == Cause.LEARNING_RATE.fix
    assert seen.endswith(
        "; parameter norm grew 1.0 -> 2000.0 over the last 4 steps (gradient norm "
        "1.0 -> 30000.0, loss 1.0 -> 3e+09)"
    )
    ev.history = {"grad_norm": [1.0, 10.0, 1e3], "param_norm": [1.0, 1.1, 1.2]}
    cause, _, seen = classify(ev)
    assert cause == "exploding_gradient"
    assert seen.endswith(
        "; gradient norm grew 1.0 -> 1000.0 over the last 3 steps while the "
        "parameters stayed bounded"
    )
    ev.history = {"param_norm": [1.0, 1.0, 1.0]}  # flat: the rule stands
    assert classify(ev).cause == "overflow"


def test_log_of_zero_in_float16_is_not_precision():
    x = np.array([0.0, 1.0], np.float16)
    assert classify(event(jnp.log, x, primitive="log", inputs=[x]))[0] == "unsafe_op"


def test_bfloat16_overflow_that_float32_shares_is_overflow():
    x = np.array([100.0], jnp.bfloat16)
    assert classify(event(jnp.exp, x, primitive="exp", inputs=[x]))[0] == "overflow"


def test_unknown_primitive_falls_back_without_raising():
    x = np.array([1.0, 2.0], np.float32)
    ev = Event(None, "mystery", "backward", [x], [np.array([np.nan, 1.0])], None)
    cause, fix, seen = classify(ev)
    assert (cause, fix) == ("unsafe_op", Cause.UNSAFE_OP.fix)
    assert seen == "mystery received float32[2] (min 1.0, max 2.0)"
    broken = Event(None, "log", "forward", [object()], [], None)
    assert classify(broken)[0] in CAUSES


@pytest.mark.parametrize(
    ("paths", "cause"),
    [
        ({"batch['x']": (3, 0, 0)}, "input_data"),
        ({"inputs": (0, 1, 0)}, "input_data"),
        ({"labels[2]": (1, 0, 0)}, "input_data"),
        ({"params['w']": (0, 1, 0)}, "poisoned_state"),
        ({"params['dense']['kernel']": (1, 0, 0)}, "poisoned_state"),
        ({"opt_state[0].mu['w']": (2, 0, 0)}, "poisoned_state"),
        ({"model.layers[0].weight": (1, 0, 0)}, "poisoned_state"),
        ({"batch['x']": (1, 0, 0), "params['w']": (1, 0, 0)}, "poisoned_state"),
    ],
)
def test_classify_inputs(paths, cause):
    got, fix, _ = classify_inputs(paths)
    assert got == cause
    first = next(iter(p for p in paths if (cause == "input_data") or "batch" not in p))
    assert re.search(re.escape(first), fix)


def test_logsumexp_of_all_minus_inf_gets_its_own_fix():
    z = np.zeros(3, np.float32)
    ev = event(
        jnp.log, z, primitive="log", inputs=[z], user_function="jax.ops.logsumexp"
    )
    cause, fix, seen = classify(ev)
    assert (cause, seen) == ("unsafe_op", "log received 0.0 at 3 of 3 positions")
    assert fix.startswith("logsumexp of a row that is all -inf")


def test_bfloat16_sum_overflow_that_float32_shares_is_overflow():
    # bfloat16 has float32's range: a bf16 sum past 3.4e38 is not "precision"
    big = np.full(2, 2e38, jnp.bfloat16)
    ev = event(jnp.sum, big, primitive="reduce_sum", inputs=[big])
    assert classify(ev)[:2] == ("overflow", Cause.OVERFLOW.fix)


def test_rem_by_zero_and_integer_and_bool_inputs():
    x = np.array([1.0, 2.0], np.float32)
    z = np.zeros(2, np.float32)
    ev = event(jnp.fmod, x, z, primitive="rem", inputs=[x, z])
    assert classify(ev)[2] == (
        "rem received a zero denominator: x/0 (e.g. 1.0/0) at 2 of 2 positions"
    )
    pred = np.array([True, False])
    a = np.array([1.0, np.nan], np.float32)
    fn = jax.lax.select_n
    eqn = eqn_of(fn, pred, a, a, primitive="select_n")
    ev = Event(eqn, "select_n", "forward", [pred, a, x], [a], None)
    cause, fix, seen = classify(ev)
    assert (cause, fix) == ("unsafe_op", Cause.UNSAFE_OP.fix)
    assert seen == (
        "select_n received bool[2]; float32[2] (min 1.0, max 1.0, 1 nan); "
        "float32[2] (min 1.0, max 2.0)"
    )
