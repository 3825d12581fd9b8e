"""Fine-tuning a small denoiser in half precision with Adam: "after just the
first iteration I was running into nan values", though the gradients and the
inputs were all normal.

Reported: https://github.com/afiaka87/glide-finetune/issues/5
(afiaka87/glide-finetune#5): "my gradients and input values/images were all
normal but the adam optimizer ... has some weird behavior on float16
precision where it produces nans probably because of a divide by 0 error";
fixed in afiaka87/glide-finetune#6 by "setting the eps variable to 1e-4
instead of the default 1e-8".

A Flax NNX model with ``param_dtype=jnp.float16`` and
``nnx.Optimizer(model, jaxnan.skip_nonfinite(optax.adam(1e-4)), wrt=nnx.Param)``.
The gradients are small (a fine-tune near convergence), so ``(1 - b2) * g**2``
underflows float16 and the first update divides by 0. The fix that helped the
reporter, a float16-sized eps, is what the guard must say.
"""

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxnan

EXPECT = {
    "cause": "update",
    "phase": "update",
    "steps": (0, 0),
    "fix": ("eps=1e-4 for float16",),
    "evidence": "the update divides in float16",
    "persistent": True,
}


class Denoiser(nnx.Module):
    def __init__(self, rngs):
        kw = dict(param_dtype=jnp.float16, dtype=jnp.float16, rngs=rngs)
        self.up = nnx.Linear(16, 32, **kw)
        self.down = nnx.Linear(32, 16, **kw)

    def __call__(self, x):
        return self.down(nnx.gelu(self.up(x)))


def train_step(model, optimizer, noisy, noise):
    def loss_fn(model):
        pred = model(noisy).astype(jnp.float32)
        return jnp.mean((pred - noise) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads, loss=loss)
    return loss


def run(guard=jaxnan.guard, log=None, steps=6):
    rng = np.random.default_rng(7)
    model = Denoiser(nnx.Rngs(7))
    optimizer = nnx.Optimizer(
        model, jaxnan.skip_nonfinite(optax.adam(1e-4)), wrt=nnx.Param
    )
    step = guard(train_step, max_streak=3, verbose=False, log=log)
    try:
        for _ in range(steps):
            clean = rng.normal(0, 0.02, (16, 16)).astype(np.float32)
            noise = rng.normal(0, 0.02, (16, 16)).astype(np.float32)
            step(model, optimizer, (clean + noise).astype(np.float16), noise)
        step.finish()
    except jaxnan.NonFiniteError:
        pass
    return step
