"""The cause of a bad step from the run's history: one registered rule each.

`jaxnan.locate` explains the equation that created the first nonfinite
value; the guard knows more: the figures of the healthy steps before it
(`evidence.Trace`), its early-warning growth (`history.History`), and what
it gathers at the incident (`evidence.Probe`: per-leaf parameter norms, the
Adam moments, the learning rate). A history rule reads all of it
(`Context`) and returns a `Verdict` (cause, fix and the `evidence.Evidence`
it cites), or None. `decide` runs the rules by priority (lower first; ties
in registration order); the first verdict is the incident's. The last rule,
``located``, always answers: locate's own cause with what the equation
received, so every incident names a cause with the evidence it used.

A rule of one's own::

    @jaxnan.register_history_rule(priority=5)
    def loss_scale_collapsed(ctx):
        ...
        return Verdict(Cause.PRECISION, "raise the loss scale", (evidence,))
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

from jax.extend import source_info_util

from jaxnan._src.guard import history
from jaxnan._src.guard.evidence import (
    HISTORY_FIGURES,
    Evidence,
    Figure,
    Probe,
    Trace,
    num,
)
from jaxnan._src.locate.api import Diagnosis
from jaxnan._src.locate.causes import LOW_PRECISION, Cause, Phase, finfo_max
from jaxnan._src.transforms import inject

source_info_util.register_exclusion(__file__)


@dataclasses.dataclass(frozen=True)
class Context:
    """What a history rule reads about one bad step.

    Attributes:
        step: the bad step.
        located: `jaxnan.locate`'s diagnosis of its replay (None when the
            replay failed).
        trace: the healthy steps' figures before it (`evidence.Trace`).
        growth: the early-warning growth behind it (`history.Growth`).
        probe: what was gathered at the incident (`evidence.Probe`).
        factor: the guard's ``growth`` (a figure that grew this many times is
            exploding).
        failure: why the replay failed, when it did.
        injected: the injectors (`jaxnan.inject_grads`, ...) that planted
            their fault on this step (`inject.Planted`).
    """

    step: int
    located: Diagnosis | None
    trace: Trace
    growth: tuple[history.Growth, ...] = ()
    probe: Probe = Probe()
    factor: float = 100.0
    failure: str = ""
    injected: tuple[inject.Planted, ...] = ()

    @property
    def located_cause(self) -> Cause | None:
        return self.located.cause if self.located is not None else None


class Verdict(NamedTuple):
    """A rule's answer: the cause, one fix sentence, the evidence it cites."""

    cause: Cause
    fix: str
    evidence: tuple[Evidence, ...]


HistoryRule = Callable[[Context], "Verdict | None"]


@dataclasses.dataclass(frozen=True)
class _Registered:
    priority: int
    order: int
    name: str
    fn: HistoryRule


HISTORY_RULES: dict[str, _Registered] = {}
"""The history rules by name (see `register_history_rule`)."""


