"""``vit_hf``: Hugging Face SigLIP and CLIP vision towers in Flax NNX, stacked and scanned.

The original builds ``vit_hf`` with ``timm`` and returns the first element of ``forward_intermediates`` (reference
§3.4): the final *normed* token sequence. Here the tower is built from an HF config (``hf_pretrained``'s
``config.json``) whose ``model_type`` is one of ``configs.hf_vision.SUPPORTED_MODEL_TYPES`` (``siglip`` / ``clip``
take their ``vision_config``); the ``vit_hf`` weight loader (:mod:`vla_foundry_jax.convert.hf_vision_maps`) then
fills it from the checkpoint's safetensors. A **timm**-format checkpoint (the original's own: ``config.json`` with
``architecture``, timm tensor names) builds the same tower with its layout read from the checkpoint (class and
register tokens, position embedding with or without them, ``norm_pre``, final norm or none, qkv bias): see
:func:`~vla_foundry_jax.configs.hf_vision.timm_vision_config`; its output equals timm's
``forward_intermediates(x)[0]``.

Images are **channels-last**: ``[B, img, img, 3]`` or multi-camera ``[B, N, img, img, 3]`` (HF takes
``[B, 3, h, w]``); pixel normalisation is the processor's job. Forward:

1. patch embedding (HF's ``Conv2d(3, D, kernel=stride=patch)``; SigLIP with bias, CLIP without) computed as a
   reshape into non-overlapping patches flattened in (row, col, channel) order and one matmul, tokens row-major;
   CLIP prepends ``class_embedding``; learned position embedding added;
2. CLIP only: ``pre_layrnorm`` (HF's spelling);
3. ``L`` pre-norm encoder layers ``x += out_proj(MHA(layer_norm1(x)))``, ``x += fc2(act(fc1(layer_norm2(x))))``
   with separate biased q / k / v projections, bidirectional attention; ``act`` is the config's ``hidden_act``
   (SigLIP ``gelu_pytorch_tanh``, CLIP ``quick_gelu``);
4. ``post_layernorm`` on **every** token.

Returned tensor: ``post_layernorm(encoder output)`` ``[B, T, D]`` (``[B, N, T, D]`` for 5-D input), ``T = n_p``
(SigLIP) or ``1 + n_p`` (CLIP, the class token first). HF equivalents: SigLIP's ``last_hidden_state`` (HF applies
``post_layernorm`` to the whole sequence); for CLIP, HF's ``last_hidden_state`` is the encoder output *before*
``post_layernorm`` (HF norms only the pooled class token), so ours equals
``vision_model.post_layernorm(last_hidden_state)``, and ``out[:, 0]`` equals HF's ``pooler_output``. SigLIP's
attention-pooling ``head`` is not built (timm's ``forward_intermediates`` does not use it either).

Parameters keep HF's module names (``L`` stacked on a leading ``layers`` axis; kernels ``[in, out]``):

| parameter                                        | shape               | logical axes                     |
|--------------------------------------------------|---------------------|----------------------------------|
| ``embeddings.patch_embedding.kernel`` (+ bias)   | ``[p*p*3, D]``      | ``("patch", "embed")``           |
| ``embeddings.class_embedding`` (CLIP)            | ``[D]``             | ``("embed",)``                   |
| ``embeddings.register_tokens`` (timm, ``R > 0``) | ``[R, D]``          | ``(None, "embed")``              |
| ``embeddings.position_embedding``                | ``[T, D]``          | ``("pos", "embed")``             |
| ``pre_layrnorm.weight/bias`` (CLIP)              | ``[D]``             | ``("norm",)``                    |
| ``encoder.layers.layer_norm{1,2}.weight/bias``   | ``[L, D]``          | ``("layers", "norm")``           |
| ``encoder.layers.self_attn.{q,k,v}_proj.kernel`` | ``[L, D, D]``       | ``("layers", "embed", "qkv")``   |
| ``encoder.layers.self_attn.out_proj.kernel``     | ``[L, D, D]``       | ``("layers", "heads", "embed")`` |
| ``encoder.layers.mlp.fc1.kernel``                | ``[L, D, F]``       | ``("layers", "embed", "mlp")``   |
| ``encoder.layers.mlp.fc2.kernel``                | ``[L, F, D]``       | ``("layers", "mlp", "embed")``   |
| ``post_layernorm.weight/bias``                   | ``[D]``             | ``("norm",)``                    |

(every projection also has a bias ``[L, out]``). The :class:`Encoder` is shared with the CLIP text tower
(:mod:`vla_foundry_jax.models.clip`). Attention scores and LayerNorm statistics are float32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vla_foundry_jax.configs.hf_vision import ACTIVATION_NAMES, EncoderConfig, HFVisionConfig, hf_vision_config
from vla_foundry_jax.convert.hf_vision_maps import load_vit_hf_weights
from vla_foundry_jax.layers.activations import activations
from vla_foundry_jax.layers.attention import head_major_attention, softmax_attention
from vla_foundry_jax.layers.dense import Dense
from vla_foundry_jax.layers.feed_forward import MLP
from vla_foundry_jax.layers.norms import make_norm
from vla_foundry_jax.layers.pixel_shuffle import patchify
from vla_foundry_jax.layers.stack import check_remat_policy, scan_layers, stack_layers
from vla_foundry_jax.params.model_params import ViTHFParams
from vla_foundry_jax.registry import ModelRecord, register_model

ACTIVATIONS = activations(*ACTIVATION_NAMES)  # the config reader accepts exactly these
INIT_STD = 0.02


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], param_dtype: Any) -> jax.Array:
    return (jax.random.normal(rngs.params(), shape, jnp.float32) * INIT_STD).astype(param_dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None) -> jax.Array:
    """``softmax(q k^T + bias) v`` on ``[b, T, nh, hd]`` (``q`` pre-scaled); ``bias [b, 1, T, T]`` float32 or None.

    Without bias: the head-major kernel (fast on XLA:CPU); with: float32 scores, probabilities in ``v``'s dtype.
    """
    if bias is None:
        out = head_major_attention(*(t.transpose(0, 2, 1, 3) for t in (q, k, v)))
        return out.transpose(0, 2, 1, 3)
    return softmax_attention(q, k, v, bias=bias, scale=1.0, upcast=False)


class SelfAttention(nnx.Module):
    """Multi-head attention ``[b, T, D] -> [b, T, D]`` with biased q / k / v / out projections."""

    def __init__(self, c: EncoderConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        D = c.hidden_size
        self.num_heads = c.num_heads
        self.head_dim = D // c.num_heads
        kw = {"rngs": rngs, "dtype": dtype, "param_dtype": param_dtype}
        self.q_proj = Dense(D, D, bias=c.qkv_bias, names=("embed", "qkv"), **kw)
        self.k_proj = Dense(D, D, bias=c.qkv_bias, names=("embed", "qkv"), **kw)
        self.v_proj = Dense(D, D, bias=c.qkv_bias, names=("embed", "qkv"), **kw)
        self.out_proj = Dense(D, D, bias=True, names=("heads", "embed"), **kw)

    def __call__(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        b, T, D = x.shape
        split = (b, T, self.num_heads, self.head_dim)
        q = (self.q_proj(x) * jnp.asarray(self.head_dim**-0.5, x.dtype)).reshape(split)
        out = attention(q, self.k_proj(x).reshape(split), self.v_proj(x).reshape(split), bias)
        return self.out_proj(out.reshape(b, T, D))


class EncoderLayer(nnx.Module):
    """``x += self_attn(layer_norm1(x)); x += mlp(layer_norm2(x))``."""

    def __init__(self, c: EncoderConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        kw = {"dtype": dtype, "param_dtype": param_dtype}
        self.layer_norm1 = make_norm("default_layer_norm", c.hidden_size, c.layer_norm_eps, **kw)
        self.self_attn = SelfAttention(c, rngs=rngs, **kw)
        self.layer_norm2 = make_norm("default_layer_norm", c.hidden_size, c.layer_norm_eps, **kw)
        self.mlp = MLP(c.hidden_size, c.intermediate_size, act=ACTIVATIONS[c.activation], rngs=rngs, **kw)

    def __call__(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), bias)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nnx.Module):
    """``L`` stacked :class:`EncoderLayer` (at ``layers``), run with ``nnx.scan``; optional remat per layer."""

    def __init__(
        self, c: EncoderConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any, remat_policy: str | None = None
    ):
        check_remat_policy(remat_policy)
        self.remat_policy = remat_policy

        def make_layer(layer_rngs: nnx.Rngs) -> EncoderLayer:
            return EncoderLayer(c, rngs=layer_rngs, dtype=dtype, param_dtype=param_dtype)

        self.layers = stack_layers(make_layer, c.num_layers, rngs)

    def __call__(self, x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
        """``x [b, T, D]``; ``bias``: optional additive float32 attention bias ``[b, 1, T, T]`` (a min-value mask)."""

        def step(layer: EncoderLayer, x: jax.Array, bias: Any) -> jax.Array:
            return layer(x, bias)

        return scan_layers(step, self.layers, x, bias, in_axes=(None,), remat_policy=self.remat_policy)


class VisionEmbeddings(nnx.Module):
    """``patches [b, n_p, p*p*3] -> [b, T, D]``: patch projection, class / register tokens, position embedding.

    Token order: class token, register tokens, patches. The position embedding is added to every token, or
    (``pos_embed_prefix = False``, timm's ``no_embed_class``) to the patches before the prefix is prepended.
    """

    def __init__(self, c: HFVisionConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        D, p = c.hidden_size, c.patch_size
        self.dtype = dtype
        self.patch_embedding = Dense(
            p * p * 3,
            D,
            bias=c.has_patch_bias,
            names=("patch", "embed"),
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        self.class_embedding = (
            nnx.Param(_normal(rngs, (D,), param_dtype), out_sharding=("embed",)) if c.cls_token else None
        )
        self.register_tokens = (
            nnx.Param(_normal(rngs, (c.reg_tokens, D), param_dtype), out_sharding=(None, "embed"))
            if c.reg_tokens
            else None
        )
        self.pos_embed_prefix = c.pos_embed_prefix
        n_pos = c.num_tokens if c.pos_embed_prefix else c.num_patches
        self.position_embedding = nnx.Param(_normal(rngs, (n_pos, D), param_dtype), out_sharding=("pos", "embed"))

    def __call__(self, patches: jax.Array) -> jax.Array:
        x = self.patch_embedding(patches)
        b = x.shape[0]
        pos = self.position_embedding[...].astype(self.dtype)
        if not self.pos_embed_prefix:
            x = x + pos
        prefix = [self.class_embedding[...][None]] if self.class_embedding is not None else []
        if self.register_tokens is not None:
            prefix.append(self.register_tokens[...])
        if prefix:
            tokens = jnp.concatenate(prefix, axis=0).astype(self.dtype)
            x = jnp.concatenate([jnp.broadcast_to(tokens, (b, *tokens.shape)), x], axis=1)
        return x + pos if self.pos_embed_prefix else x


class HFVisionTower(nnx.Module):
    """SigLIP / CLIP vision tower (``type = "vit_hf"``; also ``clip_hf``'s ``vision_model``).

    ``__call__(images)``: channels-last ``[B, img, img, 3]`` or ``[B, N, img, img, 3]`` -> the ``post_layernorm``-ed
    token sequence ``[B, T, D]`` / ``[B, N, T, D]`` in the compute dtype (see the module docstring for the exact HF
    correspondence).
    """

    def __init__(
        self,
        c: HFVisionConfig,
        *,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        remat_policy: str | None = None,
        where: str = "vit_hf",
    ):
        self.config = c
        self.where = where
        self.dtype = dtype
        kw = {"dtype": dtype, "param_dtype": param_dtype}
        self.embeddings = VisionEmbeddings(c, rngs=rngs, **kw)
        self.pre_layrnorm = (
            make_norm("default_layer_norm", c.hidden_size, c.layer_norm_eps, **kw) if c.has_pre_norm else None
        )
        self.encoder = Encoder(c, rngs=rngs, remat_policy=remat_policy, **kw)
        self.post_layernorm = (
            make_norm("default_layer_norm", c.hidden_size, c.layer_norm_eps, **kw) if c.final_norm else None
        )

    @property
    def hidden_dim(self) -> int:
        return self.config.hidden_size

    @property
    def num_hidden_layers(self) -> int:
        return self.config.num_layers

    @property
    def num_patches(self) -> int:
        return self.config.num_patches

    @property
    def num_tokens(self) -> int:
        """Tokens per image in the output: ``num_patches`` + prefix tokens (CLIP's class token; timm class and
        register tokens)."""
        return self.config.num_tokens

    def check_images(self, images: Any) -> None:
        s = self.config.image_size
        shape = tuple(images.shape)
        if len(shape) not in (4, 5):
            raise ValueError(
                f"{self.where} expects channels-last images [B, {s}, {s}, 3] or [B, N, {s}, {s}, 3], got shape {shape}."
            )
        if shape[-1] != 3:
            hint = " (this looks channels-first; transpose to channels-last)" if shape[-3] == 3 else ""
            raise ValueError(f"{self.where} expects 3 channels in the last axis, got shape {shape}{hint}.")
        if shape[-3:-1] != (s, s):
            raise ValueError(
                f"{self.where} expects {s}x{s} images (the checkpoint's image_size = {s}) but got "
                f"{shape[-3]}x{shape[-2]} (shape {shape}); resize the images."
            )

    def patchify(self, images: jax.Array) -> jax.Array:
        """``[b, img, img, 3] -> [b, n_p, p*p*3]``: patches row-major, (row, col, channel) inside."""
        return patchify(images, self.config.patch_size)

    def __call__(self, images: jax.Array) -> jax.Array:
        self.check_images(images)
        lead = images.shape[:-3]
        x = images.reshape(-1, *images.shape[-3:]).astype(self.dtype)
        x = self.embeddings(self.patchify(x))
        if self.pre_layrnorm is not None:
            x = self.pre_layrnorm(x)
        x = self.encoder(x)
        if self.post_layernorm is not None:
            x = self.post_layernorm(x)
        return x.reshape(*lead, *x.shape[1:])


def build_vit_hf(
    params: Any,
    *,
    rngs: nnx.Rngs,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    remat_policy: str | None = None,
) -> HFVisionTower:
    """Registry builder for ``type = "vit_hf"`` (random parameters; the ``vit_hf`` weight loader fills them)."""
    return HFVisionTower(
        hf_vision_config(params),
        rngs=rngs,
        dtype=dtype,
        param_dtype=param_dtype,
        remat_policy=remat_policy,
        where=params.gin_name,
    )


register_model(ModelRecord(params=ViTHFParams, builder=build_vit_hf, weight_loader=load_vit_hf_weights))
