"""The deprecation table: old keywords work, warn at the caller's line with the
version and the replacement, and mean exactly what the new ones do."""

import inspect
import re
import warnings

import jax.numpy as jnp
import optax
import pytest

import jaxnan
from jaxnan._src.core import deprecations
from tests import helpers


def _gave_up_after(tx, bad_steps):
    params = {"w": jnp.ones(1)}
    state = tx.init(params)
    flags = []
    for _ in range(bad_steps):
        updates, state = tx.update({"w": jnp.array([jnp.nan])}, state, params)
        flags.append(bool(state.gave_up))
        assert float(updates["w"][0]) == 0.0  # still skipped
    return flags


def test_max_streak_of_skip_nonfinite_still_works_and_warns_at_the_call():
    with pytest.warns(DeprecationWarning) as caught:
        old = jaxnan.skip_nonfinite(optax.sgd(1.0), max_streak=2)  # <- old-kw
    (w,) = caught
    assert str(w.message) == (
        "jaxnan.skip_nonfinite: max_streak is deprecated since 0.2 (removed in "
        "0.3): use give_up_after=2, same meaning (skip_nonfinite keeps skipping "
        "after the streak and sets state.gave_up; jaxnan.guard's max_streak raises)."
    )
    line = helpers.marker_line(__file__, "# <- old" + "-kw")
    assert (w.filename, w.lineno) == (__file__, line)
    new = jaxnan.skip_nonfinite(optax.sgd(1.0), give_up_after=2)
    assert _gave_up_after(old, 3) == _gave_up_after(new, 3) == [False, True, True]


def test_both_spellings_at_once_is_an_error_naming_both():
    with pytest.raises(
        TypeError, match=re.escape("got both max_streak= and give_up_after=")
    ):
        jaxnan.skip_nonfinite(optax.sgd(1.0), max_streak=2, give_up_after=2)


def test_new_spelling_does_not_warn_and_the_signature_shows_it():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jaxnan.skip_nonfinite(optax.sgd(1.0), give_up_after=2)
    params = inspect.signature(jaxnan.skip_nonfinite).parameters
    assert "give_up_after" in params and "max_streak" not in params


def test_guard_keeps_max_streak_its_one_meaning_raise():
    assert "max_streak" in inspect.signature(jaxnan.guard).parameters
    assert "give_up_after" not in inspect.signature(jaxnan.guard).parameters


def test_every_entry_names_a_decorated_public_function_and_versions():
    for name, entries in deprecations.KEYWORDS.items():
        fn = getattr(jaxnan, name)
        assert fn.__wrapped__.__name__ == name
        params = inspect.signature(fn).parameters
        for r in entries:
            assert r.new in params and r.old not in params
            assert re.fullmatch(r"\d+\.\d+", r.since) and r.removed_in > r.since
