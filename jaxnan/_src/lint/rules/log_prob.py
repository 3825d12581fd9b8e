"""log of a probability: log(softmax), log(sigmoid), hand-written cross-entropy."""

from __future__ import annotations

from jax.extend import source_info_util

from jaxnan._src.lint import graph, registry, witness
from jaxnan._src.lint.graph import Node, Val

source_info_util.register_exclusion(__file__)

LOG_SOFTMAX = registry.rule(
    "log-softmax",
    "warning",
    "log(softmax(x)): a probability that underflows to 0 gives log(0) = -inf",
    "jax.nn.log_softmax(x)",
    "jnp.log(jax.nn.softmax(x))",
    "jax.nn.log_softmax(x)",
)
LOG_SIGMOID = registry.rule(
    "log-sigmoid",
    "warning",
    "log(sigmoid(x)) or log(1 - sigmoid(x)): -inf once sigmoid saturates",
    "jax.nn.log_sigmoid(x), jax.nn.log_sigmoid(-x), or "
    "optax.sigmoid_binary_cross_entropy(logits, labels)",
    "jnp.log(jax.nn.sigmoid(x))",
    "jax.nn.log_sigmoid(x)",
)
HAND_WRITTEN_CROSS_ENTROPY = registry.rule(
    "hand-written-cross-entropy",
    "warning",
    "-sum(y * log(softmax(x))): a hand-written cross-entropy goes -inf when "
    "a probability underflows",
    "optax.softmax_cross_entropy(logits, labels) (or "
    "..._with_integer_labels), or -sum(y * jax.nn.log_softmax(x))",
    "-jnp.sum(y * jnp.log(jax.nn.softmax(logits)))",
    "optax.softmax_cross_entropy(logits, y).sum()",
)


def is_softmax(v: Val) -> bool:
    """True when `v` is exp(z) / sum(exp(z)) (a softmax), up to shape ops."""
    nd = graph.strip(v).node
    if nd is None or nd.prim != "div":
        return False
    return graph.prim_of(nd.ins[0]) == "exp" and graph.prim_of(nd.ins[1]) == (
        "reduce_sum"
    )


def _softmax_witness(nd: Node) -> witness.Witness | None:
    """Logits with one entry 1000 above the rest: the others' p is 0."""
    div = graph.strip(nd.ins[0]).node
    exp, total = graph.strip(div.ins[0]).node, graph.strip(div.ins[1]).node
    z = exp.ins[0]
    sub = graph.strip(z).node
    if sub is not None and sub.prim == "sub":
        z = sub.ins[0]
    axes = tuple(total.params.get("axes", ()))
    return witness.Witness(
        "with logits 1000 apart", z, witness.along(axes, 1000.0), nd.outs[0]
    )


def _sigmoid_witness(nd: Node, kind: str) -> witness.Witness:
    logistic = graph.strip(nd.ins[0]).node
    if kind != "sigmoid":
        logistic = graph.strip(logistic.ins[1]).node
    value = -1000.0 if kind == "sigmoid" else 1000.0
    return witness.Witness(
        f"with x = {value:g}", logistic.ins[0], witness.full(value), nd.outs[0]
    )


def sigmoid_kind(v: Val) -> str | None:
    """'sigmoid' / '1 - sigmoid' / None."""
    nd = graph.strip(v).node
    if nd is None:
        return None
    if nd.prim == "logistic":
        return "sigmoid"
    if nd.prim == "sub" and graph.scalar_const(nd.ins[0]) == 1.0:
        if graph.prim_of(nd.ins[1]) == "logistic":
            return "1 - sigmoid"
    return None


def _is_cross_entropy(cons, nd: Node) -> bool:
    """True when log(p) is multiplied by labels and summed."""
    mul = graph.flows_to(cons, nd.outs[0], {"mul", "dot_general"}, 3)
    if mul is None:
        return False
    if mul.prim == "dot_general":
        return True
    return (
        graph.flows_to(cons, mul.outs[0], {"reduce_sum", "dot_general"}, 3) is not None
    )


def _softmax_hit(cons, nd: Node) -> registry.Hit:
    if _is_cross_entropy(cons, nd):
        return registry.Hit(
            HAND_WRITTEN_CROSS_ENTROPY,
            nd,
            "jaxnan: hand-written cross-entropy -sum(y * log(softmax(x))): "
            "a probability that underflows to 0 makes the loss inf and "
            "its gradient NaN",
            witness=_softmax_witness(nd),
        )
    return registry.Hit(
        LOG_SOFTMAX,
        nd,
        "jaxnan: log(softmax(x)) is -inf once a probability underflows "
        "to 0 (logit gaps above ~88 in float32, ~11 in float16)",
        witness=_softmax_witness(nd),
    )


@registry.register(LOG_SOFTMAX, LOG_SIGMOID, HAND_WRITTEN_CROSS_ENTROPY)
def log_of_probability(ctx: registry.Context):
    """Finds the log of a softmax or of a sigmoid."""
    cons = graph.consumers(ctx.graph)
    for nd in ctx.graph.nodes:
        if nd.prim != "log" or id(nd) in ctx.claimed:
            continue
        if is_softmax(nd.ins[0]):
            ctx.claimed.add(id(nd))
            yield _softmax_hit(cons, nd)
            continue
        kind = sigmoid_kind(nd.ins[0])
        if kind:
            ctx.claimed.add(id(nd))
            yield registry.Hit(
                LOG_SIGMOID,
                nd,
                f"jaxnan: log({kind}(x)) is -inf once the sigmoid saturates "
                "(|x| above ~17 in float32)",
                witness=_sigmoid_witness(nd, kind),
            )
