"""Data flow between the top-level units of an interpreted program.

`Flow` decides what `jaxnan.locate` reports: the phase the user observes
(forward, backward, update) and the cone of units the bad outputs depend on,
from the node table the interpreter builds (`interpreter.Node`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jax.extend import core as jex_core
from jax.extend import source_info_util

from jaxnan._src.core import primitives
from jaxnan._src.locate import interpreter
from jaxnan._src.locate.causes import Phase

source_info_util.register_exclusion(__file__)


def _transposed(eqn: Any) -> bool:
    return "transpose(" in str(eqn.source_info.name_stack)


def _holds_transpose(eqn: Any) -> bool:
    """Whether `eqn` or an equation of its bodies is transposed."""
    if _transposed(eqn):
        return True
    return any(
        any(map(_holds_transpose, sub.jaxpr.eqns))
        for sub in primitives.sub_jaxprs(eqn, strict=False)
    )


def from_transpose(jaxpr: Any, tainted: Sequence[bool] | None = None) -> list[bool]:
    """Per output of `jaxpr`: whether it depends on a transposed equation.

    The gradients a function returns do, its loss does not, also when both
    come out of one loop (gradient accumulation: a `scan` over microbatches
    whose body runs `jax.value_and_grad`). A `scan` is read as one of its
    iterations: a carry the body updates with its own gradients does, and
    the losses a training loop computes from the parameters it carries do
    not (they are the forward pass of their step). A call's outputs map to
    its body's; any other higher-order equation holding a transposed one
    taints all its outputs.

    Args:
        jaxpr: an open `jax.extend.core.Jaxpr`.
        tainted: per input, whether it already depends on one (none).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from jaxnan._src.locate.flow import from_transpose
        >>> f = jax.value_and_grad(lambda w: jnp.sum(jnp.sin(w)))
        >>> from_transpose(jax.make_jaxpr(f)(jnp.ones(2)).jaxpr)
        [False, True]
    """
    bad: set[Any] = set()
    for v, t in zip(jaxpr.invars, tainted or [False] * len(jaxpr.invars)):
        if t:
            bad.add(v)

    def of(v: Any) -> bool:
        return not isinstance(v, jex_core.Literal) and v in bad

    for eqn in jaxpr.eqns:
        outs = _eqn_from_transpose(eqn, [of(v) for v in eqn.invars])
        bad.update(v for v, t in zip(eqn.outvars, outs) if t)
    return [of(v) for v in jaxpr.outvars]


def _eqn_from_transpose(eqn: Any, ins: list[bool]) -> list[bool]:
    n = len(eqn.outvars)
    if _transposed(eqn):
        return [True] * n
    subs = primitives.sub_jaxprs(eqn, strict=False)
    if not subs:
        return [any(ins)] * n
    if eqn.primitive.name == "scan":  # one iteration: its own gradients
        return from_transpose(subs[0].jaxpr, ins)
    if len(subs) == 1 and subs[0].role is primitives.Role.CALL:
        body = subs[0].jaxpr
        if len(body.invars) == len(ins) and len(body.outvars) == n:
            return from_transpose(body, ins)
    return [any(ins) or _holds_transpose(eqn)] * n


class Flow:
    """Data flow between the top-level units of an interpreted program.

    A unit is a top-level equation (a loop, cond or call counts as one).
    ``gradish`` units depend on a transposed equation (the gradients and
    what consumes them); primal outputs are the outputs that do not (the
    loss and aux values). `gradient_outputs` (`from_transpose` of the
    program) says it per output, for a unit that gives both (a loop over
    microbatches returning losses and accumulated gradients).
    """

    def __init__(
        self,
        nodes: Sequence[interpreter.Node],
        out_producers,
        gradient_outputs: Sequence[bool] = (),
    ):
        self.nodes = nodes
        self.out_producers = tuple(out_producers)
        n = len(nodes)
        self.gradish = [False] * n
        self.first_t = None
        for node in nodes:
            if node.unit != node.index:
                continue
            t = "transpose(" in node.name_stack
            if t and self.first_t is None:
                self.first_t = node.index
            self.gradish[node.index] = t or any(self.gradish[p] for p in node.producers)
        grads = list(gradient_outputs) or [False] * len(self.out_producers)
        # Gradients come out of the program, transposed at the top level or
        # inside a unit (a loop over microbatches).
        self.differentiates = self.first_t is not None or any(grads)
        self.primal_outputs = [
            i
            for i, p in enumerate(self.out_producers)
            if (p < 0 or not self.gradish[p]) and not grads[i]
        ]
        self.feeds_primal = self.cone(self.primal_outputs)

    def cone(self, outputs: Sequence[int]) -> set[int]:
        """The units the given outputs depend on."""
        seen: set[int] = set()
        stack = [self.out_producers[i] for i in outputs if self.out_producers[i] >= 0]
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            stack.extend(self.nodes[i].producers)
        return seen

    def node_phase(self, node: interpreter.Node) -> Phase:
        """The phase of a node by data flow (see `locate`)."""
        ns = node.name_stack
        if "transpose(" in ns:
            return Phase.BACKWARD
        u = node.unit
        if "jvp(" not in ns:
            if self.gradish[u] or (
                self.first_t is not None
                and u > self.first_t
                and u not in self.feeds_primal
            ):
                return Phase.UPDATE
            return Phase.FORWARD
        if self.feeds_primal and u not in self.feeds_primal:
            return Phase.BACKWARD
        return Phase.FORWARD

    def observed(self, bad_outputs: Sequence[int]) -> tuple[set[int] | None, bool]:
        """(the cone of what went bad, whether a primal output is bad)."""
        bad_primal = [i for i in bad_outputs if i in self.primal_outputs]
        if bad_primal:
            return self.cone(bad_primal), True
        if bad_outputs:
            return self.cone(bad_outputs), False
        return None, False

    def phase(self, node: interpreter.Node, bad_primal: bool, any_bad: bool) -> Phase:
        """What the user observes, given the event node and the bad outputs."""
        own = self.node_phase(node)
        if bad_primal:
            return Phase.FORWARD
        if any_bad and self.differentiates:
            return Phase.UPDATE if own == Phase.UPDATE else Phase.BACKWARD
        return own
