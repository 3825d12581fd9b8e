"""The lint rule table: ids, severities, fixes, and a bad and a good example each."""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Iterator, Mapping

from jax.extend import source_info_util

source_info_util.register_exclusion(__file__)


@dataclasses.dataclass(frozen=True)
class LintRule:
    """One rule of `jaxnan.lint`: what it finds, how bad it is, how to fix it.

    Attributes:
        rule: the rule id, such as ``"where-nan-grad"``.
        severity: ``"error"`` (produces NaN/Inf for inputs a training run
            reaches), ``"warning"`` (numerically fragile) or ``"info"``.
        summary: one line saying what the rule finds.
        fix: a fix snippet.
        bad: a short example that the rule reports.
        good: the safe version, which it does not report.

    Examples:
        >>> import jaxnan
        >>> jaxnan.LINT_RULES["where-nan-grad"].severity
        'error'

    .. versionadded:: 0.1.0
    """

    rule: str
    severity: str
    summary: str
    fix: str
    bad: str
    good: str


_RULES = (
    LintRule(
        "where-nan-grad",
        "error",
        "a where/select whose unselected branch computes sqrt, log, div, pow, "
        "arctan2, arccos or arcsin on the values it guards: the forward pass is "
        "fine but the gradient is 0 * NaN = NaN",
        "double where: jnp.where(c, jnp.sqrt(jnp.where(c, x, 1.0)), 0.0)",
        "jnp.where(x > 0, jnp.sqrt(x), 0.0)",
        "jnp.where(x > 0, jnp.sqrt(jnp.where(x > 0, x, 1.0)), 0.0)",
    ),
    LintRule(
        "sqrt-zero-grad",
        "error",
        "sqrt (jnp.linalg.norm, jnp.std) of a sum of squares or variance that "
        "can be exactly 0, differentiated: d sqrt(s)/ds = inf at 0",
        "optax.safe_norm(x, 1e-6), or jnp.sqrt(jnp.sum(x**2) + 1e-12)",
        "jnp.linalg.norm(x)",
        "optax.safe_norm(x, 1e-6)",
    ),
    LintRule(
        "log-softmax",
        "warning",
        "log(softmax(x)): a probability that underflows to 0 gives log(0) = -inf",
        "jax.nn.log_softmax(x)",
        "jnp.log(jax.nn.softmax(x))",
        "jax.nn.log_softmax(x)",
    ),
    LintRule(
        "log-sigmoid",
        "warning",
        "log(sigmoid(x)) or log(1 - sigmoid(x)): -inf once sigmoid saturates",
        "jax.nn.log_sigmoid(x), jax.nn.log_sigmoid(-x), or "
        "optax.sigmoid_binary_cross_entropy(logits, labels)",
        "jnp.log(jax.nn.sigmoid(x))",
        "jax.nn.log_sigmoid(x)",
    ),
    LintRule(
        "hand-written-cross-entropy",
        "warning",
        "-sum(y * log(softmax(x))): a hand-written cross-entropy goes -inf when "
        "a probability underflows",
        "optax.softmax_cross_entropy(logits, labels) (or "
        "..._with_integer_labels), or -sum(y * jax.nn.log_softmax(x))",
        "-jnp.sum(y * jnp.log(jax.nn.softmax(logits)))",
        "optax.softmax_cross_entropy(logits, y).sum()",
    ),
    LintRule(
        "masked-softmax-all-masked",
        "error",
        "softmax or logsumexp over a row masked with -inf where the mask can "
        "remove every entry: -inf - (-inf) = NaN",
        "fill with a finite large negative and guard the empty rows: "
        "jnp.where(mask, x, jnp.finfo(x.dtype).min), then "
        "jnp.where(mask.any(-1, keepdims=True), p, 0.0)",
        "jax.nn.softmax(jnp.where(mask, x, -jnp.inf))",
        "jax.nn.softmax(jnp.where(mask, x, jnp.finfo(x.dtype).min))",
    ),
    LintRule(
        "div-no-epsilon",
        "warning",
        "division by a sum, norm, variance or std that can be 0, with no epsilon",
        "x / (jnp.sum(w) + 1e-6), or x / jnp.maximum(jnp.sum(mask), 1)",
        "x / jnp.linalg.norm(x)",
        "x / (jnp.linalg.norm(x) + 1e-6)",
    ),
    LintRule(
        "epsilon-underflow",
        "error",
        "an epsilon below the smallest normal number of the dtype in use "
        "(1e-8 in float16 is 0, float16's smallest normal is 6.1e-5)",
        "use an epsilon the dtype can hold (1e-3..1e-5 in float16), or compute "
        "the normalisation in float32",
        "x16 / (jnp.sum(x16) + 1e-8)",
        "x16 / (jnp.sum(x16) + 1e-3)",
    ),
    LintRule(
        "low-precision-overflow",
        "warning",
        "exp, pow or a sum of squares of unbounded values in float16 (overflows "
        "above 65504: exp(x) for x > 11.1, x**2 for |x| > 256) or bfloat16 "
        "(8-bit mantissa; reported as info)",
        "compute in float32: jnp.exp(x.astype(jnp.float32))",
        "jnp.exp(x.astype(jnp.float16))",
        "jnp.exp(x.astype(jnp.float32))",
    ),
    LintRule(
        "low-precision-cast",
        "error",
        "-inf or a constant beyond the dtype's range (such as -1e9 or "
        "finfo(float32).min) cast to float16/bfloat16: it becomes -inf, and "
        "-inf - (-inf) or 0 * inf is NaN",
        "apply the mask after the cast with jnp.finfo(x.dtype).min, or keep "
        "masks in float32",
        "(x + jnp.where(m, 0.0, -1e9)).astype(jnp.float16)",
        "jnp.where(m, x16, jnp.finfo(jnp.float16).min)",
    ),
    LintRule(
        "log-not-positive",
        "warning",
        "log, log1p, sqrt, rsqrt or a fractional power of a computed value not "
        "known to be positive (NaN for negative inputs, -inf/inf at 0)",
        "make the argument positive by construction: jnp.log(jax.nn.softplus(z) "
        "+ 1e-6), jnp.log(jnp.maximum(x, 1e-6)), or work in log space",
        "jnp.log(x @ w)",
        "jnp.log(jax.nn.softplus(x @ w) + 1e-6)",
    ),
)


class LintRuleTable(Mapping[str, LintRule]):
    """The rules of `jaxnan.lint`, read-only, keyed by rule id.

    Each value is a `jaxnan.LintRule` with its severity, a fix snippet and a
    bad and a good example.

    Examples:
        >>> import jaxnan
        >>> for rule in jaxnan.LINT_RULES.values():
        ...     print(f"{rule.rule:27s} {rule.severity}")
        where-nan-grad              error
        sqrt-zero-grad              error
        log-softmax                 warning
        log-sigmoid                 warning
        hand-written-cross-entropy  warning
        masked-softmax-all-masked   error
        div-no-epsilon              warning
        epsilon-underflow           error
        low-precision-overflow      warning
        low-precision-cast          error
        log-not-positive            warning

    .. versionadded:: 0.1.0
    """

    def __init__(self, rules: tuple[LintRule, ...]):
        self._rules = types.MappingProxyType({r.rule: r for r in rules})

    def __getitem__(self, key: str) -> LintRule:
        return self._rules[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._rules)

    def __len__(self) -> int:
        return len(self._rules)


LINT_RULES = LintRuleTable(_RULES)
