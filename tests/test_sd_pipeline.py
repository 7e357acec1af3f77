"""Stable diffusion end to end: SD batches from image_caption data, prompt truncation, config errors, the colour
classifier, sd_quickstart trained for a few steps (exact resume, EMA loading, sample_sd, eval_sd) and the train
step on 8 simulated CPU devices matching one device."""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from tests.fixtures.multidevice import assert_losses_match, last_json, losses_on_one_and_eight_devices, run
from tests.fixtures.paths import ROOT, TINY
from tests.fixtures.runs import logged_losses, train_command

CLIP = os.path.join(TINY, "tiny_clip")
STEPS = 6


def _bindings(out_dir: str, *, batch: int = 8, steps: int = STEPS) -> list[str]:
    """sd_quickstart shrunk to an 8x8 two-level UNet, logging every step."""
    return [
        "unet.channels = [8, 16]",
        "unet.image_size = 8",
        "unet.time_emb_dim = 8",
        f"clip_hf.hf_pretrained = '{CLIP}'",
        f"image_caption.dataset_manifest = ['{TINY}/shapes/train/manifest.jsonl']",
        f"image_caption.val_dataset_manifest = ['{TINY}/shapes/val/manifest.jsonl']",
        "image_caption.num_workers = 0",
        f"experiment.output_dir = '{out_dir}'",
        f"experiment.total_train_samples = {steps * batch}",
        "experiment.num_checkpoints = 2",
        "experiment.log_every_n_steps = 1",
        "experiment.async_checkpointing = False",
        f"hparams.global_batch_size = {batch}",
        f"hparams.per_gpu_batch_size = {batch}",
        "hparams.warmup = '2'",
    ]


def _experiment(out_dir: str, extra: list[str] = ()):
    from vla_foundry_jax import gin_utils

    gin_utils.parse_gin([os.path.join(ROOT, "gin_configs", "sd_quickstart.gin")], [*_bindings(out_dir), *extra])
    try:
        return gin_utils.build_experiment()
    finally:
        import gin

        gin.clear_config()


def _sd_data(**kw):
    from vla_foundry_jax.params import ImageCaptionDataParams

    base = dict(
        dataset_manifest=[f"{TINY}/shapes/train/manifest.jsonl"],
        processor="stable_diffusion",
        tokenizer=CLIP,
        image_size=16,
        seq_len=7,
        num_workers=0,
        allow_multiple_epochs=True,
    )
    return ImageCaptionDataParams(**{**base, **kw})


# ------------------------------------------------------------------------------------------------ data


def test_sd_batches_from_image_caption_data():
    from transformers import AutoTokenizer

    from vla_foundry_jax.data.image_caption import decode_sample
    from vla_foundry_jax.data.pipeline import build_eval_iterator, build_train_iterator
    from vla_foundry_jax.data.shards import ShardDataSource

    it = build_train_iterator(_sd_data(), global_batch_size=4, num_batches=2)
    batch = next(it)
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask"}
    assert batch["pixel_values"].shape == (4, 16, 16, 3) and batch["pixel_values"].dtype == np.float32
    assert batch["pixel_values"].min() >= -1.0 and batch["pixel_values"].max() <= 1.0
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, 8)
    # eval: no flip, so every row is the HF tokenizer's padded ids and PIL's resize of the stored image
    tok = AutoTokenizer.from_pretrained(CLIP)
    ev = next(iter(build_eval_iterator(_sd_data(), [f"{TINY}/shapes/val/manifest.jsonl"], global_batch_size=3)))
    src = ShardDataSource(f"{TINY}/shapes/val/manifest.jsonl")
    for row in range(3):
        sample = decode_sample(src[row])
        want = tok(sample["caption"], padding="max_length", max_length=8)
        np.testing.assert_array_equal(ev["input_ids"][row], want["input_ids"])
        np.testing.assert_array_equal(ev["attention_mask"][row], want["attention_mask"])
        pil = Image.fromarray(sample["image"]).resize((16, 16), Image.Resampling.BILINEAR)
        np.testing.assert_allclose(ev["pixel_values"][row], np.asarray(pil, np.float32) / 127.5 - 1, atol=1e-6)


def test_flip_mirrors_width_and_keeps_colours():
    from vla_foundry_jax.data.processor import StableDiffusionProcessor

    img = np.zeros((48, 48, 3), np.uint8)
    img[:, :24] = (215, 35, 35)  # red left half, blue right half
    img[:, 24:] = (35, 70, 215)
    proc = StableDiffusionProcessor(None, 16, 8, flip_prob=1.0)
    flipped = proc(img, "", np.random.default_rng(0), train=True)["pixel_values"]
    plain = proc(img, "", None, train=False)["pixel_values"]
    np.testing.assert_array_equal(flipped, plain[:, ::-1])
    red = np.array([215, 35, 35]) / 127.5 - 1
    np.testing.assert_allclose(flipped[:, -1], np.broadcast_to(red, (16, 3)), atol=1e-6)  # red moved right, still red
    # with p = 0.5 some samples are mirrored and some are not, each deterministic in its rng
    half = StableDiffusionProcessor(None, 16, 8)
    flips = [not np.array_equal(half(img, "", np.random.default_rng(s))["pixel_values"], plain) for s in range(20)]
    assert 0 < sum(flips) < 20


