"""The values an event equation received and produced, as fixed-size summaries.

The cause rules (`cause_rules`, `precision_fix`, `causes.describe_generic`)
read an equation's operands through three questions, each answer of a
fixed size whatever the operand's: `Operand.census` (its NaN, +inf, -inf
and finite counts and finite range, asked once), `count` (how many
positions a predicate holds at) and `stats` (for those positions, also the
first one in row-major order, the operands' values there, and the minimum,
maximum and largest magnitude of the first operand over them).

An `Operand` holds either a host array (one process, or a value this
process holds whole: the question is answered in NumPy, in float64, as the
rules always did) or a `jax.Array` spanning processes (`hosts.is_global`):
then the question is one small jitted reduction over the global array, each
device reducing its own shard and XLA combining the partial answers; every
process reads the same few scalars and no operand is ever copied whole to a
host (a 10k x 10k float32 parameter would be 400 MB on every process).
Every process asks the same questions in the same order (the rules run on
the same answers: lock-step), so each reduction is entered by all.

Predicates are functions ``where(xp, *values) -> bool array`` written once
for both: `xp` is ``numpy`` on the host and ``jax.numpy`` on the devices,
and the values are real (the magnitude of a complex operand).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import source_info_util

from jaxnan._src.core import hosts

source_info_util.register_exclusion(__file__)

Where = Callable[..., Any]
"""A predicate ``where(xp, *values) -> bool array`` (see the module docstring)."""


def everywhere(xp: Any, x: Any, *rest: Any) -> Any:
    """Every position."""
    return xp.ones(xp.shape(x), bool)


def finite(xp: Any, x: Any, *rest: Any) -> Any:
    """The finite positions of the first operand."""
    return xp.isfinite(x)


def nonfinite(xp: Any, x: Any, *rest: Any) -> Any:
    """The NaN and +/-inf positions of the first operand."""
    return ~xp.isfinite(x)


def is_nan(xp: Any, x: Any, *rest: Any) -> Any:
    return xp.isnan(x)


def is_posinf(xp: Any, x: Any, *rest: Any) -> Any:
    return xp.isposinf(x)


def is_neginf(xp: Any, x: Any, *rest: Any) -> Any:
    return xp.isneginf(x)


class Stats(NamedTuple):
    """The fixed-size answer of `stats` for one predicate.

    Attributes:
        count: the number of positions where it holds.
        size: the number of positions (of the broadcast operands).
        index: the first such position (row-major), or None for none.
        values: the operands' values there (floats; empty for none).
        min: the minimum of the first operand over them (NaN when one is
            NaN, as NumPy's; NaN for none).
        max: its maximum, likewise.
        abs_max: its largest magnitude, likewise.
    """

    count: int
    size: int
    index: tuple[int, ...] | None
    values: tuple[float, ...]
    min: float
    max: float
    abs_max: float


class Census(NamedTuple):
    """What every rule and description asks of an operand first: its kinds.

    Attributes:
        nan: the number of NaN entries.
        posinf: of +inf entries.
        neginf: of -inf entries.
        finite: of finite entries.
        low: the minimum of the finite entries (NaN for none).
        high: their maximum (NaN for none).
    """

    nan: int
    posinf: int
    neginf: int
    finite: int
    low: float
    high: float

    def extreme(self, high: bool) -> float:
        """The maximum (`high`) or minimum of every entry, as NumPy's."""
        if self.nan or not (self.finite or self.posinf or self.neginf):
            return float("nan")
        if high:
            return np.inf if self.posinf else self.high if self.finite else -np.inf
        return -np.inf if self.neginf else self.low if self.finite else np.inf


class Operand:
    """One value of an event equation, as the cause rules read it.

    Args:
        value: a host array, or a `jax.Array` (read whole unless it spans
            processes, `hosts.is_global`).
        on_device: answer on the devices even when `value` could be read
            whole (tests of the multi-process path on one process).

    Examples:
        >>> import numpy as np
        >>> from jaxnan._src.locate import operands
        >>> x = operands.Operand(np.array([0.0, -2.0, 3.0, np.inf], np.float32))
        >>> x.shape, x.dtype, x.size
        ((4,), dtype('float32'), 4)
        >>> s = operands.stats(lambda xp, v: v <= 0, x)
        >>> s.count, s.index, s.values, s.min
        (2, (0,), (0.0,), -2.0)
    """

    def __init__(self, value: Any, *, on_device: bool = False):
        self.on_device = bool(on_device) or hosts.is_global(value)
        if self.on_device:
            self.value = value
        else:
            self.value = np.asarray(value)
        self.shape = tuple(np.shape(self.value))
        self.dtype = np.dtype(self.value.dtype)
        self.size = int(np.prod(self.shape, dtype=np.int64))
        self.ndim = len(self.shape)
        self._census: Census | None = None

    def __repr__(self) -> str:
        where = "on device" if self.on_device else "on host"
        return f"Operand({self.dtype}{list(self.shape)}, {where})"

    @property
    def is_float(self) -> bool:
        return self.dtype.kind in "fc" or "float" in self.dtype.name

    def census(self) -> Census:
        """Its NaN, +inf, -inf and finite counts and finite range (one pass)."""
        if self._census is None:
            if self.on_device:
                got = _device_census(self.value)
                got = [np.asarray(hosts.read(v)) for v in got]
                counts, (low, high) = [int(c) for c in got[0]], got[1].tolist()
            else:
                x = _real(np, self.value)
                ok = np.isfinite(x)
                counts = [
                    int(np.isnan(x).sum()),
                    int(np.isposinf(x).sum()),
                    int(np.isneginf(x).sum()),
                    int(ok.sum()),
                ]
                low, high = (x[ok].min(), x[ok].max()) if counts[3] else (0.0, 0.0)
            if not counts[3]:
                low = high = float("nan")
            self._census = Census(*counts, float(low), float(high))
        return self._census

    def count(self, where: Where) -> int:
        return count(where, self)

    def min(self, where: Where | None = None) -> float:
        """The minimum where `where` holds (everywhere: from the census)."""
        if where is None:
            return self.census().extreme(high=False)
        return stats(where, self).min

    def max(self, where: Where | None = None) -> float:
        if where is None:
            return self.census().extreme(high=True)
        return stats(where, self).max

    def abs_max(self, where: Where | None = None) -> float:
        if where is None:
            c = self.census()
            if c.nan or not self.size:
                return float("nan")
            return max(abs(self.min()), abs(self.max()))
        return stats(where, self).abs_max

    def first(self, where: Where) -> float | None:
        """The value at the first position where `where` holds (None: none)."""
        got = stats(where, self)
        return got.values[0] if got.count else None

    def constant(self) -> float | None:
        """The one value of a non-empty operand whose entries are all equal."""
        if not self.size:
            return None
        got = stats(everywhere, self)
        same = got.min == got.max  # False when one entry is NaN
        return got.min if same else None

    def eigvalsh_min(self) -> float:
        """The smallest eigenvalue of the symmetrized matrices (last two axes).

        In float64 on the host; in the operand's dtype on the devices.
        """
        if not self.on_device:
            x = _real(np, self.value)
            sym = (x + np.swapaxes(x, -1, -2)) / 2
            return float(np.linalg.eigvalsh(sym).min())
        return float(np.asarray(hosts.read(_eigvalsh_min(self.value))))


def of(value: Any) -> Operand:
    """`value` as an `Operand` (an `Operand` is returned as it is)."""
    return value if isinstance(value, Operand) else Operand(value)


def stats(where: Where, *operands: Any) -> Stats:
    """What the operands hold where `where` holds (see `Stats`).

    The operands broadcast together (an equation's operands have one shape).
    On the host in NumPy float64; on the devices when any operand is there
    (one jitted reduction, read by every process).

    Examples:
        >>> import numpy as np
        >>> from jaxnan._src.locate import operands
        >>> num, den = np.array([1.0, 0.0, 2.0]), np.array([1.0, 0.0, 0.0])
        >>> s = operands.stats(lambda xp, n, d: (d == 0) & (n != 0), num, den)
        >>> s.count, s.index, s.values
        (1, (2,), (2.0, 0.0))
    """
    ops = [of(x) for x in operands]
    if any(o.on_device for o in ops):
        shape = _broadcast_shape(ops)
        if not count(where, *ops):  # one reduction; the rest only if needed
            nan = float("nan")
            return Stats(
                0, int(np.prod(shape, dtype=np.int64)), None, (), nan, nan, nan
            )
        out = _device_stats(_Predicate(where), tuple(o.value for o in ops))
        return _unpack(out, shape, len(ops))
    return _host_stats(where, [o.value for o in ops])


def count(where: Where, *operands: Any) -> int:
    """How many positions of the (broadcast) operands `where` holds at.

    On the devices one reduction: most questions a rule asks are counts,
    and most counts are 0.
    """
    ops = [of(x) for x in operands]
    if any(o.on_device for o in ops):
        got = _device_count(_Predicate(where), tuple(o.value for o in ops))
        return int(np.asarray(hosts.read(got)))
    values = np.broadcast_arrays(*(_real(np, o.value) for o in ops))
    return int(np.asarray(where(np, *values), bool).sum())


def _broadcast_shape(ops: Sequence[Operand]) -> tuple[int, ...]:
    return tuple(np.broadcast_shapes(*(o.shape for o in ops)))


def _real(xp: Any, x: Any) -> Any:
    """A real array to compare: the magnitude of a complex one; bool, int as is.

    On the host, float64 (the rules' arithmetic); on the devices, float32
    or wider (x64 is off there): a float64 bound a predicate compares with
    is rounded to float32, which can differ from the host only for a value
    equal to that rounded bound.
    """
    if xp is np:
        x = np.asarray(x)
        if x.dtype.kind == "c":
            return np.abs(x).astype(np.float64)
        try:
            return x.astype(np.float64)
        except (TypeError, ValueError):
            return np.zeros(x.shape)
    if jnp.iscomplexobj(x):
        x = jnp.abs(x)
    if x.dtype.itemsize < 4 or not jnp.issubdtype(x.dtype, jnp.floating):
        # float16, bfloat16, float8 are exact in float32; compared in their
        # own dtype, a bound such as 1e30 would round to inf first.
        return x.astype(jnp.float32)
    return x


def _host_stats(where: Where, values: Sequence[Any]) -> Stats:
    vals = np.broadcast_arrays(*(_real(np, v) for v in values))
    mask = np.broadcast_to(np.asarray(where(np, *vals), bool), vals[0].shape)
    size = int(mask.size)
    count = int(mask.sum())
    if not count:
        nan = float("nan")
        return Stats(0, size, None, (), nan, nan, nan)
    flat = int(np.flatnonzero(mask.reshape(-1))[0])
    index = tuple(int(i) for i in np.unravel_index(flat, mask.shape))
    first = tuple(float(v.reshape(-1)[flat]) for v in vals)
    picked = vals[0][mask]
    return Stats(
        count,
        size,
        index,
        first,
        float(picked.min()),
        float(picked.max()),
        float(np.abs(picked).max()),
    )


def _linear_index(shape: tuple[int, ...]) -> jax.Array:
    """Row-major position of every element (int32), without a reshape.

    A reshape of a sharded array can move it between devices; iotas are
    computed where each shard lives.
    """
    lin = jnp.zeros(shape, jnp.int32)
    stride = 1
    for d in reversed(range(len(shape))):
        lin = lin + lax.broadcasted_iota(jnp.int32, shape, d) * stride
        stride *= shape[d]
    return lin


class _Predicate:
    """A predicate as a static jit argument: equal to another of the same code.

    A rule builds its predicates anew at each call (``lambda xp, v: v < lo``);
    keyed by their code and the values they close over, the same question
    on the same shapes compiles once.
    """

    def __init__(self, where: Where):
        self.where = where
        code = getattr(where, "__code__", None)
        cells = getattr(where, "__closure__", None) or ()
        try:
            values = tuple(c.cell_contents for c in cells)
            hash(values)
            self.key = (code, values) if code is not None else (where,)
        except (TypeError, ValueError):  # an unhashable or empty cell
            self.key = (where,)

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Predicate) and self.key == other.key

    def __call__(self, *args: Any) -> Any:
        return self.where(*args)


