"""Precision as a cause: narrow dtypes told apart from unsafe ops, with the fix.

`jaxnan.locate` re-evaluates the step with its float16, bfloat16 and float8
values computed in float32: when it stays finite the dtype lost the value
(``precision``), and the fix names the dtype change or the loss scale. The
steps are written as optax, Equinox (with a ``jmp`` policy and loss scale)
and Flax NNX write them; each test checks the cause, the line (this file's)
and the whole fix sentence. ``xlogy``/``xlog1py`` gradients are put down to
the log op, with its fix.
"""

import pathlib
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.scipy.special import xlog1py, xlogy

import jaxnan
from jaxnan._src.core import frames, libraries
from tests import helpers

HERE = __file__
FAKES = str(pathlib.Path(__file__).parent / "fakes")


def line(tag):
    return helpers.tagged_line(HERE, tag)


@pytest.fixture
def jmp():
    """The `tests/fakes/jmp` stand-in, importable as ``jmp`` (a library)."""
    sys.path.insert(0, FAKES)
    libraries.library_dirs.cache_clear()
    frames.is_user_file.cache_clear()
    import jmp

    yield jmp
    sys.path.remove(FAKES)
    sys.modules.pop("jmp", None)
    libraries.library_dirs.cache_clear()
    frames.is_user_file.cache_clear()


def test_float16_matmul_overflow_is_precision_with_the_dtype_change():
    def loss_fn(params, batch):
        x = batch["x"].astype(jnp.float16)
        h = x @ params["w"].astype(jnp.float16)  # <- f16 matmul
        return jnp.mean(jnp.square(h.astype(jnp.float32) - batch["y"]))

    params = {"w": jnp.full((64, 4), 30.0)}
    batch = {"x": jnp.full((2, 64), 40.0), "y": jnp.zeros((2, 4))}
    d = jaxnan.locate(jax.value_and_grad(loss_fn))(params, batch)
    assert (d.primitive, d.phase, d.cause) == ("dot_general", "forward", "precision")
    assert d.line == line("f16 matmul") and d.file == HERE
    assert d.fix == (
        "`jnp.dot` overflows float16 (max 65504.0) where float32 does not: compute "
        "it in bfloat16, which has float32's range, or in float32 "
        "(x.astype(jnp.float32) before it, preferred_element_type=jnp.float32 for "
        "a matmul), then cast back."
    )
    assert d.inputs_seen.endswith(
        "; the same step is finite in float32 (float16 is too narrow here)"
    )


def test_jmp_loss_scale_cast_in_the_backward_pass_gets_the_forward_line(jmp):
    policy = jmp.get_policy("params=float32,compute=float16,output=float32")
    loss_scale = jmp.StaticLossScale(2.0**20)  # too high: 65504 is float16's max
    model = eqx.nn.MLP(8, 4, 16, 2, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)

    def loss_fn(params, x, y):
        model = policy.cast_to_compute(eqx.combine(params, static))
        logits = jax.vmap(model)(policy.cast_to_compute(x))
        logits = policy.cast_to_output(logits)  # <- output cast
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss_scale.scale(loss)

    x = jax.random.normal(jax.random.key(1), (4, 8))
    y = jnp.array([0, 1, 2, 3])
    d = jaxnan.locate(jax.grad(loss_fn))(params, x, y)
    assert (d.primitive, d.phase, d.cause) == (
        "convert_element_type",
        "backward",
        "precision",
    )
    assert (d.line, d.dtype, d.user_function) == (
        line("output cast"),
        "float16",
        "jmp.cast_to_output",
    )
    assert d.fix == (
        "The cotangent cast back to float16 by the backward of this line's cast "
        "exceeds float16's range (max 65504.0) where float32 holds it: lower the "
        "loss scale (a dynamic loss scale halves it on overflow: "
        "jaxnan.dynamic_loss_scale, jmp.DynamicLossScale), or keep this value in "
        "float32 (cast the logits to float32 before the loss)."
    )
    assert d.inputs_seen.endswith(
        "the backward of this line's cast casts the cotangent to float16"
    )
    # The same step with a scale float16 can hold is finite.
    loss_scale.loss_scale = jnp.float32(2.0**10)
    assert not jaxnan.locate(jax.grad(loss_fn))(params, x, y).found


def test_bfloat16_variance_rounded_to_zero_is_precision():
    def layer_norm(x):
        x = x.astype(jnp.bfloat16)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        return (x - mean) / jnp.sqrt(var)  # <- bf16 norm

    def loss_fn(params, x):
        return jnp.mean(layer_norm(x @ params["w"]).astype(jnp.float32))

    params = {"w": jnp.eye(8)}
    x = 1000.0 + 0.01 * jnp.arange(16.0).reshape(2, 8)  # bf16: all 1000.0
    d = jaxnan.locate(jax.value_and_grad(loss_fn))(params, x)
    assert (d.primitive, d.phase, d.cause) == ("div", "forward", "precision")
    assert d.line == line("bf16 norm")
    assert d.fix == (
        "bfloat16 keeps 8 significant bits: the input lost its value to rounding "
        "(a variance or a difference of large values becomes 0): compute `/` and "
        "what feeds it in float32 (x.astype(jnp.float32)), then cast the result "
        "back to bfloat16."
    )


