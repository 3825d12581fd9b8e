"""The classification rules of `jaxnan.locate`, and `classify`.

Each rule is registered with `causes.rule` beside its definition and reads
the concrete values a creating equation received (`causes.Event`). On top of
the rules, `classify` applies what the whole step tells: an event in the
update phase is ``update``; a float16/bfloat16 step that is finite when
computed in float32, or whose line holds a constant the low-precision dtype
cannot hold, is ``precision``; and given the run's history, an overflow after
the parameters grew over many steps is ``learning_rate`` (or
``exploding_gradient`` when only the gradients grew).
"""

from __future__ import annotations

import numpy as np
from jax.extend import source_info_util

from jaxnan._src.core.primitives import Domain
from jaxnan._src.locate import causes, operands, precision_fix
from jaxnan._src.locate.causes import Cause, Classification
from jaxnan._src.locate.operands import Operand, stats

source_info_util.register_exclusion(__file__)


# --------------------------------------------------------------------------
# the rules: each returns (cause, fix, inputs_seen) or None


def _unary(event: causes.Event) -> Operand | None:
    """The first floating input, as a fixed-size summary (`operands.Operand`)."""
    floats = [a for a in event.inputs if causes.is_float(a)]
    return operands.of(floats[0]) if floats else None


def _log_op(event: causes.Event) -> str | None:
    """``xlogy``/``xlog1py`` when the equation is their derivative's x / y."""
    name = (event.user_function or "").rsplit(".", 1)[-1]
    return name if name in ("xlogy", "xlog1py") else None


def _log_op_gradient(event: causes.Event, op: str, text: str) -> Classification:
    """The derivative of xlogy(x, y) (x / y, and log(y)) at y = 0 (xlog1py: -1)."""
    y0, arg, low = (
        ("0", "y", "1e-7") if op == "xlogy" else ("-1", "(1 + y)", "-1 + 1e-7")
    )
    seen = (
        f"{text} (gradient of {event.user_function}: its derivative x / {arg} "
        f"and log({arg}) are not finite where y = {y0}, although {op}(0, {y0}) = 0)"
    )
    fix = (
        f"{op}(x, y) is 0 where x = 0, but its gradient is not finite where "
        f"y = {y0}: keep y away from {y0} (jnp.clip(y, {low}) or y + eps), "
        f"or where y may be {y0} select it away inside and outside: "
        f"jnp.where(y > {y0}, {op}(x, jnp.where(y > {y0}, y, 1.0)), 0.0)."
    )
    return Classification(Cause.UNSAFE_OP, fix, seen)


@causes.rule(Domain.LOG)
def _rule_log(event: causes.Event):
    x = _unary(event)
    if x is None:
        return None
    lo = -1.0 if event.primitive == "log1p" else 0.0
    at = "-1.0" if event.primitive == "log1p" else "0.0"
    boundary = x.count(lambda xp, v: v == lo)
    below = x.count(lambda xp, v: v < lo)
    if not boundary and not below:
        return None
    seen = []
    if boundary:
        seen.append(
            f"{event.primitive} received {at} {causes.positions(boundary, x.size)}"
        )
    if below:
        seen.append(
            f"{event.primitive} received values below {at} (min {causes.fmt(x.min())}) "
            f"{causes.positions(below, x.size)}"
        )
    if "logsumexp" in (event.user_function or ""):
        fix = (
            "logsumexp of a row that is all -inf is -inf (and its gradient NaN): "
            "keep at least one finite entry per row, or replace fully masked "
            "rows with jnp.where before and after the logsumexp."
        )
    else:
        fix = (
            f"Keep the argument of {event.primitive} above {at}: use "
            "jax.nn.log_softmax (or optax.softmax_cross_entropy) instead of "
            "log(softmax(.)), or clamp it with jnp.maximum(x, 1e-12)."
        )
    return Classification(Cause.UNSAFE_OP, fix, "; ".join(seen))


