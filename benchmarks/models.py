"""Models shared by the benchmarks: a ~1M-parameter MLP and a small decoder LM."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def mlp_init(key, sizes=(512, 1024, 512, 10)):
    params = {}
    for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, k = jax.random.split(key)
        params[f"dense{i}"] = {
            "kernel": jax.random.normal(k, (m, n)) / np.sqrt(m),
            "bias": jnp.zeros(n),
        }
    return params


def mlp_loss(params, batch):
    x = batch["x"]
    n = len(params)
    for i in range(n):
        layer = params[f"dense{i}"]
        x = x @ layer["kernel"] + layer["bias"]
        if i < n - 1:
            x = jax.nn.relu(x)
    logp = jax.nn.log_softmax(x)
    return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1))


def mlp_batch(key, batch=128, d_in=512, classes=10):
    k1, k2 = jax.random.split(key)
    return {
        "x": jax.random.normal(k1, (batch, d_in)),
        "y": jax.random.randint(k2, (batch,), 0, classes),
    }


def lm_init(key, vocab=256, d=128, layers=2, heads=4, seq=64, ff=4):
    keys = iter(jax.random.split(key, 4 + 6 * layers))

    def dense(m, n):
        return jax.random.normal(next(keys), (m, n)) / np.sqrt(m)

    params = {
        "embed": jax.random.normal(next(keys), (vocab, d)) * 0.02,
        "pos": jax.random.normal(next(keys), (seq, d)) * 0.02,
        "blocks": [],
        "ln_f": {"scale": jnp.ones(d), "bias": jnp.zeros(d)},
    }
    for _ in range(layers):
        params["blocks"].append(
            {
                "ln1": {"scale": jnp.ones(d), "bias": jnp.zeros(d)},
                "qkv": dense(d, 3 * d),
                "proj": dense(d, d),
                "ln2": {"scale": jnp.ones(d), "bias": jnp.zeros(d)},
                "ff1": dense(d, ff * d),
                "ff2": dense(ff * d, d),
            }
        )
    params["heads"] = heads
    return params


def _ln(p, x, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def lm_logits(params, tokens):
    heads = 4
    b, t = tokens.shape
    x = params["embed"][tokens] + params["pos"][:t]
    d = x.shape[-1]
    mask = jnp.tril(jnp.ones((t, t), bool))
    for blk in params["blocks"]:
        h = _ln(blk["ln1"], x)
        q, k, v = jnp.split(h @ blk["qkv"], 3, axis=-1)
        q, k, v = (z.reshape(b, t, heads, d // heads) for z in (q, k, v))
        att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // heads)
        att = jnp.where(mask, att, -1e9)
        att = jax.nn.softmax(att, axis=-1)
        y = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d)
        x = x + y @ blk["proj"]
        h = _ln(blk["ln2"], x)
        x = x + jax.nn.gelu(h @ blk["ff1"]) @ blk["ff2"]
    x = _ln(params["ln_f"], x)
    return x @ params["embed"].T


def lm_loss(params, batch):
    logits = lm_logits(params, batch["tokens"][:, :-1])
    logp = jax.nn.log_softmax(logits)
    tgt = batch["tokens"][:, 1:]
    return -jnp.mean(jnp.take_along_axis(logp, tgt[..., None], axis=-1))


def lm_batch(key, batch=8, seq=64, vocab=256):
    return {"tokens": jax.random.randint(key, (batch, seq + 1), 0, vocab)}


def lm_params(key, **kw):
    p = lm_init(key, **kw)
    p.pop("heads")
    return p


MODELS = {
    "mlp": (lambda k: mlp_init(k), mlp_loss, lambda k: mlp_batch(k)),
    "transformer": (lambda k: lm_params(k), lm_loss, lambda k: lm_batch(k)),
}
