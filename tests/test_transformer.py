"""The ``transformer`` model and ``generate`` against a NumPy re-implementation of the original's forward."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from vla_foundry_jax.models import build_model
from vla_foundry_jax.models.generation import filter_logits, generate, sample_next_token
from vla_foundry_jax.models.transformer import Transformer, TransformerOutput, resize_token_embeddings
from vla_foundry_jax.params.model_params import TransformerParams

V, H, NH, L, MAX = 97, 32, 4, 2, 32
BASE = {"hidden_dim": H, "n_heads": NH, "n_layers": L, "vocab_size": V, "max_seq_len": MAX}


def make(seed: int = 0, perturb: bool = True, **overrides) -> Transformer:
    model = Transformer(TransformerParams(**{**BASE, **overrides}), rngs=nnx.Rngs(seed))
    if perturb:  # norms start at 1 / 0; randomise them so that the parity tests see weight and bias
        state = nnx.state(model, nnx.Param)
        pure = nnx.to_pure_dict(state)
        rng = np.random.default_rng(seed + 100)

        def visit(d):
            for k, v in d.items():
                if isinstance(v, dict):
                    visit(v)
                elif k in ("weight", "bias"):
                    d[k] = jnp.asarray((k == "weight") + 0.2 * rng.normal(size=v.shape), jnp.float32)

        visit(pure)
        nnx.replace_by_pure_dict(state, pure)
        nnx.update(model, state)
    return model


@functools.partial(nnx.jit, static_argnames=("output_hidden_states", "is_causal"))
def fwd(model, ids, mask=None, cache=None, *, output_hidden_states=False, is_causal=None) -> TransformerOutput:
    """Jitted forward (eager calls would re-trace and re-compile the layer scan every time)."""
    return model(ids, attention_mask=mask, cache=cache, output_hidden_states=output_hidden_states, is_causal=is_causal)


# ------------------------------------------------------------------------------------------- NumPy reference
def _a(v) -> np.ndarray:
    return np.asarray(v[...], np.float64)


def _np_norm(norm_type, x, w, b, eps):
    if norm_type == "rms_norm":
        return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * w
    mean = x.mean(-1, keepdims=True)
    y = (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)
    return y * (1.0 if w is None else w) + (0.0 if b is None else b)


def _norm_params(norm, layer=None):
    get = lambda v: None if v is None else (_a(v) if layer is None else _a(v)[layer])  # noqa: E731
    return get(norm.weight), get(norm.bias)


def _np_attention(q, k, v, causal, key_mask):
    B, S, _, hd = q.shape
    allowed = np.broadcast_to(np.tril(np.ones((S, S), bool)) if causal else np.ones((S, S), bool), (B, S, S)).copy()
    if key_mask is not None:  # the original's padding merge; rows left empty are unmasked entirely
        allowed &= key_mask[:, None, :].astype(bool)
        allowed[~allowed.any(-1)] = True
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    s = np.where(allowed[:, None], s, -np.inf)
    pr = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", pr / pr.sum(-1, keepdims=True), v)


def _np_rope(x, pos):
    hd = x.shape[-1]
    inv = 1.0 / 10000.0 ** (np.arange(0, hd, 2) / hd)
    emb = np.concatenate([pos[:, None] * inv, pos[:, None] * inv], -1)[None, :, None]
    x1, x2 = np.split(x, 2, -1)
    return x * np.cos(emb) + np.concatenate([-x2, x1], -1) * np.sin(emb)


def np_forward(model: Transformer, ids, key_mask=None, is_causal=None):
    """The original's forward in float64: (logits [B, S, V], list of L block outputs)."""
    p = model.params
    eps, nt, nh = p.norm_eps, p.norm_type, p.n_heads
    emb = _a(model.embeddings)
    head = emb if p.weight_tying else _a(model.output).T  # [V, H]
    ids = np.asarray(ids)
    B, S = ids.shape
    pos = np.arange(S, dtype=np.float64)
    x = emb[ids]
    if p.positional_embedding_type == "learned":
        x = x + _a(model.pos_embed.embedding)[:S]
    if p.post_embed_norm:
        x = _np_norm(nt, x, *_norm_params(model.post_embed_norm), eps)
    causal = p.is_causal or bool(is_causal)
    lay = model.layers
    hidden = []
    for l in range(p.n_layers):
        h = _np_norm(nt, x, *_norm_params(lay.attention_norm, l), eps)
        qkv = h @ _a(lay.attention.in_proj.kernel)[l]  # our kernels are [in, out] = torch weight^T
        q, k, v = np.split(qkv, 3, -1)
        if p.qk_norm:
            q = _np_norm(nt, q, *_norm_params(lay.attention.q_norm, l), eps)
            k = _np_norm(nt, k, *_norm_params(lay.attention.k_norm, l), eps)
        q, k, v = (t.reshape(B, S, nh, -1) for t in (q, k, v))
        if p.positional_embedding_type.startswith("rotary"):
            q, k = _np_rope(q, pos), _np_rope(k, pos)
        att = _np_attention(q, k, v, causal, key_mask).reshape(B, S, -1)
        x = x + att @ _a(lay.attention.out_proj.kernel)[l]
        h = _np_norm(nt, x, *_norm_params(lay.ffn_norm, l), eps)
        ff = lay.feed_forward
        if p.ffn_type == "swiglu":
            g, u = np.split(h @ _a(ff.w12.kernel)[l], 2, -1)
            x = x + (g / (1 + np.exp(-g)) * u) @ _a(ff.w3.kernel)[l]
        else:
            a = h @ _a(ff.w1.kernel)[l]
            gelu = 0.5 * a * (1 + np.vectorize(math.erf)(a / math.sqrt(2)))
            x = x + gelu @ _a(ff.w2.kernel)[l]
        hidden.append(x)
    return _np_norm(nt, x, *_norm_params(model.norm), eps) @ head.T, hidden


