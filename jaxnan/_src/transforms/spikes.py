"""Loss-spike handling for optax: z-score clipping and skip on spike.

Every decision is taken in the compiled graph with `where`-selects, with no
host sync. Running statistics are updated only from finite steps: a NaN or
Inf never enters a mean, a variance or a window, so one bad step cannot
poison the detector (MaxText's skip-on-spike lets a NaN loss into its window
and then skips every step until it leaves).

Given `axis_name` (inside `shard_map` or `pmap`), the replicas agree with one
`lax.pmax` over a small float32 vector holding the "nonfinite" flag and the
scalars the rule reads (NaN is replaced by 0 first: the CPU backend's pmax
drops NaN). Every replica then takes the same decision and keeps bit-identical
statistics; a spike seen by one replica is seen by all.
"""

from __future__ import annotations

import enum
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.extend import source_info_util

from jaxnan._src.core import dtypes, scaling, shard_norms, tree, validation
from jaxnan._src.transforms import nonfinite

source_info_util.register_exclusion(__file__)


def _int32(value: int = 0) -> jax.Array:
    return jnp.full((), value, jnp.int32)


def _agree_max(
    finite: jax.Array, values: list[jax.Array], axis_name: str | None
) -> tuple[jax.Array, list[jax.Array]]:
    """All-finite flag and the max of `values` over `axis_name`, one pmax.

    Nonfinite values are replaced by 0 before the collective (the CPU pmax
    ignores NaN); the flag travels in the same vector as 1.0 for "bad".
    """
    if axis_name is None:
        return finite, values
    vec = jnp.stack(
        [jnp.where(finite, 0.0, 1.0).astype(jnp.float32)]
        + [jnp.where(jnp.isfinite(v), v, 0.0).astype(jnp.float32) for v in values]
    )
    vec = lax.pmax(vec, axis_name)
    return vec[0] == 0, [vec[i + 1] for i in range(len(values))]


# --------------------------------------------------------------------------
# zscore_clip (ZClip)


class ZScoreClipState(NamedTuple):
    """State of `zscore_clip`.

    Attributes:
        zclip_mean: float32 scalar, EMA of the (clipped) gradient norm; the
            warm-up mean once warm-up is over, 0 before.
        zclip_var: float32 scalar, EMA of the variance of the gradient norm.
        zclip_warmup_norms: float32[warmup], the norms of the finite warm-up
            steps (used once, to initialise the mean and variance).
        zclip_finite_steps: int32 scalar, finite steps seen (the statistics
            leave warm-up when it reaches `warmup`).
        zclip_norm: float32 scalar, the last pre-clip norm of the finite
            entries (the largest over replicas given `axis_name`).
        zclip_clipped: bool scalar, whether the last step was clipped by the
            z-score rule (warm-up clipping by `max_norm` not counted).
        zclip_clipped_total: int32 scalar, steps clipped by the z-score rule.
    """

    zclip_mean: jax.Array
    zclip_var: jax.Array
    zclip_warmup_norms: jax.Array
    zclip_finite_steps: jax.Array
    zclip_norm: jax.Array
    zclip_clipped: jax.Array
    zclip_clipped_total: jax.Array


