"""Why a nonfinite value was created, and what to do about it.

One documented taxonomy of causes (`CAUSES`), one fix sentence per cause
(`FIXES`), and the rules that classify a creation event from the concrete
values the creating equation received:

- ``input_data``: nonfinite values were already in the batch.
- ``poisoned_state``: nonfinite values were already in the parameters or the
  optimizer state.
- ``unsafe_op``: an operation outside its domain (log/log1p of 0 or a
  negative, x/0 and 0/0, sqrt/rsqrt/pow of a negative, a derivative that is
  infinite at 0 or at the domain boundary, arccos/arcsin/arctanh at 1,
  lgamma/digamma at a pole, cholesky of a matrix that is not positive
  definite, inf - inf, 0 * inf).
- ``overflow``: exp or a sum/product exceeding the dtype in the forward pass.
- ``exploding_gradient``: the same in the backward pass.
- ``update``: finite gradients, nonfinite optimizer update.
- ``precision``: the equation is finite when re-evaluated in float32.

`classify` never raises: a rule that fails falls back to a generic answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from jax.extend import source_info_util

from jaxnan._src import primitives
from jaxnan._src.primitives import Domain

source_info_util.register_exclusion(__file__)

CAUSES: tuple[str, ...] = (
    "input_data",
    "poisoned_state",
    "unsafe_op",
    "overflow",
    "exploding_gradient",
    "update",
    "precision",
)
"""The cause taxonomy, in the order a report lists them."""

FIXES: dict[str, str] = {
    "input_data": (
        "Clean or drop the rows with NaN/Inf in the batch before training "
        "(impute them, or filter the batch with jnp.isfinite)."
    ),
    "poisoned_state": (
        "The parameters or optimizer state are already nonfinite: restore the "
        "last good checkpoint and guard the updates with jaxnan.skip_nonfinite."
    ),
    "unsafe_op": (
        "Keep the operation inside its domain: add an epsilon, clamp the "
        "argument, or use the double-where trick."
    ),
    "overflow": (
        "Activations exceed the float range: normalize or scale them (layer "
        "norm, smaller initialization), subtract the max before exp, and lower "
        "the learning rate if they grew over the training steps."
    ),
    "exploding_gradient": (
        "Clip the gradients (optax.clip_by_global_norm(1.0)), lower the "
        "learning rate and check the initialization."
    ),
    "update": (
        "The gradients are finite but the update is not: lower the learning "
        "rate, raise the optimizer epsilon and clip the gradients."
    ),
    "precision": (
        "This operation is finite in float32: compute it in float32 "
        "(x.astype(jnp.float32), preferred_element_type=jnp.float32) or use a "
        "loss scale for float16."
    ),
}
"""The default fix sentence for each cause; `classify` is more specific."""

_STATE_WORDS = (
    "param",
    "opt_state",
    "optstate",
    "state",
    "model",
    "weight",
    "kernel",
    "bias",
    "embedding",
    "scale",
    "mu",
    "nu",
    "momentum",
    "trace",
    "layers",
    "variables",
)
_DATA_WORDS = (
    "batch",
    "data",
    "input",
    "x",
    "y",
    "label",
    "target",
    "feature",
    "image",
    "token",
    "obs",
    "reward",
    "mask",
)


@dataclasses.dataclass
class Event:
    """A creation event: the equation that first produced a nonfinite value.

    Built by the interpreter from the creating equation and the concrete
    values it received and produced.

    Attributes:
        eqn: the creating `jax.extend.core.JaxprEqn` (primitive and params).
        primitive: the primitive name, e.g. ``"log"``.
        phase: ``"forward"``, ``"backward"`` or ``"update"``.
        inputs: concrete values of all inputs of the equation (host arrays).
        outputs: concrete values of all outputs of the equation (host arrays).
        user_function: the user-level function when known (``"jnp.sqrt"``),
            used to say "gradient of jnp.sqrt".

    Examples:
        >>> import jax, jax.numpy as jnp, numpy as np
        >>> from jaxnan._src.causes import Event
        >>> eqn = jax.make_jaxpr(jnp.log)(jnp.ones(2)).eqns[0]
        >>> ev = Event(eqn, "log", "forward", [np.zeros(2)], [np.full(2, -np.inf)])
        >>> ev.primitive, ev.phase
        ('log', 'forward')

    .. versionadded:: 0.1.0
    """

    eqn: Any
    primitive: str
    phase: str
    inputs: list[np.ndarray]
    outputs: list[np.ndarray]
    user_function: str | None = None


# --------------------------------------------------------------------------
# number formatting and summaries


def _fmt(v: Any) -> str:
    """Short text for a number: 0.0, 1.0, -2.5, 91.3, 3.4e+38, nan, inf."""
    v = float(v)
    if np.isnan(v):
        return "nan"
    if np.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v == 0:
        return "0.0"
    if v.is_integer() and abs(v) < 1e6:
        return f"{v:.1f}"
    return f"{v:.3g}"


def _f64(a: Any) -> np.ndarray:
    """A float64 copy of a (float-like) host array; bool/int are converted."""
    a = np.asarray(a)
    if a.dtype.kind == "c":
        return np.abs(a).astype(np.float64)
    try:
        return a.astype(np.float64)
    except (TypeError, ValueError):
        return np.zeros(a.shape)


def _is_float(a: Any) -> bool:
    try:
        dt = np.asarray(a).dtype
    except Exception:  # noqa: BLE001
        return False
    return dt.kind in "fc" or dt.name == "bfloat16" or "float" in dt.name


def _dtype_name(a: Any) -> str:
    return str(np.asarray(a).dtype)


def _finfo_max(dtype_name: str) -> float:
    try:
        import ml_dtypes  # shipped with jaxlib

        if dtype_name == "bfloat16":
            return float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
    except ImportError:  # pragma: no cover
        pass
    try:
        return float(np.finfo(np.dtype(dtype_name)).max)
    except (TypeError, ValueError):
        return float(np.finfo(np.float32).max)


def _positions(n: int, size: int) -> str:
    return f"at {n} of {size} position{'s' if size != 1 else ''}"


def _out_dtype(event: Event) -> str:
    for o in event.outputs:
        if _is_float(o):
            return _dtype_name(o)
    for i in event.inputs:
        if _is_float(i):
            return _dtype_name(i)
    return "float32"


def _finite_range(a: np.ndarray) -> str:
    f = a[np.isfinite(a)]
    if f.size == 0:
        return "no finite values"
    return f"min {_fmt(f.min())}, max {_fmt(f.max())}"


def _describe_generic(event: Event) -> str:
    """'mul received float32[4] (min .., max ..), ...' for any equation."""
    parts = []
    for a in event.inputs:
        arr = np.asarray(a)
        shape = "x".join(str(d) for d in arr.shape) or "scalar"
        if not _is_float(arr):
            parts.append(f"{arr.dtype}[{shape}]")
            continue
        x = _f64(arr)
        extra = []
        nan = int(np.isnan(x).sum())
        pinf = int(np.isposinf(x).sum())
        ninf = int(np.isneginf(x).sum())
        if nan:
            extra.append(f"{nan} nan")
        if pinf:
            extra.append(f"{pinf} +inf")
        if ninf:
            extra.append(f"{ninf} -inf")
        desc = _finite_range(x) if x.size else "empty"
        if extra:
            desc += ", " + ", ".join(extra)
        parts.append(f"{arr.dtype}[{shape}] ({desc})")
    return f"{event.primitive} received " + "; ".join(parts) if parts else ""


def _gradient_of(event: Event, default: str) -> str:
    return f"gradient of {event.user_function or default}"


# --------------------------------------------------------------------------
# the rules: each returns (cause, fix, inputs_seen) or None


def _unary(event: Event) -> np.ndarray | None:
    floats = [a for a in event.inputs if _is_float(a)]
    return _f64(floats[0]) if floats else None


def _rule_log(event: Event):
    x = _unary(event)
    if x is None:
        return None
    lo = -1.0 if event.primitive == "log1p" else 0.0
    at = "-1.0" if event.primitive == "log1p" else "0.0"
    boundary = int((x == lo).sum())
    below = int((x < lo).sum())
    if not boundary and not below:
        return None
    seen = []
    if boundary:
        seen.append(f"{event.primitive} received {at} {_positions(boundary, x.size)}")
    if below:
        seen.append(
            f"{event.primitive} received values below {at} (min {_fmt(x.min())}) "
            f"{_positions(below, x.size)}"
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
    return "unsafe_op", fix, "; ".join(seen)


def _rule_sqrt(event: Event):
    x = _unary(event)
    if x is None:
        return None
    p = event.primitive
    neg = int((x < 0).sum())
    zero = int((x == 0).sum())
    if neg:
        seen = (
            f"{p} received negative values (min {_fmt(x.min())}) "
            f"{_positions(neg, x.size)}"
        )
        fix = (
            f"The argument of {p} is negative: clamp it with jnp.maximum(x, 0.0) "
            "plus an epsilon, or compute a variance as mean((x - mean)**2), "
            "which cannot go negative."
        )
        return "unsafe_op", fix, seen
    if zero and p == "rsqrt":
        seen = f"rsqrt received 0.0 {_positions(zero, x.size)}"
        if event.phase == "backward":
            what = _gradient_of(event, "a function with a square-root derivative")
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
        return "unsafe_op", fix, seen
    return None


def _rule_div(event: Event):
    if len(event.inputs) < 2:
        return None
    try:
        num, den = np.broadcast_arrays(_f64(event.inputs[0]), _f64(event.inputs[1]))
    except ValueError:
        return None
    size = num.size
    zden = den == 0
    n00 = int((zden & (num == 0)).sum())
    nx0 = int((zden & (num != 0) & ~np.isnan(num)).sum())
    ninf = int((np.isinf(num) & np.isinf(den)).sum())
    backward = event.phase == "backward"
    if n00 or nx0:
        seen = []
        if n00:
            seen.append(f"0/0 {_positions(n00, size)}")
        if nx0:
            nz = num[zden & (num != 0)]
            example = _fmt(nz.flat[0]) if nz.size else "x"
            seen.append(f"x/0 (e.g. {example}/0) {_positions(nx0, size)}")
        text = f"{event.primitive} received a zero denominator: " + ", ".join(seen)
        if backward:
            what = _gradient_of(event, "the function on this line")
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
        return "unsafe_op", fix, text
    if ninf:
        return (
            "unsafe_op",
            "inf/inf is NaN: keep the numerator and denominator finite "
            "(normalize in log space, e.g. jax.nn.softmax).",
            f"{event.primitive} received inf/inf {_positions(ninf, size)}",
        )
    return None


def _rule_pow(event: Event):
    if len(event.inputs) < 2:
        return None
    try:
        x, y = np.broadcast_arrays(_f64(event.inputs[0]), _f64(event.inputs[1]))
    except ValueError:
        return None
    frac = (x < 0) & (y != np.round(y))
    zero_neg = (x == 0) & (y < 0)
    n_frac, n_zero = int(frac.sum()), int(zero_neg.sum())
    if n_frac:
        seen = (
            f"pow received a negative base (min {_fmt(x[frac].min())}) with a "
            f"fractional exponent ({_fmt(y[frac].flat[0])}) "
            f"{_positions(n_frac, x.size)}"
        )
        fix = (
            "A fractional power of a negative number is NaN: clamp the base "
            "(jax.nn.relu(x) ** p or jnp.maximum(x, 0.0) ** p), or use "
            "jnp.sign(x) * jnp.abs(x) ** p."
        )
        return "unsafe_op", fix, seen
    if n_zero:
        seen = (
            f"pow received 0.0 with a negative exponent "
            f"({_fmt(y[zero_neg].flat[0])}) {_positions(n_zero, x.size)}"
        )
        if event.phase == "backward":
            seen += f" ({_gradient_of(event, 'x ** p')} at 0)"
        fix = (
            "The power (or its derivative) is infinite at 0: use the double-where "
            "trick (jnp.where(x > 0, x, 1.0) inside, jnp.where outside) or add "
            "an epsilon to the base."
        )
        return "unsafe_op", fix, seen
    return None


def _rule_integer_pow(event: Event):
    x = _unary(event)
    y = event.eqn.params.get("y") if event.eqn is not None else None
    if x is None or y is None or y >= 0:
        return None
    zero = int((x == 0).sum())
    if not zero:
        return None
    seen = f"integer_pow received 0.0 with exponent {y} {_positions(zero, x.size)}"
    if event.phase == "backward":
        seen += f" ({_gradient_of(event, 'x ** p')} at 0)"
    fix = (
        "A negative power of 0 is infinite: add an epsilon to the base or use "
        "the double-where trick."
    )
    return "unsafe_op", fix, seen


def _rule_arc(event: Event):
    x = _unary(event)
    if x is None:
        return None
    p = event.primitive
    out = int((np.abs(x) > 1).sum())
    edge = int((np.abs(x) == 1).sum())
    if out:
        seen = (
            f"{p} received values outside [-1, 1] (max |x| "
            f"{_fmt(np.abs(x).max())}) {_positions(out, x.size)}"
        )
    elif edge and p == "atanh":
        seen = f"atanh received +/-1.0 {_positions(edge, x.size)}"
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
    return "unsafe_op", fix, seen


def _rule_poles(event: Event):
    x = _unary(event)
    if x is None:
        return None
    poles = (x <= 0) & (x == np.round(x))
    n = int(poles.sum())
    if not n:
        return None
    seen = (
        f"{event.primitive} received a pole (non-positive integer, e.g. "
        f"{_fmt(x[poles].flat[0])}) {_positions(n, x.size)}"
    )
    fix = (
        f"{event.primitive} has poles at 0, -1, -2, ...: keep its argument "
        "positive, e.g. jax.nn.softplus(x) + 1e-6."
    )
    return "unsafe_op", fix, seen


def _rule_cholesky(event: Event):
    x = _unary(event)
    if x is None or x.ndim < 2:
        return None
    try:
        sym = (x + np.swapaxes(x, -1, -2)) / 2
        eig = np.linalg.eigvalsh(sym)
        mn = float(eig.min())
    except (np.linalg.LinAlgError, ValueError):
        mn = float("nan")
    n = x.shape[-1]
    seen = (
        f"cholesky received a {n}x{n} matrix that is not positive definite "
        f"(min eigenvalue {_fmt(mn)})"
    )
    fix = (
        "Make the matrix positive definite before jnp.linalg.cholesky: "
        "symmetrize it ((K + K.T) / 2) and add jitter (K + 1e-6 * jnp.eye(n))."
    )
    return "unsafe_op", fix, seen


def _rule_exp(event: Event):
    x = _unary(event)
    if x is None:
        return None
    dt = _out_dtype(event)
    mx = _finfo_max(dt)
    p = event.primitive
    limit = {"exp": np.log(mx), "exp2": np.log2(mx), "expm1": np.log(mx)}.get(
        p, np.log(mx)
    )
    over = x > limit
    if not over.any():
        return None
    seen = (
        f"{p} received max {_fmt(x[np.isfinite(x)].max())}, overflow above "
        f"{_fmt(limit)} for {dt}"
    )
    n = int(over.sum())
    if n < x.size:
        seen += f" ({n} of {x.size} positions)"
    if event.phase == "backward":
        return "exploding_gradient", FIXES["exploding_gradient"], seen
    fix = (
        f"Subtract the maximum before {p} (jax.nn.softmax, jax.nn.logsumexp) or "
        f"clip its argument below {_fmt(limit)}."
    )
    return "overflow", fix, seen


def _rule_inf_arith(event: Event):
    """NaN made from infinities that came in: inf - inf, 0 * inf."""
    p = event.primitive
    if len(event.inputs) < 2:
        return None
    try:
        a, b = np.broadcast_arrays(_f64(event.inputs[0]), _f64(event.inputs[1]))
    except ValueError:
        return None
    if p in ("sub", "add", "add_any"):
        if p == "sub":
            bad = np.isinf(a) & np.isinf(b) & (np.sign(a) == np.sign(b))
        else:
            bad = np.isinf(a) & np.isinf(b) & (np.sign(a) != np.sign(b))
        n = int(bad.sum())
        if not n:
            return None
        sample = _fmt(a[bad].flat[0])
        op = "-" if p == "sub" else "+"
        other = _fmt(b[bad].flat[0])
        seen = f"{p} received {sample} {op} {other} {_positions(n, a.size)}"
        fix = (
            "inf - inf is NaN: mask with a large finite value "
            "(jnp.finfo(x.dtype).min) instead of -inf, and handle rows that are "
            "fully masked (e.g. jax.nn.softmax(x, where=mask))."
        )
        return "unsafe_op", fix, seen
    if p == "mul":
        bad = ((a == 0) & np.isinf(b)) | (np.isinf(a) & (b == 0))
        n = int(bad.sum())
        if not n:
            return None
        seen = f"mul received 0 * inf {_positions(n, a.size)}"
        fix = (
            "0 * inf is NaN: select with jnp.where(mask, x, 0.0) instead of "
            "multiplying by a 0/1 mask, and keep the inf from being produced."
        )
        return "unsafe_op", fix, seen
    return None


def _rule_overflow(event: Event):
    """Finite inputs, +/-inf output (and no domain problem): overflow."""
    if not event.outputs:
        return None
    outs = [_f64(o) for o in event.outputs if _is_float(o)]
    ins = [_f64(i) for i in event.inputs if _is_float(i)]
    if not outs or any(not np.isfinite(i).all() for i in ins):
        return None
    n_inf = sum(int(np.isinf(o).sum()) for o in outs)
    if not n_inf:
        return None
    dt = _out_dtype(event)
    mx = _finfo_max(dt)
    biggest = max((float(np.abs(i).max()) for i in ins if i.size), default=float("nan"))
    size = sum(o.size for o in outs)
    seen = (
        f"{event.primitive} received max |x| {_fmt(biggest)} and overflowed "
        f"{dt} (max {_fmt(mx)}) {_positions(n_inf, size)}"
    )
    if event.phase == "backward":
        return "exploding_gradient", FIXES["exploding_gradient"], seen
    return "overflow", FIXES["overflow"], seen


_RULES = {  # by the domain of the primitive (`primitives.DOMAINS`)
    Domain.LOG: _rule_log,
    Domain.ROOT: _rule_sqrt,
    Domain.DIVISION: _rule_div,
    Domain.POWER: _rule_pow,
    Domain.INTEGER_POWER: _rule_integer_pow,
    Domain.INVERSE_TRIG: _rule_arc,
    Domain.POLE: _rule_poles,
    Domain.FACTORIZATION: _rule_cholesky,
    Domain.EXP: _rule_exp,
    Domain.INF_ARITHMETIC: _rule_inf_arith,
}


# --------------------------------------------------------------------------
# precision: re-evaluate in float32


def _refloat32(event: Event) -> bool | None:
    """True when the equation is finite in float32; None when not applicable."""
    if event.eqn is None:
        return None
    if not any(
        _is_float(o) and _dtype_name(o) in primitives.LOW_PRECISION_NAMES
        for o in event.outputs
    ):
        return None
    try:
        import jax
        import jax.numpy as jnp

        args = []
        for a in event.inputs:
            arr = np.asarray(a)
            if _is_float(arr) and arr.dtype.name in primitives.LOW_PRECISION_NAMES:
                args.append(jnp.asarray(arr.astype(np.float32)))
            else:
                args.append(jnp.asarray(arr))
        params = dict(event.eqn.params)
        for key in ("preferred_element_type", "new_dtype", "dtype"):
            if key in params and str(params[key]) in primitives.LOW_PRECISION_NAMES:
                params[key] = jnp.float32
        with jax.ensure_compile_time_eval():
            out = event.eqn.primitive.bind(*args, **params)
        outs = out if isinstance(out, (list, tuple)) else [out]
        return all(
            bool(np.isfinite(np.asarray(o, dtype=np.float64)).all())
            for o in outs
            if _is_float(np.asarray(o))
        )
    except Exception:  # noqa: BLE001 - a primitive that cannot be re-bound
        return None


# --------------------------------------------------------------------------
# public entry points


def classify(event: Event) -> tuple[str, str, str]:
    """Classify a creation event into a cause, a fix and what it received.

    The rules look at the concrete values the creating equation received. In
    order: an event in the ``"update"`` phase is ``update``; a float16 or
    bfloat16 equation that is finite when re-evaluated in float32 is
    ``precision``; an operation outside its domain is ``unsafe_op`` (log of
    0 or a negative, x/0 and 0/0, sqrt/rsqrt/pow of a negative or a zero in
    the backward pass, arccos/arcsin/arctanh at 1, lgamma/digamma at a pole,
    cholesky of a matrix that is not positive definite, inf - inf, 0 * inf);
    an infinite result from finite inputs is ``overflow`` in the forward pass
    and ``exploding_gradient`` in the backward pass.

    Args:
        event: the creation event (equation, phase and concrete values).

    Returns:
        ``(cause, fix, inputs_seen)``: a name from `CAUSES`, one concrete fix
        sentence, and what the equation received in words and numbers
        (``"log received 0.0 at 3 of 4096 positions"``).

    Examples:
        >>> import jax, jax.numpy as jnp, numpy as np
        >>> from jaxnan._src.causes import Event, classify
        >>> eqn = jax.make_jaxpr(jnp.log)(jnp.ones(4)).eqns[0]
        >>> x = np.array([1.0, 0.0, 2.0, 0.0], np.float32)
        >>> y = np.array([0.0, -np.inf, 0.69, -np.inf], np.float32)
        >>> cause, fix, seen = classify(Event(eqn, "log", "forward", [x], [y]))
        >>> cause, seen
        ('unsafe_op', 'log received 0.0 at 2 of 4 positions')

    .. versionadded:: 0.1.0
    """
    try:
        return _classify(event)
    except Exception:  # noqa: BLE001 - never fail a diagnosis on a rule bug
        cause = "update" if event.phase == "update" else "unsafe_op"
        return cause, FIXES[cause], f"{event.primitive} produced a nonfinite value"


def _classify(event: Event) -> tuple[str, str, str]:
    rule = _RULES.get(primitives.domain_of(event.primitive))
    specific = rule(event) if rule is not None else None
    if specific is None:
        specific = _rule_overflow(event)
    generic_seen = _describe_generic(event) or (
        f"{event.primitive} produced a nonfinite value"
    )
    seen = specific[2] if specific is not None else generic_seen
    if event.phase == "update":
        fix = FIXES["update"]
        if specific is not None and specific[0] == "unsafe_op":
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
        return "update", fix, seen
    if _refloat32(event):
        dt = _out_dtype(event)
        return (
            "precision",
            FIXES["precision"],
            f"{seen}; the same {event.primitive} is finite in float32 ({dt} "
            "is too narrow)",
        )
    if specific is not None:
        return specific
    return "unsafe_op", FIXES["unsafe_op"], seen


def _path_words(path: str) -> list[str]:
    word, words = [], []
    for ch in path.lower():
        if ch.isalnum() or ch == "_":
            word.append(ch)
        elif word:
            words.append("".join(word))
            word = []
    if word:
        words.append("".join(word))
    return words


def _is_state_path(path: str) -> bool | None:
    """True for params/optimizer-state paths, False for batch paths, else None."""
    words = _path_words(path)
    for w in words:
        if any(w == d or w.startswith(d) for d in ("batch", "data", "input")):
            return False
    for w in words:
        if any(w.startswith(s) for s in _STATE_WORDS) or w in ("w", "b", "params"):
            return True
    for w in words:
        if w in _DATA_WORDS or any(w.startswith(d) for d in _DATA_WORDS[5:]):
            return False
    return None


def classify_inputs(
    nonfinite_inputs: Mapping[str, Sequence[int]],
) -> tuple[str, str]:
    """Classify nonfinite values that were already in the arguments.

    A leaf whose path names parameters or optimizer state (``params``,
    ``opt_state``, ``model``, ``kernel``, ``mu``, ...) makes the cause
    ``poisoned_state``: no data fix helps once the state is nonfinite.
    Otherwise (``batch['x']``, ``inputs``, ``labels``, ...) it is
    ``input_data``.

    Args:
        nonfinite_inputs: leaf path -> ``(nan, +inf, -inf)`` counts, for the
            nonfinite argument leaves.

    Returns:
        ``(cause, fix)``.

    Examples:
        >>> from jaxnan._src.causes import classify_inputs
        >>> classify_inputs({"batch['x']": (3, 0, 0)})[0]
        'input_data'
        >>> classify_inputs({"params['w']": (0, 1, 0)})[0]
        'poisoned_state'

    .. versionadded:: 0.1.0
    """
    paths = [p for p, c in nonfinite_inputs.items() if sum(c) > 0] or list(
        nonfinite_inputs
    )
    kinds = [_is_state_path(p) for p in paths]
    if any(k is True for k in kinds):
        bad = [p for p, k in zip(paths, kinds) if k is True]
        fix = FIXES["poisoned_state"].replace(
            "are already nonfinite", f"are already nonfinite ({', '.join(bad[:3])})"
        )
        return "poisoned_state", fix
    bad = [p for p, k in zip(paths, kinds) if k is False] or paths
    fix = FIXES["input_data"]
    if bad:
        fix = (
            f"Clean or drop the rows with NaN/Inf in {', '.join(bad[:3])} before "
            "training (impute them, or filter the batch with jnp.isfinite)."
        )
    return "input_data", fix
