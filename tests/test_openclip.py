"""``clip_openclip``: OpenCLIP checkpoints (safetensors) into our CLIP model; parity with open_clip itself.

open_clip's package import pulls torchvision (no working CPU build here) for its image transforms and
``FrozenBatchNorm2d``; the model code does not use them, so :func:`_import_open_clip` puts inert stand-in modules
for the torchvision modules it imports into ``sys.modules`` while importing it, and removes them after
(tests/fixtures/torchvision_standin.py).
"""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from tests.fixtures.torchvision_standin import import_without_torchvision  # noqa: E402
from tests.fixtures.training import clip_step_with_frozen_towers  # noqa: E402
from tests.fixtures.weights import loaded  # noqa: E402

pytest.importorskip("ftfy")
pytest.importorskip("safetensors")

from vla_foundry_jax.configs.hf_decoder import UnsupportedArchitectureError  # noqa: E402
from vla_foundry_jax.configs.hf_hub import HFLoadError  # noqa: E402
from vla_foundry_jax.configs.openclip import ARCHITECTURES, architecture_from_dict  # noqa: E402
from vla_foundry_jax.models import build_model  # noqa: E402
from vla_foundry_jax.params.model_params import CLIP_OpenCLIPParams  # noqa: E402
from vla_foundry_jax.training.state import frozen_prefixes  # noqa: E402

EMBED, IMG, CTX, VOCAB = 16, 16, 12, 100
CONFIG = {
    "embed_dim": EMBED,
    "vision_cfg": {"image_size": IMG, "layers": 2, "width": 32, "patch_size": 4, "head_width": 8},
    "text_cfg": {"context_length": CTX, "vocab_size": VOCAB, "width": 24, "heads": 2, "layers": 2},
}


def _import_open_clip():
    return import_without_torchvision("open_clip", "pip install --no-deps open_clip_torch==3.3.0")


def _open_clip_model(config, seed=0):
    open_clip = _import_open_clip()
    torch.manual_seed(seed)
    model = open_clip.CLIP(
        config["embed_dim"],
        open_clip.CLIPVisionCfg(**config["vision_cfg"]),
        open_clip.CLIPTextCfg(**config["text_cfg"]),
        quick_gelu=config.get("quick_gelu", False),
    ).eval()
    with torch.no_grad():  # random everything (LayerNorms and biases start at 1 / 0; text_projection is empty)
        for p in model.parameters():
            p.copy_(p + 0.1 * torch.randn_like(p) if p.ndim else torch.tensor(math.log(1 / 0.07) + 0.3))
    return model


def _write(tmp_path, config, state_dict, name="model"):
    from safetensors.torch import save_file

    arch = tmp_path / f"{name}.json"
    arch.write_text(json.dumps(config))
    weights = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(weights))
    return str(arch), str(weights)


def _batch(b=3, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(b, IMG, IMG, 3)).astype(np.float32)
    ids = np.zeros((b, CTX), np.int64)  # OpenCLIP tokens: SOT ... EOT (the largest id), then zero padding
    for i, n in enumerate((4, 7, CTX)[:b]):
        ids[i, : n - 1] = rng.integers(1, VOCAB - 1, size=n - 1)
        ids[i, n - 1] = VOCAB - 1
    return images, ids


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_embeddings_match_open_clip(tmp_path, quick_gelu):
    config = {**CONFIG, "quick_gelu": quick_gelu}
    ref = _open_clip_model(config)
    arch, weights = _write(tmp_path, config, ref.state_dict())
    model = loaded(CLIP_OpenCLIPParams(architecture=arch, pretrained_weights=weights))
    images, ids = _batch()
    with torch.no_grad():
        ref_img = ref.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2), normalize=True).numpy()
        ref_txt = ref.encode_text(torch.from_numpy(ids), normalize=True).numpy()
        ref_logits = (ref.logit_scale.exp() * torch.from_numpy(ref_img) @ torch.from_numpy(ref_txt).T).numpy()
    out = model(jnp.asarray(ids), jnp.asarray(images))
    np.testing.assert_allclose(np.asarray(out["image_embeds"]), ref_img, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(out["text_embeds"]), ref_txt, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(out["logits_per_image"]), ref_logits, atol=1e-4, rtol=1e-5)
    # Unnormalised projections too (OpenCLIP's encode_* without normalize).
    with torch.no_grad():
        raw = ref.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    ours = np.asarray(model.visual_projection(model.encode_images(jnp.asarray(images))["image_pooled"]))
    np.testing.assert_allclose(ours, raw, atol=1e-5, rtol=0)


