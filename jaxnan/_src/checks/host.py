"""Host side of `jaxnan.checked`: records, messages, raise/warn/call policies.

What reaches the host is a matrix of NaN/+Inf/-Inf counts per leaf, computed
on device only when a check has fired. `Reporter.host_fn` turns it into a
`NonfiniteRecord` and applies the policy. The text names the phase and the
leaves, and ends with the `jaxnan.locate(...)` line to run.

Errors raised inside a compiled program reach the user wrapped by the
runtime (`jax.errors.JaxRuntimeError`); `nonfinite_errors` turns them back
into the `NonFiniteError` raised here. Warnings are issued at the user's
call site, captured when the checked function was traced.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.extend import source_info_util

from jaxnan._src.core import errors, frames

source_info_util.register_exclusion(__file__)

# What `checked` checks: its arguments, its outputs, the gradients to its
# arguments.
PHASES = (errors.Phase.INPUT, errors.Phase.FORWARD, errors.Phase.BACKWARD)
POLICIES = ("raise", "warn", "ignore")


class NonfiniteRecord(NamedTuple):
    """What `jaxnan.checked` found, as given to an `on_nonfinite` callable.

    Attributes:
        function: the name of the checked function.
        phase: a `jaxnan.Phase`: ``INPUT`` (its arguments), ``FORWARD``
            (its outputs, with finite arguments) or ``BACKWARD`` (the
            gradients flowing back to its arguments). The same vocabulary
            as the ``phase`` of `jaxnan.NonFiniteError.details`.
        leaves: ``{path: (nan, +inf, -inf)}`` for every nonfinite leaf, such
            as ``{"batch['x']": (1, 0, 0)}``. Under `vmap` the counts are
            summed over the batch.
        examples: ``(bad, total)``: how many examples of the vmapped batch
            were nonfinite; ``(1, 1)`` outside `vmap`.
        message: the text `"raise"` and `"warn"` would show.

    Examples:
        >>> import jaxnan
        >>> r = jaxnan.NonfiniteRecord(
        ...     "loss", jaxnan.Phase.BACKWARD, {"w": (1, 0, 0)}, (1, 1), ""
        ... )
        >>> r.phase, r.leaves
        ('backward', {'w': (1, 0, 0)})

    .. versionadded:: 0.1.0
    """

    function: str
    phase: errors.Phase
    leaves: dict[str, tuple[int, int, int]]
    examples: tuple[int, int]
    message: str


class CallSite(NamedTuple):
    """The user's line that called a checked function (warnings point there)."""

    file: str
    line: int
    module: str
    registry: dict


def user_call_site() -> CallSite | None:
    """The innermost frame of the current stack outside the libraries.

    Outside the libraries means `frames.is_user_file`: not jax, optax,
    flax, equinox, jaxnan (its shipped examples excepted), nor the standard
    library.
    """
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if frames.is_user_file(name):
            g = frame.f_globals
            return CallSite(
                name,
                frame.f_lineno,
                g.get("__name__", "__main__"),
                g.setdefault("__warningregistry__", {}),
            )
        frame = frame.f_back
    return None


# --------------------------------------------------------------------------
# Runtime errors.