def test_float16_epsilon_that_rounds_to_zero_names_the_constant():
    def loss_fn(w, x):
        h = (x @ w).astype(jnp.float16)
        z = (h - h.mean()) / (h.std() + 1e-8)  # <- f16 eps
        return jnp.mean(z.astype(jnp.float32))

    d = jaxnan.locate(jax.value_and_grad(loss_fn))(jnp.ones((4, 4)), jnp.ones((3, 4)))
    assert (d.primitive, d.phase, d.cause) == ("div", "forward", "precision")
    assert d.line == line("f16 eps")
    assert d.fix == (
        "float16 cannot hold the constant (1e-08 is 0.0 in float16): use an "
        "epsilon it holds (eps >= 1e-5 for float16), or compute this line in "
        "float32 (x.astype(jnp.float32)) and cast the result back."
    )


def test_float16_log_of_a_true_zero_stays_unsafe_op():
    def loss_fn(w, x):
        return jnp.sum(jnp.log(x.astype(jnp.float16) * w.astype(jnp.float16)))

    d = jaxnan.locate(loss_fn)(jnp.ones(3), jnp.array([1.0, 0.0, 2.0]))
    assert (d.primitive, d.cause) == ("log", "unsafe_op")


class Fp8MLP(nnx.Module):
    """An MLP whose hidden matmul runs in float8_e4m3fn (no per-tensor scale)."""

    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(4, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.fc1(x))
        q = h.astype(jnp.float8_e4m3fn)  # <- fp8 cast
        w = self.fc2.kernel[...].astype(jnp.float8_e4m3fn)
        return jnp.dot(q, w, preferred_element_type=jnp.float32) + self.fc2.bias


def test_nnx_float8_overflow_under_the_guard_is_precision():
    model = Fp8MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(
        model, jaxnan.skip_nonfinite(optax.sgd(1e-3)), wrt=nnx.Param
    )

    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads, loss=loss)
        return loss

    step = jaxnan.guard(train_step, verbose=False)
    rng = np.random.default_rng(0)
    y = np.zeros(8, np.int32)
    for k in range(3):
        x = rng.normal(size=(8, 4)).astype(np.float32)
        step(model, optimizer, x * (1e4 if k == 1 else 1.0), y)
    step.finish()
    (incident,) = step.incidents
    assert (incident.step, incident.cause, incident.primitive) == (
        1,
        "precision",
        "convert_element_type",
    )
    assert incident.where == f"{HERE}:{line('fp8 cast')}"
    assert incident.diagnosis.fix == (
        "float8_e4m3fn holds at most 448.0 and has no inf (an overflow is NaN): "
        "scale the tensor into range before the cast (x / s with s = max|x| / "
        "448.0, per-tensor current or delayed scaling) and multiply the result by "
        "s, or use float8_e5m2 (max 57344) for gradients."
    )


XLOGY_FIX = (
    "xlogy(x, y) is 0 where x = 0, but its gradient is not finite where y = 0: "
    "keep y away from 0 (jnp.clip(y, 1e-7) or y + eps), or where y may be 0 "
    "select it away inside and outside: "
    "jnp.where(y > 0, xlogy(x, jnp.where(y > 0, y, 1.0)), 0.0)."
)


def test_xlogy_entropy_of_a_masked_policy_is_blamed_on_xlogy():
    def entropy(logits, mask):
        p = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf))
        return -jnp.sum(xlogy(p, p))  # <- entropy

    mask = jnp.array([True, True, False, True])
    d = jaxnan.locate(jax.value_and_grad(entropy))(jnp.ones(4), mask)
    assert (d.phase, d.cause, d.user_function) == (
        "backward",
        "unsafe_op",
        "jax.scipy.special.xlogy",
    )
    assert d.line == line("entropy") and d.fix == XLOGY_FIX
    assert "gradient of `jax.scipy.special.xlogy`" in str(d)


def test_xlogy_and_xlog1py_divisions_are_blamed_on_the_log_op():
    def kl(q, t):
        return jnp.sum(xlogy(t, t) - xlogy(t, q))  # <- kl

    t = jnp.array([0.0, 0.5, 0.5])
    d = jaxnan.locate(jax.grad(kl))(jnp.array([0.0, 0.5, 0.5]), t)
    assert (d.primitive, d.phase, d.cause) == ("div", "backward", "unsafe_op")
    assert (d.line, d.fix) == (line("kl"), XLOGY_FIX)

    def log_lik(y, x):
        return jnp.sum(xlog1py(x, y))  # <- xlog1py

    d = jaxnan.locate(jax.grad(log_lik))(jnp.array([-1.0, 0.5]), jnp.zeros(2))
    assert (d.primitive, d.user_function) == ("div", "jax.scipy.special.xlog1py")
    assert d.line == line("xlog1py")
    assert d.fix == (
        "xlog1py(x, y) is 0 where x = 0, but its gradient is not finite where "
        "y = -1: keep y away from -1 (jnp.clip(y, -1 + 1e-7) or y + eps), or where "
        "y may be -1 select it away inside and outside: "
        "jnp.where(y > -1, xlog1py(x, jnp.where(y > -1, y, 1.0)), 0.0)."
    )


def test_a_float16_cast_that_overflows_names_bfloat16():
    def loss_fn(w, x):
        h = (x @ w).astype(jnp.float16)  # <- f16 cast
        return jnp.mean(jnp.tanh(h).astype(jnp.float32))

    x = 100.0 * jax.random.uniform(jax.random.key(0), (2, 4), minval=1.0, maxval=2.0)
    d = jaxnan.locate(jax.value_and_grad(loss_fn))(jnp.full((4, 4), 300.0), x)
    assert (d.primitive, d.phase, d.cause) == (
        "convert_element_type",
        "forward",
        "precision",
    )
    assert d.line == line("f16 cast")
    assert d.fix == (
        "The values exceed float16's range (max 65504.0) as they are cast to "
        "float16: cast to bfloat16 instead, which has float32's range, or keep "
        "them in float32 (or scale them down before the cast)."
    )
