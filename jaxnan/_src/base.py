"""Shared types and argument validation."""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import source_info_util

from jaxnan._src import compat

source_info_util.register_exclusion(__file__)

ArrayTree = chex.ArrayTree
"""A pytree whose leaves are arrays (an alias of `chex.ArrayTree`)."""


# Packages whose frames are never "the user's line" in a report.
LIBRARIES = ("jax", "jaxlib", "optax", "chex", "flax", "equinox", "jaxnan")


@functools.lru_cache(maxsize=1)
def library_dirs() -> dict[str, tuple[str, ...]]:
    """{package: its directories (real paths, ending in a separator)}."""
    dirs = {}
    for name in LIBRARIES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            dirs[name] = tuple(
                os.path.join(os.path.realpath(d), "")
                for d in spec.submodule_search_locations
            )
    return dirs


def library_of(file_name: str) -> str | None:
    """The library (of `LIBRARIES`) a source file belongs to, or None for user code.

    jaxnan's shipped examples (``jaxnan/examples``, the demo's training loop)
    count as user code.
    """
    path = os.path.realpath(file_name) if os.path.isabs(file_name) else file_name
    for name, dirs in library_dirs().items():
        for d in dirs:
            if path.startswith(d):
                if name == "jaxnan" and path[len(d) :].startswith("examples"):
                    return None
                return name
    return None


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


def _none_is_leaf(x: Any) -> bool:
    return x is None


def validate_updates(
    updates: Any, *, argname: str = "updates", fn_name: str, allow_empty: bool = False
) -> None:
    """Raises a clear error for update trees that a transform cannot handle.

    Args:
        updates: the tree given by the user.
        argname: the argument name to show in messages.
        fn_name: the public function being called, shown in messages.
        allow_empty: whether a tree without leaves is accepted.

    Raises:
        ValueError: for None, an empty tree, or None leaves.
        TypeError: for non-array, integer or boolean leaves.
    """
    if updates is None:
        raise ValueError(
            f"jaxnan: {fn_name} got {argname}=None. Pass the gradient pytree "
            "(for example the second output of jax.value_and_grad)."
        )
    flat, _ = jax.tree_util.tree_flatten_with_path(updates, is_leaf=_none_is_leaf)
    if not any(leaf is not None for _, leaf in flat) and not allow_empty:
        raise ValueError(
            f"jaxnan: {fn_name} got an empty {argname} tree "
            f"({jax.tree_util.tree_structure(updates)}). Pass the gradient pytree; "
            "a model with no parameters has nothing to guard."
        )
    for path, leaf in flat:
        where = f"{argname}{jax.tree_util.keystr(path)}"
        if leaf is None:
            # An empty subtree, as optax treats it: what `eqx.filter` leaves
            # where a model holds no array (an activation, a pooling init).
            continue
        dtype = leaf_dtype(leaf)
        if dtype is None:
            raise TypeError(
                f"jaxnan: {fn_name} found a non-array leaf at {where} "
                f"({type(leaf).__name__}). Updates must be arrays."
            )
        if dtype == jax.dtypes.float0:
            continue
        if not is_inexact_dtype(dtype):
            raise TypeError(
                f"jaxnan: {fn_name} found {where} with dtype {dtype}; gradient "
                "transformations need floating-point updates. Keep integer and "
                "boolean values out of the trainable parameters (for example "
                "with optax.masked or by splitting them off the params tree)."
            )


def validate_same_structure(
    a: Any, b: Any, *, name_a: str, name_b: str, fn_name: str
) -> None:
    """Raises ValueError when two trees do not have the same structure."""
    ta = jax.tree_util.tree_structure(a)
    tb = jax.tree_util.tree_structure(b)
    if ta != tb:
        raise ValueError(
            f"jaxnan: {fn_name}: {name_a} and {name_b} have different tree "
            f"structures:\n  {name_a}: {ta}\n  {name_b}: {tb}\n"
            f"Pass the {name_a} that match the {name_b} given to init."
        )


def validate_inner(inner: Any, *, fn_name: str) -> None:
    """Raises TypeError when `inner` is not an optax gradient transformation."""
    if not (hasattr(inner, "init") and hasattr(inner, "update")):
        raise TypeError(
            f"jaxnan.{fn_name}: inner must be an optax GradientTransformation, got "
            f"{type(inner).__name__}. Example: {fn_name}(optax.adamw(1e-3))."
        )


def is_traced(x: Any) -> bool:
    """True for a tracer (inside jit, vmap, grad or scan), False for a value."""
    return isinstance(x, compat.Tracer)


def validate_state(state: Any, expected: type, *, fn_name: str) -> None:
    """Raises TypeError when `state` is not the state of this transform."""
    if not isinstance(state, expected):
        raise TypeError(
            f"jaxnan: {fn_name}.update got state of type {type(state).__name__}, "
            f"expected {expected.__name__}. Pass the state returned by this "
            "transform's init (or by its previous update), not the state of "
            "another optimizer."
        )
