"""Import of the original's (PyTorch VLA Foundry) experiments and export back.

Each model type: a tiny torch model with the original's module names and maths (tests/fixtures/foundry_torch.py)
is saved with ``torch.save`` in the original's experiment layout, imported, rebuilt from the run with
``sampling.load_run_model`` and its outputs compared with the torch model's (float32, 1e-4); export writes a
``.pt`` that ``torch.load(weights_only=True)`` reads back with tensors identical to the original's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import yaml
from flax import nnx

from tests.fixtures import foundry_torch as ft
from tests.fixtures.hf_checkpoints import IMAGE_TOKEN, paligemma_config, save_causal_lm, save_perturbed, torch_images
from vla_foundry_jax import gin_utils
from vla_foundry_jax.apps.foundry_import import FoundryImportError, export_foundry, import_foundry, resolve_source
from vla_foundry_jax.convert.foundry_maps import FoundryMapError
from vla_foundry_jax.convert.torch_pickle import TorchPickleError
from vla_foundry_jax.errors import VLAFoundryError
from vla_foundry_jax.models import build_model
from vla_foundry_jax.params import params_from_dict
from vla_foundry_jax.sampling import load_run_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4

TRANSFORMER = {
    "type": "transformer",
    "hidden_dim": 16,
    "n_layers": 2,
    "n_heads": 2,
    "vocab_size": 40,
    "max_seq_len": 64,
    "qk_norm": True,
    "post_embed_norm": True,
}
VIT = {"type": "vit", "img_size": 16, "patch_size": 4, "hidden_dim": 16, "inter_dim": 32, "n_heads": 2, "n_layers": 2}


def _sd(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _roundtrip(run: str, out: str, original: dict[str, torch.Tensor], folded: str | None = None) -> dict:
    """Export ``run`` to ``out``: the same names and identical tensors as ``original``, except names containing
    ``folded`` (Gemma's RMSNorm weights, kept here as ``1 + w``: ``(1 + w) - 1`` is within one float32 ulp of 1)."""
    export_foundry(run, out)
    config = yaml.safe_load(open(os.path.join(out, "config.yaml")))
    (name,) = os.listdir(os.path.join(out, "checkpoints"))
    ckpt = torch.load(os.path.join(out, "checkpoints", name), weights_only=True)
    sd = ckpt["state_dict"]
    assert sorted(sd) == sorted(original)
    for k, v in original.items():
        assert sd[k].dtype == v.dtype, k
        if folded is not None and folded in k:
            torch.testing.assert_close(sd[k], v, atol=1.2e-7, rtol=0)
        else:
            assert torch.equal(sd[k], v), k
    return {"config": config, "ckpt": ckpt, "name": name}


@pytest.mark.parametrize("tied", [False, True])
def test_transformer_logits_and_roundtrip(tmp_path, tied):
    cfg = dict(TRANSFORMER, weight_tying=tied)
    ref = ft.randomize(ft.Transformer(cfg), 0)
    src = ft.write_experiment(str(tmp_path / "exp"), cfg, {9: _sd(ft.randomize(ft.Transformer(cfg), 1)), 10: _sd(ref)})
    summary = import_foundry(src, str(tmp_path / "run"))
    assert summary["checkpoint"] == "checkpoint_10.pt"  # natural sort: 10 after 9
    assert (summary["global_step"], summary["samples_seen"]) == (100, 640)
    meta = json.load(open(tmp_path / "run" / "foundry_import.json"))
    assert meta["checkpoint_num"] == 10 and meta["datastrings"] == ["s3://bucket/data/manifest.jsonl"]
    for f in ("stats.json", "preprocessing_config.yaml", "foundry_config/config.yaml", "params.json"):
        assert os.path.isfile(tmp_path / "run" / f), f
    model, exp, _ = load_run_model(str(tmp_path / "run"))
    assert exp.model.weight_tying == tied and exp.hparams.lr == 1e-4
    gin_utils.parse_gin([str(tmp_path / "run" / "config.gin")], [])  # the run's config.gin gives its params
    assert gin_utils.build_experiment() == exp
    ids = np.random.default_rng(0).integers(0, 40, (2, 7))
    want = ref(torch.tensor(ids)).detach().numpy()
    got = np.asarray(model(jnp.asarray(ids, jnp.int32)).logits)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)
    # continuing from the imported run: a weights-only resume_from_checkpoint builds the same model
    resumed = params_from_dict(dict(cfg, resume_from_checkpoint=str(tmp_path / "run"), resume_weights_only=True))
    got = np.asarray(build_model(resumed, rngs=nnx.Rngs(1))(jnp.asarray(ids, jnp.int32)).logits)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)
    out = _roundtrip(str(tmp_path / "run"), str(tmp_path / "back"), _sd(ref))
    assert out["name"] == "checkpoint_10.pt"
    assert (out["ckpt"]["global_step"], out["ckpt"]["samples_seen"], out["ckpt"]["checkpoint_num"]) == (100, 640, 10)
    assert out["config"]["model"]["weight_tying"] == tied
    assert out["config"]["hparams"]["lr"] == 1e-4 and out["config"]["hparams"]["torchcompile"] is False