# Elements from which a question runs longer than XLA's default pipeline
# takes to compile it (2-core CPU, 4 devices: at 4M elements a stats
# question compiles in 0.07 s with the block options and runs in 0.25 s;
# at 32M it runs 1.9 s with them, 0.8 s with XLA's defaults, 0.6 s compile).
LARGE = 1 << 24


def _cheap_jit(fn: Callable, **kwargs: Any) -> Callable:
    """`jax.jit` with locate's block options (a quick compile) unless large.

    Each question is a few reductions, compiled once per predicate and
    shape and run once: below `LARGE` elements its compile at XLA's
    defaults costs more than its run, above it the unfused run does.
    """
    from jaxnan._src.locate import blocks  # noqa: PLC0415 - options decided late

    compiled: dict[bool, Callable] = {}

    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        size = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(args[-1]))
        large = size >= LARGE
        if large not in compiled:
            options = {} if large else blocks.compiler_options()
            compiled[large] = jax.jit(fn, compiler_options=options, **kwargs)
        return compiled[large](*args)

    return call


@functools.partial(_cheap_jit, static_argnums=(0,))
def _device_count(where: _Predicate, values: tuple) -> jax.Array:
    vals = jnp.broadcast_arrays(*(_real(jnp, v) for v in values))
    mask = jnp.broadcast_to(jnp.asarray(where(jnp, *vals), bool), vals[0].shape)
    return jnp.sum(mask, dtype=jnp.int32)


