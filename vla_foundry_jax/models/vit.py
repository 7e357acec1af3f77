"""``vit``: the from-scratch Vision Transformer of the original (reference §3.4), stacked and scanned.

Images are **channels-last** here: ``[B, img, img, 3]`` or multi-camera ``[B, N, img, img, 3]`` (the original
takes channels-first ``[B, 3, h, w]`` / ``[B, N, 3, h, w]``). Forward:

1. patch embedding: the original's ``Conv2d(3, H, kernel=stride=patch, bias)`` computed as a reshape into
   non-overlapping patches flattened in (row, col, channel) order and one matmul, tokens row-major over the
   ``(img/patch)^2`` grid; optional CLS token prepended (``cls_flag``); learned position embedding added; dropout;
2. ``L`` pre-norm blocks: ``x += drop(out_proj(MHA(ln1(x))))``, ``x += drop(fc2(gelu_tanh(fc1(ln2(x)))))`` with a
   fused biased ``qkv_proj`` (q | k | v thirds), bidirectional attention (dropout on the attention probabilities);
3. final LayerNorm on every token -> ``[B, n_p, H]``, or on the CLS token only -> ``[B, H]`` (``cls_flag``).

Layout (the original's state-dict names are the same with ``weight`` for ``kernel``; kernels stored ``[in, out]``):

| parameter                                  | shape               | logical axes                 |
|--------------------------------------------|---------------------|------------------------------|
| ``patch_embedding.conv.kernel``            | ``[p*p*3, H]``      | ``("patch", "embed")``       |
| ``patch_embedding.conv.bias``              | ``[H]``             | ``("embed",)``               |
| ``patch_embedding.position_embedding``     | ``[n_p (+1), H]``   | ``("pos", "embed")``         |
| ``patch_embedding.cls_token`` (cls_flag)   | ``[H]``             | ``("embed",)``               |
| ``blocks.ln1/ln2.weight/bias``             | ``[L, H]``          | ``("layers", "norm")``       |
| ``blocks.attn.qkv_proj.kernel/bias``       | ``[L, H, 3H]/[L, 3H]`` | ``("layers", "embed", "qkv")`` |
| ``blocks.attn.out_proj.kernel/bias``       | ``[L, H, H]/[L, H]``  | ``("layers", "heads", "embed")`` |
| ``blocks.mlp.fc1.kernel/bias``             | ``[L, H, F]/[L, F]``  | ``("layers", "embed", "mlp")`` |
| ``blocks.mlp.fc2.kernel/bias``             | ``[L, F, H]/[L, H]``  | ``("layers", "mlp", "embed")`` |
| ``layer_norm.weight/bias``                 | ``[H]``             | ``("norm",)``                |

Init as the original: every kernel N(0, 0.02), biases 0, LayerNorms 1 / 0, position embedding U[0, 1), CLS zeros.

Attention: on CPU, and whenever dropout is active, an explicit head-major ``softmax(q k^T / sqrt(hd)) v`` (one
transpose of the fused qkv output, and without dropout a hand-written backward, :func:`head_major_attention`; ~4x
faster forward + backward on XLA:CPU than ``jax.nn.dot_product_attention``'s ``[B, T, nh, hd]`` einsums);
elsewhere ``layers.attention.dot_product_attention(impl="cudnn")``: cuDNN flash attention for bf16/fp16 on GPU,
XLA otherwise. Dense layers flatten to 2-D matmuls for the same reason.

Dropout (``vit.dropout``) follows flax NNX conventions: the module starts in eval mode (``deterministic=True``);
``model.train()`` / ``model.eval()`` flip it and ``__call__(..., deterministic=...)`` overrides it per call. The
random keys come from the call's ``rngs`` (an ``nnx.Rngs``, whose ``dropout`` stream is used, or a PRNG key), so
the module holds no RNG state. Difference from the original: with ``cls_flag`` a 5-D input returns
``[B, N, H]`` (the original's rearrange fails there).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vla_foundry_jax.convert.vit_weights import load_vit_weights
from vla_foundry_jax.layers.attention import dot_product_attention
from vla_foundry_jax.layers.norms import make_norm
from vla_foundry_jax.models.transformer import LAYERS_AXIS, check_remat_policy
from vla_foundry_jax.params.model_params import ViTParams
from vla_foundry_jax.registry import ModelRecord, register_model

INIT_STD = 0.02


@jax.custom_vjp
def head_major_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """``softmax(q k^T) v`` for ``q, k, v [b, nh, T, hd]`` (q pre-scaled) -> ``[b, nh, T, hd]``; scores in float32.

    The hand-written backward uses ``rowsum(P * dP) = rowsum(dO * O)`` (as flash attention does), which saves a
    pass over the ``[T, T]`` probabilities; together ~1.5x faster than autodiff on XLA:CPU.
    """
    return _attention_fwd(q, k, v)[0]


def _attention_fwd(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    scores = jnp.matmul(q, k.swapaxes(-1, -2), preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.matmul(probs, v)
    return out, (q, k, v, probs, out)


def _attention_bwd(res: tuple[jax.Array, ...], d_out: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    q, k, v, probs, out = res
    f32 = jnp.float32
    d_v = jnp.einsum("bhqk,bhqd->bhkd", probs, d_out)
    d_probs = jnp.matmul(d_out, v.swapaxes(-1, -2), preferred_element_type=f32)
    delta = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1, keepdims=True)
    d_scores = (probs.astype(f32) * (d_probs - delta)).astype(q.dtype)
    d_q = jnp.matmul(d_scores, k)
    d_k = jnp.einsum("bhqk,bhqd->bhkd", d_scores, q)
    return d_q, d_k, d_v


head_major_attention.defvjp(_attention_fwd, _attention_bwd)


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout (torch semantics: keep with prob ``1 - rate``, scale by ``1 / (1 - rate)``)."""
    if key is None or rate == 0.0:
        return x
    if rate >= 1.0:
        return jnp.zeros_like(x)
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype)).astype(x.dtype)


