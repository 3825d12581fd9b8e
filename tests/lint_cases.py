"""Positive and near-miss negative cases for `jaxnan.lint`.

A line ending in ``# expect: RULE[, RULE]`` is where those findings must point;
each ``bad_*`` function has at least one, each ``good_*`` function none.
"""

import re

import jax
import jax.numpy as jnp
import optax

f16 = jnp.float16


def repeated_phrase(text):
    """The first three-word phrase that a message repeats, None when none."""
    words = re.findall(r"[\w()*+/.-]+", text.lower())
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return next((g for g in grams if grams.count(g) > 1), None)


# --- where-nan-grad ---------------------------------------------------------
def bad_where_sqrt(x):
    return jnp.sum(jnp.where(x > 0, jnp.sqrt(x), 0.0))  # expect: where-nan-grad


def bad_where_div(x):
    return jnp.sum(jnp.where(x != 0, 1.0 / x, 0.0))  # expect: where-nan-grad


def bad_where_log(x):
    y = x * 2.0
    return jnp.sum(jnp.where(y > 0, jnp.log(y), -1.0))  # expect: where-nan-grad


def bad_where_arctan2(x):
    a, b = x[:2], x[1:3]
    r = a**2 + b**2
    return jnp.sum(jnp.where(r > 0, jnp.arctan2(a, b), 0.0))  # expect: where-nan-grad


def bad_arctan2_difference(x):
    dy, dx = x[:, 1] - x[:, 0], x[:, 3] - x[:, 2]
    return jnp.sum(jnp.arctan2(dy, dx))  # expect: atan2-zero-grad


def bad_arctan2_angle_between(x):
    p, q = x[:4], x[4:]
    d = p - q
    angle = jnp.arctan2(d[:, 1], d[:, 0])  # expect: atan2-zero-grad
    return jnp.mean(angle**2)


def good_arctan2_offset(x):
    dy, dx = x[:, 1] - x[:, 0], x[:, 3] - x[:, 2]
    return jnp.sum(jnp.arctan2(dy, jnp.abs(dx) + 1e-3))


def good_arctan2_double_where(x):
    dy, dx = x[:, 1] - x[:, 0], x[:, 3] - x[:, 2]
    ok = (dx != 0) | (dy != 0)
    safe = jnp.arctan2(jnp.where(ok, dy, 0.0), jnp.where(ok, dx, 1.0))
    return jnp.sum(jnp.where(ok, safe, 0.0))


def good_double_where_sqrt(x):
    safe = jnp.where(x > 0, x, 1.0)
    return jnp.sum(jnp.where(x > 0, jnp.sqrt(safe), 0.0))


def good_double_where_div(x):
    return jnp.sum(jnp.where(x != 0, 1.0 / jnp.where(x != 0, x, 1.0), 0.0))


def good_where_positive_branch(x):
    return jnp.sum(jnp.where(x > 0, jnp.log(jnp.exp(x) + 1.0), x))


# --- sqrt-zero-grad ---------------------------------------------------------
def bad_norm(x):
    return jnp.linalg.norm(x)  # expect: sqrt-zero-grad


def bad_std(x):
    return jnp.std(x) + jnp.sum(x)  # expect: sqrt-zero-grad


def bad_sqrt_sum_squares(x):
    return jnp.sqrt(jnp.sum(x**2))  # expect: sqrt-zero-grad


def bad_layer_norm_no_eps(x):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    y = (x - mean) / jnp.sqrt(var)  # expect: sqrt-zero-grad, div-no-epsilon
    return jnp.sum(y)


def good_safe_norm(x):
    return optax.safe_norm(x, 1e-6)


def good_norm_eps(x):
    return jnp.sqrt(jnp.sum(x**2) + 1e-12)


def good_norm_stop_gradient(x):
    return jnp.sum(x) * jax.lax.stop_gradient(jnp.linalg.norm(x))


# --- log-softmax / log-sigmoid / hand-written cross-entropy ------------------
def bad_log_softmax(x):
    return jnp.sum(jnp.log(jax.nn.softmax(x)))  # expect: log-softmax


def bad_log_softmax_axis0(x):
    p = jax.nn.softmax(x, axis=0)
    return jnp.log(p)[0]  # expect: log-softmax


