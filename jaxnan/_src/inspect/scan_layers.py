"""A stack of layers under `lax.scan`, measured one iteration at a time.

Scan over layers (Flax linen's `nn.scan`, NNX's `nnx.scan` over a stack made
by `nnx.vmap`, Equinox's `eqx.filter_vmap` plus `lax.scan`) runs one body
per layer, the layer's parameters sliced from stacked arrays. A `scan` whose
scanned operands (``xs``) hold parameters is such a stack: its body is
evaluated equation by equation inside a new `lax.scan` that also returns the
reductions of every measured equation as stacked outputs (``ys``), so that
one pass gives each iteration's statistics, and each iteration is reported
as its own layer (``blocks/3/linear``). A scan without parameters among its
``xs`` (a loop over time) is measured on its outputs, as one equation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from jax import lax
from jax.extend import core as jex_core
from jax.extend import source_info_util

from jaxnan._src.core import primitives
from jaxnan._src.inspect import layers

source_info_util.register_exclusion(__file__)


class Stack(NamedTuple):
    """One scan over layers (static).

    Attributes:
        name: the layer path the iteration index goes after (``blocks``,
            ``Net/layers``; empty for a model that is the stack itself).
        length: the number of iterations (layers).
        reverse: whether the scan runs from the last slice to the first.
    """

    name: str
    length: int
    reverse: bool

    def order(self) -> range:
        """The iteration indices in the order they run."""
        n = self.length
        return range(n - 1, -1, -1) if self.reverse else range(n)

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
        """
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


def stack_of(eqn: Any, scope: str, stacked: set[str], model_layers: set[str]) -> Stack:
    """The `Stack` of a scan over layers.

    Its name is the scan's scope with the module scope opened in the body
    (linen's ``Net/layers``); without one, the scope around the scan
    (`jax.named_scope`); else the parameter path of the stack (NNX's
    ``blocks``, Equinox's ``layers``).
    """
    body = primitives.sub_jaxprs(eqn)[0].jaxpr
    inner = _inner_scope(body)
    name = layers.join(scope, inner) if inner or scope else ""
    if not name:
        name = _param_stack(stacked, model_layers)
    return Stack(name, int(eqn.params["length"]), bool(eqn.params["reverse"]))


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
