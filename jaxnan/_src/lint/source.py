"""Source lines of lint findings: the user frame of a node, literals on a line."""

from __future__ import annotations

import linecache
import re

from jax.extend import source_info_util

from jaxnan._src.core import frames

source_info_util.register_exclusion(__file__)

_NUMBER = re.compile(r"(?<![\w.])-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?![\w.])")


def _frames(nd):
    for eqn in (nd.eqn, *reversed(nd.sites)):
        tb = getattr(getattr(eqn, "source_info", None), "traceback", None)
        yield from getattr(tb, "frames", None) or ()


def location(nd) -> tuple[str | None, int | None, str]:
    """``(file, line, code)`` of the user frame of `nd` (or its call sites).

    The user frame is the innermost that `frames.is_user_file` accepts.
    """
    for fr in _frames(nd):
        if frames.is_user_file(fr.file_name):
            code = linecache.getline(fr.file_name, fr.line_num).strip()
            return fr.file_name, fr.line_num, code
    return None, None, ""


def literals(code: str) -> list[float]:
    """The numeric literals written on a line of code (comments excluded).

    Examples:
        >>> literals("y = x / jnp.sqrt(var + 1e-8)  # eps 3")
        [1e-08]
        >>> literals("z = jnp.where(m, s, -1e9) * 2")
        [-1000000000.0, 2.0]
    """
    code = code.split("#", 1)[0]
    return [float(m.group(0)) for m in _NUMBER.finditer(code)]
