"""Per-leaf gradient statistics in the optimizer state, for any logger."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.extend import source_info_util

from jaxnan._src.core import tree, validation
from jaxnan._src.inspect import leaf_stats
from jaxnan._src.transforms import observers

source_info_util.register_exclusion(__file__)


class MonitorState(NamedTuple):
    """State of `monitor`.

    Every field but the last has the structure of the params, one scalar per
    leaf, and describes the last update call.

    Attributes:
        monitor_grad_norm: float32, L2 norm of what `monitor` received
            (NaN or Inf when the leaf holds a nonfinite entry).
        monitor_grad_max_abs: float32, largest absolute entry it received;
            NaN when the leaf holds a NaN (never silently dropped).
        monitor_grad_nonfinite: int32, NaN, +Inf and -Inf entries it received.
        monitor_update_norm: float32, L2 norm of the updates it returned
            (those of `inner`; the received ones when there is no inner).
        monitor_inner_state: the state of the wrapped transformation
            (`optax.EmptyState()` without one).
    """

    monitor_grad_norm: optax.Updates
    monitor_grad_max_abs: optax.Updates
    monitor_grad_nonfinite: optax.Updates
    monitor_update_norm: optax.Updates
    monitor_inner_state: optax.OptState


# A skipping guard (`skip_nonfinite`, `skip_spikes`, `dynamic_loss_scale`)
# still advances the records of a monitor inside it, so that the skipped step
# (the overflow, the NaN) is seen; the wrapped optimizer state stays untouched.
observers.register_observer_state(MonitorState, "monitor_inner_state")


def _agree_stats(norms, maxabs, bads, unorms, axis_name):
    """Largest norm / max-abs and summed counts over `axis_name`, NaN kept."""
    if axis_name is None or not norms:
        return norms, maxabs, bads, unorms
    vals = jnp.stack(norms + maxabs + unorms)
    nan = jnp.isnan(vals)
    packed = jnp.concatenate(
        [jnp.where(nan, 0.0, vals), nan.astype(jnp.float32)]
    )  # the CPU pmax drops NaN: carry it as a flag
    packed = lax.pmax(packed, axis_name)
    k = vals.shape[0]
    vals = jnp.where(packed[k:] > 0, jnp.nan, packed[:k])
    counts = lax.psum(jnp.stack(bads), axis_name)
    n = len(norms)
    return (
        [vals[i] for i in range(n)],
        [vals[n + i] for i in range(n)],
        [counts[i] for i in range(n)],
        [vals[2 * n + i] for i in range(n)],
    )


def monitor(
    inner: optax.GradientTransformation | None = None,
    *,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Records per-leaf norms, max-abs and nonfinite counts in the state.

    `monitor()` passes the updates through unchanged and records, for every
    leaf, the L2 norm, the largest absolute entry and the number of NaN, +Inf
    and -Inf entries of what it receives: put it first in a chain to watch
    the gradients, last to watch the updates. `monitor(inner)` records the
    received gradients and, in `monitor_update_norm`, the norm of what
    `inner` returns, so one transform shows both. Read the state with
    `jaxnan.monitor_metrics`, which gives a flat dict of scalars for any
    logger; nothing leaves the device until the logger asks.

    Inside a skipping guard (``jaxnan.skip_nonfinite(optax.chain(
    jaxnan.monitor(), adamw))``, ``jaxnan.dynamic_loss_scale(
    jaxnan.monitor(adamw))``) the monitor still records every step, the
    skipped ones included, so the step that overflowed is the one you see;
    only the state it wraps is kept unchanged by a skip.

    A leaf holding a NaN reports a NaN max-abs (the CPU backend's `jnp.max`
    can ignore NaN, so the NaN count decides, not the max).

    Cost: two fused reductions per leaf (sum of squares and max-abs); the
    nonfinite counts (two more passes) run only on a step whose sum of
    squares is not finite, inside a scalar `lax.cond`. Collectives: none
    without `axis_name`; with it, one `lax.pmax` (the largest norm and
    max-abs over replicas) and one int32 `lax.psum` (total counts).

    Args:
        inner: optional transformation to wrap.
        axis_name: the mapped axis to reduce over inside `shard_map`/`pmap`.

    Returns:
        An `optax.GradientTransformationExtraArgs` whose state is a
        `MonitorState`.

    Raises:
        TypeError: when `inner` is given and is not an optax transformation,
            or `axis_name` is not a str (or a tuple of them).
        ValueError: when update gets leaves of another shape than `params`
            or than the inner state's moments (naming the leaf and both
            shapes).

    Examples:
        >>> import jax.numpy as jnp, jaxnan
        >>> tx = jaxnan.monitor()
        >>> state = tx.init({"w": jnp.zeros(2)})
        >>> _, state = tx.update({"w": jnp.array([3.0, -4.0])}, state)
        >>> float(state.monitor_grad_norm["w"]), float(state.monitor_grad_max_abs["w"])
        (5.0, 4.0)

    .. versionadded:: 0.1.0
    """
    name = "jaxnan.monitor"
    validation.check_axis_name("monitor", axis_name)
    if inner is not None:
        validation.validate_inner(inner, fn_name="monitor")
        inner = optax.with_extra_args_support(inner)

    def init(params: optax.Params) -> MonitorState:
        validation.validate_updates(params, argname="params", fn_name=name)

        def f0():  # a fresh buffer per leaf and field, so it can be donated
            return jax.tree_util.tree_map(lambda _: jnp.zeros((), jnp.float32), params)

        i0 = jax.tree_util.tree_map(lambda _: jnp.zeros((), jnp.int32), params)
        inner_state = optax.EmptyState() if inner is None else inner.init(params)
        return MonitorState(f0(), f0(), i0, f0(), inner_state)

    def update(updates, state, params=None, **extra_args):
        validation.validate_update_call(
            updates,
            state,
            MonitorState,
            params=params,
            mirror="monitor_grad_norm",
            extra_args=extra_args,
            inner_accepts=None
            if inner is None
            else lambda: validation.inner_accepts(
                inner.update, updates, state.monitor_inner_state, params, extra_args
            ),
            fn_name=name,
        )
        if inner is None:
            out, inner_state = updates, state.monitor_inner_state
        else:
            out, inner_state = inner.update(
                updates, state.monitor_inner_state, params, **extra_args
            )
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        leaves = [jnp.asarray(x) for x in leaves]
        norms, maxabs, bads = leaf_stats.norms_maxabs_nonfinite(leaves)
        if inner is None:
            unorms = norms
        else:
            out_leaves = treedef.flatten_up_to(out)
            unorms = [
                jnp.sqrt(tree.sum_of_squares(x)).astype(jnp.float32) for x in out_leaves
            ]
        norms, maxabs, bads, unorms = _agree_stats(
            norms, maxabs, bads, unorms, axis_name
        )

        def unflat(xs):
            return jax.tree_util.tree_unflatten(treedef, xs)

        new_state = MonitorState(
            monitor_grad_norm=unflat(norms),
            monitor_grad_max_abs=unflat(maxabs),
            monitor_grad_nonfinite=unflat(bads),
            monitor_update_norm=unflat(unorms),
            monitor_inner_state=inner_state,
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init, update)


