"""The one table of jaxnan's deprecated spellings, with version and replacement.

A public function whose keyword was renamed is decorated with
`renamed_keywords`; its old keyword keeps working, with a
`DeprecationWarning` naming the replacement, the version that deprecated it
and the version that will remove it. The table is the record: an entry is
removed (and the old keyword becomes a `TypeError`) in the version it names.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


@dataclasses.dataclass(frozen=True)
class Renamed:
    """A keyword renamed: ``old`` is ``new`` since ``since``, gone in ``removed_in``.

    Attributes:
        old: the deprecated keyword.
        new: its replacement, same meaning and values.
        since: the version that deprecated `old`.
        removed_in: the version that will drop it.
        why: what the new name says that the old one did not.
    """

    old: str
    new: str
    since: str
    removed_in: str
    why: str


KEYWORDS: dict[str, tuple[Renamed, ...]] = {
    "skip_nonfinite": (
        Renamed(
            old="max_streak",
            new="give_up_after",
            since="0.2",
            removed_in="0.3",
            why=(
                "skip_nonfinite keeps skipping after the streak and sets "
                "state.gave_up; jaxnan.guard's max_streak raises"
            ),
        ),
    ),
}
"""Function name -> its renamed keywords (`Renamed`)."""


def renamed_keywords(fn: F) -> F:
    """Lets `fn` accept its old keywords from `KEYWORDS`, with a warning.

    Args:
        fn: a public function listed in `KEYWORDS` by its ``__name__``.

    Returns:
        `fn`, wrapped: ``fn(old=v)`` warns and calls ``fn(new=v)``; passing
        both raises `TypeError`. The signature shown is `fn`'s own.

    Raises:
        KeyError: when `fn` has no entry in `KEYWORDS`.

    Examples:
        >>> import warnings, optax, jaxnan
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     tx = jaxnan.skip_nonfinite(optax.sgd(0.1), max_streak=3)
        >>> print(str(caught[0].message)[:60])
        jaxnan.skip_nonfinite: max_streak is deprecated since 0.2 (r
        >>> "use give_up_after=3, same meaning" in str(caught[0].message)
        True
    """
    table = {r.old: r for r in KEYWORDS[fn.__name__]}

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for old in table.keys() & kwargs.keys():
            r = table[old]
            if r.new in kwargs:
                raise TypeError(
                    f"jaxnan.{fn.__name__} got both {r.old}= and {r.new}=; "
                    f"{r.old} is the deprecated spelling of {r.new}: pass "
                    f"{r.new} only."
                )
            value = kwargs.pop(old)
            warnings.warn(
                f"jaxnan.{fn.__name__}: {r.old} is deprecated since {r.since} "
                f"(removed in {r.removed_in}): use {r.new}={value!r}, same "
                f"meaning ({r.why}).",
                DeprecationWarning,
                stacklevel=2,
            )
            kwargs[r.new] = value
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
