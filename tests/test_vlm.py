"""VLM: image-token merge, per-sample checks, caption-only loss, captioning with a KV cache, LLM -> VLM start."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.fixtures.paths import PROCESSOR
from tests.fixtures.runs import tiny_experiment
from tests.fixtures.tiny_models import IMAGE_TOKEN, tiny_vlm_params
from vla_foundry_jax.models import build_model
from vla_foundry_jax.models.generation import generate
from vla_foundry_jax.models.vlm import ImageTokenError, check_image_tokens, image_tokens_per_image, vlm_loss
from vla_foundry_jax.params import HyperParams, ParamsError, VLMParams

IMG = IMAGE_TOKEN  # image token id


def _params(shuffle: int = 1, vocab: int = 100) -> VLMParams:
    return tiny_vlm_params(shuffle=shuffle, vocab=vocab)


@pytest.fixture(scope="module")
def model():
    return build_model(_params(shuffle=2), rngs=nnx.Rngs(0))


def _batch(params, n_images=1, text=(5, 6, 7), b=2, seed=0):
    k = n_images * image_tokens_per_image(params)
    ids = np.array([[IMG] * k + list(text)] * b, np.int32)
    px = np.random.default_rng(seed).normal(size=(b, n_images, 16, 16, 3)).astype(np.float32)
    return ids, px


def _shuffle_np(x, s):
    """Independent pixel shuffle: token (bi, bj) = concat over di, dj of x[(bi*s+di)*r + bj*s+dj]."""
    b, n, c = x.shape
    r = round(n**0.5)
    out = np.zeros((b, (r // s) ** 2, s * s * c), x.dtype)
    for bi in range(r // s):
        for bj in range(r // s):
            parts = [x[:, (bi * s + di) * r + bj * s + dj] for di in range(s) for dj in range(s)]
            out[:, bi * (r // s) + bj] = np.concatenate(parts, -1)
    return out


def test_image_tokens_replace_placeholders_in_order(model):
    p = model.params
    ids, px = _batch(p, n_images=2)
    emb = np.asarray(model.embed(jnp.asarray(ids), jnp.asarray(px)))
    vit_out = np.asarray(model.vit(jnp.asarray(px)))  # [B, 2, 16, H_vit]
    per_cam = [_shuffle_np(vit_out[:, c], 2) for c in range(2)]  # camera-major token order
    expected_img = np.concatenate(per_cam, 1) @ np.asarray(model.projection[...])
    k = 2 * image_tokens_per_image(p)
    np.testing.assert_allclose(emb[:, :k], expected_img, atol=1e-5)
    np.testing.assert_allclose(emb[:, k:], np.asarray(model.transformer.embed(jnp.asarray(ids[:, k:]))), atol=1e-6)


def test_per_sample_image_token_count_is_checked(model):
    p = model.params
    ids, px = _batch(p)
    bad = ids.copy()
    bad[0, -1] = IMG  # sample 0 has one extra image token ...
    bad[1, 0] = 5  # ... sample 1 one fewer: the batch total still matches (the original would accept it)
    with pytest.raises(ImageTokenError, match=r"sample 0 holds 5 image tokens .* give 4"):
        check_image_tokens(p, bad, px)
    with pytest.raises(ImageTokenError, match="no pixel_values"):
        check_image_tokens(p, ids, None)
    with pytest.raises(ImageTokenError):
        model(jnp.asarray(bad), jnp.asarray(px))


def test_image_token_outside_vocab_and_unset():
    with pytest.raises(ParamsError, match="outside the language model's vocabulary"):
        build_model(_params().replace(image_token_id=100), rngs=nnx.Rngs(0))
    with pytest.raises(ParamsError, match="image_token_id is not set"):
        build_model(_params().replace(image_token_id=None), rngs=nnx.Rngs(0))


def test_loss_counts_caption_tokens_only(model):
    p = model.params
    ids, px = _batch(p, text=(5, 6, 7, 0))
    mask = (ids != IMG) & (ids != 0)
    batch = {"input_ids": jnp.asarray(ids), "loss_mask": jnp.asarray(mask), "pixel_values": jnp.asarray(px)}
    loss, metrics = vlm_loss(model, batch, hparams=HyperParams())
    logits = np.asarray(model(jnp.asarray(ids[:, :-1]), jnp.asarray(px)).logits, np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
    m = mask[:, 1:]
    assert float(loss) == pytest.approx((nll * m).sum() / m.sum(), rel=1e-5)
    assert int(metrics["num_tokens"]) == 2 * 3  # targets 5, 6, 7 per sample; image tokens and padding excluded


def test_captioning_with_cache_matches_full_recompute(model):
    p = model.params
    ids, px = _batch(p, text=(5,))
    out = np.asarray(generate(model, jnp.asarray(ids), max_new_tokens=5, temperature=0.0, pixel_values=jnp.asarray(px)))
    seq = ids.copy()
    fwd = nnx.jit(lambda m, i, x: m(i, x).logits)
    for _ in range(5):
        logits = np.asarray(fwd(model, jnp.asarray(seq), jnp.asarray(px)))
        seq = np.concatenate([seq, logits[:, -1].argmax(-1)[:, None].astype(np.int32)], 1)
    np.testing.assert_array_equal(out, seq)


def test_resolve_from_processor_and_mismatch_errors():
    from vla_foundry_jax.params.data_params import ImageCaptionDataParams
    from vla_foundry_jax.training.resolve import resolve_vlm

    # the processor directory makes 32 x 32 images; a 32-pixel ViT with 8-pixel patches and shuffle 2 gives 4 tokens
    data = ImageCaptionDataParams(dataset_manifest=["x"], processor=PROCESSOR, image_size=32, img_num_tokens=4)

    def params(shuffle=2, img=32, vocab=100):
        p = _params(shuffle=shuffle, vocab=vocab)
        return p.replace(vit=p.vit.replace(img_size=img, patch_size=img // 4), image_token_id=None)

    resolved = resolve_vlm(params(vocab=50432), data)
    assert resolved.transformer.vocab_size == 143 and resolved.image_token_id == 142
    with pytest.raises(ParamsError, match="img_num_tokens = 4 but the ViT gives 16"):
        resolve_vlm(params(shuffle=1), data)
    with pytest.raises(ParamsError, match="vocab_size = 100 is smaller"):
        resolve_vlm(params(), data)
    with pytest.raises(ParamsError, match=r"makes \(32, 32\) images but vit.img_size = 16"):
        resolve_vlm(params(img=16), data)
    # the processor and the ViT agree on 32 but the data says 224: loud, not silently ignored
    with pytest.raises(ParamsError, match=r"image_caption.image_size = 224 but .* take 32 x 32 images"):
        resolve_vlm(params(vocab=50432), data.replace(image_size=224))


def test_llm_to_vlm_transformer_weights_arrive_and_vocab_grows(tmp_path):
    """Train an LLM a few steps (142-token vocabulary), start a VLM (143 = + <image>) from it."""
    from vla_foundry_jax import checkpoint as ckpt_lib
    from vla_foundry_jax import parallel
    from vla_foundry_jax.models import load_weights
    from vla_foundry_jax.training.loop import train
    from vla_foundry_jax.training.optimizer import make_optimizer
    from vla_foundry_jax.training.state import init_train_state, make_model_spec

    llm_dir = str(tmp_path / "llm")
    llm = train(tiny_experiment(llm_dir, steps=2, vocab_size=142, weight_tying=False))
    lm = llm.experiment.model.replace(vocab_size=143, resume_from_checkpoint=llm_dir)
    vlm = _params(shuffle=2).replace(transformer=lm, image_token_id=142)
    hp = HyperParams(precision="fp32")
    spec = make_model_spec(vlm, hp, parallel.make_mesh(llm.experiment.distributed))
    fresh = init_train_state(spec, make_optimizer(hp, 2), hp, use_ema=False)
    (loaded, _) = load_weights(spec.params, [fresh["params"], fresh["frozen"]])
    got = {k: np.asarray(v) for k, v in ckpt_lib.flat_params(loaded).items()}
    init = {k: np.asarray(v) for k, v in ckpt_lib.flat_params(fresh["params"]).items()}
    want = {k: np.asarray(v) for k, v in ckpt_lib.flat_params(llm.state["params"]).items()}
    for name, w in want.items():
        g = got[f"transformer.{name}"]
        if name == "embeddings":
            np.testing.assert_array_equal(g[:142], w)
            np.testing.assert_array_equal(g[142], init["transformer.embeddings"][142])  # new row: fresh init
        elif name == "output":
            np.testing.assert_array_equal(g[:, :142], w)
        else:
            np.testing.assert_array_equal(g, w)
    np.testing.assert_array_equal(got["projection"], init["projection"])  # untouched
