"""Fault injection for users' own tests: a NaN, an Inf or a huge value, planted.

A team that relies on `jaxnan.skip_nonfinite` or `jaxnan.guard` wants a CI
test that its loop survives a bad step, rolls back and resumes as
configured. These wrappers plant a `Fault` at chosen steps, in the place a
real one comes from:

* `inject_grads` wraps the optimizer (around `jaxnan.skip_nonfinite`) and
  plants the fault in the gradients, in the graph;
* `inject_loss` wraps the loss function and plants it in the loss value, in
  the graph;
* `inject_rows` wraps the batch iterator and plants it in chosen rows of
  chosen batches, on the host (as a corrupt record does).

In the graph the step is read from `skip_nonfinite`'s ``skip_step`` (the
number of update calls so far, skipped ones included; `fault_step` reads
it): `jaxnan.guard` advances it on a bad step and puts it back on the step it
holds, so a planted fault fires once, with no host sync and no new state.
The guard replays the bad step as it ran, its clock put back by one, so the
fault comes back on replay; the injectors a traced step went through are
noted (`noted`, at trace time: `Planted`), and the guard's incident names
the cause ``injected``: which injector, the `Fault` and the step. After a
``"rollback"`` to a snapshot taken before the faulty step the clock is
restored too and the fault fires again when the run gets there: an
in-graph fault is persistent, like a bug in the model; a fault planted in
the batches is transient, tied to the data position, like a corrupt record
(the loop goes on with the next batch). Megatron's error injector for its
rerun machinery (NVIDIA/Megatron-LM, ``RerunErrorInjector``) draws the same
distinction.
"""

from __future__ import annotations

import contextlib
import enum
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.extend import source_info_util

from jaxnan._src.core import dtypes, validation
from jaxnan._src.transforms import nonfinite

source_info_util.register_exclusion(__file__)


class Fault(enum.Enum):
    """What `inject_grads`, `inject_loss` and `inject_rows` plant.

    ``HUGE`` is the largest finite value of the leaf's dtype: finite itself,
    it makes squares, norms and Adam's second moment overflow (a test of the
    outgoing check of `jaxnan.skip_nonfinite` and of overflow-safe clipping).

    Examples:
        >>> import jaxnan
        >>> jaxnan.Fault("+inf") is jaxnan.Fault.POS_INF
        True

    .. versionadded:: 0.3.0
    """

    NAN = "nan"
    POS_INF = "+inf"
    NEG_INF = "-inf"
    HUGE = "huge"

    def value_for(self, dtype: Any) -> Any:
        """The value planted in an array of `dtype` (a NumPy scalar)."""
        dtype = np.dtype(dtype)
        real = np.zeros((), dtype).real.dtype
        if self is Fault.HUGE:
            v = np.finfo(real).max
        else:
            v = {Fault.NAN: np.nan, Fault.POS_INF: np.inf, Fault.NEG_INF: -np.inf}[self]
        return np.asarray(v, real).astype(dtype)


class Planted(NamedTuple):
    """An in-graph injector that a step went through when it was traced.

    Attributes:
        injector: ``"inject_grads"`` or ``"inject_loss"``.
        fault: the `Fault` it plants.
        at: the steps it fires at.
        on_clock: whether it reads `skip_nonfinite`'s clock (`fault_step`,
            called in the same trace); False when the caller passed another
            ``fault_step`` (a data position), whose value is known only in
            the graph.
    """

    injector: str
    fault: Fault
    at: tuple[int, ...]
    on_clock: bool

    def fires_at(self, clock: int | None) -> bool:
        """Whether it planted its fault on the step whose clock was `clock`."""
        return self.on_clock and clock is not None and clock in self.at

    def text(self, step: int) -> str:
        """``jaxnan.inject_grads planted Fault.POS_INF (+inf) in the gradients ...``."""
        where = "the gradients" if self.injector == "inject_grads" else "the loss"
        what = f"Fault.{self.fault.name} ({self.fault.value})"
        return f"jaxnan.{self.injector} planted {what} in {where} at step {step}"


