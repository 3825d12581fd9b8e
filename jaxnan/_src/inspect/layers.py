"""Layer names for the equations of a jaxpr.

A layer is named, in order of preference, by

1. the scopes of the equation's name stack (`jax.named_scope`, Flax linen
   module names), transformations such as ``jvp(...)`` removed, unless the
   scope holds a dotted class name (Equinox's ``eqx.nn.Linear``, the same
   for every Linear) and the equation consumes a parameter;
2. the parameter it consumes: the key path of a leaf of the parameter
   arguments (Flax NNX attribute paths, Equinox field paths), without the
   leaf's own name (``linear1/kernel/value`` -> ``linear1``);
3. the parameter consumed by another equation of the same call (the user's
   line and the library function it called: the mean and variance of a
   BatchNorm belong to its layer);
4. the parameter that the same call of a user function consumes next with
   a jax operation (``_ln``'s mean and variance belong to the layer of the
   ``scale`` it multiplies; an activation between two Flax/Equinox module
   calls does not);
5. the user's source line, ``file.py:LINE (function)``.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
from jax.extend import source_info_util

from jaxnan._src.core import frames, libraries

source_info_util.register_exclusion(__file__)

# Leaf names that wrap a parameter rather than name it (NNX Variables).
_WRAPPER_KEYS = ("value", "raw_value")

# Primitives that only move or relabel entries: their outputs are bounded by
# their inputs, so they get no statistics of their own.
STRUCTURAL = frozenset(
    "reshape broadcast_in_dim transpose squeeze expand_dims copy copy_p slice "
    "concatenate rev pad dynamic_slice dynamic_update_slice gather select_n "
    "split".split()
)


# The end of the name of a layer's gradients (equations made by transposition).
GRAD_SUFFIX = " (grad)"

# Provenance of a value: DATA (depends on a non-parameter argument), CONST
# (literals and constants only) or the name of the parameter's layer.
DATA = None
CONST = ""


class _Unnamed:
    """The provenance of a parameter leaf that names no layer.

    A top-level array of the parameters: false like `CONST`, but still a
    parameter (a `lax.scan` over it is a scan over layers).
    """

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "UNNAMED"


UNNAMED = _Unnamed()


def provenance(eqn: Any, in_provs: list) -> tuple[bool, str]:
    """(whether the equation computes on data, the first parameter it uses).

    An equation without inputs (an RNG draw, an iota) counts as data.
    """
    data = any(p is DATA for p in in_provs) or not eqn.invars
    return data, next((p for p in in_provs if p), "")


# The scope jax's partial evaluation of `jax.checkpoint` opens around the
# forward computation it repeats in the backward pass.
_REMAT_SCOPE = "rematted_computation"


def scope_path(name_stack: Any) -> str:
    """The scopes of a name stack joined by '/'.

    Transformations (``jvp``, ``transpose``), the scopes that `jnp.einsum`
    opens with its spec (``bqhd,bkhd->bhqk``) and the one `jax.checkpoint`
    opens around its recomputation in the backward pass
    (``rematted_computation``: no layer of the model) are dropped, and so
    are the scopes that jax repeats after a transformation (the transposed
    `remat` of a linen module under ``Net`` has ``Net/jvp(Net)``: one
    ``Net``).

    Examples:
        >>> import jax
        >>> from jaxnan._src.inspect.layers import scope_path
        >>> def f(x):
        ...     with jax.named_scope("Net"):
        ...         return jax.checkpoint(lambda x: x * 2)(x)
        >>> grad = jax.make_jaxpr(jax.grad(f))(1.0)
        >>> remat = next(e for e in grad.eqns if e.primitive.name == "remat2")
        >>> scope_path(remat.source_info.name_stack)  # jvp(Net)/Net in jax
        'Net'
    """
    parts: list[str] = []
    replay = None  # after a transformation: how many scopes it repeated
    for el in getattr(name_stack, "stack", ()):
        if type(el).__name__ == "Transform":
            replay = 0 if parts else None
            continue
        name = getattr(el, "name", "")
        # jnp.einsum scopes its spec
        if not name or "->" in name or name == _REMAT_SCOPE:
            continue
        if replay is not None and replay < len(parts) and parts[replay] == name:
            replay += 1  # the outer scopes again, inside the transformation
            continue
        replay = None
        parts.append(name)
    return "/".join(parts)


def join(a: str, b: str) -> str:
    """`a/b`, without empty parts."""
    return "/".join(p for p in (a, b) if p)


def is_backward(name_stack: Any) -> bool:
    """True for equations made by transposition (the backward pass)."""
    return any(
        type(el).__name__ == "Transform" and getattr(el, "name", "") == "transpose"
        for el in getattr(name_stack, "stack", ())
    )


def param_layer(path: tuple) -> str:
    """The layer owning a parameter leaf: its key path without the leaf name."""
    keys = [_key_name(k) for k in path]
    while keys and keys[-1] in _WRAPPER_KEYS:
        keys.pop()
    return "/".join(keys[:-1])


def _key_name(k: Any) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


class Site(NamedTuple):
    """Where the user's code made an equation.

    Attributes:
        key: the user's line plus the library function it called (the frame
            just inside the library), so that the statistics of a
            `BatchNorm` called on the same line as a `relu` keep apart.
        text: ``file.py:LINE (function)``.
        chain: the user function (file, name) and the lines of its user
            callers: equal for the equations of one call of a user function.
        direct: True when the user's line calls jax itself (``x * p``, not a
            Flax or Equinox module).
    """

    key: tuple
    text: str
    chain: tuple
    direct: bool


def _is_user(f: Any) -> bool:
    return frames.is_user_file(f.file_name)


def call_site(source_info: Any) -> Site | None:
    """The `Site` of an equation; None without a user frame.

    An equation of a library `jit` traced elsewhere has no user frame.
    """
    tb = getattr(source_info, "traceback", None)
    stack = list(getattr(tb, "frames", ())) if tb is not None else []
    for k, f in enumerate(stack):  # innermost first
        if _is_user(f):
            inner = stack[k - 1] if k else None
            callee = (inner.file_name, inner.function_name) if inner else ()
            outer = tuple(
                (g.file_name, g.line_num) for g in stack[k + 1 :] if _is_user(g)
            )
            return Site(
                key=(f.file_name, f.line_num, *callee),
                text=f"{os.path.basename(f.file_name)}:{f.line_num} "
                f"({f.function_name})",
                chain=(f.file_name, f.function_name, *outer),
                direct=all(
                    libraries.library_of(g.file_name) in (None, "jax", "jaxlib")
                    for g in stack[:k]
                ),
            )
    return None


def param_paths(args: tuple, argnums: tuple[int, ...]) -> list[tuple[str, Any]]:
    """(layer, leaf) for every leaf of the parameter arguments."""
    out = []
    for i in argnums:
        for path, leaf in jax.tree_util.tree_flatten_with_path(args[i])[0]:
            out.append((param_layer(path), leaf))
    return out


def split_interrupted(
    names: list[str], scoped: list[bool], sites: list[str]
) -> list[str]:
    """Names under which every layer's equations are contiguous (program order).

    A Flax linen module's own equations between the calls of its submodules
    (the ``relu`` and ``tanh`` of ``Net`` around ``Net/mid``) share its
    scope; each run of them between other layers becomes a layer of its own,
    named by the scope and the source line where the run starts
    (``Net/model.py:12 (Net.__call__)``), or by the run's number when it has
    no line (a user line called in a loop over layers, library code named
    by the module's class: ``model.py:12 (MLP.__call__)/2``,
    ``Sequential/1``; gradients count from the last run, the backward pass
    running the calls in reverse). Other names (`scoped` false: parameters' layers)
    are kept.

    Args:
        names: the layer name of each measured equation, in program order
            (gradients end in `GRAD_SUFFIX`).
        scoped: per equation, whether each run of its name is a layer of
            its own (a scope, a line, the module's class).
        sites: per equation, the ``file.py:LINE (function)`` that names a
            run of its scope, or "" (the run's number names it).

    Returns:
        The names, with the interrupted scopes split.

    Examples:
        >>> from jaxnan._src.inspect import layers
        >>> layers.split_interrupted(
        ...     ["Net", "Net/mid", "Net"], [True] * 3, ["m.py:3 (f)", "", "m.py:4 (f)"]
        ... )
        ['Net/m.py:3 (f)', 'Net/mid', 'Net/m.py:4 (f)']
    """
    starts = [k for k, n in enumerate(names) if k == 0 or names[k - 1] != n]
    runs: dict[str, int] = {}
    for k in starts:
        runs[names[k]] = runs.get(names[k], 0) + 1
    out, start, seen = list(names), 0, {}
    for k, name in enumerate(names):
        if k == 0 or names[k - 1] != name:
            start, seen[name] = k, seen.get(name, 0) + 1
        if scoped[k] and runs[name] > 1:
            base = name.removesuffix(GRAD_SUFFIX)
            # the backward pass runs the calls in reverse: its first run
            # is the gradient of the last call
            number = runs[name] + 1 - seen[name] if base != name else seen[name]
            where = sites[start] or str(number)
            out[k] = f"{base}/{where}" + name[len(base) :]
    return out
