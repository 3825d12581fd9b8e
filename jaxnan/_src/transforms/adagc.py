"""AdaGC for optax: per-tensor clipping against an EMA of each tensor's norm.

Every decision is taken in the compiled graph with `where`-selects, with no
host sync; a step with a nonfinite tensor changes no statistic.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.extend import source_info_util

from jaxnan._src.core import dtypes, scaling, shard_norms, tree, validation
from jaxnan._src.transforms import nonfinite

source_info_util.register_exclusion(__file__)


# --------------------------------------------------------------------------
# adagc


class AdaGCState(NamedTuple):
    """State of `adagc`.

    Attributes:
        adagc_gamma: per-leaf float32 scalars (the structure of the params),
            the EMA of each tensor's clipped gradient norm.
        adagc_finite_steps: int32 scalar, finite steps seen (global clipping
            while it is below `warmup`).
        adagc_clipped: per-leaf bool scalars, whether the last step clipped
            that tensor by the relative rule.
    """

    adagc_gamma: optax.Updates
    adagc_finite_steps: jax.Array
    adagc_clipped: optax.Updates


def adagc(
    *,
    relative_threshold: float = 1.05,
    beta: float = 0.98,
    warmup: int = 100,
    warmup_max_norm: float = 1.0,
    axis_name: str | None = None,
    shard_specs: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""AdaGC: clips each tensor against an EMA of its own clipped norm.

    Warm-up (the first `warmup` finite steps): global-norm clipping to
    `warmup_max_norm`, :math:`\hat g = \min(1, \lambda_{abs}/\|g\|)\, g`, and
    each tensor's :math:`\gamma_i` tracks the smallest nonzero clipped norm
    seen: :math:`\gamma_i \leftarrow \min(\gamma_i, \|\hat g_i\|)` (the
    first nonzero norm sets it). Afterwards, per tensor,

    .. math::
        \hat g_i = \min\Big(1, \frac{\lambda_{rel}\,\gamma_i}{\|g_i\|}\Big) g_i,
        \qquad \gamma_i \leftarrow \beta\gamma_i + (1-\beta)\|\hat g_i\|.

    One departure from the paper: a zero norm (no gradient for that tensor)
    is no scale to be relative to. In the paper's rule one zero-gradient
    step in warm-up sets :math:`\gamma_i = 0` for good, and every later
    update of the tensor is clipped to 0 (the A factor of a LoRA pair whose
    B starts at 0 has a zero gradient on the first step). Here zero norms do
    not lower :math:`\gamma_i`, and while it is 0 the tensor is not clipped
    by the relative rule; its first nonzero norm, in warm-up or after, sets
    it.

    Chain it before the optimizer: ``optax.chain(jaxnan.adagc(),
    optax.adamw(...))`` is the paper's AdaGC-AdamW.

    Nonfinite values (NaN, +Inf, -Inf): a tensor with a nonfinite entry passes
    through unchanged (for a later `jaxnan.skip_nonfinite` to catch) and is
    left out of the warm-up global norm; such a step changes no
    :math:`\gamma_i` and does not count as a step.
    Norms are overflow-safe: a finite spike whose squares overflow float32
    (``[1e20, 0, 0, 0]``) has norm 1e20 and is clipped, during warm-up and
    after.

    Cost: one fused reduction per leaf (its sum of squares) and a select that
    fuses into the optimizer's loops. Collectives: none without `axis_name`;
    with it, one `lax.pmax` of a float32 vector (two entries per leaf: its
    norm and its nonfinite flag): every replica uses the largest norm of each tensor,
    passes through the tensors that are nonfinite on any replica, and keeps
    identical :math:`\gamma`. With `shard_specs`, one `lax.all_gather` of
    four numbers per leaf per distinct set of mesh axes.

    Sharded parameters (FSDP): under sharded `jit` each tensor's norm is
    already that of the whole tensor. Inside `shard_map`, pass `shard_specs`
    (the params' `PartitionSpec` tree): each norm is then the whole
    tensor's, bit-identical on every device, and the clipping and
    :math:`\gamma` are those of the same step on replicated params (to the
    rounding of summing the blocks' squares in another order).

    Args:
        relative_threshold: :math:`\lambda_{rel}`, the allowed ratio of a
            tensor's norm to its EMA; positive.
        beta: EMA decay of :math:`\gamma`, in (0, 1).
        warmup: number of finite steps with global clipping; at least 1.
        warmup_max_norm: :math:`\lambda_{abs}`, the global clipping threshold
            during warm-up; positive.
        axis_name: the mapped axis to agree over inside `shard_map`/`pmap`.
        shard_specs: inside `shard_map`, the `PartitionSpec` of each update
            leaf (a tree prefix of the updates, such as the params'
            `in_specs`); None: every device holds whole tensors.

    Returns:
        An `optax.GradientTransformationExtraArgs` whose state is an
        `AdaGCState`.

    Raises:
        ValueError: for a hyperparameter out of range.
        TypeError: when a hyperparameter is not a Python number, or
            `axis_name` is not a str (or a tuple of them).

    Examples:
        >>> import jax.numpy as jnp, jaxnan
        >>> tx = jaxnan.adagc(warmup=1, relative_threshold=1.0, beta=0.5)
        >>> state = tx.init({"a": jnp.zeros(1), "b": jnp.zeros(1)})
        >>> _, state = tx.update({"a": jnp.array([0.5]), "b": jnp.array([0.5])}, state)
        >>> u, state = tx.update({"a": jnp.array([4.0]), "b": jnp.array([0.1])}, state)
        >>> u["a"], u["b"]
        (Array([0.5], dtype=float32), Array([0.1], dtype=float32))

    References:
        Wang et al., `AdaGC: Improving Training Stability for Large Language
        Model Pretraining <https://arxiv.org/abs/2502.11034>`_, 2025

    .. versionadded:: 0.1.0
    """
    fn = "adagc"
    name = "jaxnan.adagc"
    validation.check_axis_name(fn, axis_name)
    validation.check_number(fn, "relative_threshold", relative_threshold, low=0)
    validation.check_number(fn, "beta", beta, low=0, high=1)
    warmup = validation.check_int(fn, "warmup", warmup, low=1)
    validation.check_number(fn, "warmup_max_norm", warmup_max_norm, low=0)

    def init(params: optax.Params) -> AdaGCState:
        validation.validate_updates(params, argname="params", fn_name=name)
        return AdaGCState(  # tree_map makes a fresh buffer per leaf
            adagc_gamma=jax.tree_util.tree_map(
                lambda _: jnp.zeros((), jnp.float32), params
            ),
            adagc_finite_steps=jnp.zeros((), jnp.int32),
            adagc_clipped=jax.tree_util.tree_map(lambda _: jnp.array(False), params),
        )

    def update(updates, state, params=None, **extra_args):
        validation.validate_update_call(
            updates,
            state,
            AdaGCState,
            params=params,
            mirror="adagc_gamma",
            fn_name=name,
        )
        del params, extra_args
        leaves, treedef = jax.tree_util.tree_flatten(nonfinite.as_arrays(updates))
        gammas = treedef.flatten_up_to(state.adagc_gamma)
        idx = [i for i, x in enumerate(leaves) if dtypes.is_checked_leaf(x)]
        # Overflow-safe per-tensor norms: a finite spike such as [1e20, 0] in
        # float32 has norm 1e20 (its squares overflow), and is clipped.
        checked = [leaves[i] for i in idx]
        if shard_specs is None:
            c_norms, c_oks = tree.leaf_norms_and_flags(checked)
        else:
            axes = shard_norms.checked_leaf_axes(shard_specs, updates, fn_name=name)
            g = shard_norms.global_leaf_norms(checked, axes)
            c_norms, c_oks = g.norms, g.finite
        norms = [jnp.float32(0) for _ in leaves]
        oks = [jnp.array(True) for _ in leaves]
        for j, i in enumerate(idx):
            norms[i], oks[i] = c_norms[j], c_oks[j]
        if axis_name is not None:
            # one pmax: per-tensor "bad" flags and finite norms (NaN -> 0 first)
            k = len(norms)
            vec = jnp.stack(
                [jnp.where(o, 0.0, 1.0).astype(jnp.float32) for o in oks]
                + [jnp.where(o, n, 0.0).astype(jnp.float32) for o, n in zip(oks, norms)]
            )
            vec = lax.pmax(vec, axis_name)
            oks = [vec[i] == 0 for i in range(k)]
            norms = [jnp.where(oks[i], vec[k + i], jnp.nan) for i in range(k)]
        finite = jnp.all(jnp.stack(oks)) if oks else jnp.array(True)

        steps = state.adagc_finite_steps
        in_warmup = steps < warmup
        # The warm-up global norm of the finite tensors, scaled by the largest
        # one so that it cannot overflow either.
        acc = jnp.result_type(jnp.float32, *norms)
        fin = [jnp.where(o, n, 0.0).astype(acc) for o, n in zip(oks, norms)]
        big = fin[0]
        for n in fin[1:]:
            big = jnp.maximum(big, n)
        safe = jnp.where(big > 0, big, 1.0)
        g_norm = safe * jnp.sqrt(sum(jnp.square(n / safe) for n in fin))
        g_clip = g_norm > warmup_max_norm
        g_den = jnp.where(g_clip, g_norm, 1.0)
        f32_max = jnp.finfo(jnp.float32).max

        wide = _beyond_range(
            leaves,
            norms,
            oks,
            gammas,
            in_warmup,
            (relative_threshold, warmup_max_norm),
        )
        out, new_gamma, clipped = [], [], []
        for x, n, o, gam, (use, shift, fac, cn) in zip(
            leaves, norms, oks, gammas, wide
        ):
            limit = relative_threshold * gam
            # gamma 0: no nonzero norm seen yet, nothing to be relative to
            unset = gam == 0
            r_clip = ~in_warmup & o & ~unset & (n > limit)
            r_den = jnp.where(r_clip, n, 1.0)
            clip = jnp.where(in_warmup, g_clip & o, r_clip)
            den = jnp.where(in_warmup, g_den, r_den)
            num = jnp.where(in_warmup, jnp.asarray(warmup_max_norm, den.dtype), limit)
            scaled = scaling.scale_where(x, clip, num, den)
            if dtypes.is_checked_leaf(x):  # a norm beyond float32: 2**-shift first
                ok = use & jnp.isfinite(x)
                safe = jnp.where(ok, x, jnp.zeros_like(x))  # no 0 * NaN derivative
                rescued = scaling.rescale(safe, shift) * fac.astype(x.dtype)
                scaled = jnp.where(ok, rescued, scaled)
            out.append(scaled)
            # num * (n / den): n <= den, so a tiny factor cannot flush to 0
            clipped_norm = jnp.where(use, cn, jnp.where(clip, num * (n / den), n))
            lower = jnp.where(clipped_norm > 0, jnp.minimum(gam, clipped_norm), gam)
            warm_gamma = jnp.where(unset, clipped_norm, lower)
            ema_gamma = beta * gam + (1 - beta) * clipped_norm
            ema_gamma = jnp.where(unset, clipped_norm, ema_gamma)
            g_new = jnp.where(in_warmup, warm_gamma, ema_gamma)
            g_new = jnp.minimum(g_new, f32_max)  # gamma is float32
            new_gamma.append(jnp.where(finite, g_new, gam).astype(jnp.float32))
            clipped.append(r_clip | (use & ~in_warmup))
        new_state = AdaGCState(
            adagc_gamma=jax.tree_util.tree_unflatten(treedef, new_gamma),
            adagc_finite_steps=jnp.where(
                finite, optax.safe_increment(steps), steps
            ).astype(jnp.int32),
            adagc_clipped=jax.tree_util.tree_unflatten(treedef, clipped),
        )
        return jax.tree_util.tree_unflatten(treedef, out), new_state

    return optax.GradientTransformationExtraArgs(init, update)