def _path_name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def monitor_metrics(
    state: Any, *, prefix: str = "", host: bool = False
) -> dict[str, jax.Array] | dict[str, float | int]:
    """A flat dict of scalars from the `MonitorState` in an optimizer state.

    Keys are ``<prefix><metric>/<leaf path>`` with the path joined by "/"
    (``grad_norm/layer1/w``), plus whole-model entries without a path:
    ``grad_norm`` and ``update_norm`` (global L2 norms), ``grad_max_abs``
    and ``grad_nonfinite`` (total count). Values are device scalars (computed
    without a host sync, so it also works inside `jit`); with ``host=True``
    they are Python numbers, ready for a logger (``float``, counts ``int``),
    read with one `jax.device_get` of the whole dict.

    Args:
        state: a `MonitorState`, or any optimizer state tree that contains
            exactly one.
        prefix: prepended to every key (e.g. ``"opt/"``).
        host: return Python numbers (one device-to-host transfer; not under
            `jit`) instead of device scalars.

    Returns:
        A dict from str to scalar `jax.Array`, or with ``host=True`` to
        ``float`` (``int`` for the nonfinite counts).

    Raises:
        ValueError: when `state` holds no `MonitorState`, or several.

    Examples:
        >>> import jax.numpy as jnp, optax, jaxnan
        >>> tx = optax.chain(jaxnan.monitor(), optax.sgd(0.1))
        >>> state = tx.init({"a": {"w": jnp.zeros(2)}})
        >>> _, state = tx.update({"a": {"w": jnp.array([3.0, jnp.nan])}}, state)
        >>> m = jaxnan.monitor_metrics(state)
        >>> sorted(m)
        ['grad_max_abs', 'grad_max_abs/a/w', 'grad_nonfinite', 'grad_nonfinite/a/w',
         'grad_norm', 'grad_norm/a/w', 'update_norm', 'update_norm/a/w']
        >>> int(m["grad_nonfinite/a/w"]), float(m["grad_max_abs/a/w"])
        (1, nan)
        >>> jaxnan.monitor_metrics(state, host=True)["grad_norm/a/w"]
        nan

    .. versionadded:: 0.1.0
    """
    mon = _the_monitor_state(state)
    out: dict[str, jax.Array] = {}
    for metric, (field, whole_model) in _METRICS.items():
        flat, _ = jax.tree_util.tree_flatten_with_path(getattr(mon, field))
        out[prefix + metric] = whole_model([x for _, x in flat])
        for path, x in flat:
            out[f"{prefix}{metric}/{_path_name(path)}"] = x
    if not host:
        return out
    return {k: v.item() for k, v in jax.device_get(out).items()}


