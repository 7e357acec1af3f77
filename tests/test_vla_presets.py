"""The VLA presets (gin_configs/vla_*.gin, diffusion_policy.gin): the original's fields, and exact parameter counts.

Each preset parses and yields the original's model fields. Its backbone source (a Hugging Face hub id or a VLM run)
is then swapped for a tiny local one and the whole policy is built abstractly (``nnx.eval_shape``); the count must
equal hand arithmetic: the denoiser's blocks, the policy's heads and the backbone (HF backbones: the torch model's
own parameter count plus the action-token row).
"""

from __future__ import annotations

import os

import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.fixtures.hf_checkpoints import TINY_TEXT, idefics3_config, paligemma_config  # noqa: E402
from tests.fixtures.paths import ROOT  # noqa: E402
from vla_foundry_jax.gin_utils import build_experiment, parse_gin  # noqa: E402
from vla_foundry_jax.models import build_model  # noqa: E402
from vla_foundry_jax.params import TrainExperimentParams, TransformerParams, ViTParams, VLMParams  # noqa: E402
from vla_foundry_jax.training.loop import write_run_files  # noqa: E402
from vla_foundry_jax.training.state import count_params  # noqa: E402

SMOLVLM = "HuggingFaceTB/SmolVLM2-256M-Video-Instruct"
# preset -> (backbone type, backbone source, layers used, denoiser (H, L, nh, post_embed_norm, is_causal, vocab,
#            max_seq_len), clamp, conditioning, head repeats, input noise)
PRESETS = {
    "diffusion_policy": ("clip_backbone", "openai/clip-vit-base-patch32", None,
                         (512, 12, 8, True, False, 50432, 2048), (-3.0, 3.0), "concat", None, 0.0),
    "vla_diffusion_11m": ("vlm_backbone", SMOLVLM, 1,
                          (64, 2, 2, False, False, 50432, 128), (-3.0, 3.0), "concat", None, 0.0),
    "vla_diffusion_100m": ("vlm_foundry_backbone", None, 4,
                           (96, 8, 4, False, False, 50432, 2048), (-3.0, 3.0), "concat", None, 0.0),
    "vla_diffusion_1b": ("vlm_foundry_backbone", None, 4,
                         (512, 12, 8, True, False, 50432, 2048), (-3.0, 3.0), "concat", None, 0.0),
    "vla_diffusion_paligemma2": ("vlm_backbone", "google/paligemma-3b-pt-224", 4,
                                 (512, 12, 8, True, False, 50432, 2048), (-3.0, 3.0), "concat", None, 0.0),
    "vla_smolvlm_256m": ("vlm_backbone", SMOLVLM, 1,
                         (1024, 24, 16, False, False, 50432, 2048), (-1.5, 1.5), "add", 8, 0.05),
    "vla_smolvlm_foundry_backbone": ("vlm_foundry_backbone", None, 4,
                                     (1024, 24, 16, False, True, 0, 2048), (-1.5, 1.5), "add", 8, 0.05),
}  # fmt: skip
A, P = 7, 3  # action / proprioception dims (normally from the robotics data)
TEXT = dict(TINY_TEXT, num_hidden_layers=3)


