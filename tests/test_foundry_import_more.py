"""Import of the original's experiments whose models hold Hugging Face / timm modules, and its stable diffusion.

As tests/test_foundry_import.py: a torch model with the original's module names (tests/fixtures/foundry_torch_more.py
around real HF / timm models) is saved with ``torch.save`` in the original's experiment layout, imported, rebuilt
with ``sampling.load_run_model`` and its outputs compared with the torch model's (float32, 1e-4); the export gives
back the original's names with identical tensors (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import copy
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import yaml

from tests.fixtures import foundry_torch as ft
from tests.fixtures import foundry_torch_more as ftm
from tests.fixtures.hf_checkpoints import IMAGE_TOKEN, paligemma_config, save_perturbed, tiny_clip_config, torch_images
from tests.fixtures.torchvision_standin import import_without_torchvision
from vla_foundry_jax.apps.foundry_import import export_foundry, import_foundry
from vla_foundry_jax.convert.foundry_maps import FoundryMapError
from vla_foundry_jax.sampling import load_run_model

TOL = 1e-4
LM = {"type": "transformer", "hidden_dim": 16, "n_layers": 2, "n_heads": 2, "vocab_size": 40, "max_seq_len": 64}
# the denoiser of a policy: bidirectional, no token table (vocab_size 0)
DENOISER = dict(LM, vocab_size=0, is_causal=False)
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # torch, on vocab_size 0


def _sd(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _roundtrip(run: str, out: str, original: dict[str, torch.Tensor], folded: str | None = None) -> dict:
    """Export ``run``: the original's names, dtypes and tensors, identical; except names containing ``folded``
    (Gemma's RMSNorm weights, held here as ``1 + w``: ``(1 + w) - 1`` is within one float32 ulp of 1)."""
    export_foundry(run, out)
    (name,) = os.listdir(os.path.join(out, "checkpoints"))
    sd = torch.load(os.path.join(out, "checkpoints", name), weights_only=True)["state_dict"]
    assert sorted(sd) == sorted(original)
    for k, v in original.items():
        assert sd[k].dtype == v.dtype, k
        if folded is not None and folded in k:
            torch.testing.assert_close(sd[k], v, atol=1.2e-7, rtol=0)
        else:
            assert torch.equal(sd[k], v), k
    return yaml.safe_load(open(os.path.join(out, "config.yaml")))


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter moved by noise (norm gains and biases included, so each tensor matters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _import(tmp_path, cfg: dict, original: dict[str, torch.Tensor]):
    src = ft.write_experiment(str(tmp_path / "exp"), cfg, {3: original})
    import_foundry(src, str(tmp_path / "run"))
    return load_run_model(str(tmp_path / "run"))


def _policy_cfg(backbone: dict, ddpm: bool) -> dict:
    return {
        "type": "diffusion_policy",
        "vision_language_backbone": backbone,
        "transformer": DENOISER,
        "noise_scheduler": {"num_timesteps": 20, "beta_start": 0.0001, "beta_end": 0.02, "clamp_range": [-3, 3]},
        "use_flow_matching_scheduler": not ddpm,
        "action_dim": 3,
    }


# ------------------------------------------------------------------------------------------ vlm with a vit_hf


def test_vlm_with_timm_vit_hf_logits_and_roundtrip(tmp_path):
    """``vit.model.`` + timm names (SigLIP-style: no class token, an attention-pool head the tower never reads,
    which the import keeps for the export)."""
    from safetensors.torch import save_file

    timm = import_without_torchvision("timm", "pip install --no-deps timm==1.0.31")
    args = {"depth": 2, "patch_size": 4, "img_size": 16, "mlp_ratio": 2.0, "embed_dim": 24, "num_heads": 2}
    torch.manual_seed(0)
    tower = _perturbed(timm.create_model("vit_base_patch32_siglip_256", num_classes=0, **args), 1)
    timm_dir = tmp_path / "timm"
    timm_dir.mkdir()
    arch = {"architecture": "vit_base_patch32_siglip_256", "num_classes": 0, "model_args": args}
    (timm_dir / "config.json").write_text(json.dumps(arch))
    save_file({k: v.contiguous() for k, v in tower.state_dict().items()}, str(timm_dir / "model.safetensors"))
    assert any(k.startswith("attn_pool.") for k in tower.state_dict())
    ref = ftm.VLMWithTimm(tower, LM, 24, image_token_id=39)
    ft.randomize(ref.transformer, 2)
    ft.randomize(ref.projection, 3)
    vit = {"type": "vit_hf", "hf_pretrained": str(timm_dir), "hidden_dim": 24}
    cfg = {"type": "vlm", "vit": vit, "transformer": LM, "image_token_id": 39, "processor": None}
    model, _, _ = _import(tmp_path, cfg, _sd(ref))
    ids = np.array([[39] * 16 + [5, 6, 7], [39] * 16 + [8, 9, 1]])
    px = np.random.default_rng(2).normal(size=(2, 1, 16, 16, 3)).astype(np.float32)
    want = ref(torch.tensor(ids), torch_images(px[:, 0])).detach().numpy()
    got = np.asarray(model(jnp.asarray(ids, jnp.int32), jnp.asarray(px)).logits)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)
    _roundtrip(str(tmp_path / "run"), str(tmp_path / "back"), _sd(ref))


# ------------------------------------------------------------------------------------------ policy backbones


def test_diffusion_policy_clip_backbone_prediction_and_roundtrip(tmp_path):
    """``vision_language_backbone._model.model.`` + HF ``CLIPModel`` names; DDPM scheduler buffers."""
    from transformers import CLIPModel

    torch.manual_seed(0)
    clip = _perturbed(CLIPModel(tiny_clip_config(image_size=16)), 4)
    clip.save_pretrained(str(tmp_path / "clip"))
    cfg = _policy_cfg({"type": "clip_backbone", "hf_pretrained": str(tmp_path / "clip")}, ddpm=True)
    ref = ftm.PolicyOver(cfg, ftm.CLIPConditioning(clip), D=8, ddpm=True)
    ft.randomize(ref.transformer, 5)
    for m in (ref.output_layer, ref.action_encode, ref.condition_encode, ref.time_encoding):
        ft.randomize(m, 6)
    model, _, _ = _import(tmp_path, cfg, _sd(ref))
    rng = np.random.default_rng(5)
    ids = np.array([[61, 5, 9, 62], [61, 7, 62, 63]])  # bos ... eos (pad after)
    px = rng.normal(size=(2, 1, 16, 16, 3)).astype(np.float32)
    noisy = rng.normal(size=(2, 4, 3)).astype(np.float32)
    t = np.array([2, 17])
    want = ref(torch.tensor(ids), torch_images(px[:, 0]), torch.tensor(noisy), torch.tensor(t)).detach().numpy()
    got = model(jnp.asarray(ids, jnp.int32), jnp.asarray(px), jnp.asarray(noisy), jnp.asarray(t))
    np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=TOL)
    _roundtrip(str(tmp_path / "run"), str(tmp_path / "back"), _sd(ref))


