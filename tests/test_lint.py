import inspect
import os
import re
import warnings

import jax
import jax.numpy as jnp
import pytest

import jaxnan
from tests import helpers
from tests import lint_cases as C

# The bad_f16_literal case overflows a float16 literal on purpose; tracing it
# makes JAX warn, which is the case's point, not a test failure.
pytestmark = pytest.mark.filterwarnings(
    "ignore:overflow encountered in cast:RuntimeWarning"
)

X = jnp.linspace(0.1, 1.0, 32).reshape(8, 4)
MASK = jnp.ones((8, 4), bool)
CASES_FILE = os.path.abspath(C.__file__)


def _args(fn):
    n = len(inspect.signature(fn).parameters)
    return (X, MASK)[:n]


def _expected(fn, marker="expect"):
    src, start = inspect.getsourcelines(fn)
    out = set()
    for i, line in enumerate(src):
        m = re.search(rf"# {marker}: (.*)$", line)
        if m:
            for rule in m.group(1).split(","):
                out.add((rule.strip(), start + i))
    return out


BAD = [f for n, f in vars(C).items() if n.startswith("bad_")]
GOOD = [f for n, f in vars(C).items() if n.startswith("good_")]


@pytest.mark.parametrize("fn", BAD, ids=lambda f: f.__name__)
def test_positive_case_points_at_line(fn):
    with warnings.catch_warnings():
        # bad_f16_literal adds -1e9 to a float16 on purpose: numpy says so
        # ("overflow encountered in cast") as jax traces the constant.
        warnings.filterwarnings(
            "ignore", "overflow encountered in cast", RuntimeWarning
        )
        findings = jaxnan.lint(fn, *_args(fn))
    expected = _expected(fn)
    assert expected, "a bad case needs an '# expect:' marker"
    assert {(f.rule, f.line) for f in findings} == expected
    for f in findings:
        rule = jaxnan.LINT_RULES[f.rule]
        assert os.path.abspath(f.file) == CASES_FILE
        assert f.code == open(CASES_FILE).read().splitlines()[f.line - 1].strip()
        assert f.message.startswith("jaxnan: ")
        assert f.fix
        assert f.confidence in ("confirmed", "unchecked"), f
        if f.rule != "low-precision-overflow":
            assert f.severity == rule.severity


@pytest.mark.parametrize("fn", GOOD, ids=lambda f: f.__name__)
def test_near_miss_has_no_finding(fn):
    assert jaxnan.lint(fn, *_args(fn)) == []


def test_every_rule_has_two_positives_and_two_near_misses():
    positives = {}
    for fn in BAD:
        for rule, _ in _expected(fn):
            positives[rule] = positives.get(rule, 0) + 1
    for rule in jaxnan.LINT_RULES:
        assert positives.get(rule, 0) >= 2, rule
        assert len(C.NEAR_MISS[rule]) >= 2, rule
    assert set(C.NEAR_MISS) == set(jaxnan.LINT_RULES)


def test_rule_docs_are_complete():
    sev = {r.severity for r in jaxnan.LINT_RULES.values()}
    assert sev <= {"error", "warning", "info"}
    for r in jaxnan.LINT_RULES.values():
        assert r.summary and r.fix and r.bad and r.good and r.bad != r.good


# Each rule's `bad` and `good` examples, linted: the names they use.
_EXAMPLE_ARGS = {
    "x": jnp.ones((8, 4)),
    "w": jnp.ones((4, 3)),
    "x16": jnp.ones((8, 4), jnp.float16),
    "logits": jnp.ones((8, 4)),
    "y": jnp.ones((8, 4)),
    "mask": MASK,
    "m": MASK,
}


def _example(expr):
    """``example(x, w, ...) = sum(expr)`` as float32, compiled from the text."""
    import optax

    src = (
        f"def example({', '.join(_EXAMPLE_ARGS)}):\n"
        f"    return jnp.sum(({expr}).astype(jnp.float32))\n"
    )
    namespace = {"jax": jax, "jnp": jnp, "optax": optax}
    exec(compile(src, "<lint-rule-example>", "exec"), namespace)
    return namespace["example"]


@pytest.mark.parametrize("rule", list(jaxnan.LINT_RULES))
def test_rule_examples_are_linted(rule):
    """The bad example of each rule is reported by it; the good one is clean."""
    info = jaxnan.LINT_RULES[rule]
    args = tuple(_EXAMPLE_ARGS.values())
    differentiated = (0, 1, 2, 3)  # the float parameters
    bad = jaxnan.lint(_example(info.bad), *args, argnums=differentiated)
    assert rule in {f.rule for f in bad}, info.bad
    assert jaxnan.lint(_example(info.good), *args, argnums=differentiated) == []