@causes.rule(Domain.ROOT)
def _rule_sqrt(event: causes.Event):
    x = _unary(event)
    if x is None:
        return None
    p = event.primitive
    neg = x.count(lambda xp, v: v < 0)
    zero = x.count(lambda xp, v: v == 0)
    if neg:
        seen = (
            f"{p} received negative values (min {causes.fmt(x.min())}) "
            f"{causes.positions(neg, x.size)}"
        )
        fix = (
            f"The argument of {p} is negative: clamp it with jnp.maximum(x, 0.0) "
            "plus an epsilon, or compute a variance as mean((x - mean)**2), "
            "which cannot go negative."
        )
        return Classification(Cause.UNSAFE_OP, fix, seen)
    if zero and p == "rsqrt":
        seen = f"rsqrt received 0.0 {causes.positions(zero, x.size)}"
        if event.phase == "backward":
            what = causes.gradient_of(event, "a function with a square-root derivative")
            seen += f" ({what}: infinite at the domain boundary)"
            uf = (event.user_function or "").lower()
            if any(k in uf for k in ("arccos", "arcsin", "acos", "asin")):
                fix = (
                    "The derivative is infinite at the boundary of the domain: "
                    "clip the argument into the open domain, e.g. "
                    "jnp.clip(x, -1 + 1e-6, 1 - 1e-6) before jnp.arccos/jnp.arcsin."
                )
            else:
                fix = (
                    "The derivative is infinite where this argument is 0: add an "
                    "epsilon to it or use the double-where trick "
                    "(jnp.where(x > 0, x, 1.0) inside, jnp.where outside)."
                )
        else:
            fix = "Add an epsilon before rsqrt: jax.lax.rsqrt(var + 1e-5)."
        return Classification(Cause.UNSAFE_OP, fix, seen)
    return None


def _two_operands(event: causes.Event) -> tuple[Operand, Operand] | None:
    """The first two inputs, when they broadcast to one shape, or None."""
    if len(event.inputs) < 2:
        return None
    a, b = operands.of(event.inputs[0]), operands.of(event.inputs[1])
    try:
        np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        return None
    return a, b


@causes.rule(Domain.DIVISION)
def _rule_div(event: causes.Event):
    pair = _two_operands(event)
    if pair is None:
        return None
    num, den = pair
    n00 = stats(lambda xp, n, d: (d == 0) & (n == 0), num, den).count
    nx0 = stats(lambda xp, n, d: (d == 0) & (n != 0) & ~xp.isnan(n), num, den)
    size, nx0 = nx0.size, nx0.count
    ninf = stats(lambda xp, n, d: xp.isinf(n) & xp.isinf(d), num, den).count
    backward = event.phase == "backward"
    if n00 or nx0:
        seen = []
        if n00:
            seen.append(f"0/0 {causes.positions(n00, size)}")
        if nx0:
            nz = stats(lambda xp, n, d: (d == 0) & (n != 0), num, den)
            example = causes.fmt(nz.values[0]) if nz.count else "x"
            seen.append(f"x/0 (e.g. {example}/0) {causes.positions(nx0, size)}")
        text = f"{event.primitive} received a zero denominator: " + ", ".join(seen)
        if backward:
            what = causes.gradient_of(event, "the function on this line")
            text += f" ({what}: its derivative divides by 0 there)"
            fix = (
                "The derivative is infinite or undefined at 0: use the "
                "double-where trick (jnp.where(x > 0, x, 1.0) inside, jnp.where "
                "outside), or optax.safe_norm for a norm."
            )
        else:
            fix = (
                "Guard the denominator: divide by jnp.maximum(d, eps) or d + eps "
                "(a larger epsilon for a std or variance), or select with "
                "jnp.where(d == 0, 1.0, d) and mask the result."
            )
        return Classification(Cause.UNSAFE_OP, fix, text)
    if ninf:
        return Classification(
            Cause.UNSAFE_OP,
            "inf/inf is NaN: keep the numerator and denominator finite "
            "(normalize in log space, e.g. jax.nn.softmax).",
            f"{event.primitive} received inf/inf {causes.positions(ninf, size)}",
        )
    return None


@causes.rule(Domain.POWER)
def _rule_pow(event: causes.Event):
    pair = _two_operands(event)
    if pair is None:
        return None
    frac = stats(lambda xp, x, y: (x < 0) & (y != xp.round(y)), *pair)
    zero_neg = stats(lambda xp, x, y: (x == 0) & (y < 0), *pair)
    n_frac, n_zero = frac.count, zero_neg.count
    if n_frac:
        seen = (
            f"pow received a negative base (min {causes.fmt(frac.min)}) with a "
            f"fractional exponent ({causes.fmt(frac.values[1])}) "
            f"{causes.positions(n_frac, frac.size)}"
        )
        fix = (
            "A fractional power of a negative number is NaN: clamp the base "
            "(jax.nn.relu(x) ** p or jnp.maximum(x, 0.0) ** p), or use "
            "jnp.sign(x) * jnp.abs(x) ** p."
        )
        return Classification(Cause.UNSAFE_OP, fix, seen)
    if n_zero:
        seen = (
            f"pow received 0.0 with a negative exponent "
            f"({causes.fmt(zero_neg.values[1])}) "
            f"{causes.positions(n_zero, zero_neg.size)}"
        )
        if event.phase == "backward":
            seen += f" ({causes.gradient_of(event, 'x ** p')} at 0)"
        fix = (
            "The power (or its derivative) is infinite at 0: use the double-where "
            "trick (jnp.where(x > 0, x, 1.0) inside, jnp.where outside) or add "
            "an epsilon to the base."
        )
        return Classification(Cause.UNSAFE_OP, fix, seen)
    return None


