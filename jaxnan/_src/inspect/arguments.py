"""The arguments of `activation_stats`: which are parameters, and the trace."""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.extend import source_info_util

from jaxnan._src.inspect import layers

source_info_util.register_exclusion(__file__)

NAME = "jaxnan.activation_stats"


def is_array(x: Any) -> bool:
    """Whether a leaf is an array (traced); other leaves stay static."""
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def trace(fn: Callable, args: tuple, kwargs: dict, argnums: tuple[int, ...]):
    """(closed jaxpr, dynamic leaves, their provenances) of ``fn(*args)``.

    Array leaves are traced; every other leaf (Equinox's functions, Python
    numbers) stays static. Leaves of the arguments in `argnums` are
    parameters, named by their layer; the rest is data.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path((args, kwargs))
    leaves = [x for _, x in flat]
    dyn = [i for i, x in enumerate(leaves) if is_array(x)]
    provs = []
    for i in dyn:
        path = flat[i][0]
        arg = getattr(path[1], "idx", None)
        is_param = getattr(path[0], "idx", None) == 0 and arg in argnums
        provs.append(
            (layers.param_layer(path[2:]) or layers.UNNAMED)
            if is_param
            else layers.DATA
        )

    def flat_fn(*xs):
        full = list(leaves)
        for i, x in zip(dyn, xs):
            full[i] = x
        a, kw = jax.tree_util.tree_unflatten(treedef, full)
        return fn(*a, **kw)

    closed = jax.make_jaxpr(flat_fn)(*[leaves[i] for i in dyn])
    return closed, [leaves[i] for i in dyn], provs


# (module, class) of the framework modules: a model even without arrays.
_MODULE_CLASSES = (("flax.nnx", "Module"), ("equinox", "Module"))


def is_model(fn: Any) -> bool:
    """A Flax NNX or Equinox module, or another callable object holding arrays.

    A module without parameters (``jnp.tanh`` in a ``__call__``) is still
    the model: its call is measured, its argument is the batch.
    """
    if inspect.isroutine(fn) or isinstance(fn, functools.partial):
        return False
    for module, name in _MODULE_CLASSES:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(fn, cls):
            return True
    return any(is_array(x) for x in jax.tree_util.tree_leaves(fn))


def number_paths(args: tuple, kwargs: dict, argnums: tuple[int, ...]) -> list[str]:
    """Key paths of the Python numbers among the data arguments (not bools).

    They stay static (traced as constants), so a batch given as
    ``3.0`` or ``[1.0, 2.0]`` computes no layer on data.
    """
    data = ([a for i, a in enumerate(args) if i not in argnums], kwargs)
    return [
        jax.tree_util.keystr(path)
        for path, x in jax.tree_util.tree_flatten_with_path(data)[0]
        if isinstance(x, (int, float, complex)) and not isinstance(x, bool)
    ]


def call_model(model: Any, *args: Any, **kwargs: Any) -> Any:
    """``model(*args, **kwargs)``: a bound module called with the data."""
    return model(*args, **kwargs)


def check_not_bound_again(bound: Any, args: tuple, model: bool) -> None:
    """Raises when the bound module (or params) is passed again to the call.

    ``activation_stats(model)(model, x)`` mixes the bound form with the
    explicit one, ``activation_stats(fn)(model, x)``.
    """
    if not any(a is bound for a in args):
        return
    form = (
        "jaxnan.activation_stats(model)(x)"
        if model
        else "jaxnan.activation_stats(apply_fn, params)(x)"
    )
    raise ValueError(
        f"jaxnan: {NAME} already holds the "
        f"{'module' if model else 'params'}; the returned function takes the "
        f"data only: {form}."
    )


def argnums_of(params_argnums: Any, default: int) -> tuple[int, ...]:
    """`params_argnums` as a tuple (`default` for None); ValueError if bad."""
    if params_argnums is None:
        return (default,)
    nums = (params_argnums,) if isinstance(params_argnums, int) else params_argnums
    nums = tuple(nums)
    if not nums or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in nums
    ):
        raise ValueError(
            f"jaxnan: {NAME} got params_argnums={params_argnums!r}; pass "
            "non-negative argument positions, e.g. 0 for fn(model, x)."
        )
    return nums


def no_layers_error(
    provs: list, argnums: tuple[int, ...], bound: bool, numbers: list[str]
) -> None:
    """Raises when nothing was measured because no argument was data.

    `numbers` are the Python numbers among the data arguments (`number_paths`).
    """
    if any(p is layers.DATA for p in provs):
        return  # there was data, and nothing computed on it: no layers
    if numbers:
        raise ValueError(
            f"jaxnan: {NAME} measured nothing: no array among the data "
            f"arguments ({', '.join(numbers[:3])} are Python numbers, static "
            "constants of the trace). Pass the batch as an array, e.g. "
            "jnp.asarray(x)."
        )
    form = (
        "jaxnan.activation_stats(model)(x) for a Flax NNX or Equinox module, "
        "jaxnan.activation_stats(apply_fn, params)(x) for Flax linen"
    )
    if bound:
        raise ValueError(
            f"jaxnan: {NAME} measured nothing: every array argument of the "
            "call is a parameter, so no layer computes on data. Pass the "
            f"input batch to the returned function ({form})."
        )
    raise ValueError(
        f"jaxnan: {NAME} measured nothing: params_argnums={argnums!r} takes "
        "every array argument for parameters, so no layer computes on data. "
        f"Use {form}, or params_argnums= the positions of the model's "
        "arguments only (the batch must not be among them)."
    )
