"""sqrt-zero-grad: the gradient of a norm or std where it is 0."""

from __future__ import annotations

from jax.extend import source_info_util

from jaxnan._src.lint import graph, patterns, registry
from jaxnan._src.lint.graph import Node
from jaxnan._src.lint.signs import NONNEG

source_info_util.register_exclusion(__file__)

SQRT_ZERO_GRAD = registry.rule(
    "sqrt-zero-grad",
    "error",
    "sqrt (jnp.linalg.norm, jnp.std) of a sum of squares or variance that "
    "can be exactly 0, differentiated: d sqrt(s)/ds = inf at 0",
    "optax.safe_norm(x, 1e-6), or jnp.sqrt(jnp.sum(x**2) + 1e-12)",
    "jnp.linalg.norm(x)",
    "optax.safe_norm(x, 1e-6)",
)

_WHAT = {
    "variance": "a variance (jnp.std)",
    "sum of squares": "a sum of squares (jnp.linalg.norm)",
}


def _is_root(nd: Node) -> bool:
    """sqrt, or a power between 0 and 1 (infinite derivative at 0)."""
    if nd.prim == "sqrt":
        return True
    if nd.prim != "pow":
        return False
    k = graph.scalar_const(nd.ins[1])
    return k is not None and 0 < k < 1


@registry.register(SQRT_ZERO_GRAD)
def sqrt_zero_grad(ctx: registry.Context):
    """Differentiated roots of values that are nonnegative and can be 0."""
    an = ctx.analysis
    for nd in ctx.graph.nodes:
        if not _is_root(nd) or id(nd) in ctx.claimed or not an.differentiated(nd):
            continue
        x = nd.ins[0]
        if an.sign(x) != NONNEG or patterns.has_guard_below(x):
            continue
        kind = patterns.square_kind(x) or "a value that can be 0"
        ctx.claimed.add(id(nd))
        yield registry.Hit(
            SQRT_ZERO_GRAD,
            nd,
            f"jaxnan: sqrt of {_WHAT.get(kind, kind)} that can be exactly 0, "
            "differentiated: its gradient is inf there and NaN after the chain "
            "rule (jax#3058)",
        )
