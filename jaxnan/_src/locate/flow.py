"""Data flow between the top-level units of an interpreted program.

`Flow` decides what `jaxnan.locate` reports: the phase the user observes
(forward, backward, update) and the cone of units the bad outputs depend on,
from the node table the interpreter builds (`interpreter.Node`).
"""

from __future__ import annotations

from collections.abc import Sequence

from jax.extend import source_info_util

from jaxnan._src.locate import interpreter
from jaxnan._src.locate.causes import Phase

source_info_util.register_exclusion(__file__)


class Flow:
    """Data flow between the top-level units of an interpreted program.

    A unit is a top-level equation (a loop, cond or call counts as one).
    ``gradish`` units depend on a transposed equation (the gradients and
    what consumes them); primal outputs are the outputs that do not (the
    loss and aux values).
    """

    def __init__(self, nodes: Sequence[interpreter.Node], out_producers):
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
        self.primal_outputs = [
            i for i, p in enumerate(self.out_producers) if p < 0 or not self.gradish[p]
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
        if any_bad and self.first_t is not None:
            return Phase.UPDATE if own == Phase.UPDATE else Phase.BACKWARD
        return own