def zscore_clip(
    *,
    z_threshold: float = 2.5,
    alpha: float = 0.97,
    warmup: int = 25,
    mode: str = "zscore",
    max_norm: float | None = None,
    eps: float = 1e-6,
    axis_name: str | None = None,
    shard_specs: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""ZClip: clips the global norm when it is an outlier of its own history.

    For the first `warmup` finite steps the norms are recorded (and clipped
    only by `max_norm`, if given); then :math:`\mu` and :math:`\sigma^2` are
    their mean and population variance. On each later step, with :math:`g`
    the global norm,

    .. math::
        z = \frac{g - \mu}{\sigma + \epsilon}, \qquad
        c = \begin{cases}
            \mu + \frac{z_{thr}^2}{z}\,\sigma & \text{mode "zscore"} \\
            \mu & \text{mode "mean"}
        \end{cases} \text{ if } z > z_{thr}, \text{ else } c = g,

    the updates are scaled by :math:`c / g` when :math:`c < g` (and also
    capped by `max_norm` when given), and the statistics follow the clipped
    norm: :math:`\mu \leftarrow \alpha\mu + (1-\alpha)c`,
    :math:`\sigma^2 \leftarrow \alpha\sigma^2 + (1-\alpha)(c - \mu)^2` (with
    the new :math:`\mu`), as in the reference implementation. The statistics
    are float32 and saturate at its max (a norm beyond it counts as that
    max, and so does a mean or variance that would exceed it): no finite
    step can make them Inf.

    A warm-up of identical norms has :math:`\sigma = 0`: every later larger
    norm is then a spike clipped to :math:`\mu` (to 0 after a warm-up of
    zero gradients, for good, since the statistics then follow 0): start it
    once the gradients are live.

    Nonfinite values (NaN, +Inf, -Inf): the norm is taken over the finite
    entries, finite entries are clipped by it and nonfinite ones pass through
    unchanged (bit for bit), for a later `jaxnan.skip_nonfinite` to catch. Such a step
    changes no statistic and does not count as a warm-up step.
    Float16 and bfloat16 norms are taken in float32 and float64 ones in
    float64; the statistics are float32. A norm beyond float32's range
    (finite entries near its max) enters the statistics as float32's max,
    and the updates are still scaled by the norm itself (split by an exact
    power of two), so that `max_norm` holds; with `axis_name` or
    `shard_specs` they are scaled by float32's max. Differentiable
    (`jax.grad`, `jax.jvp`, `jax.vmap`).

    Cost: one fused reduction per leaf (the sum of squares); an overflow-safe
    second pass only on a nonfinite step (a scalar `lax.cond`); the scaling is
    a select that fuses into the optimizer's loops. Collectives: none without
    `axis_name`; with it, one `lax.pmax` of two float32 scalars so that all
    replicas use the largest norm and keep identical statistics (with
    gradients already averaged over replicas this is the single-device
    result). With `shard_specs`, one `lax.all_gather` of four numbers per
    leaf per distinct set of mesh axes (see below).

    Sharded parameters (FSDP): under sharded `jit` (`NamedSharding`) the
    norm is already that of the whole gradient, with nothing to pass. Inside
    `shard_map`, where each device holds a block of each sharded leaf, pass
    `shard_specs`, the `PartitionSpec` tree the params are mapped with: the
    norm is then the whole gradient's, bit-identical on every device, and
    the decision and the update are those of the same step on replicated
    params (to the rounding of summing the blocks' squares in another
    order, a few ulps of the norm).

    Args:
        z_threshold: the z-score above which a norm is a spike; positive.
        alpha: EMA decay of the mean and variance, in (0, 1).
        warmup: number of finite steps used to initialise the statistics;
            at least 2.
        mode: "zscore" (reciprocal clipping to
            :math:`\mu + z_{thr}^2\sigma / z`, the paper's default) or
            "mean" (clip a spike to :math:`\mu`).
        max_norm: optional fixed cap on the norm, applied on every step
            (during warm-up it is the only clipping).
        eps: added to :math:`\sigma` in the z-score.
        axis_name: the mapped axis to agree over inside `shard_map`/`pmap`.
        shard_specs: inside `shard_map`, the `PartitionSpec` of each update
            leaf (a tree prefix of the updates, such as the params'
            `in_specs`); None: every device holds whole tensors.

    Returns:
        An `optax.GradientTransformationExtraArgs` whose state is a
        `ZScoreClipState`.

    Raises:
        ValueError: for a hyperparameter out of range or an unknown `mode`.
        TypeError: when a hyperparameter is not a Python number, or
            `axis_name` is not a str (or a tuple of them).

    Examples:
        >>> import jax.numpy as jnp, jaxnan
        >>> tx = jaxnan.zscore_clip(warmup=3)
        >>> state = tx.init({"w": jnp.zeros(1)})
        >>> for g in [1.0, 2.0, 3.0, 1e3]:
        ...     u, state = tx.update({"w": jnp.array([g])}, state)
        >>> u["w"], bool(state.zclip_clipped)
        (Array([2.004175], dtype=float32), True)

    References:
        Kumar et al., `ZClip: Adaptive Spike Mitigation for LLM Pre-Training
        <https://arxiv.org/abs/2504.02507>`_, 2025

    .. versionadded:: 0.1.0
    """
    fn = "zscore_clip"
    name = "jaxnan.zscore_clip"
    validation.check_axis_name(fn, axis_name)
    validation.check_number(fn, "z_threshold", z_threshold, low=0)
    validation.check_number(fn, "alpha", alpha, low=0, high=1)
    warmup = validation.check_int(fn, "warmup", warmup, low=2)
    if mode not in ("zscore", "mean"):
        raise ValueError(
            f"jaxnan.zscore_clip: mode must be 'zscore' or 'mean', got {mode!r}."
        )
    if max_norm is not None:
        validation.check_number(fn, "max_norm", max_norm, low=0)
    validation.check_number(fn, "eps", eps, low=0, low_open=False)
    cap = jnp.inf if max_norm is None else float(max_norm)

    def init(params: optax.Params) -> ZScoreClipState:
        validation.validate_updates(params, argname="params", fn_name=name)

        def zero():  # a fresh buffer per field, so that the state can be donated
            return jnp.zeros((), jnp.float32)

        return ZScoreClipState(
            zclip_mean=zero(),
            zclip_var=zero(),
            zclip_warmup_norms=jnp.zeros((warmup,), jnp.float32),
            zclip_finite_steps=_int32(),
            zclip_norm=zero(),
            zclip_clipped=jnp.array(False),
            zclip_clipped_total=_int32(),
        )

    def update(updates, state, params=None, **extra_args):
        validation.validate_update_call(
            updates, state, ZScoreClipState, params=params, fn_name=name
        )
        del params, extra_args
        updates = nonfinite.as_arrays(updates)
        leaves = tree.checked_leaves(updates)
        if shard_specs is None:
            norm_wide, finite = tree.norm_and_finite(leaves)
        else:
            axes = shard_norms.checked_leaf_axes(shard_specs, updates, fn_name=name)
            _, norm_wide, finite = shard_norms.global_norm(leaves, axes)
        norm = norm_wide
        # The statistics are float32: a float64 norm beyond its range counts
        # as a spike of float32 max (it is clipped, never lets Inf in).
        f32_max = jnp.finfo(jnp.float32).max
        norm = jnp.minimum(norm, f32_max).astype(jnp.float32)
        finite, (norm,) = _agree_max(finite, [norm], axis_name)

        mean, var = state.zclip_mean, state.zclip_var
        steps = state.zclip_finite_steps
        warm = steps >= warmup
        std = jnp.sqrt(var)
        z = (norm - mean) / (std + eps)
        spike = warm & (z > z_threshold)
        if mode == "zscore":
            target = mean + (z_threshold * z_threshold / z) * std
        else:
            target = mean
        adaptive = jnp.where(spike, target, norm)
        clip_to = jnp.minimum(adaptive, cap)
        clip = clip_to < norm
        num, den = clip_to, jnp.where(clip, norm, 1.0)
        if norm_wide.dtype != jnp.float32:  # float64 updates: scale in float64
            agreed = norm.astype(norm_wide.dtype)
            wide = jnp.where(norm_wide > f32_max, norm_wide, agreed)
            num, den = clip_to.astype(wide.dtype), jnp.where(clip, wide, 1.0)
        # A norm beyond float32's range (entries near its max) saturates in
        # the statistics; the scaling divides by the norm itself, split by
        # an exact power of two (on one device: a replica's own updates are
        # not the whole tensors otherwise).
        huge = jnp.isposinf(norm_wide) & finite
        if shard_specs is not None or axis_name is not None:
            huge = jnp.array(False)
        shift, rest = scaling.split_norm(leaves, norm_wide, huge)

        def scale(t):
            out = scaling.scale_where(t, clip, num, den)
            if not dtypes.is_checked_leaf(t):
                return out
            ok = huge & clip & jnp.isfinite(t)
            safe = jnp.where(ok, t, jnp.zeros_like(t))  # no 0 * NaN derivative
            rescued = scaling.rescale(safe, shift) * (num / rest).astype(t.dtype)
            return jnp.where(ok, rescued, out)

        out = jax.tree_util.tree_map(scale, updates)

        # Statistics: warm-up buffer, initialisation, then EMA of the clipped
        # norm. A nonfinite step changes nothing.
        slot = jnp.minimum(steps, warmup - 1)
        buf = state.zclip_warmup_norms
        buf = jnp.where(finite & ~warm, buf.at[slot].set(norm), buf)
        init_now = finite & (steps == warmup - 1)
        # Statistics saturate at float32's max, as the norm does: a norm near
        # it would otherwise overflow a sum or a square into Inf, which no
        # later step could leave (z = 0 for ever).
        # Where a square overflows but the statistic does not, it is taken
        # in an order that overflows only when the result does.
        w_mean = jnp.mean(buf)
        w_mean = jnp.where(jnp.isfinite(w_mean), w_mean, jnp.sum(buf / warmup))
        dev = buf - w_mean
        w_var = jnp.mean(jnp.square(dev))
        big = jnp.maximum(jnp.max(jnp.abs(dev)), jnp.finfo(jnp.float32).tiny)
        w_var_safe = (jnp.mean(jnp.square(dev / big)) * big) * big
        w_var = jnp.minimum(jnp.where(jnp.isfinite(w_var), w_var, w_var_safe), f32_max)
        e_mean = jnp.minimum(alpha * mean + (1 - alpha) * adaptive, f32_max)
        e_dev = jnp.abs(adaptive - e_mean)
        e_sq = (1 - alpha) * jnp.square(e_dev)
        e_sq = jnp.where(jnp.isfinite(e_sq), e_sq, ((1 - alpha) * e_dev) * e_dev)
        e_var = jnp.minimum(alpha * var + e_sq, f32_max)
        new_mean = jnp.where(init_now, w_mean, jnp.where(finite & warm, e_mean, mean))
        new_var = jnp.where(init_now, w_var, jnp.where(finite & warm, e_var, var))
        new_steps = jnp.where(finite, optax.safe_increment(steps), steps)
        new_state = ZScoreClipState(
            zclip_mean=new_mean.astype(jnp.float32),
            zclip_var=new_var.astype(jnp.float32),
            zclip_warmup_norms=buf,
            zclip_finite_steps=new_steps,
            zclip_norm=norm,
            zclip_clipped=spike,
            zclip_clipped_total=jnp.where(
                spike,
                optax.safe_increment(state.zclip_clipped_total),
                state.zclip_clipped_total,
            ),
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init, update)


# --------------------------------------------------------------------------
# skip_spikes


class SkipReason(enum.IntFlag):
    """Why `skip_spikes` skipped a step: bits of `SkipSpikesState.last_skip_reason`.

    A step whose loss and norm both spike records ``LOSS_SPIKE | NORM_SPIKE``
    (3). A nonfinite step records ``NONFINITE`` alone: its spike tests are
    meaningless. ``INNER_NONFINITE`` marks a step whose loss and gradients
    were fine but whose new params or inner state would not have been finite
    (the optimizer's own arithmetic). ``NONE`` (0) means no step has been
    skipped yet.

    Examples:
        >>> import jaxnan
        >>> int(jaxnan.SkipReason.LOSS_SPIKE | jaxnan.SkipReason.NORM_SPIKE)
        3

    .. versionadded:: 0.1.0
    """

    NONE = 0
    LOSS_SPIKE = 1
    NORM_SPIKE = 2
    NONFINITE = 4
    INNER_NONFINITE = 8


class SkipSpikesState(NamedTuple):
    """State of `skip_spikes`.

    Attributes:
        spike_loss_window: float32[window], ring buffer of the losses of the
            last accepted steps (zeros when no `loss=` is given).
        spike_norm_window: float32[window], ring buffer of their gradient
            norms.
        spike_window_fill: int32 scalar, valid entries in the windows
            (at most `window`).
        spike_window_next: int32 scalar, the slot the next accepted step
            writes.
        loss_spike_total: int32 scalar, steps skipped for a loss spike.
        norm_spike_total: int32 scalar, steps skipped for a norm spike.
        spike_nonfinite_total: int32 scalar, steps skipped for a nonfinite
            loss, update or norm.
        spike_inner_nonfinite_total: int32 scalar, steps skipped because
            what `inner` made of finite input was not finite.
        spike_skips_total: int32 scalar, steps skipped for any reason (a step
            whose loss and norm both spike counts once here, and once in each
            of the two totals above).
        last_skip_reason: int32 scalar, the `SkipReason` bits of the last
            skipped step (0 when none was skipped).
        last_skip_step: int32 scalar, index (from 0) of the last skipped
            update call, -1 when none.
        spike_step: int32 scalar, number of update calls so far.
        spike_inner_state: the state of the wrapped transformation.
    """

    spike_loss_window: jax.Array
    spike_norm_window: jax.Array
    spike_window_fill: jax.Array
    spike_window_next: jax.Array
    loss_spike_total: jax.Array
    norm_spike_total: jax.Array
    spike_nonfinite_total: jax.Array
    spike_inner_nonfinite_total: jax.Array
    spike_skips_total: jax.Array
    last_skip_reason: jax.Array
    last_skip_step: jax.Array
    spike_step: jax.Array
    spike_inner_state: optax.OptState


def _window_stats(
    buf: jax.Array, fill: jax.Array, window: int
) -> tuple[jax.Array, jax.Array]:
    """Mean and sample standard deviation (ddof=1) of the first `fill` slots."""
    valid = jnp.arange(window) < fill
    n = jnp.maximum(fill, 1).astype(jnp.float32)
    mean = jnp.sum(jnp.where(valid, buf, 0.0)) / n
    dev = jnp.where(valid, buf - mean, 0.0)
    var = jnp.sum(dev * dev) / jnp.maximum(n - 1, 1.0)
    return mean, jnp.sqrt(var)


def skip_spikes(
    inner: optax.GradientTransformation,
    *,
    window: int = 128,
    threshold: float = 6.0,
    min_history: int | None = None,
    axis_name: str | None = None,
    shard_specs: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Skips a step whose loss or gradient norm spikes; NaN never enters the window.

    The rule OLMo-core uses: with :math:`m, s` the mean and sample standard
    deviation (ddof=1) of the last `window` accepted steps, a step is skipped
    when its loss (the extra argument ``loss=``) exceeds
    :math:`m + \text{threshold}\cdot s`, or its gradient norm does, once
    `min_history` accepted steps are in the window. A step whose loss or
    updates hold a NaN, +Inf or -Inf is skipped too, and so is one whose
    float32 sum of squares overflows, unless `inner` begins with
    `jaxnan.clip_by_global_norm` (whose overflow-safe norm is then used).
    Skipped steps never enter the window, so a spike or a NaN costs exactly
    one step, never a run of them. One degenerate case: a window whose values
    are all equal (zero gradients, a loss that does not move) has
    :math:`s = 0`, so every later larger value is a spike, and since those
    never enter the window they are skipped until a value at most :math:`m`
    comes; `spike_skips_total` and `last_skip_step` show such a run.

    The promise of `jaxnan.skip_nonfinite` holds here too: no nonfinite value
    ever reaches the params or the optimizer state through this guard. What
    `inner` makes of an accepted step (its new state, and the params
    ``optax.apply_updates`` would give) is checked, and a step where it is
    not finite is skipped as well (reason ``INNER_NONFINITE``).

    A skipped step returns updates that are exactly ``-0.0`` (a
    `where`-select, no 0 * NaN; ``p + -0.0`` is `p` bit for bit) and leaves
    the inner state bit for bit unchanged; the state counts the skips by
    reason and records the `SkipReason` bits of the last one. Without
    ``loss=`` only the norm is tested. The loss must be a scalar.

    Cost: one fused reduction per gradient leaf (the sum of squares), none
    when `inner` begins with `jaxnan.clip_by_global_norm`, whose norm and
    finite flag are reused; the outgoing check (one fused reduction over the
    new params and state); a few scalar operations on the windows.
    Collectives: none without `axis_name`; with it, one `lax.pmax` of three
    float32 scalars (the flag, the loss and the norm): a replica that sees a
    spike or a NaN makes all replicas skip, and every window holds the
    largest value over replicas, so the states stay identical; and one int32
    `lax.psum` of the outgoing check. With `shard_specs`, one
    `lax.all_gather` of four numbers per leaf per distinct set of mesh axes,
    and the outgoing check's `lax.psum` runs over those axes too.

    Sharded parameters (FSDP): under sharded `jit` the norm is already that
    of the whole gradient. Inside `shard_map`, pass `shard_specs` (the
    params' `PartitionSpec` tree): the norm is the whole gradient's and
    every device takes the decision of the same step on replicated params.
    A clip inside `inner` must see the whole norm too: lead `inner` with
    `jaxnan.clip_by_global_norm`, which is handed this norm (an
    `optax.clip_by_global_norm` there would clip each block by its own).

    Args:
        inner: the transformation to protect, e.g. ``optax.adamw(1e-3)``.
        window: number of accepted steps kept; at least 2.
        threshold: how many standard deviations above the mean a spike is.
        min_history: accepted steps needed before spikes are tested; between
            2 and `window`. None: ``max(2, window // 2)`` (OLMo-core's choice).
        axis_name: the mapped axis to agree over inside `shard_map`/`pmap`.
        shard_specs: inside `shard_map`, the `PartitionSpec` of each update
            leaf (a tree prefix of the updates, such as the params'
            `in_specs`); None: every device holds whole tensors.

    Returns:
        An `optax.GradientTransformationExtraArgs` whose state is a
        `SkipSpikesState`.

    Raises:
        TypeError: when `inner` is not an optax transformation, a
            hyperparameter is not a number, or `axis_name` is not a str (or
            a tuple of them).
        ValueError: for a hyperparameter out of range, or a loss that is not
            a scalar.

    Examples:
        >>> import jax.numpy as jnp, optax, jaxnan
        >>> tx = jaxnan.skip_spikes(optax.sgd(0.1), window=8, min_history=3)
        >>> params = {"w": jnp.zeros(1)}
        >>> state = tx.init(params)
        >>> for loss in [1.0, 1.1, 0.9, 50.0]:
        ...     g = {"w": jnp.array([1.0])}
        ...     u, state = tx.update(g, state, params, loss=jnp.float32(loss))
        >>> u["w"], int(state.loss_spike_total), int(state.last_skip_reason)
        (Array([-0.], dtype=float32), 1, 1)

    References:
        OLMo Team, `2 OLMo 2 Furious <https://arxiv.org/abs/2501.00656>`_, 2024

    .. versionadded:: 0.1.0
    """
    fn = "skip_spikes"
    name = "jaxnan.skip_spikes"
    validation.validate_inner(inner, fn_name=fn)
    validation.check_axis_name(fn, axis_name)
    window = validation.check_int(fn, "window", window, low=2)
    validation.check_number(fn, "threshold", threshold, low=0)
    if min_history is None:
        min_history = max(2, window // 2)
    min_history = validation.check_int(fn, "min_history", min_history, low=2)
    if min_history > window:
        raise ValueError(
            f"jaxnan.skip_spikes: min_history must be <= window ({window}), got "
            f"{min_history}."
        )
    inner = optax.with_extra_args_support(inner)

    def init(params: optax.Params) -> SkipSpikesState:
        validation.validate_updates(params, argname="params", fn_name=name)
        return SkipSpikesState(  # distinct buffers, so that it can be donated
            spike_loss_window=jnp.zeros((window,), jnp.float32),
            spike_norm_window=jnp.zeros((window,), jnp.float32),
            spike_window_fill=_int32(),
            spike_window_next=_int32(),
            loss_spike_total=_int32(),
            norm_spike_total=_int32(),
            spike_nonfinite_total=_int32(),
            spike_inner_nonfinite_total=_int32(),
            spike_skips_total=_int32(),
            last_skip_reason=_int32(),
            last_skip_step=_int32(-1),
            spike_step=_int32(),
            spike_inner_state=inner.init(params),
        )

    def update(updates, state, params=None, **extra_args):
        validation.validate_update_call(
            updates,
            state,
            SkipSpikesState,
            params=params,
            extra_args=extra_args,
            inner_accepts=lambda: validation.inner_accepts(
                inner.update, updates, state.spike_inner_state, params, extra_args
            ),
            fn_name=name,
        )
        updates = nonfinite.as_arrays(updates)
        loss = extra_args.get("loss")
        if loss is not None:
            loss = jnp.asarray(loss)
            if loss.size != 1:
                raise ValueError(
                    f"jaxnan.skip_spikes: loss must be a scalar, got shape "
                    f"{loss.shape}. Pass the mean loss of the step."
                )
            loss = loss.reshape(()).astype(jnp.float32)
        # One pass: the norm, exact finiteness, and the norm handed on to a
        # leading jaxnan.clip_by_global_norm.
        axes = None
        if shard_specs is not None:
            axes = shard_norms.checked_leaf_axes(shard_specs, updates, fn_name=name)
        norm, finite, extra_args = nonfinite.norm_for_inner(
            updates, extra_args, state.spike_inner_state, axes
        )
        # Without a leading clip the norm is the one-pass one, +Inf when
        # finite squares overflow: such a step is skipped too, so that no
        # Inf ever enters the window (it would poison its statistics).
        finite = finite & jnp.isfinite(norm)
        loss_val = jnp.zeros((), jnp.float32) if loss is None else loss
        if loss is not None:
            finite = finite & jnp.isfinite(loss_val)
        finite, (loss_val, norm) = _agree_max(finite, [loss_val, norm], axis_name)

        fill = state.spike_window_fill
        ready = fill >= min_history
        n_mean, n_std = _window_stats(state.spike_norm_window, fill, window)
        norm_spike = finite & ready & (norm > n_mean + threshold * n_std)
        if loss is not None:
            l_mean, l_std = _window_stats(state.spike_loss_window, fill, window)
            loss_spike = finite & ready & (loss_val > l_mean + threshold * l_std)
        else:
            loss_spike = jnp.array(False)
        wanted = finite & ~norm_spike & ~loss_spike

        out, kept_inner, _, inner_ok, _ = nonfinite.guarded_update(
            inner,
            wanted,
            updates,
            state.spike_inner_state,
            params,
            extra_args,
            axis_name if axes is None else shard_norms.agreement_axes(axis_name, axes),
        )
        accept = wanted & inner_ok
        slot = state.spike_window_next
        reason = jnp.where(
            finite,
            jnp.where(loss_spike, int(SkipReason.LOSS_SPIKE), 0)
            | jnp.where(norm_spike, int(SkipReason.NORM_SPIKE), 0)
            | jnp.where(wanted & ~inner_ok, int(SkipReason.INNER_NONFINITE), 0),
            int(SkipReason.NONFINITE),
        ).astype(jnp.int32)

        def bump(counter, flag):
            return jnp.where(flag, optax.safe_increment(counter), counter)

        new_state = SkipSpikesState(
            spike_loss_window=jnp.where(
                accept,
                state.spike_loss_window.at[slot].set(loss_val),
                state.spike_loss_window,
            ),
            spike_norm_window=jnp.where(
                accept,
                state.spike_norm_window.at[slot].set(norm),
                state.spike_norm_window,
            ),
            spike_window_fill=jnp.where(
                accept, jnp.minimum(fill + 1, window), fill
            ).astype(jnp.int32),
            spike_window_next=jnp.where(accept, (slot + 1) % window, slot).astype(
                jnp.int32
            ),
            loss_spike_total=bump(state.loss_spike_total, loss_spike),
            norm_spike_total=bump(state.norm_spike_total, norm_spike),
            spike_nonfinite_total=bump(state.spike_nonfinite_total, ~finite),
            spike_inner_nonfinite_total=bump(
                state.spike_inner_nonfinite_total, wanted & ~inner_ok
            ),
            spike_skips_total=bump(state.spike_skips_total, ~accept),
            last_skip_reason=jnp.where(accept, state.last_skip_reason, reason),
            last_skip_step=jnp.where(accept, state.last_skip_step, state.spike_step),
            spike_step=optax.safe_increment(state.spike_step),
            spike_inner_state=kept_inner,
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init, update)