def test_gelu_transformer_ema(tmp_path):
    cfg = dict(TRANSFORMER, ffn_type="gelu", qk_norm=False, post_embed_norm=False)
    trained, averaged = ft.randomize(ft.Transformer(cfg), 0), ft.randomize(ft.Transformer(cfg), 1)
    src = ft.write_experiment(str(tmp_path / "exp"), cfg, {3: _sd(trained)}, ema={3: _sd(averaged)})
    import_foundry(src, str(tmp_path / "run"), checkpoint="checkpoint_3.pt", ema=True)
    model, _, _ = load_run_model(str(tmp_path / "run"))
    ids = np.arange(10).reshape(2, 5)
    np.testing.assert_allclose(
        np.asarray(model(jnp.asarray(ids, jnp.int32)).logits),
        averaged(torch.tensor(ids)).detach().numpy(),
        atol=TOL,
        rtol=TOL,
    )


@pytest.mark.parametrize("arch", ["llama_tied_gqa", "qwen2"])
def test_transformer_hf_logits_and_roundtrip(tmp_path, arch):
    path, hf = save_causal_lm(tmp_path, arch)
    cfg = {"type": "transformer_hf", "hf_pretrained": path}
    original = {f"model.{k}": v.clone() for k, v in hf.state_dict().items()}  # the original's TransformerHF.model
    src = ft.write_experiment(str(tmp_path / "exp"), cfg, {1: original})
    import_foundry(src, str(tmp_path / "run"))
    model, _, _ = load_run_model(str(tmp_path / "run"))
    ids = np.random.default_rng(0).integers(0, 160, (2, 6))
    want = hf(torch.tensor(ids)).logits.detach().numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids, jnp.int32)).logits), want, atol=TOL, rtol=TOL)
    _roundtrip(str(tmp_path / "run"), str(tmp_path / "back"), original)


def test_vlm_hf_paligemma_logits_and_roundtrip(tmp_path):
    from transformers import PaliGemmaForConditionalGeneration

    path, hf = save_perturbed(PaliGemmaForConditionalGeneration, paligemma_config(), str(tmp_path / "pg"))
    original = {f"model.{k}": v.clone() for k, v in hf.state_dict().items()}  # the original's VLMHF.model
    src = ft.write_experiment(str(tmp_path / "exp"), {"type": "vlm_hf", "hf_pretrained": path}, {1: original})
    import_foundry(src, str(tmp_path / "run"))
    model, _, _ = load_run_model(str(tmp_path / "run"))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 90, size=(2, 20))
    ids[:, :16] = IMAGE_TOKEN
    images = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
    want = hf(input_ids=torch.tensor(ids), pixel_values=torch_images(images)).logits.detach().numpy()
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(images[:, None])).logits)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)
    _roundtrip(str(tmp_path / "run"), str(tmp_path / "back"), original, folded="norm.weight")