def test_prompt_truncation_matches_hf():
    from transformers import AutoTokenizer

    from vla_foundry_jax.data.processor import tokenize_prompts

    tok = AutoTokenizer.from_pretrained(CLIP)
    prompts = ["a red ball .", "the quick fox jumps over the lazy dog and the cat and the cow ."]
    ids, mask = tokenize_prompts(tok, prompts, 8)
    want = tok(prompts, padding="max_length", truncation=True, max_length=8)
    np.testing.assert_array_equal(ids, want["input_ids"])
    np.testing.assert_array_equal(mask, want["attention_mask"])
    assert ids[1, -1] == tok.eos_token_id and mask[1].all()  # truncated, still ending with eos


def test_sd_config_errors():
    from vla_foundry_jax.models import stable_diffusion as sd
    from vla_foundry_jax.params import ImageCaptionDataParams, ParamsError
    from vla_foundry_jax.params.model_params import CLIPHFParams, StableDiffusionParams, UNetParams
    from vla_foundry_jax.registry import model_record
    from vla_foundry_jax.training.resolve import resolve_stable_diffusion

    params = StableDiffusionParams(
        unet=UNetParams(channels=[8, 16], image_size=8, time_emb_dim=8, text_emb_dim=64),
        clip=CLIPHFParams(hf_pretrained=CLIP),
    )
    _, data = resolve_stable_diffusion(params, _sd_data(tokenizer=None, image_size=224))
    assert data.image_size == 8 and data.tokenizer == CLIP
    with pytest.raises(
        ParamsError, match=r"image_caption.seq_len = 20: .* 16 positions; set image_caption.seq_len <= 15"
    ):
        resolve_stable_diffusion(params, _sd_data(seq_len=20))
    with pytest.raises(ParamsError, match=r"image_caption\.processor = 'stable_diffusion'"):
        resolve_stable_diffusion(params, ImageCaptionDataParams(processor="tiny_data/vlm_processor"))
    with pytest.raises(ValueError, match=r"pixel_values \[B, 8, 8, 3\] .* got \(2, 16, 16, 3\)"):
        model_record("stable_diffusion").batch_check(
            params, {"pixel_values": np.zeros((2, 16, 16, 3)), "input_ids": np.zeros(2)}
        )
    with pytest.raises(ParamsError, match="do_classifier_free_guidance needs a text encoder"):
        sd.build_stable_diffusion(params.replace(clip=CLIPHFParams(), do_classifier_free_guidance=True), rngs=None)


def test_guidance_without_text_encoder_at_sampling():
    import jax
    from flax import nnx

    from vla_foundry_jax.models import stable_diffusion as sd
    from vla_foundry_jax.params import ParamsError
    from vla_foundry_jax.params.model_params import StableDiffusionParams, UNetParams

    params = StableDiffusionParams(unet=UNetParams(channels=[8], image_size=4, time_emb_dim=8, text_emb_dim=0))
    model = nnx.eval_shape(lambda: sd.build_stable_diffusion(params, rngs=nnx.Rngs(0)))  # both errors precede tracing
    with pytest.raises(ParamsError, match="guidance needs a text encoder"):
        sd.sample_images(model, None, jax.random.key(0), guidance_scale=3.0, batch_size=2)
    with pytest.raises(ValueError, match="no text encoder"):
        sd.sample_images(model, np.zeros((2, 8), np.int32), jax.random.key(0))


def test_color_classifier_on_real_images():
    from vla_foundry_jax.apps.sd_eval import classify_color
    from vla_foundry_jax.apps.stable_diffusion import images_to_uint8
    from vla_foundry_jax.data.image_caption import decode_sample
    from vla_foundry_jax.data.processor import StableDiffusionProcessor
    from vla_foundry_jax.data.shards import ShardDataSource
    from vla_foundry_jax.testbeds.tiny_datasets import SHAPE_COLORS

    src = ShardDataSource(f"{TINY}/shapes/val/manifest.jsonl")
    proc = StableDiffusionProcessor(None, 16, 8)
    hits = []
    for i in range(len(src)):
        sample = decode_sample(src[i])
        image = images_to_uint8(proc(sample["image"], "", None, train=False)["pixel_values"])
        hits.append(classify_color(image, SHAPE_COLORS) == sample["caption"].split()[1])
    assert np.mean(hits) >= 0.99, np.mean(hits)
    assert classify_color(np.full((16, 16, 3), 230, np.uint8), SHAPE_COLORS) is None  # background only


