"""`locate(fn)(*args)`: name the operation that created the first NaN/Inf.

The function is traced to a jaxpr (with source information), and the jaxpr
is evaluated equation by equation inside one `jax.jit` program by the
instrumented interpreter (`interpreter.py`), which returns the index of the
first creation event. A second compiled pass reads the concrete inputs and
outputs of that equation, which `causes.classify` turns into a cause, a fix
and a sentence about what the equation received.
"""

from __future__ import annotations

import dataclasses
import functools
import linecache
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import source_info_util

from jaxnan._src import base, blocks, checks, interpreter, primitives, report, tree
from jaxnan._src.inspect import locate_text

source_info_util.register_exclusion(__file__)

PHASES = ("input", "forward", "backward", "update")


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """What `jaxnan.locate` found: where the first nonfinite value came from.

    A diagnosis with ``found=False`` means every argument, every
    intermediate value and every output was finite. ``str(diagnosis)`` is a
    report to read; `to_dict` gives plain values for loggers.

    Attributes:
        found: whether a nonfinite value was found (in the arguments or
            created inside).
        primitive: the jax primitive of the creating equation (``"log"``,
            ``"div"``, ``"dot_general"``, ...), None for phase ``"input"``.
        file: the source file of the user line (the innermost frame outside
            jax, optax, chex, flax, equinox and jaxnan).
        line: the line number in `file`.
        function: the user function holding that line.
        code: the text of that line.
        phase: ``"input"`` (already in the arguments), ``"forward"``,
            ``"backward"`` (made by differentiation; `file`/`line` then
            point at the forward line whose derivative failed) or
            ``"update"`` (the optimizer, after the gradients).
        cause: one of `jaxnan`'s causes (``input_data``, ``poisoned_state``,
            ``unsafe_op``, ``overflow``, ``exploding_gradient``, ``update``,
            ``precision``).
        fix: one sentence saying what to change.
        inputs_seen: what the creating equation received, in words and
            numbers.
        nonfinite_inputs: argument leaf path -> ``(nan, +inf, -inf)`` counts
            for the nonfinite arguments.
        nonfinite_outputs: output leaf path -> counts, for the outputs that
            end nonfinite (``output[1]['w']`` is the gradient of ``w`` under
            ``value_and_grad``).
        iteration: one index per enclosing `scan`/`while`/`fori_loop`,
            outermost first (for `scan`, the index into the scanned axis).
        device: the id of the device where the event happened first, inside
            `shard_map`; None elsewhere.
        name_stack: the jax name stack of the creating equation.
        dtype: the dtype of the creating equation's first floating output.
        shapes: ``{"inputs": [...], "outputs": [...]}`` shapes of the
            creating equation (per device inside `shard_map`).
        user_function: the library function called at the user line, when
            known (``"jnp.sqrt"``, ``"jax.nn.softmax"``).
        fn_name: the name of the located function.
        layer_stats: the activation (and gradient) statistics of the layer
            holding the creating equation (see `jaxnan.activation_stats`).
    """

    found: bool
    primitive: str | None = None
    file: str | None = None
    line: int | None = None
    function: str | None = None
    code: str | None = None
    phase: str | None = None
    cause: str | None = None
    fix: str | None = None
    inputs_seen: str | None = None
    nonfinite_inputs: dict[str, tuple[int, int, int]] = dataclasses.field(
        default_factory=dict
    )
    nonfinite_outputs: dict[str, tuple[int, int, int]] = dataclasses.field(
        default_factory=dict
    )
    iteration: tuple[int, ...] | None = None
    device: int | None = None
    name_stack: str = ""
    dtype: str | None = None
    shapes: dict[str, list[tuple[int, ...]]] = dataclasses.field(default_factory=dict)
    user_function: str | None = None
    fn_name: str = ""
    created: tuple[int, int, int] | None = None
    layer_stats: str | None = None

    @property
    def where(self) -> str | None:
        """``file:line`` of the user line, or None."""
        if self.file is None:
            return None
        return f"{os.path.basename(self.file)}:{self.line}"

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values (str, int, lists, dicts) for loggers and JSON."""
        d = dataclasses.asdict(self)
        for key in ("nonfinite_inputs", "nonfinite_outputs"):
            d[key] = {k: list(v) for k, v in d[key].items()}
        for key in ("iteration", "created"):
            if d[key] is not None:
                d[key] = list(d[key])
        d["shapes"] = {k: [list(s) for s in v] for k, v in d["shapes"].items()}
        return d

    def __str__(self) -> str:
        name = f"`{self.fn_name}`" if self.fn_name else "the function"
        if not self.found:
            return (
                f"jaxnan: all finite: no NaN or Inf in the arguments, the "
                f"intermediate values or the outputs of {name}."
            )
        lines = []
        if self.phase == "input":
            lines.append(
                f"jaxnan: nonfinite values were already in the arguments of {name}:"
            )
            lines.append(report.leaf_lines(sorted(self.nonfinite_inputs.items())))
        else:
            what = report.describe_counts(*self.created) if self.created else ""
            what = f" ({what})" if what else ""
            lines.append(
                f"jaxnan: `{self.primitive}` created the first nonfinite value"
                f"{what} in the {self.phase} pass of {name}."
            )
            where = self.where or "an unknown line"
            if self.phase == "backward":
                target = f"`{self.user_function}`" if self.user_function else "the op"
                lines.append(f"  where:   gradient of {target} at {where}")
            else:
                via = f" (`{self.user_function}`)" if self.user_function else ""
                lines.append(f"  where:   {where}{via}")
            if self.function:
                code = f": {self.code}" if self.code else ""
                lines.append(f"           in {self.function}{code}")
            lines.append(f"  phase:   {self.phase}")
            if self.iteration:
                lines.append(f"  iteration: {self.iteration}")
            if self.device is not None:
                lines.append(f"  device:  {self.device}")
            if self.shapes:
                ins = ", ".join(str(s) for s in self.shapes.get("inputs", []))
                outs = ", ".join(str(s) for s in self.shapes.get("outputs", []))
                lines.append(f"  shapes:  ({ins}) -> ({outs}) {self.dtype or ''}")
            if self.name_stack:
                lines.append(f"  name stack: {self.name_stack}")
            if self.inputs_seen:
                lines.append(f"  inputs:  {self.inputs_seen}")
            if self.layer_stats:
                lines += [f"  {t}" for t in self.layer_stats.splitlines()]
        if self.cause:
            lines.append(f"  cause:   {self.cause}")
        if self.fix:
            lines.append(f"  fix:     {self.fix}")
        if self.nonfinite_outputs:
            lines.append("  nonfinite outputs:")
            lines.append(
                report.leaf_lines(sorted(self.nonfinite_outputs.items()), "    ")
            )
        elif self.phase != "input":
            lines.append(
                "  the outputs are finite: the value was masked or absorbed later."
            )
        return "\n".join(lines)


# -- source frames -------------------------------------------------------

_library_dirs = base.library_dirs
_library_of = base.library_of


_STDLIB_WRAPPERS = ("contextlib.py", "functools.py")

_API_PREFIXES = (
    ("jax", "_src/numpy/linalg", "jnp.linalg."),
    ("jax", "_src/numpy/", "jnp."),
    ("jax", "_src/nn/", "jax.nn."),
    ("jax", "_src/lax/", "lax."),
    ("jax", "_src/scipy/special", "jax.scipy.special."),
    ("jax", "_src/scipy/", "jax.scipy."),
    ("jax", "_src/ops/", "jax.ops."),
    ("optax", "", "optax."),
    ("flax", "", "flax."),
    ("equinox", "", "eqx."),
)


def _api_name(frame: Any) -> str | None:
    lib = _library_of(frame.file_name)
    if lib is None:
        return None
    rel = os.path.realpath(frame.file_name)
    for d in _library_dirs()[lib]:
        if rel.startswith(d):
            rel = rel[len(d) :]
            break
    rel = rel.replace(os.sep, "/")
    if rel.endswith("array_methods.py"):
        return None
    fname = frame.function_name.split(".")[-1]
    if fname.startswith("_") or fname.startswith("<"):
        return None
    for want_lib, sub, prefix in _API_PREFIXES:
        if lib == want_lib and rel.startswith(sub):
            return prefix + fname
    return None


def user_frame(source_info: Any) -> tuple[Any, str | None]:
    """(innermost user frame or None, the library function it called).

    Without a user frame (the traceback of an equation inside a `jit`-ed
    library function stops at the `jit`), the library function is the
    outermost one the traceback shows.
    """
    tb = getattr(source_info, "traceback", None)
    if tb is None:
        return None, None
    frames = list(tb.frames)  # innermost first
    k = next(
        (
            i
            for i, f in enumerate(frames)
            if _library_of(f.file_name) is None
            and not f.file_name.endswith(_STDLIB_WRAPPERS)
        ),
        len(frames),
    )
    user = frames[k] if k < len(frames) else None
    api = None
    for inner in reversed(frames[:k]):
        api = _api_name(inner)
        if api is not None:
            break
    return user, api


def node_frame(node: Any) -> tuple[Any, str | None]:
    """The user frame of a node, falling back on its enclosing equations."""
    frame, api = user_frame(node.eqn.source_info)
    for caller in reversed(node.callers):
        if frame is not None:
            break
        frame, outer_api = user_frame(caller.source_info)
        api = api or outer_api
    return frame, api


def _user_function(node: Any, nodes: Sequence[Any], api: str | None) -> str:
    """The library function whose (derivative) equation created the value.

    The traceback's library frames name it when present. Functions that jax
    wraps in an inlined `jit` leave no frame; then a derivative equation is
    matched with the primal equation that shares its traceback object (the
    jvp rule's equations do), and that primitive is named.
    """
    if api is not None:
        return api
    tb = getattr(node.eqn.source_info, "traceback", None)
    if tb is not None:
        for other in nodes[: node.index + 1]:  # the primal equation comes first
            if getattr(other.eqn.source_info, "traceback", None) is tb:
                return primitives.user_spelling(other.eqn.primitive.name)
    return primitives.user_spelling(node.eqn.primitive.name)


# -- phase ---------------------------------------------------------------


def phases(nodes: Sequence[interpreter.Node], out_producers: Sequence[int]):
    """The phase of every node, decided by data flow (see `locate`)."""
    n = len(nodes)
    gradish = [False] * n
    first_t = None
    for node in nodes:
        if node.unit != node.index:
            continue
        t = "transpose(" in node.name_stack
        if t and first_t is None:
            first_t = node.index
        gradish[node.index] = t or any(gradish[p] for p in node.producers)
    primal = [p for p in out_producers if p >= 0 and not gradish[p]]
    feeds_primal = set()
    stack = list(primal)
    while stack:
        i = stack.pop()
        if i in feeds_primal:
            continue
        feeds_primal.add(i)
        stack.extend(nodes[i].producers)

    def phase(node: interpreter.Node) -> str:
        ns = node.name_stack
        if "transpose(" in ns:
            return "backward"
        u = node.unit
        if "jvp(" not in ns:
            if gradish[u] or (
                first_t is not None and u > first_t and u not in feeds_primal
            ):
                return "update"
            return "forward"
        if feeds_primal and u not in feeds_primal:
            return "backward"
        return "forward"

    return phase


# -- locate --------------------------------------------------------------


def _rows(counts: Any, paths: Sequence[str]) -> dict[str, tuple[int, int, int]]:
    c = np.asarray(counts).reshape(-1, 3)
    return {p: tuple(int(v) for v in row) for p, row in zip(paths, c) if row.any()}


def _host_counts(values: Sequence[np.ndarray]) -> tuple[int, int, int]:
    nan = pos = neg = 0
    for v in values:
        a = np.asarray(v)
        if not base.is_inexact_dtype(a.dtype):
            continue
        a = a.astype(np.complex128 if np.iscomplexobj(a) else np.float64)
        nan += int(np.isnan(a).sum())
        pos += int((a == np.inf).sum())
        neg += int((a == -np.inf).sum())
    return nan, pos, neg


def locate(
    fn: Callable, *, static_argnums: int | Sequence[int] = ()
) -> Callable[..., Diagnosis]:
    """Names the operation that created the first NaN/Inf of ``fn(*args)``.

    ``jaxnan.locate(fn)(*args, **kwargs)`` traces `fn` to a jaxpr, evaluates
    it equation by equation inside one `jax.jit`-compiled program that
    checks every floating value (one fused reduction each), and returns a
    `Diagnosis`. `fn` can be a loss, ``jax.value_and_grad(loss)`` or a whole
    train step with the optax update. Run it on the arguments of a step that
    went nonfinite (the guard keeps them); healthy steps never pay for it.

    The creation event is the first equation, in program order, whose
    floating outputs hold an Inf or NaN while its floating inputs were all
    finite, or a NaN while no input held one (``inf - inf``, ``0 * inf``:
    this names the softmax of a fully masked row). Later equations only
    propagate it. Nonfinite arguments are the root cause instead (phase
    ``"input"``, with the leaf paths, named after `fn`'s parameters).

    The phase is decided by data flow, not by the name stack alone (under
    ``value_and_grad`` the primal equations also carry ``jvp``):

    - ``"backward"``: a transposed equation (``transpose`` in the name
      stack), or a differentiated equation (``jvp``) that no primal output
      depends on, such as the ``0.5 / sqrt(x)`` computed during the forward
      sweep. Primal outputs are the outputs that do not depend on a
      transposed equation (the loss and aux values).
    - ``"update"``: an equation outside differentiation that consumes the
      gradients, or that comes after them and feeds no primal output (the
      optimizer and ``apply_updates`` in a train step returning
      ``(params, opt_state, loss)``).
    - ``"forward"``: everything else (a plain loss is all forward).

    Higher-order primitives are evaluated with instrumented bodies: `jit`,
    `custom_jvp` and `custom_vjp` (the primal body), `checkpoint`, `cond`
    and `switch` (the taken branch), `scan` and `while`/`fori_loop` (with the
    iteration of the event), and `shard_map` (with the device). Sharded
    `jit` works unchanged. Integer and boolean values are not checked.

    Cost: one compile and run of the instrumented program, and one of a
    capture program when an event is found (both about the size of the
    plain program).

    Args:
        fn: the function to diagnose.
        static_argnums: positions of arguments that are not arrays (passed
            to the trace as Python values).

    Returns:
        A function taking `fn`'s arguments and returning a `Diagnosis`.

    Raises:
        TypeError: when `fn` is not callable or `static_argnums` is not a
            sequence of ints.
        NotImplementedError: when `fn` uses a higher-order primitive
            without a rule (see `jaxnan.register_rule`).

    Examples:
        >>> import jax, jax.numpy as jnp, jaxnan
        >>> def loss(w, x):
        ...     return jnp.sum(jnp.log(x * w))
        >>> d = jaxnan.locate(jax.value_and_grad(loss))(jnp.ones(3), jnp.arange(3.0))
        >>> d.primitive, d.phase, d.function, d.cause
        ('log', 'forward', 'loss', 'unsafe_op')
        >>> d.nonfinite_outputs
        {'output[0]': (0, 0, 1), 'output[1]': (1, 0, 0)}
        >>> jaxnan.locate(loss)(jnp.ones(3), jnp.ones(3)).found
        False

    .. versionadded:: 0.1.0
    """
    if not callable(fn):
        raise TypeError(
            f"jaxnan.locate(fn) needs a callable, got {type(fn).__name__}: "
            f"{fn!r}. Use it as jaxnan.locate(loss_fn)(params, batch)."
        )
    if isinstance(static_argnums, int):
        static_argnums = (static_argnums,)
    try:
        static = tuple(int(i) for i in static_argnums)
    except (TypeError, ValueError):
        raise TypeError(
            f"jaxnan.locate got static_argnums={static_argnums!r}; pass an int "
            "or a tuple of ints (the positions of non-array arguments)."
        ) from None
    name = checks.function_name(fn)

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Diagnosis:
        return _locate(fn, name, static, args, kwargs)

    return run


def _is_array_leaf(x: Any) -> bool:
    """An array, or a Python number the caller passed as an argument's leaf.

    A Python float that is ±inf is a constant of the model (the ``-inf``
    initial value of `eqx.nn.MaxPool2d`), not data: it stays static.
    """
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        return True
    if isinstance(x, (bool, int)):
        return True
    if isinstance(x, (float, complex)):
        return not np.isinf(x)
    return False


def _locate(fn, name, static, args, kwargs) -> Diagnosis:
    static = tuple(i % len(args) for i in static if -len(args) <= i < len(args))
    dyn = [i for i in range(len(args)) if i not in static]
    names = base.argument_names(fn, len(args))
    in_paths: list[str] = []
    for i in dyn:
        in_paths += [p for p, _ in tree.paths_and_leaves(args[i], names[i])]
    for k in sorted(kwargs):
        in_paths += [p for p, _ in tree.paths_and_leaves(kwargs[k], k)]
    every, treedef = jax.tree_util.tree_flatten(([args[i] for i in dyn], kwargs))
    # Arrays are traced; other leaves (the functions, `custom_jvp`s and float
    # constants an Equinox module holds) are closed over, as static values.
    traced = [i for i, x in enumerate(every) if _is_array_leaf(x)]
    leaves = [every[i] for i in traced]
    in_paths = [in_paths[i] for i in traced] if len(in_paths) == len(every) else []

    def flat_fn(*flat):
        full_leaves = list(every)
        for i, x in zip(traced, flat):
            full_leaves[i] = x
        dargs, kw = jax.tree_util.tree_unflatten(treedef, full_leaves)
        full = list(args)
        for i, a in zip(dyn, dargs):
            full[i] = a
        return fn(*full, **kw)

    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*leaves)
    out_paths = [p for p, _ in tree.paths_and_leaves(out_shape, "output")]
    consts = list(closed.consts)
    det = blocks.detect(closed, consts, leaves)
    in_counts, out_counts = _counts(leaves), _counts(det.outs)
    nonfinite_inputs = _rows(in_counts, in_paths)
    nonfinite_outputs = _rows(out_counts, out_paths)
    index = det.index

    if nonfinite_inputs:
        from jaxnan._src import causes

        cause, fix = causes.classify_inputs(nonfinite_inputs)
        return Diagnosis(
            found=True,
            phase="input",
            cause=cause,
            fix=fix,
            nonfinite_inputs=nonfinite_inputs,
            nonfinite_outputs=nonfinite_outputs,
            fn_name=name,
        )
    if index < 0:
        return Diagnosis(
            found=bool(nonfinite_outputs),
            nonfinite_outputs=nonfinite_outputs,
            fn_name=name,
        )

    node = det.nodes[index]
    iteration = tuple(int(i) for i in det.iteration[: node.loop_depth])
    device_pos = det.device
    device = None
    if node.shard is not None and device_pos >= 0:
        mesh, axes = node.shard
        device = device_pos
        if tuple(axes) == tuple(mesh.axis_names):
            device = int(mesh.devices.flat[device_pos].id)
    phase = phases(det.nodes, det.out_producers)(node)

    captured = blocks.capture_event(det, node, iteration, device_pos)
    inputs, outputs = captured.inputs, captured.outputs
    if device is None:  # a sharded jit: the device holding the element
        device = captured.device
    eqn = node.eqn
    frame, api = node_frame(node)
    api = _user_function(node, det.nodes, api)
    file = line = function = code = None
    if frame is not None:
        file, line = frame.file_name, frame.line_num
        function = frame.function_name
        code = linecache.getline(file, line).strip() or None
    dtype = next(
        (str(a.dtype) for a in node.out_avals if base.is_inexact_dtype(a.dtype)), None
    )
    cause = fix = seen = None
    try:
        from jaxnan._src import causes

        event = causes.Event(eqn, eqn.primitive.name, phase, inputs, outputs, api)
        cause, fix, seen = causes.classify(event)
    except ImportError:  # pragma: no cover - causes.py is part of the package
        pass
    return Diagnosis(
        found=True,
        primitive=eqn.primitive.name,
        file=file,
        line=line,
        function=function,
        code=code,
        phase=phase,
        cause=cause,
        fix=fix,
        inputs_seen=seen,
        nonfinite_inputs=nonfinite_inputs,
        nonfinite_outputs=nonfinite_outputs,
        iteration=iteration or None,
        device=device,
        name_stack=node.name_stack,
        dtype=dtype,
        shapes={
            "inputs": [tuple(a.shape) for a in node.in_avals],
            "outputs": [tuple(a.shape) for a in node.out_avals],
        },
        user_function=api,
        fn_name=name,
        created=_host_counts(outputs),
        layer_stats=_layer_text(closed, leaves, ([args[i] for i in dyn], kwargs), eqn),
    )


@jax.jit
def _leaf_counts(x: Any) -> jax.Array:
    return tree.counts_matrix([x])[0]


def _layer_text(closed, leaves, dyn_tree, eqn) -> str | None:
    try:
        return locate_text.layer_text(closed, leaves, dyn_tree, eqn)
    except Exception as e:  # the statistics must never hide the diagnosis
        return f"layer statistics unavailable ({type(e).__name__}: {e})"


def _dtype(v: Any) -> Any:
    return v.dtype if hasattr(v, "dtype") else np.result_type(v)


def _counts(values: Sequence[Any]) -> np.ndarray:
    """NaN, +Inf, -Inf counts of each value (one small cached kernel per shape)."""
    rows = [
        _leaf_counts(v) if base.is_inexact_dtype(_dtype(v)) else (0, 0, 0)
        for v in values
    ]
    return np.array([np.asarray(r) for r in rows], np.int64).reshape(-1, 3)
