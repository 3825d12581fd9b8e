"""Square-root (Hellinger) text features sqrt(counts * idf) with a learned idf
weighting: words absent from a document have count 0, sqrt(0) = 0 is fine,
but its derivative 0.5/sqrt(0) is inf (and inf * 0 = NaN in the idf grad)."""

import jax
import jax.numpy as jnp

EXPECT = {
    "primitive": "div",
    "phase": "backward",
    "cause": "unsafe_op",
    "seen": "div received a zero denominator: x/0 (e.g. 0.5/0) at 3 of 8 positions",
}


def features(params, counts):
    return jnp.sqrt(counts * params["idf"])  # <- creates


def loss(params, batch):
    f = features(params, batch["counts"])
    logits = f @ params["head"]
    return jnp.mean(jax.nn.softplus(-batch["label"] * logits))


def make():
    params = {
        "idf": jnp.array([1.0, 2.0, 0.5, 3.0]),
        "head": jnp.array([0.3, -0.2, 0.1, 0.4]),
    }
    counts = jnp.array([[2.0, 0.0, 1.0, 3.0], [0.0, 1.0, 4.0, 0.0]])
    batch = {"counts": counts, "label": jnp.array([1.0, -1.0])}
    return jax.value_and_grad(loss), (params, batch)
