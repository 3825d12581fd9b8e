"""Tests of the locate interpreter on control flow, sharding and rules."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.extend.core import Primitive
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnan
from jaxnan._src.locate import blocks, interpreter, primitive_rules, replay, strategies
from tests import helpers


def marker(tag):
    """The number of the line of this file ending with ``# <- tag``."""
    return helpers.tagged_line(__file__, tag)


def check(d, primitive, tag, phase="forward", iteration=None):
    assert d.found, str(d)
    assert (d.primitive, d.line, d.phase, d.iteration) == (
        primitive,
        marker(tag),
        phase,
        iteration,
    ), str(d)
    assert d.file == __file__


def test_value_codes():
    code = jax.jit(strategies.value_code)
    assert int(code(jnp.ones(5000))) == 0
    assert int(code(jnp.ones(5000).at[4321].set(jnp.inf))) == 1
    x = jnp.ones(5000).at[1].set(-jnp.inf).at[4999].set(jnp.nan)
    assert int(code(x)) == 2  # a float max would skip this NaN on CPU
    assert int(code(jnp.zeros((0,)))) == 0
    assert strategies.host_code(np.float32(-np.inf)) == 1
    assert strategies.host_code(3) == 0


def test_nested_jit():
    @jax.jit
    def inner(x):
        return jnp.log(x)  # <- jit

    d = jaxnan.locate(jax.jit(lambda x: inner(x) + 1.0))(jnp.array([1.0, 0.0]))
    check(d, "log", "jit")


def test_custom_jvp_primal_body_and_nn_functions():
    @jax.custom_jvp
    def safe_log(x):
        return jnp.log(x)  # <- cjvp

    safe_log.defjvp(lambda p, t: (safe_log(p[0]), t[0] / p[0]))
    check(jaxnan.locate(safe_log)(jnp.zeros(2)), "log", "cjvp")

    def f(x):
        return jax.nn.relu(jnp.exp(x)) + jax.nn.softplus(x)  # <- nn

    check(jaxnan.locate(f)(jnp.array([1.0, 100.0])), "exp", "nn")
    assert (
        jaxnan.locate(jax.grad(lambda x: jnp.sum(jax.nn.relu(x))))(jnp.zeros(3)).found
        is False
    )


def test_custom_vjp_backward():
    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)

    f.defvjp(lambda x: (jnp.sin(x), x), lambda r, g: (g / r,))

    def loss(x):
        return jnp.sum(f(x))  # <- cvjp

    d = jaxnan.locate(jax.value_and_grad(loss))(jnp.array([1.0, 0.0]))
    assert (d.primitive, d.phase) == ("div", "backward"), str(d)

    # the primal body (sin) is evaluated and checked too
    def g(x):
        return jnp.log(f(x))  # <- cvjp_primal

    check(jaxnan.locate(g)(jnp.zeros(1)), "log", "cvjp_primal")


def test_remat():
    def loss(x):
        return jnp.sum(jax.checkpoint(lambda z: jnp.sqrt(z))(x))  # <- remat

    check(
        jaxnan.locate(jax.value_and_grad(loss))(jnp.array([-1.0, 1.0])), "sqrt", "remat"
    )
    d = jaxnan.locate(jax.value_and_grad(loss))(jnp.array([0.0, 1.0]))
    check(d, "div", "remat", phase="backward")


def test_cond_and_switch_taken_branch_only():
    def f(x, k):
        return lax.switch(k, [jnp.sin, lambda z: jnp.log(z), jnp.cos], x)  # <- switch

    check(jaxnan.locate(f)(jnp.zeros(2), 1), "log", "switch")
    assert not jaxnan.locate(f)(jnp.zeros(2), 0).found

    def g(x):
        return lax.cond(x[0] > 0, lambda z: z * 2, lambda z: 1.0 / z, x)  # <- cond

    check(jaxnan.locate(g)(jnp.zeros(2)), "div", "cond")


