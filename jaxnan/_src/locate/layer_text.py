"""The activation and gradient statistics of the layer where `locate` found an event."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
from jax.extend import core as jex_core
from jax.extend import source_info_util

from jaxnan._src.core import compat
from jaxnan._src.inspect import activations, layers

source_info_util.register_exclusion(__file__)


def _pruned_call(fn: Any, compiler_options: Any, *args: Any) -> Any:
    """``jax.jit(fn)(*args)``, with the equations no output needs left out.

    The measurement walks the whole function but returns the statistics of
    one layer; the equations that do not feed them (the backward pass below
    that layer, the other parameters' gradients) are removed from the jaxpr
    before lowering. XLA would drop them too, after lowering the whole
    program: on the 4-layer LM of `benchmarks/locate_speed.py` this pruning
    took the peak resident set rise of the measurement from 101 MiB to 59.
    """
    traced = jax.jit(fn).trace(*args)
    closed = traced.jaxpr
    jaxpr, used = compat.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
    flat = [x for x, u in zip(jax.tree_util.tree_leaves(args), used) if u]
    pruned = jex_core.jaxpr_as_fun(jex_core.ClosedJaxpr(jaxpr, closed.consts))
    outs = jax.jit(pruned, compiler_options=compiler_options)(*flat)
    return jax.tree_util.tree_unflatten(traced.out_tree, outs)


def _provenances(dyn_tree: Any) -> list:
    """Provenance of every leaf of ``(dynamic args, kwargs)``: arg 0 is params."""
    out = []
    for path, _ in jax.tree_util.tree_flatten_with_path(dyn_tree)[0]:
        arg = getattr(path[1], "idx", None) if len(path) > 1 else None
        if getattr(path[0], "idx", None) == 0 and arg == 0:
            out.append(layers.param_layer(path[2:]) or layers.UNNAMED)
        else:
            out.append(activations.DATA)
    return out


class Layer(NamedTuple):
    """The layer holding an event (`layer_text`).

    Attributes:
        name: its key in `jaxnan.activation_stats` (``decoder/mlp``,
            ``layers/3/linear`` for iteration 3 of a scan over layers),
            without the ``" (grad)"`` of its gradients; None when unknown.
        text: the lines of its statistics, or None when none were measured.
    """

    name: str | None
    text: str | None


def layer_text(
    closed: Any,
    leaves: list,
    dyn_tree: Any,
    eqn: Any,
    iteration: Sequence[int] = (),
    compiler_options: dict[str, Any] | None = None,
) -> Layer | None:
    """The layer of `eqn`, with lines of its activation and gradient stats.

    Runs `activation_stats`'s measurement on the function's jaxpr and
    arguments, restricted to the layer holding `eqn` (every layer is named,
    one is measured: a program about the size of the plain one). Its text
    is e.g. ``activations of `decoder/mlp`: max |x| = 6.1e4, 93% of the
    float16 range ...``, plus a ``gradients of`` line when the function
    computes them. None when `eqn` is not measured (an op that only moves
    entries, an equation inside a loop measured as a whole: a scan over
    time).

    An equation of the body of a scan over layers is in the layer of its
    iteration: ``layers/3/linear`` for ``iteration == (3,)``. Every scan
    around it is measured per iteration (`inspect.scan_layers`): a loop
    over microbatches around the stack gives no index to the name and is
    measured in the event's own iteration (``iteration == (0, 3)``: layer
    ``layers/3/linear`` in microbatch 0, not reduced over the
    microbatches), and a stack inside a stack names both indices
    (``blocks/2/sub/1`` for ``(2, 1)``). A loop around no scan over layers
    (over time) is measured as one equation, so an event inside it names
    no layer.

    Args:
        closed: the `ClosedJaxpr` of the function.
        leaves: its flat arguments.
        dyn_tree: ``(dynamic args, kwargs)`` whose flattening gives `leaves`;
            the first dynamic argument holds the parameters.
        eqn: the equation of the event.
        iteration: the loop iterations of the event, outermost first (for a
            `scan`, the index into its scanned operands).
        compiler_options: XLA options of the measuring program.
    """
    provs = _provenances(dyn_tree)
    walker = activations.Walker()
    index = tuple(iteration)

    def measure(consts, xs):
        walker.run(closed.jaxpr, consts, xs, provs)
        return walker.results(0.25, layer_of=eqn, iteration=index)

    stats = _pruned_call(measure, compiler_options, list(closed.consts), list(leaves))
    name = walker.layer_name(eqn, index)
    if name is None:
        return None
    base = name.removesuffix(activations.GRAD_SUFFIX)
    lines = []
    if base in stats:
        lines.append(f"activations of `{base}`: {stats[base]}")
    grad = stats.get(base + activations.GRAD_SUFFIX)
    if grad is not None:
        lines.append(f"gradients of `{base}`: {str(grad).replace('|x|', '|g|')}")
    return Layer(base, "\n".join(lines) or None)
