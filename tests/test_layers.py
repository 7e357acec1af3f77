"""Layers (norms, attention, feed-forward, positional) against small NumPy references of the original's maths."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vla_foundry_jax.layers import (
    ATTN_NAMES,
    NORM_TYPES,
    Dense,
    FeedForward,
    LearnedPositionalEmbedding,
    apply_rotary,
    dot_product_attention,
    make_norm,
    rotary_inv_freq,
    swiglu_hidden_dim,
)

RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------------------------------- references
def np_layer_norm(x, w=None, b=None, eps=1e-5):
    x = np.asarray(x, np.float64)
    mean = x.mean(-1, keepdims=True)
    y = (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y


def np_attention(q, k, v, *, causal, key_mask=None, q_offset=None, kv_length=None):
    """The original's torch_attn masking: end-aligned rectangular causal, padding merged, empty rows unmasked."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, Sq, _, hd = q.shape
    Sk = k.shape[1]
    valid = np.ones((Sq, Sk), bool)
    if kv_length is not None:
        valid &= np.arange(Sk)[None] < kv_length
    allowed = valid.copy()
    if causal:
        off = Sk - Sq if q_offset is None else q_offset
        allowed &= np.arange(Sk)[None] <= off + np.arange(Sq)[:, None]
    allowed = np.broadcast_to(allowed, (B, Sq, Sk)).copy()
    if key_mask is not None:
        allowed &= np.asarray(key_mask, bool)[:, None, :]
        empty = ~allowed.any(-1)
        allowed[empty] = np.broadcast_to(valid, (B, Sq, Sk))[empty]
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    s = np.where(allowed[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def np_rope(x, positions):
    hd = x.shape[-1]
    inv = 1.0 / (10000.0 ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    ang = np.asarray(positions, np.float64)[:, None] * inv
    emb = np.concatenate([ang, ang], -1)[None, :, None, :]
    x1, x2 = np.split(x, 2, -1)
    return x * np.cos(emb) + np.concatenate([-x2, x1], -1) * np.sin(emb)


# ----------------------------------------------------------------------------------------------------- norms
def test_swiglu_hidden_sizes():
    assert [swiglu_hidden_dim(h) for h in (64, 96, 512, 1024, 2048)] == [256, 256, 1536, 2816, 5632]


def test_rms_norm_known_vector():
    norm = make_norm("rms_norm", 4, 1e-5)
    norm.weight.set_value(jnp.array([1.0, 2.0, 0.5, -1.0]))
    x = jnp.array([1.0, 2.0, 3.0, 4.0])
    expected = np.array([1.0, 2.0, 3.0, 4.0]) / math.sqrt(7.5 + 1e-5) * np.array([1.0, 2.0, 0.5, -1.0])
    np.testing.assert_allclose(np.asarray(norm(x)), expected, rtol=1e-6)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_norms_match_reference(norm_type):
    H = 16
    norm = make_norm(norm_type, H, 1e-5)
    has_w = norm_type != "no_wb_layer_norm"
    has_b = norm_type in ("default_layer_norm", "lp_layer_norm")
    assert (norm.weight is not None) == has_w and (norm.bias is not None) == has_b
    w = RNG.normal(size=H).astype(np.float32)
    b = RNG.normal(size=H).astype(np.float32)
    if has_w:
        norm.weight.set_value(jnp.asarray(w))
    if has_b:
        norm.bias.set_value(jnp.asarray(b))
    x = (RNG.normal(size=(3, 5, H)) * 3 + 1).astype(np.float32)
    if norm_type == "rms_norm":
        ref = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5) * w
    else:
        ref = np_layer_norm(x, w if has_w else None, b if has_b else None)
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), ref, rtol=1e-5, atol=1e-5)
    if has_w:
        assert nnx.get_partition_spec(nnx.state(norm))["weight"].get_value() == jax.sharding.PartitionSpec("norm")


