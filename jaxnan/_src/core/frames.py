"""Source frames of jaxpr equations: the user line and the library call.

`is_user_file` is the one test of "the user's code" (every report names
the innermost frame that passes it); `user_frame` finds that frame in an
equation's traceback; `user_function` names the library function whose
(derivative) equation it is (``jnp.sqrt``, ``jax.nn.softmax``);
`clean_name_stack` drops the transformation wrappers (``jvp(...)``,
``transpose(...)``, ``vmap(...)``) from a name stack.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence
from typing import Any

from jax.extend import source_info_util

from jaxnan._src.core import libraries, primitives

source_info_util.register_exclusion(__file__)


def clean_name_stack(name_stack: str) -> str:
    """``"transpose(jvp(MLP))/Dense_0"`` -> ``"MLP/Dense_0"``; ``"jvp()"`` -> ``""``.

    Examples:
        >>> from jaxnan._src.core.frames import clean_name_stack
        >>> clean_name_stack("transpose(jvp(MLP))/Dense_0")
        'MLP/Dense_0'
        >>> clean_name_stack("vmap(jvp())")
        ''
    """
    text = re.sub(r"\b\w+\(|\)", "", name_stack)
    return "/".join(part for part in text.split("/") if part)


# -- source frames -------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _stdlib_dir() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(os.__file__)), "")


@functools.lru_cache(maxsize=4096)
def is_user_file(file_name: str) -> bool:
    """Whether a source file holds the user's code: the line a report names.

    Not the user's: the packages of `libraries.LIBRARIES` (jax, optax, chex,
    flax, equinox, jmp, jaxnan; jaxnan's shipped examples excepted), the standard
    library (``contextlib``/``functools`` wrappers included; a package
    installed under it in ``site-packages`` excepted) and Python's frozen
    modules (``<frozen runpy>``). Code without a file (``<stdin>``,
    ``<string>``, a doctest) is the user's.

    Examples:
        >>> import jax, os
        >>> from jaxnan._src.core.frames import is_user_file
        >>> is_user_file("train.py"), is_user_file(jax.__file__)
        (True, False)
        >>> is_user_file(os.__file__), is_user_file("<frozen runpy>")
        (False, False)
    """
    if file_name.startswith("<"):
        return not file_name.startswith("<frozen")
    if libraries.library_of(file_name) is not None:
        return False
    path, stdlib = os.path.abspath(file_name), _stdlib_dir()
    return not path.startswith(stdlib) or "site-packages" in path[len(stdlib) :]


_API_PREFIXES = (
    ("jax", "_src/numpy/linalg", "jnp.linalg."),
    ("jax", "_src/numpy/", "jnp."),
    ("jax", "_src/nn/", "jax.nn."),
    ("jax", "_src/lax/", "lax."),
    ("jax", "_src/scipy/special", "jax.scipy.special."),
    ("jax", "_src/scipy/", "jax.scipy."),
    ("jax", "_src/ops/", "jax.ops."),
    ("optax", "", "optax."),
    ("flax", "", "flax."),
    ("equinox", "", "eqx."),
    ("jmp", "", "jmp."),
)


def _function_name(rel: str, function_name: str) -> str:
    """The public name of a library frame's function (``_xlogy_jvp``: xlogy)."""
    fname = function_name.split(".")[-1]
    if rel.startswith("_src/scipy/special") and re.fullmatch(r"_\w+_jvp", fname):
        return fname[1:-4]  # the jvp rule of xlogy is "gradient of xlogy"
    return fname


def _api_name(frame: Any) -> str | None:
    lib = libraries.library_of(frame.file_name)
    if lib is None:
        return None
    rel = os.path.realpath(frame.file_name)
    for d in libraries.library_dirs()[lib]:
        if rel.startswith(d):
            rel = rel[len(d) :]
            break
    rel = rel.replace(os.sep, "/")
    if rel.endswith("array_methods.py"):
        return None
    fname = _function_name(rel, frame.function_name)
    if fname.startswith("_") or fname.startswith("<"):
        return None
    for want_lib, sub, prefix in _API_PREFIXES:
        if lib == want_lib and rel.startswith(sub):
            return prefix + fname
    return None


def user_frame(source_info: Any) -> tuple[Any, str | None]:
    """(innermost user frame or None, the library function it called).

    Without a user frame (the traceback of an equation inside a `jit`-ed
    library function stops at the `jit`), the library function is the
    outermost one the traceback shows.
    """
    tb = getattr(source_info, "traceback", None)
    if tb is None:
        return None, None
    frames = list(tb.frames)  # innermost first
    k = next(
        (i for i, f in enumerate(frames) if is_user_file(f.file_name)), len(frames)
    )
    user = frames[k] if k < len(frames) else None
    api = None
    for inner in reversed(frames[:k]):
        api = _api_name(inner)
        if api is not None:
            break
    return user, api


def node_frame(node: Any) -> tuple[Any, str | None]:
    """The user frame of a node, falling back on its enclosing equations."""
    frame, api = user_frame(node.eqn.source_info)
    for caller in reversed(node.callers):
        if frame is not None:
            break
        frame, outer_api = user_frame(caller.source_info)
        api = api or outer_api
    return frame, api


def user_function(node: Any, nodes: Sequence[Any], api: str | None) -> str:
    """The library function whose (derivative) equation created the value.

    The traceback's library frames name it when present. Functions that jax
    wraps in an inlined `jit` leave no frame; then a derivative equation is
    matched with the primal equation that shares its traceback object (the
    jvp rule's equations do), and that primitive is named.
    """
    if api is not None:
        return api
    tb = getattr(node.eqn.source_info, "traceback", None)
    if tb is not None:
        for other in nodes[: node.index + 1]:  # the primal equation comes first
            if getattr(other.eqn.source_info, "traceback", None) is tb:
                return primitives.user_spelling(other.eqn.primitive.name)
    return primitives.user_spelling(node.eqn.primitive.name)
