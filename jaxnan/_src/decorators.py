"""`checked`: signature-preserving finite checks on a loss and on its gradients.

`checked(fn)` returns a function with `fn`'s arguments and outputs. It checks
the floating leaves of the arguments ("forward-inputs"), of the outputs
("forward-outputs") and, through a `jax.custom_vjp` identity on the
arguments, the cotangents that flow back to each argument ("backward"), that
is the gradients with respect to params and batch.

Cost on a healthy step: one fused reduction per checked tree (`tree.all_finite`)
and a `lax.cond` whose reporting branch is not taken; nothing goes to the
host. Only when a tree is nonfinite does the reporting branch count NaN/+Inf/-Inf
per leaf (`tree.counts_matrix`) and hand the counts to the host. With
``grads=True`` (the default) that is a `jax.pure_callback` whose float32
result (always 0) is tied into the outputs and, through `jax.custom_vjp`
identities, into the output cotangent and the gradients (`_tie`,
`_tie_outputs`, `_probe`): the program has no JAX effect, so a jitted step
keeps the fast C++ dispatch path, and JAX keeps each callback exactly as long
as a value it is tied to is used. With ``grads=False`` (forward-mode AD,
where `custom_vjp` is undefined) the host is called by `jax.debug.callback`.

The vmap trap: under `vmap` a `lax.cond` with a batched predicate becomes a
`select` that runs both branches, so a callback inside would fire on every
example. The predicate and the counts are therefore reduced over the batch by
two tiny `jax.custom_batching.custom_vmap` functions (`_fold_all`,
`_fold_sum`) whose batching rule reduces the batch axis and returns an
unbatched value; the cond stays a cond and reports once per vmapped call.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_batching import custom_vmap
from jax.custom_derivatives import SymbolicZero
from jax.extend import source_info_util

from jaxnan._src import base, checks, report, tree

source_info_util.register_exclusion(__file__)

PHASES = ("forward-inputs", "forward-outputs", "backward")
_POLICIES = ("raise", "warn", "ignore")


class NonfiniteRecord(NamedTuple):
    """What `jaxnan.checked` found, as given to an `on_nonfinite` callable.

    Attributes:
        function: the name of the checked function.
        phase: ``"forward-inputs"`` (its arguments), ``"forward-outputs"``
            (its outputs, with finite arguments) or ``"backward"`` (the
            gradients flowing back to its arguments).
        leaves: ``{path: (nan, +inf, -inf)}`` for every nonfinite leaf, such
            as ``{"batch['x']": (1, 0, 0)}``. Under `vmap` the counts are
            summed over the batch.
        examples: ``(bad, total)``: how many examples of the vmapped batch
            were nonfinite; ``(1, 1)`` outside `vmap`.
        message: the text `"raise"` and `"warn"` would show.

    Examples:
        >>> import jaxnan
        >>> r = jaxnan.NonfiniteRecord("loss", "backward", {"w": (1, 0, 0)}, (1, 1), "")
        >>> r.phase, r.leaves
        ('backward', {'w': (1, 0, 0)})

    .. versionadded:: 0.1.0
    """

    function: str
    phase: str
    leaves: dict[str, tuple[int, int, int]]
    examples: tuple[int, int]
    message: str


# --------------------------------------------------------------------------
# Batch folding: keeps the report predicate unbatched under vmap.


@custom_vmap
def _fold_all(ok: jax.Array) -> jax.Array:
    return ok


@_fold_all.def_vmap
def _fold_all_rule(axis_size, in_batched, ok):
    del axis_size
    if in_batched[0]:
        # Calling _fold_all again folds the next vmap level out, if any.
        return _fold_all(jnp.all(ok, axis=0)), False
    return ok, False


@custom_vmap
def _fold_sum(c: jax.Array) -> jax.Array:
    return c


@_fold_sum.def_vmap
def _fold_sum_rule(axis_size, in_batched, c):
    # Runs only for a batched input; nested vmaps fold one level each.
    del axis_size
    if in_batched[0]:
        return _fold_sum(jnp.sum(c, axis=0)), False
    return c, False


# --------------------------------------------------------------------------
# Host side.


class _DropOwnErrors(logging.Filter):
    """Drops jax's "debug.callback failed" log lines for our own raise.

    The error itself still propagates (as `NonFiniteError` eagerly, inside a
    runtime error under jit), so the log line would only repeat it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, report.NonFiniteError)


# What a reporting callback returns: tied into the outputs, it keeps the
# callback alive (see `_check`).
_ZERO = np.zeros((), np.float32)

