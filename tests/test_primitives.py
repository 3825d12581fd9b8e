"""The one module of primitive knowledge: domains, spellings, the traversal."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import Primitive
from jax.extend.core import primitives as prims
from jax.sharding import PartitionSpec as P

from jaxnan._src.core import primitives
from jaxnan._src.core.primitives import Domain, Role


def _eqns(fn, *args):
    return jax.make_jaxpr(fn)(*args).jaxpr.eqns


def _roles(eqn):
    return [(s.role, s.param) for s in primitives.sub_jaxprs(eqn)]


def test_domains_name_real_primitives():
    names = {getattr(prims, n).name for n in dir(prims) if n.endswith("_p")}
    names.add("add_any")  # jax.extend exports it as add_jaxvals_p
    assert set(primitives.DOMAINS) <= names
    assert primitives.domain_of("log1p") is Domain.LOG
    assert primitives.DOMAINS["div"].operands == (1,)
    assert primitives.DOMAINS["atan2"].operands == (0, 1)
    assert primitives.domain_of("tanh") is None


def test_rearranging_ops_keep_their_elements():
    x = jnp.arange(6.0).reshape(2, 3)
    seen = {
        e.primitive.name
        for e in _eqns(lambda x: jnp.broadcast_to(x.T.reshape(6)[None], (2, 6)), x)
    }
    assert seen == {"transpose", "reshape", "broadcast_in_dim"}
    assert seen <= primitives.REARRANGING
    assert not primitives.REARRANGING & primitives.SUBSETTING
    assert "reduce_precision" not in primitives.REARRANGING  # it can overflow


def test_low_precision_dtypes():
    assert primitives.LOW_PRECISION == (np.dtype("float16"), np.dtype(jnp.bfloat16))
    assert [d.name for d in primitives.LOW_PRECISION] == list(
        primitives.LOW_PRECISION_NAMES
    )


@pytest.mark.parametrize(
    ("name", "spelling"),
    [("sqrt", "jnp.sqrt"), ("div", "/"), ("logistic", "jax.nn.sigmoid"),
     ("erf", "lax.erf")],
)  # fmt: skip
def test_user_spelling(name, spelling):
    assert primitives.user_spelling(name) == spelling


def _custom_jvp():
    @jax.custom_jvp
    def f(x):
        return jnp.sin(x)

    f.defjvp(lambda p, t: (f(p[0]), jnp.cos(p[0]) * t[0]))
    return f


def _custom_vjp():
    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)

    f.defvjp(lambda x: (f(x), x), lambda x, g: (jnp.cos(x) * g,))
    return f


def _custom_vmap():
    @jax.custom_batching.custom_vmap
    def f(x):
        return x * 2.0

    f.def_vmap(lambda n, ins, x: (x * 2.0, ins[0]))
    return f


@pytest.mark.parametrize(
    ("fn", "name", "roles"),
    [
        (jax.jit(jnp.sin), "jit", [(Role.CALL, "jaxpr")]),
        (jax.checkpoint(jnp.sin), "remat2", [(Role.CALL, "jaxpr")]),
        (_custom_jvp(), "custom_jvp_call", [(Role.CALL, "call_jaxpr")]),
        (_custom_vjp(), "custom_vjp_call", [(Role.CALL, "call_jaxpr")]),
        (_custom_vmap(), "custom_vmap_call", [(Role.CALL, "call")]),
        (
            lambda x: jax.lax.cond(x[0] > 0, jnp.sin, jnp.cos, x),
            "cond",
            [(Role.BRANCH, "branches")] * 2,
        ),
        (
            lambda x: jax.lax.scan(lambda c, _: (jnp.exp(c), None), x, None, 2)[0],
            "scan",
            [(Role.LOOP_BODY, "jaxpr")],
        ),
        (
            lambda x: jax.lax.while_loop(lambda c: c[0] < 3.0, jnp.exp, x),
            "while",
            [(Role.LOOP_CONDITION, "cond_jaxpr"), (Role.LOOP_BODY, "body_jaxpr")],
        ),
    ],
)
def test_sub_jaxprs_roles(fn, name, roles):
    eqns = [e for e in _eqns(fn, jnp.ones(2)) if e.primitive.name == name]
    assert len(eqns) == 1
    assert _roles(eqns[0]) == roles
    for sub in primitives.sub_jaxprs(eqns[0]):
        assert isinstance(sub.jaxpr, jax.extend.core.Jaxpr)


def test_sub_jaxprs_shard_map(mesh8):
    fn = jax.shard_map(jnp.sin, mesh=mesh8, in_specs=P("d"), out_specs=P("d"))
    (eqn,) = _eqns(fn, jnp.ones(8))
    assert eqn.primitive.name == "shard_map"
    assert _roles(eqn) == [(Role.PER_DEVICE, "jaxpr")]


def test_first_order_and_combiners_have_no_bodies():
    x = jnp.ones((4, 4))

    def combine(a, b):
        return a * b + b

    def fn(x):
        window = jax.lax.reduce_window(x, 0.0, combine, (2, 2), (1, 1), "SAME")
        return x.at[0].add(1.0) + window + jax.lax.reduce(x, 0.0, combine, (0,))

    holding = {
        e.primitive.name
        for e in _eqns(fn, x)
        if any(isinstance(v, jax.extend.core.Jaxpr) for v in e.params.values())
        or any(isinstance(v, jax.extend.core.ClosedJaxpr) for v in e.params.values())
    }
    assert holding == {"reduce_window", "reduce", "scatter-add"}
    for eqn in _eqns(fn, x):
        assert not primitives.is_higher_order(eqn)
        assert primitives.sub_jaxprs(eqn) == ()


def test_unknown_higher_order_primitive_raises_naming_it():
    hop_p = Primitive("jaxnan_test_unknown_hop")
    hop_p.multiple_results = True
    hop_p.def_abstract_eval(lambda *xs, body: [v.aval for v in body.jaxpr.outvars])

    def f(x):
        return hop_p.bind(x, body=jax.make_jaxpr(jnp.log)(x))[0]

    (eqn,) = _eqns(f, jnp.ones(2))
    with pytest.raises(NotImplementedError, match=re.escape("`jaxnan_test_unknown")):
        primitives.sub_jaxprs(eqn)
    (sub,) = primitives.sub_jaxprs(eqn, strict=False)
    assert (sub.role, sub.param) == (Role.UNKNOWN, "body")


def test_loop_depth():
    def inner(c, _):
        return jax.lax.fori_loop(0, 2, lambda i, v: jnp.exp(v), c), None

    def f(x):
        y = jax.lax.scan(inner, x, None, 3)[0]
        return jax.lax.cond(y[0] > 0, jnp.sin, jnp.cos, y)

    assert primitives.loop_depth(jax.make_jaxpr(f)(jnp.ones(2)).jaxpr) == 2
    assert primitives.loop_depth(jax.make_jaxpr(jnp.sin)(1.0).jaxpr) == 0
