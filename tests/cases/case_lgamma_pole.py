"""Dirichlet log-likelihood with concentrations from a ReLU head: a dead unit
gives concentration exactly 0, a pole of lgamma (gammaln(0) = inf)."""

import jax
import jax.numpy as jnp
from jax.scipy.special import gammaln

EXPECT = {
    "primitive": "lgamma",
    "phase": "forward",
    "cause": "unsafe_op",
    "seen": "lgamma received a pole (non-positive integer, e.g. 0.0) at 1 of 6",
}


def dirichlet_nll(params, batch):
    alpha = jax.nn.relu(batch["x"] @ params["w"] + params["b"])
    log_norm = jnp.sum(gammaln(alpha), -1) - gammaln(jnp.sum(alpha, -1))  # <- creates
    log_kernel = jnp.sum((alpha - 1.0) * jnp.log(batch["p"]), -1)
    return -jnp.mean(log_kernel - log_norm)


def make():
    params = {"w": jnp.array([[1.0, -1.0, 0.5], [0.5, -1.0, 0.5]]), "b": jnp.ones(3)}
    x = jnp.array([[1.0, 0.5], [0.2, 0.3]])
    p = jnp.array([[0.2, 0.3, 0.5], [0.1, 0.6, 0.3]])
    return jax.value_and_grad(dirichlet_nll), (params, {"x": x, "p": p})
