"""Flax NNX training with `jaxnan.guard`, written as the NNX MNIST tutorial is.

A CNN with BatchNorm and Dropout on synthetic 28x28 images; batch `bad_step`
holds a NaN pixel in image 5. The guard leaves every Variable the step
writes (BatchNorm statistics, the Dropout RNG counter, the optimizer step)
as it was on the bad step, bit for bit, and names `batch['image']`, row 5.

Run: python examples/guard_nnx.py
"""

from __future__ import annotations

from functools import partial

import numpy as np
import optax
from flax import nnx

import jaxnan


class CNN(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 8, kernel_size=(3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.linear = nnx.Linear(7 * 7 * 8, 10, rngs=rngs)
        self.avg_pool = partial(nnx.avg_pool, window_shape=(4, 4), strides=(4, 4))

    def __call__(self, x):
        x = self.avg_pool(nnx.relu(self.bn(self.conv1(x))))
        x = self.dropout(x.reshape(x.shape[0], -1))
        return self.linear(x)


def loss_fn(model, batch):
    logits = model(batch["image"])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits=logits, labels=batch["label"]
    ).mean()


@nnx.jit
def train_step(model, optimizer, batch):
    loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
    optimizer.update(model, grads, loss=loss)
    return loss


def main(steps: int = 30, bad_step: int = 10, batch_size: int = 16) -> dict:
    rng = np.random.default_rng(0)
    model = CNN(rngs=nnx.Rngs(0, dropout=1))
    tx = jaxnan.skip_nonfinite(optax.adamw(1e-3, 0.9))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    step = jaxnan.guard(train_step)  # the one added line
    for i in range(steps):
        image = rng.normal(size=(batch_size, 28, 28, 1)).astype(np.float32)
        if i == bad_step:
            image[5, 14, 14, 0] = np.nan
        batch = {"image": image, "label": rng.integers(0, 10, batch_size)}
        step(model, optimizer, batch)
    return {"summary": step.summary(), "incidents": step.incidents, "model": model}


if __name__ == "__main__":
    print(main()["summary"])
