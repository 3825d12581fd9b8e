"""A scan over a sequence of log-probabilities guarded by jnp.where: the
guard masks the log of the padding value -4.0 at step 1, but its threshold
lets the -1.0 of step 3 through, and the running sum is NaN from then on.
The masked NaN of step 1 never reached an output: the NaN that did was made
at iteration 3.
"""

import jax.numpy as jnp
from jax import lax

EXPECT = {
    "primitive": "log",
    "phase": "forward",
    "cause": "unsafe_op",
    "iteration": (3,),
    "seen": "log received values below 0.0 (min -1.0)",
}


def total_log_prob(probs):
    def body(total, p):
        logp = jnp.where(p > -3.0, jnp.log(p), 0.0)  # <- creates
        return total + logp, logp

    return lax.scan(body, 0.0, probs)


def make():
    return total_log_prob, (jnp.array([0.5, -4.0, 0.25, -1.0, 0.125]),)
