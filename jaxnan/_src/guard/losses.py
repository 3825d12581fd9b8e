"""Where a guarded step's loss is: its metrics, the optimizer, or nowhere.

A step returns its loss (``return loss``; ``(params, opt_state, loss)``; a
dict with a ``"loss"`` entry), or the guard is told where it is (``loss=``).
A step that returns nothing, or its state alone, as the Flax tutorials write
it (NNX: ``train_step(model, optimizer, metrics, batch)`` keeps its loss in
an ``nnx.MultiMetric``; linen: ``train_step(state, batch) -> state``), may
still hand the loss to the optimizer
(``optimizer.update(model, grads, loss=loss)``): that loss is the step's.
With neither, the step has no loss: it is bad when `skip_nonfinite` skips it
or when it writes a nonfinite value into its state (a metric averaging a
nonfinite loss included), and its loss figure is NaN.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import source_info_util

from jaxnan._src.transforms import update_tap

source_info_util.register_exclusion(__file__)

NO_LOSS = (
    "jaxnan.guard: `{fn_name}` calls skip_nonfinite without `loss=`. A step "
    "whose loss is nonfinite but whose gradients are finite is still undone, "
    "but only by a lax.cond that keeps a copy of the parameters and optimizer "
    "state on every step (more device memory: +2x the parameters' bytes under "
    "Adam). Hand the loss to the optimizer and the guard needs no copy: "
    "tx.update(grads, opt_state, params, loss=loss) (Flax NNX: "
    "optimizer.update(model, grads, loss=loss); linen: "
    "jaxnan.flax.apply_gradients(state, grads=grads, loss=loss))."
)

LOSSLESS = (
    "jaxnan.guard: `{fn_name}` returns no loss (nothing, or its state alone) "
    "and hands none to skip_nonfinite, so the guard has no loss to check: a "
    "step is bad when "
    "skip_nonfinite skips it or it writes a nonfinite value into its state (a "
    "metric that averages the loss included), and its loss figure is NaN. "
    "Return the loss, or hand it to the optimizer: "
    "optimizer.update(model, grads, loss=loss)."
)


def loss_of(
    metrics: Any,
    loss: str | Callable | None,
    fn_name: str,
    tapped: Sequence[update_tap.TapRecord] = (),
) -> jax.Array | None:
    """The loss of a step: in its metrics, else the one its optimizer got.

    Args:
        metrics: what the step returned after its state (None: nothing).
        loss: the guard's ``loss=`` option (a metrics key, a function of the
            metrics, or None).
        fn_name: the step's name, for the messages.
        tapped: the records of the `skip_nonfinite` updates traced in the
            step (`update_tap`), whose ``loss`` is the one each was handed.

    Returns:
        The loss; None when the step returns nothing and hands no loss to
        its optimizer (a step without a loss).

    Raises:
        ValueError: when the metrics hold no loss that can be found (names
            the `loss` argument).

    Examples:
        >>> import jax.numpy as jnp
        >>> from jaxnan._src.guard import losses
        >>> float(losses.loss_of({"loss": jnp.float32(2.0), "acc": 1.0}, None, "f"))
        2.0
        >>> losses.loss_of(None, None, "f") is None
        True
    """
    if callable(loss):
        return jnp.asarray(loss(metrics))
    if isinstance(loss, str):
        if isinstance(metrics, dict) and loss in metrics:
            return jnp.asarray(metrics[loss])
        raise ValueError(
            f"jaxnan.guard: loss={loss!r}, but the metrics of `{fn_name}` are "
            f"{_describe(metrics)}. Pass the key of the loss in the metrics "
            "dict, or loss=lambda metrics: ... returning it."
        )
    if metrics is None:
        given = [r.loss for r in tapped if r.loss is not None]
        return jnp.asarray(given[0]) if given else None
    if isinstance(metrics, jax.Array) and metrics.ndim == 0:
        return metrics
    if isinstance(metrics, dict) and "loss" in metrics:
        return jnp.asarray(metrics["loss"])
    if isinstance(metrics, (tuple, list)) and metrics:
        first = metrics[0]
        if isinstance(first, jax.Array) and first.ndim == 0:
            return first
    raise ValueError(
        f"jaxnan.guard: cannot find the loss in the metrics of `{fn_name}` "
        f"({_describe(metrics)}). Return the scalar loss, a dict with a 'loss' "
        "entry, or pass loss='key' or loss=lambda metrics: ... to jaxnan.guard."
    )


def figure(value: float, warned: set[str], fn_name: str) -> float | None:
    """A bad step's loss as its incident reports it: None for a step without one.

    Args:
        value: the loss the compiled step recorded (NaN for a step without
            a loss).
        warned: the notes the guard has warned (`LOSSLESS` among them when
            `fn_name` returns no loss and hands none to its optimizer).
        fn_name: the step's name.

    Examples:
        >>> from jaxnan._src.guard import losses
        >>> warned = {losses.LOSSLESS.format(fn_name="f")}
        >>> losses.figure(float("nan"), warned, "f") is None
        True
        >>> losses.figure(2.5, set(), "f")
        2.5
    """
    return None if LOSSLESS.format(fn_name=fn_name) in warned else value


def _describe(metrics: Any) -> str:
    if isinstance(metrics, dict):
        return f"a dict with keys {sorted(metrics)}"
    shape = getattr(metrics, "shape", None)
    if shape is not None:
        return f"an array of shape {tuple(shape)}"
    return type(metrics).__name__