def test_fix_fits_a_layer_norm():
    """A LayerNorm's std gets eps on the variance, not optax.safe_norm."""
    findings = jaxnan.lint(C.bad_layer_norm_no_eps, X)
    assert {f.rule for f in findings} == {"sqrt-zero-grad", "div-no-epsilon"}
    for f in findings:
        assert "safe_norm" not in f.fix, f
        assert "var + 1e-5" in f.fix, f


def test_where_fix_names_the_guarded_operation():
    (f,) = jaxnan.lint(C.bad_where_div, X)
    assert f.fix.startswith("double where: jnp.where(c, 1.0 / jnp.where(c, x, 1.0)")
    (f,) = jaxnan.lint(C.bad_where_log, X)
    assert "jnp.log(jnp.where(c, x, 1.0))" in f.fix


def test_epsilon_is_not_denied():
    """An epsilon float16 rounds to 0 is named with its value and dtype."""
    (f,) = jaxnan.lint(C.bad_layer_norm_f16_eps, X)
    assert f.rule == "epsilon-underflow"
    assert "no epsilon" not in f.message
    assert "1e-08" in f.message and "float16" in f.message


@pytest.mark.parametrize("fn", BAD, ids=lambda f: f.__name__)
def test_messages_have_no_doubled_phrases(fn):
    for f in jaxnan.lint(fn, *_args(fn)):
        assert C.repeated_phrase(f.message) is None, f.message


def _cumsum_causal(x):
    s = x @ x.T
    keep = jnp.cumsum(jnp.eye(s.shape[0]), axis=0) > 0  # tril, not proven
    return jnp.sum(jax.nn.softmax(jnp.where(keep, s, -jnp.inf)) * s)  # possible


def test_witness_that_stays_finite_makes_a_possible_warning():
    """The mask is evaluated as computed: no row is empty, so it is only possible."""
    (f,) = jaxnan.lint(_cumsum_causal, X)
    assert (f.rule, f.confidence, f.severity) == (
        "masked-softmax-all-masked",
        "possible",
        "warning",
    )
    assert f.code.endswith("# possible")
    assert f.witness == "with every data mask False (token ids 0): it gives 1"
    assert " warning (possible) [masked-softmax-all-masked] " in str(f)
    (g,) = jaxnan.lint(C.bad_masked_softmax, X, MASK)
    assert g.confidence == "confirmed" and g.witness.endswith("it gives NaN")


def test_witness_of_each_rule():
    """Where a rule has a witness, it holds on every positive case."""
    for fn in BAD:
        for f in jaxnan.lint(fn, *_args(fn)):
            assert f.confidence == "confirmed", f
            shown = r": (it gives|its gradient is) (NaN|-?inf|0|1.192e-07)$"
            assert re.search(shown, f.witness), f


def test_bfloat16_overflow_is_info():
    def f(x):
        return jnp.sum(jnp.exp(x.astype(jnp.bfloat16))).astype(jnp.float32)  # here

    (finding,) = jaxnan.lint(f, X)
    assert (finding.rule, finding.severity) == ("low-precision-overflow", "info")
    assert "bfloat16" in finding.message


# -- variants: the walk goes into jit, remat, cond, scan, while, vmap, custom_jvp,
# shard_map, and the line is still the user's.


def _wrap_jit(fn):
    return jax.jit(fn)


def _wrap_remat(fn):
    return jax.checkpoint(fn)


def _wrap_vmap(fn):
    return lambda x: jnp.sum(jax.vmap(fn)(x))


def _wrap_scan(fn):
    def g(x):
        out, _ = jax.lax.scan(lambda c, row: (c + fn(row), None), 0.0, x)
        return out

    return g


def _wrap_cond(fn):
    return lambda x: jax.lax.cond(x[0, 0] > 0, fn, lambda x: jnp.sum(x), x)


def _wrap_while(fn):
    def g(x):
        def body(c):
            i, acc = c
            return i + 1, acc + fn(x[i])

        return jax.lax.while_loop(lambda c: c[0] < 3, body, (0, 0.0))[1]

    return g


def _wrap_custom_jvp(fn):
    @jax.custom_jvp
    def h(x):
        return fn(x)

    @h.defjvp
    def _(primals, tangents):
        return jax.jvp(fn, primals, tangents)

    return h


def _wrap_shard_map(fn):
    mesh = helpers.mesh_of(8)

    def g(x):
        part = jax.shard_map(
            lambda xs: jax.lax.psum(fn(xs), "d"),
            mesh=mesh,
            in_specs=helpers.P("d"),
            out_specs=helpers.P(),
            check_vma=False,
        )
        return part(x)

    return g


WRAPPERS = [
    _wrap_jit,
    _wrap_remat,
    _wrap_vmap,
    _wrap_scan,
    _wrap_cond,
    _wrap_while,
    _wrap_custom_jvp,
    _wrap_shard_map,
]


