"""``vlm`` with HF parts (SigLIP ``vit_hf`` + Llama ``transformer_hf``) and ``vlm_hf`` (PaliGemma 1 / 2) parity."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vla_foundry_jax import checkpoint as ckpt_lib  # noqa: E402
from vla_foundry_jax import parallel  # noqa: E402
from vla_foundry_jax.models import build_model, load_weights  # noqa: E402
from vla_foundry_jax.models.vlm import ImageTokenError, image_tokens_per_image  # noqa: E402
from vla_foundry_jax.params import DistributedParams, EMAParams, HyperParams  # noqa: E402
from vla_foundry_jax.params.model_params import TransformerHFParams, ViTHFParams, VLMHFParams, VLMParams  # noqa: E402
from vla_foundry_jax.registry import get_loss, model_record  # noqa: E402
from vla_foundry_jax.training.optimizer import make_optimizer  # noqa: E402
from vla_foundry_jax.training.state import init_train_state, make_model_spec  # noqa: E402
from vla_foundry_jax.training.step import make_train_step  # noqa: E402

ATOL = 1e-4
VISION = dict(
    hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4
)
GEMMA = dict(
    vocab_size=120,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=8,
    max_position_embeddings=64,
)
GEMMA2 = dict(
    GEMMA,
    num_hidden_layers=3,
    sliding_window=6,
    query_pre_attn_scalar=12,
    attn_logit_softcapping=5.0,
    final_logit_softcapping=3.0,
)
IMAGE_TOKEN = 100
N_IMG = (16 // 4) ** 2  # 16 image tokens per image


def _perturb_and_save(model, path) -> str:
    torch.manual_seed(0)
    with torch.no_grad():  # non-trivial norms and biases, so a mis-mapped tensor shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.eval().save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    root = tmp_path_factory.mktemp("vlm_hf")
    out = {}
    for name, text in (
        ("paligemma", dict(GEMMA, model_type="gemma")),
        ("paligemma2", dict(GEMMA2, model_type="gemma2")),
    ):
        cfg = PaliGemmaConfig(text_config=text, vision_config=VISION, image_token_index=IMAGE_TOKEN, projection_dim=32)
        cfg._attn_implementation = "eager"
        cfg.text_config._attn_implementation = "eager"
        cfg.vision_config._attn_implementation = "eager"
        torch.manual_seed(0)
        model = PaliGemmaForConditionalGeneration(cfg)
        out[name] = (_perturb_and_save(model, root / name), model)
    torch.manual_seed(1)
    siglip = SiglipVisionModel(SiglipVisionConfig(**VISION))
    out["siglip"] = (_perturb_and_save(siglip, root / "siglip"), siglip)
    llama_cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(2)
    llama = LlamaForCausalLM(llama_cfg)
    out["llama"] = (_perturb_and_save(llama, root / "llama"), llama)
    return out


def _loaded(params):
    model = build_model(params, rngs=nnx.Rngs(1))
    graphdef, p, rest = nnx.split(model, nnx.Param, ...)
    [p] = model_record(params.type).weight_loader(params, [p], "")
    return nnx.merge(graphdef, p, rest)


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
    model = _loaded(VLMHFParams(hf_pretrained=path))
    assert model.config.text.model_type == ("gemma" if name == "paligemma" else "gemma2")
    ids, tt, images = _inputs()
    with torch.no_grad():
        ref = hf(
            input_ids=torch.from_numpy(ids),
            pixel_values=torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),
            token_type_ids=torch.from_numpy(tt),
        ).logits.numpy()
        ref_causal = hf(
            input_ids=torch.from_numpy(ids),
            pixel_values=torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),
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
    model = _loaded(params)
    hp = HyperParams(precision="fp32")
    loss, _ = get_loss("vlm_hf")(model, {k: jnp.asarray(v) for k, v in batch.items()}, hparams=hp)
    with torch.no_grad():  # HF logits of the same prefix-LM pass on the inputs, CE over the suffix targets
        logits = hf(
            input_ids=torch.from_numpy(ids[:, :-1]),
            pixel_values=torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),
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


def _setup(model_params):
    hp = HyperParams(precision="fp32", lr=1e-3, warmup="0")
    mesh = parallel.make_mesh(DistributedParams(), jax.devices()[:1])
    spec = make_model_spec(model_params, hp, mesh)
    opt = make_optimizer(hp, 100)
    state = init_train_state(spec, opt, hp, use_ema=False)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    step = make_train_step(
        spec,
        get_loss(model_params.type),
        opt,
        hp,
        EMAParams(),
        accum_steps=1,
        total_steps=100,
        state_shardings=shardings,
    )
    return spec, state, step


def test_vlm_with_hf_vision_and_hf_llm(ckpts):
    vit = ViTHFParams(hf_pretrained=ckpts["siglip"][0], hidden_dim=24)
    lm = TransformerHFParams(hf_pretrained=ckpts["llama"][0])
    params = VLMParams(vit=vit, transformer=lm, image_token_id=63)
    assert image_tokens_per_image(params) == N_IMG
    assert image_tokens_per_image(params.replace(vit=vit.replace(projector_pixel_shuffle_factor=2))) == N_IMG // 4

    spec, state, step = _setup(params)
    # as the training loop does: each sub-model's weight loader runs with its prefix ("vit.", "transformer.")
    state["params"], state["frozen"] = load_weights(spec.params, [state["params"], state["frozen"]])
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


def _sharpened(model, path):
    """A copy of the HF ``model`` with every weight perturbed (peaked logits, varied greedy tokens), saved at
    ``path``."""
    import copy

    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():  # the embeddings stay small: tied, they favour repeats
            p.add_((0.02 if "embed_tokens" in name else 0.5) * torch.randn(p.shape, generator=gen))
    model.eval().save_pretrained(str(path))
    return model


@pytest.mark.parametrize("name", ["paligemma", "paligemma2"])
def test_paligemma_greedy_generation_matches_hf(ckpts, name, tmp_path):
    """20 greedy tokens after an image + prompt prefix (prefix-LM prefill), as HF ``generate``."""
    from vla_foundry_jax.models.generation import generate

    hf = _sharpened(ckpts[name][1], tmp_path / name)
    model = _loaded(VLMHFParams(hf_pretrained=str(tmp_path / name)))
    ids, _, images = _inputs(prompt=(4, 4), suffix=0, seed=5)
    tt = np.zeros_like(ids)  # the whole prompt is the prefix
    with torch.no_grad():
        ref = hf.generate(
            input_ids=torch.from_numpy(ids),
            pixel_values=torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),
            token_type_ids=torch.from_numpy(tt),
            attention_mask=torch.ones(ids.shape, dtype=torch.long),
            max_new_tokens=20,
            min_new_tokens=20,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        ).numpy()
    got = generate(model, ids, max_new_tokens=20, temperature=0.0, pixel_values=images[:, None], token_type_ids=tt)
    np.testing.assert_array_equal(np.asarray(got), ref)
    assert len(np.unique(ref[:, ids.shape[1] :])) > 4  # not a degenerate repeat
    causal = np.asarray(generate(model, ids, max_new_tokens=20, temperature=0.0, pixel_values=images[:, None]))
    assert (causal[:, ids.shape[1] :] != ref[:, ids.shape[1] :]).any()  # the prefix-LM prefill matters