def test_lp_layer_norm_rounds_to_compute_dtype():
    H = 32
    norm = make_norm("lp_layer_norm", H, 1e-5, dtype=jnp.bfloat16)
    w = RNG.normal(size=H).astype(np.float32)
    norm.weight.set_value(jnp.asarray(w))
    x = jnp.asarray(RNG.normal(size=(4, H)).astype(np.float32))
    y = norm(x)
    assert y.dtype == jnp.bfloat16
    r = lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32))  # noqa: E731
    ref = np_layer_norm(r(x), r(w), 0.0)
    np.testing.assert_allclose(np.asarray(y, np.float32), r(ref), atol=1e-2)
    # default_layer_norm computes in float32 from the unrounded float32 weight
    d = make_norm("default_layer_norm", H, 1e-5, dtype=jnp.bfloat16)
    d.weight.set_value(jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(d(x), np.float32), r(np_layer_norm(np.asarray(x), w, 0.0)), atol=1e-2)


def test_rms_norm_bf16_order():
    """normalise in fp32, cast to the input dtype, then multiply by the weight."""
    H = 8
    norm = make_norm("rms_norm", H, 1e-5, dtype=jnp.bfloat16)
    w = jnp.asarray(RNG.normal(size=H).astype(np.float32))
    norm.weight.set_value(w)
    x = jnp.asarray(RNG.normal(size=(2, H))).astype(jnp.bfloat16)
    xf = x.astype(jnp.float32)
    expected = (xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + 1e-5)).astype(jnp.bfloat16) * w.astype(
        jnp.bfloat16
    )
    np.testing.assert_array_equal(np.asarray(norm(x), np.float32), np.asarray(expected, np.float32))


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="norm_type"):
        make_norm("batch_norm", 4)
    with pytest.raises(ValueError, match="ffn_type"):
        FeedForward("relu", 4, in_std=1.0, out_std=1.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="attn_name"):
        x = jnp.zeros((1, 2, 1, 4))
        dot_product_attention(x, x, x, causal=True, impl="flash")


# ----------------------------------------------------------------------------------------------------- attention
def _qkv(B=2, Sq=5, Sk=5, nh=2, hd=8):
    q = RNG.normal(size=(B, Sq, nh, hd)).astype(np.float32)
    k = RNG.normal(size=(B, Sk, nh, hd)).astype(np.float32)
    v = RNG.normal(size=(B, Sk, nh, hd)).astype(np.float32)
    return q, k, v


@pytest.mark.parametrize("impl", ["xla", "reference"])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_basic(impl, causal):
    q, k, v = _qkv()
    out = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), causal=causal, impl=impl)
    assert out.shape == q.shape
    np.testing.assert_allclose(np.asarray(out), np_attention(q, k, v, causal=causal), atol=1e-5)