_NOTING = threading.local()


@contextlib.contextmanager
def noted() -> Iterator[list[Planted]]:
    """Collects the `Planted` injectors of the steps traced inside it.

    Trace time only (nothing in the graph): `jaxnan.guard` traces the bad
    step again for its replay inside this block, so it knows which faults
    the step was given and when they fire.

    Examples:
        >>> import jax, jax.numpy as jnp, optax, jaxnan
        >>> from jaxnan._src.transforms import inject
        >>> tx = jaxnan.inject_grads(jaxnan.skip_nonfinite(optax.sgd(0.1)), at=2)
        >>> p = {"w": jnp.ones(2)}
        >>> with inject.noted() as planted:
        ...     _ = jax.make_jaxpr(tx.update)(p, tx.init(p), p)
        >>> planted[0].text(2), planted[0].fires_at(2)
        ('jaxnan.inject_grads planted Fault.NAN (nan) in the gradients at step 2', True)
    """
    stack = _NOTING.__dict__.setdefault("stack", [])
    found: list[Planted] = []
    stack.append(found)
    try:
        yield found
    finally:
        stack.pop()
        if not stack:
            _NOTING.__dict__.pop("clocks", None)


def _note(planted: Planted) -> None:
    for found in getattr(_NOTING, "stack", ()):
        if planted not in found:
            found.append(planted)


def _note_clock(clock: Any) -> Any:
    """`clock` (a clock `fault_step` returned), remembered while noting."""
    if getattr(_NOTING, "stack", None):
        _NOTING.__dict__.setdefault("clocks", []).append(clock)
    return clock


def _is_clock(value: Any) -> bool:
    """Whether `value` is a clock `fault_step` returned in this trace.

    Compared by identity (the traced value itself): a loss called with
    ``fault_step=jaxnan.fault_step(opt_state)`` reads the guard's clock.
    """
    return any(value is c for c in getattr(_NOTING, "clocks", ()))


def _items(at: Any) -> tuple:
    """`at` as a tuple: an int or a 0-d array is one item; a str is none."""
    if isinstance(at, int | np.integer) or (hasattr(at, "dtype") and np.ndim(at) == 0):
        return (at,)
    if isinstance(at, Iterable) and not isinstance(at, str | bytes):
        return tuple(at)
    return (None,)  # rejected below, as a non-int item


def _is_int(x: Any) -> bool:
    kind = dtypes.leaf_dtype(x)
    return (
        not isinstance(x, bool)
        and kind is not None
        and jnp.issubdtype(kind, jnp.integer)
    )


def _steps(fn: str, at: int | Sequence[int], name: str = "at") -> tuple[int, ...]:
    """`at` (an int, a 0-d integer array, or a sequence of them) as a tuple."""
    items = _items(at)
    if not items:
        raise ValueError(
            f"jaxnan.{fn}: {name} must name at least one step, got {at!r}."
        )
    if not all(map(_is_int, items)):
        raise TypeError(
            f"jaxnan.{fn}: {name} must be an int or a sequence of ints, got {at!r}."
        )
    return tuple(validation.check_int(fn, name, s, low=0) for s in items)


def _fault(fn: str, fault: Fault | str) -> Fault:
    try:
        return Fault(fault)
    except ValueError:
        raise ValueError(
            f"jaxnan.{fn}: unknown fault={fault!r}; use a jaxnan.Fault "
            f"({', '.join(f.name for f in Fault)})."
        ) from None


def _fires(step: jax.Array, at: tuple[int, ...]) -> jax.Array:
    step = jnp.asarray(step)
    fire = jnp.array(False)
    for s in at:
        fire = fire | (step == s)
    return fire