def test_scan_reports_iteration():
    def f(xs):
        def body(c, x):
            return c + jnp.log(x), c  # <- scan

        return lax.scan(body, 0.0, xs)[0]

    xs = jnp.array([1.0, 2.0, 3.0, 0.0, 5.0])
    check(jaxnan.locate(f)(xs), "log", "scan", iteration=(3,))
    # the reversed scan of the backward pass reports the index into xs too;
    # only the gradient is returned, so the event is the first one it depends
    # on: the derivative 1/x of the log (the primal log(0) feeds no output)
    d = jaxnan.locate(jax.grad(f))(jnp.array([1.0, 2.0, 3.0, 4.0]).at[2].set(0.0))
    check(d, "div", "scan", phase="backward", iteration=(2,))


def test_nested_scan_iterations():
    def f(xs):
        def outer(c, row):
            def inner(c2, x):
                return c2 + jnp.sqrt(x), None  # <- nested

            return lax.scan(inner, c, row)[0], None

        return lax.scan(outer, 0.0, xs)[0]

    xs = jnp.ones((3, 4)).at[2, 1].set(-1.0)
    check(jaxnan.locate(f)(xs), "sqrt", "nested", iteration=(2, 1))


def test_while_and_fori_loop():
    def f(x):
        return lax.fori_loop(0, 6, lambda i, c: jnp.log(c - 0.5 * i), x)  # <- fori

    check(jaxnan.locate(f)(jnp.float32(3.0)), "log", "fori", iteration=(2,))

    def g(x, n):
        return lax.while_loop(
            lambda c: c[0] < n,
            lambda c: (c[0] + 1, jnp.log(c[1] - 0.7)),  # <- while
            (0, x),
        )[1]

    check(jaxnan.locate(g)(jnp.float32(3.0), 5), "log", "while", iteration=(2,))


def test_vmapped_code():
    def f(x):
        return jnp.arccos(x)  # <- vmap

    d = jaxnan.locate(jax.vmap(jax.vmap(f)))(jnp.zeros((2, 3)).at[1, 2].set(1.5))
    check(d, "acos", "vmap")


def test_sharded_jit_reports_the_device_holding_the_element(mesh8):
    x = jnp.arange(16.0).at[11].set(-1.0)  # element 11: the shard of device 5
    x = jax.device_put(x, NamedSharding(mesh8, P("d")))

    @jax.jit
    def f(x):
        return jnp.sum(jnp.sqrt(x))  # <- sharded

    d = jaxnan.locate(f)(x)
    check(d, "sqrt", "sharded")
    assert d.device == mesh8.devices.flat[5].id
    # unsharded: no device
    assert jaxnan.locate(f)(jnp.arange(16.0).at[11].set(-1.0)).device is None


def test_pmap_reports_device():
    f = jax.pmap(lambda x: jnp.log(x) + lax.psum(x, "i"), axis_name="i")  # <- pmap
    d = jaxnan.locate(f)(jnp.ones((8, 2)).at[3, 1].set(0.0))
    check(d, "log", "pmap")
    assert d.device == jax.devices()[3].id
    assert d.nonfinite_outputs == {"output": (0, 0, 1)}


def test_shard_map_collectives(mesh8):
    perm = [(i, (i + 1) % 8) for i in range(8)]

    def body(x):
        total = lax.psum(jnp.sum(x), "d")  # per-shard statistics, reduced
        mean = lax.pmean(jnp.mean(x), "d")
        every = lax.all_gather(x, "d")
        left = lax.ppermute(x, "d", perm)  # device k gets the shard of k - 1
        one = (every.sum() / total) * (mean * 16.0 / total)
        return jnp.log(left * one)  # <- collectives

    f = jax.shard_map(body, mesh=mesh8, in_specs=P("d"), out_specs=P("d"))
    x = jnp.arange(1.0, 17.0).at[8].set(0.0)  # shard 4; after ppermute: device 5
    d = jaxnan.locate(f)(x)
    check(d, "log", "collectives")
    assert d.device == mesh8.devices.flat[5].id
    assert d.nonfinite_outputs == {"output": (0, 0, 1)}
    assert not jaxnan.locate(f)(jnp.arange(1.0, 17.0)).found


