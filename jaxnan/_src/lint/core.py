"""`lint(fn, *args)` and `Finding`: run the registered detectors, name the lines."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import source_info_util

from jaxnan._src.core import primitives
from jaxnan._src.lint import config, graph, registry, source
from jaxnan._src.lint import rules as _registers_rules  # noqa: F401
from jaxnan._src.lint.graph import Graph
from jaxnan._src.lint.registry import Severity
from jaxnan._src.lint.signs import Analysis
from jaxnan._src.lint.witness import Confidence

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
        witness: a concrete input and what the flagged sub-expression gave
            on it (``"with all zeros under the denominator: it gives NaN"``),
            "" when the rule has none.
        confidence: a `Confidence`: ``"confirmed"`` (the witness made it
            nonfinite), ``"possible"`` (the witness stayed finite; an error
            is then reported as a warning) or ``"unchecked"``.

    Raises:
        ValueError: for a `severity` or `confidence` that is not one of
            their values.

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
    witness: str = ""
    confidence: Confidence = Confidence.UNCHECKED

    def __post_init__(self) -> None:
        object.__setattr__(self, "confidence", Confidence(self.confidence))
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
        possible = " (possible)" if self.confidence is Confidence.POSSIBLE else ""
        text = f"{where}: {self.severity}{possible} [{self.rule}] {self.message}"
        if self.code:
            text += f"\n    {self.code}"
        if self.witness:
            text += f"\n    witness: {self.witness}"
        return text + f"\n    fix: {self.fix}"

    def to_dict(self) -> dict[str, Any]:
        """The finding as JSON-ready values (severity and confidence as text)."""
        out = dataclasses.asdict(self)
        out["severity"], out["confidence"] = str(self.severity), str(self.confidence)
        return out


# -- running -----------------------------------------------------------------------


location = source.location


def _finding(hit: registry.Hit, level: Severity | None, where) -> Finding:
    sev = level or hit.severity or hit.rule.severity
    return Finding(hit.rule.rule, sev, hit.message, hit.fix or hit.rule.fix, *where)


def _witnessed(f: Finding, hit: registry.Hit) -> Finding:
    """`f` with its witness evaluated (an error that stays finite: a warning)."""
    if hit.witness is None:
        return f
    confidence, shown = hit.witness.check()
    sev = f.severity
    if confidence is Confidence.POSSIBLE and sev is Severity.ERROR:
        sev = Severity.WARNING
    return dataclasses.replace(f, severity=sev, witness=shown, confidence=confidence)


def _run(g: Graph, diff: Sequence[int], detectors, levels) -> list:
    """``[(finding, hit)]``, witnesses not evaluated yet."""
    ctx = registry.Context(g, Analysis(g, diff), set())
    out = []
    for det in detectors:
        for hit in registry.run(det, ctx):
            level = levels.get(hit.rule.rule, hit.severity)
            if hit.rule.rule in levels and level is None:
                continue  # "off"
            where = source.location(hit.node)
            if config.suppressed(hit.rule.rule, *where):
                continue
            out.append((_finding(hit, level, where), hit))
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


def _is_traced_leaf(x: Any) -> bool:
    """Whether `fn`'s tracing takes this argument leaf for an abstract array.

    Arrays of numbers (jax, NumPy), `jax.ShapeDtypeStruct` and Python
    floats and complex numbers are traced. Everything else is bound as a
    static value, as a call of `fn` would see it: a str, bytes, a function,
    a Python object, a NumPy array of text or objects, and Python ints and
    bools, which a loss may use as a slice bound or a class count.
    """
    if isinstance(x, float | complex):
        return True
    if isinstance(x, jax.ShapeDtypeStruct | jax.Array):
        return True
    if isinstance(x, np.ndarray | np.generic):
        return x.dtype.kind in "biufc"
    return False


def _static_bound(fn: Callable, args: tuple) -> tuple[Callable, tuple]:
    """`fn` over the traced leaves of `args` only (one list per argument).

    The static leaves are bound (`_is_traced_leaf`); argument positions are
    kept, so `argnums` still name the same arguments.
    """
    flat = [jax.tree_util.tree_flatten(a) for a in args]
    traced = tuple([x for x in leaves if _is_traced_leaf(x)] for leaves, _ in flat)

    def bound(*arrays):
        rebuilt = []
        for (leaves, treedef), mine in zip(flat, arrays):
            it = iter(mine)
            merged = [next(it) if _is_traced_leaf(x) else x for x in leaves]
            rebuilt.append(jax.tree_util.tree_unflatten(treedef, merged))
        return fn(*rebuilt)

    return bound, traced


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


def _unique(found: list) -> list:
    """One ``(finding, hit)`` per rule and line, the first."""
    seen = set()
    unique = []
    for f, hit in found:
        key = (f.rule, f.file, f.line) if f.file else (f.rule, f.message)
        if key not in seen:
            seen.add(key)
            unique.append((f, hit))
    return unique


def lint(
    fn: Callable[..., Any],
    *args: Any,
    argnums: int | Sequence[int] = 0,
    rules: Mapping[str, str] | None = None,
    witness: bool = True,
):
    """Finds NaN-prone patterns in `fn` and its gradient, without running it.

    Traces `fn(*args)` to a jaxpr (`jax.make_jaxpr`; `fn` is not run),
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

    `fn` itself is never run. Where the rule can, a finding carries a
    witness: a concrete input (the vector under a norm set to zeros, a fully
    masked row, an exponent of 12 in float16) on which the flagged
    sub-expression alone is evaluated; when it stays finite, the finding is
    "possible" and an error is reported as a warning. A line ending in
    ``# jaxnan: ignore[rule-id, ...]`` (or a bare ``# jaxnan: ignore``)
    silences those rules there.

    Args:
        fn: the function to lint, usually a loss ``fn(params, batch)``.
        *args: example arguments (arrays or `jax.ShapeDtypeStruct`). Leaves
            that are not arrays of numbers or Python floats (a str, a
            function, a Python object, a Python int used as a slice bound)
            are passed to `fn` as they are, static.
        argnums: the argument index (or indices) that is differentiated.
        rules: per-rule levels, ``{rule id: "error" | "warning" | "info" |
            "off"}`` (the rule's own severity where absent).
        witness: evaluate the witnesses (False: every finding "unchecked").

    Returns:
        A list of `jaxnan.Finding`: errors first, then warnings, then infos;
        within a severity in the order of `jaxnan.LINT_RULES`, then in
        program order.

    Raises:
        TypeError: if `fn` is not callable.
        ValueError: if `argnums` is out of range, or `rules` or an ignore
            comment names an unknown rule or level.
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
    levels = config.levels(rules)
    fn, args = _static_bound(fn, args)
    g, closed = graph.build(fn, args)
    found = _run(g, _flat_positions(args, nums), registry.DETECTORS, levels)
    if _is_float_scalar(closed.out_avals):
        gg = _gradient_graph(fn, args, nums)
        if gg is not None:
            on_gradient = [d for d in registry.DETECTORS if d.on_gradient]
            found += _run(gg, [], on_gradient, levels)
    findings = [_witnessed(f, h) if witness else f for f, h in _unique(found)]
    return sorted(findings, key=lambda f: f.severity.rank)  # errors first, stable
