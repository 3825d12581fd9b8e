"""A vanilla tanh RNN for utterance regression, trained on a loader that sorts
utterances by length (short ones first, as speech recipes do in their first
epoch): the loss stays small, but every batch is longer than the last, and
after some hundred iterations the loss goes nan.

Reported: https://github.com/Marcovaldong/lstmp.pytorch/issues/2
(Marcovaldong/lstmp.pytorch#2): "Loss function goes to nan after n number of
iterations - might be problem of exploding gradient? ... after a given number
of iterations (let's say 1200 iterations) we start having a "nan" loss";
answered "To train on long sequences, just clip the gradients to a max norm of
1.0."

The recurrent weights start with gain 4 (chaotic): the forward pass is bounded
by tanh, but the backward pass multiplies by the recurrent Jacobian once per
time step, so the gradient norm grows geometrically with the batch's length
(1e2 to 1e18 in twenty steps) until Adam's squared gradient overflows in the
update. Located alone that is an `update` overflow; the cause is exploding
gradients (the gradient norm grew while the loss did not), and the fix clips
them and shortens the unroll.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxnan

EXPECT = {
    "cause": "exploding_gradient",
    "phase": "update",
    "steps": (5, 60),
    "fix": ("clip_by_global_norm", "truncated"),
    "evidence": "gradient norm grew",
    "persistent": True,
}

H, T_MAX = 16, 320
tx = jaxnan.skip_nonfinite(optax.adam(1e-4))


def rnn_loss(params, frames, lengths, targets):
    def cell(h, inputs):
        x_t, t = inputs
        new = jnp.tanh(h @ params["W"] + x_t[:, None] * params["U"])
        return jnp.where((t < lengths)[:, None], new, h), None

    h0 = jnp.zeros((frames.shape[0], H))
    h, _ = jax.lax.scan(cell, h0, (frames.T, jnp.arange(T_MAX)))
    return jnp.mean(((h @ params["V"])[:, 0] - targets) ** 2)


def train_step(params, opt_state, frames, lengths, targets):
    loss, grads = jax.value_and_grad(rnn_loss)(params, frames, lengths, targets)
    updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
    return optax.apply_updates(params, updates), opt_state, loss


def run(guard=jaxnan.guard, log=None, steps=40):
    rng = np.random.default_rng(9)
    k = jax.random.split(jax.random.key(9), 3)
    params = {
        "W": jax.random.normal(k[0], (H, H)) * 4.0 / np.sqrt(H),
        "U": jax.random.normal(k[1], (1, H)),
        "V": jax.random.normal(k[2], (H, 1)) * 0.1,
    }
    opt_state = tx.init(params)
    step = guard(train_step, max_streak=2, verbose=False, log=log)
    try:
        for i in range(steps):
            length = min(T_MAX, 12 + 12 * i)  # sorted by length
            frames = rng.normal(size=(8, T_MAX)).astype(np.float32)
            lengths = np.full(8, length, np.int32)
            targets = rng.normal(0, 0.3, 8).astype(np.float32)
            params, opt_state, loss = step(params, opt_state, frames, lengths, targets)
        step.finish()
    except jaxnan.NonFiniteError:
        pass
    return step
