"""``vlm`` with HF parts (SigLIP ``vit_hf`` + Llama ``transformer_hf``) and ``vlm_hf`` (PaliGemma 1 / 2) parity."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.fixtures.hf_checkpoints import (  # noqa: E402
    IMAGE_TOKEN,
    TINY_TEXT,
    TINY_VISION,
    eager,
    hf_greedy,
    paligemma_config,
    torch_images,
)
from tests.fixtures.training import single_device_train_step  # noqa: E402
from tests.fixtures.weights import loaded, perturb_and_save, sharpened  # noqa: E402
from vla_foundry_jax import checkpoint as ckpt_lib  # noqa: E402
from vla_foundry_jax.models.vlm import ImageTokenError, image_tokens_per_image  # noqa: E402
from vla_foundry_jax.params import HyperParams  # noqa: E402
from vla_foundry_jax.params.model_params import TransformerHFParams, ViTHFParams, VLMHFParams, VLMParams  # noqa: E402
from vla_foundry_jax.registry import get_loss, model_record  # noqa: E402

ATOL = 1e-4
GEMMA = dict(TINY_TEXT, num_key_value_heads=1)
GEMMA2 = dict(
    GEMMA,
    num_hidden_layers=3,
    sliding_window=6,
    query_pre_attn_scalar=12,
    attn_logit_softcapping=5.0,
    final_logit_softcapping=3.0,
)
N_IMG = (16 // 4) ** 2  # 16 image tokens per image


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        PaliGemmaForConditionalGeneration,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    root = tmp_path_factory.mktemp("vlm_hf")
    out = {}
    for name, text, model_type in (("paligemma", GEMMA, "gemma"), ("paligemma2", GEMMA2, "gemma2")):
        cfg = eager(paligemma_config(text, model_type=model_type))
        torch.manual_seed(0)
        model = PaliGemmaForConditionalGeneration(cfg)
        out[name] = (perturb_and_save(model, root / name), model)
    torch.manual_seed(1)
    siglip = SiglipVisionModel(SiglipVisionConfig(**TINY_VISION))
    out["siglip"] = (perturb_and_save(siglip, root / "siglip"), siglip)
    llama_cfg = LlamaConfig(**dict(TINY_TEXT, vocab_size=64))
    torch.manual_seed(2)
    llama = LlamaForCausalLM(llama_cfg)
    out["llama"] = (perturb_and_save(llama, root / "llama"), llama)
    return out


def _inputs(b=2, prompt=(3, 5), suffix=4, seed=0):
    """Image tokens + prompt (token type 0) + suffix (type 1); sample i has ``prompt[i]`` prompt tokens."""
    rng = np.random.default_rng(seed)
    S = N_IMG + max(prompt) + suffix
    ids = rng.integers(1, 90, size=(b, S)).astype(np.int64)
    ids[:, :N_IMG] = IMAGE_TOKEN
    tt = np.ones((b, S), np.int64)
    for i, p in enumerate(prompt):
        tt[i, : N_IMG + p] = 0
    images = rng.standard_normal((b, 16, 16, 3)).astype(np.float32)
    return ids, tt, images


@pytest.mark.parametrize("name", ["paligemma", "paligemma2"])
def test_paligemma_logits_match_hf(ckpts, name):
    path, hf = ckpts[name]
    model = loaded(VLMHFParams(hf_pretrained=path))
    assert model.config.text.model_type == ("gemma" if name == "paligemma" else "gemma2")
    ids, tt, images = _inputs()
    with torch.no_grad():
        ref = hf(
            input_ids=torch.from_numpy(ids),
            pixel_values=torch_images(images),
            token_type_ids=torch.from_numpy(tt),
        ).logits.numpy()
        ref_causal = hf(
            input_ids=torch.from_numpy(ids),
            pixel_values=torch_images(images),
        ).logits.numpy()
    out = np.asarray(model(jnp.asarray(ids), jnp.asarray(images), token_type_ids=jnp.asarray(tt)).logits)
    np.testing.assert_allclose(out, ref, atol=ATOL)
    causal = np.asarray(model(jnp.asarray(ids), jnp.asarray(images[:, None])).logits)  # [B, N=1, h, w, 3] too
    np.testing.assert_allclose(causal, ref_causal, atol=ATOL)
    assert np.abs(out - causal).max() > 1e-3  # the prefix mask matters


def test_paligemma_loss_on_caption_tokens_and_batch_check(ckpts):
    path, hf = ckpts["paligemma"]
    params = VLMHFParams(hf_pretrained=path)
    ids, tt, images = _inputs(prompt=(3, 3))
    loss_mask = tt == 1
    batch = {"input_ids": ids, "token_type_ids": tt, "pixel_values": images[:, None], "loss_mask": loss_mask}
    model_record("vlm_hf").batch_check(params, batch)
    with pytest.raises(ImageTokenError, match="sample 0 holds 15 image tokens"):
        model_record("vlm_hf").batch_check(params, {"input_ids": ids[:, 1:], "pixel_values": images[:, None]})
    model = loaded(params)
    hp = HyperParams(precision="fp32")
    loss, _ = get_loss("vlm_hf")(model, {k: jnp.asarray(v) for k, v in batch.items()}, hparams=hp)
    with torch.no_grad():  # HF logits of the same prefix-LM pass on the inputs, CE over the suffix targets
        logits = hf(
            input_ids=torch.from_numpy(ids[:, :-1]),
            pixel_values=torch_images(images),
            token_type_ids=torch.from_numpy(tt[:, :-1]),
        ).logits
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), torch.from_numpy(ids[:, 1:]), reduction="none")
        ref = ce[torch.from_numpy(loss_mask[:, 1:])].mean().item()
    assert float(loss) == pytest.approx(ref, abs=1e-4)


@pytest.mark.parametrize(
    ("preset", "hub_id", "vit_hidden"),
    [("paligemma_load_llm.gin", "google/gemma-2b", 1152), ("smolvlm_load_llm.gin", "HuggingFaceTB/SmolLM2-135M", 768)],
)
def test_load_llm_presets(preset, hub_id, vit_hidden):
    from vla_foundry_jax.gin_utils import build_experiment, parse_gin

    parse_gin([preset], [])
    model = build_experiment().model
    assert model.type == "vlm" and model.vit.type == "vit" and model.vit.hidden_dim == vit_hidden
    assert model.transformer.type == "transformer_hf" and model.transformer.hf_pretrained == hub_id


def test_vlm_with_hf_vision_and_hf_llm(ckpts):
    vit = ViTHFParams(hf_pretrained=ckpts["siglip"][0], hidden_dim=24)
    lm = TransformerHFParams(hf_pretrained=ckpts["llama"][0])
    params = VLMParams(vit=vit, transformer=lm, image_token_id=63)
    assert image_tokens_per_image(params) == N_IMG
    assert image_tokens_per_image(params.replace(vit=vit.replace(projector_pixel_shuffle_factor=2))) == N_IMG // 4

    hp = HyperParams(precision="fp32", lr=1e-3, warmup="0")
    # as the training loop does: each sub-model's weight loader runs with its prefix ("vit.", "transformer.")
    _, state, step = single_device_train_step(params, hp, 100, load_weights=True)
    flat = ckpt_lib.flat_params(state["params"])
    assert flat["projection"].shape == (24, 32)  # vision hidden -> LM hidden, from the HF configs
    siglip = ckpts["siglip"][1]
    llama = ckpts["llama"][1]
    np.testing.assert_allclose(
        flat["vit.post_layernorm.weight"], siglip.post_layernorm.weight.detach().numpy(), rtol=0, atol=0
    )
    np.testing.assert_allclose(
        flat["vit.encoder.layers.mlp.fc1.kernel"][1], siglip.encoder.layers[1].mlp.fc1.weight.detach().numpy().T
    )
    np.testing.assert_allclose(flat["transformer.embed_tokens"], llama.model.embed_tokens.weight.detach().numpy())
    np.testing.assert_allclose(
        flat["transformer.layers.self_attn.q_proj.kernel"][0],
        llama.model.layers[0].self_attn.q_proj.weight.detach().numpy().T,
    )

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 60, size=(2, N_IMG + 6)).astype(np.int32)
    ids[:, 1 : 1 + N_IMG] = 63
    batch = {
        "input_ids": jnp.asarray(ids),
        "pixel_values": jnp.asarray(rng.standard_normal((2, 1, 16, 16, 3)).astype(np.float32)),
        "loss_mask": jnp.asarray(ids != 63),
    }
    model_record("vlm").batch_check(params, {k: np.asarray(v) for k, v in batch.items()})
    state, m = step(state, batch)
    assert np.isfinite(float(m["loss"]))


@pytest.mark.parametrize("name", ["paligemma", "paligemma2"])
def test_paligemma_greedy_generation_matches_hf(ckpts, name, tmp_path):
    """20 greedy tokens after an image + prompt prefix (prefix-LM prefill), as HF ``generate``."""
    from vla_foundry_jax.models.generation import generate

    hf = sharpened(ckpts[name][1], tmp_path / name)
    model = loaded(VLMHFParams(hf_pretrained=str(tmp_path / name)))
    ids, _, images = _inputs(prompt=(4, 4), suffix=0, seed=5)
    tt = np.zeros_like(ids)  # the whole prompt is the prefix
    ref = hf_greedy(
        hf,
        input_ids=torch.from_numpy(ids),
        pixel_values=torch_images(images),
        token_type_ids=torch.from_numpy(tt),
        attention_mask=torch.ones(ids.shape, dtype=torch.long),
    )
    got = generate(model, ids, max_new_tokens=20, temperature=0.0, pixel_values=images[:, None], token_type_ids=tt)
    np.testing.assert_array_equal(np.asarray(got), ref)
    assert len(np.unique(ref[:, ids.shape[1] :])) > 4  # not a degenerate repeat
    causal = np.asarray(generate(model, ids, max_new_tokens=20, temperature=0.0, pixel_values=images[:, None]))
    assert (causal[:, ids.shape[1] :] != ref[:, ids.shape[1] :]).any()  # the prefix-LM prefill matters