class _DropOwnErrors(logging.Filter):
    """Drops jax's "callback failed" log lines for our own raise.

    The error itself still propagates (as `NonFiniteError` eagerly, inside a
    runtime error under jit), so the log line would only repeat it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, errors.NonFiniteError)


for _name in ("jax._src.debugging", "jax._src.callback"):
    _logger = logging.getLogger(_name)
    if not any(isinstance(f, _DropOwnErrors) for f in _logger.filters):
        _logger.addFilter(_DropOwnErrors())

# The errors raised on the host lately, newest last: `nonfinite_errors`
# finds the one a runtime error carries.
_RAISED: collections.deque = collections.deque(maxlen=16)


def raised_error(runtime_error: BaseException) -> errors.NonFiniteError | None:
    """The `NonFiniteError` whose text `runtime_error` carries, if any."""
    text = str(runtime_error)
    for err in reversed(_RAISED):
        if str(err) in text:
            return err
    return None


@contextlib.contextmanager
def nonfinite_errors() -> Iterator[None]:
    """Raises `jaxnan.NonFiniteError` where a compiled step failed a check.

    Inside a compiled program (`jax.jit`, `nnx.jit`, `eqx.filter_jit`) a
    `jaxnan.checked` function with ``on_nonfinite="raise"`` raises on the
    host, in the middle of the program; the runtime hands it back as a
    `jax.errors.JaxRuntimeError` that quotes it. Inside this context (or
    around a function decorated with it) that runtime error becomes the
    `NonFiniteError` itself, with its `details`, so
    ``except jaxnan.NonFiniteError`` catches it. Other errors pass through
    unchanged. Dispatch is asynchronous: block on the step's outputs inside
    the context (``jax.block_until_ready``, ``float(loss)``).

    Yields:
        Nothing; use it as ``with jaxnan.nonfinite_errors(): ...`` or as a
        decorator ``@jaxnan.nonfinite_errors()``.

    Raises:
        NonFiniteError: for a runtime error raised by a jaxnan check.

    Examples:
        >>> import jax, jax.numpy as jnp, jaxnan
        >>> step = jax.jit(jaxnan.checked(lambda x: jnp.log(x)))
        >>> try:
        ...     with jaxnan.nonfinite_errors():
        ...         jax.block_until_ready(step(jnp.zeros(2)))
        ... except jaxnan.NonFiniteError as e:
        ...     print(e.details["phase"], e.details["leaves"])
        forward {'output': (0, 0, 2)}

    .. versionadded:: 0.2.0
    """
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        err = raised_error(e)
        if err is None:
            raise
        raise err.with_traceback(None) from None


# --------------------------------------------------------------------------
# Messages and policies.

# What a reporting callback returns: tied into the outputs, it keeps the
# callback alive (see `device.check`).
ZERO = np.zeros((), np.float32)

_ADVICE = {
    errors.Phase.INPUT: (
        "Clean or drop the bad input rows, or find where they were made."
    ),
    errors.Phase.FORWARD: "They were created inside the function.",
    errors.Phase.BACKWARD: (
        "They were made while differentiating it (or came in with the "
        "output cotangent)."
    ),
}


def message(
    name: str,
    phase: errors.Phase,
    rows: list[tuple[str, tuple[int, int, int]]],
    examples: tuple[int, int],
    hint: str,
) -> str:
    """The text of a report (see `jaxnan.checked`)."""
    where = {
        errors.Phase.INPUT: f"in the inputs of `{name}`",
        errors.Phase.FORWARD: f"in the outputs of `{name}` (its inputs were finite)",
        errors.Phase.BACKWARD: (
            f"in the gradients flowing back to the arguments of `{name}`"
        ),
    }[phase]
    text = f"jaxnan: nonfinite values {where} [phase {phase}]:\n"
    text += errors.leaf_lines(rows)
    bad, total = examples
    if total > 1:
        text += (
            f"\nin {bad} of {total} examples of the vmapped batch "
            "(counts summed over the batch)."
        )
    text += f"\n{_ADVICE[phase]}\nFor a full diagnosis run:\n  {hint}"
    return text


class Reporter:
    """Turns counts from the device into a raise, a warning or a call."""

    def __init__(self, name: str, policy: str | Callable):
        self.name = name
        self.policy = policy
        self.lock = threading.Lock()

    def host_fn(
        self,
        phase: errors.Phase,
        paths: Sequence[str],
        hint: str,
        box: list,
        site: CallSite | None = None,
    ) -> Callable:
        """The host callback of one check: ``host(counts, bad, total) -> 0``."""
        paths = tuple(paths)

        def host(counts: Any, bad: Any, total: Any) -> np.ndarray:
            c = np.asarray(counts).reshape(len(paths), 3)
            rows = [
                (p, tuple(int(v) for v in row)) for p, row in zip(paths, c) if row.any()
            ]
            if not rows:  # pragma: no cover - the branch runs only when bad
                return ZERO
            examples = (int(bad), int(total))
            text = message(self.name, phase, rows, examples, hint)
            if self.policy == "raise":
                err = errors.NonFiniteError(
                    text,
                    errors.Details(
                        function=self.name,
                        phase=phase,
                        leaves=dict(rows),
                        examples=examples,
                    ),
                )
                box.append(err)
                _RAISED.append(err)
                raise err
            if self.policy == "warn":
                with self.lock:
                    if site is None:
                        warnings.warn(text, RuntimeWarning, stacklevel=2)
                    else:
                        warnings.warn_explicit(
                            text,
                            RuntimeWarning,
                            site.file,
                            site.line,
                            module=site.module,
                            registry=site.registry,
                        )
                return ZERO
            self.policy(NonfiniteRecord(self.name, phase, dict(rows), examples, text))
            return ZERO

        # `locate` replays a reported step without calling the host again.
        host.jaxnan_report = True  # type: ignore[attr-defined]
        return host
