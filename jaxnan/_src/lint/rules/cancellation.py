"""low-precision-variance: mean(x**2) - mean(x)**2 in float16 or bfloat16."""

from __future__ import annotations

import jax
import numpy as np
from jax.extend import source_info_util

from jaxnan._src.core import primitives
from jaxnan._src.lint import graph, registry, witness
from jaxnan._src.lint.graph import Node, Val

source_info_util.register_exclusion(__file__)

LOW_PRECISION_VARIANCE = registry.rule(
    "low-precision-variance",
    "warning",
    "a variance computed as mean(x**2) - mean(x)**2 in float16/bfloat16: "
    "when the std is small next to the mean the two terms round to the same "
    "value, and the variance is 0 or negative (sqrt: NaN; rsqrt: inf)",
    "two passes, jnp.mean(jnp.square(x - mean)), or the statistics in "
    "float32 (x.astype(jnp.float32)), as flax.linen.LayerNorm computes them",
    "jnp.mean(x16 * x16) - jnp.mean(x16) ** 2",
    "jnp.var(x16.astype(jnp.float32))",
)


def _mean_of(v: Val) -> Val | None:
    """The x of `v` = mean(x) (or a scaled sum), else None."""
    for _ in range(8):
        nd = graph.strip(v).node
        if nd is None:
            return None
        if nd.prim == "reduce_sum":
            return graph.strip(nd.ins[0])
        if nd.prim in ("div", "mul") and graph.is_const(nd.ins[1]):
            v = nd.ins[0]
        else:
            return None
    return None


def _squared(v: Val) -> Val | None:
    """The x of `v` = x**2, else None."""
    nd = graph.strip(v).node
    if nd is None:
        return None
    if nd.prim == "square" or (nd.prim == "integer_pow" and nd.params["y"] == 2):
        return graph.strip(nd.ins[0])
    if nd.prim == "mul" and graph.strip(nd.ins[0]) is graph.strip(nd.ins[1]):
        return graph.strip(nd.ins[0])
    return None


def _cancelling(nd: Node) -> Val | None:
    """The x of `nd` = mean(x**2) - mean(x)**2, else None."""
    if nd.prim != "sub":
        return None
    mean_sq = _mean_of(nd.ins[0])
    sq_mean = _squared(nd.ins[1])
    x = None if mean_sq is None else _squared(mean_sq)
    if x is None or sq_mean is None or _mean_of(sq_mean) is not x:
        return None
    return x


def _collapses(out) -> bool:
    a = np.asarray(out, np.float64)
    return bool(np.any(~np.isfinite(a) | (a <= 0)))


def _near_constant(aval):
    """3 everywhere but one element 3 (1 + 2 eps): a small, positive variance."""
    x = np.full(aval.shape, 3.0, np.float64)
    x.reshape(-1)[0] = 3.0 * (1 + 2 * float(jax.numpy.finfo(aval.dtype).eps))
    return x.astype(aval.dtype)


@registry.register(LOW_PRECISION_VARIANCE)
def variance_cancellation(ctx: registry.Context):
    """One-pass variances (E[x^2] - E[x]^2) in a 16-bit float."""
    for nd in ctx.graph.nodes:
        if not nd.outs or nd.outs[0].dtype not in primitives.LOW_PRECISION:
            continue
        x = _cancelling(nd)
        if x is None:
            continue
        ctx.claimed.add(id(nd))  # log-not-positive: the root of this variance
        dt = nd.outs[0].dtype
        res = float(jax.numpy.finfo(dt).eps)
        yield registry.Hit(
            LOW_PRECISION_VARIANCE,
            nd,
            f"jaxnan: variance as mean(x**2) - mean(x)**2 in {dt.name} (relative "
            f"resolution {res:.2g}): once the std is below about "
            f"{np.sqrt(res):.0%} of the mean, both terms round to the same value "
            "and the variance is 0 or negative, so sqrt gives NaN and rsqrt inf",
            witness=witness.Witness(
                "with x = 3 everywhere but one element 3 (1 + 2 eps)",
                x,
                _near_constant,
                nd.outs[0],
                bad=_collapses,
            ),
        )
