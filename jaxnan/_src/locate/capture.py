"""The capture pass: the concrete values of the event equation.

`blocks.detect` keeps the inputs of the block holding the first event;
`capture_event` re-runs that block alone with the `Capture` strategy, which
stores the inputs and outputs of the event equation (at the loop iteration
and device of the event) and stops the block there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.extend import source_info_util

from jaxnan._src.core import hosts
from jaxnan._src.locate import interpreter, strategies
from jaxnan._src.locate.blocks import EXTERNAL, Detection, compiler_options
from jaxnan._src.locate.strategies import Node

source_info_util.register_exclusion(__file__)


class Captured(NamedTuple):
    """The concrete values of the event equation (see `capture_event`).

    Attributes:
        inputs: its inputs, as numpy arrays.
        outputs: its outputs, as numpy arrays.
        device: under a sharded `jit`, the id of the device holding the first
            nonfinite element of its outputs (of any process); None when they
            are not split over devices.
    """

    inputs: list[np.ndarray]
    outputs: list[np.ndarray]
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
    # Under several processes an event value spanning them is gathered to
    # every process (the same arrays in the same order on each: lock-step).
    values = [hosts.read(v) for v in arrays]
    n_in = len(node.in_avals)
    holder = None
    if node.shard is None:
        holder = _first_nonfinite_device(arrays[n_in:], values[n_in:])
    return Captured(values[:n_in], values[n_in:], holder)


def _first_nonfinite_device(arrays: Sequence[Any], values: Sequence[Any]) -> Any:
    """Id of the device holding the first nonfinite element, if split."""
    for arr, val in zip(arrays, values):
        if not np.issubdtype(val.dtype, np.inexact):
            continue
        bad = np.flatnonzero(~np.isfinite(val))
        if bad.size == 0:
            continue
        sharding = getattr(arr, "sharding", None)
        if sharding is None or sharding.is_fully_replicated:
            return None
        where = np.unravel_index(int(bad[0]), val.shape)
        holders = [
            d.id
            for d, idx in sharding.devices_indices_map(val.shape).items()
            if all(i in range(*s.indices(n)) for i, s, n in zip(where, idx, val.shape))
        ]
        return min(holders) if holders else None
    return None
