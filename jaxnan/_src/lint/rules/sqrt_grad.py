"""Gradients that are infinite at 0: sqrt of a norm or std, arctan2 at (0, 0)."""

from __future__ import annotations

from jax.extend import source_info_util

from jaxnan._src.lint import graph, patterns, registry, witness
from jaxnan._src.lint.graph import Node
from jaxnan._src.lint.signs import NONNEG, NONZERO, POS

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
ATAN2_ZERO_GRAD = registry.rule(
    "atan2-zero-grad",
    "error",
    "arctan2(dy, dx) of computed values that can both be 0 (a difference of "
    "two points that coincide), differentiated: its gradient "
    "(dx, -dy) / (dx**2 + dy**2) is 0/0 = NaN there",
    "guard the origin: ok = (dx != 0) | (dy != 0); jnp.where(ok, "
    "jnp.arctan2(jnp.where(ok, dy, 0.0), jnp.where(ok, dx, 1.0)), 0.0)",
    "jnp.arctan2(x - y, logits - y)",
    "jnp.arctan2(x - y, jnp.abs(logits - y) + 1e-3)",
)

_FIXES = {
    "variance": "add eps to the variance: jnp.sqrt(var + 1e-5) (a LayerNorm: "
    "(x - mean) * jax.lax.rsqrt(var + 1e-5))",
    "sum of squares": SQRT_ZERO_GRAD.fix,
}
_WHAT = {
    "variance": "a variance (jnp.std), 0 when all values are equal",
    "sum of squares": "a sum of squares (jnp.linalg.norm), 0 for an all-zero vector",
}


def _is_root(nd: Node) -> bool:
    """sqrt, or a power between 0 and 1 (infinite derivative at 0)."""
    if nd.prim == "sqrt":
        return True
    if nd.prim != "pow":
        return False
    k = graph.scalar_const(nd.ins[1])
    return k is not None and 0 < k < 1


def _sqrt_hit(nd: Node) -> registry.Hit:
    kind = patterns.square_kind(nd.ins[0])
    what = _WHAT.get(kind, "a value that is exactly 0 for some inputs")
    return registry.Hit(
        SQRT_ZERO_GRAD,
        nd,
        f"jaxnan: sqrt of {what}, differentiated: d sqrt(s)/ds = inf at s = 0, "
        "NaN after the chain rule (jax#3058)",
        fix=_FIXES.get(kind, "jnp.sqrt(s + 1e-12), or jnp.sqrt(jnp.maximum(s, 1e-12))"),
        witness=witness.zero_base(
            nd, nd.ins[0], "with all zeros under the sqrt", gradient=True
        ),
    )


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
        if patterns.added_epsilon(x) is not None:
            continue  # an epsilon that rounds to 0: epsilon-underflow says so
        ctx.claimed.add(id(nd))
        yield _sqrt_hit(nd)


def _can_be_zero(ctx: registry.Context, nd: Node, i: int) -> bool:
    x = nd.ins[i]
    if graph.is_const(x) or ctx.analysis.is_raw_input(x):
        return False
    return ctx.analysis.sign(x) not in (POS, NONZERO) and not patterns.is_guarded(x)


@registry.register(ATAN2_ZERO_GRAD)
def atan2_zero_grad(ctx: registry.Context):
    """Differentiated arctan2 of two computed values that can both be 0."""
    for nd in ctx.graph.nodes:
        if nd.prim != "atan2" or id(nd) in ctx.claimed:
            continue
        if not ctx.analysis.differentiated(nd):
            continue
        if not (_can_be_zero(ctx, nd, 0) and _can_be_zero(ctx, nd, 1)):
            continue
        ctx.claimed.add(id(nd))
        yield registry.Hit(
            ATAN2_ZERO_GRAD,
            nd,
            "jaxnan: arctan2(dy, dx) where dy and dx can both be 0 (the points "
            "coincide): the value is 0 there but the gradient "
            "(dx, -dy) / (dx**2 + dy**2) is 0/0 = NaN",
            witness=witness.both_zero(nd),
        )
