"""The vocabulary of `jaxnan.locate`: phases, causes and creation events.

- `Phase`: where the user sees the failure (``input``, ``forward``,
  ``backward``, ``update``), defined in `report` (the one phase vocabulary of
  jaxnan's errors, records and diagnoses) and re-exported here.
- `Cause`: why, each member carrying its default fix sentence:

  - ``input_data``: NaN already in the batch.
  - ``poisoned_state``: NaN already in the parameters or the optimizer state.
  - ``unsafe_op``: an operation outside its domain (log of 0, x/0, sqrt of a
    negative, a derivative infinite at a boundary, inf - inf, 0 * inf, ...).
  - ``overflow``: exp or a sum/product exceeding the dtype in the forward pass.
  - ``exploding_gradient``: a sum/product overflowing in the backward pass, or
    gradients that grew over the last steps.
  - ``update``: finite gradients, nonfinite optimizer update.
  - ``precision``: the step is finite when float16/bfloat16 values are
    computed in float32 (an epsilon that rounds to 0, a mask that rounds to
    -inf, a cancellation).
  - ``learning_rate``: the parameters grew over the recent steps until a value
    overflowed.
  - ``nondeterministic``, ``growth`` and ``underflow``: the guard's own
    verdicts (a bad step whose replay was not bad; the early warnings, before
    any NaN: figures that grow, gradients that round to 0).
  - ``injected``: a fault planted on purpose by `jaxnan.inject_grads` (or
    `jaxnan.inject_loss`), named by the guard with the fault and the step.

- `Classification`: ``(cause, fix, seen)`` for one event.
- `RULES`: the classification rule of each primitive, registered with `rule`
  beside its definition (in `cause_rules.py`).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from jax.extend import source_info_util

from jaxnan._src.core import primitives
from jaxnan._src.core.errors import Phase as Phase
from jaxnan._src.core.primitives import Domain
from jaxnan._src.locate import operands

source_info_util.register_exclusion(__file__)


class Cause(str, enum.Enum):
    """Why a nonfinite value was created; ``cause.fix`` is its default fix.

    Members compare equal to their names as strings
    (``Cause.UNSAFE_OP == "unsafe_op"``).

    Examples:
        >>> from jaxnan._src.locate.causes import Cause
        >>> Cause("overflow") is Cause.OVERFLOW, str(Cause.OVERFLOW)
        (True, 'overflow')
        >>> Cause.PRECISION.fix.startswith("Compute this step in float32")
        True
    """

    fix: str

    def __new__(cls, value: str, fix: str) -> Cause:
        obj = str.__new__(cls, value)
        obj._value_ = value
        obj.fix = fix
        return obj

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return repr(self.value)

    __format__ = str.__format__

    INPUT_DATA = (
        "input_data",
        "Clean or drop the rows with NaN/Inf in the batch before training "
        "(impute them, or filter the batch with jnp.isfinite).",
    )
    POISONED_STATE = (
        "poisoned_state",
        "The parameters or optimizer state are already nonfinite: restore the "
        "last good checkpoint and guard the updates with jaxnan.skip_nonfinite.",
    )
    UNSAFE_OP = (
        "unsafe_op",
        "Keep the operation inside its domain: add an epsilon, clamp the "
        "argument, or use the double-where trick.",
    )
    OVERFLOW = (
        "overflow",
        "Activations exceed the float range: normalize or scale them (layer "
        "norm, smaller initialization), subtract the max before exp, and lower "
        "the learning rate if they grew over the training steps.",
    )
    EXPLODING_GRADIENT = (
        "exploding_gradient",
        "Clip the gradients (optax.clip_by_global_norm(1.0)), lower the "
        "learning rate and check the initialization.",
    )
    UPDATE = (
        "update",
        "The gradients are finite but the update is not: lower the learning "
        "rate, raise the optimizer epsilon and clip the gradients.",
    )
    PRECISION = (
        "precision",
        "Compute this step in float32 where it lost the value (the "
        "normalization, the mask, the reduction: x.astype(jnp.float32), "
        "preferred_element_type=jnp.float32), use constants that float16 can "
        "hold (eps >= 1e-5, a mask of jnp.finfo(dtype).min), or a loss scale.",
    )
    LEARNING_RATE = (
        "learning_rate",
        "The parameters grew over the last steps until a value overflowed: "
        "lower the learning rate (or add warm-up), clip the gradients "
        "(optax.clip_by_global_norm) and restart from a checkpoint taken "
        "before the growth.",
    )
    # The guard's own verdicts (`jaxnan.guard`'s incidents), one vocabulary.
    NONDETERMINISTIC = (
        "nondeterministic",
        "The step was bad but its replay on the same state, batch and RNG was "
        "not: suspect the hardware, an unseeded operation or a race; rerun the "
        "step on the same inputs and check the device.",
    )
    GROWTH = (
        "growth",
        "Training is diverging before any NaN: lower the learning rate (or add "
        "warm-up) and clip the gradients (optax.clip_by_global_norm).",
    )
    UNDERFLOW = (
        "underflow",
        "Gradient entries are rounding to exactly 0 while everything stays "
        "finite: raise the loss scale (jaxnan.dynamic_loss_scale grows it), keep "
        "the gradients in float32 or bfloat16 where float16/float8 underflow, "
        "and check for units gone silent (a dead ReLU layer).",
    )
    INJECTED = (
        "injected",
        "This fault was planted on purpose (jaxnan.inject_grads or "
        "jaxnan.inject_loss): the run handled it as configured; remove the "
        "injector to train for real.",
    )


CAUSES: tuple[Cause, ...] = tuple(Cause)
"""The cause taxonomy, in the order a report lists them."""


class Classification(NamedTuple):
    """The cause of one event, its fix, and what the equation received."""

    cause: Cause
    fix: str
    seen: str


LOW_PRECISION = primitives.LOW_PRECISION_NAMES

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

    Built by `jaxnan.locate` from the creating equation and the concrete
    values it received and produced.

    Attributes:
        eqn: the creating `jax.extend.core.JaxprEqn` (primitive and params).
        primitive: the primitive name, e.g. ``"log"``.
        phase: a `Phase` (``"forward"``, ``"backward"`` or ``"update"``).
        inputs: concrete values of all inputs of the equation: host arrays,
            or `operands.Operand` summaries (what `jaxnan.locate` passes:
            a value spanning processes stays on its devices).
        outputs: concrete values of all outputs of the equation, likewise.
        user_function: the user-level function when known (``"jnp.sqrt"``),
            used to say "gradient of jnp.sqrt".
        finite_in_float32: whether the whole step is finite when its
            float16/bfloat16 values are computed in float32 (None when not
            tried).
        lost_constant: a constant of the user line that float16/bfloat16
            cannot hold (``"1e-12 is 0.0 in float16"``), when one was found.
        history: the recent history of the run (``loss``, ``grad_norm``,
            ``param_norm``: sequences, oldest first), when given.

    Examples:
        >>> import jax, jax.numpy as jnp, numpy as np
        >>> from jaxnan._src.locate.causes import Event
        >>> eqn = jax.make_jaxpr(jnp.log)(jnp.ones(2)).eqns[0]
        >>> ev = Event(eqn, "log", "forward", [np.zeros(2)], [np.full(2, -np.inf)])
        >>> ev.primitive, ev.phase
        ('log', 'forward')

    .. versionadded:: 0.1.0
    """

    eqn: Any
    primitive: str
    phase: str
    inputs: list[Any]
    outputs: list[Any]
    user_function: str | None = None
    finite_in_float32: bool | None = None
    lost_constant: str | None = None
    history: Mapping[str, Sequence[float]] | None = None


