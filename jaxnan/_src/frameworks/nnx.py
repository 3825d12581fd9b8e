"""Flax: the NNX adapter, and the glue to hand jaxnan's guards the loss.

`nnx_adapter` is Flax NNX's `jaxnan._src.frameworks.registry.Adapter`; the
functions below are the glue Flax needs to hand the loss to jaxnan's guards
and read their state.

Nothing here is imported by ``import jaxnan``; users import `jaxnan.flax`
explicitly, and Flax itself is imported only inside the functions.

- Flax NNX needs no glue to train: ``nnx.Optimizer(model,
  jaxnan.skip_nonfinite(tx), wrt=nnx.Param)`` and ``optimizer.update(model,
  grads, loss=loss)`` pass the loss on. Its optimizer keeps the state's
  arrays in Variables; `opt_state` gives them back as arrays.
- Flax linen's ``TrainState.apply_gradients`` calls ``tx.update`` without
  extra arguments; `apply_gradients` hands the loss on.
- Equinox needs none: ``eqx.filter(model, eqx.is_array)`` trees (with None
  where the model holds no array) are accepted by every jaxnan transform.
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import optax
from jax.extend import source_info_util

from jaxnan._src.frameworks.registry import Adapter, register_adapter

source_info_util.register_exclusion(__file__)


@register_adapter("flax.nnx")
def nnx_adapter() -> Adapter:
    """NNX modules and optimizers: `nnx.split`/`merge`/`update`.

    Their BatchStat, RngState and sown Intermediate Variables are updated in
    place; a Variable that is neither an `nnx.Param` nor an `nnx.BatchStat`
    is a model constant.
    """
    nnx = sys.modules["flax.nnx"]

    def sync(original: Any, copy: Any, originals: dict[int, Any]) -> None:
        def back(x: Any) -> Any:
            return originals.get(id(x), x)

        if isinstance(original, nnx.Variable):
            new = back(copy.get_value())
            if new is not original.get_value():
                original.set_value(new)
            return
        state = jax.tree_util.tree_map(back, nnx.state(copy))
        nnx.update(original, state)

    def is_var(x: Any) -> bool:
        return isinstance(x, nnx.Variable)

    def constants(tree: Any) -> list[bool]:
        out: list[bool] = []
        for x in jax.tree_util.tree_leaves(tree, is_leaf=is_var):
            if is_var(x):
                const = not isinstance(x, (nnx.Param, nnx.BatchStat))
                out += [const] * len(jax.tree_util.tree_leaves(x))
            else:
                out.append(False)
        return out

    return Adapter(
        name="flax.nnx",
        is_node=nnx.graph.is_graph_node,
        split=lambda objs: nnx.split(objs),
        merge=lambda definition, state: nnx.merge(definition, state),
        update=lambda objs, state: nnx.update(objs, state),
        sync=sync,
        is_sync_node=lambda x: isinstance(x, (nnx.Variable, nnx.Pytree)),
        constants=constants,
    )


def opt_state(optimizer: Any) -> optax.OptState:
    """The optimizer state of an `nnx.Optimizer`, with arrays for Variables.

    ``nnx.Optimizer`` stores each array of the optax state in an
    `nnx.Variable` (``OptState``), so ``bool(optimizer.opt_state.gave_up)``
    raises TypeError. This gives the same NamedTuples with the arrays in
    place, for reading and for `optax.tree.get`. It copies nothing.

    Args:
        optimizer: an `nnx.Optimizer`, or its ``opt_state``.

    Returns:
        The optax state tree, its Variables replaced by their values.

    Raises:
        TypeError: when `optimizer` holds no optimizer state (a model, a
            single Variable, None).

    Examples:
        >>> import jax.numpy as jnp, optax, jaxnan, jaxnan.flax
        >>> from flax import nnx
        >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
        >>> tx = jaxnan.skip_nonfinite(optax.sgd(0.1))
        >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        >>> grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 2)))))(model)
        >>> _ = optimizer.update(model, grads, loss=jnp.float32(1.0))
        >>> state = jaxnan.flax.opt_state(optimizer)
        >>> int(state.nonfinite_total), bool(state.gave_up)
        (0, False)

    .. versionadded:: 0.2.0
    """
    from flax import nnx

    tree = getattr(optimizer, "opt_state", optimizer)
    if isinstance(tree, nnx.Variable | nnx.Module) or tree is None:
        raise TypeError(
            f"jaxnan.flax.opt_state needs an nnx.Optimizer (or its opt_state), "
            f"got {type(optimizer).__name__}; pass the optimizer built by "
            "nnx.Optimizer(model, tx, wrt=nnx.Param), not the model."
        )

    def value(x: Any) -> Any:
        return x.get_value() if isinstance(x, nnx.Variable) else x

    return jax.tree_util.tree_map(
        value, tree, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def apply_gradients(state: Any, *, grads: Any, loss: Any, **kwargs: Any) -> Any:
    """`TrainState.apply_gradients` that hands `loss` to the optimizer.

    Flax linen's ``state.apply_gradients(grads=grads)`` calls
    ``state.tx.update(grads, opt_state, params)`` with no extra argument, so
    `jaxnan.skip_nonfinite`'s check of the loss (and `skip_spikes`' loss
    window) never sees it. ``jaxnan.flax.apply_gradients(state, grads=grads,
    loss=loss)`` runs the state's own ``apply_gradients`` (subclasses and
    extra fields included) with ``tx.update(..., loss=loss)``: the result is
    the same state, bit for bit, on a healthy step. Cost: none beyond the
    check the transform itself makes.

    Args:
        state: a `flax.training.train_state.TrainState` (or a subclass).
        grads: the gradients, as for ``apply_gradients``.
        loss: the loss of the step (a scalar).
        **kwargs: other fields to replace, as for ``apply_gradients``.

    Returns:
        The updated state.

    Raises:
        TypeError: when ``state.tx`` does not take extra arguments (wrap it in
            a jaxnan transform or `optax.with_extra_args_support`).

    Examples:
        >>> import jax.numpy as jnp, optax, jaxnan, jaxnan.flax
        >>> from flax.training import train_state
        >>> state = train_state.TrainState.create(
        ...     apply_fn=None, params={"w": jnp.ones(2)},
        ...     tx=jaxnan.skip_nonfinite(optax.sgd(0.1)))
        >>> grads = {"w": jnp.ones(2)}
        >>> state = jaxnan.flax.apply_gradients(state, grads=grads, loss=jnp.nan)
        >>> state.params["w"], int(state.opt_state.nonfinite_total)
        (Array([1., 1.], dtype=float32), 1)

    .. versionadded:: 0.2.0
    """
    tx = state.tx
    if not isinstance(tx, optax.GradientTransformationExtraArgs):
        raise TypeError(
            "jaxnan.flax.apply_gradients: state.tx takes no extra arguments, so "
            "it cannot be given the loss. Build the state with a jaxnan "
            "transform (jaxnan.skip_nonfinite(tx)) or "
            "optax.with_extra_args_support(tx)."
        )

    def update(updates: Any, opt_state: Any, params: Any = None) -> Any:
        return tx.update(updates, opt_state, params, loss=loss)

    bound = optax.GradientTransformation(tx.init, update)
    new = state.replace(tx=bound).apply_gradients(grads=grads, **kwargs)
    return new.replace(tx=tx)
