"""The ``precision`` cause of `jaxnan.locate`: its evidence and its fix.

`classify` runs once the rules have spoken: a step whose creating equation
computes in a narrow dtype (float16, bfloat16, float8) is ``precision`` when
its value is lost to that dtype, by one of two experiments
(`precision.py`): the step again with its narrow values computed in float32
stays finite (``event.finite_in_float32``), or the line holds a constant the
dtype cannot hold (``event.lost_constant``). The fix then names the change
that helps, by what was lost:

- a float16 overflow in the forward pass: the op in bfloat16 (float32's
  range) or float32;
- an overflow in the backward pass (a transposed cast included: a
  ``jmp``-style loss-scale cast back to float16): the loss scale;
- a float8 overflow (``float8_e4m3fn`` has no inf: NaN): a scale into range;
- a value rounded away (bfloat16's 8 significant bits, float16's underflow):
  that op in float32;
- a lost constant: a constant the dtype holds, or the line in float32.
"""

from __future__ import annotations

from jax.extend import source_info_util

from jaxnan._src.locate import causes, operands, precision
from jaxnan._src.locate.causes import Cause, Classification
from jaxnan._src.locate.operands import stats

source_info_util.register_exclusion(__file__)

_CAST = "convert_element_type"


def narrow_dtype(event: causes.Event) -> str | None:
    """The first narrow dtype among the event's outputs, then its inputs."""
    for a in (*event.outputs, *event.inputs):
        if causes.is_float(a) and precision.is_narrow(causes.dtype_name(a)):
            return causes.dtype_name(a)
    return None


def _overflowed(event: causes.Event, found: Classification, dt: str) -> bool:
    """Whether the narrow dtype's range was exceeded (not a rounding loss)."""
    if found.cause in (Cause.OVERFLOW, Cause.EXPLODING_GRADIENT):
        return True
    limit = causes.finfo_max(dt)
    ins = [operands.of(i) for i in event.inputs if causes.is_float(i)]
    if event.primitive == _CAST:  # float8_e4m3fn: an overflowing cast is NaN
        over = lambda xp, v: xp.isfinite(v) & (xp.abs(v) > limit)  # noqa: E731
        return any(i.count(over) for i in ins)
    return False


def _cast_seen(event: causes.Event, dt: str) -> str | None:
    """A cast past the dtype's range that made NaN (float8 without inf)."""
    limit = causes.finfo_max(dt)
    x = next((operands.of(i) for i in event.inputs if causes.is_float(i)), None)
    if x is None:
        return None
    over = stats(lambda xp, v: xp.isfinite(v) & (xp.abs(v) > limit), x)
    if not over.count:
        return None
    return (
        f"{_CAST} received max |x| {causes.fmt(over.abs_max)}, above "
        f"{dt}'s max {causes.fmt(limit)}, {causes.positions(over.count, x.size)}"
    )


def _op(event: causes.Event) -> str:
    return f"`{event.user_function or event.primitive}`"


def _float8_fix(dt: str, limit: float) -> str:
    no_inf = " and has no inf (an overflow is NaN)" if "fn" in dt else ""
    return (
        f"{dt} holds at most {causes.fmt(limit)}{no_inf}: scale the tensor into "
        f"range before the cast (x / s with s = max|x| / {causes.fmt(limit)}, "
        "per-tensor current or delayed scaling) and multiply the result by s, "
        "or use float8_e5m2 (max 57344) for gradients."
    )


def _backward_fix(event: causes.Event, dt: str, limit: float) -> str:
    what = (
        f"The cotangent cast back to {dt} by the backward of this line's cast"
        if event.primitive == _CAST
        else f"The gradient of {_op(event)}"
    )
    return (
        f"{what} exceeds {dt}'s range (max {causes.fmt(limit)}) where float32 holds "
        "it: lower the loss scale (a dynamic loss scale halves it on overflow: "
        "jaxnan.dynamic_loss_scale, jmp.DynamicLossScale), or keep this value in "
        "float32 (cast the logits to float32 before the loss)."
    )