def bad_log_sigmoid(x):
    return jnp.sum(jnp.log(jax.nn.sigmoid(x)))  # expect: log-sigmoid


def bad_log_one_minus_sigmoid(x):
    return jnp.sum(jnp.log(1.0 - jax.nn.sigmoid(x)))  # expect: log-sigmoid


def bad_cross_entropy(x):
    y = jax.nn.one_hot(jnp.arange(x.shape[0]) % x.shape[-1], x.shape[-1])
    lp = jnp.log(jax.nn.softmax(x))  # expect: hand-written-cross-entropy
    return -jnp.sum(y * lp)


def bad_cross_entropy_mean(x):
    y = jnp.full(x.shape, 1.0 / x.shape[-1])
    p = jax.nn.softmax(x, axis=-1)
    ce = -jnp.sum(y * jnp.log(p), axis=-1)  # expect: hand-written-cross-entropy
    return jnp.mean(ce)


def good_log_softmax(x):
    return jnp.sum(jax.nn.log_softmax(x))


def good_optax_ce(x):
    y = jnp.full(x.shape, 1.0 / x.shape[-1])
    return optax.softmax_cross_entropy(x, y).mean()


def good_log_sigmoid(x):
    return jnp.sum(jax.nn.log_sigmoid(x) + jax.nn.log_sigmoid(-x))


def good_sigmoid_bce(x):
    return optax.sigmoid_binary_cross_entropy(x, jnp.ones_like(x)).mean()


# --- masked-softmax-all-masked ----------------------------------------------
def bad_masked_softmax(x, mask):
    z = jnp.where(mask, x, -jnp.inf)
    p = jax.nn.softmax(z)  # expect: masked-softmax-all-masked
    return jnp.sum(p * x)


def bad_masked_logsumexp(x, mask):
    z = jnp.where(mask, x, -jnp.inf)
    return jax.nn.logsumexp(z)  # expect: masked-softmax-all-masked


def bad_additive_mask(x, mask):
    bias = jnp.where(mask, 0.0, -jnp.inf)
    return jnp.sum(jax.nn.softmax(x + bias) * x)  # expect: masked-softmax-all-masked


def bad_query_padding_mask(x, mask):
    pad = mask[:, 0]
    both = pad[:, None] & pad[None, :]  # a padded query keeps no key
    z = jnp.where(both, x @ x.T, -jnp.inf)
    return jnp.sum(jax.nn.softmax(z))  # expect: masked-softmax-all-masked


def good_causal_and_padding(x, mask):
    s = x @ x.T
    causal = jnp.tril(jnp.ones(s.shape, bool))
    keep = causal & mask[:, 0][None, :]  # key padding: the first token is real
    return jnp.sum(jax.nn.softmax(jnp.where(keep, s, -jnp.inf), axis=-1) * s)


def good_causal_then_padding(x, mask):
    s = x @ x.T
    causal = jnp.tril(jnp.ones(s.shape, bool))
    s = jnp.where(causal, s, -jnp.inf)
    s = jnp.where(mask[:, 0][None, :], s, -jnp.inf)
    return jnp.sum(jax.nn.softmax(s, axis=-1) * s)


def good_masked_softmax_finite(x, mask):
    return jnp.sum(jax.nn.softmax(jnp.where(mask, x, jnp.finfo(x.dtype).min)) * x)


def good_causal_tril(x, mask):
    causal = jnp.tril(jnp.ones(x.shape, bool))
    return jnp.sum(jax.nn.softmax(jnp.where(causal, x, -jnp.inf)) * x)


def good_causal_arange(x, mask):
    q, k = jnp.arange(x.shape[-2]), jnp.arange(x.shape[-1])
    causal = q[:, None] >= k[None, :]
    return jnp.sum(jax.nn.softmax(jnp.where(causal, x, -jnp.inf)) * x)


# --- div-no-epsilon / epsilon-underflow -------------------------------------
def bad_div_norm(x):
    return jnp.sum(x / jnp.linalg.norm(x))  # expect: div-no-epsilon, sqrt-zero-grad


