"""A hand-written BatchNorm1d (Flax NNX, trained with nnx.Optimizer) that
normalizes with the unbiased batch variance, as in the makemore lectures: the
last batch of an epoch holds a single example, var(ddof=1) divides by
n - 1 = 0 and the loss is NaN (0/0).

Reported: https://github.com/karpathy/makemore/issues/22 ("Batchnorm with
single batch fails": the variance is nan for a batch of one), also
https://github.com/pytorch/pytorch/issues/1381.
"""

import jax.numpy as jnp
import optax
from flax import nnx

EXPECT = {
    "primitive": "div",
    "phase": "forward",
    "cause": "unsafe_op",
    "seen": "div received a zero denominator: 0/0 at 32 of 32 positions",
}


class BatchNorm1d(nnx.Module):
    def __init__(self, dim, eps=1e-5, momentum=0.1):
        self.eps = eps
        self.momentum = momentum
        self.gamma = nnx.Param(jnp.ones(dim))
        self.beta = nnx.Param(jnp.zeros(dim))
        self.running_mean = nnx.BatchStat(jnp.zeros(dim))
        self.running_var = nnx.BatchStat(jnp.ones(dim))

    def __call__(self, x):
        xmean = x.mean(0, keepdims=True)
        xvar = x.var(0, ddof=1, keepdims=True)  # <- creates
        xhat = (x - xmean) / jnp.sqrt(xvar + self.eps)
        m = self.momentum
        self.running_mean[...] = (1 - m) * self.running_mean[...] + m * xmean[0]
        self.running_var[...] = (1 - m) * self.running_var[...] + m * xvar[0]
        return self.gamma * xhat + self.beta


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.linear1 = nnx.Linear(30, 32, use_bias=False, rngs=rngs)
        self.bn = BatchNorm1d(32)
        self.linear2 = nnx.Linear(32, 27, rngs=rngs)

    def __call__(self, x):
        return self.linear2(jnp.tanh(self.bn(self.linear1(x))))


def loss_fn(model, x, y):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make():
    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    def train_step(state, x, y):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
        optimizer.update(model, grads)
        return loss, nnx.state((model, optimizer))

    x = jnp.linspace(-1.0, 1.0, 30)[None, :]  # the last batch: one example
    y = jnp.array([3])
    return train_step, (state, x, y)
