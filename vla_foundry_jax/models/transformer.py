"""``transformer``: the from-scratch decoder of the original (reference §3.2), stacked and scanned.

Layout (the original's state-dict names in brackets; kernels stored ``[in, out]``):

| parameter                                   | shape                  | logical axes                     |
|---------------------------------------------|------------------------|----------------------------------|
| ``embeddings``                              | ``[V, H]``             | ``("vocab", "embed")``           |
| ``pos_embed.embedding`` (learned only; ours) | ``[max_seq_len, H]``   | ``("pos", "embed")``             |
| ``post_embed_norm.weight/bias`` (optional)  | ``[H]``                | ``("norm",)``                    |
| ``layers.attention_norm.weight/bias``       | ``[L, H]``             | ``("layers", "norm")``           |
| ``layers.attention.in_proj.kernel``         | ``[L, H, 3H]``         | ``("layers", "embed", "qkv")``   |
| ``layers.attention.q_norm/k_norm.*``        | ``[L, H]``             | ``("layers", "norm")``           |
| ``layers.attention.out_proj.kernel``        | ``[L, H, H]``          | ``("layers", "heads", "embed")`` |
| ``layers.ffn_norm.weight/bias``             | ``[L, H]``             | ``("layers", "norm")``           |
| ``layers.feed_forward.w12.kernel`` (swiglu) | ``[L, H, 2F]``         | ``("layers", "embed", "mlp")``   |
| ``layers.feed_forward.w3.kernel`` (swiglu)  | ``[L, F, H]``          | ``("layers", "mlp", "embed")``   |
| ``layers.feed_forward.w1/w2.kernel`` (gelu) | ``[L, H, 4H]/[L, 4H, H]`` | as w12 / w3                   |
| ``norm.weight/bias``                        | ``[H]``                | ``("norm",)``                    |
| ``output`` (absent when ``weight_tying``)   | ``[H, V]``             | ``("embed", "vocab")``           |

The ``L`` blocks are created with ``nnx.vmap`` (leading ``layers`` axis) and applied with ``nnx.scan``, so
compile time does not grow with depth; each block can be rematerialised with a ``jax.checkpoint_policies``
policy. Parameters are kept in ``param_dtype`` and cast to the compute ``dtype`` at use; norm statistics are
float32.

KV cache (``Transformer.init_cache``): a dict ``{"k", "v": [L, B, T, nh, hd] (post-RoPE keys), "mask": [B, T]
bool (key padding mask of the written slots), "length": int32 []}`` with a static capacity ``T``.

Differences from the original (all additive): ``positional_embedding_type="learned"`` (ours) adds a position
table to the token embeddings / ``inputs_embeds`` before ``post_embed_norm``; a non-causal model accepts a key
padding mask (the original raises NotImplementedError); the rotary ``inv_freq`` buffer is a trace-time constant,
not a parameter.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from vla_foundry_jax.layers.attention import dot_product_attention, empty_kv_cache
from vla_foundry_jax.layers.dense import Dense, matmul, trunc_normal
from vla_foundry_jax.layers.feed_forward import FeedForward
from vla_foundry_jax.layers.losses import next_token_loss
from vla_foundry_jax.layers.norms import make_norm
from vla_foundry_jax.layers.positional import LearnedPositionalEmbedding, apply_rotary
from vla_foundry_jax.layers.stack import check_remat_policy, scan_layers, stack_layers
from vla_foundry_jax.params.model_params import TransformerParams
from vla_foundry_jax.registry import ModelRecord, register_model

Cache = dict[str, jax.Array]


@flax.struct.dataclass
class TransformerOutput:
    """``logits [B, S, V]``; ``cache`` (updated KV cache or None); ``hidden_states``: tuple of the L block
    outputs ``[B, S, H]`` (last one before the final norm) or None."""

    logits: jax.Array
    cache: Cache | None = None
    hidden_states: tuple[jax.Array, ...] | None = None


class Attention(nnx.Module):
    """Fused-qkv multi-head self-attention: ``x [B, S, H] -> [B, S, H]`` (plus the updated layer KV)."""

    def __init__(
        self,
        params: TransformerParams,
        *,
        in_std: float,
        out_std: float | jax.Array,
        rngs: nnx.Rngs,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
    ):
        H = params.hidden_dim
        self.n_heads = params.n_heads
        self.head_dim = H // params.n_heads
        self.positional = params.positional_embedding_type
        self.attn_name = params.attn_name
        kw = {"rngs": rngs, "bias": False, "dtype": dtype, "param_dtype": param_dtype}
        self.in_proj = Dense(H, 3 * H, std=in_std, names=("embed", "qkv"), **kw)
        self.out_proj = Dense(H, H, std=out_std, names=("heads", "embed"), **kw)
        if params.qk_norm:
            norm = functools.partial(
                make_norm, params.norm_type, H, params.norm_eps, dtype=dtype, param_dtype=param_dtype
            )
            self.q_norm, self.k_norm = norm(), norm()
        else:
            self.q_norm = self.k_norm = None

    def __call__(
        self, x: jax.Array, kv: tuple[jax.Array, jax.Array] | None, ctx: dict[str, Any], causal: bool
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        B, S, H = x.shape
        q, k, v = jnp.split(self.in_proj(x), 3, axis=-1)
        if self.q_norm is not None:  # over the full H-wide vectors, before the head split
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(B, S, self.n_heads, self.head_dim)
        k = k.reshape(B, S, self.n_heads, self.head_dim)
        v = v.reshape(B, S, self.n_heads, self.head_dim)
        if self.positional in ("rotary", "rotary_float32"):
            q, k = apply_rotary(q, k, ctx["positions"], float32=self.positional == "rotary_float32")
        q, k = q.astype(v.dtype), k.astype(v.dtype)
        if kv is None:
            out = dot_product_attention(q, k, v, causal=causal, mask=ctx["mask"], impl=self.attn_name)
            new_kv = None
        else:
            offset = ctx["offset"]
            ck = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, offset, 0, 0))
            cv = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, offset, 0, 0))
            out = dot_product_attention(
                q,
                ck.astype(q.dtype),
                cv.astype(q.dtype),
                causal=causal,
                mask=ctx["mask"],
                impl=self.attn_name,
                q_offset=offset,
                kv_length=offset + S,
            )
            new_kv = (ck, cv)
        return self.out_proj(out.reshape(B, S, H)), new_kv


class TransformerBlock(nnx.Module):
    """Pre-norm block ``h = x + attn(attention_norm(x)); out = h + ffn(ffn_norm(h))`` on ``[B, S, H]``.

    ``layer`` (0-based, may be traced under ``nnx.vmap``) sets the out_proj / w3 init scale
    ``1/sqrt(H)/sqrt(2(layer+1))``.
    """

    def __init__(
        self,
        params: TransformerParams,
        layer: jax.Array | int,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
    ):
        H = params.hidden_dim
        in_std = H**-0.5
        out_std = in_std / jnp.sqrt(2.0 * (jnp.asarray(layer, jnp.float32) + 1.0))
        norm = functools.partial(make_norm, params.norm_type, H, params.norm_eps, dtype=dtype, param_dtype=param_dtype)
        kw = {"rngs": rngs, "dtype": dtype, "param_dtype": param_dtype}
        self.attention_norm = norm()
        self.attention = Attention(params, in_std=in_std, out_std=out_std, **kw)
        self.ffn_norm = norm()
        self.feed_forward = FeedForward(params.ffn_type, H, in_std=in_std, out_std=out_std, **kw)

    def __call__(
        self, x: jax.Array, kv: tuple[jax.Array, jax.Array] | None, ctx: dict[str, Any], causal: bool
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        attn, new_kv = self.attention(self.attention_norm(x), kv, ctx, causal)
        h = x + attn
        return h + self.feed_forward(self.ffn_norm(h)), new_kv


class Transformer(nnx.Module):
    """Decoder-only transformer (``type = "transformer"``).

    Args:
      params: the model's :class:`TransformerParams`.
      rngs: parameter initialisation keys (``rngs.params()``).
      dtype: compute dtype (activations, matmuls); parameters are cast to it at use.
      param_dtype: storage dtype of the parameters.
      remat_policy: None (no remat) or a name in :data:`REMAT_POLICIES` (a ``jax.checkpoint_policies`` policy)
        applied to every block.
    """

    def __init__(
        self,
        params: TransformerParams,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        remat_policy: str | None = None,
    ):
        check_remat_policy(remat_policy)
        self.params = params
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.remat_policy = remat_policy
        self.vocab_size = params.vocab_size
        H = params.hidden_dim
        std = H**-0.5
        norm = functools.partial(make_norm, params.norm_type, H, params.norm_eps, dtype=dtype, param_dtype=param_dtype)

        self.embeddings = nnx.Param(
            trunc_normal(rngs.params(), (params.vocab_size, H), std, param_dtype), out_sharding=("vocab", "embed")
        )
        self.pos_embed = (
            LearnedPositionalEmbedding(params.max_seq_len, H, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
            if params.positional_embedding_type == "learned"
            else None
        )
        self.post_embed_norm = norm() if params.post_embed_norm else None

        def make_block(block_rngs: nnx.Rngs, layer: jax.Array) -> TransformerBlock:
            return TransformerBlock(params, layer, rngs=block_rngs, dtype=dtype, param_dtype=param_dtype)

        self.layers = stack_layers(make_block, params.n_layers, rngs, jnp.arange(params.n_layers))
        self.norm = norm()
        self.output = (
            None
            if params.weight_tying
            else nnx.Param(
                trunc_normal(rngs.params(), (H, params.vocab_size), std, param_dtype), out_sharding=("embed", "vocab")
            )
        )

    @property
    def hidden_dim(self) -> int:
        return self.params.hidden_dim

    @property
    def num_hidden_layers(self) -> int:
        return self.params.n_layers

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings ``[B, S] -> [B, S, H]`` in the compute dtype (no positions, no post-embed norm)."""
        return jnp.take(self.embeddings[...], input_ids, axis=0).astype(self.dtype)

    def init_cache(self, batch_size: int, max_len: int, dtype: jnp.dtype | None = None) -> Cache:
        """An empty KV cache of capacity ``max_len`` tokens (see the module doc for the layout)."""
        if max_len > self.params.max_seq_len:
            raise ValueError(
                f"KV cache of {max_len} tokens exceeds transformer.max_seq_len = {self.params.max_seq_len}; "
                f"raise transformer.max_seq_len or generate fewer tokens."
            )
        p = self.params
        head_dim = p.hidden_dim // p.n_heads
        return empty_kv_cache(p.n_layers, batch_size, max_len, p.n_heads, head_dim, dtype or self.dtype)

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        cache: Cache | None = None,
        output_hidden_states: bool = False,
        is_causal: bool | None = None,
    ) -> TransformerOutput:
        """Forward pass.

        Args:
          input_ids: ``[B, S]`` int token ids, or
          inputs_embeds: ``[B, S, H]`` (exactly one of the two).
          attention_mask: ``[B, S]`` (1 = token, 0 = padding) for the S new tokens. Ignored when the model is
            causal and no cache is given (as the original: right padding is harmless under causality). With a
            cache it masks padded keys (stored in the cache for later steps).
          cache: a KV cache from :meth:`init_cache` (prefill or decode); positions start at its length.
          output_hidden_states: also return the L block outputs.
          is_causal: can only add causality to a non-causal model (the original's ``is_causal or self.is_causal``).

        Returns:
          :class:`TransformerOutput` with ``logits [B, S, V]`` (compute dtype, or float32 when
          ``cast_output_to_float32``), the updated cache (or None) and the hidden states (or None).
        """
        p = self.params
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        x = self.embed(input_ids) if input_ids is not None else inputs_embeds.astype(self.dtype)
        B, S, _ = x.shape
        causal = bool(p.is_causal or is_causal)

        if cache is None:
            if S > p.max_seq_len:
                raise ValueError(
                    f"Sequence length {S} exceeds transformer.max_seq_len = {p.max_seq_len}; "
                    f"raise transformer.max_seq_len or shorten the input."
                )
            offset = 0
            key_mask = None if (causal or attention_mask is None) else attention_mask.astype(bool)
            kv = None
        else:
            capacity = cache["k"].shape[2]
            offset = cache["length"]
            if S > capacity or (not isinstance(offset, jax.core.Tracer) and int(offset) + S > capacity):
                raise ValueError(f"{S} new tokens do not fit in the KV cache of capacity {capacity}.")
            new_mask = jnp.ones((B, S), bool) if attention_mask is None else attention_mask.astype(bool)
            key_mask = jax.lax.dynamic_update_slice(cache["mask"], new_mask, (0, offset))
            kv = (cache["k"], cache["v"])
        positions = offset + jnp.arange(S, dtype=jnp.int32)

        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        if self.post_embed_norm is not None:
            x = self.post_embed_norm(x)

        ctx = {"positions": positions, "mask": key_mask, "offset": None if cache is None else offset}

        def step(block: TransformerBlock, x: jax.Array, kv: Any, ctx: dict[str, Any]) -> Any:
            y, new_kv = block(x, kv, ctx, causal)
            return y, (y if output_hidden_states else None, new_kv)

        x, (hidden, new_kv) = scan_layers(
            step, self.layers, x, kv, ctx, in_axes=(0, None), out_axes=(nnx.Carry, 0), remat_policy=self.remat_policy
        )

        x = self.norm(x)
        head = self.embeddings[...].T if self.output is None else self.output[...]
        logits = matmul(x, head.astype(self.dtype))
        if p.cast_output_to_float32:
            logits = logits.astype(jnp.float32)

        new_cache = None
        if cache is not None:
            new_cache = {"k": new_kv[0], "v": new_kv[1], "mask": key_mask, "length": cache["length"] + S}
        hidden_states = tuple(hidden[i] for i in range(p.n_layers)) if output_hidden_states else None
        return TransformerOutput(logits=logits, cache=new_cache, hidden_states=hidden_states)

    def resize_token_embeddings(self, new_num_tokens: int | None, rngs: nnx.Rngs) -> int:
        """Grow the vocabulary to ``new_num_tokens`` (HF semantics); returns the resulting vocabulary size.

        ``None`` or ``new_num_tokens <= V`` leaves the model unchanged. Old rows are copied; new embedding
        (and untied output) rows are trunc-normal(1/sqrt(H)); a tied head follows the embeddings.
        """
        V, H = self.vocab_size, self.params.hidden_dim
        if new_num_tokens is None or new_num_tokens <= V:
            return V
        n_new = new_num_tokens - V
        std = H**-0.5
        emb = self.embeddings[...]
        self.embeddings.set_value(jnp.concatenate([emb, trunc_normal(rngs.params(), (n_new, H), std, emb.dtype)], 0))
        if self.output is not None:
            out = self.output[...]
            self.output.set_value(jnp.concatenate([out, trunc_normal(rngs.params(), (H, n_new), std, out.dtype)], 1))
        self.vocab_size = new_num_tokens
        self.params = self.params.replace(vocab_size=new_num_tokens)
        return new_num_tokens


def resize_token_embeddings(model: Transformer, new_num_tokens: int | None, rngs: nnx.Rngs) -> int:
    """Functional alias of :meth:`Transformer.resize_token_embeddings`."""
    return model.resize_token_embeddings(new_num_tokens, rngs)


def build_transformer(
    params: TransformerParams,
    *,
    rngs: nnx.Rngs,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    remat_policy: str | None = None,
) -> Transformer:
    """Registry builder for ``type = "transformer"``."""
    return Transformer(params, rngs=rngs, dtype=dtype, param_dtype=param_dtype, remat_policy=remat_policy)


register_model(ModelRecord(params=TransformerParams, builder=build_transformer, loss=next_token_loss))