@pytest.mark.parametrize("cls_flag", [False, True])
def test_vit_features_and_roundtrip(tmp_path, cls_flag):
    cfg = dict(VIT, cls_flag=cls_flag)
    ref = ft.randomize(ft.ViT(cfg), 2)
    src = ft.write_experiment(str(tmp_path / "exp"), cfg, {1: _sd(ref)})
    import_foundry(src, str(tmp_path / "run"))
    model, _, _ = load_run_model(str(tmp_path / "run"))
    images = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype(np.float32)
    want = ref(torch.tensor(images).permute(0, 3, 1, 2)).detach().numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(images), deterministic=True)), want, atol=TOL, rtol=TOL)
    _roundtrip(str(tmp_path / "run"), str(tmp_path / "back"), _sd(ref))


def test_import_from_s3(tmp_path, s3):
    """An experiment on S3 (moto server on loopback) imports as from a local directory: same features."""
    from vla_foundry_jax import paths

    ref = ft.randomize(ft.ViT(VIT), 6)
    local = ft.write_experiment(str(tmp_path / "exp"), VIT, {3: _sd(ref)})
    remote = f"{s3.bucket()}/experiments/vit"
    for root, _, files in os.walk(local):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), local)
            paths.write_bytes(f"{remote}/{rel}", open(os.path.join(root, name), "rb").read())
    summary = import_foundry(remote, str(tmp_path / "run"))
    assert summary["checkpoint"] == "checkpoint_3.pt" and "stats.json" in summary["files_copied"]
    model, _, _ = load_run_model(str(tmp_path / "run"))
    images = np.random.default_rng(2).normal(size=(1, 16, 16, 3)).astype(np.float32)
    want = ref(torch.tensor(images).permute(0, 3, 1, 2)).detach().numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(images), deterministic=True)), want, atol=TOL, rtol=TOL)


def _vlm_cfg() -> dict:
    lm = dict(TRANSFORMER, hidden_dim=32, vocab_size=50, qk_norm=False, post_embed_norm=False)
    vit = dict(VIT, projector_pixel_shuffle_factor=2)
    return {"type": "vlm", "vit": vit, "transformer": lm, "image_token_id": 49, "processor": None}


def test_vlm_logits_and_roundtrip(tmp_path):
    cfg = _vlm_cfg()
    ref = ft.randomize(ft.VLM(cfg), 3)
    # the original's training wrapped the model in torch.compile: its names start with _orig_mod.
    sd = {f"_orig_mod.{k}": v for k, v in _sd(ref).items()}
    src = ft.write_experiment(str(tmp_path / "exp"), cfg, {2: sd})
    import_foundry(src, str(tmp_path / "run"))
    model, _, _ = load_run_model(str(tmp_path / "run"))
    ids = np.array([[49] * 4 + [5, 6, 7], [49] * 4 + [8, 9, 1]])
    px = np.random.default_rng(2).normal(size=(2, 1, 16, 16, 3)).astype(np.float32)
    want = ref(torch.tensor(ids), torch.tensor(px[:, 0]).permute(0, 3, 1, 2)).detach().numpy()
    got = np.asarray(model(jnp.asarray(ids, jnp.int32), jnp.asarray(px)).logits)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)
    _roundtrip(str(tmp_path / "run"), str(tmp_path / "back"), _sd(ref))


