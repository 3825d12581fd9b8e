"""Where the libraries live on disk (jax, optax, flax...), to tell user code."""

from __future__ import annotations

import functools
import importlib.util
import os

from jax.extend import source_info_util

source_info_util.register_exclusion(__file__)

# Packages whose frames are never "the user's line" in a report.
LIBRARIES = ("jax", "jaxlib", "optax", "chex", "flax", "equinox", "jmp", "jaxnan")


@functools.lru_cache(maxsize=1)
def library_dirs() -> dict[str, tuple[str, ...]]:
    """{package: its directories (real paths, ending in a separator)}."""
    dirs = {}
    for name in LIBRARIES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            dirs[name] = tuple(
                os.path.join(os.path.realpath(d), "")
                for d in spec.submodule_search_locations
            )
    return dirs


_realpath = functools.lru_cache(maxsize=4096)(os.path.realpath)


def library_of(file_name: str) -> str | None:
    """The library (of `LIBRARIES`) a source file belongs to, or None for user code.

    jaxnan's shipped examples (``jaxnan/examples``, the demo's training loop)
    count as user code.
    """
    path = _realpath(file_name) if os.path.isabs(file_name) else file_name
    for name, dirs in library_dirs().items():
        for d in dirs:
            if path.startswith(d):
                if name == "jaxnan" and path[len(d) :].startswith("examples"):
                    return None
                return name
    return None
