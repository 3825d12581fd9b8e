"""`activation_stats(fn)(*args)`: per-layer statistics of a forward pass."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core
from jax.extend import source_info_util

from jaxnan._src.inspect import layers

source_info_util.register_exclusion(__file__)

_NAME = "jaxnan.activation_stats"
GRAD_SUFFIX = " (grad)"

# Call-like primitives whose body is evaluated inline, so that the layers
# inside a `jit`, `checkpoint` or custom-derivative function are seen.
_INLINE = frozenset(
    "jit pjit closed_call core_call checkpoint remat custom_jvp_call "
    "custom_vjp_call custom_vjp_call_jaxpr".split()
)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=[
        "max_abs",
        "mean",
        "std",
        "zero_fraction",
        "nonfinite",
        "range_used",
        "headroom",
        "near_overflow",
    ],
    meta_fields=["dtype", "phase", "equations"],
)
@dataclasses.dataclass(frozen=True)
class LayerStats:
    """Statistics of one layer's intermediates (`jaxnan.activation_stats`).

    The array fields are scalars (a pytree, so it leaves `jit`); `dtype`,
    `phase` and `equations` are static.

    Attributes:
        max_abs: float32, the largest finite |x| over every intermediate
            the layer computes.
        mean: float32, mean of the finite entries of the layer's output
            (the last value it computes).
        std: float32, their standard deviation.
        zero_fraction: float32, fraction of exact zeros in the output (dead
            units after a ReLU).
        nonfinite: int32, NaN, +Inf and -Inf entries over every
            intermediate of the layer.
        range_used: float32, `max_abs` over the largest finite value of the
            intermediate's dtype (the largest ratio over the layer); 1.0 is
            overflow.
        headroom: float32, the largest finite value of the dtype over
            `max_abs` (``1 / range_used``, computed without flushing tiny
            ratios to zero): the factor left before overflow (+Inf for an
            all-zero layer).
        near_overflow: bool, ``range_used >= near_overflow`` (the argument
            of `activation_stats`).
        dtype: the narrowest floating dtype among the layer's intermediates.
        phase: ``"forward"``, or ``"backward"`` for equations made by
            transposition (under `jax.grad`; their key ends in " (grad)").
        equations: how many equations were measured for this layer.
    """

    max_abs: jax.Array
    mean: jax.Array
    std: jax.Array
    zero_fraction: jax.Array
    nonfinite: jax.Array
    range_used: jax.Array
    headroom: jax.Array
    near_overflow: jax.Array
    dtype: str = "float32"
    phase: str = "forward"
    equations: int = 0

    def __str__(self) -> str:
        used = float(self.range_used)
        bad = int(self.nonfinite)
        share = f"{used:.0%}" if used >= 0.01 else f"{used * 100:.1g}%"
        text = (
            f"max |x| = {float(self.max_abs):.3g}, {share} of the {self.dtype} "
            f"range; mean {float(self.mean):.3g}, std {float(self.std):.3g}, "
            f"zeros {float(self.zero_fraction):.0%}"
        )
        if bad:
            text += f", {bad} nonfinite"
        return text


class _Layer:
    """Host-side accumulator of one layer during tracing."""

    def __init__(self, phase: str):
        self.phase = phase
        self.max_abs: list[jax.Array] = []
        self.used: list[jax.Array] = []
        self.room: list[jax.Array] = []
        self.nonfinite: list[jax.Array] = []
        self.dtype_max = np.inf
        self.dtype = "float32"
        self.last: jax.Array | None = None
        self.equations = 0

    def add(self, floats: list[jax.Array]) -> None:
        """Adds one equation's floating outputs."""
        for x in floats:
            finite = jnp.isfinite(x)
            m = jnp.max(jnp.where(finite, jnp.abs(x), 0)).astype(jnp.float32)
            top = float(jnp.finfo(x.dtype).max)
            top32 = np.float32(min(top, np.finfo(np.float32).max))
            self.max_abs.append(m)
            self.used.append(m / top32)
            self.room.append(jnp.where(m > 0, top32 / m, jnp.inf))
            self.nonfinite.append(jnp.sum(~finite, dtype=jnp.int32))
            if top < self.dtype_max:
                self.dtype_max, self.dtype = top, str(x.dtype)
        self.last = floats[0]
        self.equations += 1