Rule = Callable[[Event], "Classification | None"]

RULES: dict[Domain, Rule] = {}
"""The classification rule of each domain of primitives (see `rule`)."""


def rule(domain: Domain) -> Callable[[Rule], Rule]:
    """Registers the classification rule of a domain (`primitives.Domain`).

    The primitives of the domain are listed once, in `primitives.DOMAINS`
    (``log`` and ``log1p`` have `Domain.LOG`). A rule reads the concrete
    values of an `Event` and returns a `Classification`, or None when the
    primitive was not outside its domain (the generic overflow rule then
    applies).

    Args:
        domain: the `primitives.Domain` the rule explains.

    Returns:
        A decorator that stores the rule and returns it unchanged.

    Examples:
        >>> from jaxnan._src.locate import causes
        >>> from jaxnan._src.core.primitives import Domain
        >>> causes.rule_for("log1p") is causes.RULES.get(Domain.LOG)
        True
    """

    def decorator(fn: Rule) -> Rule:
        RULES[domain] = fn
        return fn

    return decorator


def rule_for(primitive: str) -> Rule | None:
    """The registered rule of a primitive's domain, or None."""
    return RULES.get(primitives.domain_of(primitive))


# --------------------------------------------------------------------------
# number formatting and summaries


def fmt(v: Any) -> str:
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


def _dtype(a: Any) -> np.dtype:
    dt = getattr(a, "dtype", None)  # an `operands.Operand`, an array
    return np.dtype(dt) if dt is not None else np.asarray(a).dtype


def is_float(a: Any) -> bool:
    try:
        dt = _dtype(a)
    except Exception:  # noqa: BLE001
        return False
    return dt.kind in "fc" or dt.name == "bfloat16" or "float" in dt.name


def dtype_name(a: Any) -> str:
    return str(_dtype(a))


def finfo_max(dtype_name: str) -> float:
    try:
        import ml_dtypes  # shipped with jaxlib

        if dtype_name == "bfloat16" or dtype_name.startswith(("float8_", "float4_")):
            return float(ml_dtypes.finfo(getattr(ml_dtypes, dtype_name)).max)
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    try:
        return float(np.finfo(np.dtype(dtype_name)).max)
    except (TypeError, ValueError):
        return float(np.finfo(np.float32).max)


def positions(n: int, size: int) -> str:
    return f"at {n} of {size} position{'s' if size != 1 else ''}"


