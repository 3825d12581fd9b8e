"""`locate(fn)(*args)`: name the operation that created the first NaN/Inf.

The function is traced to a jaxpr (with source information), and the jaxpr
is evaluated equation by equation, block by block (`blocks.py`, each
distinct block one `jax.jit` program), by the instrumented interpreter
(`interpreter.py`), which returns the index of the first creation event and
of the first NaN-creating one. The outputs say what the user observes (a
nonfinite loss, gradients, update); a second detect pass restricted to the
equations those outputs depend on runs when the first event lies outside
them. A
capture pass reads the concrete inputs and outputs of the event equation,
which `cause_rules.classify` turns into a cause, a fix and a sentence.
"""

from __future__ import annotations

import dataclasses
import functools
import linecache
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import core as jex_core
from jax.extend import source_info_util
from jax.sharding import AbstractMesh

from jaxnan._src.checks import check
from jaxnan._src.core import dtypes, errors, frames, hosts, primitives
from jaxnan._src.locate import (
    blocks,
    cause_rules,
    causes,
    interpreter,
    layer_text,
    operands,
    precision,
    render,
    replay,
    terms,
)
from jaxnan._src.locate.causes import Cause, Phase
from jaxnan._src.locate.flow import Flow, from_transpose

source_info_util.register_exclusion(__file__)


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """What `jaxnan.locate` found: where the first nonfinite value came from.

    A diagnosis with ``found=False`` means every argument, every
    intermediate value and every output was finite. ``str(diagnosis)`` is a
    report to read; `to_dict` gives plain values for loggers (the schema of
    `jaxnan.NonFiniteError.details`, see `errors.DETAILS_KEYS`).

    Attributes:
        found: whether a nonfinite value was found (in the arguments or
            created inside).
        primitive: the jax primitive of the creating equation (``"log"``,
            ``"div"``, ``"dot_general"``, ...), None for phase ``"input"``.
        file: the full path of the source file of the user line (the
            innermost frame outside jax, optax, chex, flax, equinox, jaxnan).
        line: the line number in `file`.
        function: the user function holding that line.
        code: the text of that line.
        phase: a `causes.Phase`, what the user observes: ``"forward"`` when
            a primal output (the loss) is nonfinite, ``"backward"`` when the
            loss is finite and a gradient is not (`file`/`line` then point
            at the forward line whose derivative failed), ``"update"`` when
            loss and gradients are finite and the update or the new state is
            not, ``"input"`` when NaN arrives in the arguments.
        cause: a `causes.Cause` (``input_data``, ``poisoned_state``,
            ``unsafe_op``, ``overflow``, ``exploding_gradient``, ``update``,
            ``precision``, ``learning_rate``).
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
        device: the id of the device that held the first nonfinite value:
            inside `shard_map` and `pmap` the device where the event
            happened first, under a sharded `jit` the device holding the
            first nonfinite element of the event's output (phase
            ``"input"``: of the first nonfinite argument); None when the
            values are not split over devices. (Inside a `shard_map` over
            some mesh axes only, the others automatic: the position in the
            grid of its manual axes.)
        process: the index of the process (`jax.process_index`) owning
            `device`; 0 with one process, None when `device` is None or a
            position.
        name_stack: the name stack of the creating equation, without the
            transformation wrappers (``jvp(...)``, ``transpose(...)``).
        dtype: the dtype of the creating equation's first floating output.
        shapes: ``{"inputs": [...], "outputs": [...]}`` shapes of the
            creating equation (per device inside `shard_map`).
        signature: the creating equation's types, ``"(f32[8,1]) -> f32[8,1]"``.
        user_function: the library function called at the user line, when
            known (``"jnp.sqrt"``, ``"jax.nn.softmax"``).
        fn_name: the name of the located function.
        created: ``(nan, +inf, -inf)`` counts of the event's outputs.
        nan_event: when the event created only infinities and a NaN appeared
            later (``exp`` overflows, then ``0 * inf``): the first equation
            that created a NaN, as ``{"primitive", "file", "line",
            "function", "code"}``.
        input_elements: nonfinite argument leaf path -> the indices of its
            first nonfinite elements (row, column, ...).
        consumed_by: nonfinite argument leaf path -> the first equation that
            consumes it, ``{"primitive", "file", "line", "code"}``.
        compiled_outputs: output leaf path -> counts of the compiled
            function's nonfinite outputs, when they differ from the replay's
            (XLA can rewrite ``x * mask`` into a select); None when they
            agree or when not checked.
        layer: the layer holding the creating equation, named as
            `jaxnan.activation_stats` names it (``decoder/mlp``; inside a
            scan over layers, the iteration's: ``layers/3/linear``, also
            inside a loop over microbatches, ``iteration == (0, 3)``),
            without the ``" (grad)"`` of its gradients' key; None when not
            known (a scan over time around no stack is no layer: see
            `iteration`).
        layer_stats: the activation (and gradient) statistics of that layer.
        loss_term: when the nonfinite loss is a sum of terms, the term that
            went nonfinite first: ``{"name", "file", "line", "code",
            "terms"}`` (the name is the key under which the step returns it,
            ``aux["kl"]``, else the name assigned on its line; ``terms``
            lists them all).
    """

    found: bool
    primitive: str | None = None
    file: str | None = None
    line: int | None = None
    function: str | None = None
    code: str | None = None
    phase: Phase | None = None
    cause: Cause | None = None
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
    process: int | None = None
    name_stack: str = ""
    dtype: str | None = None
    shapes: dict[str, list[tuple[int, ...]]] = dataclasses.field(default_factory=dict)
    signature: str | None = None
    user_function: str | None = None
    fn_name: str = ""
    created: tuple[int, int, int] | None = None
    nan_event: dict[str, Any] | None = None
    input_elements: dict[str, list[tuple[int, ...]]] = dataclasses.field(
        default_factory=dict
    )
    consumed_by: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    compiled_outputs: dict[str, tuple[int, int, int]] | None = None
    layer: str | None = None
    layer_stats: str | None = None
    loss_term: dict[str, Any] | None = None

    @property
    def where(self) -> str | None:
        """``file:line`` of the user line (full path), or None."""
        if self.file is None:
            return None
        return f"{self.file}:{self.line}"

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values (str, int, lists, dicts) for loggers and JSON."""
        return errors.plain(dataclasses.asdict(self))

    def __str__(self) -> str:
        return render.render(self)


# -- locate --------------------------------------------------------------


def _host_counts(values: Sequence[Any]) -> tuple[int, int, int]:
    """NaN, +inf, -inf counts of `values` (arrays or `operands.Operand`)."""
    nan = pos = neg = 0
    for v in values:
        a = operands.of(v)
        if not dtypes.is_inexact_dtype(a.dtype):
            continue
        c = a.census()
        nan, pos, neg = nan + c.nan, pos + c.posinf, neg + c.neginf
    return nan, pos, neg


def _history(history: Any) -> dict[str, tuple[float, ...]] | None:
    if history is None:
        return None
    if not isinstance(history, Mapping):
        raise TypeError(
            f"jaxnan.locate got history={history!r}; pass a mapping of recent "
            "values, oldest first: {'loss': [...], 'grad_norm': [...], "
            "'param_norm': [...]}."
        )
    out = {}
    for key, values in history.items():
        try:
            out[str(key)] = tuple(float(v) for v in np.ravel(np.asarray(values)))
        except (TypeError, ValueError):
            raise TypeError(
                f"jaxnan.locate got history[{key!r}]={values!r}; each entry must "
                "be a sequence of numbers, oldest first."
            ) from None
    return out


def locate(
    fn: Callable,
    *,
    static_argnums: int | Sequence[int] = (),
    history: Mapping[str, Sequence[float]] | None = None,
    check_compiled: bool = True,
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

    The phase is what the user observes, decided by data flow (under
    ``value_and_grad`` the primal equations also carry ``jvp``, and
    derivative terms such as ``0.5 / sqrt(x)`` are computed during the
    forward sweep). Primal outputs are the outputs that do not depend on a
    transposed equation (the loss and aux values):

    - ``"forward"``: a primal output (the loss) is nonfinite. The event
      reported is the first one that output depends on, not a derivative
      residual computed beside it.
    - ``"backward"``: the primal outputs are finite and a gradient (or what
      is computed from it) is not; the event is the first one in the cone of
      the bad outputs, and the line is the forward line whose derivative
      failed.
    - ``"update"``: the loss and the gradients are finite and the update or
      the new state is not (the optimizer in a train step returning
      ``(params, opt_state, loss)``).
    - ``"input"``: NaN arrives in the arguments (an argument holding only
      ``-inf``, such as an attention bias, is not an event by itself).

    Equations inside `scan`, `while`, `cond` and `custom_vjp` bodies are
    judged the same way. When the event makes only infinities and a NaN
    appears later (``exp`` overflows, then ``0 * inf``), ``nan_event`` names
    the equation that made the NaN. A float16/bfloat16 event is classified
    ``precision`` when the step re-evaluated with those values computed in
    float32 is finite, or when its line holds a constant the dtype cannot
    hold (``eps=1e-12`` is 0 in float16, ``-1e10`` is -inf).

    Higher-order primitives are evaluated with instrumented bodies: `jit`,
    `custom_jvp` and `custom_vjp` (the primal body), `checkpoint`, `cond`
    and `switch` (the taken branch), `scan` and `while`/`fori_loop` (with the
    iteration of the event), and `shard_map` and `pmap` (with the device).
    Sharded `jit` works unchanged. ``device`` and ``process`` name who held
    the first nonfinite value (the report says ``on device 5 (process
    0)``): the device where the event happened first inside `shard_map` and
    `pmap`, the device holding the first nonfinite element of the event's
    output under a sharded `jit`. Integer and boolean values are not
    checked.

    Multi-process (`jax.distributed`): call it on every process with the
    same global arrays, as the step itself is called; every process runs
    the same programs in the same order and returns the same diagnosis,
    naming the process and device holding the first nonfinite value
    (possibly another process's). Nothing waits on a collective only some
    processes enter: the decisions are read from values reduced over the
    whole global array. The event equation's inputs and outputs are
    gathered to every process (one all-gather each, the size of that
    equation's values); a nonfinite argument is read shard by shard, each
    process sending only the indices of its first nonfinite elements.

    The replay follows JAX semantics equation by equation; XLA may compile
    the same step differently (``x * mask`` into a select that hides a NaN).
    With ``check_compiled`` the compiled function is run too, and
    ``compiled_outputs`` (and the report) say when its outputs differ.

    Cost: the program runs block by block, each distinct block compiled
    once (the repeated layers of a deep model share one), plain, with one
    finiteness code of all the values it computes; only a block that
    computed a nonfinite value is compiled again instrumented (a healthy
    step or a NaN argument: none), and the event's block once more to
    capture its values; the layer holding the event is measured by one
    plain-sized program. With
    ``check_compiled`` the plain function is compiled and run once (a
    function already wrapped in `jax.jit` is called as is, so the program
    jax cached when it ran is reused). One more detect pass, reusing the
    compiled blocks, runs when the first event lies outside what went bad,
    and a float32 re-evaluation for a float16/bfloat16 step.

    Args:
        fn: the function to diagnose.
        static_argnums: positions of arguments that are not arrays (passed
            to the trace as Python values).
        history: the recent history of the run, oldest first, as kept by the
            guard: ``{"loss": [...], "grad_norm": [...], "param_norm":
            [...]}`` (any subset). An overflow after the parameter norm grew
            tenfold or more over these steps is classified
            ``learning_rate``, and after the gradient norm alone grew a
            hundredfold ``exploding_gradient``, with the figures.
        check_compiled: also run the compiled function and report when its
            outputs differ from the replay's.

    Returns:
        A function taking `fn`'s arguments and returning a `Diagnosis`.

    Raises:
        TypeError: when `fn` is not callable, `static_argnums` is not a
            sequence of ints or `history` not a mapping of number sequences;
            when the located function returns something that is not an
            array, or the arguments are tracers (locate under `jax.vmap` or
            `jax.jit`).
        NotImplementedError: when `fn` uses a higher-order primitive
            without a rule (see `jaxnan.register_rule`); when `fn` calls
            `jax.pmap` inside it under several processes (traced, the pmap
            covers this process's devices only: locate the pmap itself,
            ``locate(jax.pmap(f))``, which replays what it runs over every
            process, or the step written with `jax.jit` on global arrays or
            `jax.shard_map`).

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
    hist = _history(history)
    name = check.function_name(fn)
    opts = _Options(static, hist, bool(check_compiled))

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Diagnosis:
        return _locate(fn, name, opts, args, kwargs)

    return run


@dataclasses.dataclass(frozen=True)
class _Options:
    static: tuple[int, ...]
    history: dict[str, tuple[float, ...]] | None
    check_compiled: bool


def _locate(fn, name, opts: _Options, args, kwargs) -> Diagnosis:
    fn, args, kwargs = replay.global_pmap(fn, args, kwargs)
    run = replay.Run(fn, name, opts.static, args, kwargs)
    compiled = None
    if opts.check_compiled:
        # First, while the heap holds nothing of the blocks: compiled after
        # them, the plain program raised the peak of a 4-layer LM's locate
        # to 2x that of its plain compile, trimmed heap or not.
        compiled = run.compiled_counts()
        replay.trim_heap()  # hands the compile's freed memory back
    found = _diagnose(run, opts)
    if compiled is None or compiled == found.nonfinite_outputs:
        return found
    return dataclasses.replace(found, compiled_outputs=compiled)


def _diagnose(run: replay.Run, opts: _Options) -> Diagnosis:
    det, in_counts, out_counts = run.detect()
    nonfinite_inputs = replay.rows(in_counts, run.in_paths)
    nonfinite_outputs = replay.rows(out_counts, run.out_paths)
    common = dict(
        nonfinite_inputs=nonfinite_inputs,
        nonfinite_outputs=nonfinite_outputs,
        fn_name=run.name,
    )
    if any(c[0] for c in nonfinite_inputs.values()):  # NaN arrived: the root
        return _input_diagnosis(run, common)
    flow = Flow(det.nodes, det.out_producers, from_transpose(run.closed.jaxpr))
    bad = [i for i, p in enumerate(run.out_paths) if p in nonfinite_outputs]
    cone, bad_primal = flow.observed(bad)
    index = det.index
    if index >= 0 and cone is not None and det.nodes[index].unit not in cone:
        det, _, _ = run.detect(allow=lambda n: n.unit in cone)
        index = det.index
    if index >= 0 and cone is not None and det.nodes[index].loop_depth:
        # In a loop, the first value created may have been masked (a
        # `jnp.where` in iteration 0) while a later iteration let one out.
        escaped, _, _ = run.detect(allow=lambda n: n.unit in cone, escaping=True)
        if escaped.index >= 0:
            det, index = escaped, escaped.index
    if index < 0:
        if nonfinite_inputs:
            return _input_diagnosis(run, common)
        return Diagnosis(found=bool(nonfinite_outputs), **common)
    node = det.nodes[index]
    phase = flow.phase(node, bad_primal, bool(bad))
    if bad_primal:
        common["loss_term"] = terms.first_term(
            det.nodes,
            det.out_producers,
            run.out_paths,
            [v.aval.shape for v in run.closed.jaxpr.outvars],
            [i for i in bad if i in flow.primal_outputs],
            node.unit,
        )
    return _event_diagnosis(run, opts, det, node, phase, cone, common)


def _device(
    node: interpreter.Node, device_pos: int, element_device: int | None
) -> tuple[int | None, int | None]:
    """``(device, process)`` of the event (see `Diagnosis.device`).

    Inside a device map over every mesh axis, the device at the event's
    position; over some axes only (the others automatic), the position in
    the grid of the manual axes, with no process (a group of devices holds
    it). Elsewhere (a sharded `jit`) the device holding the first nonfinite
    element of the event's output (`capture.Captured.device`).
    """
    if node.shard is None or device_pos < 0:
        return element_device, hosts.process_of(element_device)
    mesh, axes = node.shard
    if isinstance(mesh, AbstractMesh):  # `jax.set_mesh`'s: the concrete one
        mesh = jax.sharding.get_mesh()
        if mesh.empty or tuple(mesh.axis_names) != tuple(node.shard[0].axis_names):
            return device_pos, None
    if tuple(axes) == tuple(mesh.axis_names):
        device = int(mesh.devices.flat[device_pos].id)
        return device, hosts.process_of(device)
    return device_pos, None


def _event_diagnosis(run, opts, det, node, phase, cone, common) -> Diagnosis:
    iteration = tuple(int(i) for i in np.asarray(det.iteration)[: node.loop_depth])
    device_pos = det.device
    inputs, outputs, element_device = run.capture(det, node, iteration, device_pos)
    device, process = _device(node, device_pos, element_device)
    eqn = node.eqn
    where = _frame_dict(eqn, node.callers)
    _, api = frames.node_frame(node)
    api = frames.user_function(node, det.nodes, api)
    dtype = next(
        (str(a.dtype) for a in node.out_avals if dtypes.is_inexact_dtype(a.dtype)), None
    )
    created = _host_counts(outputs)
    event = causes.Event(eqn, eqn.primitive.name, phase, inputs, outputs, api)
    event.history = opts.history
    if phase != Phase.UPDATE:
        # A constant-valued cotangent (of a mean) is no constant of the line.
        values = inputs if phase == Phase.FORWARD else ()
        event.lost_constant = precision.lost_constant(
            where["file"], where["line"], dtype, values
        )
        if not event.lost_constant and precision.is_narrow(dtype):
            event.finite_in_float32 = _finite_in_float32(run, eqn, inputs)
    found = cause_rules.classify(event)
    nan_event = None
    if not created[0] and any(c[0] for c in common["nonfinite_outputs"].values()):
        nan_event = _nan_event(run, det, cone)
    run.release_blocks()  # before the whole-program measurement: lower peak
    layer = _layer(run, eqn, iteration)
    return Diagnosis(
        found=True,
        primitive=eqn.primitive.name,
        file=where["file"],
        line=where["line"],
        function=where.get("function"),
        code=where.get("code"),
        phase=phase,
        cause=found.cause,
        fix=found.fix,
        inputs_seen=found.seen,
        iteration=iteration or None,
        device=device,
        process=process,
        name_stack=frames.clean_name_stack(node.name_stack),
        dtype=dtype,
        shapes={
            "inputs": [tuple(a.shape) for a in node.in_avals],
            "outputs": [tuple(a.shape) for a in node.out_avals],
        },
        signature=_signature(node),
        user_function=api,
        created=created,
        nan_event=nan_event,
        layer=layer.name,
        layer_stats=layer.text,
        **common,
    )


def _layer(run: replay.Run, eqn: Any, iteration: tuple[int, ...]) -> layer_text.Layer:
    try:
        # The block options (LLVM -O0, no fusion emitters): on the pruned
        # measurement (4-layer LM) 2.6 s and a 65 MiB peak against 7.3 s and
        # 116 MiB with XLA's defaults. (On the whole, unpruned program they
        # once cost 8.8x the plain compile's peak memory.)
        found = layer_text.layer_text(
            run.closed,
            run.leaves,
            run.dyn_tree,
            eqn,
            iteration,
            compiler_options=blocks.compiler_options(),
        )
    except Exception as e:  # noqa: BLE001 - statistics never hide the diagnosis
        return layer_text.Layer(
            None, f"layer statistics unavailable ({type(e).__name__}: {e})"
        )
    return found or layer_text.Layer(None, None)


def _finite_in_float32(run: replay.Run, eqn: Any, inputs: Sequence[Any]):
    whole = precision.finite_in_float32(run.closed, run.consts, run.leaves)
    if whole is None:
        return precision.equation_finite_in_float32(eqn, inputs)
    return whole


def _signature(node: interpreter.Node) -> str:
    def short(avals):
        # f32[8,1]; the varying-axes annotation of shard_map ({V:data}) dropped
        return ", ".join(
            re.sub(r"\{[^}]*\}", "", a.str_short(short_dtypes=True)) for a in avals
        )

    return f"({short(node.in_avals)}) -> {short(node.out_avals)}"


def _frame_dict(eqn: Any, callers: Sequence[Any] = ()) -> dict[str, Any]:
    frame, _ = frames.user_frame(eqn.source_info)
    for caller in reversed(tuple(callers)):
        if frame is not None:
            break
        frame, _ = frames.user_frame(caller.source_info)
    if frame is None:
        return {"primitive": eqn.primitive.name, "file": None, "line": None}
    return {
        "primitive": eqn.primitive.name,
        "file": frame.file_name,
        "line": frame.line_num,
        "function": frame.function_name,
        "code": linecache.getline(frame.file_name, frame.line_num).strip() or None,
    }


def _nan_event(
    run: replay.Run, det: Any, cone: set[int] | None
) -> dict[str, Any] | None:
    """The first NaN-creating equation, when the first event made only Inf.

    The detect pass records it beside the first event; only when it lies
    outside the cone of the bad outputs does a pass restricted to the cone
    run (block-wise, reusing the blocks the cone holds whole).
    """
    index = det.nan_index
    if index >= 0 and cone is not None and det.nodes[index].unit not in cone:
        det, _, _ = run.detect(allow=lambda n: n.unit in cone)
        index = det.nan_index
    if index < 0:
        return None
    node = det.nodes[index]
    return _frame_dict(node.eqn, node.callers)


def _input_diagnosis(run: replay.Run, common: dict) -> Diagnosis:
    nonfinite = common["nonfinite_inputs"]
    found = causes.classify_inputs(nonfinite)
    elements, consumed = {}, {}
    device = None
    for k, path in enumerate(run.in_paths):
        if path not in nonfinite:
            continue
        x = run.leaves[k]
        if dtypes.is_inexact_dtype(replay.dtype_of(x)):
            # Read shard by shard: an argument spanning processes is never
            # gathered whole (every process takes this branch: lock-step).
            elements[path] = hosts.first_nonfinite(x, 3)
            if device is None and elements[path]:
                device = hosts.holder(x, elements[path][0])
        hit = _first_consumer(run.closed.jaxpr, run.closed.jaxpr.invars[k])
        if hit is not None:
            consumed[path] = _frame_dict(*hit)
    return Diagnosis(
        found=True,
        phase=Phase.INPUT,
        cause=found.cause,
        fix=found.fix,
        inputs_seen=found.seen,
        input_elements=elements,
        consumed_by=consumed,
        device=device,
        process=hosts.process_of(device),
        **common,
    )


def _first_consumer(jaxpr: Any, var: Any, callers: tuple = ()):
    """(equation, callers) of the first equation computing with `var`."""
    for eqn in jaxpr.eqns:
        pos = [
            i
            for i, v in enumerate(eqn.invars)
            if not isinstance(v, jex_core.Literal) and v is var
        ]
        if not pos:
            continue
        name = eqn.primitive.name
        subs = primitives.sub_jaxprs(eqn, strict=False)
        if len(subs) == 1 and subs[0].role == primitives.Role.CALL:
            inner = subs[0].jaxpr
            if len(inner.invars) == len(eqn.invars):
                hit = _first_consumer(inner, inner.invars[pos[0]], (*callers, eqn))
                if hit is not None:
                    return hit
        if name in primitives.REARRANGING and len(eqn.outvars) == 1:
            hit = _first_consumer(jaxpr, eqn.outvars[0], callers)
            if hit is not None:
                return hit
        return eqn, callers
    return None