def test_shard_map_reports_device(mesh8):
    def body(x):
        return jnp.log(x)  # <- shmap

    f = jax.shard_map(body, mesh=mesh8, in_specs=P("d"), out_specs=P("d"))
    x = jnp.ones(16).at[11].set(0.0).at[13].set(-1.0)  # shards 5 and 6 go bad
    d = jaxnan.locate(f)(x)
    check(d, "log", "shmap")
    assert d.device == mesh8.devices.flat[5].id
    assert d.shapes == {"inputs": [(2,)], "outputs": [(2,)]}
    assert f"on device {d.device} (process 0)" in str(d)


def test_register_rule_first_order():
    twice_p = Primitive("jaxnan_test_twice")
    twice_p.def_abstract_eval(lambda x: x)

    @jaxnan.register_rule(twice_p)
    def _twice_rule(ctx, x):
        assert ctx.eqn.primitive is twice_p
        return ctx, x * 1e38

    try:

        def f(x):
            return twice_p.bind(x)  # <- rule

        check(jaxnan.locate(f)(jnp.array([1.0, 10.0])), "jaxnan_test_twice", "rule")
    finally:
        del primitive_rules.RULES[twice_p]


def _hop_primitive():
    hop_p = Primitive("jaxnan_test_hop")
    hop_p.multiple_results = True
    hop_p.def_abstract_eval(lambda *xs, body: [v.aval for v in body.jaxpr.outvars])
    return hop_p


def test_unknown_higher_order_primitive_raises_then_rule_works():
    hop_p = _hop_primitive()

    def f(x):
        body = jax.make_jaxpr(lambda z: jnp.log(z))(x)
        return hop_p.bind(x, body=body)[0]

    msg = "`jaxnan_test_hop`"
    with pytest.raises(NotImplementedError, match=re.escape(msg)):
        jaxnan.locate(f)(jnp.zeros(2))
    with pytest.raises(NotImplementedError, match=re.escape("jaxnan.register_rule")):
        jaxnan.locate(f)(jnp.zeros(2))

    @jaxnan.register_rule(hop_p)
    def _hop_rule(ctx, *args, body):
        return ctx, ctx.eval_jaxpr(body, (), args)

    try:
        d = jaxnan.locate(f)(jnp.zeros(2))
        assert d.primitive == "log"
    finally:
        del primitive_rules.RULES[hop_p]


def test_register_rule_type_error():
    with pytest.raises(
        TypeError, match=re.escape("jaxnan.register_rule(primitive) needs")
    ):
        jaxnan.register_rule("exp")


def _deep_loss(ws, x):
    for w in ws:
        x = jnp.tanh(x @ w)  # <- deep
    return jnp.mean(x**2)


def _deep_jaxpr(ws, x):
    leaves = jax.tree_util.tree_leaves((ws, x))
    fn = jax.value_and_grad(_deep_loss)
    return jax.make_jaxpr(lambda *a: fn(a[:-1], a[-1]))(*leaves), leaves


def _instrumented_traces(monkeypatch) -> list:
    """Records the strategy of every block the interpreter traces."""
    seen = []
    run_block = interpreter.run_block

    def spy(interp, *args, **kwargs):
        seen.append(type(interp.strategy).__name__)
        return run_block(interp, *args, **kwargs)

    monkeypatch.setattr(interpreter, "run_block", spy)
    return seen


