"""The real-model corpus: zero findings on each safe model, each planted bug found.

Each module of `tests/lint_corpus/` is written the way its framework's own
examples are, with synthetic shapes and abstract parameters. `factory()` is
the safe model; `buggy_factory()` plants one bug, in the model's style, on a
line ending in ``# bug: RULE[, RULE]``.
"""

import functools
import importlib
import os
import re

import jax
import jax.numpy as jnp
import pytest

import jaxnan
from jaxnan._src.lint import graph as lint_graph
from tests import lint_cases

CORPUS = [
    "transformer_lm",
    "linen_lm",
    "cnn",
    "eqx_cnn",
    "mlp_eqx",
    "nanolm",
    "unet_block",
    "vae",
    "mdn",
    "infonce",
    "policy_gradient",
    "nanolm_f16",
    "transformer_lm_bf16",
]


@functools.cache
def _module(name):
    return importlib.import_module(f"tests.lint_corpus.{name}")


@functools.cache
def _lint(name, factory):
    fn, args = getattr(_module(name), factory)()
    return fn, args, tuple(jaxnan.lint(fn, *args))


def _planted(name):
    path = os.path.abspath(_module(name).__file__)
    out = set()
    for i, line in enumerate(open(path).read().splitlines(), 1):
        m = re.search(r"# bug: (.*)$", line)
        if m:
            out |= {(rule.strip(), i) for rule in m.group(1).split(",")}
    return path, out


@pytest.mark.parametrize("name", CORPUS)
def test_safe_model_has_no_finding(name):
    _, _, findings = _lint(name, "factory")
    assert findings == (), "\n".join(map(str, findings))


@pytest.mark.parametrize("name", CORPUS)
def test_planted_bug_is_found_at_its_line(name):
    path, planted = _planted(name)
    assert planted, f"{name} plants no bug"
    _, _, findings = _lint(name, "buggy_factory")
    assert {(f.rule, f.line) for f in findings} == planted, "\n".join(
        map(str, findings)
    )
    for f in findings:
        assert os.path.abspath(f.file) == path
        assert f.confidence == "confirmed", f
        assert lint_cases.repeated_phrase(f.message) is None, f.message


def test_corpus_covers_the_rule_families():
    rules = {rule for name in CORPUS for rule, _ in _planted(name)[1]}
    assert len(rules) >= 9, rules


def test_lm_graph_has_attention():
    fn, args, _ = _lint("transformer_lm", "factory")
    g, _ = lint_graph.build(fn, args)
    prims = {nd.prim for nd in g.nodes}
    assert {"exp", "rsqrt", "select_n", "dot_general", "iota"} <= prims


def test_train_step_with_optimizer_is_clean():
    """A whole step (grad, clip, adamw, apply) is clean; its loss is still linted."""
    import optax

    loss, (params, x, y) = _module("mlp_eqx").factory()
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    opt_state = jax.eval_shape(tx.init, params)

    def step(params, opt_state, x, y):
        value, grads = jax.value_and_grad(loss)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    assert jaxnan.lint(step, params, opt_state, x, y) == []

    def bad_step(params, opt_state, x, y):
        def bad_loss(p, x, y):
            return loss(p, x, y) + jnp.linalg.norm(p.mlp.layers[0].weight)  # step

        value, grads = jax.value_and_grad(bad_loss)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    rules = {
        (f.rule, f.code.endswith("# step"))
        for f in jaxnan.lint(bad_step, params, opt_state, x, y)
    }
    assert ("sqrt-zero-grad", True) in rules
