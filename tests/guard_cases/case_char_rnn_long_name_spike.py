"""The character-level RNN name classifier of the PyTorch tutorial, ported to
JAX and trained with plain SGD (lr=0.005) on names of 3 to 12 letters; one
batch holds a very long "name" (a line of the file that was not a name), and
its gradient is inf: the loss is fine, every other batch is fine.

Reported: https://github.com/pytorch/pytorch/issues/2623 (pytorch/pytorch#2623):
"I'm trying to modify the character level rnn classification code ... I
initially faced the problem of exploding / vanishing gradient ... I used the
solution given there to clip the gradient in the train() function".

With recurrent weights of gain 4, the backward pass through that one
480-letter sequence multiplies the cotangent by the recurrent Jacobian at
each letter until it overflows float32, inside the scan. The guard skips the
batch and names the example (row 2), the loop iteration, exploding gradients
as the cause, and the fix that would help: a shorter unroll (clipping the
norm afterwards cannot undo an inf).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxnan

EXPECT = {
    "cause": "exploding_gradient",
    "phase": "backward",
    "steps": (15, 15),
    "fix": ("truncated backpropagation through time", "orthogonal"),
    "evidence": "overflowed float32",
    "persistent": False,
}

N_LETTERS, H, N_CLASSES, T_MAX = 26, 24, 4, 480
tx = jaxnan.skip_nonfinite(optax.sgd(0.005))


def rnn(params, letters, lengths):
    def cell(h, inputs):
        x_t, t = inputs
        combined = params["i2h"][x_t] + h @ params["h2h"]
        new = jnp.tanh(combined)
        return jnp.where((t < lengths)[:, None], new, h), None

    h0 = jnp.zeros((letters.shape[0], H))
    h, _ = jax.lax.scan(cell, h0, (letters.T, jnp.arange(T_MAX)))
    return h @ params["h2o"]


def train_step(params, opt_state, letters, lengths, category):
    def loss_fn(params):
        output = jax.nn.log_softmax(rnn(params, letters, lengths))
        return -jnp.mean(jnp.take_along_axis(output, category[:, None], axis=1))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
    return optax.apply_updates(params, updates), opt_state, loss


def run(guard=jaxnan.guard, log=None, steps=40):
    rng = np.random.default_rng(10)
    k = jax.random.split(jax.random.key(10), 3)
    params = {
        "i2h": jax.random.normal(k[0], (N_LETTERS, H)),
        "h2h": jax.random.normal(k[1], (H, H)) * 4.0 / np.sqrt(H),
        "h2o": jax.random.normal(k[2], (H, N_CLASSES)) * 0.1,
    }
    opt_state = tx.init(params)
    step = guard(train_step, max_streak=3, verbose=False, log=log)
    try:
        for i in range(steps):
            letters = rng.integers(0, N_LETTERS, (8, T_MAX)).astype(np.int32)
            lengths = rng.integers(3, 13, 8).astype(np.int32)
            if i == 15:
                lengths[2] = T_MAX  # a line of the file that is not a name
            category = (letters[:, 0] % N_CLASSES).astype(np.int32)
            params, opt_state, loss = step(
                params, opt_state, letters, lengths, category
            )
        step.finish()
    except jaxnan.NonFiniteError:
        pass
    return step