@pytest.mark.parametrize("k,s,p,h", [(4, 2, 1, 5), (3, 2, 1, 6), (5, 3, 1, 4)])
def test_upsampler_conv_matches_torch_conv_transpose(k, s, p, h):
    """The UNet's transposed conv (per-phase convolutions; dilated-conv fallback for unequal phases) equals
    torch's ConvTranspose2d, values and input gradient."""
    import jax
    import jax.numpy as jnp
    import torch

    from vla_foundry_jax.layers.conv import transposed_conv_by_phases as _transposed_conv_by_phases

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, h, h + 1, 6)).astype(np.float32)
    w = rng.normal(size=(6, 5, k, k)).astype(np.float32)  # torch [in, out, kh, kw]
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2)).requires_grad_()
    ref = torch.nn.functional.conv_transpose2d(xt, torch.from_numpy(w), stride=s, padding=p)
    (ref**2).sum().backward()
    kernel = jnp.asarray(np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(2, 3, 0, 1)))
    got = _transposed_conv_by_phases(jnp.asarray(x), kernel, s, p)
    np.testing.assert_allclose(got, ref.detach().numpy().transpose(0, 2, 3, 1), atol=2e-5)
    grad = jax.grad(lambda x: jnp.sum(_transposed_conv_by_phases(x, kernel, s, p) ** 2))(jnp.asarray(x))
    np.testing.assert_allclose(grad, xt.grad.numpy().transpose(0, 2, 3, 1), atol=2e-4, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ runs


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """sd_quickstart (tiny) trained for 6 steps with EMA; checkpoints at 3 and 6."""
    from vla_foundry_jax.training.loop import train

    out = str(tmp_path_factory.mktemp("sd") / "straight")
    result = train(_experiment(out))
    return out, result


def test_interrupted_run_resumes_exactly(straight_run, tmp_path):
    from vla_foundry_jax.training.loop import train

    src, _ = straight_run
    # the run as it was after a crash between steps 3 and 6: checkpoint 3, metrics up to step 4
    out = str(tmp_path / "resumed")
    os.makedirs(os.path.join(out, "checkpoints"))
    shutil.copytree(os.path.join(src, "checkpoints", "3"), os.path.join(out, "checkpoints", "3"))
    with open(os.path.join(src, "metrics.jsonl")) as f:
        lines = [line for line in f if json.loads(line)["step"] <= 4]
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        f.writelines(lines)
    train(_experiment(out))
    a, b = logged_losses(src), logged_losses(out)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in range(4, STEPS + 1):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])


def test_load_sd_model_uses_ema(straight_run):
    from vla_foundry_jax import checkpoint as ckpt_lib
    from vla_foundry_jax.apps.stable_diffusion import load_sd_model

    out, result = straight_run
    ema = {k: np.asarray(v) for k, v in ckpt_lib.flat_params(result.state["ema"]).items()}
    raw = {k: np.asarray(v) for k, v in ckpt_lib.flat_params(result.state["params"]).items()}
    assert "unet.init_conv.kernel" in ema and "clip.text_model.embeddings.token_embedding" in ema
    model, _, used = load_sd_model(out, use_ema=True)
    from flax import nnx

    got = {k: np.asarray(v) for k, v in ckpt_lib.flat_params(nnx.state(model, nnx.Param)).items()}
    assert used
    for k in ema:
        np.testing.assert_array_equal(got[k], ema[k])
    assert not np.array_equal(ema["unet.init_conv.kernel"], raw["unet.init_conv.kernel"])
    model, _, used = load_sd_model(out, use_ema=False)
    got = {k: np.asarray(v) for k, v in ckpt_lib.flat_params(nnx.state(model, nnx.Param)).items()}
    assert not used
    np.testing.assert_array_equal(got["unet.init_conv.kernel"], raw["unet.init_conv.kernel"])


def test_sample_and_eval_cli(straight_run, tmp_path):
    out, _ = straight_run
    png = str(tmp_path / "grid.png")
    cmd = [sys.executable, "-m", "launch.sample_sd", f"--run_dir={out}", "--prompt=a red ball .",
           "--prompt=a blue box .", "--num_images=3", "--num_steps=5", "--scale=2", f"--out={png}"]  # fmt: skip
    run(cmd)
    assert np.asarray(Image.open(png)).shape == (2 * 8 * 2, 3 * 8 * 2, 3)  # 2 prompts x 3 images of 8x8, scale 2
    cmd = [sys.executable, "-m", "launch.eval_sd", f"--run_dir={out}", "--samples_per_color=2", "--num_steps=5"]
    summary = last_json(run(cmd))
    assert summary["num_samples"] == 12 and summary["ema"] is True
    assert 0.0 <= summary["color_accuracy"] <= 1.0 and 0.0 <= summary["untrained_color_accuracy"] <= 1.0


def test_eight_devices_match_one(tmp_path):
    def command(out, mesh):
        return train_command("sd_quickstart.gin", [*_bindings(out, batch=16, steps=3), *mesh])

    one, sharded = losses_on_one_and_eight_devices(command, tmp_path)
    assert_losses_match(one, sharded, [1, 2, 3], 1e-5)