@pytest.mark.parametrize("impl", ["torch_attn", "reference"])
def test_attention_query_offset_and_padding(impl):
    # q shorter than k: end-aligned rectangular causal mask (chunked decode)
    q, k, v = _qkv(Sq=2, Sk=6)
    out = dot_product_attention(*map(jnp.asarray, (q, k, v)), causal=True, impl=impl)
    np.testing.assert_allclose(np.asarray(out), np_attention(q, k, v, causal=True), atol=1e-5)
    # explicit offset into a static cache of 6 slots with 4 valid keys, plus padding of key 1 in row 0
    mask = np.ones((2, 6), bool)
    mask[0, 1] = False
    out = dot_product_attention(
        *map(jnp.asarray, (q, k, v)), causal=True, mask=jnp.asarray(mask), impl=impl, q_offset=2, kv_length=4
    )
    ref = np_attention(q, k, v, causal=True, key_mask=mask, q_offset=2, kv_length=4)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
    # slots >= kv_length do not matter
    k2, v2 = k.copy(), v.copy()
    k2[:, 4:] = 100.0
    v2[:, 4:] = -100.0
    out2 = dot_product_attention(
        *map(jnp.asarray, (q, k2, v2)), causal=True, mask=jnp.asarray(mask), impl=impl, q_offset=2, kv_length=4
    )
    np.testing.assert_allclose(np.asarray(out2), np.asarray(out), atol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_attention_fully_masked_rows_no_nan(impl):
    q, k, v = _qkv(B=1, Sq=4, Sk=4)
    mask = np.array([[0, 0, 1, 1]], bool)  # left padding: rows 0 and 1 see no key under causality
    out = np.asarray(
        dot_product_attention(*map(jnp.asarray, (q, k, v)), causal=True, mask=jnp.asarray(mask), impl=impl)
    )
    assert np.isfinite(out).all()
    ref = np_attention(q, k, v, causal=True, key_mask=mask)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    # the original zeroes such rows of its additive mask: they attend to all keys
    np.testing.assert_allclose(out[:, 0], np_attention(q, k, v, causal=False)[:, 0], atol=1e-5)


def test_attention_names():
    q, k, v = map(jnp.asarray, _qkv())
    ref = dot_product_attention(q, k, v, causal=True, impl="reference")
    for name in ATTN_NAMES:  # "cudnn" falls back to XLA for float32 / off GPU
        np.testing.assert_allclose(dot_product_attention(q, k, v, causal=True, impl=name), ref, atol=1e-5)


# ----------------------------------------------------------------------------------------------------- positional
def test_rotary_matches_reference_and_offsets():
    q, k, _ = _qkv(B=2, Sq=6, Sk=6, nh=2, hd=8)
    pos = np.arange(6)
    rq, rk = apply_rotary(jnp.asarray(q), jnp.asarray(k), jnp.asarray(pos))
    np.testing.assert_allclose(np.asarray(rq), np_rope(q, pos), atol=1e-5)
    np.testing.assert_allclose(np.asarray(rk), np_rope(k, pos), atol=1e-5)
    # positions offset by a cache length: rotating the tail alone with offset positions gives the same values
    tq, _ = apply_rotary(jnp.asarray(q[:, 4:]), jnp.asarray(k[:, 4:]), jnp.arange(4, 6))
    np.testing.assert_allclose(np.asarray(tq), np.asarray(rq[:, 4:]), atol=1e-6)
    # rotary_float32 in float32 is the same rotation
    fq, _ = apply_rotary(jnp.asarray(q), jnp.asarray(k), jnp.asarray(pos), float32=True)
    np.testing.assert_allclose(np.asarray(fq), np.asarray(rq), atol=1e-6)


def test_rotary_bf16_rounds_inv_freq():
    hd, p = 8, 2000
    x = jnp.ones((1, 1, 1, hd), jnp.bfloat16)
    pos = jnp.array([p])
    rq, _ = apply_rotary(x, x, pos)
    inv_bf16 = np.asarray(rotary_inv_freq(hd).astype(jnp.bfloat16).astype(jnp.float32), np.float64)
    ang = p * inv_bf16
    emb = np.concatenate([ang, ang])
    cos = np.asarray(jnp.asarray(np.cos(emb), jnp.float32).astype(jnp.bfloat16), np.float32)
    sin = np.asarray(jnp.asarray(np.sin(emb), jnp.float32).astype(jnp.bfloat16), np.float32)
    expected = cos + np.concatenate([-np.ones(hd // 2), np.ones(hd // 2)]) * sin
    np.testing.assert_allclose(np.asarray(rq, np.float32)[0, 0, 0], expected, atol=2e-2)
    # rotary_float32 keeps exact float32 frequencies and returns the input dtype
    fq, fk = apply_rotary(x, x, pos, float32=True)
    assert fq.dtype == fk.dtype == jnp.bfloat16
    inv = 1.0 / 10000.0 ** (np.arange(0, hd, 2) / hd)
    emb = np.concatenate([p * inv, p * inv])
    exact = np.cos(emb) + np.concatenate([-np.ones(hd // 2), np.ones(hd // 2)]) * np.sin(emb)
    np.testing.assert_allclose(np.asarray(fq, np.float32)[0, 0, 0], exact, atol=2e-2)
    assert np.abs(np.asarray(rq, np.float32) - np.asarray(fq, np.float32)).max() > 0.05  # the rounding matters


def test_learned_positions():
    pe = LearnedPositionalEmbedding(16, 8, rngs=nnx.Rngs(0))
    table = np.asarray(pe.embedding[...])
    assert table.shape == (16, 8) and 0.005 < table.std() < 0.04
    np.testing.assert_array_equal(np.asarray(pe(jnp.array([3, 5]))), table[[3, 5]])
    assert tuple(pe.embedding.out_sharding) == ("pos", "embed")


# ----------------------------------------------------------------------------------------------------- feed-forward
def test_swiglu_and_gelu_match_reference():
    H = 16
    x = RNG.normal(size=(2, 3, H)).astype(np.float32)
    ff = FeedForward("swiglu", H, in_std=0.3, out_std=0.1, rngs=nnx.Rngs(0))
    F = ff.hidden_dim
    assert F == 256 and ff.w12.kernel.shape == (H, 2 * F) and ff.w3.kernel.shape == (F, H)
    w12, w3 = np.asarray(ff.w12.kernel[...], np.float64), np.asarray(ff.w3.kernel[...], np.float64)
    h = x @ w12
    gate, up = h[..., :F], h[..., F:]
    ref = (gate / (1 + np.exp(-gate)) * up) @ w3
    np.testing.assert_allclose(np.asarray(ff(jnp.asarray(x))), ref, rtol=1e-5, atol=1e-5)

    ff = FeedForward("gelu", H, in_std=0.3, out_std=0.1, rngs=nnx.Rngs(1))
    w1, w2 = np.asarray(ff.w1.kernel[...], np.float64), np.asarray(ff.w2.kernel[...], np.float64)
    assert w1.shape == (H, 4 * H)
    h = x @ w1
    erf = np.vectorize(math.erf)
    ref = (0.5 * h * (1 + erf(h / math.sqrt(2)))) @ w2
    np.testing.assert_allclose(np.asarray(ff(jnp.asarray(x))), ref, rtol=1e-5, atol=1e-5)


def test_linear_init_trunc_normal():
    lin = Dense(256, 256, bias=False, std=0.05, names=("embed", "mlp"), rngs=nnx.Rngs(0))
    w = np.asarray(lin.kernel[...])
    assert np.abs(w).max() <= 0.15 + 1e-6
    assert abs(w.std() / (0.05 * 0.9866) - 1) < 0.03  # std of N(0,1) truncated at +-3 is 0.9866
    assert tuple(lin.kernel.out_sharding) == ("embed", "mlp")
    y = Dense(4, 2, bias=False, std=1.0, names=(None, None), rngs=nnx.Rngs(0), dtype=jnp.bfloat16)(jnp.ones((3, 4)))
    assert y.dtype == jnp.bfloat16


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matmul_gradients_match_torch(dtype):
    """``dense.matmul`` (plain-form gradients on CPU) against torch autograd of ``x @ w`` on a 3-D ``x``."""
    import torch

    from vla_foundry_jax.layers.dense import matmul

    x = RNG.normal(size=(2, 5, 7)).astype(np.float32)
    w = RNG.normal(size=(7, 3)).astype(np.float32)
    g = RNG.normal(size=(2, 5, 3)).astype(np.float32)
    xt, wt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(w).requires_grad_()
    yt = xt @ wt
    yt.backward(torch.from_numpy(g))
    y, vjp = jax.vjp(matmul, jnp.asarray(x, dtype), jnp.asarray(w, dtype))
    dx, dw = vjp(jnp.asarray(g, dtype))
    assert (y.dtype, dx.dtype, dw.dtype) == (dtype, dtype, dtype)
    tol = 1e-5 if dtype == jnp.float32 else 5e-2
    for got, want in ((y, yt.detach()), (dx, xt.grad), (dw, wt.grad)):
        np.testing.assert_allclose(np.asarray(got, np.float32), want.numpy(), rtol=tol, atol=tol * 4)