def register_history_rule(
    fn: HistoryRule | None = None, *, name: str | None = None, priority: int = 50
):
    """Registers a history-aware cause rule of `jaxnan.guard`.

    A rule is a function of a `Context` (the bad step, locate's diagnosis,
    the figures of the steps before, what the guard gathered at the
    incident) returning a `Verdict` (cause, fix, the evidence it cites) or
    None. Rules run by `priority`, lower first (the built-in ones use 0 to
    40, and 1000 for the catch-all ``located``); the first verdict names the
    incident's cause. A rule registered again under its name replaces it.

    Args:
        fn: the rule (when used as a bare decorator).
        name: the rule's name in the evidence (default: the function's).
        priority: where it runs among the rules.

    Returns:
        The rule, unchanged (or a decorator, without `fn`).

    Raises:
        TypeError: for a rule that is not callable, or a `priority` that is
            not an int.

    Examples:
        >>> import jaxnan
        >>> from jaxnan._src.guard import history_rules
        >>> @jaxnan.register_history_rule(priority=99)
        ... def never(ctx):
        ...     return None
        >>> "never" in history_rules.HISTORY_RULES
        True
        >>> del history_rules.HISTORY_RULES["never"]
    """
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise TypeError(
            "jaxnan.register_history_rule: priority must be an int (lower runs "
            f"first; the built-in rules use 0 to 40), got {priority!r}."
        )

    def decorator(rule: HistoryRule) -> HistoryRule:
        if not callable(rule):
            raise TypeError(
                "jaxnan.register_history_rule: the rule must be a function of a "
                f"Context returning a Verdict or None, got {type(rule).__name__}."
            )
        key = name or rule.__name__
        order = len(HISTORY_RULES)
        if key in HISTORY_RULES:
            order = HISTORY_RULES[key].order
        HISTORY_RULES[key] = _Registered(priority, order, key, rule)
        return rule

    return decorator(fn) if fn is not None else decorator


def decide(ctx: Context) -> Verdict | None:
    """The verdict of the first rule that answers.

    None only when no rule answers: the replay failed and the history
    tells nothing (the incident's cause is then ``unknown``).
    """
    for entry in sorted(HISTORY_RULES.values(), key=lambda r: (r.priority, r.order)):
        verdict = entry.fn(ctx)
        if verdict is not None:
            return verdict
    return None


# --------------------------------------------------------------------------
# the built-in rules


def _seen(ctx: Context, rule: str) -> Evidence:
    d = ctx.located
    text = (d.inputs_seen if d is not None else "") or ctx.failure
    return Evidence(rule, Figure.LOCATED, text or "no replay")


@register_history_rule(priority=5)
def input_or_state(ctx: Context) -> Verdict | None:
    """NaN already in the batch or the state: no history explains it away."""
    cause = ctx.located_cause
    if cause not in (Cause.INPUT_DATA, Cause.POISONED_STATE):
        return None
    return Verdict(cause, ctx.located.fix or cause.fix, (_seen(ctx, "input_or_state"),))


_NONFINITE_FIX = (
    "The learning rate schedule gives {what} at optimizer step {count}: fix "
    "the schedule (a warm-up of at least 1 step, no division by a zero step "
    "count or length), e.g. optax.warmup_cosine_decay_schedule(0.0, peak, "
    "warmup_steps, decay_steps) with warmup_steps >= 1."
)
_SURGE_FIX = (
    "The learning rate schedule surges to {what} at optimizer step {count}: fix "
    "the schedule (a sign or a unit in a decay exponent, an end or floor value "
    "above the peak) so that it stays at or below its peak, and clip the "
    "gradients (optax.clip_by_global_norm) while it is fixed."
)


SURGE = 4.0
"""A learning rate this many times its median over the window is a surge."""


