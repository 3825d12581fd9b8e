"""masked-softmax-all-masked: a softmax over a row that a -inf mask can empty."""

from __future__ import annotations

import numpy as np
from jax.extend import source_info_util

from jaxnan._src.lint import graph, registry
from jaxnan._src.lint.graph import Node, Val

source_info_util.register_exclusion(__file__)

MASKED_SOFTMAX_ALL_MASKED = registry.rule(
    "masked-softmax-all-masked",
    "error",
    "softmax or logsumexp over a row masked with -inf where the mask can "
    "remove every entry: -inf - (-inf) = NaN",
    "fill with a finite large negative and guard the empty rows: "
    "jnp.where(mask, x, jnp.finfo(x.dtype).min), then "
    "jnp.where(mask.any(-1, keepdims=True), p, 0.0)",
    "jax.nn.softmax(jnp.where(mask, x, -jnp.inf))",
    "jax.nn.softmax(jnp.where(mask, x, jnp.finfo(x.dtype).min))",
)

_MASK_THROUGH = ("add", "sub", "max", "min", "convert_element_type", "mul")


def _has_neg_inf(v: Val) -> bool:
    return v.const is not None and bool(
        v.const.size and np.any(np.isneginf(np.asarray(v.const, np.float64)))
    )


def _select_mask(nd: Node, depth: int):
    for i in (1, 2):
        if _has_neg_inf(graph.strip(nd.ins[i])):
            return ("pred", nd.ins[0], i == 1)
    for i in (1, 2):
        found = find_neg_inf_mask(nd.ins[i], depth + 1)
        if found is not None:
            return found
    return None


def find_neg_inf_mask(v: Val, depth: int = 0):
    """('pred', pred, kept_if_true) | ('const', array) | None for a -inf mask."""
    v = graph.strip(v)
    if v.const is not None:
        return ("const", v.const) if _has_neg_inf(v) else None
    nd = v.node
    if nd is None or depth > 12:
        return None
    if nd.prim == "select_n" and len(nd.ins) == 3:
        return _select_mask(nd, depth)
    if nd.prim in _MASK_THROUGH:
        for x in nd.ins:
            found = find_neg_inf_mask(x, depth + 1)
            if found is not None:
                return found
    return None


def _from_iota(v: Val, depth: int = 0) -> bool:
    """True when `v` is an iota plus or minus constants."""
    v = graph.strip(v)
    nd = v.node
    if v.const is not None or nd is None or depth > 8:
        return False
    if nd.prim == "iota":
        return True
    if nd.prim in ("add", "sub"):
        others = [x for x in nd.ins if graph.scalar_const(x) is None]
        return len(others) == 1 and _from_iota(others[0], depth + 1)
    return nd.prim == "convert_element_type" and _from_iota(nd.ins[0], depth + 1)


def _offset(v: Val) -> float:
    """The constant added to the iota in `v`."""
    nd = graph.strip(v).node
    if nd is not None and nd.prim == "convert_element_type":
        return _offset(nd.ins[0])
    if nd is None or nd.prim not in ("add", "sub"):
        return 0.0
    total = 0.0
    for j, x in enumerate(nd.ins):
        negate = nd.prim == "sub" and j == 1
        k = graph.scalar_const(x)
        if k is not None:
            total += -k if negate else k
        elif not negate:
            total += _offset(x)
    return total


def _const_keeps_diagonal(arr: np.ndarray) -> bool:
    arr = np.asarray(arr, bool)
    if not arr.ndim:
        return bool(arr)
    return bool(arr.size) and bool(np.all(arr.reshape(-1, arr.shape[-1]).any(-1)))


def _compare_keeps_diagonal(nd: Node) -> bool:
    a, b = nd.ins if nd.prim == "ge" else nd.ins[::-1]
    # a >= b with a = iota_q + k (k >= 0), b = iota_k
    return _from_iota(a) and _from_iota(b) and _offset(a) - _offset(b) >= 0


def _select_keeps_diagonal(nd: Node, depth: int) -> bool:
    # tril/triu: select_n(g, false_case, true_case)
    f, t = graph.strip(nd.ins[1]), graph.strip(nd.ins[2])
    if f.const is None or np.any(f.const):
        return False
    return keeps_diagonal(nd.ins[0], depth + 1) and keeps_diagonal(t, depth + 1)


def _any_keeps_diagonal(nd: Node, depth: int) -> bool:
    return any(keeps_diagonal(x, depth + 1) for x in nd.ins)


def _all_keep_diagonal(nd: Node, depth: int) -> bool:
    return all(keeps_diagonal(x, depth + 1) for x in nd.ins)


_DIAGONAL_RULES = {
    "ge": lambda nd, depth: _compare_keeps_diagonal(nd),
    "le": lambda nd, depth: _compare_keeps_diagonal(nd),
    "or": _any_keeps_diagonal,
    "and": _all_keep_diagonal,
    "select_n": lambda nd, depth: (
        len(nd.ins) == 3 and _select_keeps_diagonal(nd, depth)
    ),
    "convert_element_type": lambda nd, depth: keeps_diagonal(nd.ins[0], depth + 1),
}


def keeps_diagonal(p: Val, depth: int = 0) -> bool:
    """True when the boolean mask `p` provably keeps the diagonal (causal)."""
    p = graph.strip(p)
    if p.const is not None:
        return _const_keeps_diagonal(p.const)
    nd = p.node
    if nd is None or depth > 8 or nd.prim not in _DIAGONAL_RULES:
        return False
    return _DIAGONAL_RULES[nd.prim](nd, depth)


def _can_empty_a_row(found) -> bool:
    if found[0] == "const":
        arr = np.asarray(found[1], np.float64)
        rows = arr.reshape(-1, arr.shape[-1]) if arr.ndim else arr.reshape(1, 1)
        return not np.all(np.isfinite(rows).any(-1))
    _, pred, kept_if_true = found
    return not (kept_if_true and keeps_diagonal(pred))


@registry.register(MASKED_SOFTMAX_ALL_MASKED)
def masked_softmax(ctx: registry.Context):
    """Finds softmaxes over -inf-masked rows that the mask can empty."""
    cons = graph.consumers(ctx.graph)
    for nd in ctx.graph.nodes:
        if (
            nd.prim != "exp"
            or graph.flows_to(cons, nd.outs[0], {"reduce_sum"}, 3) is None
        ):
            continue
        z = graph.strip(nd.ins[0])
        row = z.node.ins[0] if z.node is not None and z.node.prim == "sub" else z
        found = find_neg_inf_mask(row)
        if found is not None and _can_empty_a_row(found):
            yield registry.Hit(
                MASKED_SOFTMAX_ALL_MASKED,
                nd,
                "jaxnan: softmax/logsumexp over a row masked with -inf, and the "
                "mask can remove every entry of a row: max is -inf, "
                "-inf - (-inf) = NaN",
            )
