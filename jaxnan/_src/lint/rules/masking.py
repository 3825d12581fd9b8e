"""masked-softmax-all-masked: a softmax over a row that a -inf mask can empty."""

from __future__ import annotations

import numpy as np
from jax.extend import source_info_util

from jaxnan._src.lint import graph, registry, witness
from jaxnan._src.lint.graph import Node, Val

source_info_util.register_exclusion(__file__)

MASKED_SOFTMAX_ALL_MASKED = registry.rule(
    "masked-softmax-all-masked",
    "error",
    "softmax or logsumexp over a row masked with -inf where the mask can "
    "remove every entry: -inf - (-inf) = NaN (a causal mask keeps the "
    "diagonal; with a key-padding mask, right padding is assumed: each "
    "sequence's first token is real)",
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


def _select_masks(nd: Node, depth: int) -> list:
    found = []
    for i in (1, 2):
        if _has_neg_inf(graph.strip(nd.ins[i])):
            found.append(("pred", nd.ins[0], i == 1))
        else:
            found += find_neg_inf_masks(nd.ins[i], depth + 1)
    return found


def find_neg_inf_masks(v: Val, depth: int = 0) -> list:
    """The -inf masks that reach `v`, all applied together.

    Each is ``('pred', pred, kept_if_true)`` (a where filling -inf) or
    ``('const', array)`` (an additive bias); [] when no -inf reaches `v`.
    """
    v = graph.strip(v)
    if v.const is not None:
        return [("const", v.const)] if _has_neg_inf(v) else []
    nd = v.node
    if nd is None or depth > 12:
        return []
    if nd.prim == "select_n" and len(nd.ins) == 3:
        return _select_masks(nd, depth)
    found = []
    if nd.prim in _MASK_THROUGH:
        for x in nd.ins:
            if nd.prim == "max" and _has_neg_inf(graph.strip(x)):
                continue  # max(x, -inf) = x: jnp.max(..., initial=-jnp.inf)
            found += find_neg_inf_masks(x, depth + 1)
    return found


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


# What a keep-mask provably keeps in every row: the diagonal (a causal mask),
# the first key (a causal mask; a key-padding mask, assuming sequences are
# right-padded so that their first token is real), or some entry.
DIAG, FIRST, NONEMPTY = "diagonal", "first key", "an entry"
_ALL = frozenset({DIAG, FIRST, NONEMPTY})


def _rows(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    return arr.reshape(-1, arr.shape[-1]) if arr.ndim else arr.reshape(1, 1)


def _const_keeps(arr: np.ndarray) -> frozenset:
    rows = _rows(np.asarray(arr, bool))
    kept = set()
    if rows.size and np.all(rows.any(-1)):
        kept.add(NONEMPTY)
        if np.all(rows[:, 0]):
            kept.add(FIRST)
    if arr.ndim >= 2:
        n = min(arr.shape[-2:])
        diag = np.diagonal(np.asarray(arr, bool), axis1=-2, axis2=-1)[..., :n]
        if diag.size and np.all(diag) and arr.shape[-2] <= arr.shape[-1]:
            kept.add(DIAG)
    return frozenset(kept)


def _compare_keeps(nd: Node) -> frozenset:
    a, b = nd.ins if nd.prim == "ge" else nd.ins[::-1]
    # a >= b with a = iota_q + k (k >= 0), b = iota_k
    if _from_iota(a) and _from_iota(b) and _offset(a) - _offset(b) >= 0:
        return frozenset({DIAG, FIRST, NONEMPTY})
    return frozenset()


def _select_keeps(nd: Node, depth: int) -> frozenset:
    # tril/triu: select_n(g, false_case, true_case)
    f, t = graph.strip(nd.ins[1]), graph.strip(nd.ins[2])
    if len(nd.ins) != 3 or f.const is None or np.any(f.const):
        return frozenset()
    return keeps(nd.ins[0], depth + 1) & keeps(t, depth + 1)


def _union(nd: Node, depth: int) -> frozenset:
    return frozenset().union(*(keeps(x, depth + 1) for x in nd.ins))


def _intersection(nd: Node, depth: int) -> frozenset:
    return _ALL.intersection(*(keeps(x, depth + 1) for x in nd.ins))


_KEEP_RULES = {
    "ge": lambda nd, depth: _compare_keeps(nd),
    "le": lambda nd, depth: _compare_keeps(nd),
    "or": _union,
    "and": _intersection,
    "mul": _intersection,
    "select_n": _select_keeps,
    "convert_element_type": lambda nd, depth: keeps(nd.ins[0], depth + 1),
}


def _constant_along_queries(v: Val) -> bool:
    """True when `v` (a data mask) is broadcast along the query axis (-2)."""
    for _ in range(16):
        shape = getattr(v.aval, "shape", ())
        if len(shape) >= 2 and shape[-2] == 1:
            return True
        nd = v.node
        if nd is None or len(shape) < 2:
            return False
        if nd.prim == "broadcast_in_dim":
            dims, axis = nd.params["broadcast_dimensions"], len(shape) - 2
            return axis not in dims or nd.ins[0].aval.shape[dims.index(axis)] == 1
        if nd.prim not in ("convert_element_type", "copy"):
            return False
        v = nd.ins[0]
    return False


def keeps(p: Val, depth: int = 0) -> frozenset:
    """What the boolean keep-mask `p` provably keeps in every row."""
    if _constant_along_queries(p) and graph.strip(p).const is None:
        return frozenset({FIRST, NONEMPTY})  # a key-padding mask
    p = graph.strip(p)
    if p.const is not None:
        return _const_keeps(p.const)
    nd = p.node
    if nd is None or depth > 8 or nd.prim not in _KEEP_RULES:
        return frozenset()
    return _KEEP_RULES[nd.prim](nd, depth)


def keeps_diagonal(p: Val) -> bool:
    """True when the boolean mask `p` provably keeps the diagonal (causal)."""
    return DIAG in keeps(p)


def _mask_keeps(found) -> frozenset:
    if found[0] == "const":
        return _const_keeps(np.isfinite(np.asarray(found[1], np.float64)))
    _, pred, kept_if_true = found
    return keeps(pred) if kept_if_true else frozenset()


def can_empty_a_row(masks: list) -> bool:
    """True unless the masks, applied together, keep an entry in every row."""
    common = _ALL.intersection(*(_mask_keeps(m) for m in masks))
    if len(masks) == 1:
        return not common
    return not common & {DIAG, FIRST}


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
        masks = find_neg_inf_masks(row)
        if masks and can_empty_a_row(masks):
            total = graph.flows_to(cons, nd.outs[0], {"reduce_sum"}, 3)
            log = graph.flows_to(cons, total.outs[0], {"log"}, 3, through={"abs"})
            checked = (log or nd).outs[0]  # logsumexp: log(0); softmax: exp(NaN)
            yield registry.Hit(
                MASKED_SOFTMAX_ALL_MASKED,
                nd,
                "jaxnan: softmax/logsumexp over a row masked with -inf where "
                "the mask can remove every entry (a padded query, an empty "
                "sequence): the row's max is -inf and -inf - (-inf) = NaN",
                witness=witness.Witness(  # the masks as computed, data masks False
                    "with every data mask False (token ids 0)",
                    None,
                    witness.full(0.0),
                    checked,
                ),
            )
