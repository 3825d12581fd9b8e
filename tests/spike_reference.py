"""Plain-Python references of the spike transforms, written from their docstrings.

One class per transform (`SkipSpikesRef`, `ZScoreClipRef`, `AdaGCRef`): a
loop over steps in float64 numpy that knows nothing of the implementation,
only what `jaxnan.skip_spikes`, `jaxnan.zscore_clip` and `jaxnan.adagc` say
they do. Inputs are the arrays the transform gets (already rounded to their
dtype), read as float64.

The implementations keep their statistics in float32, the references in
float64: a comparison whose two sides are within `TIE` (relative) of each
other can go either way, and raises `Tie` (the test then rejects the
example with `hypothesis.assume`) instead of taking a side.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

F32_MAX = float(np.finfo(np.float32).max)
TIE = 1e-4


class Tie(Exception):
    """A decision of the reference lies within rounding of its threshold."""


def greater(x: float, bound: float) -> bool:
    """``x > bound``, raising `Tie` when float32 rounding could flip it."""
    scale = abs(x) + abs(bound)
    if math.isfinite(scale) and scale > 0 and abs(x - bound) <= TIE * scale:
        raise Tie(f"{x} vs {bound}")
    return x > bound


def as64(x) -> np.ndarray:
    """A jax or numpy array (bfloat16 included) as a float64 numpy array."""
    return np.asarray(np.asarray(x).astype(np.float64))


def finite_norm(xs: list[np.ndarray]) -> float:
    """The L2 norm of the finite entries of `xs`, without overflow."""
    vals = np.concatenate([np.ravel(x) for x in xs]) if xs else np.zeros(0)
    vals = np.abs(vals[np.isfinite(vals)])
    if vals.size == 0 or vals.max() == 0:
        return 0.0
    s = float(vals.max())
    return s * math.sqrt(float(np.sum(np.square(vals / s))))


def all_finite(xs: list[np.ndarray]) -> bool:
    return all(bool(np.isfinite(x).all()) for x in xs)


def saturate(v: float) -> float:
    """A statistic as float32 keeps it: beyond float32's range, its max."""
    return min(v, F32_MAX)


# --------------------------------------------------------------------------
# skip_spikes


class SpikeDecision(NamedTuple):
    """What `SkipSpikesRef.decide` makes of one step (before `inner` runs)."""

    finite: bool
    loss_spike: bool
    norm_spike: bool
    norm: float
    loss: float