@pytest.mark.parametrize("flow", [True, False])
def test_diffusion_policy_vit_backbone_prediction_and_roundtrip(tmp_path, flow):
    tcfg = dict(TRANSFORMER, vocab_size=7, is_causal=False, qk_norm=False, post_embed_norm=False)
    bb = dict(VIT, type="vit_backbone")
    cfg = {
        "type": "diffusion_policy",
        "vision_language_backbone": bb,
        "transformer": tcfg,
        "noise_scheduler": {"num_timesteps": 50, "beta_start": 0.0001, "beta_end": 0.02, "clamp_range": [-3, 3]},
        "use_flow_matching_scheduler": flow,
        "action_dim": 3,
        "proprioception_dim": 2,
    }
    ref = ft.randomize(ft.DiffusionPolicy(cfg, ddpm=not flow), 4)
    src = ft.write_experiment(str(tmp_path / "exp"), cfg, {5: _sd(ref)})
    import_foundry(src, str(tmp_path / "run"))
    model, _, _ = load_run_model(str(tmp_path / "run"))
    rng = np.random.default_rng(3)
    px = rng.normal(size=(2, 1, 16, 16, 3)).astype(np.float32)
    noisy = rng.normal(size=(2, 4, 3)).astype(np.float32)
    proprio = rng.normal(size=(2, 2, 2)).astype(np.float32)
    t = np.array([3, 41])
    want = ref(
        torch.tensor(px[:, 0]).permute(0, 3, 1, 2), torch.tensor(noisy), torch.tensor(t), torch.tensor(proprio)
    ).detach()
    got = model(None, jnp.asarray(px), jnp.asarray(noisy), jnp.asarray(t), proprioception=jnp.asarray(proprio))
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=TOL, rtol=TOL)
    # the denoiser's token table and head are never read: dropped on import, written back as zeros
    original = _sd(ref)
    for name in ("transformer.embeddings.weight", "transformer.output.weight"):
        original[name] = torch.zeros_like(original[name])
    _roundtrip(str(tmp_path / "run"), str(tmp_path / "back"), original)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # torch, on the vocab_size = 0 head
def test_diffusion_policy_vlm_foundry_backbone(tmp_path):
    vlm = _vlm_cfg()
    tcfg = dict(TRANSFORMER, vocab_size=0, is_causal=False, qk_norm=False, post_embed_norm=False)
    cfg = {
        "type": "diffusion_policy",
        "vision_language_backbone": {"type": "vlm_foundry_backbone", "num_vlm_layers_to_use": 2},
        "transformer": tcfg,
        "noise_scheduler": {"num_timesteps": 20, "beta_start": 0.0001, "beta_end": 0.02, "clamp_range": [-3, 3]},
        "use_flow_matching_scheduler": True,
        "action_dim": 3,
    }
    ref = ft.randomize(ft.DiffusionPolicy(cfg, ddpm=False, vlm=vlm), 5)
    src = ft.write_experiment(str(tmp_path / "exp"), cfg, {4: _sd(ref)})
    with open(os.path.join(src, "vlm_config_model.yaml"), "w") as f:
        yaml.safe_dump(vlm, f)  # as the original bundles a published VLA's backbone VLM
    import_foundry(src, str(tmp_path / "run"))
    model, exp, _ = load_run_model(str(tmp_path / "run"))
    assert exp.model.vision_language_backbone.vlm_experiment_dir == str(tmp_path / "run" / "backbone_vlm")
    rng = np.random.default_rng(4)
    ids = np.array([[49] * 4 + [5, 6], [49] * 4 + [7, 8]])
    px = rng.normal(size=(2, 1, 16, 16, 3)).astype(np.float32)
    noisy = rng.normal(size=(2, 4, 3)).astype(np.float32)
    t = np.array([0, 19])
    want = ref(
        torch.tensor(px[:, 0]).permute(0, 3, 1, 2), torch.tensor(noisy), torch.tensor(t), input_ids=torch.tensor(ids)
    ).detach()
    got = model(jnp.asarray(ids, jnp.int32), jnp.asarray(px), jnp.asarray(noisy), jnp.asarray(t))
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=TOL, rtol=TOL)
    out = _roundtrip(str(tmp_path / "run"), str(tmp_path / "back"), _sd(ref))
    assert out["config"]["model"]["vision_language_backbone"]["vlm_experiment_dir"] is None
    assert yaml.safe_load(open(tmp_path / "back" / "vlm_config_model.yaml"))["transformer"]["vocab_size"] == 50


# ------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def good_exp(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    return ft.write_experiment(str(root / "exp"), TRANSFORMER, {1: _sd(ft.randomize(ft.Transformer(TRANSFORMER), 0))})


def _expect(tmp_path, src, match, error=FoundryImportError, **kw):
    with pytest.raises(error, match=match):
        import_foundry(src, str(tmp_path / "run"), **kw)
    assert not os.path.exists(tmp_path / "run")
    assert not [n for n in os.listdir(tmp_path) if ".partial-" in n]