@causes.rule(Domain.INTEGER_POWER)
def _rule_integer_pow(event: causes.Event):
    x = _unary(event)
    y = event.eqn.params.get("y") if event.eqn is not None else None
    if x is None or y is None or y >= 0:
        return None
    zero = x.count(lambda xp, v: v == 0)
    if not zero:
        return None
    seen = (
        f"integer_pow received 0.0 with exponent {y} {causes.positions(zero, x.size)}"
    )
    if event.phase == "backward":
        seen += f" ({causes.gradient_of(event, 'x ** p')} at 0)"
    fix = (
        "A negative power of 0 is infinite: add an epsilon to the base or use "
        "the double-where trick."
    )
    return Classification(Cause.UNSAFE_OP, fix, seen)


@causes.rule(Domain.INVERSE_TRIG)
def _rule_arc(event: causes.Event):
    x = _unary(event)
    if x is None:
        return None
    p = event.primitive
    out = x.count(lambda xp, v: xp.abs(v) > 1)
    edge = x.count(lambda xp, v: xp.abs(v) == 1)
    if out:
        seen = (
            f"{p} received values outside [-1, 1] (max |x| "
            f"{causes.fmt(x.abs_max())}) {causes.positions(out, x.size)}"
        )
    elif edge and p == "atanh":
        seen = f"atanh received +/-1.0 {causes.positions(edge, x.size)}"
    else:
        return None
    why = (
        "a tanh-squashed value clipped to exactly +/-1 needs the margin"
        if p == "atanh"
        else "a cosine similarity can exceed 1 by rounding"
    )
    fix = (
        f"Clip the argument of {p} into the open interval: "
        f"jnp.clip(x, -1 + 1e-6, 1 - 1e-6) ({why})."
    )
    return Classification(Cause.UNSAFE_OP, fix, seen)


@causes.rule(Domain.POLE)
def _rule_poles(event: causes.Event):
    x = _unary(event)
    if x is None:
        return None
    poles = stats(lambda xp, v: (v <= 0) & (v == xp.round(v)), x)
    n = poles.count
    if not n:
        return None
    seen = (
        f"{event.primitive} received a pole (non-positive integer, e.g. "
        f"{causes.fmt(poles.values[0])}) {causes.positions(n, x.size)}"
    )
    fix = (
        f"{event.primitive} has poles at 0, -1, -2, ...: keep its argument "
        "positive, e.g. jax.nn.softplus(x) + 1e-6."
    )
    return Classification(Cause.UNSAFE_OP, fix, seen)


@causes.rule(Domain.FACTORIZATION)
def _rule_cholesky(event: causes.Event):
    x = _unary(event)
    if x is None or x.ndim < 2:
        return None
    try:
        mn = x.eigvalsh_min()
    except (np.linalg.LinAlgError, ValueError):
        mn = float("nan")
    n = x.shape[-1]
    seen = (
        f"cholesky received a {n}x{n} matrix that is not positive definite "
        f"(min eigenvalue {causes.fmt(mn)})"
    )
    fix = (
        "Make the matrix positive definite before jnp.linalg.cholesky: "
        "symmetrize it ((K + K.T) / 2) and add jitter (K + 1e-6 * jnp.eye(n))."
    )
    return Classification(Cause.UNSAFE_OP, fix, seen)


@causes.rule(Domain.EXP)
def _rule_exp(event: causes.Event):
    x = _unary(event)
    if x is None:
        return None
    dt = causes.out_dtype(event)
    mx = causes.finfo_max(dt)
    p = event.primitive
    limit = {"exp": np.log(mx), "exp2": np.log2(mx), "expm1": np.log(mx)}.get(
        p, np.log(mx)
    )
    n = x.count(lambda xp, v: v > limit)
    if not n:
        return None
    seen = (
        f"{p} received max {causes.fmt(x.census().high)}, overflow above "
        f"{causes.fmt(limit)} for {dt}"
    )
    if n < x.size:
        seen += f" ({n} of {x.size} positions)"
    fix = (
        f"Subtract the maximum before {p} (jax.nn.softmax, jax.nn.logsumexp) or "
        f"clip its argument below {causes.fmt(limit)}."
    )
    if event.phase == "backward":
        fix = (
            f"{p} overflows in a value the gradient needs: compute the derivative "
            f"from a bounded quantity (e.g. s * (1 - s) from the sigmoid s) or "
            f"clip the argument of {p} below {causes.fmt(limit)}."
        )
    return Classification(Cause.OVERFLOW, fix, seen)


