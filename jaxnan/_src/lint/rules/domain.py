"""log-not-positive: log, sqrt or a fractional power of a value of unknown sign."""

from __future__ import annotations

from jax.extend import source_info_util

from jaxnan._src.lint import graph, patterns, registry, witness
from jaxnan._src.lint.graph import Node
from jaxnan._src.lint.signs import NONNEG, POS, Sign

source_info_util.register_exclusion(__file__)

LOG_NOT_POSITIVE = registry.rule(
    "log-not-positive",
    "warning",
    "log, log1p, sqrt, rsqrt or a fractional power of a computed value not "
    "known to be positive (NaN for negative inputs, -inf/inf at 0)",
    "make the argument positive by construction: jnp.log(jax.nn.softplus(z) "
    "+ 1e-6), jnp.log(jnp.maximum(x, 1e-6)), or work in log space",
    "jnp.log(x @ w)",
    "jnp.log(jax.nn.softplus(x @ w) + 1e-6)",
)

# The signs of the argument that keep each primitive finite.
_NEEDS: dict[str, tuple[Sign, ...]] = {
    "log": (POS,),
    "rsqrt": (POS,),
    "sqrt": (POS, NONNEG),
    "log1p": (POS, NONNEG),
    "pow": (POS, NONNEG),  # with a fractional exponent
}


def _needs(nd: Node) -> tuple[Sign, ...] | None:
    """The signs `nd`'s argument needs, None when it is not checked."""
    if nd.prim == "pow":
        k = graph.scalar_const(nd.ins[1])
        if k is None or float(k).is_integer():
            return None
    return _NEEDS.get(nd.prim)


def _through_epsilon(nd: Node) -> bool:
    return nd.prim in graph.PASS or nd.prim in ("add", "max", "convert_element_type")


def _unsafe(ctx: registry.Context, nd: Node) -> bool:
    """True when `nd`'s argument is computed and may be outside its domain."""
    need = _needs(nd)
    if need is None:
        return False
    x = nd.ins[0]
    if graph.is_const(x) or ctx.analysis.is_raw_input(x):
        return False
    if any(id(n) in ctx.claimed for n in graph.chain(x, 3, _through_epsilon)):
        return False  # reported already (a one-pass variance in float16)
    return ctx.analysis.sign(x) not in need and not patterns.is_guarded(x)


@registry.register(LOG_NOT_POSITIVE)
def not_positive(ctx: registry.Context):
    """Finds log/sqrt/fractional powers of values not known to be positive."""
    for nd in ctx.graph.nodes:
        if id(nd) in ctx.claimed or not nd.outs or not nd.outs[0].is_float:
            continue
        if not _unsafe(ctx, nd):
            continue
        yield registry.Hit(
            LOG_NOT_POSITIVE,
            nd,
            f"jaxnan: `{nd.prim}` of a computed value with nothing keeping it "
            "positive: NaN for a negative value, -inf or inf at 0",
            witness=witness.negative(nd),
        )
