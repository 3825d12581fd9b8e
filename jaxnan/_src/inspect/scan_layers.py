"""A stack of layers under `lax.scan`, measured one iteration at a time.

Scan over layers (Flax linen's `nn.scan`, NNX's `nnx.scan` over a stack made
by `nnx.vmap`, Equinox's `eqx.filter_vmap` plus `lax.scan`) runs one body
per layer, the layer's parameters sliced from stacked arrays. A `scan` whose
scanned operands (``xs``) hold parameters is such a stack: its body is
evaluated equation by equation inside a new `lax.scan` that also returns the
reductions of every measured equation as stacked outputs (``ys``), so that
one pass gives each iteration's statistics, and each iteration is reported
as its own layer (``blocks/3/linear``). A scan without parameters among its
``xs`` (a loop over microbatches or time steps) whose body runs a scan over
layers, at any depth, is evaluated the same way: its iterations are not
layers, so each layer's statistics are reduced over them (`Stack` with no
name), and a scan over layers inside a scan over layers names both indices
(``blocks/2/sub/1``). Any other scan (a loop over time around no stack) is
measured on its outputs, as one equation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex_core
from jax.extend import source_info_util

from jaxnan._src.core import primitives
from jaxnan._src.inspect import layers, reductions

source_info_util.register_exclusion(__file__)


class Stack(NamedTuple):
    """One scan measured per iteration (static): over layers, or around them.

    Attributes:
        name: the layer path the iteration index goes after (``blocks``,
            ``Net/layers``; empty for a model that is the stack itself);
            None for a loop around a scan over layers (over microbatches or
            time steps), whose iterations are no layers.
        length: the number of iterations.
        reverse: whether the scan runs from the last slice to the first.
    """

    name: str | None
    length: int
    reverse: bool

    def order(self) -> range:
        """The iteration indices in the order they run."""
        n = self.length
        return range(n - 1, -1, -1) if self.reverse else range(n)

    def last(self) -> int:
        """The index of the iteration that runs last."""
        return 0 if self.reverse else self.length - 1

    def layer(self, base: str, i: int) -> str:
        """The name of iteration `i` of the body's layer `base`.

        The index goes after the stack's path (``blocks/linear`` ->
        ``blocks/3/linear``); a name outside that path (a source line) is
        put under it (``blocks/3/model.py:12 (Block.__call__)``).

        Examples:
            >>> from jaxnan._src.inspect.scan_layers import Stack
            >>> s = Stack("blocks", 4, False)
            >>> s.layer("blocks/linear", 3), s.layer("m.py:2 (f)", 0)
            ('blocks/3/linear', 'blocks/0/m.py:2 (f)')
            >>> Stack(None, 8, False).layer("blocks/linear", 3)  # no layers
            'blocks/linear'
        """
        if self.name is None:
            return base
        if base == self.name:
            rest = ""
        elif self.name and base.startswith(self.name + "/"):
            rest = base[len(self.name) + 1 :]
        else:
            rest = base
        return layers.join(layers.join(self.name, str(i)), rest)


def _split(eqn: Any) -> tuple[int, int]:
    return eqn.params["num_consts"], eqn.params["num_carry"]


def stacked_layers(eqn: Any, provs: Sequence[Any]) -> set[str]:
    """The parameter layers among a `scan`'s ``xs``; empty for other equations.

    A parameter that names no layer (`layers.UNNAMED`) counts as ``""``.
    """
    if eqn.primitive.name != "scan":
        return set()
    nc, ncar = _split(eqn)
    xs = provs[nc + ncar :]
    return {p for p in xs if p} | {"" for p in xs if p is layers.UNNAMED}


def call_body(eqn: Any) -> tuple[Any, Sequence[Any]] | None:
    """(jaxpr, consts) of a call-like equation, evaluated inline; else None.

    The call-like primitives are the `Role.CALL` bodies of the one table,
    `core.primitives.sub_jaxprs` (`jit`, `remat2` for `jax.checkpoint` and
    `nnx.remat`, custom derivatives, ...), whose body takes the equation's
    operands and gives its outputs.
    """
    subs = primitives.sub_jaxprs(eqn, strict=False)
    if len(subs) != 1 or subs[0].role is not primitives.Role.CALL:
        return None
    jaxpr = subs[0].jaxpr
    if len(jaxpr.invars) != len(eqn.invars) or len(jaxpr.outvars) != len(eqn.outvars):
        return None  # remat_opt's forward also returns residuals
    return jaxpr, subs[0].consts


def holds_stack(eqn: Any, provs: Sequence[Any]) -> bool:
    """Whether `eqn` is a `scan` whose body runs a scan over layers.

    At any depth: through calls (`call_body`) and other scans, the
    parameters among the loop's consts (closed over by the body), e.g. a
    `lax.scan` over microbatches of ``jax.value_and_grad(model)``.
    """
    if eqn.primitive.name != "scan":
        return False
    body = primitives.sub_jaxprs(eqn)[0].jaxpr
    return _runs_stack(body, body_provenances(eqn, provs))


def _runs_stack(jaxpr: Any, in_provs: Sequence[Any]) -> bool:
    env: dict[Any, Any] = dict(zip(jaxpr.invars, in_provs))
    for eqn in jaxpr.eqns:
        lit = jex_core.Literal
        provs = [
            layers.CONST if isinstance(v, lit) else env.get(v, layers.CONST)
            for v in eqn.invars
        ]
        if stacked_layers(eqn, provs) or holds_stack(eqn, provs):
            return True
        call = call_body(eqn)
        if call is not None and _runs_stack(call[0], provs):
            return True
        data, param = layers.provenance(eqn, provs)
        for v in eqn.outvars:
            env[v] = layers.DATA if data else param or layers.CONST
    return False


def _propagate(jaxpr: Any, in_provs: Sequence[Any]) -> list:
    """The provenances of `jaxpr`'s outputs, without evaluating it.

    Every equation is taken as first-order (`layers.provenance`); enough to
    know whether a loop carry becomes data.
    """
    env: dict[Any, Any] = dict(zip(jaxpr.invars, in_provs))

    def read(v: Any) -> Any:
        if isinstance(v, jex_core.Literal):
            return layers.CONST
        return env.get(v, layers.CONST)

    for eqn in jaxpr.eqns:
        data, param = layers.provenance(eqn, [read(v) for v in eqn.invars])
        for v in eqn.outvars:
            env[v] = layers.DATA if data else param or layers.CONST
    return [read(v) for v in jaxpr.outvars]


def body_provenances(eqn: Any, provs: Sequence[Any]) -> list:
    """The provenances of a `scan` body's inputs (consts, carry, xs).

    A carry that starts as a constant but takes data in the body is data.
    """
    nc, ncar = _split(eqn)
    body = primitives.sub_jaxprs(eqn)[0].jaxpr
    out = list(provs)
    for _ in range(ncar + 1):  # data can only spread; at most once per carry
        carry_out = _propagate(body, out)[:ncar]
        changed = False
        for k, p in enumerate(carry_out):
            if p is layers.DATA and out[nc + k] is not layers.DATA:
                out[nc + k], changed = layers.DATA, True
        if not changed:
            break
    return out


def _inner_scope(body: Any) -> str:
    """The scope that the whole body runs in (a linen module's name), if any.

    Flax linen's `nn.scan` runs the body inside the scanned module's scope;
    a `jax.named_scope` around part of a body is a layer of it, not the
    stack. A dotted scope (Equinox's ``eqx.nn.Linear``, the same for every
    Linear) names no layer.
    """
    firsts = {
        layers.scope_path(eqn.source_info.name_stack).split("/")[0] for eqn in body.eqns
    }
    if len(firsts) == 1:
        (first,) = firsts
        if "." not in first:
            return first
    return ""


def _param_stack(stacked: set[str], model_layers: set[str]) -> str:
    """The shortest path holding every stacked layer and no other.

    ``{"blocks/linear"}`` among ``{"embed", "blocks/linear", "head"}`` gives
    ``blocks``: the stack is the attribute holding the stacked module. The
    root (no path) only when the stacked layers share no path.
    """
    parts = [p.split("/") for p in sorted(stacked)]
    common: list[str] = []
    for column in zip(*parts):
        if len(set(column)) > 1:
            break
        common.append(column[0])
    for k in range(min(1, len(common)), len(common) + 1):  # "" if nothing else
        prefix = "/".join(common[:k])
        inside = {
            a
            for a in model_layers
            if not prefix or a == prefix or a.startswith(prefix + "/")
        }
        if inside <= stacked:
            return prefix
    return "/".join(common)


def stack_of(
    eqn: Any,
    scope: str,
    stacked: set[str],
    model_layers: set[str],
    opened: bool = True,
) -> Stack:
    """The `Stack` of a scan over layers.

    Its name is the scan's scope with the module scope opened in the body
    (linen's ``Net/layers``); without one, the scope around the scan
    (`jax.named_scope`); else the parameter path of the stack (NNX's
    ``blocks``, Equinox's ``layers``). With `opened` False the body's scope
    is left out: a scope around the body's own scan over layers alone (a
    ``jax.named_scope("sub")`` around it) names that stack, not this one,
    when both would have the same name.
    """
    body = primitives.sub_jaxprs(eqn)[0].jaxpr
    inner = _inner_scope(body) if opened else ""
    name = layers.join(scope, inner) if inner or scope else ""
    if not name:
        name = _param_stack(stacked, model_layers)
    return Stack(name, int(eqn.params["length"]), bool(eqn.params["reverse"]))


def loop_of(eqn: Any) -> Stack:
    """The `Stack` (no name) of a scan around a scan over layers."""
    return Stack(None, int(eqn.params["length"]), bool(eqn.params["reverse"]))


def run_scan(eqn: Any, invals: Sequence[Any], body: Callable) -> tuple[list, Any]:
    """``eqn`` (a `scan`) on `invals`, with `body` as its loop body.

    Args:
        eqn: the `scan` equation.
        invals: its operands (consts, initial carry, xs).
        body: ``body(args) -> (outs, extra)`` on the original body's inputs;
            `outs` are its outputs (carry, ys) and `extra` a pytree of arrays
            returned stacked over the iterations.

    Returns:
        (the equation's outputs, `extra` stacked).
    """
    nc, ncar = _split(eqn)
    consts, init, xs = invals[:nc], invals[nc : nc + ncar], invals[nc + ncar :]

    def step(carry: list, x: list) -> tuple:
        outs, extra = body([*consts, *carry, *x])
        return outs[:ncar], (outs[ncar:], extra)

    carry, (ys, extra) = lax.scan(
        step,
        list(init),
        list(xs),
        length=eqn.params["length"],
        reverse=eqn.params["reverse"],
        unroll=eqn.params["unroll"],
    )
    return [*carry, *ys], extra


def iterations(items: list, fixed: dict[int, int], index: tuple = ()):
    """(entry, iteration indices, layer name) of each of `items`, in program order.

    Args:
        items: (entry, name)s: entries with their `loops` (the `Stack` of
            every scan around them, outermost first; ``()`` for none) and
            their layer names in the innermost body.
        fixed: id of a loop around a stack -> the index to measure it at.
        index: the indices of the loops the items are inside.

    Yields:
        The entries of a scan's body once per iteration, in the order the
        iterations run, its index among the entry's indices; those of a
        loop around a stack once, with its index in `fixed`, else None
        (reduced over its iterations). Entries in no loop once, with ``()``.
    """
    depth, k = len(index), 0
    while k < len(items):
        e, name = items[k]
        if len(e.loops) == depth:
            yield e, index, layer_name(e.loops, name, index)
            k += 1
            continue
        loop, end = e.loops[depth], k + 1
        while end < len(items) and _within(items[end][0].loops, depth, loop):
            end += 1
        order = loop.order() if loop.name is not None else [fixed.get(id(loop))]
        for i in order:
            yield from iterations(items[k:end], fixed, (*index, i))
        k = end


def _within(loops: tuple, depth: int, loop: Stack) -> bool:
    return len(loops) > depth and loops[depth] is loop  # not an equal one


def select(red: reductions.Reduced, loops: tuple, index: tuple) -> reductions.Reduced:
    """The reductions of the iterations `index` of an equation in `loops`.

    `red` has one leading axis per loop; an index of None (a loop around a
    stack, reduced over) takes the largest of its maxima and the sum of its
    counts, and the moments of its last iteration run (the layer's last
    output).

    Examples:
        >>> import jax.numpy as jnp
        >>> from jaxnan._src.inspect import reductions, scan_layers
        >>> red = reductions.Reduced(
        ...     (jnp.array([[1.0, 2.0], [5.0, 3.0]]),),
        ...     (jnp.array([[0, 1], [2, 4]]),), None)
        >>> micro = scan_layers.Stack(None, 2, False)
        >>> stack = scan_layers.Stack("blocks", 2, False)
        >>> out = scan_layers.select(red, (micro, stack), (None, 1))
        >>> float(out.max_abs[0]), int(out.nonfinite[0])
        (3.0, 5)
    """
    at = tuple(slice(None) if i is None else i for i in index)
    last = tuple(loop.last() if i is None else i for loop, i in zip(loops, index))
    if any(i is None for i in index):
        max_abs = tuple(jnp.max(m[at]) for m in red.max_abs)
        bad = tuple(jnp.sum(b[at], dtype=jnp.int32) for b in red.nonfinite)
    else:
        max_abs = tuple(m[at] for m in red.max_abs)
        bad = tuple(b[at] for b in red.nonfinite)
    moments = None if red.moments is None else tuple(v[last] for v in red.moments)
    return reductions.Reduced(max_abs, bad, moments)


def layer_name(loops: tuple, name: str, index: tuple) -> str:
    """`name` with the index of each enclosing scan over layers.

    Innermost first, each after its stack's path; a loop around a stack
    adds none, and a gradient keeps its suffix at the end.

    Examples:
        >>> from jaxnan._src.inspect.scan_layers import Stack, layer_name
        >>> loops = (Stack(None, 3, False), Stack("blocks", 4, False),
        ...          Stack("blocks/sub", 2, False))
        >>> layer_name(loops, "blocks/sub/dense (grad)", (0, 2, 1))
        'blocks/2/sub/1/dense (grad)'
    """
    base = name.removesuffix(layers.GRAD_SUFFIX)
    full = base
    for loop, i in reversed(list(zip(loops, index))):
        full = loop.layer(full, i)
    return full + name[len(base) :]
