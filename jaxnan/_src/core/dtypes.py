"""Dtype facts: which leaves are inexact, and which ones jaxnan checks."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import source_info_util

source_info_util.register_exclusion(__file__)


def is_inexact_dtype(dtype: Any) -> bool:
    """True for floating and complex dtypes (float0 excluded)."""
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        return False
    if dtype == jax.dtypes.float0:
        return False
    return bool(jnp.issubdtype(dtype, jnp.inexact))


def leaf_dtype(leaf: Any) -> Any:
    """The dtype of an array-like leaf, or None when it is not array-like."""
    if isinstance(leaf, bool):
        return np.dtype(bool)
    if isinstance(leaf, int):
        return np.dtype(np.int32)
    if isinstance(leaf, float):
        return np.dtype(np.float32)
    if isinstance(leaf, complex):
        return np.dtype(np.complex64)
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
        return None
    try:
        return np.dtype(dtype)
    except TypeError:
        return None


def is_checked_leaf(leaf: Any) -> bool:
    """True when `leaf` is a floating or complex array (or Python float)."""
    dtype = leaf_dtype(leaf)
    return dtype is not None and is_inexact_dtype(dtype)
