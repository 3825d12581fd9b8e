"""`activation_stats(fn)(*args)`: per-layer statistics of a forward pass."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core
from jax.extend import source_info_util

from jaxnan._src.core import primitives
from jaxnan._src.inspect import arguments, layers, reductions, scan_layers

source_info_util.register_exclusion(__file__)

_NAME = arguments.NAME
GRAD_SUFFIX = layers.GRAD_SUFFIX


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
            (the last value it computes); NaN when it has none.
        std: float32, their standard deviation (NaN likewise).
        zero_fraction: float32, fraction of exact zeros in the output (dead
            units after a ReLU).
        nonfinite: int32, NaN, +Inf and -Inf entries over every
            intermediate of the layer.
        range_used: float32, `max_abs` over the largest finite value of the
            intermediate's dtype (the largest ratio over the layer); 1.0 is
            overflow.
        headroom: float32, ``log2(dtype max / max_abs)``: how many times the
            values can double before they overflow (the smallest over the
            layer's intermediates, each against its own dtype; computed in
            log space, so tiny and huge ratios stay exact; +Inf for an
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
        if used >= 0.01:
            share = f"{used:.0%}"
        elif used >= 1e-6:
            share = f"{used * 100:.1g}%"
        else:
            share = "under 0.0001%"
        mean = float(self.mean)
        spread = (
            f"mean {mean:.3g}, std {float(self.std):.3g}"
            if math.isfinite(mean)
            else "no finite output entry"
        )
        text = (
            f"max |x| = {float(self.max_abs):.3g}, {share} of the {self.dtype} "
            f"range; {spread}, zeros {float(self.zero_fraction):.0%}"
        )
        if bad:
            text += f", {bad} nonfinite"
        return text


class ActivationStats(dict):
    """Layer name -> `LayerStats`, in program order (forward layers first).

    A dict whose order survives `jit`: it is a pytree that flattens in its
    own order (a plain dict flattens sorted by key).

    Raises:
        KeyError: for a layer name it does not hold (as a dict does).
    """

    def first_nonfinite(self) -> str | None:
        """The first layer in program order with a NaN or Inf; None if none.

        Forward layers come first, so this is where the forward pass first
        went nonfinite (in a scan over layers, the iteration: ``layers/2``).
        Reads the counts, so call it outside `jit`.

        Examples:
            >>> import jax, jax.numpy as jnp, jaxnan
            >>> def f(w, x):
            ...     with jax.named_scope("scale"):
            ...         h = x * w
            ...     with jax.named_scope("log"):
            ...         return jnp.log(h)
            >>> stats = jaxnan.activation_stats(f)(2.0, jnp.array([1.0, -1.0]))
            >>> list(stats), stats.first_nonfinite()
            (['scale', 'log'], 'log')
        """
        return next((k for k, s in self.items() if int(s.nonfinite)), None)


def _flatten(d: ActivationStats):
    keys = tuple(d)
    return [(jax.tree_util.DictKey(k), d[k]) for k in keys], keys


def _unflatten(keys: tuple, values) -> ActivationStats:
    return ActivationStats(zip(keys, values))


jax.tree_util.register_pytree_with_keys(
    ActivationStats, _flatten, _unflatten, lambda d: (list(d.values()), tuple(d))
)


def _float_dtype(aval: Any) -> bool:
    dtype = getattr(aval, "dtype", None)
    return dtype is not None and bool(jnp.issubdtype(dtype, jnp.floating))


def _bind(eqn: Any, invals: list) -> Any:
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns: tuple = ()
    if isinstance(params, tuple):  # jax < 0.5 returned (subfuns, params)
        subfuns, params = params
    with source_info_util.user_context(
        eqn.source_info.traceback, name_stack=eqn.source_info.name_stack
    ):
        return eqn.primitive.bind(*subfuns, *invals, **params)


# Provenances (`layers.DATA`, `layers.CONST` or a parameter's layer), also
# read by `locate.layer_text`.
DATA = layers.DATA
CONST = layers.CONST


def _computes(eqn: Any) -> bool:
    """Whether an equation makes new values from inputs (not `layers.STRUCTURAL`)."""
    return bool(eqn.invars) and eqn.primitive.name not in layers.STRUCTURAL


def _context(eqn: Any, scope: str, backward: bool, outer: Any) -> tuple:
    """(scope, backward, call site) of an equation inside an enclosing call."""
    bwd = backward or layers.is_backward(eqn.source_info.name_stack)
    where = layers.call_site(eqn.source_info)
    if where is None:  # inside a library jit traced elsewhere
        where = outer
    eqn_scope = layers.join(scope, layers.scope_path(eqn.source_info.name_stack))
    return eqn_scope, bwd, where


class _Entry(NamedTuple):
    """One measured equation, named once the whole jaxpr has been seen.

    `values` are its floating outputs. An equation of the body of a scan
    over layers (or of a loop around one) has none: it has its `loops`, the
    `scan_layers.Stack` of every scan around it, outermost first; `reduced`
    (the ranges of its outputs' dtypes and their `reductions.Reduced`, with
    one leading axis per loop) and `body_name`, its layer in the innermost
    body (without the indices).
    """

    eqn: Any
    scope: str
    param: str
    site: layers.Site | None
    backward: bool
    values: list
    loops: tuple[scan_layers.Stack, ...] = ()
    reduced: tuple | None = None
    body_name: str = ""


class Walker:
    """Evaluates a jaxpr equation by equation and measures every layer.

    Args:
        model_layers: the layers of the parameters (filled by `run`).
        root: the name of equations no user line made and no parameter
            names (a module's class: ``Sequential``, ``Linear``).

    Attributes:
        entries: the measured equations, in program order.
        names: id(eqn) -> layer key, for every measured equation outside
            the scans measured per iteration (filled by `results`).
        stacked: id(eqn) -> (the `scan_layers.Stack` of every scan around
            it, outermost first; its layer in the body, without the
            indices), for the equations of those scans' bodies (filled by
            `results`; see `layer_name`).
    """

    def __init__(
        self, model_layers: frozenset[str] = frozenset(), root: str = "?"
    ) -> None:
        self.root = root
        self.entries: list[_Entry] = []
        self.names: dict[int, str] = {}
        self.stacked: dict[int, tuple[tuple[scan_layers.Stack, ...], str]] = {}
        # (input ids, output ids, chain, parameter used directly, entry index)
        # of every first-order equation: the data flow that `results` reads.
        self.flow: list[tuple] = []
        self.model_layers = set(model_layers)
        self._alive: list = []  # the values whose ids `flow` holds

    def run(self, jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], provs):
        """Evaluates `jaxpr` on `args` (with their provenances); the outputs."""
        self.model_layers |= {p for p in provs if p}
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
            context = _context(eqn, scope, backward, outer)
            sub = scan_layers.call_body(eqn)
            in_provs = [p for _, p in ins]
            stacked = scan_layers.stacked_layers(eqn, in_provs)
            if sub is not None:
                invals = [x for x, _ in ins]
                outs = self._walk(sub[0], sub[1], invals, in_provs, *context)
            elif stacked or scan_layers.holds_stack(eqn, in_provs):
                outs = self._scan(eqn, ins, stacked, context)
            else:
                outs = self._first_order(eqn, ins, *context)
            for v, (x, p) in zip(eqn.outvars, outs):
                env[v] = (x, p)
        return [read(v) for v in jaxpr.outvars]

    def _scan(self, eqn, ins, stacked, context):
        """A scan over layers, or around one, measured per iteration (`scan_layers`).

        The body's own scans over layers (and loops around them) are
        measured per iteration too: their entries' reductions gain this
        loop's axis.
        """
        sub = primitives.sub_jaxprs(eqn)[0]
        provs = scan_layers.body_provenances(eqn, [p for _, p in ins])
        traced: list = []

        def body(args):
            child = Walker(frozenset(self.model_layers), self.root)
            outs = child._walk(sub.jaxpr, sub.consts, args, provs, *context)
            names = child._names()  # the body's layers, named by the body
            ends = [a != b for a, b in zip(names, [*names[1:], None])]
            traced[:] = [child, [p for _, p in outs], names]
            reduced = [
                e.reduced[1] if e.loops else reductions.reduce_outputs(e.values, end)
                for e, end in zip(child.entries, ends)
            ]
            return [x for x, _ in outs], reduced

        outs, reduced = scan_layers.run_scan(eqn, [x for x, _ in ins], body)
        child, out_provs, names = traced
        inner = {e.loops[0].name for e in child.entries if e.loops}
        loop = scan_layers.loop_of(eqn)
        if stacked:
            loop = scan_layers.stack_of(eqn, context[0], stacked, self.model_layers)
            if loop.name in inner:  # a scope around the body's own stack only
                args = (eqn, context[0], stacked, self.model_layers, False)
                loop = scan_layers.stack_of(*args)
        first = len(self.entries)
        for e, red, name in zip(child.entries, reduced, names):
            tops = e.reduced[0] if e.loops else tuple(map(reductions.top_of, e.values))
            loops = (loop, *e.loops)
            self.entries.append(
                e._replace(values=[], loops=loops, reduced=(tops, red), body_name=name)
            )
        for *flow, k in child.flow:
            self.flow.append((*flow, None if k is None else first + k))
        self._alive.append(child._alive)
        return list(zip(outs, out_provs))

    def _first_order(self, eqn, ins, scope, backward, where):
        """Binds one first-order equation, measures it; its (value, prov)s."""
        invals = [x for x, _ in ins]
        outs = _bind(eqn, invals)
        if not eqn.primitive.multiple_results:
            outs = [outs]
        data, param = layers.provenance(eqn, [p for _, p in ins])
        entry = None
        if data and _computes(eqn):
            entry = self._measure(eqn, outs, scope, param, where, backward)
        if where is not None:
            self._record_flow(invals, outs, backward, where, param, entry)
        out_prov = DATA if data else param or CONST
        return [(x, out_prov) for x in outs]

    def _record_flow(self, invals, outs, backward, where, param, entry) -> None:
        """Notes what a first-order equation of a user call reads and makes."""
        direct = param if where.direct else ""
        ids_in, ids_out = [id(x) for x in invals], [id(x) for x in outs]
        self.flow.append((ids_in, ids_out, (backward, where.chain), direct, entry))
        self._alive.append((invals, outs))  # no id reused while `flow` holds it

    def _measure(self, eqn, outs, scope, param, where, backward) -> int | None:
        """Records the equation's nonempty float outputs; its entry index."""
        floats = [
            x for v, x in zip(eqn.outvars, outs) if _float_dtype(v.aval) and x.size
        ]
        if not floats:
            return None
        self.entries.append(_Entry(eqn, scope, param, where, backward, floats))
        return len(self.entries) - 1

    def _name(self, e: _Entry, site_params: dict, next_param: str) -> tuple[str, bool]:
        """(layer name, whether each run of it is a layer: a scope or a line)."""
        site = e.site.key if e.site is not None else None
        if _scope_named(e):
            name, runs = e.scope, True
        elif e.param:  # Equinox scopes are class names: its field path is unique
            name, runs = e.param, False
        elif len(site_params.get(site, ())) == 1:
            (name,), runs = site_params[site], False  # a parameter's call
        elif next_param:
            name, runs = next_param, False  # the same user call uses it next
        else:  # a line run in a loop is a layer per call, as a scope
            name, runs = (e.site.text if e.site is not None else self.root), True
        return (name + GRAD_SUFFIX if e.backward else name), runs

    def _next_params(self) -> list[str]:
        """Per entry, the parameter its value meets next in the same call.

        Walks the data flow backwards: a value is claimed by the nearest
        consumer of the same user-function call that uses a parameter with a
        jax operation, directly or through other equations of that call.
        """
        claim: dict[int, tuple] = {}
        found = [""] * len(self.entries)
        for ins, outs, chain, direct, entry in reversed(self.flow):
            label = direct
            if not label:
                label = next(
                    (claim[o][1] for o in outs if claim.get(o, (None,))[0] == chain),
                    "",
                )
            if entry is not None:
                found[entry] = label
            if label:
                for i in ins:
                    claim[i] = (chain, label)
        return found

    def _names(self) -> list[str]:
        """The layer name of every entry (of a scan body: without the index)."""
        site_params: dict[tuple, set[str]] = {}
        for e in self.entries:
            if e.param and e.site is not None:
                site_params.setdefault(e.site.key, set()).add(e.param)
        named = [
            (e.body_name, False) if e.loops else self._name(e, site_params, n)
            for e, n in zip(self.entries, self._next_params())
        ]
        return layers.split_interrupted(
            [name for name, _ in named],
            [runs for _, runs in named],
            [  # a scope's run is named by its line, a line's by its number
                e.site.text if e.site is not None and _scope_named(e) else ""
                for e in self.entries
            ],
        )

    def _per_layer(self, names: list[str], fixed: dict[int, int]):
        """(entry, iteration indices, layer name) in program order.

        The body of a scan measured per iteration gives its entries once per
        iteration, in the order the iterations run, and its index among the
        entry's indices; a loop around a scan over layers gives them once,
        with None (reduced over its iterations), or with the index `fixed`
        gives it (id of its `Stack` -> index). Other entries have ``()``.
        """
        return scan_layers.iterations(list(zip(self.entries, names)), fixed)

    def layer_name(self, eqn: Any, iteration: Sequence[int] = ()) -> str | None:
        """The layer key of a measured equation (after `results`); else None.

        An equation of the body of a scan over layers is named with its
        `iteration`, one index per enclosing scan, outermost first (the
        index into the stacked parameters: ``layers/3/...``; a loop around
        the stack adds none); None when `iteration` does not give one index
        per enclosing scan, within its length.
        """
        name = self.names.get(id(eqn))
        if name is not None:
            return name
        loops, body_name = self.stacked.get(id(eqn), ((), ""))
        if not loops or len(iteration) != len(loops):
            return None
        if not all(0 <= i < loop.length for i, loop in zip(iteration, loops)):
            return None
        return scan_layers.layer_name(loops, body_name, tuple(iteration))

    def results(
        self, near_overflow: float, layer_of: Any = None, iteration: Sequence[int] = ()
    ) -> ActivationStats:
        """The per-layer statistics, forward layers first, in program order.

        With `layer_of` (an equation) only the layer holding it is measured,
        its activations and its gradients (`names` still names every
        equation); empty when the equation is not measured. An equation of
        the body of a scan over layers is in the layer of its `iteration`
        (`layer_name`), and a loop around that scan is measured in the
        iteration `iteration` gives it, not reduced over its iterations.
        """
        names = self._names()
        for e, name in zip(self.entries, names):
            if e.loops:
                self.stacked[id(e.eqn)] = (e.loops, name)
            else:
                self.names[id(e.eqn)] = name
        wanted, fixed = None, {}
        if layer_of is not None:
            own = self.layer_name(layer_of, iteration) or ""
            own = own.removesuffix(GRAD_SUFFIX)
            wanted = {own, own + GRAD_SUFFIX} if own else set()
            loops = self.stacked.get(id(layer_of), ((), ""))[0]
            fixed = {id(loop): i for loop, i in zip(loops, iteration) if own}
        groups: dict[str, reductions.Accumulator] = {}
        for e, i, name in self._per_layer(names, fixed):
            if wanted is not None and name not in wanted:
                continue
            layer = groups.get(name)
            if layer is None:
                phase = "backward" if e.backward else "forward"
                layer = groups[name] = reductions.Accumulator(phase)
            if e.reduced is None:
                layer.add(e.values)
            else:
                tops, red = e.reduced
                layer.add_reduced(tops, scan_layers.select(red, e.loops, i), ())
        order = sorted(groups, key=lambda k: groups[k].phase == "backward")
        return ActivationStats((k, _finish(groups[k], near_overflow)) for k in order)