def fault_step(opt_state: optax.OptState) -> jax.Array:
    """The step number the in-graph injectors read: `skip_nonfinite`'s clock.

    The ``skip_step`` of the one `jaxnan.SkipNonfiniteState` in `opt_state`:
    the number of update calls so far (0 at the first), skipped ones
    included. Pass it to a loss wrapped by `inject_loss`.

    Raises:
        TypeError: when `opt_state` holds no `SkipNonfiniteState` (the
            optimizer is not wrapped in `jaxnan.skip_nonfinite`).

    Examples:
        >>> import jax.numpy as jnp, optax, jaxnan
        >>> tx = jaxnan.skip_nonfinite(optax.sgd(0.1))
        >>> int(jaxnan.fault_step(tx.init({"w": jnp.zeros(2)})))
        0

    .. versionadded:: 0.3.0
    """

    def is_skip(x: Any) -> bool:
        return isinstance(x, nonfinite.SkipNonfiniteState)

    found = [
        s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=is_skip) if is_skip(s)
    ]
    if not found:
        raise TypeError(
            "jaxnan.fault_step: the optimizer state holds no "
            "jaxnan.SkipNonfiniteState. The injectors read the step from "
            "skip_nonfinite's clock: wrap the optimizer, e.g. "
            "jaxnan.inject_grads(jaxnan.skip_nonfinite(optax.adam(1e-3)), at=5)."
        )
    return _note_clock(found[0].skip_step)


def _plant_first(x: jax.Array, fire: jax.Array, value: Any) -> jax.Array:
    flat = x.reshape(-1)
    planted = flat.at[0].set(jnp.asarray(value, x.dtype))
    return jnp.where(fire, planted, flat).reshape(x.shape)


def inject_grads(
    inner: optax.GradientTransformation,
    *,
    at: int | Sequence[int],
    fault: Fault | str = Fault.NAN,
) -> optax.GradientTransformationExtraArgs:
    """Plants `fault` in the gradients at steps `at`, before `inner` sees them.

    Wrap the optimizer as it is handed to the train step, around
    `jaxnan.skip_nonfinite`: ``jaxnan.inject_grads(jaxnan.skip_nonfinite(
    optax.adam(1e-3)), at=5)``. At each step of `at` (counted by
    `fault_step`, from 0) the first entry of every floating gradient leaf
    becomes the fault; every other step is `inner` exactly. The state is
    `inner`'s own (no new field: checkpoints and the guard see the state
    they would see without the injector). In the graph, no host sync: a
    select per leaf on a scalar comparison.

    Under `jaxnan.guard` the fault fires once per pass over the step and
    again in the guard's replay of it (the step as it ran): the incident's
    cause is ``injected``, naming the fault and the step; a rollback to a
    snapshot before it makes it fire again (see the module docstring). To
    tie it to the data position instead (a transient fault that a rollback
    does not bring back), pass the clock yourself:
    ``tx.update(g, state, params, fault_step=batch["position"])`` (the
    extra argument is not handed on to `inner`).

    Args:
        inner: the optimizer, holding a `jaxnan.skip_nonfinite`.
        at: the step or steps to fire at (ints >= 0).
        fault: what to plant, a `jaxnan.Fault` (or its value, ``"nan"``).

    Returns:
        An `optax.GradientTransformationExtraArgs` with `inner`'s state.

    Raises:
        TypeError: when `inner` is not an optax transformation, `at` is not
            an int or a sequence of ints, or at the first update when its
            state holds no `SkipNonfiniteState`.
        ValueError: for an empty `at`, a negative step, an unknown `fault`.

    Examples:
        >>> import jax.numpy as jnp, optax, jaxnan
        >>> tx = jaxnan.inject_grads(jaxnan.skip_nonfinite(optax.sgd(0.1)), at=1)
        >>> params = {"w": jnp.ones(2)}
        >>> state = tx.init(params)
        >>> for _ in range(3):
        ...     u, state = tx.update({"w": jnp.ones(2)}, state, params)
        >>> int(state.nonfinite_total), int(state.last_nonfinite_step)
        (1, 1)

    .. versionadded:: 0.3.0
    """
    fn = "inject_grads"
    validation.validate_inner(inner, fn_name=fn)
    steps, fault = _steps(fn, at), _fault(fn, fault)
    inner = optax.with_extra_args_support(inner)

    def update(updates, state, params=None, **extra_args):
        clock = extra_args.pop("fault_step", None)
        _note(Planted(fn, fault, steps, clock is None or _is_clock(clock)))
        fire = _fires(fault_step(state) if clock is None else clock, steps)

        def plant(x):
            if not dtypes.is_checked_leaf(x) or not jnp.size(x):
                return x
            x = jnp.asarray(x)
            return _plant_first(x, fire, fault.value_for(x.dtype))

        return inner.update(
            jax.tree_util.tree_map(plant, updates), state, params, **extra_args
        )

    return optax.GradientTransformationExtraArgs(inner.init, update)


