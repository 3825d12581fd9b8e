"""Gaussian-process marginal likelihood whose learned noise went negative:
K + noise * I is no longer positive definite and cholesky returns NaN."""

import jax
import jax.numpy as jnp

EXPECT = {
    "primitive": "cholesky",
    "phase": "forward",
    "cause": "unsafe_op",
    "seen": "not positive definite (min eigenvalue -0.5)",
}


def rbf(x, lengthscale):
    d2 = jnp.sum((x[:, None, :] - x[None, :, :]) ** 2, -1)
    return jnp.exp(-0.5 * d2 / lengthscale**2)


def neg_log_marginal(params, x, y):
    k = rbf(x, params["lengthscale"]) + params["noise"] * jnp.eye(x.shape[0])
    chol = jnp.linalg.cholesky(k)  # <- creates
    alpha = jax.scipy.linalg.cho_solve((chol, True), y)
    return 0.5 * y @ alpha + jnp.sum(jnp.log(jnp.diag(chol)))


def make():
    params = {"lengthscale": jnp.array(1.0), "noise": jnp.array(-0.5)}
    x = jnp.linspace(0.0, 1.0, 5)[:, None]
    y = jnp.sin(3.0 * x[:, 0])
    return jax.value_and_grad(neg_log_marginal), (params, x, y)