def test_diffusion_policy_vlm_backbone_prediction_and_roundtrip(tmp_path):
    """``vision_language_backbone._model.model.`` + HF PaliGemma names, the token table grown by the action row."""
    from transformers import PaliGemmaForConditionalGeneration

    path, hf = save_perturbed(PaliGemmaForConditionalGeneration, paligemma_config(), str(tmp_path / "pg"))
    backbone = {"type": "vlm_backbone", "hf_pretrained": path, "num_vlm_layers_to_use": 2}
    cfg = _policy_cfg(backbone, ddpm=False)
    ref = ftm.PolicyOver(cfg, ftm.VLMHFConditioning(copy.deepcopy(hf).eval(), 2), D=64, ddpm=False)
    ft.randomize(ref.transformer, 7)
    for m in (ref.output_layer, ref.action_encode, ref.condition_encode, ref.time_encoding):
        ft.randomize(m, 8)
    original = _sd(ref)
    assert original["vision_language_backbone._model.model.model.language_model.embed_tokens.weight"].shape[0] == 121
    model, _, _ = _import(tmp_path, cfg, original)
    rng = np.random.default_rng(6)
    ids = rng.integers(1, 90, size=(2, 20))
    ids[:, :16] = IMAGE_TOKEN
    px = rng.normal(size=(2, 1, 16, 16, 3)).astype(np.float32)
    noisy = rng.normal(size=(2, 4, 3)).astype(np.float32)
    t = np.array([0, 13])
    want = ref(torch.tensor(ids), torch_images(px[:, 0]), torch.tensor(noisy), torch.tensor(t)).detach().numpy()
    got = model(jnp.asarray(ids, jnp.int32), jnp.asarray(px), jnp.asarray(noisy), jnp.asarray(t))
    np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=TOL)
    _roundtrip(str(tmp_path / "run"), str(tmp_path / "back"), original, folded="norm.weight")


# ------------------------------------------------------------------------------------------ stable diffusion


UNET = {"channels": [8, 16, 16], "image_size": 8, "time_emb_dim": 8, "in_channels": 3, "out_channels": 3}


def test_stable_diffusion_unet_and_clip_prediction_and_roundtrip(tmp_path):
    """``unet.`` (the original's own UNet: every level kind, the transposed-conv upsamplers, ``time_mlp.0.emb``),
    ``clip.model.`` + HF ``CLIPModel`` names, DDPM buffers under ``scheduler.``."""
    from transformers import CLIPModel

    torch.manual_seed(1)
    clip = _perturbed(CLIPModel(tiny_clip_config()), 9)
    clip.save_pretrained(str(tmp_path / "clip"))
    unet = dict(UNET, text_emb_dim=16)
    cfg = {
        "type": "stable_diffusion",
        "unet": unet,
        "noise_scheduler": {"num_timesteps": 30, "beta_start": 0.0001, "beta_end": 0.02, "clamp_range": [-1.5, 1.5]},
        "clip": {"type": "clip_hf", "hf_pretrained": str(tmp_path / "clip")},
    }
    ref = ftm.StableDiffusion(cfg, clip, ddpm=True)
    _perturbed(ref.unet, 10)
    model, _, _ = _import(tmp_path, cfg, _sd(ref))
    rng = np.random.default_rng(7)
    x = rng.uniform(-1, 1, size=(2, 8, 8, 3)).astype(np.float32)
    t = np.array([3, 28])
    ids = np.array([[61, 5, 9, 62, 63], [61, 7, 62, 63, 63]])
    mask = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    want = ref.denoise(torch_images(x), torch.tensor(t), torch.tensor(ids), torch.tensor(mask))
    text = model.encode_text(jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    got = np.asarray(model(jnp.asarray(x), jnp.asarray(t), text))
    np.testing.assert_allclose(got, want.detach().permute(0, 2, 3, 1).numpy(), atol=TOL, rtol=TOL)
    _roundtrip(str(tmp_path / "run"), str(tmp_path / "back"), _sd(ref))


def test_stable_diffusion_with_diffusers_unet_is_refused(tmp_path):
    cfg = {"type": "stable_diffusion", "unet": dict(UNET, text_emb_dim=0), "use_diffusers_unet": True}
    src = ft.write_experiment(str(tmp_path / "exp"), cfg, {1: {"unet.model.conv_in.weight": torch.zeros(1)}})
    with pytest.raises(FoundryMapError, match="use_diffusers_unet"):
        import_foundry(src, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")
