"""`check(fn)`: a pure transform that reports nonfinite inputs and outputs."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import source_info_util

from jaxnan._src.core import errors, hosts, tree, validation

source_info_util.register_exclusion(__file__)


@jax.tree_util.register_pytree_node_class
class Report:
    """What `jaxnan.check` saw: nonfinite counts per input and output leaf.

    A `Report` is a pytree (two int32 arrays, the leaf paths are static), so
    it can be returned from `jit`, carried through `lax.scan` and batched by
    `vmap` (then the counts gain leading batch axes and `throw` sums them).

    Attributes:
        input_counts: int32[..., num_input_leaves, 3], NaN/+Inf/-Inf counts.
        output_counts: int32[..., num_output_leaves, 3].
        input_paths: the input leaf paths, such as ``params['w']``.
        output_paths: the output leaf paths, such as ``output[1]['w']``.
        fn_name: the name of the checked function.

    Raises:
        NonFiniteError: from `throw`, when a leaf was nonfinite.
        TypeError: from `throw` on a traced report (inside a transformation).
    """

    def __init__(
        self,
        input_counts: jax.Array,
        output_counts: jax.Array,
        input_paths: tuple[str, ...],
        output_paths: tuple[str, ...],
        fn_name: str,
    ):
        self.input_counts = input_counts
        self.output_counts = output_counts
        self.input_paths = tuple(input_paths)
        self.output_paths = tuple(output_paths)
        self.fn_name = fn_name

    def tree_flatten(self):
        aux = (self.input_paths, self.output_paths, self.fn_name)
        return (self.input_counts, self.output_counts), aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def ok(self) -> jax.Array:
        """Bool: no input and no output leaf holds a nonfinite value.

        A scalar, or one flag per element for a report batched by `vmap` or
        stacked by `lax.scan`.
        """
        return self.inputs_ok & self.outputs_ok

    @property
    def inputs_ok(self) -> jax.Array:
        """Bool: every input leaf was finite (per batch element, if batched)."""
        return jnp.sum(self.input_counts, axis=(-2, -1)) == 0

    @property
    def outputs_ok(self) -> jax.Array:
        """Bool: every output leaf is finite (per batch element, if batched)."""
        return jnp.sum(self.output_counts, axis=(-2, -1)) == 0

    def _host_rows(self, counts: Any, paths: tuple[str, ...]) -> list:
        if validation.is_traced(counts):
            raise TypeError(
                "jaxnan: Report.throw() and the Report.nonfinite_* methods read "
                "the counts on the host, so they cannot run inside jit, vmap, "
                "scan or grad. Return the report from the transformed function "
                "and call report.throw() outside it."
            )
        # Batched by vmap over a batch sharded across processes, the counts
        # span them: gathered (small), the same on every process.
        c = hosts.read(counts).reshape(-1, len(paths), 3).sum(axis=0)
        return [
            (p, tuple(int(v) for v in row)) for p, row in zip(paths, c) if row.any()
        ]

    def nonfinite_inputs(self) -> dict[str, tuple[int, int, int]]:
        """{path: (nan, +inf, -inf)} for every nonfinite input leaf (host)."""
        return dict(self._host_rows(self.input_counts, self.input_paths))

    def nonfinite_outputs(self) -> dict[str, tuple[int, int, int]]:
        """{path: (nan, +inf, -inf)} for every nonfinite output leaf (host)."""
        return dict(self._host_rows(self.output_counts, self.output_paths))

    def message(self) -> str | None:
        """The error text `throw` would raise, or None when all is finite."""
        ins = self._host_rows(self.input_counts, self.input_paths)
        outs = self._host_rows(self.output_counts, self.output_paths)
        if not ins and not outs:
            return None
        name = f"`{self.fn_name}`"
        if ins:
            text = (
                f"jaxnan: nonfinite values came in with the inputs of {name}:\n"
                + errors.leaf_lines(ins)
            )
            if outs:
                text += "\nand reached its outputs:\n" + errors.leaf_lines(outs)
            else:
                text += "\nits outputs are finite."
            text += "\nClean or drop the bad input rows, or find where they were made."
        else:
            text = (
                f"jaxnan: nonfinite values were created inside {name} "
                "(all inputs were finite):\n"
                + errors.leaf_lines(outs)
                + f"\nRun jaxnan.locate({self.fn_name})(*args) to name the "
                "operation that created them."
            )
        return text

    def throw(self) -> None:
        """Raises `jaxnan.NonFiniteError` when a leaf was nonfinite.

        Call it outside `jit`/`vmap`/`scan`: it reads the counts on the host.

        The error's details (`jaxnan.NonFiniteError`) are: ``function``;
        ``phase``: `jaxnan.Phase.INPUT` when an argument was nonfinite, else
        `jaxnan.Phase.FORWARD` (created while the function ran); ``leaves``:
        the nonfinite leaves of that phase (arguments, else outputs); and
        ``inputs``, ``outputs``: the nonfinite arguments and outputs.

        Raises:
            NonFiniteError: naming every nonfinite leaf by path with its counts.
            TypeError: when called on a traced report (inside a transformation).

        Examples:
            >>> import jax.numpy as jnp, jaxnan
            >>> report, _ = jaxnan.check(jnp.log)(jnp.array([1.0, jnp.nan]))
            >>> try:
            ...     report.throw()
            ... except jaxnan.NonFiniteError as e:
            ...     print(e.details["phase"], e.details["leaves"])
            input {'x': (1, 0, 0)}
        """
        text = self.message()
        if text is not None:
            ins, outs = self.nonfinite_inputs(), self.nonfinite_outputs()
            raise errors.NonFiniteError(
                text,
                errors.Details(
                    function=self.fn_name,
                    phase=errors.Phase.INPUT if ins else errors.Phase.FORWARD,
                    leaves=ins or outs,
                    inputs=ins,
                    outputs=outs,
                ),
            )

    def __repr__(self) -> str:
        if validation.is_traced(self.input_counts) or validation.is_traced(
            self.output_counts
        ):
            return f"Report(fn={self.fn_name!r}, traced)"
        ins, outs = self.nonfinite_inputs(), self.nonfinite_outputs()
        return (
            f"Report(fn={self.fn_name!r}, nonfinite_inputs={ins}, "
            f"nonfinite_outputs={outs})"
        )


def function_name(fn: Callable) -> str:
    """The name of `fn` as its author wrote it, seeing through partials.

    The qualified name without the enclosing functions: ``train_step`` for a
    step returned by ``make_train_step``, ``Trainer.step`` for a method; a
    callable object (a Flax NNX or Equinox module) is named by its class.

    Examples:
        >>> def make_train_step():
        ...     def train_step(state, batch): ...
        ...     return train_step
        >>> function_name(make_train_step())
        'train_step'
    """
    while isinstance(fn, functools.partial):
        fn = fn.func
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if not isinstance(name, str):  # a callable object (a Flax NNX module)
        name = type(fn).__qualname__
    return name.rpartition("<locals>.")[2]


def input_paths(fn: Callable, args: tuple, kwargs: dict) -> list[str]:
    """Leaf paths of the call's arguments, named after fn's parameters."""
    names = validation.argument_names(fn, len(args))
    paths = []
    for name, a in zip(names, args):
        paths += [p for p, _ in tree.paths_and_leaves(a, name)]
    for k in sorted(kwargs):
        paths += [p for p, _ in tree.paths_and_leaves(kwargs[k], k)]
    return paths


def _input_leaves(args: tuple, kwargs: dict) -> list:
    leaves = jax.tree_util.tree_leaves(args)
    for k in sorted(kwargs):
        leaves += jax.tree_util.tree_leaves(kwargs[k])
    return leaves


def check(fn: Callable) -> Callable[..., tuple[Report, Any]]:
    """Wraps `fn` so that it also returns a `Report` of nonfinite leaves.

    The wrapped function takes the same arguments as `fn` and returns
    ``(report, out)``. The report counts NaN, +Inf and -Inf in every floating
    leaf of the arguments and of the outputs, on device and with no host
    sync, so it works inside `jit`, `vmap`, `lax.scan` and on a whole train
    step. It works the same on a loss, on ``jax.value_and_grad(loss)``, or
    on a train step. Call ``report.throw()`` outside the transformations to
    raise `NonFiniteError`. Integer and boolean leaves are not checked.

    Args:
        fn: the function to check.

    Returns:
        A function with `fn`'s arguments returning ``(report, fn(*args))``.

    Raises:
        TypeError: when `fn` is not callable.

    Examples:
        >>> import jax, jax.numpy as jnp, jaxnan
        >>> def loss(params, batch):
        ...     return jnp.mean(jnp.log(batch["x"] * params["w"]))
        >>> params, batch = {"w": jnp.ones(2)}, {"x": jnp.array([1.0, 0.0])}
        >>> report, value = jax.jit(jaxnan.check(loss))(params, batch)
        >>> report.nonfinite_outputs()
        {'output': (0, 0, 1)}
        >>> report.throw()
        Traceback (most recent call last):
        ...
        jaxnan.NonFiniteError: jaxnan: nonfinite values were created ...
    """
    if not callable(fn):
        raise TypeError(
            f"jaxnan.check(fn) needs a callable, got {type(fn).__name__}: {fn!r}. "
            "Use it as jaxnan.check(loss_fn)(params, batch)."
        )
    name = function_name(fn)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        in_paths = input_paths(fn, args, kwargs)
        out_paths = [p for p, _ in tree.paths_and_leaves(out, "output")]
        rep = Report(
            tree.counts_matrix(_input_leaves(args, kwargs)),
            tree.counts_matrix(out),
            tuple(in_paths),
            tuple(out_paths),
            name,
        )
        return rep, out

    return wrapped