def _torch_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Tiny local stand-ins for each backbone source: (binding, backbone parameter count, conditioning dim) by type."""
    root = tmp_path_factory.mktemp("presets")
    out = {}
    # CLIP: config only (the builder reads config.json); the count comes from the torch model of that config
    clip_cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=20),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=16, patch_size=4),
        projection_dim=24,
    )  # fmt: skip
    clip_cfg.save_pretrained(str(root / "clip"))
    out["clip_backbone"] = (
        f"clip_backbone.hf_pretrained = '{root / 'clip'}'",
        _torch_count(transformers.CLIPModel(clip_cfg)),
        24,
    )
    # SmolVLM (tied head): + one embedding row (the action token)
    smol = idefics3_config(TEXT, smolvlm=True, tie=True, pad_token_id=None)
    smol.save_pretrained(str(root / "smolvlm"))
    out["smolvlm"] = (
        f"vlm_backbone.hf_pretrained = '{root / 'smolvlm'}'",
        _torch_count(transformers.SmolVLMForConditionalGeneration(smol)) + 32,
        32,
    )
    # PaliGemma (Gemma, tied head): + one embedding row
    pali = paligemma_config(TEXT)
    pali.save_pretrained(str(root / "paligemma"))
    torch_pali = transformers.PaliGemmaForConditionalGeneration(pali)
    head = torch_pali.model.vision_tower.head  # SigLIP's pooling head: unused by PaliGemma, not built
    out["paligemma"] = (
        f"vlm_backbone.hf_pretrained = '{root / 'paligemma'}'",
        _torch_count(torch_pali) - _torch_count(head) + 32,
        32,
    )
    # a vlm run of ours (params.json is all the architecture needs); counted by hand
    Hv, I, p, img, s, H, L, V = 16, 32, 4, 16, 2, 32, 4, 100
    vit = ViTParams(
        img_size=img, patch_size=p, hidden_dim=Hv, inter_dim=I, n_heads=2, n_layers=1, projector_pixel_shuffle_factor=s
    )
    lm = TransformerParams(hidden_dim=H, n_layers=L, n_heads=2, vocab_size=V, max_seq_len=64)
    run = str(root / "vlm_run")
    write_run_files(run, TrainExperimentParams(model=VLMParams(vit=vit, transformer=lm, image_token_id=99)), None)
    n_p = (img // p) ** 2
    vit_count = (3 * p * p * Hv + Hv) + n_p * Hv + (4 * Hv + 3 * Hv * Hv + 3 * Hv + Hv * Hv + Hv + 2 * Hv * I + I + Hv)
    vit_count += 2 * Hv  # final layer norm
    lm_count = 2 * (V + 1) * H + _blocks(H, L) + 2 * H  # grown embedding + output tables, blocks, final norm
    out["vlm_foundry_backbone"] = (
        f"vlm_foundry_backbone.vlm_experiment_dir = '{run}'",
        vit_count + Hv * s * s * H + lm_count,
        H,
    )
    return out


def _blocks(H: int, L: int) -> int:
    """``transformer`` blocks (default layer norm, swiglu of width 256 * ceil(8H/3 / 256), no qk norm)."""
    F = 256 * ((int(8 * H / 3) + 255) // 256)
    return L * (4 * H + 4 * H * H + 3 * H * F)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_fields_and_parameter_count(preset, sources):
    bb_type, hf_id, n_layers, denoiser_fields, clamp, cond, repeats, noise_std = PRESETS[preset]
    H, L, nh, post_norm, causal, vocab, seq = denoiser_fields
    dims = ["diffusion_policy.action_dim = 7", "diffusion_policy.proprioception_dim = 3"]
    parse_gin([f"{preset}.gin"], dims)
    model = build_experiment().model
    bb, tp, ns = model.vision_language_backbone, model.transformer, model.noise_scheduler
    assert model.type == "diffusion_policy" and bb.type == bb_type
    assert (tp.type, tp.hidden_dim, tp.n_layers, tp.n_heads) == ("transformer", H, L, nh)
    assert (tp.post_embed_norm, tp.is_causal, tp.vocab_size, tp.max_seq_len) == (post_norm, causal, vocab, seq)
    assert (ns.num_timesteps, ns.beta_start, ns.beta_end, ns.clamp_range) == (1000, 0.0001, 0.02, clamp)
    assert model.use_flow_matching_scheduler and not model.use_diffusers_scheduler
    assert (model.diffusion_step_conditioning, model.num_action_head_repeats) == (cond, repeats)
    assert model.input_noise_std == noise_std and (model.action_dim, model.proprioception_dim) == (A, P)
    if hf_id is not None:
        assert bb.hf_pretrained == hf_id
    if bb_type == "clip_backbone":
        assert bb.disable_text is False
    else:
        assert bb.num_vlm_layers_to_use == n_layers and not bb.freeze
    if bb_type == "vlm_foundry_backbone":
        assert bb.resume_from_checkpoint is None and bb.vlm_experiment_dir is None  # named at launch

    key = {"vlm_backbone": "paligemma" if "paligemma" in preset else "smolvlm"}.get(bb_type, bb_type)
    binding, bb_count, width = sources[key]
    parse_gin([f"{preset}.gin"], [*dims, binding])
    model = build_experiment().model
    abstract = nnx.eval_shape(lambda: build_model(model, rngs=nnx.Rngs(0), load_weights=False))
    D = width * (n_layers or 1)
    assert abstract.vision_language_backbone.conditioning_dim == D
    # the policy builds its own transformer with one-row (never read) token tables: embedding + untied head = 2H
    denoiser = _blocks(H, L) + 2 * H + (2 * H if post_norm else 0) + 2 * H
    heads = 1000 * D + (A * H + H) + (D * H + H) + (P * H + H) + (H * A + A)
    assert count_params(nnx.state(abstract, nnx.Param)) == bb_count + denoiser + heads


def test_presets_document_their_use():
    root = os.path.join(ROOT, "gin_configs")
    for preset in PRESETS:
        with open(os.path.join(root, f"{preset}.gin")) as f:
            head = f.read().split("\ninclude", 1)[0]
        assert head.startswith(f"# {preset}: VLA Foundry preset config_presets/models/{preset}")
        assert "python -m launch.train --gin_file=gin_configs/" + preset + ".gin" in head
