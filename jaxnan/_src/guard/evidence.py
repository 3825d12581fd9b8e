"""What a `jaxnan.guard` cause cites: typed evidence, the run's figures, a probe.

Every incident names its cause with the evidence it used, one `Evidence`
record per figure: rendered as a ``why:`` line of the report and written to
the JSONL log (``"evidence"``). Three sources:

- `Trace`: the figures the guard already reads every step (loss, gradient
  norm, update-to-parameter ratio) over the healthy steps before the bad
  one, and `climb`, the test of a figure growing geometrically on them;
- `Probe`: what is gathered only at an incident, from the state the bad step
  ran on: per-leaf parameter norms, the Adam moments (``mu``, ``nu``) per
  leaf, and the learning rate of that step (from an `optax.inject_hyperparams`
  state, or from a schedule passed to `jaxnan.guard`);
- the diagnosis of `jaxnan.locate` (what the creating equation received).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import source_info_util

from jaxnan._src.guard import multihost

source_info_util.register_exclusion(__file__)


class Figure(str, enum.Enum):
    """What a piece of evidence measures (its ``figure`` in the log)."""

    LOSS = "loss"
    GRAD_NORM = "gradient norm"
    UPDATE_RATIO = "update ratio"
    LEARNING_RATE = "learning rate"
    PARAM_NORM = "parameter norm"
    FIRST_MOMENT = "first moment (mu)"
    SECOND_MOMENT = "second moment (nu)"
    LOCATED = "located"
    REPLAY = "replay"

    def __str__(self) -> str:
        return self.value


HISTORY_FIGURES = {
    "loss": Figure.LOSS,
    "grad_norm": Figure.GRAD_NORM,
    "update_ratio": Figure.UPDATE_RATIO,
}


def num(v: float) -> str:
    """A figure as printed in evidence: 3.1, 3.4e+04, 0.0076, nan.

    Examples:
        >>> num(3.14159), num(34000.0), num(0.00757), num(float("nan"))
        ('3.14', '3.4e+04', '0.00757', 'nan')
    """
    v = float(v)
    if not math.isfinite(v):
        return str(v)
    if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
        return f"{v:.2g}"
    return f"{v:.3g}"


@dataclasses.dataclass(frozen=True)
class Evidence:
    """One figure a cause rule cites, with the sentence the report prints.

    Attributes:
        rule: the name of the rule that cites it (``"exploding_gradient"``).
        figure: what it measures (`Figure`).
        text: the sentence of the report's ``why:`` line.
        first: the figure where its story starts (the low point of a climb).
        last: its latest value.
        steps: how many steps lie between `first` and `last`.
        leaf: the state leaf it is about, when one (``"params['w']"``).

    Examples:
        >>> from jaxnan._src.guard.evidence import Evidence, Figure
        >>> e = Evidence.grew("exploding_gradient", Figure.GRAD_NORM, 3.1, 3.4e4, 20)
        >>> e.text
        'gradient norm grew 1.1e+04x over 20 steps: 3.1 -> 3.4e+04'
        >>> e.to_dict()["figure"]
        'gradient norm'
    """

    rule: str
    figure: Figure
    text: str
    first: float | None = None
    last: float | None = None
    steps: int | None = None
    leaf: str | None = None

    @classmethod
    def grew(
        cls, rule: str, figure: Figure, first: float, last: float, steps: int
    ) -> Evidence:
        """A figure that grew from `first` to `last` over `steps` steps."""
        factor = last / first if first > 0 else math.inf
        text = (
            f"{figure} grew {num(factor)}x over {steps} step"
            f"{'s' if steps != 1 else ''}: {num(first)} -> {num(last)}"
        )
        return cls(rule, figure, text, float(first), float(last), steps)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for the JSONL log (nonfinite numbers as strings)."""
        d = dataclasses.asdict(self)
        d["figure"] = self.figure.value
        for key in ("first", "last"):
            if d[key] is not None and not math.isfinite(d[key]):
                d[key] = str(d[key])
        return d


# --------------------------------------------------------------------------
# the run's figures