def test_blocks_reuse_repeated_layers_and_match_one_program(monkeypatch):
    x = jnp.linspace(0.5, 0.9, 8).reshape(2, 4)
    fn = jax.value_and_grad(_deep_loss)
    seen = _instrumented_traces(monkeypatch)
    healthy = [jnp.eye(4) * 1.5 for _ in range(24)]
    closed, leaves = _deep_jaxpr(healthy, x)
    det = blocks.detect(closed, closed.consts, leaves)
    # A healthy step: every block runs plain, none instrumented; one node
    # table and one plain program per distinct block.
    assert det.index == det.nan_index == -1
    assert "Detect" not in seen and seen.count("Table") == det.compiled
    seen.clear()
    ws = list(healthy)
    ws[17] = jnp.full((4, 4), 3e38)  # x @ w overflows; tanh(inf) = 1 masks it
    leaves = jax.tree_util.tree_leaves((ws, x))
    det = blocks.detect(closed, closed.consts, leaves)
    # Only the block of layer 17's overflow computed a nonfinite value.
    assert seen.count("Detect") == 1
    one = interpreter.Interpreter("detect", 0)
    rec, _ = jax.jit(lambda c, a: interpreter.run(one, closed, c, a))(
        closed.consts, leaves
    )
    assert det.compiled < det.blocks  # identical layers share a compiled block
    assert det.index == int(rec.index) >= 0
    assert det.out_producers == one.out_producers

    def facts(n):
        return (
            n.index,
            n.eqn.primitive.name,
            n.eqn.source_info.traceback,
            n.name_stack,
            n.unit,
            n.producers,
            n.loop_depth,
            n.checked,
            n.in_avals,
            tuple(c.source_info.traceback for c in n.callers),
        )

    assert [facts(n) for n in det.nodes] == [facts(n) for n in one.nodes]
    d = jaxnan.locate(fn)(ws, x)
    check(d, "dot_general", "deep")
    assert d.nonfinite_outputs == {}


def _inf_then_nan_loss(ws, x):
    for w in ws:
        x = jnp.tanh(x @ w)
    big = jnp.exp(x * 200.0)  # overflows
    return jnp.mean(big - big)  # <- then-nan


def test_restricted_block_pass_matches_one_program_and_reuses_blocks():
    ws = [jnp.eye(4) * 1.5 for _ in range(24)]
    ws[5] = jnp.full((4, 4), 3e38)  # a first overflow, masked by tanh
    ws[17] = jnp.full((4, 4), 3e38)  # a second one
    x = jnp.linspace(0.5, 0.9, 8).reshape(2, 4)
    fn = jax.value_and_grad(_inf_then_nan_loss)
    run = replay.Run(fn, "loss", (), (ws, x), {})
    det, _, _ = run.detect()
    first = det.nodes[det.index]
    assert first.eqn.primitive.name == "dot_general"
    again, _, _ = run.detect(allow=lambda n: True)
    assert again.compiled == 0 and again.index == det.index  # all reused

    def whole(strategy):
        one = interpreter.Interpreter(strategy, 0)
        rec, _ = jax.jit(lambda c, a: interpreter.run(one, run.closed, c, a))(
            run.consts, run.leaves
        )
        return rec

    later = lambda n: n.unit > first.unit  # noqa: E731
    restricted, _, _ = run.detect(allow=later)
    assert 0 < restricted.compiled < restricted.blocks
    rec = whole(strategies.Detect(later))
    assert restricted.index == int(rec.index) > det.index
    assert restricted.nan_index == int(rec.nan_index)
    nan_only = whole(strategies.Detect(min_code=strategies.CODE_NAN))
    assert det.nan_index == int(nan_only.index) >= 0
    assert det.nodes[det.nan_index].eqn.primitive.name == "sub"
    d = jaxnan.locate(fn)(ws, x)
    assert d.nan_event["primitive"] == "sub"
    tag = "then-nan"
    assert d.nan_event["line"] == helpers.marker_line(__file__, f"# <- {tag}")


