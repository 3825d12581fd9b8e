"""Which term of a summed loss went nonfinite first.

A loss is often a sum of terms (``ce + 0.1 * l2 + kl``, ``sum(losses.values())``,
the aux metrics of ``has_aux``), and a NaN in one makes the sum NaN, so the
loss alone cannot tell which (neosr-project/neosr#87: "impossible since all
losses are summed"). `first_term` walks back from the nonfinite scalar loss
through the additions (and scalings: ``0.1 * l2``, a cast) of the node table
the interpreter built, to the terms, and names the one whose computation
holds the first creation event: by its key when the step also returns it
(``aux["kl"]``), else by the name it is assigned to on its line (``kl = ...``),
else by its function, with the line.
"""

from __future__ import annotations

import linecache
import re
from collections.abc import Sequence
from typing import Any

from jax.extend import source_info_util

from jaxnan._src.core import frames

source_info_util.register_exclusion(__file__)

_SUMS = ("add", "sub", "add_any")
# One-operand steps a term passes through on its way into the sum: a weight
# (0.1 * l2, l2 / n), a sign, a cast, a reshape of a scalar.
_SCALINGS = ("mul", "div", "neg", "convert_element_type", "reshape", "squeeze")
_MAX_TERMS = 64
_KEY = re.compile(r"\[['\"]?([^'\"\]]+)['\"]?\]$")
_ASSIGNED = re.compile(r"^\s*([A-Za-z_]\w*)\s*(?::[^=]+)?=(?!=)")


def _expand(nodes: Sequence[Any], i: int, out: dict, chain: tuple = ()) -> None:
    """Adds the terms of the sum that node `i` computes (itself if none).

    `out` maps each term to the scaling nodes between it and the sum
    (``fit`` is the division of a mean: the step may return either).
    """
    node = nodes[i]
    name = node.eqn.primitive.name
    prods = node.producers
    if len(chain) < 200 and len(out) < _MAX_TERMS:
        if name in _SUMS and prods:
            for q in prods:
                _expand(nodes, q, out)
            return
        if name in _SCALINGS and len(prods) == 1:
            _expand(nodes, prods[0], out, (*chain, i))
            return
    out.setdefault(i, chain)


def _cone(nodes: Sequence[Any], i: int) -> set[int]:
    seen: set[int] = set()
    stack = [i]
    while stack:
        j = stack.pop()
        if j not in seen:
            seen.add(j)
            stack.extend(nodes[j].producers)
    return seen


def _frame_label(node: Any) -> dict[str, Any]:
    """The term's line, and the name assigned on it (or its function's)."""
    where: dict[str, Any] = {"name": None, "file": None, "line": None, "code": None}
    frame, _ = frames.node_frame(node)
    if frame is None:
        return where
    code = linecache.getline(frame.file_name, frame.line_num).strip()
    where.update(file=frame.file_name, line=frame.line_num, code=code or None)
    assigned = _ASSIGNED.match(code)
    if assigned:
        where["name"] = assigned.group(1)
    elif code.startswith("return") and frame.function_name != "<lambda>":
        where["name"] = frame.function_name
    return where


def _label(nodes, out_producers, out_paths, term: int, chain) -> dict[str, Any]:
    """Name and line of one term (see the module)."""
    where = _frame_label(nodes[term])
    mine = {term, *chain}
    for k, p in enumerate(out_producers):
        key = _KEY.search(out_paths[k]) if p in mine else None
        if key and not key.group(1).isdigit():
            where["name"] = key.group(1)
            break
    return where


def _terms(nodes: Sequence[Any], producer: int) -> dict[int, tuple]:
    """The terms of the sum a node computes, in program order (see `_expand`)."""
    found: dict[int, tuple] = {}
    _expand(nodes, producer, found)
    return dict(sorted(found.items()))


def first_term(
    nodes: Sequence[Any],
    out_producers: Sequence[int],
    out_paths: Sequence[str],
    out_shapes: Sequence[tuple[int, ...]],
    bad_outputs: Sequence[int],
    event_unit: int,
) -> dict[str, Any] | None:
    """The term of the nonfinite scalar loss that holds the first event.

    Args:
        nodes: the interpreter's node table (top-level units with producers).
        out_producers: the producing node of each output (-1 for none).
        out_paths: the leaf path of each output (``output[0][1]['kl']``).
        out_shapes: the shape of each output.
        bad_outputs: the indices of the nonfinite primal outputs.
        event_unit: the unit of the creation event.

    Returns:
        ``{"name", "file", "line", "code", "terms"}`` (``terms``: every term's
        name or ``line N``, in program order), or None when no nonfinite
        scalar output is a sum of two terms or more.
    """
    for k in bad_outputs:
        scalar = out_producers[k] >= 0 and tuple(out_shapes[k]) == ()
        terms = _terms(nodes, out_producers[k]) if scalar else {}
        hits = [t for t in terms if event_unit in _cone(nodes, t)]
        if len(terms) >= 2 and hits:
            labels = [
                _label(nodes, out_producers, out_paths, *t) for t in terms.items()
            ]
            return {**labels[list(terms).index(hits[0])], "terms": _names(labels)}
    return None


def _names(labels: Sequence[dict[str, Any]]) -> list[str]:
    return [lab["name"] or f"line {lab['line']}" for lab in labels]