@dataclasses.dataclass(frozen=True)
class Trace:
    """The healthy steps' figures before a bad step, oldest first.

    Attributes:
        steps: the step numbers.
        columns: figure name (``loss``, ``grad_norm``, ``update_ratio``) ->
            its values at `steps`.
    """

    steps: tuple[int, ...]
    columns: dict[str, tuple[float, ...]]

    @classmethod
    def before(
        cls,
        figures: Iterable[tuple[int, float, float, float, bool]],
        step: int,
        undone: Iterable[int] = (),
        keep: int = 64,
    ) -> Trace:
        """The last `keep` healthy steps before `step`, undone steps left out."""
        gone = set(undone)
        rows = [f for f in figures if f[0] < step and not f[4] and f[0] not in gone]
        rows = rows[-keep:]
        return cls(
            tuple(r[0] for r in rows),
            {
                "loss": tuple(abs(r[1]) for r in rows),
                "grad_norm": tuple(r[2] for r in rows),
                "update_ratio": tuple(r[3] for r in rows),
            },
        )

    def climb(self, name: str, factor: float, rule: str) -> Evidence | None:
        """`climb` of a column, as evidence cited by `rule`."""
        found = climb(self.columns.get(name, ()), factor)
        if found is None:
            return None
        first, last, steps = found
        return Evidence.grew(rule, HISTORY_FIGURES[name], first, last, steps)

    def jump(
        self, name: str, factor: float, rule: str, calm: str, recent: int = 16
    ) -> Evidence | None:
        """A jump of `name` while `calm` stayed put, as evidence cited by `rule`.

        The first step of the last `recent` where `name` is `factor` times
        its median over the 8 steps before while `calm` stays under 10 times
        its own: ``gradient norm jumped 1e+06x at step 41 (...) while the
        loss stayed at 0.3``. None when `calm` moved first or with it.
        """
        col, other = self.columns.get(name, ()), self.columns.get(calm, ())
        n = len(col)
        for i in range(max(3, n - recent), n):
            before = sorted(v for v in col[max(0, i - 8) : i] if math.isfinite(v))
            quiet = sorted(v for v in other[max(0, i - 8) : i] if math.isfinite(v))
            if len(before) < 3 or not quiet:
                continue
            base, calm_base = before[len(before) // 2], quiet[len(quiet) // 2]
            if base > 0 and col[i] >= factor * base:
                if not other[i] < 10 * max(calm_base, 1e-30):
                    return None  # the other figure moved first, or with it
                figure = HISTORY_FIGURES[name]
                return Evidence(
                    rule,
                    figure,
                    f"{figure} jumped {num(col[i] / base)}x at step "
                    f"{self.steps[i]} ({num(base)} -> {num(col[i])}) while the "
                    f"{HISTORY_FIGURES[calm]} stayed at {num(other[i])}",
                    base,
                    col[i],
                    n - 1 - i,
                )
        return None

    def shift(
        self, name: str, factor: float, rule: str, recent: int = 8
    ) -> Evidence | None:
        """`shift` of a column, as evidence cited by `rule`."""
        found = shift(self.columns.get(name, ()), factor, recent)
        if found is None:
            return None
        before, after, steps = found
        figure = HISTORY_FIGURES[name]
        return Evidence(
            rule,
            figure,
            f"{figure} rose {num(after / before)}x: median {num(before)} over "
            f"the first {steps} of the last {len(self.steps)} steps, median "
            f"{num(after)} over the last {recent}",
            before,
            after,
            len(self.steps),
        )


def climb(
    values: Sequence[float], factor: float, rising: float = 0.6
) -> tuple[float, float, int] | None:
    """``(low, last, steps)`` when `values` end in a geometric climb, else None.

    The climb starts at the lowest value before the last two; it counts when
    the last value is at least `factor` times that low point and the figure
    rose on at least `rising` of the steps since (a steady climb, not one
    spike after a quiet run).

    Examples:
        >>> climb([1.0, 0.9, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0], 100.0)
        (0.9, 128.0, 7)
        >>> climb([1.0, 0.9, 0.8, 0.7, 90.0], 100.0) is None
        True
    """
    vals = [float(v) for v in values if math.isfinite(v)]  # an overflowed norm
    if len(vals) < 4 or not all(v >= 0 for v in vals):
        return None
    start = min(range(len(vals) - 2), key=lambda i: (vals[i], -i))
    low, last = vals[start], vals[-1]
    steps = len(vals) - 1 - start
    if low <= 0 or last < factor * low or steps < 3:
        return None
    ups = sum(b > a for a, b in zip(vals[start:], vals[start + 1 :]))
    if ups < rising * steps:
        return None
    return low, last, steps


def shift(
    values: Sequence[float], factor: float, recent: int = 8
) -> tuple[float, float, int] | None:
    """``(before, after, n)`` when the last `recent` values sit far above the rest.

    `after` is the median of the last `recent` values, `before` that of the
    `n` values before them; a shift counts when `after` is at least `factor`
    times `before` (an erratic divergence that `climb` misses: the loss
    jumping between 1e5 and 1e13 after a learning-rate surge).

    Examples:
        >>> shift([1.0] * 8 + [1e5, 3.0, 1e8, 2e6, 1e4, 5e7, 1e3, 1e6], 100.0)
        (1.0, 550000.0, 8)
        >>> shift([1.0] * 8 + [0.9] * 8, 100.0) is None
        True
    """
    vals = [float(v) for v in values if math.isfinite(v)]
    if len(vals) < recent + 4 or not all(v >= 0 for v in vals):
        return None
    head, tail = sorted(vals[:-recent]), sorted(vals[-recent:])
    before = head[len(head) // 2]
    after = (tail[(recent - 1) // 2] + tail[recent // 2]) / 2
    if before <= 0 or after < factor * before:
        return None
    return before, after, len(head)


# --------------------------------------------------------------------------
# the probe: gathered only at an incident


@dataclasses.dataclass(frozen=True)
class LeafStats:
    """Statistics of one state leaf at an incident.

    Attributes:
        path: the leaf as written in the step's arguments.
        dtype: its dtype name.
        shape: its shape.
        size: its number of entries.
        norm: its L2 norm (in float32).
        max_abs: its largest magnitude.
        zeros: how many entries are exactly 0.
        nonfinite: how many entries are NaN or +/-Inf.
    """

    path: str
    dtype: str
    shape: tuple[int, ...]
    size: int
    norm: float
    max_abs: float
    zeros: int
    nonfinite: int


@dataclasses.dataclass(frozen=True)
class LearningRate:
    """The learning rate of the bad step and of the steps before it.

    Attributes:
        value: the learning rate the bad step used (or, from an
            `optax.inject_hyperparams` state, the latest one it holds).
        count: the optimizer step count it was read at.
        source: ``"schedule"`` (passed to `jaxnan.guard`) or the state path.
        earlier: the schedule's values at the counts before, oldest first
            (empty when only the state was read).
    """

    value: float
    count: int | None
    source: str
    earlier: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class Probe:
    """What the guard gathers at an incident, from the state the step ran on.

    Attributes:
        params: per-leaf statistics of the parameters (the state outside the
            optimizer's), in the order of the arguments.
        mu: per-leaf statistics of the first moments (Adam's ``mu``).
        nu: per-leaf statistics of the second moments (Adam's ``nu``).
        learning_rate: the learning rate, when an `optax.inject_hyperparams`
            state or a schedule tells it.
        count: the optimizer's step count (its first ``count`` leaf), None
            when the state has none.
    """

    params: tuple[LeafStats, ...] = ()
    mu: tuple[LeafStats, ...] = ()
    nu: tuple[LeafStats, ...] = ()
    learning_rate: LearningRate | None = None
    count: int | None = None

    def gain(self, leaf: LeafStats) -> float | None:
        """A weight matrix's scale against a LeCun init: RMS * sqrt(fan_in).

        1 for ``lecun_normal`` (the default of `flax.linen.Dense` and
        `flax.nnx.Linear`), about 1.4 for He, up to 1 for Glorot; None for
        leaves of fewer than 2 dimensions (biases, scales). The fan-in is the
        leading dimensions of a Flax ``kernel`` (in, out) and the trailing
        ones of a PyTorch-style ``weight`` (out, in: Equinox).
        """
        if len(leaf.shape) < 2 or not leaf.size:
            return None
        shape = leaf.shape
        fan_in = math.prod(shape[1:] if "weight" in leaf.path else shape[:-1])
        return leaf.norm / math.sqrt(leaf.size) * math.sqrt(fan_in)

    def largest_param(self) -> LeafStats | None:
        """The parameter leaf of largest magnitude, or None."""
        return max(self.params, key=lambda s: s.max_abs, default=None)


_OPT = re.compile(
    r"(opt|optimizer|inner_state|nonfinite|hyperparams|skip_step|gave_up|count)"
)
_COUNT = re.compile(r"(?:\.|\[')count(?:'\])?(?:\.value)?$")
_MOMENT = re.compile(r"(?:\.|\[')(mu|nu)(?:'\]|\b)")


def _kind(path: str) -> str:
    """``"mu"``, ``"nu"``, ``"param"`` or ``""`` (other optimizer state)."""
    m = _MOMENT.search(path)
    if m:
        return m.group(1)
    return "" if _OPT.search(path) else "param"


@jax.jit
def _leaf_figures(leaves: list) -> jax.Array:
    """``[norm, max_abs, zeros, nonfinite]`` per float leaf (one program)."""
    rows = []
    for x in leaves:
        x = jnp.abs(x).astype(jnp.float32)
        finite = jnp.isfinite(x)
        clean = jnp.where(finite, x, 0.0)
        rows.append(
            jnp.stack(
                [
                    jnp.sqrt(jnp.sum(jnp.square(clean))),
                    jnp.max(clean, initial=0.0),
                    jnp.sum(x == 0).astype(jnp.float32),
                    jnp.sum(~finite).astype(jnp.float32),
                ]
            )
        )
    return jnp.stack(rows)


def _floats(named: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return [
        (p, x)
        for p, x in named
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact) and x.size
    ]


def _count(named: Sequence[tuple[str, Any]]) -> int | None:
    """The optimizer's step count: its first ``count`` leaf."""
    counts = [x for p, x in named if _COUNT.search(p)]
    return int(multihost.host_value(counts[0])) if counts else None


def _learning_rate(
    named: Sequence[tuple[str, Any]],
    schedule: Callable[[Any], Any] | None,
    fallback_count: int,
    window: int,
) -> LearningRate | None:
    """From the passed schedule, else from an inject_hyperparams state."""
    count = _count(named)
    count = fallback_count if count is None else count
    if schedule is not None:
        value = float(np.asarray(schedule(count)))
        earlier = tuple(
            float(np.asarray(schedule(c))) for c in range(max(0, count - window), count)
        )
        return LearningRate(value, count, "schedule", earlier)
    for p, x in named:
        if "hyperparams" in p and "learning_rate" in p and np.size(x) == 1:
            return LearningRate(float(multihost.host_value(x)), count, p)
    return None


def probe(
    named: Sequence[tuple[str, Any]],
    *,
    schedule: Callable[[Any], Any] | None = None,
    step: int = 0,
    window: int = 8,
) -> Probe:
    """The `Probe` of a state given as ``(path, leaf)`` pairs.

    One small compiled program reads the norms of all float leaves (cached
    per structure by `jax.jit`); the learning rate is read from the state's
    ``hyperparams['learning_rate']`` or evaluated from `schedule` on the
    host at the optimizer's ``count`` (the guard's `step` when the state has
    no count) and at the `window` counts before it.

    Examples:
        >>> import jax.numpy as jnp, optax
        >>> from jaxnan._src.guard import evidence
        >>> opt = optax.inject_hyperparams(optax.adam)(learning_rate=0.5)
        >>> params = {"w": jnp.array([3.0, 4.0])}
        >>> state = (params, opt.init(params))
        >>> named = evidence.named_leaves(state, ["params", "opt_state"])
        >>> found = evidence.probe(named)
        >>> found.params[0].path, found.params[0].norm, found.nu[0].zeros
        ("params['w']", 5.0, 2)
        >>> found.learning_rate.value
        0.5
    """
    floats = _floats(named)
    stats: dict[str, list[LeafStats]] = {"param": [], "mu": [], "nu": []}
    if floats:
        # One small array; gathered when it spans several processes.
        rows = multihost.host_value(_leaf_figures([x for _, x in floats]))
        for (p, x), (n, mx, z, bad) in zip(floats, rows):
            kind = _kind(p)
            if kind:
                stats[kind].append(
                    LeafStats(
                        p,
                        str(x.dtype),
                        tuple(x.shape),
                        int(x.size),
                        float(n),
                        float(mx),
                        int(z),
                        int(bad),
                    )
                )
    return Probe(
        tuple(stats["param"]),
        tuple(stats["mu"]),
        tuple(stats["nu"]),
        _learning_rate(named, schedule, step, window),
        _count(named),
    )


def named_leaves(args: Sequence[Any], names: Sequence[str]) -> list[tuple[str, Any]]:
    """``(path, leaf)`` for the leaves of `args`, each path under its name."""
    out = []
    for a, name in zip(args, names):
        flat, _ = jax.tree_util.tree_flatten_with_path(a)
        out.extend((f"{name}{jax.tree_util.keystr(p)}", x) for p, x in flat)
    return out