@functools.partial(_cheap_jit, static_argnums=(0,))
def _device_stats(where: _Predicate, values: tuple) -> dict[str, jax.Array]:
    vals = jnp.broadcast_arrays(*(_real(jnp, v) for v in values))
    shape = vals[0].shape
    mask = jnp.broadcast_to(jnp.asarray(where(jnp, *vals), bool), shape)
    size = int(np.prod(shape, dtype=np.int64))
    lin = _linear_index(shape)
    first = jnp.min(jnp.where(mask, lin, size), initial=size)
    at = mask & (lin == first)
    x = vals[0]
    nan_in = jnp.any(mask & jnp.isnan(x))
    kept = mask & ~jnp.isnan(x)
    # Never a max/min over values that may hold NaN: on CPU, XLA's float32
    # reductions of 4096 or more elements can skip it. NaN is counted apart.
    low = jnp.min(jnp.where(kept, x, jnp.inf), initial=jnp.inf)
    high = jnp.max(jnp.where(kept, x, -jnp.inf), initial=-jnp.inf)
    mag = jnp.max(jnp.where(kept, jnp.abs(x), -jnp.inf), initial=-jnp.inf)
    return {
        "count": jnp.sum(mask, dtype=jnp.int32),
        "first": first,
        "values": jnp.stack(
            [jnp.sum(jnp.where(at, v, 0)).astype(jnp.float32) for v in vals]
        ),
        "extremes": jnp.stack([low, high, mag]).astype(jnp.float32),
        "nan": nan_in,
    }