def bad_div_std(x):
    return jnp.sum((x - x.mean()) / x.std())  # expect: div-no-epsilon, sqrt-zero-grad


def bad_div_mask_sum(x):
    m = (x > 0.5).astype(jnp.float32)
    return jnp.sum(x * m) / jnp.sum(m)  # expect: div-no-epsilon


def good_div_norm_eps(x):
    return jnp.sum(x / jnp.sqrt(jnp.sum(x**2) + 1e-12))


def good_div_mask_max(x):
    m = (x > 0.5).astype(jnp.float32)
    return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


def good_layer_norm(x):
    mu = x.mean()
    return jnp.sum((x - mu) * jax.lax.rsqrt(jnp.mean((x - mu) ** 2) + 1e-5))


def bad_eps_f16(x):
    h = x.astype(f16)
    r = h / (jnp.sum(h) + 1e-8)  # expect: epsilon-underflow
    return jnp.sum(r).astype(jnp.float32)


def bad_eps_f16_var(x):
    h = x.astype(f16)
    v = jnp.mean(jnp.square(h - h.mean()))  # expect: low-precision-overflow
    r = (h - h.mean()) / (v + 1e-7)  # expect: epsilon-underflow
    return jnp.sum(r).astype(jnp.float32)


def bad_layer_norm_f16_eps(x):
    h = (x * 0.1).astype(f16)
    mean = h.mean(-1, keepdims=True)
    var = jnp.mean(jnp.abs(h - mean), -1, keepdims=True)  # mean absolute deviation
    y = (h - mean) / jnp.sqrt(var + 1e-8)  # expect: epsilon-underflow
    return jnp.sum(y).astype(jnp.float32)


def bad_rsqrt_f16_eps(x):
    h = jnp.tanh(x).astype(f16)
    var = jnp.mean(jnp.square(h - h.mean()))
    y = h * jax.lax.rsqrt(var + 1e-8)  # expect: epsilon-underflow
    return jnp.sum(y).astype(jnp.float32)


def good_layer_norm_f32_stats(x):
    h = x.astype(f16)
    x32 = h.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + 1e-8)
    return jnp.sum(y.astype(f16)).astype(jnp.float32)


def good_eps_f16(x):
    h = x.astype(f16)
    return jnp.sum(h / (jnp.sum(jnp.abs(h)) + 1e-3)).astype(jnp.float32)


def good_eps_f32(x):
    return jnp.sum(x / (jnp.sum(jnp.abs(x)) + 1e-8))


# --- low-precision-overflow -------------------------------------------------
def bad_exp_f16(x):
    e = jnp.exp(x.astype(f16))  # expect: low-precision-overflow
    return jnp.sum(e).astype(jnp.float32)


def bad_sum_squares_f16(x):
    h = (x * 3.0).astype(f16)
    return jnp.sum(h * h).astype(jnp.float32)  # expect: low-precision-overflow


def good_exp_f32(x):
    return jnp.sum(jnp.exp(x.astype(f16).astype(jnp.float32)))


def good_softmax_f16(x):
    return jnp.sum(jax.nn.softmax(x.astype(f16)) * 2).astype(jnp.float32)


def good_logsumexp_f16(x):
    return jax.nn.logsumexp(x.astype(f16), axis=-1).astype(jnp.float32).sum()


def good_tanh_squares_f16(x):
    h = jnp.tanh(x.astype(f16))
    return jnp.sum(h * h).astype(jnp.float32)


# --- low-precision-cast -----------------------------------------------------
def bad_mask_cast(x, mask):
    b = x + jnp.where(mask, 0.0, -1e9)
    return jnp.sum(b.astype(f16)).astype(jnp.float32)  # expect: low-precision-cast


def bad_finfo_min_cast(x, mask):
    b = jnp.where(mask, x, jnp.finfo(jnp.float32).min)
    return jnp.sum(b.astype(f16)).astype(jnp.float32)  # expect: low-precision-cast


def bad_f16_literal(x, mask):
    h = x.astype(f16)
    return jnp.sum(h + (-1e9)).astype(jnp.float32)  # expect: low-precision-cast


def good_mask_after_cast(x, mask):
    h = x.astype(f16)
    return jnp.sum(jnp.where(mask, h, jnp.finfo(f16).min)).astype(jnp.float32)


