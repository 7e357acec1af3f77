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
from vla_foundry_jax.layers.attention import dot_product_attention, dropout, head_major_attention, softmax_attention
from vla_foundry_jax.layers.dense import Dense
from vla_foundry_jax.layers.feed_forward import MLP
from vla_foundry_jax.layers.norms import make_norm
from vla_foundry_jax.layers.pixel_shuffle import patchify
from vla_foundry_jax.layers.stack import check_remat_policy, scan_layers, stack_layers
from vla_foundry_jax.params.model_params import ViTParams
from vla_foundry_jax.registry import ModelRecord, register_model

INIT_STD = 0.02


def _gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def _dense(din: int, dout: int, names: tuple[str | None, str | None], **kw: Any) -> Dense:
    """The original's ``nn.Linear`` init here: kernel N(0, 0.02), bias 0; one 2-D matmul (fast backward on CPU)."""
    return Dense(din, dout, names=names, init="normal", std=INIT_STD, flatten=True, **kw)


class PatchEmbedding(nnx.Module):
    """``patches [b, n_p, p*p*3] -> [b, n_p (+1), H]``: linear patch projection, CLS token, position embedding."""

    def __init__(self, params: ViTParams, *, rngs: nnx.Rngs, dtype: jnp.dtype, param_dtype: jnp.dtype):
        H, p = params.hidden_dim, params.patch_size
        self.dtype = dtype
        self.num_patches = (params.img_size // p) ** 2
        self.conv = _dense(p * p * 3, H, ("patch", "embed"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
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
        self.qkv_proj = _dense(H, 3 * H, ("embed", "qkv"), **kw)
        self.out_proj = _dense(H, H, ("heads", "embed"), **kw)

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
        return dropout(y, self.rate, None if key is None else jax.random.fold_in(key, 1))

    def _head_major_attention(self, qkv: jax.Array, key: jax.Array | None) -> jax.Array:
        """``softmax(q k^T / sqrt(hd)) v`` on ``[3, b, nh, T, hd]`` (one transpose of the fused projection; much
        faster on CPU, forward and backward, than the ``[b, T, nh, hd]`` einsums); dropout on the probabilities
        (torch SDPA's ``dropout_p``) when ``key`` is given. ``qkv [b, T, 3H] -> [b, T, H]``."""
        b, T, _ = qkv.shape
        H = self.n_heads * self.head_dim
        if key is not None:
            q, k, v = (t.reshape(b, T, self.n_heads, self.head_dim) for t in jnp.split(qkv, 3, axis=-1))
            q = q * jnp.asarray(self.head_dim**-0.5, qkv.dtype)
            out = softmax_attention(
                q, k, v, scale=1.0, upcast=False, dropout_rate=self.rate, dropout_key=jax.random.fold_in(key, 0)
            )
            return out.reshape(b, T, H)
        qkv = qkv.reshape(b, T, 3, self.n_heads, self.head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * jnp.asarray(self.head_dim**-0.5, qkv.dtype), qkv[1], qkv[2]
        out = head_major_attention(q, k, v)  # [b, nh, T, hd]
        return out.transpose(0, 2, 1, 3).reshape(b, T, H)


class ViTBlock(nnx.Module):
    """Pre-norm block on ``[b, T, H]``: ``x += attn(ln1(x)); x += mlp(ln2(x))``."""

    def __init__(self, params: ViTParams, *, rngs: nnx.Rngs, dtype: jnp.dtype, param_dtype: jnp.dtype):
        H = params.hidden_dim
        kw = {"rngs": rngs, "dtype": dtype, "param_dtype": param_dtype}
        self.ln1 = make_norm("default_layer_norm", H, params.ln_eps, dtype=dtype, param_dtype=param_dtype)
        self.attn = ViTAttention(params, **kw)
        self.ln2 = make_norm("default_layer_norm", H, params.ln_eps, dtype=dtype, param_dtype=param_dtype)
        # fc1 (H -> F) -> tanh-GELU -> fc2 (F -> H), then dropout
        self.mlp = MLP(H, params.inter_dim, act=_gelu_tanh, init="normal", std=INIT_STD, flatten=True, **kw)
        self.rate = float(params.dropout)

    def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        x = x + self.attn(self.ln1(x), key)
        return x + dropout(self.mlp(self.ln2(x)), self.rate, None if key is None else jax.random.fold_in(key, 2))


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

        def make_block(block_rngs: nnx.Rngs) -> ViTBlock:
            return ViTBlock(params, rngs=block_rngs, **kw)

        self.blocks = stack_layers(make_block, params.n_layers, rngs)
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
        return patchify(images, self.params.patch_size)

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
        x = dropout(x, p.dropout, embed_key)

        def step(block: ViTBlock, x: jax.Array, key: jax.Array | None) -> jax.Array:
            return block(x, key)

        x = scan_layers(
            step, self.blocks, x, layer_keys, in_axes=(0 if active else None,), remat_policy=self.remat_policy
        )
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
