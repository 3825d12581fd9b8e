"""The capture pass: the concrete values of the event equation.

`blocks.detect` keeps the inputs of the block holding the first event;
`capture_event` re-runs that block alone with the `Capture` strategy, which
stores the inputs and outputs of the event equation (at the loop iteration
and device of the event) and stops the block there.

The values come back as `operands.Operand` summaries: read whole on the
host when this process holds them, left on the devices when they span
processes (the cause rules then ask for fixed-size answers, never the
whole value).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.extend import source_info_util

from jaxnan._src.core import hosts
from jaxnan._src.locate import interpreter, operands, strategies
from jaxnan._src.locate.blocks import EXTERNAL, Detection, compiler_options
from jaxnan._src.locate.strategies import Node

source_info_util.register_exclusion(__file__)


class Captured(NamedTuple):
    """The concrete values of the event equation (see `capture_event`).

    Attributes:
        inputs: its inputs (`operands.Operand`).
        outputs: its outputs (`operands.Operand`).
        device: under a sharded `jit`, the id of the device holding the first
            nonfinite element of its outputs (of any process); None when they
            are not split over devices.
    """

    inputs: list[operands.Operand]
    outputs: list[operands.Operand]
    device: int | None


def capture_event(
    det: Detection, node: Node, iteration: Sequence[int], device: int
) -> Captured:
    """Concrete inputs and outputs of the event equation (its block re-run).

    Args:
        det: the `Detection` holding the event.
        node: the event node (`det.nodes[det.index]`).
        iteration: the loop iterations of the event.
        device: the device position of the event, -1 outside device maps.

    Returns:
        The `Captured` values, and the device of the first nonfinite output
        element under a sharded `jit`.
    """
    block = det.event_block
    target = strategies.Target(node.index - det.event_offset, tuple(iteration), device)
    interp = interpreter.Interpreter(strategies.Capture(target), det.depth)
    interp.target_node = node
    marks = [EXTERNAL + k for k in range(len(block.invars))]

    def fn(args: list) -> Any:
        interp.nodes = []
        state, _ = interpreter.run_block(
            interp, block.entries, block.invars, [], args, marks
        )
        return state

    arrays = jax.jit(fn, compiler_options=compiler_options())(det.event_args)
    # A value spanning processes stays on its devices: every process asks it
    # the same fixed-size questions in the same order (lock-step).
    values = [operands.Operand(v) for v in arrays]
    n_in = len(node.in_avals)
    holder = None
    if node.shard is None:
        holder = _first_nonfinite_device(arrays[n_in:], values[n_in:])
    return Captured(values[:n_in], values[n_in:], holder)


def _first_nonfinite_device(
    arrays: Sequence[Any], values: Sequence[operands.Operand]
) -> int | None:
    """Id of the device holding the first nonfinite element, if split."""
    for arr, val in zip(arrays, values):
        if not np.issubdtype(val.dtype, np.inexact):
            continue
        bad = operands.stats(operands.nonfinite, val)
        if bad.count:
            return hosts.holder(arr, bad.index)
    return None
