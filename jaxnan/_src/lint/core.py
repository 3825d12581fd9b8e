"""`lint(fn, *args)` and `Finding`: run the registered detectors, name the lines."""

from __future__ import annotations

import dataclasses
import linecache
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import source_info_util

from jaxnan._src.core import frames, primitives
from jaxnan._src.lint import graph, registry, rules  # noqa: F401 - registers the rules
from jaxnan._src.lint.graph import Graph, Node
from jaxnan._src.lint.registry import Severity
from jaxnan._src.lint.signs import Analysis

source_info_util.register_exclusion(__file__)


@dataclasses.dataclass(frozen=True)
class Finding:
    """One NaN-prone pattern found by `jaxnan.lint`.

    Attributes:
        rule: the rule id, a key of `jaxnan.LINT_RULES`.
        severity: a `Severity` (``"error"``, ``"warning"`` or ``"info"``;
            a string is converted).
        message: what was found, starting with ``jaxnan:``.
        fix: a fix snippet.
        file: the user's file (the innermost frame outside jax, optax, chex,
            flax, equinox and jaxnan), or None when unknown.
        line: the line in `file`, or None.
        code: the source text of that line, stripped ("" when unknown).

    Examples:
        >>> import jaxnan
        >>> f = jaxnan.Finding("log-softmax", "warning", "jaxnan: ...",
        ...                    "jax.nn.log_softmax(x)", "m.py", 3, "jnp.log(p)")
        >>> print(f)
        m.py:3: warning [log-softmax] jaxnan: ...
            jnp.log(p)
            fix: jax.nn.log_softmax(x)

    .. versionadded:: 0.1.0
    """

    rule: str
    severity: Severity
    message: str
    fix: str
    file: str | None
    line: int | None
    code: str

    def __post_init__(self) -> None:
        try:
            severity = Severity(self.severity)
        except ValueError:
            valid = ", ".join(repr(s.value) for s in Severity)
            raise ValueError(
                f"jaxnan: Finding(severity={self.severity!r}) is not a severity; "
                f"use one of {valid}."
            ) from None
        object.__setattr__(self, "severity", severity)

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.file else "<unknown>"
        text = f"{where}: {self.severity} [{self.rule}] {self.message}"
        if self.code:
            text += f"\n    {self.code}"
        return text + f"\n    fix: {self.fix}"


# -- source lines ----------------------------------------------------------------


def _frames(nd: Node):
    for eqn in (nd.eqn, *reversed(nd.sites)):
        tb = getattr(getattr(eqn, "source_info", None), "traceback", None)
        yield from getattr(tb, "frames", None) or ()


def location(nd: Node) -> tuple[str | None, int | None, str]:
    """``(file, line, code)`` of the user frame of `nd` (or its call sites).

    The user frame is the innermost that `frames.is_user_file` accepts.
    """
    for fr in _frames(nd):
        if frames.is_user_file(fr.file_name):
            code = linecache.getline(fr.file_name, fr.line_num).strip()
            return fr.file_name, fr.line_num, code
    return None, None, ""


# -- running -----------------------------------------------------------------------


def _run(g: Graph, diff: Sequence[int], detectors) -> list[Finding]:
    ctx = registry.Context(g, Analysis(g, diff), set())
    out = []
    for det in detectors:
        for hit in registry.run(det, ctx):
            sev = hit.severity or hit.rule.severity
            file, line, code = location(hit.node)
            rule = hit.rule
            out.append(Finding(rule.rule, sev, hit.message, rule.fix, file, line, code))
    return out


def _argnums(argnums: int | Sequence[int], n_args: int) -> tuple[int, ...]:
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    for a in nums:
        if not -n_args <= a < n_args:
            raise ValueError(
                f"jaxnan: lint(argnums={argnums!r}) is out of range for "
                f"{n_args} argument(s); pass the index of the parameters."
            )
    return tuple(a % n_args for a in nums)


def _flat_positions(args, nums: tuple[int, ...]) -> list[int]:
    """The flat input positions of the leaves of the arguments `nums`."""
    sizes = [len(jax.tree_util.tree_leaves(a)) for a in args]
    starts = np.cumsum([0] + sizes)
    return [i for a in nums for i in range(starts[a], starts[a + 1])]


def _is_float_scalar(avals) -> bool:
    return (
        len(avals) == 1
        and avals[0].shape == ()
        and (
            np.issubdtype(avals[0].dtype, np.floating)
            or avals[0].dtype in primitives.LOW_PRECISION
        )
    )


def _gradient_graph(fn, args, nums) -> Graph | None:
    try:
        g, _ = graph.build(
            jax.grad(fn, argnums=nums if len(nums) > 1 else nums[0]), args
        )
    except (TypeError, ValueError):  # integer inputs, non-differentiable fn
        return None
    return g