def _unpack(out: dict[str, jax.Array], shape: tuple[int, ...], n: int) -> Stats:
    got = {k: np.asarray(hosts.read(v)) for k, v in out.items()}
    size = int(np.prod(shape, dtype=np.int64))
    count = int(got["count"])
    if not count:
        nan = float("nan")
        return Stats(0, size, None, (), nan, nan, nan)
    index = tuple(int(i) for i in np.unravel_index(int(got["first"]), shape))
    low, high, mag = (float(v) for v in got["extremes"])
    if bool(got["nan"]):
        low = high = mag = float("nan")
    values = tuple(float(v) for v in got["values"][:n])
    return Stats(count, size, index, values, low, high, mag)


@_cheap_jit
def _device_census(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = _real(jnp, x)
    ok = jnp.isfinite(x)
    counts = jnp.stack(
        [
            jnp.sum(jnp.isnan(x), dtype=jnp.int32),
            jnp.sum(jnp.isposinf(x), dtype=jnp.int32),
            jnp.sum(jnp.isneginf(x), dtype=jnp.int32),
            jnp.sum(ok, dtype=jnp.int32),
        ]
    )
    low = jnp.min(jnp.where(ok, x, jnp.inf), initial=jnp.inf)
    high = jnp.max(jnp.where(ok, x, -jnp.inf), initial=-jnp.inf)
    return counts, jnp.stack([low, high]).astype(jnp.float32)


@_cheap_jit
def _eigvalsh_min(x: jax.Array) -> jax.Array:
    x = _real(jnp, x)
    sym = (x + jnp.swapaxes(x, -1, -2)) / 2
    return jnp.min(jnp.linalg.eigvalsh(sym))