IDS = np.random.default_rng(0).integers(0, V, size=(2, 7))

CONFIGS = {
    "layernorm-swiglu-rotary": {},
    "lp-gelu-qknorm": {"norm_type": "lp_layer_norm", "ffn_type": "gelu", "qk_norm": True},
    "gainlp-learned-tied": {
        "norm_type": "gain_only_lp_layer_norm",
        "positional_embedding_type": "learned",
        "weight_tying": True,
    },
    "gain-gelu-nopos-bidirectional": {
        "norm_type": "gain_only_layer_norm",
        "ffn_type": "gelu",
        "positional_embedding_type": "none",
        "is_causal": False,
    },
    "nowb-rotary32-postembed-qknorm": {
        "norm_type": "no_wb_layer_norm",
        "positional_embedding_type": "rotary_float32",
        "post_embed_norm": True,
        "qk_norm": True,
    },
    "rms-everything-reference-attn": {
        "norm_type": "rms_norm",
        "qk_norm": True,
        "weight_tying": True,
        "post_embed_norm": True,
        "cast_output_to_float32": True,
        "attn_name": "reference",
    },
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_parity(name):
    model = make(**CONFIGS[name])
    out = fwd(model, jnp.asarray(IDS), output_hidden_states=True)
    ref, ref_hidden = np_forward(model, IDS)
    assert isinstance(out, TransformerOutput) and out.logits.shape == (2, 7, V) and out.cache is None
    np.testing.assert_allclose(np.asarray(out.logits), ref, atol=1e-5, rtol=1e-5)
    assert len(out.hidden_states) == L
    for got, want in zip(out.hidden_states, ref_hidden, strict=True):
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def test_bidirectional_with_padding_mask():
    """Non-causal + key padding mask (the original raises NotImplementedError here; ours masks padded keys)."""
    model = make(is_causal=False, positional_embedding_type="learned", post_embed_norm=True)
    mask = np.ones((2, 7), np.int32)
    mask[0, 5:] = 0
    out = fwd(model, jnp.asarray(IDS), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(out.logits), np_forward(model, IDS, key_mask=mask)[0], atol=1e-5)


# ------------------------------------------------------------------------------------------- shared model
@pytest.fixture(scope="module")
def model() -> Transformer:
    return make(qk_norm=True)


def test_hidden_states_convention(model):
    out = fwd(model, jnp.asarray(IDS), output_hidden_states=True)
    assert len(out.hidden_states) == model.num_hidden_layers == L and model.hidden_dim == H
    last = model.norm(out.hidden_states[-1])  # last entry is before the final norm
    np.testing.assert_allclose(np.asarray(last @ model.output[...]), np.asarray(out.logits), atol=1e-5)
    assert fwd(model, jnp.asarray(IDS)).hidden_states is None


def test_inputs_embeds_and_is_causal_argument(model):
    ids = jnp.asarray(IDS)
    ref = np.asarray(fwd(model, ids).logits)
    embeds = nnx.jit(lambda m, e: m(inputs_embeds=e).logits)(model, model.embed(ids))
    np.testing.assert_allclose(np.asarray(embeds), ref, atol=1e-6)
    # a causal model stays causal when called with is_causal=False
    np.testing.assert_array_equal(np.asarray(fwd(model, ids, is_causal=False).logits), ref)
    # a causal model without a cache ignores the padding mask (right padding is harmless)
    mask = jnp.ones((2, 7), bool).at[0, 4:].set(False)
    np.testing.assert_array_equal(np.asarray(fwd(model, ids, mask).logits), ref)
    # a bidirectional model becomes causal with is_causal=True
    bi = make(qk_norm=True, is_causal=False)
    nnx.update(bi, nnx.state(model))
    np.testing.assert_allclose(np.asarray(fwd(bi, ids, is_causal=True).logits), ref, atol=1e-6)
    assert not np.allclose(np.asarray(fwd(bi, ids).logits), ref, atol=1e-3)
    with pytest.raises(ValueError, match="exactly one"):
        model()


def test_cached_decode_matches_full_forward(model):
    ids = jnp.asarray(IDS)
    cache = model.init_cache(2, 8)
    assert cache["k"].shape == (L, 2, 8, NH, H // NH) and cache["mask"].shape == (2, 8)
    full = np.asarray(fwd(model, ids).logits)
    got = []
    for lo, hi in [(0, 3), (3, 5), (5, 6), (6, 7)]:  # prefill, chunk, single-token decodes
        out = fwd(model, ids[:, lo:hi], cache=cache)
        cache = out.cache
        got.append(np.asarray(out.logits))
    assert int(cache["length"]) == 7
    np.testing.assert_allclose(np.concatenate(got, 1), full, atol=1e-5)


def test_cached_prefill_with_padding_matches_reference(model):
    mask = np.ones((2, 7), np.int32)
    mask[0, 5:] = 0  # right padding
    mask[1, :2] = 0  # left padding: the first two query rows see no key (the original unmasks such rows)
    out = fwd(model, jnp.asarray(IDS), jnp.asarray(mask), model.init_cache(2, 7))
    np.testing.assert_allclose(np.asarray(out.logits), np_forward(model, IDS, key_mask=mask)[0], atol=1e-5)


def test_max_seq_len_errors(model):
    with pytest.raises(ValueError, match="max_seq_len"):
        model(jnp.zeros((1, MAX + 1), jnp.int32))
    with pytest.raises(ValueError, match="max_seq_len"):
        model.init_cache(1, MAX + 1)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, jnp.zeros((1, MAX - 2), jnp.int32), max_new_tokens=4)
    cache = model.init_cache(1, 4)
    cache["length"] = jnp.int32(3)
    with pytest.raises(ValueError, match="capacity"):
        model(jnp.zeros((1, 2), jnp.int32), cache=cache)


# ------------------------------------------------------------------------------------------- generation
def test_generate_greedy_matches_naive_loop(model):
    prompt, n = jnp.asarray(IDS[:, :5]), 4
    got = np.asarray(generate(model, prompt, max_new_tokens=n, temperature=0.0))
    assert got.shape == (2, 5 + n)
    buf = jnp.zeros((2, 5 + n), jnp.int32).at[:, :5].set(prompt)  # causal: zeros after t do not affect t
    for t in range(n):
        buf = buf.at[:, 5 + t].set(jnp.argmax(fwd(model, buf).logits[:, 4 + t], -1))
    np.testing.assert_array_equal(got, np.asarray(buf))
    # top-k = 1 sampling (through the whole sampling path) is greedy whatever the temperature / rng
    for seed in (0, 1):
        topk1 = generate(model, prompt, max_new_tokens=n, temperature=0.7, top_k=1, rng=jax.random.key(seed))
        np.testing.assert_array_equal(np.asarray(topk1), got)


def test_generate_right_padded_prompt_matches_reference(model):
    """Pads stay in place, new tokens follow the padded width, pads are masked as keys (original behaviour)."""
    prompt = IDS[:, :5].copy()
    mask = np.ones((2, 5), np.int32)
    mask[0, 3:] = 0
    prompt[0, 3:] = 0
    got = np.asarray(generate(model, jnp.asarray(prompt), jnp.asarray(mask), max_new_tokens=4, temperature=0))
    seq, m = prompt, mask
    for _ in range(4):
        nxt = np.argmax(np_forward(model, seq, key_mask=m)[0][:, -1], -1)
        seq = np.concatenate([seq, nxt[:, None]], 1)
        m = np.concatenate([m, np.ones((2, 1), np.int32)], 1)
    np.testing.assert_array_equal(got, seq)


def test_generate_eos(model):
    prompt = jnp.asarray(IDS[:, :5])
    greedy = np.asarray(generate(model, prompt, max_new_tokens=4, temperature=0))
    eos = int(greedy[0, 6])  # row 0's second new token
    got = np.asarray(generate(model, prompt, max_new_tokens=4, temperature=0, eos_token_id=eos))
    np.testing.assert_array_equal(got[0, :7], greedy[0, :7])
    assert (got[0, 7:] == eos).all()  # a finished row keeps emitting EOS
    row1 = greedy[1, 5:]
    stop = np.argmax(row1 == eos) if (row1 == eos).any() else len(row1)
    np.testing.assert_array_equal(got[1, 5 : 5 + stop], row1[:stop])
    # every row done at the first step: the loop stops and the tail is EOS
    first = int(greedy[0, 5])
    same = jnp.asarray(np.stack([IDS[0, :5], IDS[0, :5]]))
    np.testing.assert_array_equal(
        np.asarray(generate(model, same, max_new_tokens=4, temperature=0, eos_token_id=first))[:, 5:], first
    )


def test_top_k_top_p_filters():
    probs = np.array([0.05, 0.5, 0.15, 0.3])
    logits = jnp.asarray(np.log(probs))[None]
    kept = lambda x: np.isfinite(np.asarray(x))[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_p=0.6)) == [False, True, False, True]  # 0.5 < 0.6 < 0.8: crossing kept
    assert kept(filter_logits(logits, top_p=0.4)) == [False, True, False, False]  # the first token always stays
    assert kept(filter_logits(logits, top_p=0.85)) == [False, True, True, True]
    assert kept(filter_logits(logits, top_k=2)) == [False, True, False, True]
    assert kept(filter_logits(logits, top_k=2, top_p=0.5)) == [False, True, False, False]
    assert kept(filter_logits(logits, top_k=10, top_p=1.0)) == [True] * 4
    draws = jax.vmap(lambda k: sample_next_token(logits, k, temperature=1.0, top_k=None, top_p=0.6))(
        jax.random.split(jax.random.key(0), 2000)
    )
    counts = np.bincount(np.asarray(draws).ravel(), minlength=4)
    assert counts[0] == counts[2] == 0
    assert abs(counts[1] / 2000 - 0.5 / 0.8) < 0.05
    assert sample_next_token(logits, jax.random.key(0), temperature=0.0).tolist() == [1]


