"""A mixture-density network head (Equinox): a Gaussian mixture over y given x.

The negative log-likelihood is a logsumexp over components of
log pi + log N(y; mu, sigma), with sigma = exp(log_sigma). The planted bug
takes the log of the softmaxed mixture weights.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp

K = 5


class MDN(eqx.Module):
    trunk: eqx.nn.MLP
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.trunk = eqx.nn.MLP(2, 32, 32, 2, activation=jnp.tanh, key=k1)
        self.head = eqx.nn.Linear(32, 3 * K, key=k2)

    def __call__(self, x):
        pi_logits, mu, log_sigma = jnp.split(self.head(self.trunk(x)), 3)
        return pi_logits, mu, log_sigma


def _make(bug):
    model = eqx.filter_eval_shape(MDN, jax.random.key(0))
    params, static = eqx.partition(
        model, lambda x: eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)
    )
    x = jnp.zeros((16, 2))
    y = jnp.zeros((16,))

    def nll(params, x, y):
        pi_logits, mu, log_sigma = jax.vmap(eqx.combine(params, static))(x)
        if bug:
            log_pi = jnp.log(jax.nn.softmax(pi_logits, axis=-1))  # bug: log-softmax
        else:
            log_pi = jax.nn.log_softmax(pi_logits, axis=-1)
        z = (y[:, None] - mu) * jnp.exp(-log_sigma)
        log_n = -0.5 * z**2 - log_sigma - 0.5 * math.log(2 * math.pi)
        return -jnp.mean(jax.nn.logsumexp(log_pi + log_n, axis=-1))

    return nll, (params, x, y)


def factory():
    return _make(bug=False)


def buggy_factory():
    return _make(bug=True)
