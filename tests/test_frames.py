"""One test of "the user's code" for every report (`frames.is_user_file`)."""

import functools
import os

import jax
import jax.numpy as jnp
import pytest

import jaxnan
from jaxnan._src.core import frames

EXAMPLES = os.path.join(os.path.dirname(jaxnan.__file__), "examples", "demo.py")


@pytest.mark.parametrize(
    "path, is_user",
    [
        (__file__, True),
        (EXAMPLES, True),  # jaxnan's shipped examples are user code
        ("<string>", True),
        ("<doctest jaxnan.lint[0]>", True),
        (jax.__file__, False),
        (jaxnan.__file__, False),
        (functools.__file__, False),  # the standard library
        (os.__file__, False),
        ("<frozen runpy>", False),
    ],
)
def test_is_user_file(path, is_user):
    assert frames.is_user_file(path) is is_user


def test_a_package_installed_under_the_stdlib_is_user_code():
    stdlib = os.path.dirname(os.path.abspath(os.__file__))
    inside = os.path.join(stdlib, "site-packages", "mypkg", "train.py")
    assert frames.is_user_file(inside)
    assert not frames.is_user_file(os.path.join(stdlib, "json", "decoder.py"))


SOURCE = """\
def loss(x):
    return jnp.sum(jnp.log(jax.nn.softmax(x)))
"""


def test_lint_and_locate_name_the_same_line_of_code_without_a_file():
    # Code compiled from a string (a notebook cell, `python -c`) is the
    # user's for both finders: they name the same line.
    namespace = {"jnp": jnp, "jax": jax}
    exec(compile(SOURCE, "<string>", "exec"), namespace)
    loss = namespace["loss"]
    x = jnp.array([0.0, 1e4])
    (finding,) = [f for f in jaxnan.lint(loss, x) if f.rule == "log-softmax"]
    diagnosis = jaxnan.locate(loss)(x)
    assert (finding.file, finding.line) == ("<string>", 2)
    assert (diagnosis.file, diagnosis.line) == ("<string>", 2)