def inject_loss(
    loss_fn: Callable[..., Any],
    *,
    at: int | Sequence[int],
    fault: Fault | str = Fault.NAN,
) -> Callable[..., Any]:
    """`loss_fn` whose loss value is `fault` at steps `at`.

    The wrapped function takes one more keyword argument, ``fault_step``:
    the step number, ``jaxnan.fault_step(opt_state)`` inside the train step.
    At a step of `at` the (scalar) loss, or the first output when `loss_fn`
    returns ``(loss, aux)``, becomes the fault; its gradient is left as it
    is (``loss + stop_gradient(fault - loss)``), so the loss path alone is
    tested: `jaxnan.skip_nonfinite` given ``loss=`` and the guard's loss
    check (`inject_grads` tests the gradients). Works under `jax.grad`,
    `jax.value_and_grad` (``has_aux`` too) and `jax.jit`, with no host sync.

    Args:
        loss_fn: the loss function.
        at: the step or steps to fire at (ints >= 0).
        fault: what to plant, a `jaxnan.Fault` (or its value).

    Returns:
        The wrapped loss function.

    Raises:
        TypeError: when `loss_fn` is not callable, `at` is not an int or a
            sequence of ints, or the loss is called without an int
            ``fault_step``.
        ValueError: for an empty `at`, a negative step, an unknown `fault`.

    Examples:
        >>> import jax, jax.numpy as jnp, jaxnan
        >>> loss = jaxnan.inject_loss(lambda w: jnp.sum(w**2), at=2)
        >>> [float(loss(jnp.ones(2), fault_step=s)) for s in range(3)]
        [2.0, 2.0, nan]
        >>> jax.grad(loss)(jnp.ones(2), fault_step=2)
        Array([2., 2.], dtype=float32)

    .. versionadded:: 0.3.0
    """
    fn = "inject_loss"
    if not callable(loss_fn):
        raise TypeError(
            f"jaxnan.inject_loss(loss_fn) needs a callable, got "
            f"{type(loss_fn).__name__}."
        )
    steps, fault = _steps(fn, at), _fault(fn, fault)

    def wrapped(*args, fault_step=None, **kwargs):
        if fault_step is None:
            raise TypeError(
                "jaxnan.inject_loss: call the wrapped loss with fault_step=, "
                "e.g. loss_fn(params, batch, fault_step=jaxnan.fault_step(opt_state))."
            )
        if not _is_int(fault_step):
            raise TypeError(
                f"jaxnan.inject_loss: fault_step must be an int (the step number, "
                f"jaxnan.fault_step(opt_state)), got {fault_step!r:.40}."
            )
        _note(Planted(fn, fault, steps, _is_clock(fault_step)))
        out = loss_fn(*args, **kwargs)
        loss, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
        loss = jnp.asarray(loss)
        value = jnp.asarray(fault.value_for(loss.dtype))
        fire = _fires(fault_step, steps)
        loss = loss + lax.stop_gradient(jnp.where(fire, value - loss, 0))
        return loss if rest is None else (loss, *rest)

    return wrapped


def _key_matches(path: tuple, leaves: Sequence[str] | None) -> bool:
    if leaves is None:
        return True
    text = jax.tree_util.keystr(path)
    return any(text == k or text == f"[{k!r}]" for k in leaves)


