"""Argument validation shared by the public entry points.

Updates, states, losses and hyperparameters; each error names the argument
and the fix.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import source_info_util

from jaxnan._src.core import compat
from jaxnan._src.core.dtypes import is_inexact_dtype, leaf_dtype

source_info_util.register_exclusion(__file__)


def validate_updates(
    updates: Any, *, argname: str = "updates", fn_name: str, allow_empty: bool = False
) -> None:
    """Raises a clear error for update trees that a transform cannot handle.

    Args:
        updates: the tree given by the user.
        argname: the argument name to show in messages.
        fn_name: the public function being called, shown in messages.
        allow_empty: whether a tree without leaves is accepted.

    `None` leaves are accepted and left alone, as optax does: they mark the
    entries that `equinox.filter(model, equinox.is_array)` filtered out.

    Raises:
        ValueError: for None or an empty tree.
        TypeError: for non-array, integer or boolean leaves.
    """
    if updates is None:
        raise ValueError(
            f"jaxnan: {fn_name} got {argname}=None. Pass the gradient pytree "
            "(for example the second output of jax.value_and_grad)."
        )
    flat, _ = jax.tree_util.tree_flatten_with_path(updates)
    if not flat and not allow_empty:
        raise ValueError(
            f"jaxnan: {fn_name} got an empty {argname} tree "
            f"({jax.tree_util.tree_structure(updates)}). Pass the gradient pytree; "
            "a model with no parameters has nothing to guard."
        )
    for path, leaf in flat:
        where = f"{argname}{jax.tree_util.keystr(path)}"
        dtype = leaf_dtype(leaf)
        if dtype is None:
            raise TypeError(
                f"jaxnan: {fn_name} found a non-array leaf at {where} "
                f"({type(leaf).__name__}). Updates must be arrays."
            )
        if dtype == jax.dtypes.float0:
            continue
        if not is_inexact_dtype(dtype):
            raise TypeError(
                f"jaxnan: {fn_name} found {where} with dtype {dtype}; gradient "
                "transformations need floating-point updates. Keep integer and "
                "boolean values out of the trainable parameters (for example "
                "with optax.masked or by splitting them off the params tree)."
            )


def validate_same_structure(
    a: Any, b: Any, *, name_a: str, name_b: str, fn_name: str
) -> None:
    """Raises ValueError when two trees do not have the same structure."""
    ta = jax.tree_util.tree_structure(a)
    tb = jax.tree_util.tree_structure(b)
    if ta != tb:
        raise ValueError(
            f"jaxnan: {fn_name}: {name_a} and {name_b} have different tree "
            f"structures:\n  {name_a}: {ta}\n  {name_b}: {tb}\n"
            f"Pass the {name_a} that match the {name_b} given to init."
        )


def inner_accepts(
    update: Callable,
    updates: Any,
    state: Any,
    params: Any,
    extra_args: dict,
    *,
    init: Callable | None = None,
    fn_name: str = "",
) -> bool:
    """Whether a wrapper's inner update takes these arguments.

    True when ``update(updates, state, params, **extra_args)`` traces
    (`jax.eval_shape`) and, given params, returns updates of their structure
    (``optax.lookahead`` takes gradients of the fast params and returns
    updates of its ``LookaheadParams``). False when it fails and the state
    is not one that `init` makes for these params, or when it traces but
    returns a state of other shapes (gradients that broadcast against the
    moments): the caller's complaint about a leaf's shape then stands.

    Raises:
        TypeError, ValueError: the inner update's own error, chained, when it
            fails although `state` has the shapes ``init(params)`` gives
            (so the shapes are not the cause: ``optax.lbfgs``'s line search
            refusing an extra argument its ``value_fn`` does not take). The
            message names the wrapper and the extra arguments it forwarded.
    """
    try:
        out, new_state = jax.eval_shape(
            lambda: update(updates, state, params, **extra_args)
        )
    except (TypeError, ValueError) as e:
        if (
            init is None
            or (params is not None and not _same_shapes(updates, params))
            or not _state_fits(init, updates if params is None else params, state)
        ):
            return False
        forwarded = ", ".join(f"{k}=" for k in sorted(extra_args)) or "none"
        hint = ""
        if "loss" in extra_args and "loss" in str(e):
            hint = (
                " The wrapper passes its `loss=` on to the inner transformation "
                "(jaxnan's skip_spikes and dynamic_loss_scale read it there); "
                "optax's line searches (optax.lbfgs) pass unknown extra arguments "
                "on to `value_fn`: give it the keyword, "
                "`def value_fn(params, loss=None)`, or `**kwargs`."
            )
        cls = TypeError if isinstance(e, TypeError) else ValueError
        raise cls(
            f"jaxnan.{fn_name}: the inner transformation's update fails on these "
            f"arguments (the state fits the params; extra arguments forwarded: "
            f"{forwarded}): {type(e).__name__}: {e}{hint}"
        ) from e
    if not _same_shapes(new_state, state):
        # It traced by broadcasting (gradients of shape (4, 1) against (4,)
        # moments): the state, the updates and then the params would grow.
        return False
    return params is None or jax.tree_util.tree_structure(
        out
    ) == jax.tree_util.tree_structure(params)


def _state_fits(init: Callable, params: Any, state: Any) -> bool:
    """Whether `state` has the structure and leaf shapes of ``init(params)``."""
    try:
        fresh = jax.eval_shape(init, params)
    except (TypeError, ValueError):
        return False
    return _same_shapes(fresh, state)


def _same_shapes(a: Any, b: Any) -> bool:
    """Whether two trees have one structure and the same leaf shapes."""
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    return tree_a == tree_b and all(
        np.shape(x) == np.shape(y) for x, y in zip(leaves_a, leaves_b, strict=True)
    )


def validate_inner(inner: Any, *, fn_name: str) -> None:
    """Raises TypeError when `inner` is not an optax gradient transformation."""
    if not (hasattr(inner, "init") and hasattr(inner, "update")):
        raise TypeError(
            f"jaxnan.{fn_name}: inner must be an optax GradientTransformation, got "
            f"{type(inner).__name__}. Example: {fn_name}(optax.adamw(1e-3))."
        )


def is_traced(x: Any) -> bool:
    """True for a tracer (inside jit, vmap, grad or scan), False for a value."""
    return isinstance(x, compat.Tracer)


def validate_state(state: Any, expected: type, *, fn_name: str) -> None:
    """Raises TypeError when `state` is not the state of this transform."""
    if not isinstance(state, expected):
        raise TypeError(
            f"jaxnan: {fn_name}.update got state of type {type(state).__name__}, "
            f"expected {expected.__name__}. Pass the state returned by this "
            "transform's init (or by its previous update), not the state of "
            "another optimizer."
        )


def validate_same_shapes(
    updates: Any, params: Any, *, fn_name: str, name_b: str = "params"
) -> None:
    """Raises ValueError naming the first leaf whose shape differs from `params`.

    The trees must already have the same structure.
    """
    flat_u, _ = jax.tree_util.tree_flatten_with_path(updates)
    flat_p = jax.tree_util.tree_leaves(params)
    for (path, u), p in zip(flat_u, flat_p):
        su, sp = np.shape(u), np.shape(p)
        if su != sp:
            raise ValueError(
                f"jaxnan: {fn_name}: updates{jax.tree_util.keystr(path)} has shape "
                f"{su}, but {name_b}{jax.tree_util.keystr(path)} has shape {sp}. "
                "Pass the gradients of the same params (one gradient entry per "
                "parameter entry)."
            )


def validate_update_call(
    updates: Any,
    state: Any,
    expected: type,
    *,
    params: Any = None,
    mirror: str | None = None,
    extra_args: dict | None = None,
    inner_accepts: Callable[[], bool] | None = None,
    fn_name: str,
) -> None:
    """The checks at the top of every jaxnan transform's ``update``.

    In order: `state` is an `expected` (the transform's own state); `updates`
    is a tree of floating arrays (None leaves allowed); `params`, when given,
    has the structure and leaf shapes of `updates`; the state field named
    `mirror` (one entry per parameter leaf, such as per-leaf counters), when
    given, has the structure of `updates`; the leaves of `state` that
    mirror the params (an optimizer's moments, a `MultiSteps` accumulator)
    have their shapes; and the extra argument ``loss=`` is numeric.

    A wrapper passes `inner_accepts`, which says whether its inner
    transformation traces on these arguments (``jax.eval_shape`` of its
    update): a params tree or a state that does not mirror the updates is
    then accepted when the inner optimizer accepts it (``optax.lookahead``
    takes ``LookaheadParams``, ``optax.adafactor``'s factored moments and
    ``optax.lbfgs``'s memory have other shapes), and rejected, naming the
    leaf, when it does not. It is called only when a check fails.

    Raises:
        TypeError: for a state of another transform, non-floating update
            leaves or a non-numeric loss.
        ValueError: for an empty updates tree, another tree structure, or a
            leaf of another shape (naming the leaf's path and both shapes).
    """
    validate_state(state, expected, fn_name=fn_name)
    validate_updates(updates, fn_name=fn_name)
    if mirror is not None:
        validate_same_structure(
            updates,
            getattr(state, mirror),
            name_a="updates",
            name_b="params",
            fn_name=fn_name,
        )
    same = params is None or jax.tree_util.tree_structure(
        updates
    ) == jax.tree_util.tree_structure(params)
    if same and params is not None:  # one gradient entry per parameter entry
        validate_same_shapes(updates, params, fn_name=fn_name)
    try:
        if not same:
            validate_same_structure(
                updates, params, name_a="updates", name_b="params", fn_name=fn_name
            )
        validate_state_shapes(updates, state, fn_name=fn_name)
    except ValueError:
        if inner_accepts is None or not inner_accepts():
            raise
    loss = (extra_args or {}).get("loss")
    if loss is not None:
        validate_loss(loss, fn_name=fn_name)


def validate_state_shapes(updates: Any, state: Any, *, fn_name: str) -> None:
    """Raises ValueError when a part of `state` that mirrors `updates` differs.

    A part mirrors the updates when it has their tree structure and holds at
    least one non-scalar array (per-leaf scalar counters have the structure
    too, and are not compared): Adam's ``mu`` and ``nu``, a momentum trace,
    a `MultiSteps` accumulator. Gradients of another model would otherwise
    fail deep inside the optimizer's arithmetic, with no word of the leaf.
    """
    u_def = jax.tree_util.tree_structure(updates)
    u_flat, _ = jax.tree_util.tree_flatten_with_path(updates)
    if not u_flat or all(np.ndim(u) == 0 for _, u in u_flat):
        return
    parts: list[tuple[Any, Any]] = []

    def mirrors(x: Any) -> bool:
        return (
            x is not updates
            and not isinstance(x, jax.Array | np.ndarray)
            and jax.tree_util.tree_structure(x) == u_def
        )

    def visit(path: Any, x: Any) -> None:
        if mirrors(x):
            parts.append((path, x))

    jax.tree_util.tree_map_with_path(visit, state, is_leaf=mirrors)
    for path, part in parts:
        leaves = jax.tree_util.tree_leaves(part)
        if not any(np.ndim(x) for x in leaves):
            continue
        for (leaf_path, u), x in zip(u_flat, leaves):
            su, sx = np.shape(u), np.shape(x)
            if su != sx:
                where = jax.tree_util.keystr(leaf_path)
                raise ValueError(
                    f"jaxnan: {fn_name}: updates{where} has shape {su}, but the "
                    f"optimizer state's state{jax.tree_util.keystr(path)}{where} "
                    f"has shape {sx}. Pass the gradients of the params given to "
                    "init (one gradient entry per parameter entry), or init "
                    "the optimizer again for the new params."
                )


def validate_loss(loss: Any, *, fn_name: str) -> None:
    """Raises TypeError unless `loss` is a tree of numeric arrays or numbers.

    A string such as ``loss="nan"`` would otherwise be ignored by the
    finiteness test without a word.
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(loss)[0]:
        dtype = leaf_dtype(leaf)
        if dtype is None or not (
            is_inexact_dtype(dtype) or jnp.issubdtype(dtype, jnp.integer)
        ):
            raise TypeError(
                f"jaxnan: {fn_name} got loss{jax.tree_util.keystr(path)} of type "
                f"{type(leaf).__name__} ({leaf!r:.40}); the extra argument loss= "
                "must be the numeric loss of the step (a scalar array), so that a "
                "NaN or Inf loss skips the step."
            )


# --------------------------------------------------------------------------
# Hyperparameter validation, whatever the Python or array type of the value.


def _is_kind(value: Any, kind: str) -> bool:
    """Whether a concrete value is of `kind`: "int", or "number" (int or float).

    Booleans are neither.
    """
    dtype = leaf_dtype(value)
    if dtype is None or dtype == np.dtype(bool) or isinstance(value, bool):
        return False
    if kind == "int":
        return bool(jnp.issubdtype(dtype, jnp.integer))
    return bool(
        jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)
    )


def _range_text(
    low: float | None, high: float | None, low_open: bool, high_open: bool
) -> str:
    """'> 0 and <= 1' for the bounds of a range; empty when unbounded."""
    lo = "" if low is None else ("> " if low_open else ">= ") + f"{low}"
    hi = "" if high is None else ("< " if high_open else "<= ") + f"{high}"
    return " and ".join(s for s in (lo, hi) if s)


def _out_of_range(
    x: float, low: float | None, high: float | None, low_open: bool, high_open: bool
) -> bool:
    """Whether `x` is below `low` or above `high` (each bound may be None)."""
    below = low is not None and (x <= low if low_open else x < low)
    above = high is not None and (x >= high if high_open else x > high)
    return below or above


def _concrete_scalar(fn: str, name: str, value: Any, kind: str, fix: str = "") -> Any:
    """`value` as a NumPy scalar, None for a tracer; TypeError for non-scalars.

    Python numbers, NumPy scalars and 0-d NumPy or JAX arrays are accepted
    (`optax.inject_hyperparams` passes arrays). A tracer (a hyperparameter
    computed inside `jit`) cannot be checked at trace time: None.
    """
    if is_traced(value):
        if np.shape(value) != ():
            raise TypeError(
                f"jaxnan.{fn}: {name} must be a scalar, got shape {np.shape(value)}."
            )
        return None
    if not _is_kind(value, kind):
        want = "an int" if kind == "int" else "a real number"
        raise TypeError(
            _ended(
                f"jaxnan.{fn}: {name} must be {want}, got {type(value).__name__} "
                f"({value!r:.60}).",
                fix,
            )
        )
    arr = np.asarray(value)
    if arr.shape != ():
        raise TypeError(
            f"jaxnan.{fn}: {name} must be a scalar, got an array of shape {arr.shape}."
        )
    return arr[()]


def check_number(
    fn: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = True,
    high_open: bool = True,
    fix: str = "",
) -> None:
    """Validates a real hyperparameter: finite, within (low, high).

    Accepts Python numbers, NumPy scalars and 0-d arrays; NaN, +-Inf and
    booleans are rejected. A traced value is not checked (it has no value
    at trace time). `fix`, when given, ends the message (what to pass).

    Raises:
        TypeError: for a non-number (a string, a bool, an array of shape > 0).
        ValueError: for NaN, +-Inf or a value out of range, naming `name`.
    """
    v = _concrete_scalar(fn, name, value, "number", fix)
    if v is None:
        return
    x = float(v)
    if math.isfinite(x) and not _out_of_range(x, low, high, low_open, high_open):
        return
    rng = _range_text(low, high, low_open, high_open)
    if not math.isfinite(x):
        rng = f"finite ({rng})" if rng else "finite"
    raise ValueError(_ended(f"jaxnan.{fn}: {name} must be {rng}, got {value!r}.", fix))


def check_int(fn: str, name: str, value: Any, *, low: int, fix: str = "") -> int:
    """Validates an int hyperparameter (Python, NumPy or 0-d array) >= `low`.

    Returns it as a Python int. `fix`, when given, ends the message.

    Raises:
        TypeError: for a non-integer (a float, a bool, a string).
        ValueError: for a value below `low`, naming `name`.
    """
    v = _concrete_scalar(fn, name, value, "int", fix)
    if v is None:
        raise TypeError(
            f"jaxnan.{fn}: {name} must be a concrete int (it sets array shapes "
            "or loop counts), not a traced value."
        )
    if int(v) < low:
        raise ValueError(
            _ended(f"jaxnan.{fn}: {name} must be an int >= {low}, got {value!r}.", fix)
        )
    return int(v)


def check_axis_name(fn: str, value: Any) -> None:
    """Validates an `axis_name` option: None, a str, or a tuple of str.

    An int would be taken by `lax.psum` for a positional axis of each array
    and fail deep inside ("Too many indices").

    Raises:
        TypeError: for anything else, naming the option and the fix.
    """
    if value is None or isinstance(value, str):
        return
    if isinstance(value, tuple) and value and all(isinstance(v, str) for v in value):
        return
    raise TypeError(
        f"jaxnan.{fn}: axis_name must be a str (the name given to shard_map's "
        f"mesh or pmap's axis_name), a tuple of them, or None, got {value!r}."
    )


def check_bool(fn: str, name: str, value: Any) -> None:
    """Raises TypeError unless `value` is True or False (a NumPy bool too)."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"jaxnan.{fn}: {name} must be True or False, got {value!r}.")


def _ended(message: str, fix: str) -> str:
    """`message` followed by `fix` when there is one."""
    return f"{message} {fix}" if fix else message


# --------------------------------------------------------------------------


def argument_names(fn: Callable, nargs: int) -> list[str]:
    """The names of the first `nargs` positional parameters of `fn`.

    ``args[i]`` where `fn` has no such named parameter (``*args``, builtins).
    """
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = []
    for i in range(nargs):
        if i < len(params) and params[i].kind in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            names.append(params[i].name)
        else:
            names.append(f"args[{i}]")
    return names