_FILTER = _DropOwnErrors()
_DEBUG_LOGGER = logging.getLogger("jax._src.debugging")
if not any(isinstance(f, _DropOwnErrors) for f in _DEBUG_LOGGER.filters):
    _DEBUG_LOGGER.addFilter(_FILTER)

_ADVICE = {
    "forward-inputs": "Clean or drop the bad input rows, or find where they were made.",
    "forward-outputs": "They were created inside the function.",
    "backward": (
        "They were made while differentiating it (or came in with the "
        "output cotangent)."
    ),
}


def _message(
    name: str,
    phase: str,
    rows: list[tuple[str, tuple[int, int, int]]],
    examples: tuple[int, int],
    hint: str,
) -> str:
    where = {
        "forward-inputs": f"in the inputs of `{name}`",
        "forward-outputs": f"in the outputs of `{name}` (its inputs were finite)",
        "backward": f"in the gradients flowing back to the arguments of `{name}`",
    }[phase]
    text = f"jaxnan: nonfinite values {where} [phase {phase}]:\n"
    text += report.leaf_lines(rows)
    bad, total = examples
    if total > 1:
        text += (
            f"\nin {bad} of {total} examples of the vmapped batch "
            "(counts summed over the batch)."
        )
    text += f"\n{_ADVICE[phase]}\nFor a full diagnosis run:\n  {hint}"
    return text


class _Reporter:
    """Turns counts from the device into a raise, a warning or a call."""

    def __init__(self, name: str, policy: str | Callable):
        self.name = name
        self.policy = policy
        self.seen: set[str] = set()
        self.lock = threading.Lock()

    def host_fn(
        self, phase: str, paths: Sequence[str], hint: str, box: list
    ) -> Callable:
        paths = tuple(paths)

        def host(counts, bad, total):
            c = np.asarray(counts).reshape(len(paths), 3)
            rows = [
                (p, tuple(int(v) for v in row)) for p, row in zip(paths, c) if row.any()
            ]
            if not rows:  # pragma: no cover - the branch runs only when bad
                return _ZERO
            examples = (int(bad), int(total))
            text = _message(self.name, phase, rows, examples, hint)
            if self.policy == "raise":
                err = report.NonFiniteError(
                    text,
                    {
                        "function": self.name,
                        "phase": phase,
                        "leaves": dict(rows),
                        "examples": examples,
                    },
                )
                box.append(err)
                raise err
            if self.policy == "warn":
                with self.lock:
                    if text in self.seen:
                        return _ZERO
                    self.seen.add(text)
                warnings.warn(text, RuntimeWarning, stacklevel=2)
                return _ZERO
            self.policy(NonfiniteRecord(self.name, phase, dict(rows), examples, text))
            return _ZERO

        return host


# --------------------------------------------------------------------------
# Device side.


def _check(
    leaves: list,
    paths: Sequence[str],
    phase: str,
    reporter: _Reporter,
    hint: str,
    *,
    tie: bool,
    skip: jax.Array | None = None,
) -> tuple[jax.Array | None, jax.Array | None]:
    """Reports the nonfinite leaves of `leaves`: ``(all-finite flag, token)``.

    `skip` (a bool, per example under vmap) suppresses the report where it is
    True (used to report outputs only when the inputs were finite).

    With ``tie=False`` the host is called by `jax.debug.callback`, an effect
    that JAX never removes; the token is None. With ``tie=True`` it is called
    by `jax.pure_callback`, which has no effect, so the program keeps JAX's
    fast dispatch path and XLA schedules it freely (measured on the MLP step:
    an untaken `debug.callback` branch cost 1.33x, a `pure_callback` one
    1.17x, against 1.14x for the check alone). Its float32 result (always 0)
    is the token: the caller must tie it into values the user consumes
    (`_tie`), or JAX would delete the unused callback.
    """
    pairs = [(p, x) for p, x in zip(paths, leaves) if base.is_checked_leaf(x)]
    if not pairs:
        return None, None
    paths = [p for p, _ in pairs]
    xs = [lax.stop_gradient(jnp.asarray(x)) for _, x in pairs]
    # Arguments are all ready at once: their small leaves share a reduction.
    ok = (
        tree.all_finite_packed(xs) if phase == "forward-inputs" else tree.all_finite(xs)
    )
    quiet = ok if skip is None else ok | lax.stop_gradient(skip)
    box: list = []
    host = reporter.host_fn(phase, paths, hint, box)

    def no_report(operands):
        del operands
        return jnp.zeros((), jnp.float32) if tie else None

    def do_report(operands):
        xs, quiet = operands
        counts = _fold_sum(tree.counts_matrix(xs, pack=True))
        # Batched exactly when `quiet` is, so that vmap sees (and folds) it.
        bad = _fold_sum((~quiet).astype(jnp.int32))
        total = _fold_sum((quiet | True).astype(jnp.int32))
        if not tie:
            jax.debug.callback(host, counts, bad, total)
            return None
        return jax.pure_callback(
            host,
            jax.ShapeDtypeStruct((), jnp.float32),
            counts,
            bad,
            total,
            vmap_method="sequential",
        )

    eager = not any(base.is_traced(x) for x in xs) and not base.is_traced(quiet)
    try:
        token = lax.cond(_fold_all(quiet), no_report, do_report, (xs, quiet))
    except Exception:
        if eager and box:  # our own NonFiniteError, wrapped by the runtime
            raise box[0] from None
        raise
    return ok, token


