"""``vit_hf`` from timm-format checkpoints (the original's ``vit_hf`` is a timm model); timm itself is the oracle.

timm's package import pulls torchvision (no working CPU build here) for its data transforms and a few layers the
ViT does not use, so :func:`_import_timm` puts inert stand-ins for exactly the torchvision modules it imports into
``sys.modules`` while importing it and removes them after (tests/fixtures/torchvision_standin.py).
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from tests.fixtures.torchvision_standin import import_without_torchvision  # noqa: E402
from tests.fixtures.weights import loaded  # noqa: E402

pytest.importorskip("safetensors")

from vla_foundry_jax.configs import hf_vision as hf_vision_configs  # noqa: E402
from vla_foundry_jax.configs.hf_decoder import UnsupportedArchitectureError  # noqa: E402
from vla_foundry_jax.models import build_model  # noqa: E402
from vla_foundry_jax.models.vlm import image_tokens_per_image  # noqa: E402
from vla_foundry_jax.params.model_params import TransformerParams, ViTHFParams, VLMParams  # noqa: E402

TINY = {"depth": 2, "patch_size": 4, "img_size": 16, "mlp_ratio": 2.0}
# (timm architecture, model_args written to config.json); heads / activation / LayerNorm eps not given here come
# from the architecture (timm's registry for the oracle, TIMM_ARCHITECTURES for us).
CASES = {
    # SigLIP: no class token, attention-pool head (skipped), gelu_tanh and 12 heads from the architecture
    "siglip_map": ("vit_base_patch32_siglip_256", dict(TINY, embed_dim=48)),
    # classic ViT: class token, position embedding over it, exact GELU
    "cls_token": ("vit_tiny_patch16_224", dict(TINY, embed_dim=24, num_heads=2)),
    # CLIP layout (pre-norm, bias-free patch projection, eps 1e-5) + register tokens outside the position embedding
    "clip_reg_no_embed_class": (
        "vit_base_patch16_clip_224",
        dict(TINY, embed_dim=48, reg_tokens=2, no_embed_class=True, qkv_bias=False, act_layer="quick_gelu"),
    ),
    # global average pool: fc_norm replaces the final norm, so the tokens come out un-normed
    "reg4_gap": ("vit_base_patch16_reg4_gap_256", dict(TINY, embed_dim=48)),
}


def _import_timm():
    return import_without_torchvision("timm", "pip install --no-deps timm==1.0.31")


def _save_timm(root, name: str, arch: str, model_args: dict, seed: int = 0):
    """A random timm model built by ``timm.create_model`` saved as a timm hub directory; returns (dir, model)."""
    from safetensors.torch import save_file

    timm = _import_timm()
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=0, **model_args).eval()
    with torch.no_grad():  # LayerNorms start at 1 / 0 and biases at 0: perturb everything so each tensor matters
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = root / name
    path.mkdir()
    config = {
        "architecture": arch,
        "num_classes": 0,
        "model_args": model_args,
        "pretrained_cfg": {"input_size": [3, model_args["img_size"], model_args["img_size"]]},
    }
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    return str(path), model


@pytest.fixture(scope="module")
def timm_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("timm")
    return {name: _save_timm(root, name, arch, args) for name, (arch, args) in CASES.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_timm_vit_tokens_match_forward_intermediates(timm_ckpts, case):
    path, ref_model = timm_ckpts[case]
    assert hf_vision_configs.is_timm_checkpoint(path)
    width = CASES[case][1]["embed_dim"]
    model = loaded(ViTHFParams(hf_pretrained=path, hidden_dim=width))
    c = model.config
    assert (c.family, c.num_heads) == ("timm", ref_model.blocks[0].attn.num_heads)
    images = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        ref = ref_model.forward_intermediates(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))[0].numpy()
    assert model.num_tokens == ref.shape[1] == 16 + ref_model.num_prefix_tokens
    out = np.asarray(model(jnp.asarray(images)))
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)  # tight enough to see a wrong LayerNorm eps
    multi = np.asarray(model(jnp.asarray(np.stack([images, images[::-1]], axis=1))))  # [B, N, h, w, 3]
    np.testing.assert_allclose(multi[:, 0], ref, atol=1e-5, rtol=0)


def test_timm_vit_in_a_vlm_with_pixel_shuffle(timm_ckpts):
    path, _ = timm_ckpts["siglip_map"]
    vit = ViTHFParams(hf_pretrained=path, hidden_dim=48, projector_pixel_shuffle_factor=2)
    params = VLMParams(
        vit=vit,
        transformer=TransformerParams(hidden_dim=32, n_layers=1, n_heads=2, vocab_size=64, max_seq_len=32),
        image_token_id=63,
    )
    assert image_tokens_per_image(params) == 4  # 4x4 patch grid, shuffled by 2
    model = build_model(params, rngs=nnx.Rngs(0))
    ids = np.full((1, 8), 5, np.int32)
    ids[0, 1:5] = 63
    out = model(jnp.asarray(ids), jnp.zeros((1, 1, 16, 16, 3), jnp.float32))
    assert out.logits.shape == (1, 8, 64)


def test_timm_errors(timm_ckpts, tmp_path):
    path, model = timm_ckpts["cls_token"]
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "model.safetensors").write_bytes(open(f"{path}/model.safetensors", "rb").read())
    (unknown / "config.json").write_text(json.dumps({"architecture": "my_vit", "model_args": {"img_size": 16}}))
    with pytest.raises(UnsupportedArchitectureError, match='"num_heads": N'):
        hf_vision_configs.timm_vision_config(str(unknown))
    (unknown / "config.json").write_text(json.dumps({"architecture": "my_vit", "model_args": {"num_heads": 2}}))
    assert hf_vision_configs.timm_vision_config(str(unknown)).image_size == 16  # from the position-embedding grid

    _, _ = _save_timm(tmp_path, "layer_scale", "vit_tiny_patch16_224", dict(TINY, embed_dim=24, init_values=0.1))
    with pytest.raises(UnsupportedArchitectureError, match=r"layer scale .*blocks\.0\.ls1\.gamma"):
        hf_vision_configs.timm_vision_config(str(tmp_path / "layer_scale"))

    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(open(f"{path}/config.json").read())
    state = {k: v for k, v in model.state_dict().items() if k != "norm.bias"}
    state["blocks.0.extra.weight"] = torch.zeros(3)
    save_file({k: v.contiguous() for k, v in state.items()}, str(bad / "model.safetensors"))
    params = ViTHFParams(hf_pretrained=str(bad), hidden_dim=24)
    # norm.bias gone: the model still has a final norm (norm.weight present), so it is missing
    with pytest.raises(ValueError, match=r"(?s)missing from the checkpoint \(1\): norm\.bias.*blocks\.0\.extra"):
        loaded(params)
