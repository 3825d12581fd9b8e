"""Every import from `jax._src` lives here, guarded by the jax version.

The rest of jaxnan imports these names from this module only, so that a jax
upgrade that moves a private symbol breaks exactly one file.
"""

from __future__ import annotations

from typing import Any

from jax.extend import source_info_util

source_info_util.register_exclusion(__file__)

try:  # jax >= 0.6
    from jax._src.shard_map import shard_map_p  # noqa: F401
except ImportError:  # pragma: no cover - older layouts
    from jax.experimental.shard_map import shard_map_p  # type: ignore # noqa: F401

# The primitives `jaxnan.checked` lowers to: `locate` inlines the first and
# evaluates jaxnan's own report callbacks as no-ops.
from jax._src.callback import pure_callback_p  # noqa: E402,F401
from jax._src.core import Tracer  # noqa: E402,F401
from jax._src.custom_batching import custom_vmap_p  # noqa: E402,F401
from jax._src.debugging import debug_callback_p  # noqa: E402,F401

# Dead-code elimination of a jaxpr: the layer statistics of `locate` lower
# only what feeds the measured layer (less compile memory than leaving it to
# XLA after lowering the whole program).
from jax._src.interpreters.partial_eval import dce_jaxpr  # noqa: E402,F401


def unnamed_debug_info(what: str) -> Any:
    """The debug info of a jaxpr jaxnan builds itself (no argument names)."""
    from jax._src.core import DebugInfo

    return DebugInfo("jaxnan", what, None, None)


def jit_donated_argnums(fn: Any) -> tuple[int, ...] | None:
    """The positions a `jax.jit` function donates (names resolved), or None.

    None when `fn` is not a `jax.jit` function (jax keeps its arguments in
    the private ``_jit_info``, with ``donate_argnames`` already turned into
    positions).
    """
    info = getattr(fn, "_jit_info", None)
    nums = getattr(info, "donate_argnums", None)
    return None if nums is None else tuple(nums)


def jit_static_argnums(fn: Any) -> tuple[int, ...] | None:
    """The positions a `jax.jit` function holds static (names resolved), or None.

    None when `fn` is not a `jax.jit` function (``_jit_info`` again).
    """
    info = getattr(fn, "_jit_info", None)
    nums = getattr(info, "static_argnums", None)
    return None if nums is None else tuple(nums)


def in_current_trace(x: Any) -> bool:
    """False for a tracer of another trace than the current one.

    Such as a tracer that leaked out of a `lax.scan` body; True for anything
    else.
    """
    from jax._src import core

    trace = getattr(x, "_trace", None)
    return trace is None or trace is core.trace_ctx.trace


def pmap_global_call(fn: Any, args: tuple, kwargs: dict) -> tuple | None:
    """What a `jax.pmap` function runs under several processes, or None.

    Called outside any trace, jax's pmap (``jax/_src/pmap.py``) runs a
    `jax.jit` of a `shard_map` over the devices of EVERY process, its
    arguments made global (``host_local_array_to_global_array``); traced
    (`jax.make_jaxpr`), it gives a program over this process's devices only
    (`_get_mesh_devices`), whose collectives and axis sizes differ. Its
    ``infer_params`` closure, called here outside any trace, returns that
    jit and those global arguments: ``(jitted, flat global arguments,
    their treedef of (dynamic args, kwargs))``. None when `fn` is not a
    pmap function of this layout.
    """
    code = getattr(fn, "__code__", None)
    if code is None or not code.co_filename.replace("\\", "/").endswith(
        "jax/_src/pmap.py"
    ):
        return None
    if "infer_params" not in code.co_freevars or fn.__closure__ is None:
        return None
    infer = fn.__closure__[code.co_freevars.index("infer_params")].cell_contents
    _, jitted, flat, tree, *_ = infer(*args, **kwargs)
    return jitted, list(flat), tree