def _the_monitor_state(state: Any) -> MonitorState:
    """The one `MonitorState` in an optimizer state; ValueError otherwise."""

    def is_mon(x):
        return isinstance(x, MonitorState)

    found = [x for x in jax.tree_util.tree_leaves(state, is_leaf=is_mon) if is_mon(x)]
    if len(found) != 1:
        raise ValueError(
            f"jaxnan.monitor_metrics: expected exactly one MonitorState in the "
            f"optimizer state, found {len(found)}. Pass the MonitorState itself "
            "(e.g. opt_state[0] for optax.chain(jaxnan.monitor(), ...))."
        )
    return found[0]


def _global_norm(norms: list[jax.Array]) -> jax.Array:
    return jnp.sqrt(sum(jnp.square(x) for x in norms)) if norms else jnp.float32(0)


def _global_max_abs(max_abs: list[jax.Array]) -> jax.Array:
    stacked = jnp.stack(max_abs) if max_abs else jnp.zeros((1,), jnp.float32)
    # a small vector, but keep NaN explicit anyway
    return jnp.where(jnp.any(jnp.isnan(stacked)), jnp.nan, jnp.max(stacked))


def _total(counts: list[jax.Array]) -> jax.Array:
    return sum(counts) if counts else jnp.int32(0)


# metric -> (its `MonitorState` field, how the per-leaf values make the
# whole-model value), in the order of `monitor_metrics`'s keys.
_METRICS: dict[str, tuple[str, Callable[[list[jax.Array]], jax.Array]]] = {
    "grad_norm": ("monitor_grad_norm", _global_norm),
    "grad_max_abs": ("monitor_grad_max_abs", _global_max_abs),
    "grad_nonfinite": ("monitor_grad_nonfinite", _total),
    "update_norm": ("monitor_update_norm", _global_norm),
}
