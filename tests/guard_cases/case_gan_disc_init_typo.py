"""A stain-augmentation GAN's discriminator (Flax linen) whose weights are
initialised with ``normal(0.2)`` where the original code had 0.02: the
training crashes with inf within the first steps.

Reported: https://github.com/sophiajw/HistAuGAN/pull/4 (sophiajw/HistAuGAN#4):
"Because model weights are initialised with relatively big numbers, training
is crashing due to NaN error (+- inf). Seems like a typo, 0.2 should be
changed to the original 0.02."

The discriminator scores real patches with a hand-written logistic loss,
``log(1 + exp(-logit))``; at ten times the intended scale its logits reach
the hundreds, and `exp` overflows float32 in the forward pass from the first
step on. Located alone that is an `overflow` (subtract the max
before exp); with no growth before it and a weight matrix 4.5 times the scale
of a standard init, the fix that helps is the initialization.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxnan

EXPECT = {
    "cause": "overflow",
    "phase": "forward",
    "steps": (0, 10),
    "fix": ("initialize at 1/sqrt(fan_in)",),
    "evidence": "of a LeCun init",
    "persistent": True,
}

init = nn.initializers.normal(0.2)  # the original code: 0.02


class Discriminator(nn.Module):
    @nn.compact
    def __call__(self, x):
        for width in (256, 256, 256, 256):
            x = nn.leaky_relu(nn.Dense(width, kernel_init=init)(x), 0.2)
        return nn.Dense(1, kernel_init=init)(x)[..., 0]


disc = Discriminator()
tx = jaxnan.skip_nonfinite(optax.adam(2e-4, b1=0.5, b2=0.999))


def train_step(params, opt_state, real, fake):
    def loss_fn(params):
        d_real, d_fake = disc.apply(params, real), disc.apply(params, fake)
        loss_real = jnp.log(1.0 + jnp.exp(-d_real))  # -log(sigmoid(d_real))
        loss_fake = jnp.log(1.0 + jnp.exp(d_fake))
        return jnp.mean(loss_real + loss_fake)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
    return optax.apply_updates(params, updates), opt_state, loss


def run(guard=jaxnan.guard, log=None, steps=10):
    rng = np.random.default_rng(11)
    params = jax.jit(disc.init)(jax.random.key(11), jnp.zeros((1, 256)))
    opt_state = tx.init(params)
    step = guard(train_step, max_streak=3, verbose=False, log=log)
    try:
        for _ in range(steps):
            real = rng.uniform(-1, 1, (16, 256)).astype(
                np.float32
            )  # patches in [-1, 1]
            fake = np.tanh(rng.normal(size=(16, 256))).astype(np.float32)
            params, opt_state, loss = step(params, opt_state, real, fake)
        step.finish()
    except jaxnan.NonFiniteError:
        pass
    return step