def test_strict_loading_names_the_tensors(tmp_path):
    ref = _open_clip_model(CONFIG)
    sd = dict(ref.state_dict())
    sd.pop("visual.transformer.resblocks.1.attn.in_proj_bias")
    sd["visual.extra_head.weight"] = torch.zeros(2)
    arch, weights = _write(tmp_path, CONFIG, sd)
    with pytest.raises(HFLoadError) as e:
        loaded(CLIP_OpenCLIPParams(architecture=arch, pretrained_weights=weights))
    assert "visual.transformer.resblocks.1.attn.in_proj_bias" in str(e.value)
    assert "visual.extra_head.weight" in str(e.value)
    # A checkpoint of another size: shape mismatches are listed.
    other = {**CONFIG, "embed_dim": 8}
    _, weights = _write(tmp_path, other, _open_clip_model(other).state_dict(), "other")
    with pytest.raises(HFLoadError, match=r"text_projection: checkpoint \(24, 8\)"):
        loaded(CLIP_OpenCLIPParams(architecture=arch, pretrained_weights=weights))


def test_architecture_table_and_unsupported_configs():
    c = ARCHITECTURES["ViT-B-32"].to_clip_config()
    assert (c.vision.hidden_size, c.vision.num_heads, c.vision.intermediate_size, c.vision.patch_size) == (
        768,
        12,
        3072,
        32,
    )
    assert (c.text.hidden_size, c.text.num_heads, c.text.num_layers, c.projection_dim) == (512, 8, 12, 512)
    assert c.vision.activation == "gelu" and ARCHITECTURES["ViT-B-32-quickgelu"].quick_gelu
    params = CLIP_OpenCLIPParams(architecture="ViT-B-32")
    shapes = nnx.eval_shape(lambda: build_model(params, rngs=nnx.Rngs(0), load_weights=False))
    assert shapes.vision_model.embeddings.position_embedding.shape == (50, 768)
    with pytest.raises(UnsupportedArchitectureError, match="timm_model_name"):
        architecture_from_dict({"embed_dim": 8, "vision_cfg": {"timm_model_name": "vit_base"}, "text_cfg": {}})
    with pytest.raises(UnsupportedArchitectureError, match="pool_type"):
        architecture_from_dict({"embed_dim": 8, "vision_cfg": {}, "text_cfg": {"pool_type": "eos"}})
    with pytest.raises(UnsupportedArchitectureError, match="not a known OpenCLIP architecture"):
        build_model(CLIP_OpenCLIPParams(architecture="ViT-Q-99"), rngs=nnx.Rngs(0))


def test_freeze_flags_keep_towers_out_of_the_optimizer(tmp_path):
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(CONFIG))
    assert frozen_prefixes(CLIP_OpenCLIPParams(architecture=str(arch), freeze_image_encoder=True)) == [
        ("vision_model",)
    ]
    params = CLIP_OpenCLIPParams(architecture=str(arch), freeze_text_encoder=True, freeze_image_encoder=True)
    assert frozen_prefixes(params) == [("text_model",), ("vision_model",)]
    images, ids = _batch()
    clip_step_with_frozen_towers(params, {"input_ids": jnp.asarray(ids), "pixel_values": jnp.asarray(images)})
