"""A stand-in for DeepMind's jmp (its Policy casts and loss scales), for tests.

The calls are written as jmp writes them (``jmp.get_policy``,
``policy.cast_to_compute``, ``jmp.StaticLossScale``): installed as the
package ``jmp`` on ``sys.path``, its frames are library frames.
"""

import jax
import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}


def _cast(tree, dtype):
    def cast(x):  # as jmp's conditional cast: floating arrays only
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(dtype)
        return x

    return jax.tree_util.tree_map(cast, tree)


class Policy:
    def __init__(self, param_dtype, compute_dtype, output_dtype):
        self.param_dtype = param_dtype
        self.compute_dtype = compute_dtype
        self.output_dtype = output_dtype

    def cast_to_compute(self, tree):
        return _cast(tree, self.compute_dtype)

    def cast_to_output(self, tree):
        return _cast(tree, self.output_dtype)

    def cast_to_param(self, tree):
        return _cast(tree, self.param_dtype)


def get_policy(spec):
    parts = dict(p.split("=") for p in spec.split(","))
    return Policy(*(_DTYPES[parts[k]] for k in ("params", "compute", "output")))


class StaticLossScale:
    def __init__(self, loss_scale):
        self.loss_scale = jnp.asarray(loss_scale, jnp.float32)

    def scale(self, tree):
        return jax.tree_util.tree_map(lambda x: x * self.loss_scale, tree)

    def unscale(self, tree):
        return jax.tree_util.tree_map(lambda x: x / self.loss_scale, tree)