class SkipSpikesRef:
    """`jaxnan.skip_spikes`: mean + threshold * sample std of accepted steps.

    From the docstring: the step is skipped when its loss or gradient norm
    exceeds ``m + threshold * s`` (ddof=1) of the last `window` accepted
    steps, once `min_history` of them are in the window; when its loss or
    gradients hold a NaN or Inf, or their float32 sum of squares overflows;
    and when what `inner` makes of it is not finite. Skipped steps never
    enter the window.
    """

    def __init__(self, window: int, threshold: float, min_history: int):
        self.window, self.threshold, self.min_history = window, threshold, min_history
        self.losses: list[float] = []  # accepted steps, oldest first
        self.norms: list[float] = []
        self.totals = {"loss": 0, "norm": 0, "nonfinite": 0, "inner": 0, "skips": 0}
        self.last_reason = 0
        self.last_step = -1
        self.step = 0

    def bound(self, history: list[float]) -> float:
        """``m + threshold * s`` of `history` (sample std, ddof=1)."""
        h = np.asarray(history)
        return float(h.mean() + self.threshold * h.std(ddof=1))

    def edge_scales(self, leaves: list[np.ndarray], target: float) -> list | None:
        """Per-leaf factors putting the norm at `target` times the spike bound."""
        if len(self.norms) < self.min_history or finite_norm(leaves) == 0:
            return None
        scale = self.bound(self.norms) * target / finite_norm(leaves)
        return [scale] * len(leaves)

    def _spike(self, x: float, history: list[float]) -> bool:
        return greater(x, self.bound(history))

    def decide(self, grads: list[np.ndarray], loss: float | None) -> SpikeDecision:
        with np.errstate(over="ignore"):  # float64 squares of float64's max / 4
            ssq = sum(float(np.sum(np.square(g))) for g in grads)
        if math.isfinite(ssq) and abs(ssq - F32_MAX) <= TIE * F32_MAX:
            raise Tie("sum of squares at float32's max")
        loss32 = 0.0 if loss is None else float(np.float32(loss))
        finite = all_finite(grads) and ssq <= F32_MAX and math.isfinite(loss32)
        norm = math.sqrt(ssq) if finite else 0.0
        ready = len(self.norms) >= self.min_history
        norm_spike = finite and ready and self._spike(norm, self.norms)
        loss_spike = (
            finite and ready and loss is not None and self._spike(loss32, self.losses)
        )
        return SpikeDecision(finite, loss_spike, norm_spike, norm, loss32)

    def commit(self, d: SpikeDecision, inner_ok: bool) -> bool:
        """Records the step; `inner_ok`: what `inner` made of it is finite."""
        wanted = d.finite and not d.loss_spike and not d.norm_spike
        accept = wanted and inner_ok
        self.totals["loss"] += d.loss_spike
        self.totals["norm"] += d.norm_spike
        self.totals["nonfinite"] += not d.finite
        self.totals["inner"] += wanted and not inner_ok
        self.totals["skips"] += not accept
        if accept:
            self.losses = (self.losses + [d.loss])[-self.window :]
            self.norms = (self.norms + [d.norm])[-self.window :]
        else:
            if not d.finite:
                self.last_reason = 4  # NONFINITE alone
            elif d.loss_spike or d.norm_spike:
                self.last_reason = int(d.loss_spike) | 2 * int(d.norm_spike)
            else:
                self.last_reason = 8  # INNER_NONFINITE
            self.last_step = self.step
        self.step += 1
        return accept


# --------------------------------------------------------------------------
# zscore_clip


class ZScoreClipRef:
    """`jaxnan.zscore_clip`: ZClip's z-score rule on the global norm.

    From the docstring: warm-up records the norms of the first `warmup`
    finite steps (clipped only by `max_norm`), then mean and population
    variance; afterwards a norm with z > z_threshold is clipped to
    ``mu + z_thr^2 / z * sigma`` ("zscore") or ``mu`` ("mean"), the updates
    scaled by c / g when c < g (and capped by `max_norm`), and the EMAs follow
    c. The norm is that of the finite entries; a nonfinite step changes no
    statistic and does not count. Statistics are float32: a norm beyond its
    range counts as float32's max, and so does a statistic.
    """

    def __init__(self, *, z_threshold, alpha, warmup, mode, max_norm, eps):
        self.z_thr, self.alpha, self.warmup, self.mode = (
            z_threshold,
            alpha,
            warmup,
            mode,
        )
        self.cap = math.inf if max_norm is None else max_norm
        self.eps = eps
        self.mean = self.var = 0.0
        self.buf = [0.0] * warmup
        self.steps = 0
        self.norm = 0.0
        self.clipped = False
        self.clipped_total = 0

    def edge_scales(self, leaves: list[np.ndarray], target: float) -> list | None:
        """Per-leaf factors putting z at `target` times the threshold."""
        if self.steps < self.warmup or finite_norm(leaves) == 0:
            return None
        z_norm = self.mean + self.z_thr * target * (math.sqrt(self.var) + self.eps)
        return [z_norm / finite_norm(leaves)] * len(leaves)

    def step(self, leaves: list[np.ndarray]) -> tuple[list[np.ndarray], bool]:
        """The updates (float64) and whether they were scaled."""
        finite = all_finite(leaves)
        true_norm = finite_norm(leaves)
        g = saturate(true_norm)
        warm = self.steps >= self.warmup
        std = math.sqrt(self.var)
        z = (g - self.mean) / (std + self.eps)
        # z > z_thr, as a comparison of norms: a tie is one of g and the bound
        spike = warm and greater(g, self.mean + self.z_thr * (std + self.eps))
        c = g
        if spike:
            c = (
                self.mean + (self.z_thr**2 / z) * std
                if self.mode == "zscore"
                else self.mean
            )
        clip_to = min(c, self.cap)
        clip = greater(g, clip_to) if clip_to != g else False
        out = leaves
        if clip:
            factor = clip_to / true_norm
            with np.errstate(invalid="ignore"):  # Inf * 0, not selected
                out = [np.where(np.isfinite(x), x * factor, x) for x in leaves]
        if finite:
            if not warm:
                self.buf[self.steps] = g
                if self.steps == self.warmup - 1:
                    self.mean = saturate(float(np.mean(self.buf)))
                    self.var = saturate(float(np.var(self.buf)))
            else:
                a = self.alpha
                self.mean = saturate(a * self.mean + (1 - a) * c)
                self.var = saturate(a * self.var + (1 - a) * (c - self.mean) ** 2)
            self.steps += 1
        self.norm, self.clipped = g, spike
        self.clipped_total += spike
        return out, clip


