"""`jaxnan.lint`: find NaN-prone patterns in the jaxpr of a loss, statically.

- `graph`: the jaxpr of `fn` inlined into one flat graph (the one traversal
  of higher-order primitives, `primitives.sub_jaxprs`), constants folded.
- `signs`: the sign of each value (a table of per-primitive rules) and which
  values carry gradient.
- `registry`: `LintRule`, `Hit`, `register` and `LINT_RULES`.
- `rules/`: one module per rule family, each detector registered beside its
  `LintRule`s.
- `witness`: a concrete input per finding, checked on the flagged
  sub-expression (`Confidence`).
- `config`: per-rule levels and ``# jaxnan: ignore[rule]`` comments.
- `core`: `lint` and `Finding`: run the detectors, name the lines.
- `formats`, `command`: text/JSON/SARIF output and ``python -m jaxnan lint``.

The linted function is never run.
"""

from jaxnan._src.lint.command import cli as cli
from jaxnan._src.lint.core import Finding as Finding
from jaxnan._src.lint.core import lint as lint
from jaxnan._src.lint.registry import LINT_RULES as LINT_RULES
from jaxnan._src.lint.registry import LintRule as LintRule