class Dense(nnx.Module):
    """Biased linear ``x [..., in] -> [..., out]``; kernel ``[in, out]`` ~ N(0, 0.02), bias 0."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        names: tuple[str | None, str | None],
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        self.dtype = dtype
        kernel = jax.random.normal(rngs.params(), (in_features, out_features), jnp.float32) * INIT_STD
        self.kernel = nnx.Param(kernel.astype(param_dtype), out_sharding=names)
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype), out_sharding=(names[1],))

    def __call__(self, x: jax.Array) -> jax.Array:
        # A 2-D matmul: XLA:CPU's backward of a dot with two contracting axes pays a large transpose.
        kernel = self.kernel[...].astype(self.dtype)
        y = jnp.dot(x.reshape(-1, x.shape[-1]).astype(self.dtype), kernel) + self.bias[...].astype(self.dtype)
        return y.reshape(*x.shape[:-1], kernel.shape[-1])


class PatchEmbedding(nnx.Module):
    """``patches [b, n_p, p*p*3] -> [b, n_p (+1), H]``: linear patch projection, CLS token, position embedding."""

    def __init__(self, params: ViTParams, *, rngs: nnx.Rngs, dtype: jnp.dtype, param_dtype: jnp.dtype):
        H, p = params.hidden_dim, params.patch_size
        self.dtype = dtype
        self.num_patches = (params.img_size // p) ** 2
        self.conv = Dense(p * p * 3, H, names=("patch", "embed"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        n_pos = self.num_patches + (1 if params.cls_flag else 0)
        pos = jax.random.uniform(rngs.params(), (n_pos, H), jnp.float32)  # torch.rand: U[0, 1)
        self.position_embedding = nnx.Param(pos.astype(param_dtype), out_sharding=("pos", "embed"))
        self.cls_token = nnx.Param(jnp.zeros((H,), param_dtype), out_sharding=("embed",)) if params.cls_flag else None

    def __call__(self, patches: jax.Array) -> jax.Array:
        x = self.conv(patches)
        if self.cls_token is not None:
            cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (x.shape[0], 1, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)
        return x + self.position_embedding[...].astype(self.dtype)


class ViTAttention(nnx.Module):
    """Bidirectional fused-qkv multi-head attention ``[b, T, H] -> [b, T, H]`` with biases."""

    def __init__(self, params: ViTParams, *, rngs: nnx.Rngs, dtype: jnp.dtype, param_dtype: jnp.dtype):
        H = params.hidden_dim
        self.n_heads = params.n_heads
        self.head_dim = H // params.n_heads
        self.rate = float(params.dropout)
        kw = {"rngs": rngs, "dtype": dtype, "param_dtype": param_dtype}
        self.qkv_proj = Dense(H, 3 * H, names=("embed", "qkv"), **kw)
        self.out_proj = Dense(H, H, names=("heads", "embed"), **kw)

    def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        b, T, H = x.shape
        qkv = self.qkv_proj(x)
        dropping = key is not None and self.rate > 0.0
        if dropping or jax.default_backend() == "cpu":
            out = self._head_major_attention(qkv, key if dropping else None)
        else:  # fused kernels (cuDNN flash on GPU) where they exist
            q, k, v = (t.reshape(b, T, self.n_heads, self.head_dim) for t in jnp.split(qkv, 3, axis=-1))
            out = dot_product_attention(q, k, v, causal=False, impl="cudnn").reshape(b, T, H)
        y = self.out_proj(out)
        return _dropout(y, self.rate, None if key is None else jax.random.fold_in(key, 1))

    def _head_major_attention(self, qkv: jax.Array, key: jax.Array | None) -> jax.Array:
        """``softmax(q k^T / sqrt(hd)) v`` on ``[3, b, nh, T, hd]`` (one transpose of the fused projection; much
        faster on CPU, forward and backward, than the ``[b, T, nh, hd]`` einsums); dropout on the probabilities
        (torch SDPA's ``dropout_p``) when ``key`` is given. ``qkv [b, T, 3H] -> [b, T, H]``."""
        b, T, _ = qkv.shape
        qkv = qkv.reshape(b, T, 3, self.n_heads, self.head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * jnp.asarray(self.head_dim**-0.5, qkv.dtype), qkv[1], qkv[2]
        if key is None:
            out = head_major_attention(q, k, v)  # [b, nh, T, hd]
        else:
            scores = jnp.matmul(q, k.swapaxes(-1, -2), preferred_element_type=jnp.float32)
            probs = _dropout(jax.nn.softmax(scores, axis=-1), self.rate, jax.random.fold_in(key, 0))
            out = jnp.matmul(probs.astype(v.dtype), v)
        return out.transpose(0, 2, 1, 3).reshape(b, T, self.n_heads * self.head_dim)


class ViTMLP(nnx.Module):
    """``fc1 (H -> F) -> tanh-GELU -> fc2 (F -> H) -> dropout`` on ``[..., H]``."""

    def __init__(self, params: ViTParams, *, rngs: nnx.Rngs, dtype: jnp.dtype, param_dtype: jnp.dtype):
        kw = {"rngs": rngs, "dtype": dtype, "param_dtype": param_dtype}
        self.rate = float(params.dropout)
        self.fc1 = Dense(params.hidden_dim, params.inter_dim, names=("embed", "mlp"), **kw)
        self.fc2 = Dense(params.inter_dim, params.hidden_dim, names=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        y = self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))
        return _dropout(y, self.rate, None if key is None else jax.random.fold_in(key, 2))


class ViTBlock(nnx.Module):
    """Pre-norm block on ``[b, T, H]``: ``x += attn(ln1(x)); x += mlp(ln2(x))``."""

    def __init__(self, params: ViTParams, *, rngs: nnx.Rngs, dtype: jnp.dtype, param_dtype: jnp.dtype):
        H = params.hidden_dim
        kw = {"rngs": rngs, "dtype": dtype, "param_dtype": param_dtype}
        self.ln1 = make_norm("default_layer_norm", H, params.ln_eps, dtype=dtype, param_dtype=param_dtype)
        self.attn = ViTAttention(params, **kw)
        self.ln2 = make_norm("default_layer_norm", H, params.ln_eps, dtype=dtype, param_dtype=param_dtype)
        self.mlp = ViTMLP(params, **kw)

    def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        x = x + self.attn(self.ln1(x), key)
        return x + self.mlp(self.ln2(x), key)


def _dropout_key(rngs: nnx.Rngs | jax.Array | None) -> jax.Array:
    if rngs is None:
        raise ValueError(
            "ViT dropout is active (vit.dropout > 0 and deterministic=False) but no random key was given: call "
            "the model with rngs=nnx.Rngs(dropout=seed) or rngs=<PRNG key>, or pass deterministic=True / use "
            "model.eval()."
        )
    if isinstance(rngs, nnx.Rngs):
        return rngs.dropout()
    return rngs


class ViT(nnx.Module):
    """Vision Transformer (``type = "vit"``; ``vit_backbone`` is its subclass in ``models/backbones.py``).

    Args:
      params: the model's :class:`ViTParams`.
      rngs: parameter initialisation keys (``rngs.params()``).
      dtype: compute dtype (activations, matmuls); parameters are cast to it at use; LayerNorm statistics are
        float32.
      param_dtype: storage dtype of the parameters.
      remat_policy: None (no remat) or a name in :data:`REMAT_POLICIES` applied to every block.
    """

    def __init__(
        self,
        params: ViTParams,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        remat_policy: str | None = None,
    ):
        check_remat_policy(remat_policy)
        where = params.gin_name
        if not 0.0 <= params.dropout <= 1.0:
            raise ValueError(f"{where}.dropout = {params.dropout} must lie in [0, 1].")
        if params.hidden_dim % params.n_heads or params.img_size % params.patch_size:
            raise ValueError(
                f"{where}: n_heads ({params.n_heads}) must divide hidden_dim ({params.hidden_dim}) and patch_size "
                f"({params.patch_size}) must divide img_size ({params.img_size})."
            )
        self.params = params
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.remat_policy = remat_policy
        self.deterministic = True  # eval mode by default; model.train() sets False
        kw = {"dtype": dtype, "param_dtype": param_dtype}
        self.patch_embedding = PatchEmbedding(params, rngs=rngs, **kw)

        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS})
        def make_blocks(key: jax.Array) -> ViTBlock:
            return ViTBlock(params, rngs=nnx.Rngs(params=key), **kw)

        self.blocks = make_blocks(jax.random.split(rngs.params(), params.n_layers))
        self.layer_norm = make_norm("default_layer_norm", params.hidden_dim, params.ln_eps, **kw)

    @property
    def hidden_dim(self) -> int:
        return self.params.hidden_dim

    @property
    def num_hidden_layers(self) -> int:
        return self.params.n_layers

    @property
    def num_patches(self) -> int:
        """Tokens per image before any CLS token: ``(img_size // patch_size) ** 2``."""
        return (self.params.img_size // self.params.patch_size) ** 2

    def _check_images(self, images: jax.Array) -> None:
        p = self.params
        where = p.gin_name
        shape = tuple(images.shape)
        if images.ndim not in (4, 5):
            raise ValueError(
                f"{where} expects channels-last images [B, {p.img_size}, {p.img_size}, 3] or "
                f"[B, N, {p.img_size}, {p.img_size}, 3], got shape {shape}."
            )
        if shape[-1] != 3:
            hint = " (this looks channels-first; transpose to channels-last)" if shape[-3] == 3 else ""
            raise ValueError(f"{where} expects 3 channels in the last axis, got shape {shape}{hint}.")
        if shape[-3:-1] != (p.img_size, p.img_size):
            raise ValueError(
                f"{where}.img_size = {p.img_size} but the images are {shape[-3]}x{shape[-2]} (shape {shape}); "
                f"resize the images or set {where}.img_size."
            )

    def patchify(self, images: jax.Array) -> jax.Array:
        """``[b, img, img, 3] -> [b, n_p, p*p*3]``: non-overlapping patches, row-major, (row, col, channel) inside."""
        b, h, w, c = images.shape
        p = self.params.patch_size
        x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def __call__(
        self,
        images: jax.Array,
        *,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | jax.Array | None = None,
    ) -> jax.Array:
        """Encode images.

        Args:
          images: channels-last ``[B, img, img, 3]`` or ``[B, N, img, img, 3]`` (any float dtype; cast to the
            compute dtype).
          deterministic: disable dropout; None uses ``self.deterministic`` (True unless ``model.train()``).
          rngs: dropout randomness when dropout is active: an ``nnx.Rngs`` (its ``dropout`` stream, else
            ``default``) or a PRNG key.

        Returns:
          ``[B, n_p, H]`` (``[B, N, n_p, H]`` for 5-D input), or the CLS token ``[B, H]`` (``[B, N, H]``) when
          ``cls_flag``; in the compute dtype.
        """
        p = self.params
        self._check_images(images)
        lead = images.shape[:-3]
        x = images.reshape(-1, *images.shape[-3:]).astype(self.dtype)
        deterministic = self.deterministic if deterministic is None else deterministic
        active = (not deterministic) and p.dropout > 0.0
        if active:
            embed_key, layers_key = jax.random.split(_dropout_key(rngs))
            layer_keys = jax.random.split(layers_key, p.n_layers)
        else:
            embed_key = layer_keys = None

        x = self.patch_embedding(self.patchify(x))
        x = _dropout(x, p.dropout, embed_key)

        def apply_block(block: ViTBlock, x: jax.Array, key: jax.Array | None) -> jax.Array:
            return block(x, key)

        if self.remat_policy is not None:
            apply_block = nnx.remat(apply_block, policy=getattr(jax.checkpoint_policies, self.remat_policy))

        @nnx.scan(
            in_axes=(0, nnx.Carry, 0 if active else None),
            out_axes=nnx.Carry,
            transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS},
        )
        def run_blocks(block: ViTBlock, x: jax.Array, key: Any) -> jax.Array:
            return apply_block(block, x, key)

        x = run_blocks(self.blocks, x, layer_keys)
        x = self.layer_norm(x[:, 0] if p.cls_flag else x)
        return x.reshape(*lead, *x.shape[1:])


def _build(
    params: ViTParams,
    *,
    rngs: nnx.Rngs,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    remat_policy: str | None = None,
) -> ViT:
    return ViT(params, rngs=rngs, dtype=dtype, param_dtype=param_dtype, remat_policy=remat_policy)


def build_vit(params: ViTParams, *, rngs: nnx.Rngs, **kwargs: Any) -> ViT:
    """Registry builder for ``type = "vit"``."""
    return _build(params, rngs=rngs, **kwargs)


register_model(ModelRecord(params=ViTParams, builder=build_vit, weight_loader=load_vit_weights))