# ------------------------------------------------------------------------------------------- structure and init
def test_partition_specs(model):
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
    assert specs["embeddings"] == P("vocab", "embed") and specs["output"] == P("embed", "vocab")
    assert specs["norm"]["weight"] == P("norm")
    lay = specs["layers"]
    assert lay["attention"]["in_proj"]["kernel"] == P("layers", "embed", "qkv")
    assert lay["attention"]["out_proj"]["kernel"] == P("layers", "heads", "embed")
    assert lay["attention"]["q_norm"]["weight"] == P("layers", "norm")
    assert lay["feed_forward"]["w12"]["kernel"] == P("layers", "embed", "mlp")
    assert lay["feed_forward"]["w3"]["kernel"] == P("layers", "mlp", "embed")
    assert lay["attention_norm"]["bias"] == P("layers", "norm")
    assert model.layers.attention.in_proj.kernel.shape == (L, H, 3 * H)
    # the forward (scan) leaves the metadata intact
    fwd(model, jnp.asarray(IDS))
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model)))
    assert specs["layers"]["ffn_norm"]["weight"] == P("layers", "norm")


@pytest.fixture(scope="module")
def deep() -> Transformer:
    return Transformer(TransformerParams(**{**BASE, "n_layers": 8}), rngs=nnx.Rngs(1))