def _lr_evidence(ctx: Context) -> Evidence | None:
    """The step's learning rate when nonfinite, or a surge over the window."""
    lr = ctx.probe.learning_rate
    if lr is None:
        return None
    head = f"learning rate at optimizer step {lr.count} is {num(lr.value)}"
    if not math.isfinite(lr.value):
        return Evidence(
            "schedule", Figure.LEARNING_RATE, f"{head} ({lr.source})", last=lr.value
        )
    earlier = [v for v in lr.earlier if math.isfinite(v) and v > 0]
    if len(earlier) < 2:
        return None
    base = sorted(earlier)[len(earlier) // 2]
    if abs(lr.value) < SURGE * base:
        return None
    return Evidence(
        "schedule",
        Figure.LEARNING_RATE,
        f"{head}, {num(abs(lr.value) / base)}x its median {num(base)} over the "
        f"{len(earlier)} steps before ({lr.source})",
        first=base,
        last=lr.value,
        steps=len(earlier),
    )


@register_history_rule(priority=-10)
def injected(ctx: Context) -> Verdict | None:
    """A fault planted on purpose on this step (`jaxnan.inject_grads`).

    Answers first: whatever the replay located, the step went bad because
    the test asked it to.
    """
    if not ctx.injected:
        return None
    cited = tuple(
        Evidence("injected", Figure.REPLAY, p.text(ctx.step)) for p in ctx.injected
    )
    return Verdict(Cause.INJECTED, Cause.INJECTED.fix, cited)


@register_history_rule(priority=0)
def schedule(ctx: Context) -> Verdict | None:
    """The learning rate of the step is nonfinite, or surged over its past.

    Runs before the state check: a nonfinite learning rate held in an
    `optax.inject_hyperparams` state makes locate call the state poisoned.
    """
    if ctx.located_cause is Cause.INPUT_DATA:
        return None
    ev = _lr_evidence(ctx)
    if ev is None:
        return None
    lr = ctx.probe.learning_rate
    template = _NONFINITE_FIX if not math.isfinite(lr.value) else _SURGE_FIX
    fix = template.format(what=num(lr.value), count=lr.count)
    return Verdict(Cause.LEARNING_RATE, fix, (ev, _seen(ctx, "schedule")))


def _located_note(ctx: Context, rule: str) -> tuple[Evidence, ...]:
    cause = ctx.located_cause
    if cause is None:
        return ()
    return (
        Evidence(
            rule,
            Figure.LOCATED,
            f"without that growth the cause at the line would be {cause}",
        ),
    )


def _lr_fix(ctx: Context) -> str:
    lr = ctx.probe.learning_rate
    at = f" (it was {num(lr.value)} at this step)" if lr is not None else ""
    return (
        f"Lower the learning rate{at}, or add a warm-up; guard the optimizer "
        "with jaxnan.skip_spikes / jaxnan.zscore_clip / "
        "jaxnan.clip_by_global_norm and restart from a checkpoint taken before "
        "the growth."
    )


def _grew(ctx: Context, figure: str) -> history.Growth | None:
    return next((g for g in ctx.growth if g.figure == figure), None)


def _growth_evidence(g: history.Growth, rule: str) -> Evidence:
    return Evidence(
        rule,
        HISTORY_FIGURES[g.figure],
        f"{g}, then the NaN",
        g.median,
        g.last,
        g.steps,
    )


@register_history_rule(priority=20)
def exploding_gradient(ctx: Context) -> Verdict | None:
    """The gradient norm grew geometrically, or jumped, while the loss did not.

    A jump counts on a step whose own loss was ordinary, even when the loss
    climbs after it (the update the jump made).
    """
    if ctx.located_cause in (Cause.INPUT_DATA, Cause.POISONED_STATE):
        return None
    rule = "exploding_gradient"
    grad = ctx.trace.climb("grad_norm", ctx.factor, rule)
    loss_up = (
        ctx.trace.climb("loss", 10.0, rule)
        or ctx.trace.shift("loss", ctx.factor, rule)
        or _grew(ctx, "loss")
    )
    if grad is None or loss_up:
        grad = ctx.trace.jump("grad_norm", ctx.factor, rule, calm="loss")
    if grad is None:
        return None
    fix = (
        "Clip the gradients (optax.chain(optax.clip_by_global_norm(1.0), ...) "
        "or jaxnan.clip_by_global_norm(1.0) first in the chain); for a "
        "recurrent network also shorten the unrolled sequence (truncated "
        "backpropagation through time) or keep the recurrent weights' "
        "spectral norm below 1 (orthogonal init)."
    )
    return Verdict(
        Cause.EXPLODING_GRADIENT, fix, (grad, *_located_note(ctx, "exploding_gradient"))
    )


@register_history_rule(priority=30)
def divergence(ctx: Context) -> Verdict | None:
    """The loss or the update ratio climbed before the NaN: the learning rate."""
    if ctx.located_cause in (Cause.INPUT_DATA, Cause.POISONED_STATE):
        return None
    found = [
        e
        for e in (
            ctx.trace.climb("loss", 10.0, "divergence")
            or ctx.trace.shift("loss", ctx.factor, "divergence"),
            ctx.trace.climb("update_ratio", 10.0, "divergence"),
        )
        if e is not None
    ]
    found += [
        _growth_evidence(g, "divergence")
        for g in ctx.growth
        if not any(e.figure == HISTORY_FIGURES[g.figure] for e in found)
    ]
    if not found:
        return None
    return Verdict(
        Cause.LEARNING_RATE,
        _lr_fix(ctx),
        (*found, *_largest(ctx, "divergence"), *_located_note(ctx, "divergence")),
    )


def _largest(ctx: Context, rule: str) -> tuple[Evidence, ...]:
    """The parameter leaf of largest magnitude, as evidence."""
    big = ctx.probe.largest_param()
    if big is None:
        return ()
    return (
        Evidence(
            rule,
            Figure.PARAM_NORM,
            f"largest parameter leaf {big.path}: max |x| {num(big.max_abs)}, "
            f"norm {num(big.norm)} over {big.size} entries",
            last=big.norm,
            leaf=big.path,
        ),
    )


INIT_GAIN = 3.0
"""A weight matrix this many times the scale of a LeCun init is too large."""


@register_history_rule(priority=35)
def initialization(ctx: Context) -> Verdict | None:
    """A forward overflow with weights far above their initialization scale.

    Runs after the history rules: activations that overflow after the run
    grew are the learning rate's; with no such growth, a weight matrix at
    `INIT_GAIN` times the scale of a LeCun init or more explains them.
    """
    d = ctx.located
    if d is None or d.cause != Cause.OVERFLOW or d.phase != Phase.FORWARD:
        return None
    gains = [
        (g, s)
        for s in ctx.probe.params
        if "embed" not in s.path.lower() and (g := ctx.probe.gain(s)) is not None
    ]  # an embedding table's rows are not a fan-in
    if not gains:
        return None
    gain, leaf = max(gains, key=lambda t: t[0])
    if gain < INIT_GAIN:
        return None
    rms = leaf.norm / math.sqrt(leaf.size)
    lecun = rms / gain
    ev = Evidence(
        "initialization",
        Figure.PARAM_NORM,
        f"{leaf.path} {list(leaf.shape)} has RMS {num(rms)}, {num(gain)}x the "
        f"1/sqrt(fan_in) = {num(lecun)} of a LeCun init",
        first=lecun,
        last=rms,
        leaf=leaf.path,
    )
    fix = (
        f"The weights are {num(gain)}x the scale of a standard initialization "
        f"({leaf.path}), so the activations overflow: initialize at 1/sqrt(fan_in)"
        " (nn.initializers.lecun_normal(), the default of nn.Dense / nnx.Linear; "
        f"or a std {num(gain)}x smaller than now) and normalize the layer inputs. "
        f"{d.fix or Cause.OVERFLOW.fix}"
    )
    return Verdict(Cause.OVERFLOW, fix, (ev, _seen(ctx, "initialization")))


def _pair(path: str) -> str:
    return (
        path.replace(".nu", ".?")
        .replace("['nu']", "['?']")
        .replace(".mu", ".?")
        .replace("['mu']", "['?']")
    )


def _moments(ctx: Context) -> list[Evidence]:
    """Adam's ``nu`` at 0 where ``mu`` is not, or ``mu`` near its dtype's range."""
    found = []
    mus = {_pair(s.path): s for s in ctx.probe.mu}
    fresh = ctx.probe.count == 0
    for nu in ctx.probe.nu:
        mu = mus.get(_pair(nu.path))
        if not nu.zeros or fresh and nu.zeros == nu.size:
            continue  # as initialized: says nothing yet
        under = mu is not None and mu.zeros < nu.zeros
        text = (
            f"{nu.path} ({nu.dtype}) is exactly 0.0 at {nu.zeros} of {nu.size} entries"
        )
        if under:
            text += f" where {mu.path} is 0.0 at only {mu.zeros}: nu underflowed"
        found.append(
            Evidence(
                "optimizer_state", Figure.SECOND_MOMENT, text, last=0.0, leaf=nu.path
            )
        )
    for mu in ctx.probe.mu:
        top = finfo_max(mu.dtype)
        if mu.max_abs >= top / 8:
            found.append(
                Evidence(
                    "optimizer_state",
                    Figure.FIRST_MOMENT,
                    f"{mu.path} ({mu.dtype}) reaches {num(mu.max_abs)}, near its "
                    f"max {num(top)}: mu overflows",
                    last=mu.max_abs,
                    leaf=mu.path,
                )
            )
    return found


def _low_precision_division(ctx: Context) -> Evidence | None:
    """The update divides in float16/bfloat16 by a zero denominator."""
    d = ctx.located
    if d.primitive != "div" or d.dtype not in LOW_PRECISION:
        return None
    moments = ", ".join(
        sorted({n.dtype for n in ctx.probe.nu if n.dtype in LOW_PRECISION})
    )
    held = f" with {moments} second moments" if moments else ""
    return Evidence(
        "optimizer_state",
        Figure.SECOND_MOMENT,
        f"the update divides in {d.dtype} by sqrt(nu) + eps = 0.0{held}: an "
        f"eps below {num(_smallest(d.dtype))} is 0.0 in {d.dtype} (Adam's "
        "default 1e-8 is)",
    )


def _smallest(dtype: str) -> float:
    """The smallest positive (subnormal) value of a 16-bit float dtype."""
    return 5.96e-08 if dtype == "float16" else 9.18e-41


@register_history_rule(priority=40)
def optimizer_state(ctx: Context) -> Verdict | None:
    """Finite gradients, nonfinite update: Adam's ``nu`` underflow / ``mu`` overflow."""
    d = ctx.located
    if d is None or d.phase != Phase.UPDATE:
        return None
    found = _moments(ctx)
    division = _low_precision_division(ctx)
    if division is not None:
        found.append(division)
    if not found:
        return None
    low = division is not None or any(n.dtype in LOW_PRECISION for n in ctx.probe.nu)
    fix = (
        "The optimizer's moments lost the value while the gradients are finite: "
        "raise Adam's eps (optax.adam(lr, eps=1e-8) in float32"
        + (", eps=1e-4 for float16/bfloat16 moments" if low else "")
        + "), add eps_root, or keep the optimizer state in float32 "
        "(float32 master parameters, mu_dtype=jnp.float32)."
    )
    return Verdict(Cause.UPDATE, fix, (*found, _seen(ctx, "optimizer_state")))


@register_history_rule(priority=1000)
def located(ctx: Context) -> Verdict | None:
    """Locate's own cause, with what the creating equation received."""
    d = ctx.located
    cause = ctx.located_cause
    if d is None or cause is None:
        return None
    extra: tuple[Evidence, ...] = ()
    if cause in (Cause.OVERFLOW, Cause.EXPLODING_GRADIENT):
        extra = _largest(ctx, "located")
    fix = d.fix or cause.fix
    if cause == Cause.EXPLODING_GRADIENT and d.iteration:
        fix = (
            f"The backward pass overflows inside a loop (iteration "
            f"{', '.join(map(str, d.iteration))}): shorten the unrolled sequence "
            "(truncated backpropagation through time, or split long sequences), "
            "keep the recurrent weights' spectral norm below 1 (orthogonal "
            "init), and clip the gradients (optax.clip_by_global_norm(1.0)); "
            "clipping alone cannot undo an overflow inside the backward pass."
        )
    return Verdict(cause, fix, (_seen(ctx, "located"), *extra))