def _forward_overflow_fix(event: causes.Event, dt: str, limit: float) -> str:
    if event.primitive == _CAST:
        return (
            f"The values exceed {dt}'s range (max {causes.fmt(limit)}) as they are "
            f"cast to {dt}: cast to bfloat16 instead, which has float32's range, "
            "or keep them in float32 (or scale them down before the cast)."
        )
    matmul = (
        ", preferred_element_type=jnp.float32 for a matmul"
        if event.primitive in ("dot_general", "conv_general_dilated")
        else ""
    )
    return (
        f"{_op(event)} overflows {dt} (max {causes.fmt(limit)}) where float32 does "
        "not: compute it in bfloat16, which has float32's range, or in float32 "
        f"(x.astype(jnp.float32) before it{matmul}), then cast back."
    )


def _rounding_fix(event: causes.Event, dt: str) -> str:
    if dt == "bfloat16":
        lost = (
            "bfloat16 keeps 8 significant bits: the input lost its value to "
            "rounding (a variance or a difference of large values becomes 0)"
        )
    else:
        lost = (
            f"{dt} rounded the input to 0 or to the domain boundary (values "
            "below 6.1e-05 lose precision, below 6e-08 they are 0)"
        )
    backward = (
        "; in the backward pass a loss scale keeps small gradients representable"
        if event.phase == "backward"
        else ""
    )
    return (
        f"{lost}: compute {_op(event)} and what feeds it in float32 "
        f"(x.astype(jnp.float32)), then cast the result back to {dt}{backward}."
    )


def _constant_fix(lost: str, dt: str) -> str:
    if lost.endswith(f"0.0 in {dt}"):
        hold = "an epsilon it holds (eps >= 1e-5 for float16)"
    else:
        hold = f"a mask value it holds (jnp.finfo(jnp.{dt}).min)"
    return (
        f"{dt} cannot hold the constant ({lost}): use {hold}, or compute this "
        "line in float32 (x.astype(jnp.float32)) and cast the result back."
    )


def fix_for(event: causes.Event, found: Classification, dt: str) -> str:
    """The precision fix of an event whose value `dt` lost (see the module)."""
    if event.lost_constant:
        return _constant_fix(event.lost_constant, dt)
    limit = causes.finfo_max(dt)
    if not _overflowed(event, found, dt):
        return _rounding_fix(event, dt)
    if dt.startswith(("float8_", "float4_")):
        return _float8_fix(dt, limit)
    if event.phase == "backward":
        return _backward_fix(event, dt, limit)
    return _forward_overflow_fix(event, dt, limit)


def classify(event: causes.Event, found: Classification) -> Classification | None:
    """``precision`` with its evidence and fix, or None when no dtype lost it.

    Examples:
        >>> import jax, jax.numpy as jnp, numpy as np
        >>> from jaxnan._src.locate.causes import Cause, Classification, Event
        >>> from jaxnan._src.locate import precision_fix
        >>> x = np.array([12.0], np.float16)
        >>> eqn = jax.make_jaxpr(jnp.exp)(x).eqns[0]
        >>> inf = np.full(1, np.inf, np.float16)  # what exp(12) is in float16
        >>> ev = Event(eqn, "exp", "forward", [x], [inf], "jnp.exp")
        >>> ev.finite_in_float32 = True
        >>> c = precision_fix.classify(ev, Classification(Cause.OVERFLOW, "", "exp"))
        >>> c.cause, c.fix[:45]
        ('precision', '`jnp.exp` overflows float16 (max 65504.0) whe')
    """
    dt = narrow_dtype(event)
    if dt is not None and event.primitive == _CAST and found.cause is Cause.UNSAFE_OP:
        found = found._replace(seen=_cast_seen(event, dt) or found.seen)
    seen = _seen(event, found, dt)
    if seen is None:
        return None
    if dt is None and not event.lost_constant:
        return Classification(Cause.PRECISION, Cause.PRECISION.fix, seen)
    dt = dt or (event.lost_constant or "").rsplit(" in ", 1)[-1]
    return Classification(Cause.PRECISION, fix_for(event, found, dt), seen)


def _seen(event: causes.Event, found: Classification, dt: str | None) -> str | None:
    """What the equation received, and the experiment that lost it (or None)."""
    if event.lost_constant:
        return f"{found.seen}; the constant {event.lost_constant}"
    if not event.finite_in_float32:
        return None
    if dt is None:
        return (
            f"{found.seen}; the same step is finite when its float16/bfloat16 "
            "values are computed in float32"
        )
    seen = f"{found.seen}; the same step is finite in float32 ({dt} is too "
    seen += "narrow here)"
    if event.phase == "backward" and event.primitive == _CAST:
        seen += f", the backward of this line's cast casts the cotangent to {dt}"
    return seen