def _float_dtype(aval: Any) -> bool:
    dtype = getattr(aval, "dtype", None)
    return dtype is not None and bool(jnp.issubdtype(dtype, jnp.floating))


def _sub_jaxpr(eqn: Any) -> tuple[Any, Sequence[Any]] | None:
    """(jaxpr, consts) of an inlinable call primitive, else None."""
    if eqn.primitive.name not in _INLINE:
        return None
    for v in eqn.params.values():
        if isinstance(v, jex_core.ClosedJaxpr):
            jaxpr, consts = v.jaxpr, v.consts
        elif isinstance(v, jex_core.Jaxpr):
            jaxpr, consts = v, ()
        else:
            continue
        if len(jaxpr.invars) == len(eqn.invars) and len(jaxpr.outvars) == len(
            eqn.outvars
        ):
            return jaxpr, consts
    return None


def _bind(eqn: Any, invals: list) -> Any:
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns: tuple = ()
    if isinstance(params, tuple):  # jax < 0.5 returned (subfuns, params)
        subfuns, params = params
    with source_info_util.user_context(
        eqn.source_info.traceback, name_stack=eqn.source_info.name_stack
    ):
        return eqn.primitive.bind(*subfuns, *invals, **params)


# Provenance of a value: DATA (depends on a non-parameter argument), CONST
# (literals and constants only) or the name of the parameter's layer.
DATA = None
CONST = ""


class _Entry(NamedTuple):
    """One measured equation, named once the whole jaxpr has been seen."""

    eqn: Any
    scope: str
    param: str
    site: tuple
    line: str
    backward: bool
    values: list


class Walker:
    """Evaluates a jaxpr equation by equation and measures every layer.

    Attributes:
        entries: the measured equations, in program order.
        names: id(eqn) -> layer key, for every measured equation (filled by
            `results`).
    """

    def __init__(self) -> None:
        self.entries: list[_Entry] = []
        self.names: dict[int, str] = {}

    def run(self, jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], provs):
        """Evaluates `jaxpr` on `args` (with their provenances); the outputs."""
        return self._walk(jaxpr, consts, args, provs, "", False, None)

    def _walk(self, jaxpr, consts, args, provs, scope, backward, outer):
        env: dict[Any, tuple[Any, Any]] = {}
        for v, x in zip(jaxpr.constvars, consts):
            env[v] = (x, CONST)
        for v, x, p in zip(jaxpr.invars, args, provs):
            env[v] = (x, p)

        def read(v):
            if isinstance(v, jex_core.Literal):
                return v.val, CONST
            return env[v]

        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            invals = [x for x, _ in ins]
            in_provs = [p for _, p in ins]
            bwd = backward or layers.is_backward(eqn.source_info.name_stack)
            where = layers.call_site(eqn.source_info)
            if where is None:  # inside a library jit traced elsewhere
                where = outer
            eqn_scope = layers.join(
                scope, layers.scope_path(eqn.source_info.name_stack)
            )
            sub = _sub_jaxpr(eqn)
            if sub is not None:
                outs = self._walk(
                    sub[0], sub[1], invals, in_provs, eqn_scope, bwd, where
                )
                for v, (x, p) in zip(eqn.outvars, outs):
                    env[v] = (x, p)
                continue
            outs = _bind(eqn, invals)
            if not eqn.primitive.multiple_results:
                outs = [outs]
            data = any(p is DATA for p in in_provs) or not eqn.invars
            if data:
                out_prov = DATA
            else:
                out_prov = next((p for p in in_provs if p), CONST)
            for v, x in zip(eqn.outvars, outs):
                env[v] = (x, out_prov)
            if data and eqn.invars and eqn.primitive.name not in layers.STRUCTURAL:
                floats = [
                    x
                    for v, x in zip(eqn.outvars, outs)
                    if _float_dtype(v.aval) and x.size
                ]
                if floats:
                    site, line = where if where is not None else ((), "?")
                    param = next((p for p in in_provs if p), "")
                    self.entries.append(
                        _Entry(eqn, eqn_scope, param, site, line, bwd, floats)
                    )
        return [read(v) for v in jaxpr.outvars]

    def _name(self, e: _Entry, site_params: dict) -> str:
        if e.scope and not (e.param and "." in e.scope):
            name = e.scope
        elif e.param:  # Equinox scopes are class names: its field path is unique
            name = e.param
        elif len(site_params.get(e.site, ())) == 1:
            (name,) = site_params[e.site]  # same call as a parameter's layer
        else:
            name = e.line
        return name + GRAD_SUFFIX if e.backward else name

    def results(self, near_overflow: float) -> dict[str, LayerStats]:
        """The per-layer statistics, forward layers first, in program order."""
        site_params: dict[tuple, set[str]] = {}
        for e in self.entries:
            if e.param and e.site:
                site_params.setdefault(e.site, set()).add(e.param)
        groups: dict[str, _Layer] = {}
        for e in self.entries:
            name = self._name(e, site_params)
            self.names[id(e.eqn)] = name
            layer = groups.get(name)
            if layer is None:
                phase = "backward" if e.backward else "forward"
                layer = groups[name] = _Layer(phase)
            layer.add(e.values)
        order = sorted(groups, key=lambda k: groups[k].phase == "backward")
        return {k: _finish(groups[k], near_overflow) for k in order}


