"""The Qwen-VL processor in the data pipeline (``data.qwen_processor``): its output equals Hugging Face's
``Qwen3VLProcessor`` on images of several sizes; per-sample padded patches, packed inside the model, give HF's logits
for HF's flat layout (jitted, and split in micro-batches); ``image_caption`` batches from the pipeline; bad input."""

from __future__ import annotations

import io
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.fixtures.paths import PROCESSOR, TINY  # noqa: E402
from tests.fixtures.qwen_vl import hf_qwen_processor, save_qwen_processor, save_tiny_qwen3_vl  # noqa: E402
from tests.fixtures.weights import loaded  # noqa: E402
from vla_foundry_jax.data.processor import load_processor  # noqa: E402
from vla_foundry_jax.data.qwen_processor import QwenVLProcessor  # noqa: E402
from vla_foundry_jax.data.shards import DataError  # noqa: E402
from vla_foundry_jax.params.model_params import VLMHFParams  # noqa: E402

ATOL = 1e-4
SIZES = [(20, 28), (40, 13), (9, 9), (60, 50)]  # upscaled, odd, one merged patch, downscaled past max_pixels
TEXT = "pick the red cube"


def _images(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


@pytest.fixture(scope="module")
def proc_dir(tmp_path_factory):
    return save_qwen_processor(tmp_path_factory.mktemp("qwen_processor"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_qwen3_vl(tmp_path_factory.mktemp("qwen3_vl") / "model")


def _messages(n):
    return [{"role": "user", "content": [{"type": "image"}] * n + [{"type": "text", "text": TEXT}]}]


def test_output_equals_hf_processor(proc_dir):
    ours = load_processor(proc_dir, image_size=32, img_num_tokens=1)
    assert isinstance(ours, QwenVLProcessor)
    assert (ours.patch_size, ours.merge_size, ours.max_patches_per_image, ours.patch_dim) == (4, 2, 64, 96)
    hf = hf_qwen_processor(proc_dir)
    a, b, c, d = _images()
    for imgs in ([a], [b], [c], [d], [a, b, c]):  # the last: several images in one prompt (robotics cameras)
        prompt = ours.prompt(len(imgs), TEXT)
        assert prompt == hf.apply_chat_template(_messages(len(imgs)), tokenize=False)
        got = ours(imgs, prompt, 80)
        ref = hf(images=imgs, text=[prompt], return_tensors="np")
        n, rows = ref["input_ids"].shape[1], ref["pixel_values"].shape[0]
        np.testing.assert_array_equal(got["input_ids"][:n], ref["input_ids"][0])
        assert (got["input_ids"][n:] == ours.pad_token_id).all() and got["attention_mask"].sum() == n
        np.testing.assert_array_equal(got["loss_mask"], (got["attention_mask"] == 1) & (got["input_ids"] != 147))
        np.testing.assert_array_equal(got["image_grid_thw"], ref["image_grid_thw"])
        assert got["pixel_values"].shape == (64 * len(imgs), 96)  # padded to max_patches_per_image per image
        np.testing.assert_array_equal(got["pixel_values"][:rows], ref["pixel_values"])
        assert not got["pixel_values"][rows:].any()
    # max_pixels from processor_kwargs: a smaller cap and smaller images
    small = load_processor(proc_dir, image_size=32, img_num_tokens=1, max_pixels=16 * 16)
    got = small([d], small.prompt(1, TEXT), 40)
    ref = hf(images=[d], text=[small.prompt(1, TEXT)], size={"shortest_edge": 64, "longest_edge": 256})
    assert got["pixel_values"].shape == (16, 96)
    np.testing.assert_array_equal(got["image_grid_thw"], np.asarray(ref["image_grid_thw"]))
    np.testing.assert_array_equal(got["pixel_values"][: len(ref["pixel_values"])], np.asarray(ref["pixel_values"]))


def _hf_logits(hf, ids, mask, pixels, grids):
    with torch.no_grad():
        return hf(
            input_ids=torch.from_numpy(ids.astype(np.int64)),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
            pixel_values=torch.from_numpy(pixels),
            image_grid_thw=torch.from_numpy(grids.astype(np.int64)),
            mm_token_type_ids=torch.from_numpy((ids == 147).astype(np.int64)),
        ).logits.numpy()


def test_per_sample_patches_give_hf_logits_jitted_and_in_micro_batches(proc_dir, ckpt):
    """Four samples of two images of different sizes each, padded per sample and split in two micro-batches: the
    model packs each micro-batch (traced grid, under jit) and gives HF's logits for the whole batch's flat layout."""
    from vla_foundry_jax.models.qwen_vl import QwenVLInputError, check_sample_inputs

    path, hf = ckpt
    model = loaded(VLMHFParams(hf_pretrained=path))
    ours = load_processor(proc_dir, image_size=32, img_num_tokens=1)
    a, b, c, d = _images(1)
    samples = [ours(imgs, ours.prompt(2, TEXT), 96) for imgs in ([a, b], [d, c], [c, a], [b, d])]
    batch = {k: np.stack([s[k] for s in samples]) for k in samples[0]}
    mask = batch["attention_mask"]
    valid = [s["pixel_values"][: int(s["image_grid_thw"].prod(-1).sum())] for s in samples]
    ref = _hf_logits(hf, batch["input_ids"], mask, np.concatenate(valid), batch["image_grid_thw"].reshape(-1, 3))

    graphdef, state = nnx.split(model)

    @jax.jit
    def logits(state, ids, pixels, grid, mask):
        return nnx.merge(graphdef, state)(ids, pixels, image_grid_thw=grid, attention_mask=mask).logits

    keys = ("input_ids", "pixel_values", "image_grid_thw", "attention_mask")
    for part in (slice(0, 2), slice(2, 4)):  # one compile: both micro-batches have one shape
        got = np.asarray(logits(state, *(jnp.asarray(batch[k][part]) for k in keys)))
        on = mask[part].astype(bool)
        np.testing.assert_allclose(got[on], ref[part][on], atol=ATOL)
    # the host-side check of concrete inputs, per sample
    check_sample_inputs(model.config, batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"])
    bad = batch["image_grid_thw"].copy()
    bad[2, 1] = (1, 2, 2)
    with pytest.raises(QwenVLInputError, match=r"sample 2: input_ids hold \d+ image tokens .* gives"):
        check_sample_inputs(model.config, batch["input_ids"], batch["pixel_values"], bad)


def test_image_caption_batches_train_vlm_hf(proc_dir, ckpt):
    """The shapes captions through the grain pipeline with the Qwen processor: chat-templated captions, padded
    patches; the vlm_hf batch check passes and the loss equals HF's next-token loss on the caption tokens."""
    from vla_foundry_jax.data.pipeline import build_train_iterator
    from vla_foundry_jax.models.vlm_hf import vlm_hf_loss
    from vla_foundry_jax.params import HyperParams
    from vla_foundry_jax.params.data_params import ImageCaptionDataParams
    from vla_foundry_jax.registry import model_record

    path, hf = ckpt
    data = ImageCaptionDataParams(
        dataset_manifest=[os.path.join(TINY, "shapes", "train", "manifest.jsonl")],
        processor=proc_dir,
        seq_len=40,
        num_workers=0,
    )
    batch = next(build_train_iterator(data, global_batch_size=4, num_batches=1))
    assert batch["pixel_values"].shape == (4, 64, 96) and batch["image_grid_thw"].shape == (4, 1, 3)
    np.testing.assert_array_equal(batch["image_grid_thw"][:, 0], [[1, 8, 8]] * 4)  # 32 x 32 shapes images
    assert ((batch["input_ids"] == 147).sum(1) == 16).all()
    params = VLMHFParams(hf_pretrained=path)
    model_record("vlm_hf").batch_check(params, batch)
    graphdef, state = nnx.split(loaded(params))
    loss_fn = jax.jit(lambda s, b: vlm_hf_loss(nnx.merge(graphdef, s), b, hparams=HyperParams())[0])
    loss = loss_fn(state, {k: jnp.asarray(v) for k, v in batch.items()})
    ids, lm = batch["input_ids"], batch["loss_mask"]
    rows = np.concatenate([p[:64] for p in batch["pixel_values"]])
    logits = _hf_logits(hf, ids[:, :-1], np.ones_like(ids[:, :-1]), rows, batch["image_grid_thw"].reshape(-1, 3))
    logp = torch.log_softmax(torch.from_numpy(logits), -1).numpy()
    nll = -np.take_along_axis(logp, ids[:, 1:, None].astype(np.int64), -1)[..., 0]
    want = (nll * lm[:, 1:]).sum() / lm[:, 1:].sum()
    assert float(loss) == pytest.approx(float(want), abs=1e-4)


def test_bad_input_names_the_field_and_the_fix(proc_dir, tmp_path):
    p = load_processor(proc_dir, image_size=32, img_num_tokens=1)
    # smart resize never gives less than one merged patch: a 3 x 3 image becomes 8 x 8 pixels (2 x 2 patches)
    tiny = p([np.zeros((3, 3, 3), np.uint8)], p.prompt(1, TEXT), 40)
    np.testing.assert_array_equal(tiny["image_grid_thw"], [[1, 2, 2]])
    with pytest.raises(DataError, match=r"image 0 of 1 x 300 pixels cannot be resized for Qwen-VL .* crop or pad it"):
        p([np.zeros((1, 300, 3), np.uint8)], p.prompt(1, TEXT), 40)
    with pytest.raises(DataError, match=r"max_pixels = 1048576 allows 65536 patches .* processor_kwargs"):
        load_processor(proc_dir, image_size=32, img_num_tokens=1, max_pixels=1024 * 1024)
    with pytest.raises(DataError, match=r"Unknown processor_kwargs \['image_token'\] for the Qwen-VL processor"):
        load_processor(proc_dir, image_size=32, img_num_tokens=1, image_token="<image>")
    big = load_processor(proc_dir, image_size=32, img_num_tokens=1)
    with pytest.raises(DataError, match=r"needs \d+ tokens .* raise seq_len"):
        big([_images()[0]], big.prompt(1, TEXT), 10)


def test_processor_of_another_family_than_the_model(proc_dir, ckpt, tmp_path):
    """A Qwen-VL backbone with a fixed-size processor and a PaliGemma backbone with a Qwen-VL processor: one error
    naming both fields; the CLI prints it on one line (exit 2)."""
    from tests.fixtures.hf_checkpoints import paligemma_config
    from tests.fixtures.multidevice import run
    from tests.fixtures.robotics import reach_data
    from vla_foundry_jax.params import DiffusionPolicyParams, ParamsError, TrainExperimentParams, TransformerParams
    from vla_foundry_jax.params.model_params import VLMBackboneParams
    from vla_foundry_jax.training.resolve import resolve_experiment

    pali = str(tmp_path / "paligemma")
    paligemma_config().save_pretrained(pali)

    def experiment(backbone, processor):
        return TrainExperimentParams(
            total_train_samples=4,
            model=DiffusionPolicyParams(
                vision_language_backbone=VLMBackboneParams(hf_pretrained=backbone),
                transformer=TransformerParams(hidden_dim=32, n_layers=1, n_heads=2, max_seq_len=64, is_causal=False),
            ),
            data=reach_data(processor=processor),
        )

    with pytest.raises(ParamsError, match=r"robotics.processor = .* is not a Qwen-VL processor but "
                                          r"vlm_backbone.hf_pretrained = .* is a qwen3_vl model"):  # fmt: skip
        resolve_experiment(experiment(ckpt[0], PROCESSOR))
    with pytest.raises(ParamsError, match=r"is a Qwen-VL processor \(flat patches\) but vlm_backbone.hf_pretrained"):
        resolve_experiment(experiment(pali, proc_dir))
    done = run(
        [
            sys.executable,
            "-m",
            "launch.train",
            "--gin_file=gin_configs/vla_quickstart.gin",
            "--gin_bindings=diffusion_policy.vision_language_backbone = @vlm_backbone()",
            f"--gin_bindings=vlm_backbone.hf_pretrained = '{ckpt[0]}'",
            f"--gin_bindings=experiment.output_dir = '{tmp_path / 'run'}'",
        ],
        check=False,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [ln for ln in done.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "is not a Qwen-VL processor" in lines[0] and "Traceback" not in done.stderr


def test_png_bytes_of_any_size_through_the_caption_transform(proc_dir):
    """Raw shard samples (PNG bytes) of different sizes -> one shape per sample (grain stacks them)."""
    from PIL import Image

    from vla_foundry_jax.data.image_caption import ImageCaptionTransform

    p = load_processor(proc_dir, image_size=32, img_num_tokens=1)
    transform = ImageCaptionTransform(p, seq_len=63, train=False)
    outs = []
    for i, img in enumerate(_images(2)):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        outs.append(transform({"__key__": f"k{i}", "__shard__": "s", "png": buf.getvalue(), "txt": b"a red cube"}))
    for k in ("input_ids", "loss_mask", "pixel_values", "image_grid_thw"):
        assert len({o[k].shape for o in outs}) == 1, k
    ref = hf_qwen_processor(proc_dir)
    for o, img in zip(outs, _images(2), strict=True):
        want = ref(images=[img], text=[p.prompt(1, "a red cube")], return_tensors="np")
        np.testing.assert_array_equal(o["image_grid_thw"], want["image_grid_thw"])
        ids = want["input_ids"][0]
        np.testing.assert_array_equal(o["input_ids"][: len(ids)], ids)
        assert o["input_ids"][len(ids)] == p.eos_token_id  # eos appended, as every caption