def test_missing_config_and_checkpoint(tmp_path, good_exp):
    os.makedirs(tmp_path / "noconfig" / "checkpoints")
    os.link(f"{good_exp}/checkpoints/checkpoint_1.pt", tmp_path / "noconfig" / "checkpoints" / "checkpoint_1.pt")
    _expect(tmp_path, str(tmp_path / "noconfig"), "no config.yaml")
    os.makedirs(tmp_path / "nockpt" / "checkpoints")
    _expect(tmp_path, str(tmp_path / "nockpt"), "holds no checkpoint_<N>.pt")
    _expect(tmp_path, good_exp, "is not in", checkpoint="checkpoint_7.pt")
    _expect(tmp_path, good_exp, "drop --ema", ema=True)
    with pytest.raises(FoundryImportError, match="does not exist"):
        resolve_source(str(tmp_path / "nowhere" / "exp"))
    assert resolve_source("TRI-ML/Foundry-LLM-1B-1T") == "hf://TRI-ML/Foundry-LLM-1B-1T"


def test_state_dict_mismatch_lists_names(tmp_path):
    sd = _sd(ft.randomize(ft.Transformer(TRANSFORMER), 0))
    sd["layers.0.extra.weight"] = torch.zeros(3)
    del sd["norm.bias"]
    sd["output.weight"] = torch.zeros(41, 16)
    src = ft.write_experiment(str(tmp_path / "exp"), TRANSFORMER, {1: sd})
    with pytest.raises(FoundryImportError) as e:
        import_foundry(src, str(tmp_path / "run"))
    text = str(e.value)
    assert "missing from the checkpoint (1): norm.bias" in text and "checkpoint_1.pt" in text
    assert "not used by the model (1): layers.0.extra.weight" in text
    assert "output.weight: checkpoint (41, 16) vs model (40, 16)" in text
    assert not os.path.exists(tmp_path / "run")


def test_unknown_and_unsupported_types(tmp_path, good_exp):
    src = ft.write_experiment(str(tmp_path / "a"), {"type": "mamba", "hidden_dim": 4}, {})
    os.link(f"{good_exp}/checkpoints/checkpoint_1.pt", f"{src}/checkpoints/checkpoint_1.pt")
    _expect(tmp_path, src, "mamba", error=VLAFoundryError)
    src = ft.write_experiment(str(tmp_path / "b"), {"type": "clip_openclip"}, {})
    os.link(f"{good_exp}/checkpoints/checkpoint_1.pt", f"{src}/checkpoints/checkpoint_1.pt")
    _expect(tmp_path, src, "not supported yet", error=FoundryMapError)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "launch.import_foundry", *args], cwd=REPO, env=env, capture_output=True, text=True
    )


def test_cli_refuses_truncated_and_malicious_checkpoints(tmp_path, good_exp):
    """One ``error:`` line, exit 2, no output directory; the malicious pickle's code never runs."""
    bad = ft.write_experiment(str(tmp_path / "bad"), TRANSFORMER, {})
    data = open(f"{good_exp}/checkpoints/checkpoint_1.pt", "rb").read()
    open(f"{bad}/checkpoints/checkpoint_2.pt", "wb").write(data[: len(data) // 2])
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"checkpoint_num": 3, "state_dict": {"x": Evil()}}, f"{bad}/checkpoints/checkpoint_3.pt")
    for name, match in (("checkpoint_2.pt", "truncated"), ("checkpoint_3.pt", "system")):
        out = tmp_path / f"run_{name}"
        proc = _cli(f"--source={bad}", f"--output_dir={out}", f"--checkpoint={name}")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and lines[-1].startswith("error: ") and match in lines[-1], proc.stderr
        assert "Traceback" not in proc.stderr and name in lines[-1]
        assert not out.exists() and not [n for n in os.listdir(tmp_path) if ".partial-" in n]
    assert not marker.exists()
    with pytest.raises(TorchPickleError):
        import_foundry(bad, str(tmp_path / "run"), checkpoint="checkpoint_3.pt")
    assert not marker.exists()
