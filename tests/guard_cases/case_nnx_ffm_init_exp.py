"""A click-through-rate model (logistic regression on dense features, Flax
NNX) whose weights are drawn from normal(2.0): the logit's spread grows
with the square root of the number of features, and some rows overflow `exp`
in the hand-written sigmoid.

Reported: https://github.com/VinceShieh/spark-ffm/issues/12
(VinceShieh/spark-ffm#12): "As weights are initialized as codes line: 70 -
line: 75 ... standard deviation of Z = W * X + b roughly equals to
sqrt(mn/2). Once it is larger than 706 (around), exp(z) becomes NaN. Proper
initialization of weight should make the Gaussian distribution more
narrowed."

512 features and ``kernel_init=nnx.initializers.normal(2.0)``: the logit has a
standard deviation of about 45, and rows past 88 overflow float32's `exp`.
The fix that helps is the reporter's: a narrower initialization.
"""

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxnan

EXPECT = {
    "cause": "overflow",
    "phase": "forward",
    "steps": (0, 20),
    "fix": ("initialize at 1/sqrt(fan_in)",),
    "evidence": "of a LeCun init",
    "persistent": True,
}

N_FEATURES = 512


class CTR(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(
            N_FEATURES, 1, kernel_init=nnx.initializers.normal(2.0), rngs=rngs
        )

    def __call__(self, x):
        z = self.linear(x)[:, 0]
        return 1.0 / (1.0 + jnp.exp(-z))


def train_step(model, optimizer, x, clicked):
    def loss_fn(model):
        p = model(x)
        return -jnp.mean(clicked * jnp.log(p) + (1 - clicked) * jnp.log(1 - p))

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads, loss=loss)
    return loss


def run(guard=jaxnan.guard, log=None, steps=20):
    rng = np.random.default_rng(12)
    model = CTR(nnx.Rngs(12))
    optimizer = nnx.Optimizer(
        model, jaxnan.skip_nonfinite(optax.sgd(1e-3)), wrt=nnx.Param
    )
    step = guard(train_step, max_streak=3, verbose=False, log=log)
    try:
        for _ in range(steps):
            x = rng.normal(size=(64, N_FEATURES)).astype(np.float32)
            clicked = (rng.uniform(size=64) < 0.1).astype(np.float32)
            step(model, optimizer, x, clicked)
        step.finish()
    except jaxnan.NonFiniteError:
        pass
    return step