def _unique_sorted(findings: list[Finding]) -> list[Finding]:
    """One finding per rule and line; errors first (stable)."""
    seen = set()
    unique = []
    for f in findings:
        key = (f.rule, f.file, f.line) if f.file else (f.rule, f.message)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return sorted(unique, key=lambda f: f.severity.rank)


def lint(fn: Callable[..., Any], *args: Any, argnums: int | Sequence[int] = 0):
    """Finds NaN-prone patterns in `fn` and its gradient, without running it.

    Traces `fn(*args)` to a jaxpr (`jax.make_jaxpr`; nothing is executed),
    inlines calls, custom_jvp/vjp, remat, cond, scan, while and shard_map
    bodies, and runs the detectors of `jaxnan.LINT_RULES` over it: a where
    whose unselected branch takes sqrt/log/div of the values it guards, the
    gradient of a norm or std at 0, log(softmax), log(sigmoid), hand-written
    cross-entropy, softmax over rows that a -inf mask can empty, division by a
    sum/norm/variance with no epsilon (or one the dtype rounds to 0), exp and
    sums of squares in float16, -inf or huge constants cast to float16, and
    log/sqrt/fractional powers of values not known to be positive.

    A value's sign comes from its producers (exp, softplus, squares, abs, a
    positive constant added, `maximum` with a positive constant, a where on
    `x > 0`). Gradient rules fire only where the value depends on the
    arguments in `argnums` and the output depends on it differentiably (not
    through `stop_gradient` or a comparison). When `fn` returns a float
    scalar, ``jax.grad(fn, argnums)`` is traced too and the dtype rules run on
    its jaxpr (the backward pass of a float16 model). Each finding points at
    the innermost frame outside jax, optax, chex, flax, equinox and jaxnan;
    a rule is reported once per line.

    Args:
        fn: the function to lint, usually a loss ``fn(params, batch)``.
        *args: example arguments (arrays or `jax.ShapeDtypeStruct`).
        argnums: the argument index (or indices) that is differentiated.

    Returns:
        A list of `jaxnan.Finding`: errors first, then warnings, then infos;
        within a severity in the order of `jaxnan.LINT_RULES`, then in
        program order.

    Raises:
        TypeError: if `fn` is not callable.
        ValueError: if `argnums` is out of range.
        NotImplementedError: if `fn` uses a higher-order primitive jaxnan
            does not know (it names it).

    Examples:
        >>> import jax, jax.numpy as jnp, jaxnan
        >>> def loss(x):
        ...     return jnp.sum(jnp.where(x > 0, jnp.sqrt(x), 0.0))
        >>> [f.rule for f in jaxnan.lint(loss, jnp.ones(3))]
        ['where-nan-grad']
        >>> def safe(x):
        ...     inner = jnp.where(x > 0, x, 1.0)
        ...     return jnp.sum(jnp.where(x > 0, jnp.sqrt(inner), 0.0))
        >>> jaxnan.lint(safe, jnp.ones(3))
        []

    .. versionadded:: 0.1.0
    """
    if not callable(fn):
        raise TypeError(
            f"jaxnan: lint(fn=...) must be callable, got {type(fn).__name__}; "
            "pass the loss function itself, not its value."
        )
    nums = _argnums(argnums, len(args))
    g, closed = graph.build(fn, args)
    findings = _run(g, _flat_positions(args, nums), registry.DETECTORS)
    if _is_float_scalar(closed.out_avals):
        gg = _gradient_graph(fn, args, nums)
        if gg is not None:
            on_gradient = [d for d in registry.DETECTORS if d.on_gradient]
            findings += _run(gg, [], on_gradient)
    return _unique_sorted(findings)


def cli(target: str, *, argnums: Sequence[int] = (0,), out=None) -> int:
    """Runs `lint` on ``module:factory`` and prints the findings.

    Args:
        target: ``module:factory``; ``factory()`` returns ``(fn, args)``.
        argnums: the differentiated argument indices.
        out: a text stream (default: sys.stdout).

    Returns:
        The exit status: 1 when an error-severity finding exists, 0 otherwise.

    Raises:
        ValueError: if `target` is not of the form ``module:factory``.
    """
    import importlib

    out = sys.stdout if out is None else out
    mod_name, sep, attr = target.partition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(
            f"jaxnan: lint target={target!r} must be 'module:factory', e.g. "
            "'mypkg.train:make_loss' where make_loss() returns (fn, args)."
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    factory = getattr(importlib.import_module(mod_name), attr)
    fn, args = factory()
    nums = argnums[0] if len(argnums) == 1 else tuple(argnums)
    findings = lint(fn, *args, argnums=nums)
    for f in findings:
        print(str(f), file=out)
    n_err = sum(f.severity is Severity.ERROR for f in findings)
    print(
        f"jaxnan lint: {len(findings)} finding(s), {n_err} error(s) in {target}",
        file=out,
    )
    return 1 if n_err else 0
