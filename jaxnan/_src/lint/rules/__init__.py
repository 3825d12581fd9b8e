"""The lint rule families, one module each.

Importing this package registers every rule; the order of the imports is the
order of `jaxnan.LINT_RULES` and the order the detectors run in (a detector
skips the nodes an earlier one claimed).
"""

from jaxnan._src.lint.rules import where_grad  # noqa: F401  # isort: skip
from jaxnan._src.lint.rules import sqrt_grad  # noqa: F401  # isort: skip
from jaxnan._src.lint.rules import log_prob  # noqa: F401  # isort: skip
from jaxnan._src.lint.rules import masking  # noqa: F401  # isort: skip
from jaxnan._src.lint.rules import division  # noqa: F401  # isort: skip
from jaxnan._src.lint.rules import precision  # noqa: F401  # isort: skip
from jaxnan._src.lint.rules import cancellation  # noqa: F401  # isort: skip
from jaxnan._src.lint.rules import domain  # noqa: F401  # isort: skip
