"""``vit_hf`` (SigLIP / CLIP vision towers) and ``clip_hf``: parity with HF PyTorch, strict loading, freezing."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.fixtures.hf_checkpoints import torch_images  # noqa: E402
from tests.fixtures.training import clip_step_with_frozen_towers  # noqa: E402
from tests.fixtures.weights import loaded, perturb_and_save  # noqa: E402
from vla_foundry_jax.configs.hf_hub import HFLoadError  # noqa: E402
from vla_foundry_jax.models import build_model  # noqa: E402
from vla_foundry_jax.params.model_params import CLIPHFParams, ViTHFParams  # noqa: E402
from vla_foundry_jax.training.state import frozen_prefixes  # noqa: E402

VISION = dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=4
)
TEXT = dict(
    hidden_size=24,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=2,
    vocab_size=100,
    max_position_embeddings=12,
    eos_token_id=99,
    bos_token_id=98,
    pad_token_id=1,
)
ATOL = 1e-4


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from transformers import (
        CLIPConfig,
        CLIPModel,
        CLIPVisionConfig,
        CLIPVisionModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    siglip = SiglipVisionModel(SiglipVisionConfig(**VISION))
    clip_vision = CLIPVisionModel(CLIPVisionConfig(**VISION))
    clip = CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16))
    return {
        "siglip": (perturb_and_save(siglip, root / "siglip"), siglip),
        "clip_vision": (perturb_and_save(clip_vision, root / "clip_vision"), clip_vision),
        "clip": (perturb_and_save(clip, root / "clip"), clip),
    }


def _images(b=2, seed=0):
    return np.random.default_rng(seed).standard_normal((b, 16, 16, 3)).astype(np.float32)


def test_siglip_vision_matches_hf_last_hidden_state(ckpts):
    path, hf = ckpts["siglip"]
    model = loaded(ViTHFParams(hf_pretrained=path, hidden_dim=32))
    images = _images()
    with torch.no_grad():
        ref = hf(pixel_values=torch_images(images)).last_hidden_state.numpy()
    out = np.asarray(model(jnp.asarray(images)))
    assert out.shape == (2, 16, 32)  # (16 / 4)^2 patches, no class token
    np.testing.assert_allclose(out, ref, atol=ATOL)
    multi = np.asarray(model(jnp.asarray(np.stack([images, images[::-1]], axis=1))))  # [B, N, h, w, 3]
    assert multi.shape == (2, 2, 16, 32)
    np.testing.assert_allclose(multi[:, 0], ref, atol=ATOL)


def test_clip_vision_returns_post_layernormed_tokens(ckpts):
    path, hf = ckpts["clip_vision"]
    model = loaded(ViTHFParams(hf_pretrained=path, hidden_dim=32))
    images = _images()
    with torch.no_grad():
        hf_out = hf(pixel_values=torch_images(images))
        # HF's last_hidden_state is the encoder output before post_layernorm (it norms only the pooled token).
        ref = hf.post_layernorm(hf_out.last_hidden_state).numpy()
    out = np.asarray(model(jnp.asarray(images)))
    assert out.shape == (2, 17, 32)  # class token + 16 patches
    np.testing.assert_allclose(out, ref, atol=ATOL)
    np.testing.assert_allclose(out[:, 0], hf_out.pooler_output.numpy(), atol=ATOL)


def test_vit_hf_also_reads_the_vision_tower_of_a_full_clip_checkpoint(ckpts):
    path, hf = ckpts["clip"]
    model = loaded(ViTHFParams(hf_pretrained=path, hidden_dim=32))
    images = _images()
    with torch.no_grad():
        ref = hf.vision_model(pixel_values=torch_images(images)).pooler_output.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(images)))[:, 0], ref, atol=ATOL)


def _text_batch():
    ids = np.array([[98, 5, 6, 7, 99, 1, 1, 1], [98, 9, 10, 11, 12, 13, 14, 99], [98, 99, 1, 1, 1, 1, 1, 1]])
    return ids.astype(np.int32), (ids != 1).astype(np.int32)


def test_clip_model_matches_hf(ckpts):
    path, hf = ckpts["clip"]
    model = loaded(CLIPHFParams(hf_pretrained=path))
    ids, mask = _text_batch()
    images = _images(b=2)
    with torch.no_grad():
        ref = hf(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=torch.from_numpy(mask).long(),
            pixel_values=torch_images(images),
        )
    out = model(jnp.asarray(ids), jnp.asarray(images), jnp.asarray(mask))
    for name in ("text_embeds", "image_embeds", "logits_per_image", "logits_per_text"):
        np.testing.assert_allclose(np.asarray(out[name]), getattr(ref, name).numpy(), atol=ATOL, err_msg=name)
    assert out["logits_per_image"].shape == (2, 3)
    # Pads follow the EOS and attention is causal: the pooled text does not depend on the mask.
    no_mask = model(jnp.asarray(ids), None)
    np.testing.assert_allclose(np.asarray(no_mask["text_embeds"]), np.asarray(out["text_embeds"]), atol=1e-5)
    assert set(no_mask) == {"text_embeds", "text_pooled"}


def test_freeze_flags_keep_towers_out_of_the_optimizer(ckpts):
    path, _ = ckpts["clip"]
    assert frozen_prefixes(CLIPHFParams(hf_pretrained=path, freeze_text_encoder=True)) == [("text_model",)]
    params = CLIPHFParams(hf_pretrained=path, freeze_text_encoder=True, freeze_image_encoder=True)
    assert frozen_prefixes(params) == [("text_model",), ("vision_model",)]
    ids, mask = _text_batch()
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "pixel_values": _images(b=3)}
    trainable_before, state = clip_step_with_frozen_towers(params, batch)
    for a, b in zip(jax.tree.leaves(trainable_before), jax.tree.leaves(state["params"]), strict=True):
        assert not np.array_equal(a, b)  # both projections and logit_scale moved


def test_symmetric_infonce_value():
    from vla_foundry_jax.models.clip import clip_contrastive_loss

    logits = jnp.asarray([[2.0, 0.0], [1.0, 3.0]])

    class Fake:
        def __call__(self, *args):
            return {"logits_per_text": logits}

    loss, _ = clip_contrastive_loss(Fake(), {"input_ids": None, "pixel_values": None})
    ls = jax.nn.log_softmax
    want = -0.5 * (np.mean([ls(logits)[0, 0], ls(logits)[1, 1]]) + np.mean([ls(logits.T)[0, 0], ls(logits.T)[1, 1]]))
    assert float(loss) == pytest.approx(float(want), rel=1e-6)


def test_wrong_image_size_and_hidden_dim_errors(ckpts):
    path, _ = ckpts["siglip"]
    with pytest.raises(ValueError, match=r"hidden_dim = 64 .* hidden_size = 32"):
        build_model(ViTHFParams(hf_pretrained=path, hidden_dim=64), rngs=nnx.Rngs(0))
    model = build_model(ViTHFParams(hf_pretrained=path, hidden_dim=32), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"expects 16x16 images .* got 24x24"):
        model(jnp.zeros((1, 24, 24, 3)))
    with pytest.raises(ValueError, match="channels-first"):
        model(jnp.zeros((1, 3, 16, 16)))


def test_strict_loading_lists_missing_unexpected_and_mismatched(ckpts, tmp_path):
    from safetensors.numpy import load_file, save_file

    path, _ = ckpts["siglip"]
    tensors = load_file(os.path.join(path, "model.safetensors"))
    del tensors["encoder.layers.1.mlp.fc2.bias"]
    tensors["encoder.layers.0.bogus.weight"] = np.zeros(3, np.float32)
    tensors["post_layernorm.weight"] = np.ones(31, np.float32)
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(os.path.join(path, "config.json"), bad / "config.json")
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(HFLoadError) as err:
        loaded(ViTHFParams(hf_pretrained=str(bad), hidden_dim=32))
    msg = str(err.value)
    assert "encoder.layers.1.mlp.fc2.bias" in msg and "missing" in msg
    assert "encoder.layers.0.bogus.weight" in msg and "not used" in msg
    assert "post_layernorm.weight: checkpoint (31,) vs model (32,)" in msg

    # A config with more layers than the tensors: every tensor of the absent layer is reported missing.
    config = json.loads((bad / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (bad / "config.json").write_text(json.dumps(config))
    save_file(load_file(os.path.join(path, "model.safetensors")), str(bad / "model.safetensors"))
    with pytest.raises(HFLoadError, match=r"missing from the checkpoint \(16\).*encoder\.layers\.2\."):
        loaded(ViTHFParams(hf_pretrained=str(bad), hidden_dim=32))


def test_text_pooling_follows_hf_eos_rules():
    from vla_foundry_jax.models.clip import CLIPTextConfig, CLIPTextTower

    fields = dict(hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, layer_norm_eps=1e-5)
    ids = jnp.asarray([[5, 7, 9, 7, 3], [9, 4, 9, 2, 2]])
    for eos, want in ((7, [1, 0]), (2, [2, 0])):  # first eos; legacy eos_token_id == 2: argmax of the ids
        c = CLIPTextConfig(
            **fields, activation="quick_gelu", vocab_size=10, max_position_embeddings=5, eos_token_id=eos
        )
        tower = CLIPTextTower(c, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
        hidden, pooled = tower(ids)
        np.testing.assert_array_equal(pooled, hidden[jnp.arange(2), jnp.asarray(want)])
    with pytest.raises(ValueError, match="max_position_embeddings = 5"):
        tower(jnp.zeros((1, 6), jnp.int32))