def _scope_named(e: _Entry) -> bool:
    """Whether an entry is named by its scope (see `_name`)."""
    return bool(e.scope) and not (e.param and "." in e.scope)


def _finish(layer: reductions.Accumulator, near_overflow: float) -> LayerStats:
    mean, std, zeros = layer.moments()
    max_abs, used, room, bad = layer.extremes()
    return LayerStats(
        max_abs=max_abs,
        mean=mean,
        std=std,
        zero_fraction=zeros,
        nonfinite=bad,
        range_used=used,
        headroom=room.astype(jnp.float32),
        near_overflow=used >= near_overflow,
        dtype=layer.dtype,
        phase=layer.phase,
        equations=layer.equations,
    )


def activation_stats(
    fn: Callable,
    params: Any = None,
    *,
    params_argnums: int | Sequence[int] | None = None,
    near_overflow: float = 0.25,
) -> Callable[..., ActivationStats]:
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
    without parameters is named by its line; a line called once per layer
    in a Python loop is a layer per call (``model.py:12 (__call__)/2``),
    and code of the library alone (the activations that `nnx.Sequential`
    calls) is named by the module's class and run (``Sequential/1``). A
    Flax NNX or Equinox module without parameters is still the model. A
    linen module's own code
    between two of its submodules' calls is named by its scope and line
    (``Net/model.py:12 (Net.__call__)``), so that every layer is one run of
    the program and layers come in the order they run. Equations made by
    `jax.grad`'s transposition are gradients: their key ends in
    ``" (grad)"``.

    Only equations that depend on a data argument are measured (weight-only
    computations are weights, see `jaxnan.param_stats`), and ops that only
    move entries (reshape, transpose, slice, ...) are skipped. Call-like
    primitives (`jit`, `checkpoint`, custom derivatives) are evaluated
    inline. A scan over layers (a `lax.scan` whose scanned operands hold
    parameters: linen's `nn.scan`, `nnx.scan` over an `nnx.vmap`-built
    stack, Equinox's `eqx.filter_vmap` stack under `lax.scan`) reports each
    iteration as its own layer, the index after the stack's path
    (``layers/3/linear``, ``Net/layers/3/Dense_0``): the body is run inside
    a new `lax.scan` whose stacked outputs carry each iteration's
    reductions, so one pass measures every layer.
    `ActivationStats.first_nonfinite` then names the iteration where a NaN
    or Inf first appeared. A scan over layers inside another `scan` (over
    microbatches or time steps, e.g. gradient accumulation over
    ``jax.value_and_grad(model)``, the parameters closed over) is measured
    the same way, each layer's statistics reduced over the outer loop's
    iterations (the largest maximum, the summed counts, the moments of the
    last iteration run); one inside another scan over layers names both
    indices (``Net/blocks/2/sub/1``). Other `scan`s (over time, around no
    scan over layers), `while`, `cond` and `shard_map` are measured on
    their outputs as one equation: a `while_loop` (a `fori_loop` with a
    traced bound, `lax.map` likewise as a scan over time) gives the
    statistics of its final carry only, so a NaN made in one iteration and
    masked or overwritten by a later one is not counted; `jaxnan.locate`
    names that line and its iteration (``d.iteration``).

    Cost: one compile, and one run at most 2x a plain forward pass on the
    small transformer LM of `benchmarks/inspect_cost.py` (one fused
    max/count reduction per intermediate).

    Three ways to call it, as models are written:

    - ``activation_stats(model)(x)``: a Flax NNX or Equinox module (any
      callable object that holds arrays), whose arrays are the parameters;
    - ``activation_stats(apply_fn, params)(x)``: Flax linen's
      ``model.apply`` with its variables, or any ``fn(params, *data)``;
    - ``activation_stats(fn)(params, x)``: a function whose argument 0 (or
      those in `params_argnums`) holds the parameters.

    Args:
        fn: the function or module to measure, e.g. an ``nnx.Module``,
            ``model.apply`` or ``lambda model, x: model(x)``.
        params: the parameters of ``fn(params, *data)`` (linen's variables),
            bound here; the returned function then takes the data only.
        params_argnums: positions of the arguments holding the parameters
            (the model): their leaves name layers and are not data. Default
            0, and no position with a module or bound `params` (the
            positions then count the data arguments).
        near_overflow: the fraction of the dtype's range at which a layer is
            flagged (0.25: two doublings from overflow).

    Returns:
        A function taking `fn`'s arguments and returning an
        `ActivationStats`: a dict from layer name to `LayerStats`, forward
        layers first, in program order. Wrap it in `jax.jit` to compile once
        and call it every N steps.

    Raises:
        TypeError: when `fn` is not callable.
        ValueError: for a `near_overflow` outside (0, 1] or bad
            `params_argnums`; and, from the returned function, when no layer
            was measured because every array argument was taken for a
            parameter (the batch among `params_argnums`, as
            ``activation_stats(nnx_model)`` called as ``(model, x)``), or
            because the batch was given as Python numbers (pass an array);
            when the bound module or `params` is passed again to the
            returned function.
            An empty result means the model has no layer that computes on
            the data.

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
    model = arguments.is_model(fn)
    bound = model or params is not None
    if model and params is not None:
        raise ValueError(
            f"jaxnan: {_NAME} got a module and params=; a Flax NNX or Equinox "
            "module holds its parameters: use jaxnan.activation_stats(model)(x)."
        )
    argnums = arguments.argnums_of(params_argnums, 0)
    if bound:
        # The module (or params) is argument 0; the positions given count
        # the data arguments, which now start at 1.
        extra = () if params_argnums is None else tuple(i + 1 for i in argnums)
        argnums = (0, *extra)
        call, first = (arguments.call_model, fn) if model else (fn, params)
    else:
        call, first = fn, None
    # Equations made by library code alone (nnx.Sequential's activations)
    # are named by the module's class, or the function's name.
    root = type(fn).__name__ if model else getattr(fn, "__name__", "?")

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> ActivationStats:
        if bound:
            arguments.check_not_bound_again(first, args, model)
            args = (first, *args)
        closed, dyn, provs = arguments.trace(call, args, kwargs, argnums)

        def measure(consts, xs):
            walker = Walker(root=root)
            walker.run(closed.jaxpr, consts, xs, provs)
            return walker.results(near_overflow)

        stats = jax.jit(measure)(list(closed.consts), dyn)
        if not stats:
            numbers = arguments.number_paths(args, kwargs, argnums)
            arguments.no_layers_error(provs, argnums, bound, numbers)
        return stats

    return run
