"""Equinox: which leaves of a model are arrays and which are configuration.

An Equinox model is a plain pytree, so no object is mutated in place. But
`eqx.filter_jit` traces only its array leaves (`eqx.is_array`): a Python
``bool``/``float`` field (``Dropout.inference``, ``Dropout.p``,
``BatchNorm.momentum``) is static configuration, and a module branches on
it in Python. `equinox_adapter` tells jaxnan (the guard's layout) the same,
so a guarded step sees the model exactly as `eqx.filter_jit` does.

Nothing here imports Equinox; the adapter is made once the user has.
"""

from __future__ import annotations

import sys
from typing import Any

import jax
from jax.extend import source_info_util

from jaxnan._src.frameworks.registry import Adapter, register_adapter

source_info_util.register_exclusion(__file__)


@register_adapter("equinox")
def equinox_adapter() -> Adapter:
    """Equinox modules: their non-array leaves are static (`eqx.is_array`).

    Leaves outside any `eqx.Module` are left to the caller's own rule.

    Examples:
        >>> import equinox as eqx, jax
        >>> from jaxnan._src.frameworks import registry
        >>> tree = {"drop": eqx.nn.Dropout(0.5), "step": 0}
        >>> registry.static_leaves(tree)
        [True, True, None]
    """
    eqx = sys.modules["equinox"]

    def is_module(x: Any) -> bool:
        return isinstance(x, eqx.Module)

    def static_leaves(tree: Any) -> list[bool | None] | None:
        tops = jax.tree_util.tree_leaves(tree, is_leaf=is_module)
        if not any(map(is_module, tops)):
            return None
        out: list[bool | None] = []
        for top in tops:
            if is_module(top):
                out += [not eqx.is_array(x) for x in jax.tree_util.tree_leaves(top)]
            else:
                out.append(None)
        return out

    return Adapter(name="equinox", static_leaves=static_leaves)
