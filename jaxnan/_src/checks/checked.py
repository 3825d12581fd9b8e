"""`checked`: signature-preserving finite checks on a loss and on its gradients.

`checked(fn)` returns a function with `fn`'s arguments and outputs. It checks
the floating leaves of the arguments (phase ``input``), of the outputs
(``forward``) and, through a `jax.custom_vjp` identity on the arguments, the
cotangents that flow back to each argument (``backward``), that is the
gradients with respect to params and batch (`report.Phase`).

The pieces: `device` (the in-graph checks and how their reports stay alive),
`host` (records, messages and policies), `state` (state updates made by `fn`
on mutable arguments, such as Flax NNX modules, reach the caller's objects).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.extend import source_info_util
from jax.interpreters import ad

from jaxnan._src.checks import check, device, host, processes
from jaxnan._src.checks.host import NonfiniteRecord
from jaxnan._src.core import dtypes, tree, validation
from jaxnan._src.core.errors import Phase
from jaxnan._src.frameworks import state

source_info_util.register_exclusion(__file__)


def _call_signature(fn: Callable, args: tuple, kwargs: dict) -> str:
    """The `(params, batch, k=k)` text of a call, for the locate hint."""
    names = validation.argument_names(fn, len(args))
    return "(" + ", ".join(names + [f"{k}={k}" for k in sorted(kwargs)]) + ")"


def _require_callable(fn: Any, where: str) -> None:
    if not callable(fn):
        use = (
            '@jaxnan.checked or @jaxnan.checked(on_nonfinite="warn") above a '
            "function definition, or jaxnan.checked(loss_fn)"
            if where == "checked"
            else f"jaxnan.{where}(loss_fn, argnums=0)"
        )
        raise TypeError(
            f"jaxnan.{where}: fn must be callable, got {type(fn).__name__}: "
            f"{fn!r}. Use it as {use}."
        )


def _validate(fn: Any, on_nonfinite: Any, inputs: Any, outputs: Any, grads: Any):
    if fn is not None:
        _require_callable(fn, "checked")
    if not callable(on_nonfinite) and on_nonfinite not in host.POLICIES:
        raise ValueError(
            f"jaxnan.checked: on_nonfinite={on_nonfinite!r} is not supported. "
            'Use "raise", "warn", "ignore" or a callable that takes a '
            "jaxnan.NonfiniteRecord."
        )
    for name, value in (("inputs", inputs), ("outputs", outputs), ("grads", grads)):
        if not isinstance(value, bool):
            raise TypeError(f"jaxnan.checked: {name}={value!r} must be True or False.")


def checked(
    fn: Callable | None = None,
    *,
    on_nonfinite: str | Callable[[NonfiniteRecord], Any] = "raise",
    inputs: bool = True,
    outputs: bool = True,
    grads: bool = True,
) -> Callable:
    """Checks a function's arguments, outputs and gradients for NaN and +-Inf.

    The returned function has `fn`'s signature and returns exactly what `fn`
    returns, so a decorated loss needs no change at its call sites:
    ``jax.jit(jax.value_and_grad(loss_fn))(params, batch)`` still works, under
    `jit`, `vmap`, `grad`, `value_and_grad` (grad of grad too), `lax.scan`
    and `jax.checkpoint`. Three trees are checked, each named by a
    `jaxnan.Phase` (the ``phase`` of the error's details and of the record):

    - ``input``: the floating leaves of the arguments;
    - ``forward``: the floating leaves of the outputs (reported only
      when the inputs were finite, so one bad batch gives one report);
    - ``backward``: the cotangents flowing back to each argument, i.e. the
      gradients with respect to params and batch. A `jax.custom_vjp` identity
      on the floating array arguments sees them; integer, boolean and
      non-array arguments (static flags, step counters, strings) and keyword
      arguments pass through untouched. Only the arguments actually being
      differentiated are checked.

    What counts: NaN anywhere; +Inf and -Inf in every floating array (the
    arguments, such as parameters and batch, the outputs, such as the loss,
    and the gradients). A Python float leaf is a constant a model stores
    (``-inf`` as the initial value of `eqx.nn.MaxPool2d`, a mask fill value):
    it counts only when it is NaN. So does an array a Flax NNX model stores
    in a Variable that is neither an `nnx.Param` nor an `nnx.BatchStat` (a
    ``jnp.full(shape, -jnp.inf)`` attention mask): not trained, a constant.
    An Inf in a parameter, a gradient or the loss always counts.
    One bad step gives one report: when the arguments were reported, the
    outputs and gradients are not; when the outputs were, the gradients are
    not.

    State: `fn` is handed its arguments rebuilt (their floating leaves pass
    through an identity whose derivative checks the gradients); whatever `fn`
    does to mutable arguments (Flax NNX Variables: `BatchStat`, `RngState`
    counters, sown intermediates) reaches the caller's objects, exactly as
    without the decorator. Pure state (linen's ``mutable=`` collections,
    Equinox's ``State``) is returned by `fn` and passes through unchanged.

    On a healthy step
    each checked tree costs one fused reduction and a `lax.cond` that is not
    taken: nothing is sent to the host. Only when a tree is nonfinite does the
    other branch count the nonfinite values per leaf and call the host (a
    `jax.pure_callback` tied into the outputs and gradients, so the program
    carries no JAX effect; `jax.debug.callback` with ``grads=False``).
    Reports arrive when the program runs: dispatch is asynchronous, so block
    on the results (or read them) before you look for a warning or a record.
    Under `vmap` the flag is reduced over the batch first, so a batch with
    one bad example gives exactly one report (counts summed over the batch)
    and a healthy batch gives none. Outside `vmap`, `shard_map` or `pmap`
    bodies report once per device. Under `jax.checkpoint` (remat),
    `jax.value_and_grad` runs the forward pass a second time while
    differentiating, and JAX runs the callbacks in it again: a forward report
    then arrives twice, identical (``"warn"`` prints it once; a callable gets
    both records); `jax.grad`, which drops the value, reports it once.

    Sharded values and multi-process `jax.distributed`: every process
    reports. The predicate is the in-graph one, reduced over the whole
    global value, so every process takes the reporting branch of the same
    step; the report callback of a check on values sharded over a mesh then
    runs on every device of that mesh (JAX would run it on the program's
    first device only). ``"raise"`` raises on every process (every device
    stops at the same point, so none is left waiting in a collective: the
    next step runs); ``"warn"`` and a callable act once per process, with
    the same counts, summed over the whole global batch.

    The message names the function, the phase, every nonfinite leaf by path
    with its NaN/+Inf/-Inf counts, and ends with the line to run for a full
    diagnosis, such as ``jaxnan.locate(loss_fn)(params, batch)`` (or
    ``jaxnan.locate(jax.value_and_grad(loss_fn))(params, batch)`` for the
    backward phase).

    Forward-mode differentiation (`jax.jvp`, `jax.jacfwd`, `jax.hessian`) of
    a custom_vjp is not defined in JAX: use ``grads=False`` there.

    Args:
        fn: the function to check. Leave it out to get a decorator:
            ``@jaxnan.checked(on_nonfinite="warn")``.
        on_nonfinite: ``"raise"`` (the default): raise `jaxnan.NonFiniteError`
            when running eagerly; inside a compiled program the runtime wraps
            it in a `jax.errors.JaxRuntimeError` quoting it (printed once):
            run the step inside ``with jaxnan.nonfinite_errors():`` to get
            the `NonFiniteError` back. ``"warn"``: a `RuntimeWarning` at the
            user's line that called `fn` (or the transformed step that traced
            it), once per bad step, filtered as Python filters warnings; then
            go on. ``"ignore"``: no checks at all (`fn` runs as is, at no
            cost). A callable: called on the host with a
            `jaxnan.NonfiniteRecord`. With a guard such as
            `jaxnan.skip_nonfinite` keeping training alive, use ``"warn"``.
        inputs: check the arguments.
        outputs: check the outputs.
        grads: check the gradients flowing back to the arguments.

    Returns:
        A function with `fn`'s signature, name and docstring
        (`functools.wraps`) returning ``fn(*args, **kwargs)`` unchanged, or a
        decorator when `fn` is left out.

    Raises:
        TypeError: when `fn` is not callable, or `inputs`, `outputs` or
            `grads` is not a bool.
        ValueError: when `on_nonfinite` is not one of the choices above.
        NonFiniteError: (eagerly, with ``on_nonfinite="raise"``) when a
            checked tree holds a NaN or an Inf.

    Examples:
        >>> import jax, jax.numpy as jnp, jaxnan
        >>> @jaxnan.checked
        ... def loss_fn(params, batch):
        ...     return jnp.sum(jnp.sqrt(params["w"]) * batch["x"])
        >>> params, batch = {"w": jnp.array([1.0, 4.0])}, {"x": jnp.ones(2)}
        >>> jax.jit(jax.value_and_grad(loss_fn))(params, batch)
        (Array(3., dtype=float32), {'w': Array([0.5 , 0.25], dtype=float32)})
        >>> try:
        ...     jax.grad(loss_fn)({"w": jnp.array([0.0, 4.0])}, batch)
        ... except jaxnan.NonFiniteError as e:
        ...     print(e)
        jaxnan: nonfinite values in the gradients flowing back to the arguments
        of `loss_fn` [phase backward]:
          params['w']: 1 +inf
        They were made while differentiating it (or came in with the output
        cotangent).
        For a full diagnosis run:
          jaxnan.locate(jax.value_and_grad(loss_fn))(params, batch)

    .. versionadded:: 0.1.0
    """
    _validate(fn, on_nonfinite, inputs, outputs, grads)
    if fn is None:
        return functools.partial(
            checked,
            on_nonfinite=on_nonfinite,
            inputs=inputs,
            outputs=outputs,
            grads=grads,
        )
    name = check.function_name(fn)
    short = getattr(fn, "__name__", None) or name.rsplit(".", 1)[-1]

    if on_nonfinite == "ignore" or not (inputs or outputs or grads):

        @functools.wraps(fn)
        def passthrough(*args, **kwargs):
            return fn(*args, **kwargs)

        return passthrough

    reporter = host.Reporter(name, on_nonfinite)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        site = host.user_call_site()
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        paths = check.input_paths(fn, args, kwargs)
        call = _call_signature(fn, args, kwargs)
        forward_hint = f"jaxnan.locate({short}){call}"
        # Which positional argument each leaf came from (None: a kwarg).
        owner: list[int | None] = []
        for i, a in enumerate(args):
            owner += [i] * len(jax.tree_util.tree_leaves(a))
        owner += [None] * (len(leaves) - len(owner))
        # Values sharded over a mesh: the report runs on each of its devices.
        mesh = processes.mesh_of(leaves)
        report = functools.partial(
            device.check, reporter=reporter, site=site, tie=grads, mesh=mesh
        )

        # grads=True: the callbacks are `pure_callback`s tied into the outputs
        # and the cotangents (no effect, fast dispatch). grads=False (for
        # forward-mode AD, where custom_vjp is not defined): effects.
        in_ok, in_token = None, None
        if inputs:
            in_ok, in_token = report(
                leaves,
                paths,
                Phase.INPUT,
                hint=forward_hint,
                constants=state.constant_leaves((args, kwargs)),
            )

        handed = list(leaves)
        seen: list = []  # the forward verdict, handed to the backward check
        if grads:
            _reject_forward_mode(name, leaves)
            idx = [
                i
                for i, x in enumerate(leaves)
                if isinstance(x, jax.Array) and dtypes.is_checked_leaf(x)
            ]

            def on_cotangents(live, cts, ok):
                argnums = sorted({owner[idx[j]] for j in live} - {None})
                spec = "" if argnums in ([], [0]) else f", argnums={tuple(argnums)}"
                if len(argnums) == 1 and spec:
                    spec = f", argnums={argnums[0]}"
                hint = f"jaxnan.locate(jax.value_and_grad({short}{spec})){call}"
                live_paths = [paths[idx[j]] for j in live]
                # Gradients of a bad batch or loss already reported: no second
                # report (`seen` holds the forward verdict, see tie_outputs).
                skip = None if in_ok is None else ~ok
                if seen:
                    skip = ~seen[-1] if skip is None else skip | ~seen[-1]
                _, token = report(
                    cts, live_paths, Phase.BACKWARD, hint=hint, tie=True, skip=skip
                )
                return token

            if idx:
                probed = device.probe(
                    [leaves[i] for i in idx],
                    on_cotangents,
                    [owner[i] for i in idx],
                    in_ok,
                )
                for i, x in zip(idx, probed):
                    handed[i] = x
        if all(h is x for h, x in zip(handed, leaves)):
            call_args, call_kwargs = args, kwargs
        else:
            call_args, call_kwargs = jax.tree_util.tree_unflatten(treedef, handed)

        out = fn(*call_args, **call_kwargs)
        # What fn did to mutable arguments (NNX Variables) reaches the caller.
        if call_args is not args or call_kwargs is not kwargs:
            state.write_back((args, kwargs), (call_args, call_kwargs), leaves, handed)

        out_token = out_ok = None
        if outputs:
            out_paths = [p for p, _ in tree.paths_and_leaves(out, "output")]
            skip = None if in_ok is None else ~in_ok
            out_ok, out_token = report(
                jax.tree_util.tree_leaves(out),
                out_paths,
                Phase.FORWARD,
                hint=forward_hint,
                skip=skip,
            )
        token = device.add_tokens(in_token, out_token)
        if token is None:
            return out
        out_leaves, out_def = jax.tree_util.tree_flatten(out)
        if not any(
            isinstance(x, jax.Array) and dtypes.is_checked_leaf(x) for x in out_leaves
        ):
            # Nothing to tie into: keep the callbacks alive as an effect.
            jax.debug.callback(lambda t: None, token)
            return out
        quiet = out_ok if in_ok is None or out_ok is None else out_ok | ~in_ok
        tied = device.tie_outputs(out_leaves, token, quiet, seen)
        return jax.tree_util.tree_unflatten(out_def, tied)

    return wrapped


def checked_grad(
    fn: Callable,
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    *,
    on_nonfinite: str | Callable[[NonfiniteRecord], Any] = "raise",
    inputs: bool = True,
    outputs: bool = True,
    grads: bool = True,
    holomorphic: bool = False,
    allow_int: bool = False,
) -> Callable:
    """`jax.grad` that checks the arguments, the loss and the gradients.

    A drop-in replacement of ``jax.grad(fn, argnums, has_aux)`` with the same
    semantics, equal to ``jax.grad(jaxnan.checked(fn, ...), ...)``: the
    gradients it returns are exactly the cotangents that `checked` checks in
    the ``"backward"`` phase, by the path of each differentiated argument.
    See `jaxnan.checked` for the checks, their cost and `on_nonfinite`.

    Args:
        fn: the function to differentiate.
        argnums: as in `jax.grad`.
        has_aux: as in `jax.grad`.
        on_nonfinite: ``"raise"``, ``"warn"``, ``"ignore"`` or a callable, as
            in `jaxnan.checked`.
        inputs: check the arguments.
        outputs: check the loss (and the aux output).
        grads: check the gradients.
        holomorphic: as in `jax.grad`.
        allow_int: as in `jax.grad`.

    Returns:
        The gradient function, as `jax.grad` returns it.

    Raises:
        TypeError: when `fn` is not callable.
        ValueError: when `on_nonfinite` is not one of the choices.

    Examples:
        >>> import jax.numpy as jnp, jaxnan
        >>> grad_fn = jaxnan.checked_grad(lambda w: jnp.sum(jnp.log(w)))
        >>> grad_fn(jnp.array([1.0, 2.0]))
        Array([1. , 0.5], dtype=float32)
        >>> try:
        ...     grad_fn(jnp.array([1.0, -2.0]))
        ... except jaxnan.NonFiniteError as e:
        ...     print(e)
        jaxnan: nonfinite values in the outputs of ...

    .. versionadded:: 0.1.0
    """
    _require_callable(fn, "checked_grad")
    inner = checked(
        fn, on_nonfinite=on_nonfinite, inputs=inputs, outputs=outputs, grads=grads
    )
    return jax.grad(
        inner,
        argnums=argnums,
        has_aux=has_aux,
        holomorphic=holomorphic,
        allow_int=allow_int,
    )


def checked_value_and_grad(
    fn: Callable,
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    *,
    on_nonfinite: str | Callable[[NonfiniteRecord], Any] = "raise",
    inputs: bool = True,
    outputs: bool = True,
    grads: bool = True,
    holomorphic: bool = False,
    allow_int: bool = False,
) -> Callable:
    """`jax.value_and_grad` that checks the arguments, the value and the gradients.

    A drop-in replacement of ``jax.value_and_grad(fn, argnums, has_aux)`` with
    the same semantics, equal to
    ``jax.value_and_grad(jaxnan.checked(fn, ...), ...)``. See `jaxnan.checked`
    for the checks, their phases, their cost and `on_nonfinite`.

    Args:
        fn: the function to differentiate.
        argnums: as in `jax.value_and_grad`.
        has_aux: as in `jax.value_and_grad`.
        on_nonfinite: ``"raise"``, ``"warn"``, ``"ignore"`` or a callable, as
            in `jaxnan.checked`.
        inputs: check the arguments.
        outputs: check the value (and the aux output).
        grads: check the gradients.
        holomorphic: as in `jax.value_and_grad`.
        allow_int: as in `jax.value_and_grad`.

    Returns:
        The function returning ``(value, grads)`` (``((value, aux), grads)``
        with `has_aux`), as `jax.value_and_grad` returns it.

    Raises:
        TypeError: when `fn` is not callable.
        ValueError: when `on_nonfinite` is not one of the choices.

    Examples:
        >>> import jax, jax.numpy as jnp, jaxnan
        >>> def loss(w, x):
        ...     return jnp.sum(w * x)
        >>> step = jax.jit(jaxnan.checked_value_and_grad(loss, argnums=(0, 1)))
        >>> step(jnp.ones(2), jnp.array([1.0, 2.0]))
        (Array(3., dtype=float32), (Array([1., 2.], dtype=float32),
                                    Array([1., 1.], dtype=float32)))

    .. versionadded:: 0.1.0
    """
    _require_callable(fn, "checked_value_and_grad")
    inner = checked(
        fn, on_nonfinite=on_nonfinite, inputs=inputs, outputs=outputs, grads=grads
    )
    return jax.value_and_grad(
        inner,
        argnums=argnums,
        has_aux=has_aux,
        holomorphic=holomorphic,
        allow_int=allow_int,
    )


def _under_forward_mode(x: Any) -> bool:
    """True when `x` is traced by forward-mode AD (`jax.jvp`, `jax.jacfwd`)."""
    while x is not None:
        if isinstance(x, ad.JVPTracer):
            return True
        x = getattr(x, "primal", None) if isinstance(x, jax.core.Tracer) else None
    return False


def _reject_forward_mode(name: str, leaves: list) -> None:
    """A clear error where JAX would give its bare custom_vjp message."""
    if any(_under_forward_mode(x) for x in leaves):
        raise TypeError(
            f"jaxnan.checked(`{name}`) with grads=True checks gradients through "
            "a jax.custom_vjp, which JAX cannot differentiate in forward mode "
            "(jax.jvp, jax.jacfwd, jax.hessian). Use "
            f"jaxnan.checked({name.rsplit('.', 1)[-1]}, grads=False) there: the "
            "inputs and outputs are still checked."
        )