def test_init_statistics(deep):
    trunc = 0.98658  # std of N(0, 1) truncated at +-3

    def check(w, sigma, tol=0.08):
        w = np.asarray(w)
        assert np.abs(w).max() <= 3 * sigma * (1 + 1e-6)
        assert abs(w.std() / (sigma * trunc) - 1) < tol, (w.std(), sigma)

    check(deep.embeddings[...], H**-0.5)
    check(deep.output[...], H**-0.5)
    for l in range(8):
        out_sigma = H**-0.5 / math.sqrt(2 * (l + 1))  # per-layer scale survives the vmapped construction
        check(deep.layers.attention.out_proj.kernel[...][l], out_sigma)
        check(deep.layers.feed_forward.w3.kernel[...][l], out_sigma)
        check(deep.layers.attention.in_proj.kernel[...][l], H**-0.5)
        check(deep.layers.feed_forward.w12.kernel[...][l], H**-0.5)
    kernels = np.asarray(deep.layers.attention.in_proj.kernel[...])
    assert not np.allclose(kernels[0], kernels[1])  # every layer has its own key
    np.testing.assert_array_equal(np.asarray(deep.layers.ffn_norm.weight[...]), 1.0)


def test_scan_compile_size_independent_of_depth(deep):
    def lowered_size(m):
        graphdef, state = nnx.split(m)
        fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x).logits)
        return len(fn.lower(state, jnp.zeros((1, 4), jnp.int32)).as_text())

    # 5 layers: above stack.CPU_UNROLL_MAX_LAYERS, so both stay one scanned loop
    small = lowered_size(Transformer(TransformerParams(**{**BASE, "n_layers": 5}), rngs=nnx.Rngs(0)))
    big = lowered_size(deep)
    assert abs(big / small - 1) < 0.05, (small, big)


