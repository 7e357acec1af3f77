"""Softmax attention: the kernels every model uses, and the backend choice (reference §2.3).

Kernels (``q [B, Sq, nh, hd]``, ``k, v [B, Sk, nkv, hd]`` unless said otherwise):

* :func:`softmax_attention`: explicit ``softmax(scale q k^T) v`` einsums with grouped-query heads (``nkv``
  divides ``nh``), a boolean mask and / or an additive bias, optional ``tanh`` soft-capping of the scores and
  dropout on the probabilities; scores and softmax always in float32. ``upcast=True`` also runs the matmuls on
  float32 inputs (the HF decoders', and ``attn_name = "reference"``); ``upcast=False`` multiplies the inputs in
  their own dtype with float32 scores and casts the probabilities back to ``v``'s dtype (the encoders and UNets).
* :func:`segment_attention`: bidirectional attention inside segments of one packed sequence (variable-size
  images in a static-length patch sequence), dense or banded by blocks.
* :func:`head_major_attention`: ``softmax(scale q k^T) v`` on head-major ``[b, nh, T, hd]`` (optionally causal) with
  a hand-written backward: the fast path on XLA:CPU (encoders directly, decoders through the choice below).
* :func:`dot_product_attention`: the backend choice for the ``attn_name`` of a model, below.

``attn_name`` -> implementation (:func:`choose_kernel`; each new choice is logged once):
  * ``"torch_attn"`` / ``"auto"`` (the original's names): the fastest eligible kernel of the backend —
    cuDNN flash attention (``jax.nn.dot_product_attention(implementation="cudnn")``) on GPU for bf16/fp16 inputs
    with ``hd <= 128`` and a multiple of 8; Pallas splash attention on TPU for sequence lengths that are multiples
    of 128 and ``hd`` a multiple of 128; :func:`head_major_attention` on CPU; else XLA. Calls that need an
    explicit boolean mask (KV-cache decode, key padding) always take XLA, so one config runs everywhere;
  * ``"cudnn"``: as ``"auto"`` but never splash;
  * ``"xla"``: always ``jax.nn.dot_product_attention(implementation="xla")``;
  * ``"reference"``: :func:`softmax_attention` in float32 (debugging / parity).

Masking (all combined by AND):
  * causal: query ``i`` of ``q_len`` sees keys ``0 .. q_offset + i``; ``q_offset`` defaults to
    ``k_len - q_len`` (queries aligned to the end of the keys, as the original's rectangular causal mask);
  * ``kv_length``: keys at positions ``>= kv_length`` are invalid (unused slots of a static KV cache);
  * ``mask [B, k_len]`` (1 = real token, 0 = padding) masks padded keys. As in the original, a query row whose
    every key is masked falls back to attending to all valid keys (no NaN).
"""

from __future__ import annotations