def _plant_rows(x: Any, rows: tuple[int, ...], value: Any) -> Any:
    if isinstance(x, jax.Array):
        return x.at[np.asarray(rows)].set(jnp.asarray(value, x.dtype))
    out = np.array(x, copy=True)  # the loader may reuse its buffer
    out[list(rows)] = value
    return out


def inject_rows(
    batches: Iterable[Any],
    *,
    at: int | Sequence[int],
    rows: int | Sequence[int] = 0,
    fault: Fault | str = Fault.NAN,
    leaves: Sequence[str] | None = None,
) -> Iterator[Any]:
    """Yields `batches`, with `fault` planted in `rows` of the batches `at`.

    A corrupt record: batch number ``i`` (counted from 0 as the iterator
    yields them) is, for ``i`` in `at`, a copy whose rows `rows` (indices on
    the leading axis) are entirely `fault` in every floating leaf, or in the
    leaves named by `leaves` (dict keys such as ``"x"``, or key paths such
    as ``"['x']"``). Other batches pass through untouched (the same
    objects). NumPy leaves are copied on the host (the loader's buffer is
    not written); `jax.Array` leaves get ``x.at[rows].set(...)``, an
    asynchronous device op. With many processes, wrap each process's local
    loader before `jax.make_array_from_process_local_data`: `rows` are then
    local rows.

    Args:
        batches: an iterable of batches (pytrees whose leaves have the batch
            as their leading axis).
        at: the batch number or numbers to corrupt (ints >= 0).
        rows: the row or rows to corrupt.
        fault: what to plant, a `jaxnan.Fault` (or its value).
        leaves: which leaves (a key or a sequence of keys); None: every
            floating leaf.

    Returns:
        An iterator over the batches.

    Raises:
        TypeError: when `at` or `rows` is not an int or a sequence of ints.
        ValueError: for an empty `at`, a negative step or row, an unknown
            `fault`, or when a batch to corrupt has no leaf to plant in.

    Examples:
        >>> import numpy as np, jaxnan
        >>> data = [{"x": np.ones((3, 2), np.float32)} for _ in range(3)]
        >>> out = list(jaxnan.inject_rows(data, at=1, rows=2))
        >>> np.isnan(out[1]["x"]).any(axis=1).tolist(), out[0] is data[0]
        ([False, False, True], True)

    .. versionadded:: 0.3.0
    """
    fn = "inject_rows"
    steps, fault = _steps(fn, at), _fault(fn, fault)
    rows = _steps(fn, rows, "rows")
    if isinstance(leaves, str):  # one key, not its characters
        leaves = (leaves,)
    return _corrupted(iter(batches), steps, rows, fault, leaves)


def _corrupted(
    batches: Iterator[Any],
    steps: tuple[int, ...],
    rows: tuple[int, ...],
    fault: Fault,
    leaves: Sequence[str] | None,
) -> Iterator[Any]:
    for i, batch in enumerate(batches):
        if i not in steps:
            yield batch
            continue
        planted = []

        def plant(path, x, planted=planted, i=i):
            dtype = getattr(x, "dtype", None)
            if (
                dtype is None
                or not jnp.issubdtype(dtype, jnp.inexact)
                or not np.ndim(x)
                or not _key_matches(path, leaves)
            ):
                return x
            if max(rows) >= np.shape(x)[0]:
                raise ValueError(
                    f"jaxnan.inject_rows: rows {rows} out of range for "
                    f"{jax.tree_util.keystr(path)} with {np.shape(x)[0]} rows "
                    f"(batch {i})."
                )
            planted.append(path)
            return _plant_rows(x, rows, fault.value_for(dtype))

        batch = jax.tree_util.tree_map_with_path(plant, batch)
        if not planted:
            raise ValueError(
                f"jaxnan.inject_rows: batch {i} has no floating leaf with rows "
                f"to plant in (leaves={leaves!r})."
            )
        yield batch
