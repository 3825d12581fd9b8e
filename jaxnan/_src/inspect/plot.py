"""`plot_stats`: per-layer max-abs and headroom as a bar chart (matplotlib)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import numpy as np
from jax.extend import source_info_util

from jaxnan._src.inspect.activations import LayerStats

source_info_util.register_exclusion(__file__)

_RED, _BLUE = "#d62728", "#1f77b4"


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "jaxnan.plot_stats needs matplotlib: pip install 'jaxnan[plot]' "
            "(or pip install matplotlib)."
        ) from None
    return Figure


def plot_stats(
    stats: Mapping[str, LayerStats],
    path: str | os.PathLike,
    *,
    title: str | None = None,
) -> str:
    """Draws per-layer max |x| and headroom to overflow as bars, saved to PNG.

    Left panel: the largest finite |x| of each layer (log scale). Right
    panel: `LayerStats.headroom`, how many times the values can double
    before they overflow their dtype. Layers flagged
    `LayerStats.near_overflow` are red, layers holding a nonfinite value are
    marked and labelled with the count. The figure is drawn without
    `pyplot` (no global state, no window), with matplotlib imported only
    when this function runs.

    Args:
        stats: the dict returned by `jaxnan.activation_stats`.
        path: where to write the PNG.
        title: optional figure title.

    Returns:
        The path written, as a str.

    Raises:
        ImportError: when matplotlib is not installed (the ``plot`` extra).
        TypeError: when `stats` is not a dict of `LayerStats` (the function
            `activation_stats(fn)` itself, a list, a dict of other values)
            or `path` is not a path.
        ValueError: for an empty `stats`.

    Examples:
        >>> import jax, jax.numpy as jnp, jaxnan, os, tempfile
        >>> def f(params, x):
        ...     with jax.named_scope("layer"):
        ...         return x * params
        >>> x = jnp.ones(4, jnp.float16)
        >>> stats = jaxnan.activation_stats(f)(jnp.float16(100.0), x)
        >>> path = jaxnan.plot_stats(stats, os.path.join(tempfile.mkdtemp(), "s.png"))
        >>> path.endswith("s.png") and os.path.getsize(path) > 0
        True

    .. versionadded:: 0.1.0
    """
    _check_stats(stats)
    try:
        out = os.fspath(path)
    except TypeError:
        raise TypeError(
            f"jaxnan: plot_stats got path={path!r}; pass the PNG file to write, "
            "e.g. 'stats.png'."
        ) from None
    Figure = _figure_class()
    if not stats:
        raise ValueError(
            "jaxnan: plot_stats got no layers; pass the dict returned by "
            "jaxnan.activation_stats(fn)(*args)."
        )
    names = list(stats)
    rows = [stats[k] for k in names]
    colors = [_RED if _flagged(s) else _BLUE for s in rows]
    y = np.arange(len(names))
    fig = Figure(figsize=(11, 1.2 + 0.32 * len(names)), layout="constrained")
    left, right = fig.subplots(1, 2, sharey=True)
    maxabs = np.array([float(s.max_abs) for s in rows])
    left.barh(y, np.where(maxabs > 0, maxabs, np.nan), color=colors)
    _log_axis(left, maxabs)
    left.set_yticks(y, [f"{k}  [{s.dtype}]" for k, s in zip(names, rows)], fontsize=8)
    left.invert_yaxis()
    left.set_xlabel("largest finite |x| (log scale)")
    _headroom_panel(right, rows, colors)
    for ax in (left, right):
        ax.grid(axis="x", alpha=0.3)
    note = "red: near overflow or nonfinite"
    fig.suptitle(f"{title}  ({note})" if title else note)
    fig.savefig(out, dpi=110)
    return out


def _log_axis(ax, values: np.ndarray) -> None:
    """A log x axis that shows every bar and labels only whole decades.

    It runs from a decade below the smallest bar (the default limit starts at
    the smallest one, hiding it) to the decade above the largest, and leaves
    the minor ticks unlabelled (over a short span matplotlib labels them, and
    they overlap).
    """
    from matplotlib.ticker import LogLocator, NullFormatter

    ax.set_xscale("log")
    shown = values[np.isfinite(values) & (values > 0)]
    if shown.size:
        low = math.floor(math.log10(float(shown.min()))) - 1
        high = max(math.ceil(math.log10(float(shown.max()))), low + 2)
        ax.set_xlim(10.0**low, 10.0**high)
    ax.xaxis.set_major_locator(LogLocator(base=10, numticks=8))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _check_stats(stats: object) -> None:
    """Rejects what is not ``activation_stats(fn)(*args)``'s dict, saying why."""
    fix = (
        "pass the dict returned by jaxnan.activation_stats(fn)(*args) (call "
        "the measuring function on the model's arguments first)."
    )
    if callable(stats) and not isinstance(stats, Mapping):
        raise TypeError(f"jaxnan: plot_stats got a function as stats; {fix}")
    if not isinstance(stats, Mapping):
        raise TypeError(
            f"jaxnan: plot_stats got stats of type {type(stats).__name__}; {fix}"
        )
    for key, value in stats.items():
        if not isinstance(value, LayerStats):
            raise TypeError(
                f"jaxnan: plot_stats got stats[{key!r}] of type "
                f"{type(value).__name__}, not a LayerStats; {fix}"
            )


def _flagged(s: LayerStats) -> bool:
    """Near overflow or holding a nonfinite value: drawn red."""
    return bool(s.near_overflow) or int(s.nonfinite) != 0


def _bar_note(s: LayerStats) -> str:
    """The note beside a layer's headroom bar: why it is red or empty."""
    bad = int(s.nonfinite)
    if bad:
        return f" {bad} nonfinite"
    if s.near_overflow:
        return f" {float(s.range_used):.0%} of the {s.dtype} range"
    return "" if math.isfinite(float(s.headroom)) else " all zero"


def _headroom_panel(ax, rows: list[LayerStats], colors: list[str]) -> None:
    """Doublings left before overflow per layer, with the red layers' notes."""
    room = np.array([float(s.headroom) for s in rows])
    doublings = np.where(np.isfinite(room), np.maximum(room, 0.0), 0.0)
    ax.barh(np.arange(len(rows)), doublings, color=colors)
    ax.set_xlabel("headroom: doublings left before overflow, log2(dtype max / max |x|)")
    for i, (d, s) in enumerate(zip(doublings, rows)):
        text = _bar_note(s)
        if text:
            ax.text(d, i, text, va="center", fontsize=8, color=_RED)