@causes.rule(Domain.INF_ARITHMETIC)
def _rule_inf_arith(event: causes.Event):
    """NaN made from infinities that came in: inf - inf, 0 * inf."""
    p = event.primitive
    pair = _two_operands(event)
    if pair is None:
        return None
    if p in ("sub", "add", "add_any"):
        same = p == "sub"
        bad = stats(
            lambda xp, a, b: (
                xp.isinf(a) & xp.isinf(b) & ((xp.sign(a) == xp.sign(b)) == same)
            ),
            *pair,
        )
        n = bad.count
        if not n:
            return None
        sample, other = (causes.fmt(v) for v in bad.values)
        op = "-" if p == "sub" else "+"
        seen = f"{p} received {sample} {op} {other} {causes.positions(n, bad.size)}"
        fix = (
            "inf - inf is NaN: mask with a large finite value "
            "(jnp.finfo(x.dtype).min) instead of -inf, and handle rows that are "
            "fully masked (e.g. jax.nn.softmax(x, where=mask))."
        )
        return Classification(Cause.UNSAFE_OP, fix, seen)
    if p == "mul":
        bad = stats(
            lambda xp, a, b: ((a == 0) & xp.isinf(b)) | (xp.isinf(a) & (b == 0)),
            *pair,
        )
        n = bad.count
        if not n:
            return None
        seen = f"mul received 0 * inf {causes.positions(n, bad.size)}"
        fix = (
            "0 * inf is NaN: select with jnp.where(mask, x, 0.0) instead of "
            "multiplying by a 0/1 mask, and keep the inf from being produced."
        )
        return Classification(Cause.UNSAFE_OP, fix, seen)
    return None


def _rule_overflow(event: causes.Event):
    """Finite inputs, +/-inf output (and no domain problem): overflow."""
    if not event.outputs:
        return None
    outs = [operands.of(o) for o in event.outputs if causes.is_float(o)]
    ins = [operands.of(i) for i in event.inputs if causes.is_float(i)]
    if not outs or any(i.count(operands.nonfinite) for i in ins):
        return None
    n_inf = sum(o.count(lambda xp, v: xp.isinf(v)) for o in outs)
    if not n_inf:
        return None
    dt = causes.out_dtype(event)
    mx = causes.finfo_max(dt)
    biggest = max((i.abs_max() for i in ins if i.size), default=float("nan"))
    size = sum(o.size for o in outs)
    seen = (
        f"{event.primitive} received max |x| {causes.fmt(biggest)} and overflowed "
        f"{dt} (max {causes.fmt(mx)}) {causes.positions(n_inf, size)}"
    )
    if event.phase == "backward":
        return Classification(
            Cause.EXPLODING_GRADIENT, Cause.EXPLODING_GRADIENT.fix, seen
        )
    return Classification(Cause.OVERFLOW, Cause.OVERFLOW.fix, seen)


# --------------------------------------------------------------------------
# the whole step: precision, history


def _history_classification(
    event: causes.Event, found: Classification
) -> Classification | None:
    """learning_rate / exploding_gradient from the recent history of the run."""
    hist = event.history or {}
    params = [float(v) for v in hist.get("param_norm", ()) if np.isfinite(v)]
    grads = [float(v) for v in hist.get("grad_norm", ()) if np.isfinite(v)]
    losses = [float(v) for v in hist.get("loss", ()) if np.isfinite(v)]
    growth = params[-1] / params[0] if len(params) >= 3 and params[0] > 0 else None
    ggrowth = grads[-1] / grads[0] if len(grads) >= 3 and grads[0] > 0 else None
    figures = []
    if losses:
        figures.append(f"loss {causes.fmt(losses[0])} -> {causes.fmt(losses[-1])}")
    if growth is not None and growth >= 10:
        seen = (
            f"{found.seen}; parameter norm grew {causes.fmt(params[0])} -> "
            f"{causes.fmt(params[-1])} over the last {len(params)} steps"
        )
        if ggrowth is not None:
            seen += f" (gradient norm {causes.fmt(grads[0])} -> {causes.fmt(grads[-1])}"
            seen += f", {figures[0]})" if figures else ")"
        return Classification(Cause.LEARNING_RATE, Cause.LEARNING_RATE.fix, seen)
    if ggrowth is not None and ggrowth >= 100:
        seen = (
            f"{found.seen}; gradient norm grew {causes.fmt(grads[0])} -> "
            f"{causes.fmt(grads[-1])} over the last {len(grads)} steps while the "
            "parameters stayed bounded"
        )
        return Classification(
            Cause.EXPLODING_GRADIENT, Cause.EXPLODING_GRADIENT.fix, seen
        )
    return None