def test_cpu_unrolled_layers_match_the_scan(model, monkeypatch):
    """On CPU a stack of <= CPU_UNROLL_MAX_LAYERS layers is unrolled; loss, gradients and the KV cache of a
    decode step equal the scanned loop's."""
    from vla_foundry_jax.layers import stack

    graphdef, state = nnx.split(model)
    ids = jnp.asarray(IDS)

    def run():
        def loss(s):
            return jnp.mean(nnx.merge(graphdef, s)(ids).logits ** 2)

        lowered = jax.jit(jax.value_and_grad(loss)).lower(state)
        m = nnx.merge(graphdef, state)
        cache = m.init_cache(ids.shape[0], MAX)
        out = nnx.jit(lambda m, x, c: m(x, cache=c))(m, ids, cache)
        return "while" in lowered.as_text(), lowered.compile()(state), out

    looped, (val, grads), out = run()  # L = 2 layers: unrolled
    monkeypatch.setattr(stack, "CPU_UNROLL_MAX_LAYERS", 0)
    scan_looped, (want_val, want_grads), want_out = run()
    assert (looped, scan_looped) == (False, True)
    np.testing.assert_allclose(val, want_val, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out.logits, want_out.logits, rtol=1e-5, atol=1e-6)
    for k in ("k", "v"):
        np.testing.assert_allclose(out.cache[k], want_out.cache[k], rtol=1e-5, atol=1e-6)


