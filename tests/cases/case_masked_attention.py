"""Self-attention over a padded batch: a sequence that is all padding has a
fully masked score row; with a -inf fill, softmax computes -inf - (-inf) = NaN."""

import jax
import jax.numpy as jnp

EXPECT = {
    "primitive": "sub",
    "phase": "forward",
    "cause": "unsafe_op",
    "seen": "sub received -inf - -inf at 20 of 32 positions",
}


def attention(params, x, mask):
    q = x @ params["wq"]
    k = x @ params["wk"]
    v = x @ params["wv"]
    scores = q @ jnp.swapaxes(k, -1, -2) / jnp.sqrt(q.shape[-1])
    pair_mask = mask[:, :, None] & mask[:, None, :]
    scores = jnp.where(pair_mask, scores, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1)  # <- creates
    return weights @ v


def loss(params, batch):
    out = attention(params, batch["x"], batch["mask"])
    return jnp.mean((out - batch["y"]) ** 2)


def make():
    ks = jax.random.split(jax.random.key(1), 4)
    d = 8
    params = {
        n: jax.random.normal(k, (d, d)) / d**0.5 for n, k in zip("q k v".split(), ks)
    }
    params = {"w" + n: w for n, w in params.items()}
    x = jax.random.normal(ks[3], (2, 4, d))
    mask = jnp.array([[True, True, True, False], [False, False, False, False]])
    batch = {"x": x, "mask": mask, "y": jnp.zeros((2, 4, d))}
    return jax.value_and_grad(loss), (params, batch)
