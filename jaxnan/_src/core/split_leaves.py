"""Which leaves are split over devices, as far as a trace can know.

XLA's SPMD partitioner turns a single-operand reduction over a sharded dim
into one all-reduce of the per-device partials, but it does not partition a
variadic `lax.reduce` (several operands read in one loop) over a sharded dim:
it all-gathers the per-device partials of each operand and reduces them
again (one small, latency-bound all-gather per operand and leaf shape). On
one device the variadic form is the cheaper one (it reads each input once and
writes nothing out). So the finiteness checks pick the form leaf by leaf:
the partitionable one for a leaf split over devices, the variadic one for
the others (`tree.finite_flags_and_squares`, ``stacked=``).

Inside `jax.jit` a traced value does not say how it is sharded, unless its
mesh has explicit axes (`sharding.sharded_in_type`). `jaxnan.guard` knows the
shardings of the state it is called with: it names the shapes of the state
leaves that are split (`split_shapes`) while it traces the step
(`assume_split`), and a gradient, a moment or a new parameter of such a shape
counts as split (`is_split`). The hint only chooses between two forms that
take the same decisions bit for bit; a wrong hint costs speed, never a wrong
answer.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np
from jax.extend import source_info_util

from jaxnan._src.core import sharding

source_info_util.register_exclusion(__file__)

_SPLIT: contextvars.ContextVar[frozenset] = contextvars.ContextVar(
    "jaxnan_split_shapes", default=frozenset()
)


def split_shapes(arrays: Iterable[Any]) -> frozenset[tuple[int, ...]]:
    """The shapes of the `jax.Array`s of `arrays` split over several devices.

    A leaf is split when its sharding is not fully replicated (FSDP
    parameters and their moments); replicated leaves, host arrays and
    scalars are not.

    Examples:
        >>> import jax.numpy as jnp
        >>> from jaxnan._src.core import split_leaves
        >>> split_leaves.split_shapes([jnp.ones((4, 2)), 3.0])
        frozenset()
    """
    out = set()
    for x in arrays:
        s = getattr(x, "sharding", None) if isinstance(x, jax.Array) else None
        if s is not None and np.ndim(x) and not s.is_fully_replicated:
            out.add(tuple(x.shape))
    return frozenset(out)


@contextlib.contextmanager
def assume_split(shapes: frozenset[tuple[int, ...]]) -> Iterator[None]:
    """Inside the block, leaves of these shapes count as split (`is_split`)."""
    token = _SPLIT.set(frozenset(shapes) | _SPLIT.get())
    try:
        yield
    finally:
        _SPLIT.reset(token)


def is_split(x: Any) -> bool:
    """Whether `x` is split over devices: by its type, or by the guard's hint.

    Examples:
        >>> import jax.numpy as jnp
        >>> from jaxnan._src.core import split_leaves
        >>> with split_leaves.assume_split(frozenset({(4, 2)})):
        ...     split_leaves.is_split(jnp.ones((4, 2)))
        True
        >>> split_leaves.is_split(jnp.ones((4, 2)))
        False
    """
    shapes = _SPLIT.get()
    if shapes and tuple(np.shape(x)) in shapes:
        return True
    return sharding.sharded_in_type(x)