import functools
import logging

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


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout (torch semantics: keep with prob ``1 - rate``, scale by ``1 / (1 - rate)``); identity
    without a key or at rate 0."""
    if key is None or rate == 0.0:
        return x
    if rate >= 1.0:
        return jnp.zeros_like(x)
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype)).astype(x.dtype)


def softmax_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    allowed: jax.Array | None = None,
    bias: jax.Array | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    upcast: bool = True,
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
) -> jax.Array:
    """``softmax(scale q k^T) v`` with grouped-query heads.

    Args:
      q: ``[B, Sq, nh, hd]``; k, v: ``[B, Sk, nkv, hd]`` with ``nkv`` dividing ``nh`` (query head ``h`` reads
        key/value head ``h // (nh / nkv)``).
      allowed: boolean, broadcastable to ``[B, 1, Sq, Sk]`` (True = attend). Masked scores become the float32
        minimum, so a query whose keys are all masked attends uniformly instead of producing NaN.
      bias: additive float32 scores bias, broadcastable to ``[B, 1, Sq, Sk]`` (e.g. HF's min-value masks: those
        also let a fully masked row attend uniformly, and pass score gradients through as HF's do).
      scale: score scale (default ``hd**-0.5``; 1 for a pre-scaled ``q``).
      softcap: ``scores = softcap * tanh(scores / softcap)`` (after scaling, before masking) when set.
      upcast: float32 matmul inputs (True) or the inputs' own dtype with float32 scores and probabilities cast to
        ``v``'s dtype (False).
      dropout_rate, dropout_key: :func:`dropout` on the probabilities.

    Returns:
      ``[B, Sq, nh, hd]`` in ``q``'s dtype.
    """
    B, Sq, nh, hd = q.shape
    nkv = k.shape[2]
    out_dtype = q.dtype
    f32 = jnp.float32
    if upcast:
        q, k, v = q.astype(f32), k.astype(f32), v.astype(f32)
    qg = q.reshape(B, Sq, nkv, nh // nkv, hd)
    scores = jnp.einsum("bsngd,btnd->bngst", qg, k, preferred_element_type=f32)
    scale = hd**-0.5 if scale is None else scale
    if scale != 1.0:
        scores = scores * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias[:, :, None]
    if allowed is not None:
        scores = jnp.where(allowed[:, :, None], scores, jnp.finfo(f32).min)
    probs = dropout(jax.nn.softmax(scores, axis=-1), dropout_rate, dropout_key).astype(v.dtype)
    out = jnp.einsum("bngst,btnd->bsngd", probs, v)
    return out.reshape(B, Sq, nh, hd).astype(out_dtype)


def head_major_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False, scale: float = 1.0
) -> jax.Array:
    """``softmax(scale q k^T) v`` for ``q [b, nh, Sq, hd]``, ``k, v [b, nh, Sk, hd]`` -> ``[b, nh, Sq, hd]``; scores
    (scaled in float32) and softmax in float32, probabilities in ``v``'s dtype; ``causal``: end-aligned causal mask
    (query ``i`` sees keys ``0 .. Sk - Sq + i``).

    The hand-written backward uses ``rowsum(P * dP) = rowsum(dO * O)`` (as flash attention does), which saves a
    pass over the ``[Sq, Sk]`` probabilities, and rebuilds the causal mask and the probabilities (from the saved row
    log-sum-exp) instead of saving them, so scanned layers stack no ``[b, nh, Sq, Sk]`` residual (XLA:CPU zero-fills
    and copies every stacked residual each step); ~1.5x faster than autodiff on XLA:CPU, and the head-major layout
    keeps XLA:CPU's batched dots free of transposes.

    On CPU the ``b * nh`` heads go through in groups (``jax.lax.map``) whose float32 scores stay within
    :data:`CPU_SCORE_BLOCK_BYTES`, so each group's score passes run in cache instead of streaming the whole
    ``[b, nh, Sq, Sk]`` block through memory (forward + backward: ``[16, 4, 256, 16]`` 10.3 -> 8.5 ms, ``[8, 2, 531,
    32]`` 14.3 -> 11.5 ms, 2 threads).
    """
    b, nh, sq = q.shape[:3]
    group = _cpu_head_group(b * nh, sq * k.shape[2] * 4) if jax.default_backend() == "cpu" else b * nh
    if group == b * nh:
        return _head_major(q, k, v, causal, float(scale))
    parts = tuple(t.reshape(b * nh // group, 1, group, *t.shape[2:]) for t in (q, k, v))
    out = jax.lax.map(lambda qkv: _head_major(*qkv, causal, float(scale)), parts)
    return out.reshape(b, nh, sq, v.shape[-1])


# Bytes of float32 scores per head group on CPU (:func:`head_major_attention`): measured best at 2-4.5 MB on a
# 2-core EPYC (1 MB L2 per core, 32 MB L3); twice that was slower.
CPU_SCORE_BLOCK_BYTES = 5 << 20


def _cpu_head_group(heads: int, score_bytes_per_head: int) -> int:
    """The largest divisor of ``heads`` whose scores fit :data:`CPU_SCORE_BLOCK_BYTES` (at least 1)."""
    fits = [c for c in range(1, heads + 1) if heads % c == 0 and c * score_bytes_per_head <= CPU_SCORE_BLOCK_BYTES]
    return max(fits, default=1)


def _causal_scores(scores: jax.Array) -> jax.Array:
    sq, sk = scores.shape[-2:]
    visible = jnp.arange(sk)[None, :] <= (sk - sq) + jnp.arange(sq)[:, None]
    return jnp.where(visible, scores, jnp.finfo(scores.dtype).min)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _head_major(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool, scale: float) -> jax.Array:
    return _head_major_fwd(q, k, v, causal, scale)[0]


def _head_major_fwd(
    q: jax.Array, k: jax.Array, v: jax.Array, causal: bool, scale: float
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    scores = _head_major_scores(q, k, causal, scale)
    row_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    unnormalised = jnp.exp(scores - row_max)
    row_sum = jnp.sum(unnormalised, axis=-1, keepdims=True)
    probs = (unnormalised / row_sum).astype(v.dtype)  # as jax.nn.softmax
    lse = row_max + jnp.log(row_sum)
    out = jnp.matmul(probs, v)
    return out, (q, k, v, out, lse)


def _head_major_scores(q: jax.Array, k: jax.Array, causal: bool, scale: float) -> jax.Array:
    scores = jnp.matmul(q, k.swapaxes(-1, -2), preferred_element_type=jnp.float32)
    if scale != 1.0:
        scores = scores * scale
    return _causal_scores(scores) if causal else scores


def _head_major_bwd(
    causal: bool, scale: float, res: tuple[jax.Array, ...], d_out: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    q, k, v, out, lse = res
    f32 = jnp.float32
    # the [Sq, Sk] probabilities are rebuilt from the saved row log-sum-exp instead of being saved (scanned layers
    # would otherwise stack one [b, nh, Sq, Sk] residual per layer); masked ones are exactly 0, so are their grads
    probs = jnp.exp(_head_major_scores(q, k, causal, scale) - lse)
    # dV and dK contract over queries. XLA:CPU runs that batched dot 6x slower when the [Sq, Sk] operand is the
    # transposed one, so both are computed transposed ([b, nh, hd, Sk]) and swapped back; the barrier keeps XLA
    # from folding the swap into the dot again (7.9 -> 5.4 ms fwd + bwd at [8, 4, 256, 16], 2 threads)
    d_v = jax.lax.optimization_barrier(jnp.einsum("bhqd,bhqk->bhdk", d_out, probs.astype(v.dtype))).swapaxes(-1, -2)
    d_probs = jnp.matmul(d_out, v.swapaxes(-1, -2), preferred_element_type=f32)
    delta = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1, keepdims=True)
    d_scores = probs * (d_probs - delta)
    d_scores = (d_scores * scale if scale != 1.0 else d_scores).astype(q.dtype)
    d_q = jnp.matmul(d_scores, k)
    d_k = jax.lax.optimization_barrier(jnp.einsum("bhqd,bhqk->bhdk", q, d_scores)).swapaxes(-1, -2)
    return d_q, d_k, d_v


_head_major.defvjp(_head_major_fwd, _head_major_bwd)


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
    """Multi-head attention through the backend ``impl`` (module docstring); scale ``1/sqrt(hd)``, no dropout.

    Args:
      q: ``[B, q_len, nh, hd]``; k, v: ``[B, k_len, nkv, hd]`` (same dtype as q; ``nkv`` divides ``nh``).
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
        return softmax_attention(q, k, v, allowed=allowed)
    kernel = choose_kernel(impl, q, k, causal=causal, explicit=explicit)
    if kernel == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
    if kernel == "splash":
        return splash_attention(q, k, v, causal=causal)
    if kernel == "head_major":
        rep = q.shape[2] // k.shape[2]
        if rep > 1:
            k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
        out = head_major_attention(
            *(t.transpose(0, 2, 1, 3) for t in (q, k, v)), causal=causal, scale=q.shape[-1] ** -0.5
        )
        return out.transpose(0, 2, 1, 3)
    allowed = (
        attention_mask(q_len, k_len, causal=causal, mask=mask, q_offset=q_offset, kv_length=kv_length)
        if explicit
        else None
    )
    return jax.nn.dot_product_attention(q, k, v, mask=allowed, is_causal=causal and not explicit, implementation="xla")


def choose_kernel(
    impl: str, q: jax.Array, k: jax.Array, *, causal: bool, explicit: bool = False, backend: str | None = None
) -> str:
    """``"cudnn"``, ``"splash"``, ``"head_major"`` or ``"xla"``: the kernel :func:`dot_product_attention` runs
    for ``impl`` on ``backend`` (default: JAX's) with these ``q [B, Sq, nh, hd]`` / ``k`` (module docstring);
    logged once per distinct choice. ``explicit``: the call needs a boolean mask (padding, cache, rectangular
    causal)."""
    backend = backend or jax.default_backend()
    hd, q_len, k_len = q.shape[-1], q.shape[1], k.shape[1]
    kernel = "xla"
    if impl in ("torch_attn", "auto", "cudnn") and not explicit:
        half = q.dtype in (jnp.bfloat16, jnp.float16) and k.dtype == q.dtype
        if backend == "gpu" and half and hd <= 128 and hd % 8 == 0:
            kernel = "cudnn"
        elif backend == "tpu" and impl != "cudnn" and q_len % 128 == 0 and k_len % 128 == 0 and hd % 128 == 0:
            kernel = "splash"
        elif backend == "cpu":
            kernel = "head_major"
    _log_choice(impl, backend, kernel, str(q.dtype), hd, causal)
    return kernel


@functools.cache
def _log_choice(impl: str, backend: str, kernel: str, dtype: str, hd: int, causal: bool) -> None:
    logging.getLogger(__name__).info(
        "attention %r on %s (%s, head_dim %d, causal %s): %s kernel", impl, backend, dtype, hd, causal, kernel
    )


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, interpret: bool = False) -> jax.Array:
    """Pallas splash attention (TPU) on ``q [B, S, nh, hd]``, ``k, v [B, S, nkv, hd]``, scale ``1/sqrt(hd)``;
    ``interpret`` runs the kernel in the Pallas interpreter (any backend, slow: tests)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    _, S, nh, hd = q.shape
    rep = nh // k.shape[2]
    if rep > 1:  # grouped-query heads: one key/value head per query head
        k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    head_mask = sm.CausalMask((S, k.shape[1])) if causal else sm.FullMask((S, k.shape[1]))
    kernel = sk.make_splash_mha(sm.MultiHeadMask([head_mask] * nh), head_shards=1, q_seq_shards=1, interpret=interpret)
    q = q * jnp.asarray(hd**-0.5, q.dtype)
    out = jax.vmap(kernel)(*(t.transpose(0, 2, 1, 3) for t in (q, k, v)))
    return out.transpose(0, 2, 1, 3).astype(q.dtype)


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


def segment_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, *, chunk: int | None = None, aligned: bool = False
) -> jax.Array:
    """Bidirectional attention within segments of one flat (packed) sequence: ``q, k, v [N, nh, hd]``, query ``i``
    sees key ``j`` iff ``segments[:, i] == segments[:, j]`` on every row of ``segments [R, N]`` (e.g. image and
    window ids: variable-length images packed in one static-length sequence, the masks standing for HF's
    ``cu_seqlens``). Scale ``hd**-0.5``, float32 scores (:func:`softmax_attention`).

    ``chunk``: when every segment lies inside ``chunk`` consecutive positions, each block of ``chunk`` queries only
    looks at the keys of its own and the two neighbouring blocks (a segment of at most ``chunk`` positions spans at
    most two blocks), so the cost is ``3 * chunk * N`` instead of ``N^2``; None: one dense ``N x N`` mask.
    ``aligned``: every segment also starts at a multiple of ``chunk`` (e.g. images of one size), so each block only
    looks at its own keys (cost ``chunk * N``).
    """
    N = q.shape[0]
    if chunk is None or chunk * 3 >= N:
        allowed = jnp.all(segments[:, :, None] == segments[:, None, :], axis=0)
        return softmax_attention(q[None], k[None], v[None], allowed=allowed[None, None], upcast=False)[0]
    n_blocks = -(-N // chunk)
    pad = n_blocks * chunk - N

    def blocks(x: jax.Array, fill: int = 0) -> jax.Array:  # [N, ...] -> [n_blocks, chunk, ...]
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
        return x.reshape(n_blocks, chunk, *x.shape[1:])

    def neighbours(x: jax.Array, fill: int = 0) -> jax.Array:  # [n_blocks, chunk, ...] -> [n_blocks, 3 chunk, ...]
        padded = jnp.pad(x, [(1, 1)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
        return jnp.concatenate([padded[:-2], padded[1:-1], padded[2:]], axis=1)

    seg_q = blocks(segments.T, -1)  # [nb, C, R]; padded queries / keys never match a real segment (-1 vs -2)
    if aligned:
        allowed = jnp.all(seg_q[:, :, None, :] == seg_q[:, None, :, :], axis=-1)  # [nb, C, C]
        out = softmax_attention(blocks(q), blocks(k), blocks(v), allowed=allowed[:, None], upcast=False)
        return out.reshape(n_blocks * chunk, *q.shape[1:])[:N]
    seg_k = neighbours(seg_q, -2)
    allowed = jnp.all(seg_q[:, :, None, :] == seg_k[:, None, :, :], axis=-1)  # [nb, C, 3C]
    out = softmax_attention(
        blocks(q), neighbours(blocks(k)), neighbours(blocks(v)), allowed=allowed[:, None], upcast=False
    )
    return out.reshape(n_blocks * chunk, *q.shape[1:])[:N]