def _add_tokens(*tokens: jax.Array | None) -> jax.Array | None:
    live = [t for t in tokens if t is not None]
    return sum(live[1:], live[0]) if live else None


def _tie(leaves: list, token: jax.Array | None, groups: Sequence[Any] = ()) -> list:
    """`leaves`, with `token` (a float32 0) tied into the smallest floating one.

    ``x - token * 0`` is `x` bit for bit (also -0.0, Inf and NaN), and XLA
    cannot fold ``token * 0`` (it would be NaN for a NaN token), so the
    computation of `token`, and the callback in it, stays alive exactly as
    long as `x` is used. With `groups` (one label per leaf), one leaf per
    label is tied, so that each differentiated argument carries it. None
    leaves (symbolic zeros) are skipped.
    """
    if token is None:
        return leaves
    labels = list(groups) if groups else [0] * len(leaves)
    best: dict[Any, int] = {}
    for i, (x, g) in enumerate(zip(leaves, labels)):
        if x is None or not base.is_checked_leaf(x):
            continue
        if g not in best or jnp.size(x) < jnp.size(leaves[best[g]]):
            best[g] = i
    out = list(leaves)
    for i in best.values():
        x = jnp.asarray(out[i])
        out[i] = x - (token * 0).astype(x.dtype)
    return out


def _tie_outputs(leaves: list, token: jax.Array) -> list:
    """Ties `token` into the outputs and, under reverse-mode AD, into their cotangents.

    `jax.grad` drops the outputs themselves; tied into the cotangent that
    flows back through `fn`, the forward checks survive it.
    """
    idx = [i for i, x in enumerate(leaves) if base.is_checked_leaf(x)]
    if not idx:
        return leaves

    @jax.custom_vjp
    def tie(xs, token):
        return tuple(_tie(list(xs), token))

    def fwd(xs, token):
        values = [p.value for p in xs]
        return tuple(_tie(values, token.value)), token.value

    def bwd(token, cts):
        live = [None if isinstance(c, SymbolicZero) else c for c in cts]
        tied = _tie(live, token)
        return tuple(tied), None

    tie.defvjp(fwd, bwd, symbolic_zeros=True)
    tied = tie(tuple(leaves[i] for i in idx), token)
    out = list(leaves)
    for i, x in zip(idx, tied):
        out[i] = x
    return out


def _probe(leaves: list, on_cotangents: Callable, groups: Sequence[Any]) -> list:
    """Identity on `leaves` whose VJP hands the cotangents to `on_cotangents`.

    Only the leaves that are being differentiated (perturbed) are passed on,
    as ``on_cotangents(index_list, cotangent_list)``, which returns a token
    (or None). The cotangents are returned unchanged, bit for bit, with the
    token tied into one of them per label of `groups` (per argument).
    """

    @jax.custom_vjp
    def ident(xs):
        return xs

    def fwd(xs):
        values = tuple(p.value for p in xs)
        # The residual has no leaves: its tree structure carries the mask.
        mask = tuple(() if p.perturbed else None for p in xs)
        return values, mask

    def bwd(mask, cts):
        live = [
            i
            for i, (m, ct) in enumerate(zip(mask, cts))
            if m is not None and not isinstance(ct, SymbolicZero)
        ]
        out = [cts[i] if i in live else None for i in range(len(cts))]
        if live:
            token = on_cotangents(live, [cts[i] for i in live])
            out = _tie(out, token, groups)
        return (tuple(out),)

    ident.defvjp(fwd, bwd, symbolic_zeros=True)
    return list(ident(tuple(leaves)))


