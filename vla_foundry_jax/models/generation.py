"""Autoregressive generation with a KV cache, as one jitted function (reference §3.2 ``generate``).

Prefill the (padded) prompt, then one token per step inside a ``jax.lax.while_loop``. New tokens are
appended after the full padded prompt width, as in the original; padded prompt positions are masked as keys.
Models whose call takes ``position_ids`` (the HF decoders and VLMs) get Hugging Face ``generate``'s positions:
``cumsum(attention_mask) - 1`` in the prompt (left-padded rows start at 0), then one more per new token, so
left-padded greedy decoding reproduces HF's tokens. A VLM's prefill also takes ``pixel_values`` and (PaliGemma's
prefix-LM) ``token_type_ids``, Qwen-VL's ``image_grid_thw``; the generated tokens attend causally. (Qwen-VL
turns the 1-D positions of the generated tokens into its M-RoPE positions with the ``rope_deltas`` its prefill
stored in the cache, as HF does.)
Sampling per step: temperature 0 -> greedy argmax; otherwise ``logits / temperature``, top-k, top-p, then a
categorical draw. Rows that emitted ``eos_token_id`` keep emitting it; the loop stops once every row is done and
the rest of the output is filled with ``eos_token_id`` (the original returns a shorter array instead).

Compiles once per (model graph, batch size, prompt width, max_new_tokens, temperature/top-k/top-p, whether an
EOS id is given); the EOS id itself and the rng are traced.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def filter_logits(logits: jax.Array, *, top_k: int | None = None, top_p: float | None = None) -> jax.Array:
    """Mask (to -inf) the logits outside top-k, then outside the top-p nucleus. ``logits [..., V]``.

    top-k keeps logits ``>=`` the k-th largest. top-p keeps, on the descending-sorted distribution, the shortest
    prefix whose cumulative probability exceeds ``p`` (the crossing token is kept, the first token always).
    ``top_k`` None/0 and ``top_p`` None/>=1 disable the respective filter.
    """
    logits = logits.astype(jnp.float32)
    neg_inf = jnp.array(-jnp.inf, logits.dtype)
    if top_k is not None and top_k > 0:
        k = min(int(top_k), logits.shape[-1])
        kth = jax.lax.top_k(logits, k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if top_p is not None and top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1, stable=True)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        remove_sorted = cum > top_p
        remove_sorted = jnp.concatenate([jnp.zeros_like(remove_sorted[..., :1]), remove_sorted[..., :-1]], axis=-1)
        remove = jnp.take_along_axis(remove_sorted, jnp.argsort(order, axis=-1), axis=-1)
        logits = jnp.where(remove, neg_inf, logits)
    return logits


def sample_next_token(
    logits: jax.Array,
    rng: jax.Array,
    *,
    temperature: float = 1.0,
    top_k: int | None = 50,
    top_p: float | None = 0.9,
) -> jax.Array:
    """One token per row from ``logits [B, V]`` -> ``[B]`` int32 (temperature 0 = greedy)."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits.astype(jnp.float32) / temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p", "use_eos", "use_positions"),
)
def _generate(
    graphdef: Any,
    state: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    rng: jax.Array,
    eos_token_id: jax.Array,
    prefill_kwargs: dict[str, jax.Array],
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    use_eos: bool,
    use_positions: bool,
) -> jax.Array:
    B, P = input_ids.shape
    N = max_new_tokens
    sample = functools.partial(sample_next_token, temperature=temperature, top_k=top_k, top_p=top_p)
    model = nnx.merge(graphdef, state)

    cache = model.init_cache(B, P + N - 1)
    n_real = jnp.sum(attention_mask, axis=1, dtype=jnp.int32)  # [B]: the first new token's HF position
    if use_positions:
        prefill_kwargs = {**prefill_kwargs, "position_ids": jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)}
    out = model(input_ids, attention_mask=attention_mask, cache=cache, **prefill_kwargs)
    rng, step_rng = jax.random.split(rng)
    token = sample(out.logits[:, -1], step_rng)
    fill = eos_token_id if use_eos else 0
    tokens = jnp.concatenate([input_ids, jnp.full((B, N), fill, jnp.int32)], axis=1).at[:, P].set(token)
    done = token == eos_token_id if use_eos else jnp.zeros((B,), bool)

    # The parameters travel in the loop carry (unchanged): NNX refuses Variables holding tracers of an outer trace.
    def cond(carry: tuple) -> jax.Array:
        i, _, _, _, done, _, _ = carry
        return (i < N) & ~jnp.all(done)

    def body(carry: tuple) -> tuple:
        i, tokens, token, cache, done, rng, state = carry
        step_model = nnx.merge(graphdef, state)
        step_kwargs = {"position_ids": (n_real + i - 1)[:, None]} if use_positions else {}
        out = step_model(token[:, None], cache=cache, **step_kwargs)
        rng, step_rng = jax.random.split(rng)
        token = sample(out.logits[:, -1], step_rng)
        if use_eos:
            token = jnp.where(done, eos_token_id, token)
            done = done | (token == eos_token_id)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, P + i))
        return i + 1, tokens, token, out.cache, done, rng, state

    carry = (jnp.int32(1), tokens, token, out.cache, done, rng, state)
    return jax.lax.while_loop(cond, body, carry)[1]


def generate(
    model: nnx.Module,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    max_new_tokens: int = 20,
    temperature: float = 1.0,
    top_k: int | None = 50,
    top_p: float | None = 0.9,
    eos_token_id: int | None = None,
    rng: jax.Array | None = None,
    pixel_values: jax.Array | None = None,
    token_type_ids: jax.Array | None = None,
    image_grid_thw: jax.Array | None = None,
) -> jax.Array:
    """Sample ``max_new_tokens`` tokens after ``input_ids [B, P]`` (``attention_mask [B, P]`` marks real tokens;
    left padding for the HF models, as HF ``generate``). ``model`` is a
    :class:`~vla_foundry_jax.models.transformer.Transformer` (any module with ``init_cache`` and the same call
    signature; a VLM takes ``pixel_values`` and, for PaliGemma's prefix-LM prompt, ``token_type_ids [B, P]`` in
    the prefill; Qwen-VL also ``image_grid_thw``). Returns ``[B, P + max_new_tokens]`` int32.
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if max_new_tokens <= 0:
        return input_ids
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, bool)
    if rng is None:
        rng = jax.random.key(0)
    prefill_kwargs = {}
    if pixel_values is not None:
        prefill_kwargs["pixel_values"] = jnp.asarray(pixel_values)
    if token_type_ids is not None:
        prefill_kwargs["token_type_ids"] = jnp.asarray(token_type_ids, jnp.int32)
    if image_grid_thw is not None:
        prefill_kwargs["image_grid_thw"] = jnp.asarray(image_grid_thw, jnp.int32)
    use_positions = "position_ids" in inspect.signature(type(model).__call__).parameters
    graphdef, state = nnx.split(model)
    return _generate(
        graphdef,
        state,
        input_ids,
        jnp.asarray(attention_mask).astype(bool),
        rng,
        jnp.asarray(-1 if eos_token_id is None else eos_token_id, jnp.int32),
        prefill_kwargs,
        max_new_tokens=int(max_new_tokens),
        temperature=float(temperature),
        top_k=None if top_k is None or top_k <= 0 else int(top_k),
        top_p=None if top_p is None or top_p >= 1.0 else float(top_p),
        use_eos=eos_token_id is not None,
        use_positions=use_positions,
    )
