"""A binary segmentation head (Flax NNX) with a hand-written single-class
cross-entropy on sigmoid probabilities: after some training the model is
certain about a few pixels, their probability rounds to exactly 1.0 (or 0.0),
and the loss of the batch where it is wrong is nan.

Reported: https://github.com/HealthML/active-segmentation/pull/78
(HealthML/active-segmentation#78): "This avoids that the single-class
cross-entropy loss becomes `nan` when a probability of zero is predicted for
the correct class (in this case the cross-entropy loss would be `- log(0)`
without smoothing)."

The batch at step 12 holds a mislabelled pixel the model scores with a logit
above 17, where float32's sigmoid is 1.0: ``log(1 - p)`` is log(0). Transient
(the next batches are fine); the cause is the unsafe log, not the learning
rate, and the fix keeps its argument above 0 (or uses
`optax.sigmoid_binary_cross_entropy` on the logits).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxnan

EXPECT = {
    "cause": "unsafe_op",
    "phase": "forward",
    "steps": (12, 12),
    "fix": ("Keep the argument of log above 0.0",),
    "evidence": "log received 0.0",
    "persistent": False,
}


class SegHead(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.out = nnx.Conv(8, 1, (1, 1), rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.conv(x)))[..., 0]


def train_step(model, optimizer, images, masks):
    def loss_fn(model):
        p = jax.nn.sigmoid(model(images))
        ce = -(masks * jnp.log(p) + (1 - masks) * jnp.log(1 - p))
        return ce.mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads, loss=loss)
    return loss


def run(guard=jaxnan.guard, log=None, steps=25):
    rng = np.random.default_rng(14)
    model = SegHead(nnx.Rngs(14))
    optimizer = nnx.Optimizer(
        model, jaxnan.skip_nonfinite(optax.adam(1e-3)), wrt=nnx.Param
    )
    step = guard(train_step, max_streak=3, verbose=False, log=log)
    try:
        for i in range(steps):
            images = rng.uniform(0, 1, (2, 8, 8, 3)).astype(np.float32)
            masks = (images[..., 0] > 0.5).astype(np.float32)
            if i == 12:  # a mislabelled, very bright pixel
                images[0, 4, 4] = 60.0
                masks[0, 4, 4] = 0.0
            step(model, optimizer, images, masks)
        step.finish()
    except jaxnan.NonFiniteError:
        pass
    return step