def classify(event: causes.Event) -> Classification:
    """Classify a creation event into a cause, a fix and what it received.

    The rules look at the concrete values the creating equation received. In
    order: an event in the ``"update"`` phase is ``update``; a step that is
    finite when its float16/bfloat16 values are computed in float32
    (``event.finite_in_float32``), or whose line holds a constant the
    low-precision dtype cannot hold (``event.lost_constant``), is
    ``precision``; an operation outside its domain is ``unsafe_op`` (log of
    0 or a negative, x/0 and 0/0, sqrt/rsqrt/pow of a negative or a zero in
    the backward pass, arccos/arcsin/arctanh at 1, lgamma/digamma at a pole,
    cholesky of a matrix that is not positive definite, inf - inf, 0 * inf);
    an infinite result from finite inputs is ``overflow`` in the forward pass
    and ``exploding_gradient`` in the backward pass, or ``learning_rate``
    when the history shows the parameters growing over the last steps.

    Args:
        event: the creation event (equation, phase and concrete values).

    Returns:
        A `causes.Classification`: the `causes.Cause`, one concrete fix
        sentence, and what the equation received in words and numbers
        (``"log received 0.0 at 3 of 4096 positions"``).

    Examples:
        >>> import jax, jax.numpy as jnp, numpy as np
        >>> from jaxnan._src.locate.causes import Event
        >>> from jaxnan._src.locate.cause_rules import classify
        >>> eqn = jax.make_jaxpr(jnp.log)(jnp.ones(4)).eqns[0]
        >>> x = np.array([1.0, 0.0, 2.0, 0.0], np.float32)
        >>> y = np.array([0.0, -np.inf, 0.69, -np.inf], np.float32)
        >>> c = classify(Event(eqn, "log", "forward", [x], [y]))
        >>> c.cause, c.seen
        ('unsafe_op', 'log received 0.0 at 2 of 4 positions')

    .. versionadded:: 0.1.0
    """
    try:
        return _classify(event)
    except Exception:  # noqa: BLE001 - never fail a diagnosis on a rule bug
        cause = Cause.UPDATE if event.phase == "update" else Cause.UNSAFE_OP
        return Classification(
            cause, cause.fix, f"{event.primitive} produced a nonfinite value"
        )


def _specific(event: causes.Event) -> Classification | None:
    """The domain rule's classification, else the overflow rule's."""
    rule = causes.rule_for(event.primitive)
    specific = rule(event) if rule is not None else None
    if specific is None:
        return _rule_overflow(event)
    op = _log_op(event)
    if op and event.phase == "backward" and specific.cause is Cause.UNSAFE_OP:
        return _log_op_gradient(event, op, specific.seen.split(" (gradient of")[0])
    return specific


def _classify(event: causes.Event) -> Classification:
    specific = _specific(event)
    seen = causes.describe_generic(event) or (
        f"{event.primitive} produced a nonfinite value"
    )
    found = specific or Classification(Cause.UNSAFE_OP, Cause.UNSAFE_OP.fix, seen)
    if event.phase == "update":
        fix = Cause.UPDATE.fix
        if specific is not None and specific.cause == Cause.UNSAFE_OP:
            fix = (
                "The update leaves the domain while the gradients are finite: "
                "raise the optimizer epsilon (e.g. optax.adam(learning_rate, "
                "eps=1e-8)) or guard the denominator (jnp.maximum(norm, 1e-12))."
            )
        elif specific is not None:
            fix = (
                "The update overflows while the gradients are finite: lower the "
                "learning rate and clip the gradients (optax.clip_by_global_norm)."
            )
        found = Classification(Cause.UPDATE, fix, found.seen)
    else:
        found = precision_fix.classify(event, found) or found
    if found.cause in (Cause.OVERFLOW, Cause.EXPLODING_GRADIENT, Cause.UPDATE):
        found = _history_classification(event, found) or found
    return found
