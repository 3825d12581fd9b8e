"""The wrapped jit's static arguments stay static under `jaxnan.guard`.

The guard compiles the step itself, so it reads what the wrapper would have
held static and keeps it so (a new value compiles anew, as under the jit):

* `jax.jit` / `nnx.jit`: ``static_argnums`` / ``static_argnames`` (a
  Python ``train`` flag used in an ``if``);
* `eqx.filter_jit`: every argument that is a Python bool, int, float,
  complex or str (Equinox holds all non-array values static).

Such an argument travels as a `Static` pytree node without leaves (its value
in the tree structure), and the step is called with the value itself.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.extend import source_info_util

from jaxnan._src.core import compat
from jaxnan._src.guard import donation

source_info_util.register_exclusion(__file__)

_PYTHON_SCALARS = (bool, int, float, complex, str)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Static:
    """A static argument: no leaves, compared and hashed by its value."""

    value: Any


def static_rule(fn: Callable) -> Callable[[int, Any], bool] | None:
    """``(position, argument) -> static?`` for the jit wrapping `fn`, or None.

    None when nothing can be static (no jit, or a jit without static
    arguments): the guard then passes the arguments as they are.

    Examples:
        >>> import functools, jax
        >>> from jaxnan._src.guard import statics
        >>> f = functools.partial(jax.jit, static_argnums=(1,))(lambda a, b: a)
        >>> statics.static_rule(f)(1, True), statics.static_rule(f)(0, 1.0)
        (True, False)
        >>> statics.static_rule(lambda a: a) is None
        True
    """
    for layer in donation.wrapper_chain(fn):
        nums = compat.jit_static_argnums(layer)
        if nums:
            held = frozenset(nums)
            return lambda i, a: i in held
        if nums is not None:
            return None
        if donation.is_filter_jit(layer):  # eqx: Python scalars stay static
            return lambda i, a: isinstance(a, _PYTHON_SCALARS)
    return None


def held(args: Sequence[Any], rule: Callable[[int, Any], bool] | None) -> Any:
    """`args` with the static ones as `Static` nodes (`args` itself for none)."""
    if rule is None:
        return args
    return tuple(Static(a) if rule(i, a) else a for i, a in enumerate(args))


def unheld(fn: Callable, rule: Callable[[int, Any], bool] | None) -> Callable:
    """`fn` called with the values of its `Static` arguments (`fn` for none)."""
    if rule is None:
        return fn

    @functools.wraps(fn)
    def call(*args):
        return fn(*(a.value if isinstance(a, Static) else a for a in args))

    return call
