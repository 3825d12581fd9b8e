"""Flax glue (optional; imports flax): `opt_state` for NNX, `apply_gradients` for linen.

``import jaxnan`` does not import this module; ``import jaxnan.flax`` does,
and needs Flax installed.
"""

from jaxnan._src.frameworks.nnx import apply_gradients as apply_gradients
from jaxnan._src.frameworks.nnx import opt_state as opt_state

__all__ = ("apply_gradients", "opt_state")