def test_plain_block_code_groups_values_by_dtype_under_a_byte_bound(monkeypatch):
    monkeypatch.setattr(blocks, "GROUP_BYTES", 64)
    f32, f16 = jnp.float32, jnp.float16
    xs = [jnp.zeros(4, f32), jnp.zeros(20, f32), jnp.zeros(4, f16), jnp.zeros(12, f32)]
    got = [[(x.dtype, x.shape) for x in g] for g in blocks._groups(xs)]
    # 80 bytes: alone; 16 + 48 bytes of float32 close a group; float16 apart.
    assert got == [[(f32, (20,))], [(f32, (4,)), (f32, (12,))], [(f16, (4,))]]

    def loss(x):
        y = jnp.exp(x) + 1.0
        return jnp.sum(jnp.log(y - 2.0))  # <- grouped

    # Every value of the block is reduced in a group of its own size here.
    d = jaxnan.locate(loss)(jnp.linspace(-1.0, 1.0, 64))
    check(d, "log", "grouped")


def test_a_print_in_the_function_runs_once_per_detect_pass(capsys):
    def loss(x):
        jax.debug.print("seen {}", x.sum())
        y = jnp.exp(x * 100.0)  # overflows: the block is re-run instrumented
        return jnp.sum(y - y)

    run = replay.Run(loss, "loss", (), (jnp.ones(3),), {})
    det, _, _ = run.detect()
    jax.effects_barrier()
    assert det.index >= 0
    # A block with a side effect runs instrumented only, not plain and then
    # instrumented: the print comes once.
    assert capsys.readouterr().out.count("seen 3.0") == 1


def test_a_nan_argument_runs_no_instrumented_block(monkeypatch):
    seen = _instrumented_traces(monkeypatch)
    ws = [jnp.eye(4) * 1.5 for _ in range(6)]
    x = jnp.linspace(0.5, 0.9, 8).reshape(2, 4).at[1, 2].set(jnp.nan)
    d = jaxnan.locate(jax.value_and_grad(_deep_loss))(ws, x)
    # The NaN batch is the root cause: the blocks run plain, for the outputs.
    assert (d.phase, d.input_elements) == ("input", {"x": [(1, 2)]})
    assert d.nonfinite_outputs["output[0]"] == (1, 0, 0)
    assert "Table" in seen and "Detect" not in seen


@pytest.mark.parametrize("small", [True, False])
def test_a_small_program_is_one_block_run_instrumented_at_once(monkeypatch, small):
    seen = _instrumented_traces(monkeypatch)
    x = jnp.linspace(0.5, 0.9, 8).reshape(2, 4)
    ws = [jnp.eye(4) * 1.5 for _ in range(4)]
    ws[1] = jnp.full((4, 4), 3e38)  # x @ w overflows
    closed, leaves = _deep_jaxpr(ws, x)
    n = len(blocks.flatten(closed).entries)
    monkeypatch.setattr(blocks, "SMALL_PROGRAM", n if small else n - 1)
    cache = {}
    det = blocks.detect(closed, closed.consts, leaves, cache=cache)
    kinds = sorted({key[0] for key in cache})
    one = interpreter.Interpreter("detect", 0)
    rec, _ = jax.jit(lambda c, a: interpreter.run(one, closed, c, a))(
        closed.consts, leaves
    )
    assert det.index == int(rec.index) >= 0
    assert det.nodes[det.index].eqn.primitive.name == "dot_general"
    if small:
        # One block: no plain run, one instrumented compile of the whole.
        assert (det.blocks, det.compiled, kinds) == (1, 1, ["run", "table"])
        assert seen == ["Table", "Detect"]
    else:
        assert "plain" in kinds and det.compiled > seen.count("Detect") == 1
    # Arguments that already hold a NaN: nothing searched, the block runs plain.
    seen.clear()
    bad = [leaves[0].at[0, 0].set(jnp.nan), *leaves[1:]]
    det = blocks.detect(closed, closed.consts, bad, search=False)
    assert det.index == -1 and "Detect" not in seen