def good_small_mask_cast(x, mask):
    b = x + jnp.where(mask, 0.0, -1e4)
    return jnp.sum(b.astype(f16)).astype(jnp.float32)


# --- low-precision-variance -----------------------------------------------
def bad_one_pass_variance_bf16(x):
    h = jnp.tanh(x).astype(jnp.bfloat16)
    mean = jnp.mean(h, -1, keepdims=True)
    var = jnp.mean(h * h, -1, keepdims=True) - mean**2  # expect: low-precision-variance
    return jnp.sum(h * jax.lax.rsqrt(var + 1e-5)).astype(jnp.float32)


def bad_one_pass_variance_f16(x):
    h = jnp.tanh(x).astype(f16)
    m2, m = jnp.mean(jnp.square(h)), jnp.mean(h)
    var = m2 - jnp.square(m)  # expect: low-precision-variance
    return jnp.sum(h / jnp.sqrt(var + 1e-3)).astype(jnp.float32)


def good_two_pass_variance_bf16(x):
    h = jnp.tanh(x).astype(jnp.bfloat16)
    mean = jnp.mean(h, -1, keepdims=True)
    var = jnp.mean(jnp.square(h - mean), -1, keepdims=True)
    return jnp.sum(h * jax.lax.rsqrt(var + 1e-5)).astype(jnp.float32)


def good_one_pass_variance_f32(x):  # flax's fast variance, in float32
    h = jnp.tanh(x).astype(jnp.bfloat16).astype(jnp.float32)
    mean = jnp.mean(h, -1, keepdims=True)
    var = jnp.maximum(0.0, jnp.mean(h * h, -1, keepdims=True) - mean**2)
    return jnp.sum(h * jax.lax.rsqrt(var + 1e-5))


# --- log-not-positive -------------------------------------------------------
def bad_log_linear(x):
    w = jnp.ones((x.shape[-1], 2))
    return jnp.sum(jnp.log(x @ w))  # expect: log-not-positive


def bad_sqrt_shift(x):
    return jnp.sum(jnp.sqrt(x - 1.0))  # expect: log-not-positive


def bad_fractional_power(x):
    return jnp.sum((x * 2.0 - 1.0) ** 1.5)  # expect: log-not-positive


def good_log_softplus(x):
    w = jnp.ones((x.shape[-1], 2))
    return jnp.sum(jnp.log(jax.nn.softplus(x @ w) + 1e-6))


def good_log_maximum(x):
    w = jnp.ones((x.shape[-1], 2))
    return jnp.sum(jnp.log(jnp.maximum(x @ w, 1e-6)))


def good_log_input(x):
    return jnp.sum(jnp.log(x))


# The safe near-miss versions of each rule (each must produce no finding).
NEAR_MISS = {
    "atan2-zero-grad": [good_arctan2_offset, good_arctan2_double_where],
    "where-nan-grad": [
        good_double_where_sqrt,
        good_double_where_div,
        good_where_positive_branch,
    ],
    "sqrt-zero-grad": [good_safe_norm, good_norm_eps, good_norm_stop_gradient],
    "log-softmax": [good_log_softmax, good_optax_ce],
    "log-sigmoid": [good_log_sigmoid, good_sigmoid_bce],
    "hand-written-cross-entropy": [good_optax_ce, good_log_softmax],
    "masked-softmax-all-masked": [
        good_masked_softmax_finite,
        good_causal_tril,
        good_causal_arange,
        good_causal_and_padding,
        good_causal_then_padding,
    ],
    "div-no-epsilon": [good_div_norm_eps, good_div_mask_max, good_layer_norm],
    "epsilon-underflow": [good_eps_f16, good_eps_f32, good_layer_norm_f32_stats],
    "low-precision-overflow": [
        good_exp_f32,
        good_softmax_f16,
        good_tanh_squares_f16,
        good_logsumexp_f16,
    ],
    "low-precision-cast": [good_mask_after_cast, good_small_mask_cast],
    "low-precision-variance": [good_two_pass_variance_bf16, good_one_pass_variance_f32],
    "log-not-positive": [good_log_softplus, good_log_maximum, good_log_input],
}
