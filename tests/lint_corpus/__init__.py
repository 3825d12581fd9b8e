"""Model code in the usual safe style; `jaxnan.lint` must report nothing on it.

Each module has a `factory()` returning `(fn, args)` for `python -m jaxnan lint`.
"""
