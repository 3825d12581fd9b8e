"""The lint rule registry: `LintRule` metadata, `Hit`, and `register`.

A rule family is one module of `jaxnan._src.lint.rules`. It declares its
`LintRule`s with `rule(...)` and registers each detector beside them::

    WHERE_NAN_GRAD = registry.rule("where-nan-grad", "error", ...)

    @registry.register(WHERE_NAN_GRAD)
    def where_nan_grad(ctx):
        for nd in ctx.graph.nodes:
            ...
            yield registry.Hit(WHERE_NAN_GRAD, nd, "jaxnan: ...")

`LINT_RULES` lists the rules in the order they were declared; the detectors
run in the order they were registered (the order of the imports in
`rules/__init__.py`).
"""

from __future__ import annotations

import dataclasses
import enum
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

from jax.extend import source_info_util

source_info_util.register_exclusion(__file__)


class Severity(str, enum.Enum):
    """How bad a lint finding is, the one severity vocabulary of jaxnan.

    Members compare equal to their values as strings
    (``Severity.ERROR == "error"``) and are listed in report order: errors
    first (`rank`).

    Examples:
        >>> from jaxnan._src.lint.registry import Severity
        >>> Severity("warning") is Severity.WARNING, str(Severity.ERROR)
        (True, 'error')
        >>> sorted(["info", "error", "warning"], key=lambda s: Severity(s).rank)
        ['error', 'warning', 'info']
    """

    ERROR = "error"
    WARNING = "warning"
    INFO = "info"

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return repr(self.value)

    __format__ = str.__format__

    @property
    def rank(self) -> int:
        """0 for errors, 1 for warnings, 2 for infos (the report order)."""
        return list(Severity).index(self)


@dataclasses.dataclass(frozen=True)
class LintRule:
    """One rule of `jaxnan.lint`: what it finds, how bad it is, how to fix it.

    Attributes:
        rule: the rule id, such as ``"where-nan-grad"``.
        severity: ``"error"`` (produces NaN/Inf for inputs a training run
            reaches), ``"warning"`` (numerically fragile) or ``"info"``.
        summary: one line saying what the rule finds.
        fix: a fix snippet.
        bad: a short example that the rule reports.
        good: the safe version, which it does not report.

    Examples:
        >>> import jaxnan
        >>> jaxnan.LINT_RULES["where-nan-grad"].severity
        'error'

    .. versionadded:: 0.1.0
    """

    rule: str
    severity: Severity
    summary: str
    fix: str
    bad: str
    good: str


class Hit(NamedTuple):
    """What a detector yields: a rule matched at a node of the graph.

    Attributes:
        rule: the `LintRule` matched (one its detector was registered with).
        node: the graph node the finding points at (its source line).
        message: what was found, starting with ``jaxnan:``.
        severity: overrides the rule's severity (None keeps it).
        fix: a fix fitting the code found (None keeps the rule's).
        witness: how to check the finding on a concrete input
            (`witness.Witness`), or None when the rule has none.
    """

    rule: LintRule
    node: Any
    message: str
    severity: Severity | None = None
    fix: str | None = None
    witness: Any = None


@dataclasses.dataclass
class Context:
    """What a detector receives.

    Attributes:
        graph: the inlined graph (`graph.Graph`).
        analysis: signs and gradient flow over it (`signs.Analysis`).
        claimed: ids of nodes already reported by an earlier detector.
    """

    graph: Any
    analysis: Any
    claimed: set[int]


Detector = Callable[[Context], Iterator[Hit]]


class Registered(NamedTuple):
    """A detector with the rules it may report."""

    detect: Detector
    rules: tuple[LintRule, ...]
    on_gradient: bool


_RULES: dict[str, LintRule] = {}
DETECTORS: list[Registered] = []
"""The registered detectors, in registration (run) order."""


def rule(
    rule_id: str, severity: Severity | str, summary: str, fix: str, bad: str, good: str
) -> LintRule:
    """Declares a `LintRule` and adds it to `LINT_RULES`.

    Raises:
        ValueError: when the id is taken or the severity unknown.
    """
    if rule_id in _RULES:
        raise ValueError(f"jaxnan: lint rule {rule_id!r} is declared twice")
    made = LintRule(rule_id, Severity(severity), summary, fix, bad, good)
    _RULES[rule_id] = made
    return made


def register(*rules: LintRule, on_gradient: bool = False):
    """Registers a detector that reports `rules`.

    Args:
        *rules: the rules the detector yields hits for.
        on_gradient: also run it on the jaxpr of the gradient (dtype rules:
            the backward pass of a float16 model).

    Returns:
        A decorator that stores the detector and returns it unchanged.
    """

    def decorator(detect: Detector) -> Detector:
        DETECTORS.append(Registered(detect, rules, on_gradient))
        return detect

    return decorator


def run(detector: Registered, ctx: Context) -> Iterator[Hit]:
    """The detector's hits, checked against the rules it registered."""
    for hit in detector.detect(ctx):
        if hit.rule not in detector.rules:
            raise AssertionError(
                f"jaxnan: detector {detector.detect.__name__} yielded rule "
                f"{hit.rule.rule!r} it was not registered with"
            )
        yield hit


class LintRuleTable(Mapping[str, LintRule]):
    """The rules of `jaxnan.lint`, read-only, keyed by rule id.

    Each value is a `jaxnan.LintRule` with its severity, a fix snippet and a
    bad and a good example.

    Examples:
        >>> import jaxnan
        >>> for rule in jaxnan.LINT_RULES.values():
        ...     print(f"{rule.rule:27s} {rule.severity}")
        where-nan-grad              error
        sqrt-zero-grad              error
        atan2-zero-grad             error
        log-softmax                 warning
        log-sigmoid                 warning
        hand-written-cross-entropy  warning
        masked-softmax-all-masked   error
        div-no-epsilon              warning
        epsilon-underflow           error
        low-precision-overflow      warning
        low-precision-cast          error
        low-precision-variance      warning
        log-not-positive            warning

    .. versionadded:: 0.1.0
    """

    def __init__(self, rules: Mapping[str, LintRule]):
        self._rules = types.MappingProxyType(rules)

    def __getitem__(self, key: str) -> LintRule:
        return self._rules[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._rules)

    def __len__(self) -> int:
        return len(self._rules)


LINT_RULES = LintRuleTable(_RULES)