def _call_signature(fn: Callable, args: tuple, kwargs: dict) -> str:
    """The `(params, batch, k=k)` text of a call, for the locate hint."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = []
    for i in range(len(args)):
        if i < len(params) and params[i].kind in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            names.append(params[i].name)
        else:
            names.append(f"args[{i}]")
    text = ", ".join(names + [f"{k}={k}" for k in sorted(kwargs)])
    return f"({text})"


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
    if not callable(on_nonfinite) and on_nonfinite not in _POLICIES:
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
    and `jax.checkpoint`. Three trees are checked, each named by a phase:

    - ``"forward-inputs"``: the floating leaves of the arguments;
    - ``"forward-outputs"``: the floating leaves of the outputs (reported only
      when the inputs were finite, so one bad batch gives one report);
    - ``"backward"``: the cotangents flowing back to each argument, i.e. the
      gradients with respect to params and batch. A `jax.custom_vjp` identity
      on the floating array arguments sees them; integer, boolean and
      non-array arguments (static flags, step counters, strings) and keyword
      arguments pass through untouched. Only the arguments actually being
      differentiated are checked.

    NaN, +Inf and -Inf count as nonfinite (`jnp.isfinite`). On a healthy step
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
            when running eagerly; inside a compiled program the runtime error
            that `jax.jit` raises carries the same text. ``"warn"``: a
            `RuntimeWarning`, once per distinct message, and go on.
            ``"ignore"``: no checks at all (`fn` runs as is, at no cost). A
            callable: called on the host with a `jaxnan.NonfiniteRecord`.
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
    name = checks.function_name(fn)
    short = getattr(fn, "__name__", None) or name.rsplit(".", 1)[-1]

    if on_nonfinite == "ignore" or not (inputs or outputs or grads):

        @functools.wraps(fn)
        def passthrough(*args, **kwargs):
            return fn(*args, **kwargs)

        return passthrough

    reporter = _Reporter(name, on_nonfinite)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        paths = checks.input_paths(fn, args, kwargs)
        call = _call_signature(fn, args, kwargs)
        forward_hint = f"jaxnan.locate({short}){call}"
        # Which positional argument each leaf came from (None: a kwarg).
        owner: list[int | None] = []
        for i, a in enumerate(args):
            owner += [i] * len(jax.tree_util.tree_leaves(a))
        owner += [None] * (len(leaves) - len(owner))

        # grads=True: the callbacks are `pure_callback`s tied into the outputs
        # and the cotangents (no effect, fast dispatch). grads=False (for
        # forward-mode AD, where custom_vjp is not defined): effects.
        tie = grads
        in_ok, in_token = None, None
        if inputs:
            in_ok, in_token = _check(
                leaves, paths, "forward-inputs", reporter, forward_hint, tie=tie
            )

        if grads:
            idx = [
                i
                for i, x in enumerate(leaves)
                if isinstance(x, jax.Array) and base.is_checked_leaf(x)
            ]

            def on_cotangents(live, cts):
                argnums = sorted({owner[idx[j]] for j in live} - {None})
                spec = "" if argnums in ([], [0]) else f", argnums={tuple(argnums)}"
                if len(argnums) == 1 and spec:
                    spec = f", argnums={argnums[0]}"
                hint = f"jaxnan.locate(jax.value_and_grad({short}{spec})){call}"
                live_paths = [paths[idx[j]] for j in live]
                _, token = _check(cts, live_paths, "backward", reporter, hint, tie=True)
                return token

            if idx:
                probed = _probe(
                    [leaves[i] for i in idx], on_cotangents, [owner[i] for i in idx]
                )
                leaves = list(leaves)
                for i, x in zip(idx, probed):
                    leaves[i] = x
                args, kwargs = jax.tree_util.tree_unflatten(treedef, leaves)

        out = fn(*args, **kwargs)

        out_token = None
        if outputs:
            out_paths = [p for p, _ in tree.paths_and_leaves(out, "output")]
            skip = None if in_ok is None else ~in_ok
            _, out_token = _check(
                jax.tree_util.tree_leaves(out),
                out_paths,
                "forward-outputs",
                reporter,
                forward_hint,
                tie=tie,
                skip=skip,
            )
        token = _add_tokens(in_token, out_token)
        if token is None:
            return out
        out_leaves, out_def = jax.tree_util.tree_flatten(out)
        if not any(base.is_checked_leaf(x) for x in out_leaves):
            # Nothing to tie into: keep the callbacks alive as an effect.
            jax.debug.callback(lambda t: None, token)
            return out
        return jax.tree_util.tree_unflatten(out_def, _tie_outputs(out_leaves, token))

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