def test_remat_policy_same_gradients(model):
    ids = jnp.asarray(IDS)
    grad = nnx.jit(nnx.grad(lambda m: jnp.mean(m(ids).logits ** 2)))
    remat = Transformer(model.params, rngs=nnx.Rngs(0), remat_policy="nothing_saveable")
    nnx.update(remat, nnx.state(model))
    for a, b in zip(jax.tree.leaves(nnx.state(grad(model))), jax.tree.leaves(nnx.state(grad(remat))), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    with pytest.raises(ValueError, match="remat_policy"):
        Transformer(TransformerParams(**BASE), rngs=nnx.Rngs(0), remat_policy="save_everything")


def test_bfloat16_compute_close_to_float32():
    p = TransformerParams(**BASE, qk_norm=True)
    f32 = Transformer(p, rngs=nnx.Rngs(0))
    bf16 = Transformer(p, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    assert bf16.layers.attention.in_proj.kernel[...].dtype == jnp.float32
    ids = jnp.asarray(IDS)
    lo, hi = fwd(bf16, ids).logits, fwd(f32, ids).logits
    assert lo.dtype == jnp.bfloat16
    err = np.abs(np.asarray(lo, np.float32) - np.asarray(hi))
    assert err.max() < 0.05 * np.abs(np.asarray(hi)).max() + 0.02, err.max()
    out = jax.eval_shape(
        lambda: Transformer(p.replace(cast_output_to_float32=True), rngs=nnx.Rngs(0), dtype=jnp.bfloat16)(ids)
    )
    assert out.logits.dtype == jnp.float32


def test_registry_and_resize():
    params = TransformerParams(**BASE, weight_tying=True)
    m = build_model(params, rngs=nnx.Rngs(0))
    assert isinstance(m, Transformer)
    old = np.asarray(m.embeddings[...])
    assert m.resize_token_embeddings(None, nnx.Rngs(1)) == V and m.resize_token_embeddings(50, nnx.Rngs(1)) == V
    assert resize_token_embeddings(m, V + 3, nnx.Rngs(1)) == V + 3
    new = np.asarray(m.embeddings[...])
    assert new.shape == (V + 3, H) and m.params.vocab_size == V + 3
    np.testing.assert_array_equal(new[:V], old)
    assert np.abs(new[V:]).max() <= 3 * H**-0.5 and np.abs(new[V:]).max() > 0
    assert nnx.eval_shape(lambda m, x: m(x), m, jnp.asarray(IDS + 3)).logits.shape == (2, 7, V + 3)
    untied = Transformer(TransformerParams(**BASE), rngs=nnx.Rngs(0))
    before = np.asarray(untied.output[...])
    untied.resize_token_embeddings(V + 5, nnx.Rngs(2))
    after = np.asarray(untied.output[...])
    assert after.shape == (H, V + 5) and untied.vocab_size == V + 5
    np.testing.assert_array_equal(after[:, :V], before)
    assert np.abs(after[:, V:]).max() > 0
