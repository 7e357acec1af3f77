"""Scaled dot-product attention with the original's masking rules (reference §2.3).

``attn_name`` -> implementation:
  * ``"torch_attn"`` / ``"auto"`` / ``"xla"``: ``jax.nn.dot_product_attention(implementation=None)`` (XLA today;
    JAX may pick a fused kernel in the future);
  * ``"cudnn"``: ``implementation="cudnn"`` (cuDNN flash attention; bf16/fp16 on GPU). Calls that need an explicit
    boolean mask (KV-cache decode, key padding), other dtypes (cuDNN rejects float32) and non-GPU backends fall
    back to the XLA implementation, so one config runs everywhere;
  * ``"reference"``: explicit ``softmax(q k^T / sqrt(hd)) v`` einsums in float32 (debugging / parity).

Masking (all combined by AND):
  * causal: query ``i`` of ``q_len`` sees keys ``0 .. q_offset + i``; ``q_offset`` defaults to
    ``k_len - q_len`` (queries aligned to the end of the keys, as the original's rectangular causal mask);
  * ``kv_length``: keys at positions ``>= kv_length`` are invalid (unused slots of a static KV cache);
  * ``mask [B, k_len]`` (1 = real token, 0 = padding) masks padded keys. As in the original, a query row whose
    every key is masked falls back to attending to all valid keys (no NaN).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vla_foundry_jax.params.model_params import ATTN_NAMES


def attention_mask(
    q_len: int,
    k_len: int,
    *,
    causal: bool,
    mask: jax.Array | None = None,
    q_offset: jax.Array | int | None = None,
    kv_length: jax.Array | int | None = None,
) -> jax.Array:
    """Boolean ``[B or 1, 1, q_len, k_len]`` mask (True = attend) implementing the rules of this module."""
    k_pos = jnp.arange(k_len)
    valid = jnp.ones((q_len, k_len), bool)
    if kv_length is not None:
        valid = valid & (k_pos[None, :] < kv_length)
    allowed = valid
    if causal:
        offset = k_len - q_len if q_offset is None else q_offset
        allowed = allowed & (k_pos[None, :] <= offset + jnp.arange(q_len)[:, None])
    allowed = allowed[None, None]  # [1, 1, q, k]
    if mask is not None:
        merged = allowed & mask.astype(bool)[:, None, None, :]  # [B, 1, q, k]
        # Rows with no visible key attend to every valid key (the original zeroes such rows of its additive mask).
        allowed = jnp.where(jnp.any(merged, axis=-1, keepdims=True), merged, valid[None, None])
    return allowed


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array | None) -> jax.Array:
    """``softmax(q k^T / sqrt(hd)) v`` in float32. q ``[B,q,nh,hd]``, k/v ``[B,k,nh,hd]`` -> ``[B,q,nh,hd]``."""
    scale = 1.0 / float(q.shape[-1]) ** 0.5
    scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    if allowed is not None:
        scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(jnp.float32)).astype(q.dtype)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    mask: jax.Array | None = None,
    impl: str = "xla",
    q_offset: jax.Array | int | None = None,
    kv_length: jax.Array | int | None = None,
) -> jax.Array:
    """Multi-head attention; scale ``1/sqrt(hd)``, no dropout.

    Args:
      q: ``[B, q_len, nh, hd]``; k, v: ``[B, k_len, nh, hd]`` (same dtype as q).
      causal: causal masking (end-aligned unless ``q_offset`` is given).
      mask: optional key padding mask ``[B, k_len]`` (nonzero / True = keep).
      impl: one of :data:`ATTN_NAMES`.
      q_offset: absolute position of query 0 (traced int allowed), for a static KV cache.
      kv_length: number of valid keys (traced int allowed); later keys are ignored.

    Returns:
      ``[B, q_len, nh, hd]`` in q's dtype.
    """
    if impl not in ATTN_NAMES:
        raise ValueError(f"attn_name = {impl!r} is not supported; choose one of {list(ATTN_NAMES)}.")
    q_len, k_len = q.shape[1], k.shape[1]
    explicit = mask is not None or q_offset is not None or kv_length is not None or (causal and q_len != k_len)
    if impl == "reference":
        allowed = (
            attention_mask(q_len, k_len, causal=causal, mask=mask, q_offset=q_offset, kv_length=kv_length)
            if explicit or causal
            else None
        )
        return reference_attention(q, k, v, allowed)
    if not explicit:
        use_cudnn = impl == "cudnn" and q.dtype in (jnp.bfloat16, jnp.float16) and jax.default_backend() == "gpu"
        implementation = "cudnn" if use_cudnn else None
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)
    allowed = attention_mask(q_len, k_len, causal=causal, mask=mask, q_offset=q_offset, kv_length=kv_length)
    return jax.nn.dot_product_attention(q, k, v, mask=allowed, implementation=None)


def empty_kv_cache(
    num_layers: int, batch_size: int, max_len: int, num_kv_heads: int, head_dim: int, dtype: jnp.dtype
) -> dict[str, jax.Array]:
    """A KV cache for stacked layers: ``k``/``v`` ``[L, B, T, n_kv, hd]``, key ``mask`` ``[B, T]`` and ``length``."""
    shape = (num_layers, batch_size, max_len, num_kv_heads, head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "mask": jnp.zeros((batch_size, max_len), bool),
        "length": jnp.zeros((), jnp.int32),
    }