@pytest.mark.parametrize("wrap", WRAPPERS, ids=lambda w: w.__name__[6:])
@pytest.mark.parametrize(
    "case", [C.bad_where_sqrt, C.bad_norm, C.bad_log_softmax], ids=lambda f: f.__name__
)
def test_variants_point_at_user_line(wrap, case):
    findings = jaxnan.lint(wrap(case), X)
    assert {(f.rule, f.line) for f in findings} == _expected(case)


@pytest.mark.parametrize("wrap", WRAPPERS[:4], ids=lambda w: w.__name__[6:])
def test_variants_keep_safe_code_clean(wrap):
    assert jaxnan.lint(wrap(C.good_double_where_sqrt), X) == []


# -- argnums, dedup, errors


def _two_args(w, x):
    return jnp.sum(w) + jnp.sum(jnp.where(x > 0, jnp.sqrt(x), 0.0))  # two-args


def test_argnums_selects_the_differentiated_input():
    assert jaxnan.lint(_two_args, X, X, argnums=0) == []
    (f,) = jaxnan.lint(_two_args, X, X, argnums=1)
    assert f.rule == "where-nan-grad"
    assert f.line == _expected(_two_args, "two-args") or f.code.endswith("# two-args")
    (f,) = jaxnan.lint(_two_args, X, X, argnums=(0, 1))
    assert f.rule == "where-nan-grad"


def test_pytree_argument():
    def loss(params, x):
        return jnp.linalg.norm(params["w"] @ x.T)  # pytree-line

    (f,) = jaxnan.lint(loss, {"w": jnp.ones((2, 4)), "b": jnp.ones(2)}, X)
    assert f.rule == "sqrt-zero-grad" and f.code.endswith("# pytree-line")
    assert jaxnan.lint(loss, {"w": jnp.ones((2, 4))}, X, argnums=1) != []


def test_same_rule_same_line_reported_once():
    def twice(x):
        return C.bad_where_sqrt(x) + C.bad_where_sqrt(2.0 * x)

    findings = jaxnan.lint(twice, X)
    assert [(f.rule, f.line) for f in findings] == sorted(_expected(C.bad_where_sqrt))


def test_errors_sorted_first():
    def loss(x):
        a = jnp.sum(jnp.log(jax.nn.softmax(x)))
        return a + jnp.sum(jnp.where(x > 0, jnp.log(x), 0.0))

    sev = [f.severity for f in jaxnan.lint(loss, X)]
    assert sev == ["error", "warning"]


def test_bad_arguments():
    with pytest.raises(
        TypeError, match=re.escape("jaxnan: lint(fn=...) must be callable")
    ):
        jaxnan.lint(3.0, X)
    with pytest.raises(
        ValueError, match=re.escape("jaxnan: lint(argnums=2) is out of range for 1")
    ):
        jaxnan.lint(C.bad_norm, X, argnums=2)


def test_nothing_is_executed():
    calls = []

    def loss(x):
        jax.debug.callback(lambda v: calls.append(v), x)
        return jnp.linalg.norm(x)

    with jax.transfer_guard("disallow"):
        findings = jaxnan.lint(loss, jax.ShapeDtypeStruct((3,), jnp.float32))
    assert [f.rule for f in findings] == ["sqrt-zero-grad"] and calls == []


def test_unknown_higher_order_primitive_raises():
    """Like locate, lint refuses a nested jaxpr it cannot walk (not opaque)."""
    from jax.extend.core import Primitive

    hop_p = Primitive("jaxnan_test_lint_hop")
    hop_p.multiple_results = True
    hop_p.def_abstract_eval(lambda *xs, body: [v.aval for v in body.jaxpr.outvars])

    def loss(x):
        body = jax.make_jaxpr(lambda z: jnp.where(z > 0, jnp.sqrt(z), 0.0))(x)
        return jnp.sum(hop_p.bind(x, body=body)[0])

    with pytest.raises(NotImplementedError, match=re.escape("`jaxnan_test_lint_hop`")):
        jaxnan.lint(loss, X)


def test_finding_str():
    f = jaxnan.Finding("log-softmax", "warning", "jaxnan: m", "fix it", "a.py", 3, "c")
    assert str(f) == "a.py:3: warning [log-softmax] jaxnan: m\n    c\n    fix: fix it"
    with pytest.raises(AttributeError):
        f.rule = "x"


def test_severity_is_one_typed_vocabulary():
    from jaxnan._src.lint.registry import Severity

    assert all(type(r.severity) is Severity for r in jaxnan.LINT_RULES.values())
    f = jaxnan.Finding("log-softmax", "warning", "jaxnan: ...", "fix", None, None, "")
    assert f.severity is Severity.WARNING and f"{f.severity}" == "warning"
    assert [s.rank for s in Severity] == [0, 1, 2]
    with pytest.raises(ValueError, match="severity='fatal'.*'error', 'warning'"):
        jaxnan.Finding("log-softmax", "fatal", "jaxnan: ...", "fix", None, None, "")
