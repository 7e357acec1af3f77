"""``transformer_hf``: the Hugging Face decoder-only LM families in Flax NNX, stacked and scanned.

Supported ``config.model_type`` values (``configs.hf_decoder.SUPPORTED_ARCHITECTURES``): ``llama`` (covers
SmolLM2), ``qwen2`` (q/k/v biases), ``qwen3`` (per-head q/k RMSNorm), ``mistral`` (sliding window), ``gemma``
(embeddings scaled by ``sqrt(H)``, ``1 + w`` norms, gelu-tanh MLP), ``gemma2`` (Gemma plus attention / final logit
soft-capping, alternating sliding / global layers, post-attention and pre/post-FFN norms, ``query_pre_attn_scalar``).
Only the default RoPE
(``rope_type = "default"``) is implemented.

Parameters keep the HF module names (``L`` stacked on a leading ``layers`` axis; kernels stored ``[in, out]``):

| parameter                                      | shape             | logical axes                     |
|------------------------------------------------|-------------------|----------------------------------|
| ``embed_tokens``                               | ``[V, H]``        | ``("vocab", "embed")``           |
| ``layers.input_layernorm.scale``               | ``[L, H]``        | ``("layers", "norm")``           |
| ``layers.self_attn.{q,k,v}_proj.kernel``       | ``[L, H, n*hd]``  | ``("layers", "embed", "qkv")``   |
| ``layers.self_attn.{q,k,v}_proj.bias``         | ``[L, n*hd]``     | ``("layers", "qkv")``            |
| ``layers.self_attn.o_proj.kernel`` (+ bias)    | ``[L, nh*hd, H]`` | ``("layers", "heads", "embed")`` |
| ``layers.self_attn.{q,k}_norm.scale`` (qwen3)  | ``[L, hd]``       | ``("layers", "norm")``           |
| ``layers.post_attention_layernorm.scale``      | ``[L, H]``        | ``("layers", "norm")``           |
| ``layers.{pre,post}_feedforward_layernorm.scale`` (gemma2) | ``[L, H]`` | ``("layers", "norm")``        |
| ``layers.mlp.{gate,up}_proj.kernel``           | ``[L, H, F]``     | ``("layers", "embed", "mlp")``   |
| ``layers.mlp.down_proj.kernel``                | ``[L, F, H]``     | ``("layers", "mlp", "embed")``   |
| ``norm.scale``                                 | ``[H]``           | ``("norm",)``                    |
| ``lm_head`` (absent when tied)                 | ``[H, V]``        | ``("embed", "vocab")``           |

RMSNorms compute ``x * rsqrt(mean(x^2) + eps) * scale`` in float32; Gemma's ``1 + w`` is folded into ``scale`` by
the weight loader (:mod:`vla_foundry_jax.convert.hf_decoder_maps`), so a freshly built model has ``scale = 1``
everywhere. The builder makes random parameters; the registered ``transformer_hf`` weight loader then fills them.

Block (``llama``/``qwen*``/``mistral``/``gemma``): ``h = x + attn(in_norm(x)); out = h + mlp(post_attn_norm(h))``.
``gemma2``: ``h = x + post_attn_norm(attn(in_norm(x))); out = h + post_ffn_norm(mlp(pre_ffn_norm(h)))``.
Attention: grouped-query (``num_key_value_heads`` divides ``num_attention_heads``; 1 = MQA), scale ``hd**-0.5`` (gemma2:
``query_pre_attn_scalar**-0.5``), optional ``tanh`` soft-cap of the scores, softmax in float32. Sliding-window layers
let query ``i`` see keys ``j`` with ``i - window < j <= i`` (HF's ``kv_idx > q_idx - sliding_window``).

``hidden_states`` follow the **HF convention**: ``L + 1`` entries ``[B, S, H]``: the embeddings entering layer 0
(after Gemma's scaling), the outputs of layers ``0 .. L-2``, and last the output of the final norm (HF replaces the
last layer's raw output by the normed one). Note the from-scratch ``transformer`` returns ``L`` pre-norm entries.

KV cache (:meth:`HFDecoder.init_cache`): ``{"k", "v": [L, B, T, n_kv, hd] (post-RoPE keys), "mask": [B, T] bool,
"length": int32 []}``; positions are ``cache length + arange(S)`` (as ``transformer``) unless ``position_ids`` are
given: :func:`~vla_foundry_jax.models.generation.generate` passes HF ``generate``'s ``cumsum(mask) - 1``. RoPE sees
only position differences and padded keys are masked, so the two agree on left-padded prompts up to float rounding.

``attention_mask [B, S]`` (1 = token) masks padded keys, with or without a cache (HF semantics). A query whose keys
are all masked (a left-padding position) attends uniformly instead of producing NaN. Logits are float32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vla_foundry_jax.configs.hf_decoder import ACTIVATION_NAMES, FULL_WINDOW, HFDecoderConfig, hf_decoder_config
from vla_foundry_jax.convert.hf_decoder_maps import load_transformer_hf_weights
from vla_foundry_jax.layers.activations import activations
from vla_foundry_jax.layers.attention import dot_product_attention, empty_kv_cache, softmax_attention
from vla_foundry_jax.layers.dense import Dense, matmul, trunc_normal
from vla_foundry_jax.layers.feed_forward import GatedMLP
from vla_foundry_jax.layers.losses import next_token_loss
from vla_foundry_jax.layers.positional import mrope_axes, mrope_positions
from vla_foundry_jax.layers.stack import check_remat_policy, scan_layers, stack_layers
from vla_foundry_jax.models.transformer import TransformerOutput
from vla_foundry_jax.params.model_params import TransformerHFParams
from vla_foundry_jax.registry import ModelRecord, register_model

ACTIVATIONS = activations(*ACTIVATION_NAMES)  # the config reader accepts exactly these
Cache = dict[str, jax.Array]


# ----------------------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nnx.Module):
    """``x * rsqrt(mean(x^2) + eps) * scale`` in float32, returned in ``x``'s dtype."""

    def __init__(self, dim: int, eps: float, *, param_dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float, mrope: np.ndarray | None = None) -> jax.Array:
    """HF rotary embedding (``rotate_half`` layout) of ``x [B, S, n, hd]`` at ``positions [S]`` or ``[B, S]``,
    float32 maths; with ``mrope`` (:func:`~vla_foundry_jax.layers.positional.mrope_axes`) ``positions`` are
    ``[3, B, S]`` (temporal, height, width; a ``[B, S]`` array is the same position on every axis)."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    if mrope is not None:
        positions = positions if positions.ndim == 3 else jnp.broadcast_to(positions, (3, *positions.shape))
        freqs = mrope_positions(positions, mrope).astype(jnp.float32) * inv_freq
    else:
        freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    emb = emb if emb.ndim == 3 else emb[None]
    cos, sin = jnp.cos(emb)[:, :, None, :], jnp.sin(emb)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : hd // 2], xf[..., hd // 2 :]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, c: HFDecoderConfig, *, rngs, dtype, param_dtype):
        self.c = c
        H, hd = c.hidden_size, c.head_dim
        kw = {"rngs": rngs, "dtype": dtype, "param_dtype": param_dtype}
        self.q_proj = Dense(H, c.num_heads * hd, bias=c.qkv_bias, names=("embed", "qkv"), **kw)
        self.k_proj = Dense(H, c.num_kv_heads * hd, bias=c.qkv_bias, names=("embed", "qkv"), **kw)
        self.v_proj = Dense(H, c.num_kv_heads * hd, bias=c.qkv_bias, names=("embed", "qkv"), **kw)
        self.o_proj = Dense(c.num_heads * hd, H, bias=c.o_bias, names=("heads", "embed"), **kw)
        if c.qk_norm:
            self.q_norm = RMSNorm(hd, c.rms_norm_eps, param_dtype=param_dtype)
            self.k_norm = RMSNorm(hd, c.rms_norm_eps, param_dtype=param_dtype)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x: jax.Array, kv: Any, window: jax.Array, ctx: dict[str, Any]) -> tuple[jax.Array, Any]:
        c = self.c
        B, S, _ = x.shape
        nkv, hd = c.num_kv_heads, c.head_dim
        q = self.q_proj(x).reshape(B, S, c.num_heads, hd)
        k = self.k_proj(x).reshape(B, S, nkv, hd)
        v = self.v_proj(x).reshape(B, S, nkv, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        mrope = mrope_axes(c.mrope_section, c.mrope_interleaved) if c.mrope_section else None
        q = rope(q, ctx["rope_positions"], c.rope_theta, mrope)
        k = rope(k, ctx["rope_positions"], c.rope_theta, mrope)
        if kv is None:
            keys, values, new_kv = k, v, None
        else:
            off = ctx["offset"]
            keys = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, off, 0, 0))
            values = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, off, 0, 0))
            new_kv = (keys, values)
        if ctx["allowed"] is None:  # plain causal self-attention: the backend's fastest kernel (layers/attention.py)
            out = dot_product_attention(q, keys, values, causal=True, impl="auto")
            return self.o_proj(out.astype(x.dtype).reshape(B, S, c.num_heads * hd)), new_kv
        allowed = ctx["allowed"] & (ctx["distance"] < window)[None]  # [B, S, T]
        if ctx["bidirectional"] is not None:  # prefix-LM: prefix pairs see each other, whatever the window
            allowed = allowed | ctx["bidirectional"]
        # A query with no visible key attends uniformly (HF's eager path does the same with its min-value mask).
        out = softmax_attention(
            q, keys, values, allowed=allowed[:, None], scale=c.attn_scale, softcap=c.attn_softcap, upcast=True
        )
        return self.o_proj(out.astype(x.dtype).reshape(B, S, c.num_heads * hd)), new_kv


class DecoderLayer(nnx.Module):
    def __init__(self, c: HFDecoderConfig, *, rngs, dtype, param_dtype):
        self.sandwich = c.sandwich_norms
        H, eps = c.hidden_size, c.rms_norm_eps
        kw = {"rngs": rngs, "dtype": dtype, "param_dtype": param_dtype}
        self.input_layernorm = RMSNorm(H, eps, param_dtype=param_dtype)
        self.self_attn = Attention(c, **kw)
        self.post_attention_layernorm = RMSNorm(H, eps, param_dtype=param_dtype)
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(H, eps, param_dtype=param_dtype)
            self.post_feedforward_layernorm = RMSNorm(H, eps, param_dtype=param_dtype)
        self.mlp = GatedMLP(H, c.intermediate_size, act=ACTIVATIONS[c.activation], bias=c.mlp_bias, **kw)

    def __call__(self, x: jax.Array, kv: Any, window: jax.Array, ctx: dict[str, Any]) -> tuple[jax.Array, Any]:
        attn, new_kv = self.self_attn(self.input_layernorm(x), kv, window, ctx)
        if self.sandwich:
            h = x + self.post_attention_layernorm(attn)
            return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h))), new_kv
        h = x + attn
        return h + self.mlp(self.post_attention_layernorm(h)), new_kv


# ----------------------------------------------------------------------------------------------------------
# Model


class HFDecoder(nnx.Module):
    """Decoder-only LM of an HF family (``type = "transformer_hf"``); same call contract as ``Transformer``.

    Args:
      config: :class:`HFDecoderConfig` (``HFDecoderConfig.from_hf(transformers_config)``).
      rngs: parameter initialisation keys.
      dtype: compute dtype; param_dtype: storage dtype; remat_policy: None or a name in ``REMAT_POLICIES``.
    """

    def __init__(
        self,
        config: HFDecoderConfig,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        remat_policy: str | None = None,
    ):
        check_remat_policy(remat_policy)
        c = self.config = config
        self.dtype, self.param_dtype, self.remat_policy = dtype, param_dtype, remat_policy
        self.vocab_size = c.vocab_size
        H = c.hidden_size
        self.embed_tokens = nnx.Param(
            trunc_normal(rngs.params(), (c.vocab_size, H), H**-0.5, param_dtype), out_sharding=("vocab", "embed")
        )

        def make_layer(layer_rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(c, rngs=layer_rngs, dtype=dtype, param_dtype=param_dtype)

        self.layers = stack_layers(make_layer, c.num_layers, rngs)
        self.norm = RMSNorm(H, c.rms_norm_eps, param_dtype=param_dtype)
        self.lm_head = (
            None
            if c.tie_word_embeddings
            else nnx.Param(
                trunc_normal(rngs.params(), (H, c.vocab_size), H**-0.5, param_dtype), out_sharding=("embed", "vocab")
            )
        )

    @property
    def hidden_dim(self) -> int:
        return self.config.hidden_size

    @property
    def num_hidden_layers(self) -> int:
        return self.config.num_layers

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings ``[B, S] -> [B, S, H]`` in the compute dtype (Gemma: times ``sqrt(H)``, as HF's)."""
        x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)
        if self.config.embed_scale is not None:
            x = x * jnp.asarray(self.config.embed_scale, self.dtype)
        return x

    def init_cache(self, batch_size: int, max_len: int, dtype: jnp.dtype | None = None) -> Cache:
        """An empty KV cache of capacity ``max_len`` tokens (layout in the module doc)."""
        c = self.config
        if max_len > c.max_position_embeddings:
            raise ValueError(
                f"KV cache of {max_len} tokens exceeds the HF config's max_position_embeddings = "
                f"{c.max_position_embeddings}."
            )
        return empty_kv_cache(c.num_layers, batch_size, max_len, c.num_kv_heads, c.head_dim, dtype or self.dtype)

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        cache: Cache | None = None,
        output_hidden_states: bool = False,
        is_causal: bool | None = None,
        prefix_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        deepstack: jax.Array | None = None,
    ) -> TransformerOutput:
        """Forward pass (causal, or prefix-LM with ``prefix_mask``; ``is_causal`` is accepted for interface parity).

        Args:
          input_ids: ``[B, S]`` token ids, or inputs_embeds ``[B, S, H]`` (used as is: no Gemma scaling).
          attention_mask: ``[B, S]`` (1 = token, 0 = padding) of the S new tokens; masks padded keys.
          cache: a KV cache from :meth:`init_cache`; positions start at its length.
          output_hidden_states: also return the ``L + 1`` HF-convention hidden states (module doc).
          prefix_mask: ``[B, S]`` bool (optional), prefix-LM attention (PaliGemma's ``token_type_ids == 0``): two
            prefix tokens of the S new ones see each other in both directions (also across a sliding window, as
            HF's block overlay); everything else stays causal. Padded keys stay masked.
          position_ids: ``[B, S]`` int (optional), the RoPE positions of the new tokens (HF ``generate`` derives
            them from the attention mask, ``cumsum - 1``, so left-padded rows start at 0); masks and sliding windows
            still follow the cache slots. Default: cache length + ``arange(S)``. With M-RoPE
            (``config.mrope_section``): ``[3, B, S]`` (temporal, height, width) or ``[B, S]`` (all three equal).
          deepstack: ``[K, B, S, H]`` (optional), Qwen3-VL's DeepStack: ``deepstack[i]`` is added to the output of
            layer ``i < K`` (zero away from the image positions); the hidden states record the layer outputs
            before the addition, as HF's.

        Returns:
          :class:`TransformerOutput` (``logits [B, S, V]`` float32, updated cache or None, hidden states or None).
        """
        del is_causal
        c = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        x = self.embed(input_ids) if input_ids is not None else inputs_embeds.astype(self.dtype)
        B, S, _ = x.shape
        new_mask = jnp.ones((B, S), bool) if attention_mask is None else attention_mask.astype(bool)
        if cache is None:
            if S > c.max_position_embeddings:
                raise ValueError(f"Sequence length {S} exceeds max_position_embeddings = {c.max_position_embeddings}.")
            offset, kv, key_mask, T = 0, None, new_mask, S
        else:
            T = cache["k"].shape[2]
            offset = cache["length"]
            if S > T or (not isinstance(offset, jax.core.Tracer) and int(offset) + S > T):
                raise ValueError(f"{S} new tokens do not fit in the KV cache of capacity {T}.")
            key_mask = jax.lax.dynamic_update_slice(cache["mask"], new_mask, (0, offset))
            kv = (cache["k"], cache["v"])
        positions = offset + jnp.arange(S, dtype=jnp.int32)
        k_pos = jnp.arange(T, dtype=jnp.int32)
        distance = positions[:, None] - k_pos[None, :]  # [S, T]
        allowed = (distance >= 0)[None] & key_mask[:, None, :]  # causal & padding (& cache validity via causality)
        bidirectional = None
        if prefix_mask is not None:
            prefix = prefix_mask.astype(bool) & new_mask
            prefix_keys = (
                prefix if cache is None else jax.lax.dynamic_update_slice(jnp.zeros_like(key_mask), prefix, (0, offset))
            )
            bidirectional = prefix[:, :, None] & prefix_keys[:, None, :]  # [B, S, T]
        plain_causal = (
            cache is None
            and attention_mask is None
            and prefix_mask is None
            and all(w == FULL_WINDOW for w in c.windows)
            and c.attn_softcap is None
            and c.attn_scale == float(c.head_dim) ** -0.5
        )
        ctx = {
            "rope_positions": positions if position_ids is None else position_ids,
            "offset": offset,
            "allowed": None if plain_causal else allowed,  # None: no mask to build (Attention's fast path)
            "distance": distance,
            "bidirectional": bidirectional,
        }
        windows = jnp.asarray(c.windows, jnp.int32)

        n_deep = 0 if deepstack is None else deepstack.shape[0]

        def step(
            layer: DecoderLayer, x: jax.Array, kv: Any, window: jax.Array, index: jax.Array, ctx: dict[str, Any]
        ) -> Any:
            y, new_kv = layer(x, kv, window, ctx)
            recorded = y if output_hidden_states else None
            if n_deep:
                extra = jax.lax.dynamic_index_in_dim(ctx["deepstack"], jnp.minimum(index, n_deep - 1), keepdims=False)
                y = y + jnp.where(index < n_deep, extra, jnp.zeros((), extra.dtype)).astype(y.dtype)
            return y, (recorded, new_kv)

        if n_deep:
            ctx["deepstack"] = deepstack
        x0 = x
        x, (hidden, new_kv) = scan_layers(
            step,
            self.layers,
            x,
            kv,
            windows,
            jnp.arange(c.num_layers, dtype=jnp.int32),
            ctx,
            in_axes=(0, 0, 0, None),
            out_axes=(nnx.Carry, 0),
            remat_policy=self.remat_policy,
        )
        x = self.norm(x)
        head = self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]
        logits = matmul(x, head.astype(self.dtype)).astype(jnp.float32)
        if c.final_softcap is not None:
            logits = jnp.tanh(logits / c.final_softcap) * c.final_softcap

        new_cache = None
        if cache is not None:
            new_cache = {"k": new_kv[0], "v": new_kv[1], "mask": key_mask, "length": cache["length"] + S}
        hidden_states = None
        if output_hidden_states:
            hidden_states = (x0, *(hidden[i] for i in range(c.num_layers - 1)), x)
        return TransformerOutput(logits=logits, cache=new_cache, hidden_states=hidden_states)


def build_transformer_hf(
    params: Any,
    *,
    rngs: nnx.Rngs,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    remat_policy: str | None = None,
) -> HFDecoder:
    """Registry builder for ``type = "transformer_hf"`` (random parameters; the weight loader fills them)."""
    return HFDecoder(
        hf_decoder_config(params), rngs=rngs, dtype=dtype, param_dtype=param_dtype, remat_policy=remat_policy
    )


register_model(
    ModelRecord(
        params=TransformerHFParams,
        builder=build_transformer_hf,
        loss=next_token_loss,
        weight_loader=load_transformer_hf_weights,
    )
)
