"""The gradient bracket of an incident: which parameters' gradients went bad.

At an incident (never on a healthy step) the guard traces the bad step once
more, holding the update, and reads the gradients `jaxnan.skip_nonfinite`
received: one finiteness flag and one count per leaf, compiled once and run
on the bad step's state and batch. The leaves are put in model order, the
order in which the forward pass uses them, read from the backward pass that
produces their gradients in reverse (ties, leaves made by one equation, keep
their tree order). The bracket names the leaves whose gradients are
nonfinite and the nearest leaves on each side that stayed finite, the
evidence that localised a kernel bug to one layer in radixark/miles#2198.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core
from jax.extend import source_info_util

from jaxnan._src.core import compat, dtypes, errors
from jaxnan._src.guard import program
from jaxnan._src.transforms import update_tap

source_info_util.register_exclusion(__file__)

SHOWN = 6
"""Nonfinite leaves the incident's text names (the JSONL record has all)."""


@dataclasses.dataclass(frozen=True)
class Bracket:
    """The gradient leaves of a bad step, in model order.

    Attributes:
        nonfinite: paths of the leaves whose gradients hold NaN/Inf, in
            model order (``['fc2']['kernel']``), with their counts.
        finite_before: the nearest leaf before the first nonfinite one whose
            gradient stayed finite (None when there is none).
        finite_after: the nearest such leaf after the last nonfinite one.
        leaves: the number of gradient leaves.
    """

    nonfinite: dict[str, int]
    finite_before: str | None
    finite_after: str | None
    leaves: int

    def to_dict(self) -> dict[str, Any]:
        """Plain values for the JSONL record."""
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        if not self.nonfinite:
            return f"gradients: all {self.leaves} leaves finite"
        names = list(self.nonfinite)
        shown = ", ".join(names[:SHOWN]) + (", ..." if len(names) > SHOWN else "")
        near = [
            f"{p} {side}"
            for p, side in (
                (self.finite_before, "before"),
                (self.finite_after, "after"),
            )
            if p is not None
        ]
        if near:
            tail = f"; nearest finite: {', '.join(near)}"
        elif len(names) == self.leaves:
            tail = "; none finite"
        else:  # the finite leaves lie between the first and the last
            tail = "; the finite ones lie between them"
        return (
            f"gradients: nonfinite in {shown} ({len(names)} of {self.leaves} leaves, "
            f"model order){tail}"
        )


def bracket_of(paths: Sequence[str], counts: Sequence[int]) -> Bracket:
    """The bracket of leaves in model order with their nonfinite counts.

    Examples:
        >>> b = bracket_of(["a", "b", "c", "d"], [0, 3, 1, 0])
        >>> b.nonfinite, b.finite_before, b.finite_after
        ({'b': 3, 'c': 1}, 'a', 'd')
        >>> str(bracket_of(["a", "b"], [0, 2]))[:40]
        'gradients: nonfinite in b (1 of 2 leaves'
        >>> str(bracket_of(["a", "b", "c"], [1, 0, 1])).split("; ")[1]
        'the finite ones lie between them'
    """
    bad = [i for i, c in enumerate(counts) if c]
    if not bad:
        return Bracket({}, None, None, len(paths))
    before = [i for i in range(bad[0]) if not counts[i]]
    after = [i for i in range(bad[-1] + 1, len(paths)) if not counts[i]]
    return Bracket(
        {paths[i]: int(counts[i]) for i in bad},
        paths[before[-1]] if before else None,
        paths[after[0]] if after else None,
        len(paths),
    )


def _gradients_fn(fn: Callable, layout: program.Layout, paths: list[str]) -> Callable:
    """``(state, inputs) -> gradient leaves``; `paths` filled while tracing."""

    def gradients(state: list, inputs: list) -> list:
        args = program.rebuild(layout, state, inputs)
        with update_tap.collect_updates(jnp.array(True)) as tapped:
            fn(*args)
        out = []
        for r in tapped:
            if r.incoming is None or not compat.in_current_trace(r.norm):
                continue  # a record of a scan body's tracers
            flat, _ = jax.tree_util.tree_flatten_with_path(r.incoming)
            for p, g in flat:
                if dtypes.is_inexact_dtype(g.dtype):
                    paths.append(jax.tree_util.keystr(p))
                    out.append(g)
        return out

    return gradients


def _model_order(closed: Any) -> list[int]:
    """Output positions in model order: produced last in the backward pass first."""
    made = {}
    for k, eqn in enumerate(closed.jaxpr.eqns):
        for v in eqn.outvars:
            made[v] = k
    outs = closed.jaxpr.outvars
    when = [-1 if isinstance(v, jex_core.Literal) else made.get(v, -1) for v in outs]
    return sorted(range(len(outs)), key=lambda i: (-when[i], i))


def gradient_bracket(
    fn: Callable, layout: program.Layout, state: list, inputs: list
) -> Bracket | None:
    """The bracket of a bad step (one trace and one compile), or None.

    None when the step hands no gradients to `jaxnan.skip_nonfinite` that
    the guard can read (several optimizer steps in one `lax.scan`).
    """
    paths: list[str] = []
    gradients = _gradients_fn(fn, layout, paths)
    closed = jax.make_jaxpr(gradients)(state, inputs)
    if not paths:
        return None
    order = _model_order(closed)
    evaluate = jex_core.jaxpr_as_fun(closed)

    def counts(state: list, inputs: list) -> jax.Array:
        leaves = jax.tree_util.tree_leaves((state, inputs))
        grads = evaluate(*leaves)
        return jnp.stack([jnp.sum(~jnp.isfinite(g)).astype(jnp.int32) for g in grads])

    found = np.asarray(jax.jit(counts)(state, inputs))
    return bracket_of([paths[i] for i in order], [int(found[i]) for i in order])


def safe_bracket(
    fn: Callable, layout: program.Layout, state: list, inputs: list
) -> Bracket | None:
    """`gradient_bracket`, or None when it cannot be computed (never raises)."""
    try:
        return gradient_bracket(fn, layout, state, inputs)
    except Exception:  # noqa: BLE001 - evidence never hides the incident
        return None


def term_name(diagnosis: Any) -> str | None:
    """The loss term of a diagnosis, by name or ``file:line`` (None: no sum)."""
    term = getattr(diagnosis, "loss_term", None)
    if not term:
        return None
    return term["name"] or errors.shown_where(term["file"], term["line"])