def _beyond_range(
    leaves: list,
    norms: list,
    oks: list,
    gammas: list,
    in_warmup: jax.Array,
    thresholds: tuple[float, float],
) -> list[tuple[jax.Array, jax.Array, jax.Array, jax.Array]]:
    """Per leaf ``(use, shift, factor, clipped_norm)``, for norms beyond float32.

    A finite tensor whose norm is beyond float32's range (entries near its
    max) has norm +Inf: its factor ``limit / Inf`` would zero it and make
    gamma NaN for good, and in warm-up the global norm would be NaN (no
    clipping). Only then (a scalar `lax.cond`), tensors are scaled by
    ``2**-shift`` first (`scaling.rescale`, exact; the binary exponent of
    the largest magnitude): where `use`, the update is ``rescale(x, shift)
    * factor`` and gamma sees `clipped_norm`. In warm-up every finite tensor
    is so clipped to the global `warmup_max_norm`; after it, each tensor of
    norm +Inf whose gamma is set, to ``relative_threshold * gamma``.
    `thresholds` is ``(relative_threshold, warmup_max_norm)``.
    """
    relative, absolute = thresholds
    checked = [i for i, x in enumerate(leaves) if dtypes.is_checked_leaf(x)]
    huge = [jnp.isposinf(n) & o for n, o in zip(norms, oks)]
    zero, one = jnp.zeros((), jnp.int32), jnp.ones((), jnp.float32)
    none = [(jnp.array(False), zero, one, one) for _ in leaves]
    if not checked:
        return none

    def wide() -> list:
        exps = {}
        rests = {}
        for i in checked:
            a = jnp.abs(leaves[i])
            a = jnp.where(jnp.isfinite(a), a, 0).astype(tree.acc_dtype([a]))
            e = jnp.where(huge[i], jnp.frexp(jnp.max(a, initial=0))[1], 0)
            exps[i] = e.astype(jnp.int32)
            rests[i] = jnp.sqrt(jnp.sum(jnp.square(scaling.rescale(a, exps[i]))))
        top = functools.reduce(jnp.maximum, exps.values())
        parts = {
            i: jnp.where(oks[i], scaling.rescale(rests[i], top - exps[i]), 0)
            for i in checked
        }
        total = jnp.sqrt(sum(jnp.square(p) for p in parts.values()))
        rows = list(none)
        for i in checked:
            limit = relative * gammas[i]
            after = huge[i] & (gammas[i] != 0)
            rows[i] = (
                jnp.where(in_warmup, oks[i], after),
                jnp.where(in_warmup, top, exps[i]),
                jnp.where(in_warmup, absolute / total, limit / rests[i]),
                jnp.where(in_warmup, absolute * (parts[i] / total), limit),
            )
        return [
            (u, k.astype(jnp.int32), f.astype(jnp.float32), c.astype(jnp.float32))
            for u, k, f, c in rows
        ]

    any_huge = functools.reduce(jnp.logical_or, huge)
    return lax.cond(any_huge, wide, lambda: none)