def out_dtype(event: Event) -> str:
    for o in event.outputs:
        if is_float(o):
            return dtype_name(o)
    for i in event.inputs:
        if is_float(i):
            return dtype_name(i)
    return "float32"


def finite_range(a: Any) -> str:
    """'min .., max ..' of the finite values of `a` (an array or `Operand`)."""
    c = operands.of(a).census()
    if c.finite == 0:
        return "no finite values"
    return f"min {fmt(c.low)}, max {fmt(c.high)}"


def _describe_input(a: Any) -> str:
    """'float32[4] (min .., max .., 1 nan)' for one input of an equation."""
    x = operands.of(a)
    shape = "x".join(str(d) for d in x.shape) or "scalar"
    if not is_float(x):
        return f"{x.dtype}[{shape}]"
    c = x.census()
    counts = ((c.nan, "nan"), (c.posinf, "+inf"), (c.neginf, "-inf"))
    desc = finite_range(x) if x.size else "empty"
    extra = ", ".join(f"{n} {kind}" for n, kind in counts if n)
    if extra:
        desc += ", " + extra
    return f"{x.dtype}[{shape}] ({desc})"


def describe_generic(event: Event) -> str:
    """'mul received float32[4] (min .., max ..), ...' for any equation."""
    parts = [_describe_input(a) for a in event.inputs]
    return f"{event.primitive} received " + "; ".join(parts) if parts else ""


def gradient_of(event: Event, default: str) -> str:
    return f"gradient of {event.user_function or default}"


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


_STATE_ARGS = ("param", "opt_state", "optstate", "state", "model", "variables")
_DATA_ARGS = ("batch", "data", "input", "x", "y", "label", "target", "image", "obs")


def _argument_kind(name: str) -> bool | None:
    """What an argument name tells: True for state, False for data, else None."""
    if name.startswith(_STATE_ARGS):
        return True
    if name in _DATA_ARGS or name.startswith(_DATA_ARGS[:3]):
        return False
    return None


def _inner_kind(keys: Sequence[str]) -> bool | None:
    """What the keys inside an argument tell (a data key wins over a state key)."""
    if any(k.startswith(("batch", "data", "input")) for k in keys):
        return False
    if any(k.startswith(_STATE_WORDS) or k in ("w", "b") for k in keys):
        return True
    return None


def _is_data_word(word: str) -> bool:
    return word in _DATA_WORDS or word.startswith(_DATA_WORDS[5:])


def is_state_path(path: str) -> bool | None:
    """True for params/optimizer-state paths, False for batch paths, else None.

    The argument name (the first word) decides when it is telling
    (``params``, ``opt_state``, ``state``, ``model``: state; ``batch``, ``x``,
    ``inputs``, ``labels``: data); otherwise the inner keys do (``kernel``,
    ``mu``, ``layers``: state). A bare argument named like a parameter
    (``bias``, ``mask``) with no container is not enough to call it state.
    """
    words = _path_words(path)
    if not words:
        return None
    kind = _argument_kind(words[0])
    if kind is None:
        kind = _inner_kind(words[1:])
    if kind is None and any(_is_data_word(w) for w in words):
        kind = False
    return kind


def classify_inputs(
    nonfinite_inputs: Mapping[str, Sequence[int]],
) -> Classification:
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
        A `Classification` (``seen`` lists the leaves).

    Examples:
        >>> from jaxnan._src.locate.causes import classify_inputs
        >>> classify_inputs({"batch['x']": (3, 0, 0)}).cause
        'input_data'
        >>> classify_inputs({"params['w']": (0, 1, 0)}).cause
        'poisoned_state'

    .. versionadded:: 0.1.0
    """
    # The leaves that hold a nonfinite value (all of them when no counts say).
    paths = [p for p, c in nonfinite_inputs.items() if sum(c) > 0]
    paths = paths or list(nonfinite_inputs)
    by_kind: dict[bool | None, list[str]] = {True: [], False: [], None: []}
    for p in paths:
        by_kind[is_state_path(p)].append(p)
    seen = "nonfinite values in the arguments: " + ", ".join(paths[:3])
    if by_kind[True]:
        fix = _poisoned_fix(by_kind[True])
        return Classification(Cause.POISONED_STATE, fix, seen)
    fix = _input_data_fix(by_kind[False] or paths)
    return Classification(Cause.INPUT_DATA, fix, seen)


def _poisoned_fix(paths: Sequence[str]) -> str:
    """`Cause.POISONED_STATE`'s fix, naming the first state leaves."""
    return Cause.POISONED_STATE.fix.replace(
        "are already nonfinite", f"are already nonfinite ({', '.join(paths[:3])})"
    )


def _input_data_fix(paths: Sequence[str]) -> str:
    """`Cause.INPUT_DATA`'s fix, naming the first data leaves."""
    return (
        f"Clean or drop the rows with NaN/Inf in {', '.join(paths[:3])} before "
        "training (impute them, or filter the batch with jnp.isfinite)."
    )
