"""Dynamic loss scaling for float16 training, with torch GradScaler semantics.

The scale lives in the optimizer state, so it threads through `jit`, `scan`
and checkpoints like any other state; the minimum scale is a static Python
float captured by the transform, so it cannot be lost when the state passes
through `jit` (jmp's `DynamicLossScale` carries it as a pytree field that
`jit` turns into a tracer).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.extend import source_info_util

from jaxnan._src.core import dtypes, scaling, tree, validation
from jaxnan._src.transforms import nonfinite

source_info_util.register_exclusion(__file__)


class DynamicLossScaleState(NamedTuple):
    """State of `dynamic_loss_scale`.

    Attributes:
        loss_scale: float32 scalar, the current scale (multiply the loss by
            it with `jaxnan.scale_loss`).
        loss_scale_good_steps: int32 scalar, consecutive finite steps since
            the scale last changed (torch's "growth tracker").
        loss_scale_skips: int32 scalar, steps skipped since init (nonfinite
            gradients or loss, or a nonfinite result of `inner`).
        loss_scale_inner_skips: int32 scalar, the skipped steps whose
            unscaled gradients were finite but whose new params or inner
            state were not (these leave the scale alone).
        loss_scale_inner_state: the state of the wrapped transformation.
    """

    loss_scale: jax.Array
    loss_scale_good_steps: jax.Array
    loss_scale_skips: jax.Array
    loss_scale_inner_skips: jax.Array
    loss_scale_inner_state: optax.OptState


def _find_scale_state(state: Any, fn: str) -> DynamicLossScaleState:
    def is_scale(x):
        return isinstance(x, DynamicLossScaleState)

    found = [
        x for x in jax.tree_util.tree_leaves(state, is_leaf=is_scale) if is_scale(x)
    ]
    if len(found) != 1:
        raise ValueError(
            f"jaxnan.{fn}: expected exactly one DynamicLossScaleState in the "
            f"optimizer state, found {len(found)}. Pass the state of "
            "jaxnan.dynamic_loss_scale (or a state tree that contains it once)."
        )
    return found[0]


def dynamic_loss_scale(
    inner: optax.GradientTransformation,
    *,
    init_scale: float = 2.0**15,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    growth_interval: int = 2000,
    min_scale: float = 1.0,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Dynamic loss scaling: unscale, skip nonfinite steps, adapt the scale.

    Use it with `jaxnan.scale_loss` on the loss: the transform receives the
    gradients of the *scaled* loss, divides them by the scale (in float32,
    cast back to each leaf's dtype) and hands them to `inner`. The schedule is
    torch's `GradScaler`: when any gradient entry (or the ``loss=`` extra
    argument) is NaN, +Inf or -Inf, the step is skipped (updates exactly 0,
    inner state bit for bit unchanged), the scale is multiplied by
    `backoff_factor` (never below `min_scale`) and the good-step count
    restarts; otherwise, after `growth_interval` consecutive finite steps the
    scale is multiplied by `growth_factor` (when the result is finite) and the
    count restarts. The default `init_scale` is 2**15 (torch uses 2**16, which
    overflows a float16 scaled loss above 1.0). Extra arguments reach `inner`
    unchanged: pass the *unscaled* loss as ``loss=``, so that a
    `jaxnan.skip_spikes` inside sees a loss that does not jump with the scale.

    Cost: the unscaling multiply, which fuses into the optimizer's
    elementwise loops, and one fused reduction per leaf shape that reads the
    gradients, the optimizer state and the params: the finiteness of the
    gradients and the outgoing check in one loop.
    Collectives: none without `axis_name`; with it, one int32 `lax.psum` (of
    two flags: the gradients, and the outgoing check) so that all replicas
    skip together and keep the same scale.

    Args:
        inner: the transformation that gets the unscaled gradients.
        init_scale: the initial scale; finite, at least `min_scale`.
        growth_factor: multiplies the scale after `growth_interval` finite
            steps; greater than 1.
        backoff_factor: multiplies the scale on a nonfinite step; in (0, 1).
        growth_interval: finite steps between two growths; at least 1.
        min_scale: the scale never goes below it; a static number, finite
            and at least 1.
        axis_name: the mapped axis to agree over inside `shard_map`/`pmap`.

    Returns:
        An `optax.GradientTransformationExtraArgs` whose state is a
        `DynamicLossScaleState`.

    Raises:
        TypeError: when `inner` is not an optax transformation, a
            hyperparameter is not a Python number, or `axis_name` is not a
            str (or a tuple of them).
        ValueError: for a hyperparameter out of range.

    Examples:
        A jitted float16 train step:

        >>> import jax, jax.numpy as jnp, optax, jaxnan
        >>> tx = jaxnan.dynamic_loss_scale(optax.sgd(0.1), growth_interval=2)
        >>> params = {"w": jnp.ones(2, jnp.float32)}
        >>> opt_state = tx.init(params)
        >>> @jax.jit
        ... def step(params, opt_state, x):
        ...     def loss_fn(p):
        ...         y = x.astype(jnp.float16) @ p["w"].astype(jnp.float16)
        ...         return jaxnan.scale_loss(jnp.mean(y.astype(jnp.float32)), opt_state)
        ...     grads = jax.grad(loss_fn)(params)
        ...     updates, opt_state = tx.update(grads, opt_state, params)
        ...     return optax.apply_updates(params, updates), opt_state
        >>> params, opt_state = step(params, opt_state, jnp.ones((4, 2)))
        >>> params["w"], float(opt_state.loss_scale)
        (Array([0.9, 0.9], dtype=float32), 32768.0)
        >>> params, opt_state = step(params, opt_state, jnp.ones((4, 2)))
        >>> float(opt_state.loss_scale)  # grown after 2 good steps
        65536.0

    References:
        Micikevicius et al., `Mixed Precision Training
        <https://arxiv.org/abs/1710.03740>`_, 2018

    .. versionadded:: 0.1.0
    """
    fn = "dynamic_loss_scale"
    name = "jaxnan.dynamic_loss_scale"
    validation.validate_inner(inner, fn_name=fn)
    validation.check_axis_name(fn, axis_name)
    validation.check_number(fn, "min_scale", min_scale, low=1, low_open=False)
    if validation.is_traced(min_scale):
        raise TypeError(
            "jaxnan.dynamic_loss_scale: min_scale must be a concrete number, not "
            "a traced value (it is captured as a static float)."
        )
    min_scale = float(min_scale)
    validation.check_number(fn, "init_scale", init_scale, low=min_scale, low_open=False)
    validation.check_number(fn, "growth_factor", growth_factor, low=1)
    validation.check_number(fn, "backoff_factor", backoff_factor, low=0, high=1)
    growth_interval = validation.check_int(
        fn, "growth_interval", growth_interval, low=1
    )
    inner = optax.with_extra_args_support(inner)

    def init(params: optax.Params) -> DynamicLossScaleState:
        validation.validate_updates(params, argname="params", fn_name=name)
        return DynamicLossScaleState(
            loss_scale=jnp.asarray(init_scale, jnp.float32),
            loss_scale_good_steps=jnp.zeros((), jnp.int32),
            loss_scale_skips=jnp.zeros((), jnp.int32),
            loss_scale_inner_skips=jnp.zeros((), jnp.int32),
            loss_scale_inner_state=inner.init(params),
        )

    def update(updates, state, params=None, **extra_args):
        validation.validate_update_call(
            updates,
            state,
            DynamicLossScaleState,
            params=params,
            extra_args=extra_args,
            inner_accepts=lambda: validation.inner_accepts(
                inner.update, updates, state.loss_scale_inner_state, params, extra_args
            ),
            fn_name=name,
        )
        updates = nonfinite.as_arrays(updates)
        grads = unscale_grads(updates, state)
        finite = jnp.array(True)
        loss = extra_args.get("loss")
        if loss is not None:
            finite = tree.all_finite(loss)
        # The unscaled gradients are checked in the loops of the outgoing check.
        out, kept_inner, finite, inner_ok, _ = nonfinite.guarded_update(
            inner,
            finite,
            grads,
            state.loss_scale_inner_state,
            params,
            extra_args,
            axis_name,
            incoming=tree.checked_leaves(grads),
        )
        applied = finite & inner_ok
        scale = state.loss_scale
        good = optax.safe_increment(state.loss_scale_good_steps)
        grow = applied & (good >= growth_interval)
        grown = scale * growth_factor
        grown = jnp.where(jnp.isfinite(grown), grown, scale)
        backed = jnp.maximum(scale * backoff_factor, min_scale)
        new_scale = jnp.where(finite, jnp.where(grow, grown, scale), backed)
        new_good = jnp.where(applied & ~grow, good, 0).astype(jnp.int32)
        new_good = jnp.where(finite & ~inner_ok, state.loss_scale_good_steps, new_good)

        def bump(counter, flag):
            return jnp.where(flag, optax.safe_increment(counter), counter)

        skips = bump(state.loss_scale_skips, ~applied)
        inner_skips = bump(state.loss_scale_inner_skips, finite & ~inner_ok)
        new_state = DynamicLossScaleState(
            loss_scale=new_scale.astype(jnp.float32),
            loss_scale_good_steps=new_good,
            loss_scale_skips=skips,
            loss_scale_inner_skips=inner_skips,
            loss_scale_inner_state=kept_inner,
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init, update)


def scale_loss(loss: jax.typing.ArrayLike, state: Any) -> jax.Array:
    """Multiplies the loss by the current loss scale.

    Call it inside the function you differentiate, so that the gradients are
    those of the scaled loss; `dynamic_loss_scale` divides them back. Compute
    the loss itself in float32: a float16 loss times 2**15 overflows above 2.

    Args:
        loss: the loss (any floating array; usually a float32 scalar).
        state: the `DynamicLossScaleState`, or any optimizer state tree that
            contains exactly one.

    Returns:
        ``loss * scale`` in the dtype of `loss`.

    Raises:
        ValueError: when `state` holds no `DynamicLossScaleState`, or several.
        TypeError: when `loss` is not floating (an int, a str, None).

    Examples:
        >>> import jax.numpy as jnp, optax, jaxnan
        >>> tx = optax.chain(jaxnan.dynamic_loss_scale(optax.sgd(1.0), init_scale=8.0))
        >>> state = tx.init({"w": jnp.zeros(1)})
        >>> jaxnan.scale_loss(jnp.float32(0.5), state)
        Array(4., dtype=float32)

    .. versionadded:: 0.1.0
    """
    scale = _find_scale_state(state, "scale_loss").loss_scale
    dtype = dtypes.leaf_dtype(loss)
    if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
            f"jaxnan.scale_loss: loss must be a floating array or Python float, "
            f"got {type(loss).__name__} ({loss!r:.40}). Pass the loss value "
            "(a float32 scalar), before any conversion to int or str."
        )
    loss = jnp.asarray(loss)
    return loss * scale.astype(loss.dtype)


