"""Real models for `jaxnan.lint`, written the way their frameworks' examples are.

Each model module has `factory()` (the safe model: lint must report nothing)
and `buggy_factory()` (one planted bug, on lines ending in ``# bug: RULE``),
both returning `(fn, args)` for `python -m jaxnan lint`; `buggy.py` holds the
command line's test targets.
"""
