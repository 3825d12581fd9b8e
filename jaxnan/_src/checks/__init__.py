"""`@jaxnan.checked` and friends (see `api`), split by concern.

- `api`: `checked`, `checked_grad`, `checked_value_and_grad`;
- `device`: the in-graph checks and how their reports stay alive;
- `host`: records, messages, policies, `nonfinite_errors`;
- `state`: state updates on mutable arguments (Flax NNX) reach the caller.
"""

from jaxnan._src.checks.checked import checked as checked
from jaxnan._src.checks.checked import checked_grad as checked_grad
from jaxnan._src.checks.checked import checked_value_and_grad as checked_value_and_grad
from jaxnan._src.checks.host import PHASES as PHASES
from jaxnan._src.checks.host import NonfiniteRecord as NonfiniteRecord
from jaxnan._src.checks.host import nonfinite_errors as nonfinite_errors