def unscale_grads(grads: scaling.ArrayTree, state: Any) -> scaling.ArrayTree:
    """Divides gradients of the scaled loss by the current loss scale.

    `dynamic_loss_scale` already does this before `inner`; call it yourself
    only to look at the true gradients (for logging, or for a clip outside
    the transform). The division is done in float32 (or the leaf's wider
    dtype) and cast back to each leaf's dtype; non-floating leaves pass
    through.

    Args:
        grads: the gradient pytree of the scaled loss.
        state: the `DynamicLossScaleState`, or a state tree holding one.

    Returns:
        The unscaled gradients, with the dtypes of `grads`.

    Raises:
        ValueError: when `state` holds no `DynamicLossScaleState`, or several.

    Examples:
        >>> import jax.numpy as jnp, optax, jaxnan
        >>> tx = jaxnan.dynamic_loss_scale(optax.sgd(1.0), init_scale=8.0)
        >>> state = tx.init({"w": jnp.zeros(1)})
        >>> jaxnan.unscale_grads({"w": jnp.array([4.0], jnp.float16)}, state)["w"]
        Array([0.5], dtype=float16)

    .. versionadded:: 0.1.0
    """
    scale = _find_scale_state(state, "unscale_grads").loss_scale
    inv = 1.0 / scale

    def one(g):
        if not dtypes.is_checked_leaf(g):
            return g
        g = jnp.asarray(g)
        acc = jnp.promote_types(g.dtype, jnp.float32)
        return (g.astype(acc) * inv.astype(acc)).astype(g.dtype)

    return jax.tree_util.tree_map(one, grads)