def _finish(layer: _Layer, near_overflow: float) -> LayerStats:
    x = layer.last
    finite = jnp.isfinite(x)
    acc = jnp.promote_types(x.dtype, jnp.float32)
    n = jnp.maximum(jnp.sum(finite, dtype=jnp.int32), 1).astype(acc)
    xf = jnp.where(finite, x, 0).astype(acc)
    mean = jnp.sum(xf) / n
    dev = jnp.where(finite, xf - mean, 0)
    std = jnp.sqrt(jnp.sum(dev * dev) / n)
    zeros = jnp.sum(x == 0, dtype=jnp.int32) / x.size
    used = functools.reduce(jnp.maximum, layer.used)
    return LayerStats(
        max_abs=functools.reduce(jnp.maximum, layer.max_abs),
        mean=mean.astype(jnp.float32),
        std=std.astype(jnp.float32),
        zero_fraction=zeros.astype(jnp.float32),
        nonfinite=sum(layer.nonfinite),
        range_used=used,
        headroom=functools.reduce(jnp.minimum, layer.room).astype(jnp.float32),
        near_overflow=used >= near_overflow,
        dtype=layer.dtype,
        phase=layer.phase,
        equations=layer.equations,
    )


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def trace(fn: Callable, args: tuple, kwargs: dict, argnums: tuple[int, ...]):
    """(closed jaxpr, dynamic leaves, their provenances) of ``fn(*args)``.

    Array leaves are traced; every other leaf (Equinox's functions, Python
    numbers) stays static. Leaves of the arguments in `argnums` are
    parameters, named by their layer; the rest is data.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path((args, kwargs))
    leaves = [x for _, x in flat]
    dyn = [i for i, x in enumerate(leaves) if _is_array(x)]
    provs = []
    for i in dyn:
        path = flat[i][0]
        arg = getattr(path[1], "idx", None)
        is_param = getattr(path[0], "idx", None) == 0 and arg in argnums
        provs.append((layers.param_layer(path[2:]) or CONST) if is_param else DATA)

    def flat_fn(*xs):
        full = list(leaves)
        for i, x in zip(dyn, xs):
            full[i] = x
        a, kw = jax.tree_util.tree_unflatten(treedef, full)
        return fn(*a, **kw)

    closed = jax.make_jaxpr(flat_fn)(*[leaves[i] for i in dyn])
    return closed, [leaves[i] for i in dyn], provs


def activation_stats(
    fn: Callable,
    *,
    params_argnums: int | Sequence[int] = 0,
    near_overflow: float = 0.25,
) -> Callable[..., dict[str, LayerStats]]:
    """Per-layer statistics of the intermediate values of ``fn(*args)``.

    ``jaxnan.activation_stats(fn)(*args)`` traces `fn` to a jaxpr and
    evaluates it equation by equation inside one `jax.jit` program that also
    reduces every intermediate, so the model's code is not changed and runs
    once. Each layer gets the largest finite |x| over what it computes, its
    nonfinite count, how much of its dtype's range it uses (float16 and
    bfloat16 activations close to overflow are flagged by
    `LayerStats.near_overflow`) and the mean, standard deviation and
    fraction of zeros of its output.

    Layers are named by the model where it has names: the scopes of the
    name stack (Flax linen module paths, `jax.named_scope`), else the
    parameter an equation consumes (Flax NNX attribute paths such as
    ``linear1``, Equinox field paths such as ``layers/0``), else the user's
    source line (``model.py:12 (__call__)``), so an activation function
    without parameters is named by its line. Equations made by `jax.grad`'s
    transposition are gradients: their key ends in ``" (grad)"``.

    Only equations that depend on a data argument are measured (weight-only
    computations are weights, see `jaxnan.param_stats`), and ops that only
    move entries (reshape, transpose, slice, ...) are skipped. Call-like
    primitives (`jit`, `checkpoint`, custom derivatives) are evaluated
    inline; `scan`, `while`, `cond` and `shard_map` are measured on their
    outputs as one equation.

    Cost: one compile, and one run at most 2x a plain forward pass on the
    small transformer LM of `benchmarks/inspect_cost.py` (one fused
    max/count reduction per intermediate).

    Args:
        fn: the function to measure, e.g. ``lambda model, x: model(x)``.
        params_argnums: positions of the arguments holding the parameters
            (the model): their leaves name layers and are not data.
        near_overflow: the fraction of the dtype's range at which a layer is
            flagged (0.25: two doublings from overflow).

    Returns:
        A function taking `fn`'s arguments and returning a dict from layer
        name to `LayerStats`, forward layers first, in program order.

    Raises:
        TypeError: when `fn` is not callable.
        ValueError: for a `near_overflow` outside (0, 1] or bad
            `params_argnums`.

    Examples:
        >>> import jax, jax.numpy as jnp, jaxnan
        >>> def mlp(params, x):
        ...     with jax.named_scope("hidden"):
        ...         h = jax.nn.relu(x @ params["w1"])
        ...     with jax.named_scope("out"):
        ...         return h @ params["w2"]
        >>> params = {"w1": -jnp.ones((3, 4)), "w2": jnp.ones((4, 2))}
        >>> stats = jaxnan.activation_stats(mlp)(params, jnp.ones((2, 3)))
        >>> list(stats)
        ['hidden', 'out']
        >>> float(stats["hidden"].max_abs), float(stats["hidden"].zero_fraction)
        (3.0, 1.0)

    .. versionadded:: 0.1.0
    """
    if not callable(fn):
        raise TypeError(
            f"jaxnan: {_NAME}(fn) needs a callable, got {type(fn).__name__}; use "
            "jaxnan.activation_stats(lambda model, x: model(x))(model, x)."
        )
    if not 0 < near_overflow <= 1:
        raise ValueError(
            f"jaxnan: {_NAME} got near_overflow={near_overflow!r}; pass a "
            "fraction of the dtype's range in (0, 1], e.g. 0.25."
        )
    if isinstance(params_argnums, int):
        params_argnums = (params_argnums,)
    argnums = tuple(params_argnums)
    if not all(isinstance(i, int) and i >= 0 for i in argnums):
        raise ValueError(
            f"jaxnan: {_NAME} got params_argnums={params_argnums!r}; pass "
            "non-negative argument positions, e.g. 0 for fn(model, x)."
        )

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> dict[str, LayerStats]:
        closed, dyn, provs = trace(fn, args, kwargs, argnums)

        order: list[str] = []

        def measure(consts, xs):
            walker = Walker()
            walker.run(closed.jaxpr, consts, xs, provs)
            stats = walker.results(near_overflow)
            order.extend(stats)
            return stats

        stats = jax.jit(measure)(list(closed.consts), dyn)
        return {k: stats[k] for k in order}  # jit returns dicts sorted by key

    return run
