"""optax's nanolm example (a linen transformer LM, adamw), tiny and synthetic.

Written as the example writes it; jaxnan changes two lines:
`jaxnan.skip_nonfinite` around the optimizer and ``loss=loss`` in
``opt.update``.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnan
from tests import compilers

nn = pytest.importorskip("flax.linen")

VOCAB, BLOCK, BATCH = 16, 8, 4


class NanoLM(nn.Module):
    vocab_size: int
    num_layers: int = 1
    num_heads: int = 2
    head_size: int = 8
    dropout_rate: float = 0.2
    embed_size: int = 16
    block_size: int = BLOCK
    ln: dict = None  # the planted float16 LayerNorm bug sets this

    @nn.compact
    def __call__(self, x, training: bool):
        ln = self.ln or {}
        seq_len = x.shape[1]
        x = nn.Embed(self.vocab_size, self.embed_size)(x) + nn.Embed(
            self.block_size, self.embed_size
        )(jnp.arange(seq_len))
        for _ in range(self.num_layers):
            x_norm = nn.LayerNorm(**ln)(x)
            x = x + nn.MultiHeadDotProductAttention(
                num_heads=self.num_heads,
                qkv_features=self.head_size,
                out_features=self.head_size * self.num_heads,
                dropout_rate=self.dropout_rate,
            )(
                x_norm,
                x_norm,
                mask=jnp.tril(jnp.ones((x.shape[1], x.shape[1]))),
                deterministic=not training,
            )
            x = x + nn.Sequential(
                [
                    nn.Dense(4 * self.embed_size),
                    nn.relu,
                    nn.Dropout(self.dropout_rate, deterministic=not training),
                    nn.Dense(self.embed_size),
                ]
            )(nn.LayerNorm(**ln)(x))
        x = nn.LayerNorm(**ln)(x)
        return nn.Dense(self.vocab_size)(x)


LN_LINE = 1 + next(
    i
    for i, text in enumerate(open(__file__).read().splitlines())
    if "x_norm = nn.LayerNorm(**ln)(x)" in text
)
TRAIN_DATA = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, 512), jnp.int32)


def get_batch(random_key, data):
    ix = jax.random.randint(random_key, (BATCH,), 0, len(data) - BLOCK)
    x = jax.vmap(lambda i: jax.lax.dynamic_slice(data, (i,), (BLOCK,)))(ix)
    y = jax.vmap(lambda i: jax.lax.dynamic_slice(data, (i + 1,), (BLOCK,)))(ix)
    return x, y


def make(guarded, lr=1e-3, ln=None):
    model = NanoLM(vocab_size=VOCAB, ln=ln)

    def loss_fun(params, x, y, dropout_key):
        logits = model.apply(params, x, training=True, rngs={"dropout": dropout_key})
        return optax.softmax_cross_entropy_with_integer_labels(
            logits=logits, labels=y
        ).mean()

    opt = optax.adamw(learning_rate=lr)
    if guarded:
        opt = jaxnan.skip_nonfinite(opt)

    @jax.jit
    def step(key, params, opt_state):
        key, subkey = jax.random.split(key)
        batch = get_batch(key, TRAIN_DATA)
        loss, grad = jax.value_and_grad(loss_fun)(params, *batch, subkey)
        extra = {"loss": loss} if guarded else {}
        updates, opt_state = opt.update(grad, opt_state, params, **extra)
        params = optax.apply_updates(params, updates)
        return params, opt_state, key, loss

    # The example's init, compiled as one cheap program (tests/compilers.py).
    var_params = compilers.cheap_init(
        lambda key, x: model.init(key, x, training=False),
        jax.random.key(0),
        jnp.ones((BATCH, BLOCK), jnp.int32),
    )
    return model, opt, step, loss_fun, var_params


def train(guarded, steps=20, **kw):
    model, opt, step, loss_fun, params = make(guarded, **kw)
    opt_state = opt.init(params)
    key = jax.random.key(1)
    losses = []
    for _ in range(steps):
        params, opt_state, key, loss = step(key, params, opt_state)
        losses.append(loss)
    return params, opt_state, losses


@pytest.fixture(scope="module")
def healthy():
    return train(False), train(True)


@pytest.mark.default_compiler
def test_twenty_healthy_steps_close(healthy):
    (p0, s0, l0), (p1, s1, l1) = healthy
    p0, p1 = jax.tree.map(lambda x: x, p0), jax.tree.map(lambda x: x, p1)
    np.testing.assert_allclose(np.asarray(l0), np.asarray(l1), rtol=1e-6)
    # The attention key bias has a zero gradient in exact arithmetic (softmax
    # ignores a shift shared by all keys): adamw turns its rounding noise into
    # lr-sized steps, so a 1-ulp difference elsewhere moves it by up to lr.
    key_bias = p1["params"]["MultiHeadDotProductAttention_0"]["key"]["bias"]
    assert float(jnp.abs(key_bias).max()) <= 20 * 1e-3
    for tree in (p0, p1):
        tree["params"]["MultiHeadDotProductAttention_0"]["key"].pop("bias")
    chex.assert_trees_all_close(p0, p1, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(s0, s1.inner_state, rtol=1e-5, atol=1e-7)
    assert int(s1.nonfinite_total) == 0


@pytest.mark.default_compiler
def test_twenty_healthy_steps_bit_for_bit(healthy):
    (p0, s0, l0), (p1, s1, l1) = healthy
    np.testing.assert_array_equal(np.asarray(l0), np.asarray(l1))
    jax.tree.map(np.testing.assert_array_equal, p0, p1)
    jax.tree.map(np.testing.assert_array_equal, s0, s1.inner_state)


@pytest.fixture(scope="module")
def layernorm_bug():
    # A zero-variance row (token 0 and position 0 embed to zeros) through a
    # float16 LayerNorm whose epsilon 1e-8 rounds to 0 in float16.
    ln = {"epsilon": 1e-8, "dtype": jnp.float16, "force_float32_reductions": False}
    model, opt, step, loss_fun, params = make(True, ln=ln)
    emb = params["params"]
    emb["Embed_0"]["embedding"] = emb["Embed_0"]["embedding"].at[0].set(0.0)
    emb["Embed_1"]["embedding"] = emb["Embed_1"]["embedding"].at[0].set(0.0)
    x = jnp.zeros((BATCH, BLOCK), jnp.int32).at[:, 1:].set(3)
    batch = (x, jnp.ones_like(x), jax.random.key(2))
    d = jaxnan.locate(jax.value_and_grad(loss_fun))(params, *batch)
    return opt, loss_fun, params, batch, d


def test_float16_layernorm_epsilon_underflow_is_skipped_and_located(layernorm_bug):
    opt, loss_fun, params, batch, d = layernorm_bug
    assert (d.primitive, d.line, d.phase) == ("rsqrt", LN_LINE, "forward")
    assert d.dtype == "float16" and d.file == __file__

    # The guarded update of that batch is skipped: params unchanged. (Under
    # jit, as in training: one compile instead of one per op of the model.)
    @jax.jit
    def update(params, *batch):
        loss, grads = jax.value_and_grad(loss_fun)(params, *batch)
        return opt.update(grads, opt.init(params), params, loss=loss)

    updates, opt_state = update(params, *batch)
    assert int(opt_state.nonfinite_total) == 1
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates))


def test_float16_layernorm_epsilon_underflow_cause(layernorm_bug):
    # The epsilon comes in through **ln: the jaxpr only holds its float16
    # value, 0.0, so it is found in the dict the line unpacks.
    d = layernorm_bug[-1]
    assert d.cause == "precision"
    assert d.inputs_seen.endswith("; the constant 1e-08 is 0.0 in float16")
    # The fix names the two changes that help: an epsilon float16 holds, or
    # the line computed in float32.
    assert d.fix.startswith("float16 cannot hold the constant (1e-08 is 0.0")
    assert "eps >= 1e-5 for float16" in d.fix
    assert "compute this line in float32" in d.fix


def test_learning_rate_1000x_too_high_never_applies_a_nonfinite_update():
    params, opt_state, losses = train(True, steps=20, lr=1.0)
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))
    # What jaxnan promises: no nonfinite update reaches the params. Whether
    # lr 1.0 goes nonfinite at all within 20 steps is the model's business.
    skipped = int(opt_state.nonfinite_total)
    assert skipped >= sum(not np.isfinite(np.asarray(v)) for v in losses)