# --------------------------------------------------------------------------
# adagc


class AdaGCRef:
    """`jaxnan.adagc`: per-tensor clipping against an EMA of its clipped norm.

    From the docstring: for the first `warmup` finite steps, global-norm
    clipping to `warmup_max_norm` and gamma_i <- min(gamma_i, |g_i hat|) over
    nonzero norms (the first nonzero norm sets it, in warm-up or after; no
    relative clipping while gamma_i is 0); then
    g_i hat = min(1, lambda_rel gamma_i / |g_i|) g_i and
    gamma_i <- beta gamma_i + (1 - beta) |g_i hat|. A tensor with a nonfinite
    entry passes unchanged and is left out of the global norm; such a step
    changes no gamma and does not count. Gamma is float32.
    """

    def __init__(self, *, relative_threshold, beta, warmup, warmup_max_norm, n):
        self.rel, self.beta = relative_threshold, beta
        self.warmup, self.max_norm = warmup, warmup_max_norm
        self.gamma = [0.0] * n
        self.steps = 0
        self.clipped = [False] * n

    def edge_scales(self, leaves: list[np.ndarray], target: float) -> list | None:
        """Per-leaf factors putting each norm at `target` times its limit (the
        global norm at `target` times `warmup_max_norm` in warm-up)."""
        norms = [finite_norm([x]) for x in leaves]
        if self.steps < self.warmup:
            total = finite_norm([np.asarray(norms)])
            return None if total == 0 else [self.max_norm * target / total] * len(norms)
        return [
            self.rel * g * target / n if n > 0 else 1.0
            for n, g in zip(norms, self.gamma)
        ]

    def step(self, leaves: list[np.ndarray]) -> tuple[list[np.ndarray], list[bool]]:
        """The updates (float64) and which tensors were scaled."""
        oks = [all_finite([x]) for x in leaves]
        norms = [finite_norm([x]) for x in leaves]
        in_warmup = self.steps < self.warmup
        out, new_gamma, scaled, rel_clipped = [], [], [], []
        if in_warmup:
            total = finite_norm([np.asarray(n) for n, ok in zip(norms, oks) if ok])
            g_clip = greater(total, self.max_norm)
        for x, n, ok, gam in zip(leaves, norms, oks, self.gamma):
            if in_warmup:
                clip, factor = g_clip and ok, self.max_norm / total if g_clip else 1.0
                rel_clipped.append(False)
            else:
                limit = self.rel * gam
                clip = ok and gam > 0 and greater(n, limit)
                factor = limit / n if clip else 1.0
                rel_clipped.append(clip)
            out.append(x * factor if clip else x)
            scaled.append(clip)
            cn = n * factor if clip else n
            if gam == 0:  # the first nonzero norm sets gamma
                g_new = cn
            elif in_warmup:
                g_new = min(gam, cn) if cn > 0 else gam
            else:
                g_new = self.beta * gam + (1 - self.beta) * cn
            new_gamma.append(saturate(g_new))
        if all(oks):
            self.gamma = new_gamma
            self.steps += 1
        self.clipped = rel_clipped
        return out, scaled
