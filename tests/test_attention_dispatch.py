"""Attention kernel choice (cuDNN on GPU, splash on TPU, XLA otherwise) and the numerics of each path on CPU."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vla_foundry_jax.layers.attention import (
    attention_mask,
    choose_kernel,
    dot_product_attention,
    head_major_attention,
    softmax_attention,
    splash_attention,
)


def _qkv(B=2, S=12, nh=4, nkv=4, hd=16, dtype=jnp.float32, seed=0):
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.standard_normal((B, S, nh, hd)), dtype)
    k, v = (jnp.asarray(r.standard_normal((B, S, nkv, hd)), dtype) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize(
    ("impl", "backend", "dtype", "S", "hd", "explicit", "expected"),
    [
        ("auto", "cpu", jnp.float32, 12, 24, False, "head_major"),
        ("torch_attn", "cpu", jnp.bfloat16, 12, 16, False, "head_major"),
        ("auto", "cpu", jnp.float32, 12, 24, True, "xla"),
        ("xla", "cpu", jnp.float32, 12, 24, False, "xla"),
        ("torch_attn", "gpu", jnp.bfloat16, 12, 16, False, "cudnn"),
        ("auto", "gpu", jnp.float16, 12, 64, False, "cudnn"),
        ("auto", "gpu", jnp.float32, 12, 16, False, "xla"),  # cuDNN flash rejects float32
        ("auto", "gpu", jnp.bfloat16, 12, 256, False, "xla"),  # head_dim above cuDNN's limit
        ("auto", "gpu", jnp.bfloat16, 12, 12, False, "xla"),  # head_dim not a multiple of 8
        ("auto", "gpu", jnp.bfloat16, 12, 16, True, "xla"),  # needs a boolean mask
        ("xla", "gpu", jnp.bfloat16, 12, 16, False, "xla"),
        ("reference", "gpu", jnp.bfloat16, 12, 16, False, "xla"),
        ("auto", "tpu", jnp.bfloat16, 256, 128, False, "splash"),
        ("auto", "tpu", jnp.bfloat16, 100, 128, False, "xla"),  # sequence not a multiple of the 128 block
        ("auto", "tpu", jnp.bfloat16, 256, 64, False, "xla"),
        ("cudnn", "tpu", jnp.bfloat16, 256, 128, False, "xla"),
        ("auto", "tpu", jnp.bfloat16, 256, 128, True, "xla"),
    ],
)
def test_choose_kernel(impl, backend, dtype, S, hd, explicit, expected):
    q, k, _ = _qkv(B=1, S=S, nh=1, nkv=1, hd=hd, dtype=dtype)
    assert choose_kernel(impl, q, k, causal=True, explicit=explicit, backend=backend) == expected


def test_choice_is_logged(caplog):
    q, k, _ = _qkv(B=1, S=8, nh=1, nkv=1, hd=40, dtype=jnp.float16)
    with caplog.at_level(logging.INFO, logger="vla_foundry_jax.layers.attention"):
        choose_kernel("auto", q, k, causal=False, backend="gpu")
    assert "'auto' on gpu (float16, head_dim 40, causal False): cudnn kernel" in caplog.text


@pytest.mark.parametrize("impl", ["auto", "torch_attn", "xla", "cudnn"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_cpu_falls_back_to_xla_with_reference_numerics(impl, causal, padded):
    q, k, v = _qkv(nkv=2)
    mask = jnp.asarray(np.arange(12)[None, :] < np.array([[12], [7]])) if padded else None
    got = dot_product_attention(q, k, v, causal=causal, mask=mask, impl=impl)
    allowed = attention_mask(12, 12, causal=causal, mask=mask) if (causal or padded) else None
    # independent maths: NumPy softmax(q k^T / sqrt(hd)) v with grouped-query heads
    qn, kn, vn = (np.asarray(t, np.float64) for t in (q, k, v))
    kn, vn = np.repeat(kn, 2, axis=2), np.repeat(vn, 2, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", qn, kn) / 4.0
    if allowed is not None:
        s = np.where(np.asarray(allowed), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    want = np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), vn)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-5)
    if allowed is not None:
        np.testing.assert_allclose(np.asarray(softmax_attention(q, k, v, allowed=allowed)), want, atol=2e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_head_major_gradients_match_autodiff_of_the_reference(causal):
    q, k, v = _qkv(S=10, hd=24, seed=5)
    allowed = attention_mask(10, 10, causal=True) if causal else None
    cot = jnp.asarray(np.random.default_rng(9).standard_normal(q.shape), jnp.float32)

    def ours(q, k, v):
        out = head_major_attention(*(t.transpose(0, 2, 1, 3) for t in (q, k, v)), causal=causal, scale=24**-0.5)
        return jnp.sum(out.transpose(0, 2, 1, 3) * cot)

    def ref(q, k, v):
        return jnp.sum(softmax_attention(q, k, v, allowed=allowed) * cot)

    for g, w in zip(jax.grad(ours, (0, 1, 2))(q, k, v), jax.grad(ref, (0, 1, 2))(q, k, v), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_head_major_in_cpu_head_groups_matches_the_reference(causal, monkeypatch):
    """A score budget of 2 heads' scores splits the 2 x 4 heads into 4 sequential groups (``lax.map``); values and
    gradients stay those of the reference, also for end-aligned causal attention with fewer queries than keys."""
    from vla_foundry_jax.layers import attention

    q, _, _ = _qkv(S=6, hd=8, seed=2)
    _, k, v = _qkv(S=10, hd=8, seed=3)
    monkeypatch.setattr(attention, "CPU_SCORE_BLOCK_BYTES", 2 * 6 * 10 * 4)
    assert attention._cpu_head_group(2 * 4, 6 * 10 * 4) == 2
    allowed = attention_mask(6, 10, causal=True) if causal else None
    cot = jnp.asarray(np.random.default_rng(4).standard_normal(q.shape), jnp.float32)

    def ours(q, k, v):
        out = head_major_attention(*(t.transpose(0, 2, 1, 3) for t in (q, k, v)), causal=causal, scale=8**-0.5)
        return out.transpose(0, 2, 1, 3)

    def ref(q, k, v):
        return softmax_attention(q, k, v, allowed=allowed)

    np.testing.assert_allclose(np.asarray(ours(q, k, v)), np.asarray(ref(q, k, v)), atol=2e-6)
    grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a) * cot), (0, 1, 2))(q, k, v) for f in (ours, ref)]
    for g, w in zip(*grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=1e-5)


def test_cpu_head_group_is_the_largest_divisor_within_the_budget(monkeypatch):
    from vla_foundry_jax.layers import attention

    monkeypatch.setattr(attention, "CPU_SCORE_BLOCK_BYTES", 5 << 20)
    assert attention._cpu_head_group(64, 256 * 256 * 4) == 16  # vit_tiny at batch 16: 4 MiB groups
    assert attention._cpu_head_group(16, 531 * 531 * 4) == 4  # the policy denoiser: 4.3 MiB groups
    assert attention._cpu_head_group(6, 2 << 20) == 2  # 3 would exceed the budget
    assert attention._cpu_head_group(4, 8 << 20) == 1  # one head over the budget still runs, alone
    assert attention._cpu_head_group(8, 1024) == 8  # everything fits: one call, no map


def test_splash_kernel_matches_reference_in_the_pallas_interpreter():
    q, k, v = _qkv(B=1, S=128, nh=2, nkv=1, hd=128, seed=3)
    got = splash_attention(q, k, v, causal=True, interpret=True)
    want = softmax_attention(q, k, v, allowed=attention_mask(128, 128, causal=True))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
