"""One adapter per framework: how jaxnan reads and writes its models.

`checked`, `locate`'s input paths and `jaxnan.guard` treat every argument as
a pytree, except objects that a framework mutates in place (Flax NNX
modules and optimizers). An `Adapter` says how to recognise those objects,
split them into a static definition and a pytree of arrays, merge them back,
update the caller's objects in place, and which of their leaves are model
constants. A framework is one module of `jaxnan._src.frameworks` with one
function decorated by `register_adapter`, called the first time jaxnan
needs it after the user imported the framework: ``import jaxnan`` never
imports a framework.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import Any

from jax.extend import source_info_util

source_info_util.register_exclusion(__file__)


@dataclasses.dataclass(frozen=True)
class Adapter:
    """How jaxnan handles the mutable objects of one framework.

    Attributes:
        name: the framework's module (``"flax.nnx"``), for messages.
        is_node: ``is_node(x)``: `x` is one of its mutable objects (a module,
            an optimizer), split into arrays by `split`.
        split: ``split(objs) -> (definition, state)`` for an object or a
            tuple of objects: a static, comparable definition and a pytree of
            arrays.
        merge: ``merge(definition, state) -> objs``: fresh objects.
        update: ``update(objs, state)``: the caller's objects hold `state`.
        sync: ``sync(original, copy, originals)``: `original` gets the state
            of its `copy` that a checked function updated in place;
            `originals` maps ``id(leaf)`` of each leaf handed to the
            function to the caller's leaf. None: objects are never mutated.
        is_sync_node: the objects `sync` handles (by default `is_node`).
        constants: ``constants(tree) -> [bool]`` per leaf of `tree`: a model
            constant (not trained, not data: an attention mask of ``-inf``).
            None: no constants.
        view: ``view(obj)``: a pytree whose leaves are the object's own arrays
            (the same objects), where the guard finds the optimizer states
            inside it. None: the object is a pytree itself (NNX objects are).
        static_leaves: ``static_leaves(tree) -> [bool | None] | None`` per
            leaf of a pytree: True for a leaf the framework treats as static
            configuration (Equinox: a Python bool or float field of a
            module, such as ``Dropout.inference``), False for an array, None
            where it has no say; None for a tree it has no say about at all.
            None: the framework has no static leaves.

    A framework whose models are plain pytrees (Equinox) has no mutable
    objects: its `is_node` is always False and it gives `static_leaves` only.
    """

    name: str
    is_node: Callable[[Any], bool] = lambda x: False
    split: Callable[[tuple], tuple[Any, Any]] | None = None
    merge: Callable[[Any, Any], tuple] | None = None
    update: Callable[[tuple, Any], None] | None = None
    sync: Callable[[Any, Any, dict[int, Any]], None] | None = None
    is_sync_node: Callable[[Any], bool] | None = None
    constants: Callable[[Any], list[bool]] | None = None
    view: Callable[[Any], Any] | None = None
    static_leaves: Callable[[Any], list[bool | None] | None] | None = None

    def pytree(self, obj: Any) -> Any:
        """`obj` as a pytree of its own arrays (`view`, or `obj` itself)."""
        return obj if self.view is None else self.view(obj)


_FACTORIES: dict[str, Callable[[], Adapter]] = {}
ADAPTERS: dict[str, Adapter] = {}
"""The adapters made so far, by framework module (see `active`)."""


def register_adapter(module: str) -> Callable[[Callable[[], Adapter]], Callable]:
    """Registers `factory` as the adapter of the framework `module`.

    The factory runs once, the first time `active` is called while `module`
    is imported.

    Examples:
        >>> from jaxnan._src.frameworks import registry
        >>> "flax.nnx" in registry.registered()
        True
    """

    def register(factory: Callable[[], Adapter]) -> Callable[[], Adapter]:
        if module in _FACTORIES:
            raise ValueError(f"framework {module!r} already has an adapter")
        _FACTORIES[module] = factory
        return factory

    return register


def registered() -> tuple[str, ...]:
    """The framework modules that have an adapter."""
    _load_builtin()
    return tuple(_FACTORIES)


def active() -> list[Adapter]:
    """The adapters of the registered frameworks the user has imported."""
    _load_builtin()
    for module, factory in _FACTORIES.items():
        if module not in ADAPTERS and module in sys.modules:
            ADAPTERS[module] = factory()
    return list(ADAPTERS.values())


def adapter_of(x: Any) -> Adapter | None:
    """The adapter whose `Adapter.is_node` holds for `x`, or None."""
    return next((a for a in active() if a.is_node(x)), None)


def one_adapter(objs: Sequence[Any], where: str) -> Adapter:
    """The one adapter of `objs` (all of one framework).

    Raises:
        TypeError: when `objs` mix frameworks.
    """
    found = {id(a): a for x in objs if (a := adapter_of(x)) is not None}
    if len(found) != 1:
        names = sorted(a.name for a in found.values())
        raise TypeError(
            f"{where}: the mutable objects of one call must come from one "
            f"framework, got {names}; pass the others as pytrees."
        )
    return next(iter(found.values()))


def static_leaves(tree: Any) -> list[bool | None] | None:
    """Per leaf of `tree`, whether an active framework calls it static.

    None when no framework has a say about `tree` (see
    `Adapter.static_leaves`).
    """
    for a in active():
        if a.static_leaves is not None:
            found = a.static_leaves(tree)
            if found is not None:
                return found
    return None


def _load_builtin() -> None:
    """Imports the built-in adapter modules (they import no framework)."""
    from jaxnan._src.frameworks import equinox, nnx  # noqa: F401
