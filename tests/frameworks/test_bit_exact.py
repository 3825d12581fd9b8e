"""`checked` keeps every healthy step bit for bit, on two frameworks.

A Flax NNX CNN (BatchNorm, Dropout) and Equinox's MNIST CNN, each trained with
adamw in one jitted step, as their tutorials write it: the parameters and the
optimizer state after every one of 20 steps are, bit for bit, those of the
same loop without `jaxnan.checked`. The step compiles under XLA's defaults
(`default_compiler`), where what `checked` adds to the program decides how
XLA fuses the gradients into adamw and, on CPU, which product of
``b1 * mu + (1 - b1) * g`` it contracts into a fused multiply-add. Two ways
of adding the check that XLA fused differently, and that these runs caught
(1 ulp in a moment at the second step): an elementwise tie of the report's
token into a small gradient, and a check reading a bias gradient whose last
reshape XLA then no longer moved into the update
(`jaxnan/_src/checks/device.py`, `check` and `tie`).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnan
from tests.frameworks import test_equinox_cnn as eqx_cnn
from tests.frameworks import test_nnx_mnist as nnx_cnn

eqx = pytest.importorskip("equinox")
nnx = pytest.importorskip("flax.nnx")

STEPS = 20


def bits(tree):
    """The leaves of `tree` as raw bits (so -0.0 and +0.0 differ)."""
    out = []
    for x in jax.tree_util.tree_leaves(tree):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        x = np.asarray(x)
        out.append(x.view(f"u{x.dtype.itemsize}") if x.dtype.kind in "fc" else x)
    return out


def assert_steps_equal(plain, checked):
    assert len(plain) == len(checked) == STEPS
    for step, (a, b) in enumerate(zip(plain, checked)):
        assert len(a) == len(b)
        for i, (x, y) in enumerate(zip(a, b)):
            assert np.array_equal(x, y), f"step {step}, state leaf {i}"


def nnx_states(check):
    model = nnx_cnn.CNN(rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(5e-3, 0.9), wrt=nnx.Param)
    loss = nnx_cnn.loss_fn
    if check:
        loss = jaxnan.checked(loss, on_nonfinite="warn")
    step = nnx_cnn.make_step(loss, guarded=False)
    states = []
    for batch in nnx_cnn.batches(STEPS):
        value = step(model, optimizer, batch)
        states.append(bits((nnx.state(model), nnx.state(optimizer), value)))
    return states


def eqx_states(check):
    model = eqx_cnn.compilers.cheap_init(
        eqx_cnn.CNN, jax.random.key(5678), jit=eqx.filter_jit
    )
    optim = optax.adamw(3e-4)
    opt_state = optim.init(eqx.filter(model, eqx.is_array))
    loss = jaxnan.checked(eqx_cnn.loss, on_nonfinite="warn") if check else eqx_cnn.loss
    make_step = eqx_cnn.example_step(optim, loss)

    states = []
    for x, y in eqx_cnn.batches(STEPS):
        model, opt_state, value = make_step(model, opt_state, x, y)
        states.append(bits((eqx.filter(model, eqx.is_array), opt_state, value)))
    return states


@pytest.mark.default_compiler
@pytest.mark.parametrize("states", [nnx_states, eqx_states], ids=["nnx", "equinox"])
def test_checked_keeps_every_step_bit_for_bit(states):
    plain = states(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no report either
        checked = states(True)
    assert_steps_equal(plain, checked)
