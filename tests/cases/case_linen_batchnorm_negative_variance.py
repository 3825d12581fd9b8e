"""A Flax linen CNN whose BatchNorm computes the variance as
E[x**2] - E[x]**2 (as flax.linen.BatchNorm did in 2021), trained with a
TrainState on a batch of large constant synthetic images: every output of a
channel is the same number, so the true variance is 0, but the two rounded
means differ by more than epsilon and rsqrt receives a negative variance.

Reported: https://github.com/google/flax/issues/1491 ("Variance can be
negative in BatchNorm computation, leading to NaN's").
"""

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax.training import train_state
from jax import lax

EXPECT = {
    "primitive": "rsqrt",
    "phase": "forward",
    "cause": "unsafe_op",
    "seen": "rsqrt received negative values",
}


class BatchNorm(nn.Module):
    epsilon: float = 1e-5
    momentum: float = 0.99

    @nn.compact
    def __call__(self, x):
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, x.shape[-1:])
        ra_var = self.variable("batch_stats", "var", jnp.ones, x.shape[-1:])
        mean = jnp.mean(x, axis=(0, 1, 2))
        mean2 = jnp.mean(lax.square(x), axis=(0, 1, 2))
        var = mean2 - lax.square(mean)
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        y = x - mean
        mul = lax.rsqrt(var + self.epsilon)  # <- creates
        scale = self.param("scale", nn.initializers.ones, x.shape[-1:])
        bias = self.param("bias", nn.initializers.zeros, x.shape[-1:])
        return y * (mul * scale) + bias


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(features=8, kernel_size=(3, 3), padding="VALID")(x)
        x = nn.relu(BatchNorm()(x))
        x = x.mean(axis=(1, 2))
        return nn.Dense(features=10)(x)


def make():
    model = CNN()
    images = jnp.full((4, 12, 12, 3), 255.0)  # saturated synthetic images
    labels = jnp.arange(4)
    variables = model.init(jax.random.key(0), images)
    state = train_state.TrainState.create(
        apply_fn=model.apply, params=variables["params"], tx=optax.sgd(0.1)
    )

    def train_step(state, batch_stats, images, labels):
        def loss_fn(params):
            logits, updates = state.apply_fn(
                {"params": params, "batch_stats": batch_stats},
                images,
                mutable=["batch_stats"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            return loss.mean(), updates["batch_stats"]

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, batch_stats), grads = grad_fn(state.params)
        return state.apply_gradients(grads=grads), batch_stats, loss

    return train_step, (state, variables["batch_stats"], images, labels)
