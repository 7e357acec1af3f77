"""``vlm_hf`` training: ``python -m launch.train`` on the bundled shapes captions, and the jitted train step on a
fixed batch (PaliGemma's prefix-LM ``token_type_ids``, Idefics3's pixel-shuffle connector), loss going down."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.fixtures.hf_checkpoints import TINY_TEXT, idefics3_config, paligemma_config  # noqa: E402
from tests.fixtures.multidevice import run  # noqa: E402
from tests.fixtures.paths import PROCESSOR, TINY  # noqa: E402
from tests.fixtures.runs import logged_losses, train_command  # noqa: E402
from tests.fixtures.training import single_device_train_step  # noqa: E402
from vla_foundry_jax.params import HyperParams  # noqa: E402
from vla_foundry_jax.params.model_params import VLMHFParams  # noqa: E402
from vla_foundry_jax.registry import model_record  # noqa: E402

IMAGE_TOKEN = 142  # tiny_data/vlm_processor's <image> id (its tokenizer has 143 tokens)
VOCAB = 150
TEXT = dict(TINY_TEXT, vocab_size=VOCAB)
# 32x32 images as the shapes data; PaliGemma: patch 8 -> 16 image tokens; Idefics3: patch 4 -> 64, shuffled by 2 -> 16
VISION = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2, image_size=32)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm_hf_train")
    torch.manual_seed(0)
    pali = paligemma_config(TEXT, dict(VISION, patch_size=8), image_token=IMAGE_TOKEN)
    transformers.PaliGemmaForConditionalGeneration(pali).save_pretrained(str(root / "paligemma"))
    idefics = idefics3_config(TEXT, dict(VISION, patch_size=4), image_token=IMAGE_TOKEN)
    transformers.Idefics3ForConditionalGeneration(idefics).save_pretrained(str(root / "idefics3"))
    return {"paligemma": str(root / "paligemma"), "idefics3": str(root / "idefics3")}


def _batch(b: int = 4, with_token_types: bool = True) -> dict[str, np.ndarray]:
    """16 image tokens + a 3-token prompt (token type 0) + a 6-token caption (type 1, the loss tokens)."""
    rng = np.random.default_rng(0)
    ids = np.concatenate(
        [np.full((b, 16), IMAGE_TOKEN), rng.integers(1, 20, (b, 3)), rng.integers(20, 140, (b, 6))], axis=1
    ).astype(np.int32)
    tt = np.concatenate([np.zeros((b, 19)), np.ones((b, 6))], axis=1).astype(np.int32)
    batch = {
        "input_ids": ids,
        "pixel_values": rng.standard_normal((b, 1, 32, 32, 3)).astype(np.float32),
        "loss_mask": tt == 1,
    }
    if with_token_types:
        batch["token_type_ids"] = tt
    return batch


@pytest.mark.parametrize("name", ["paligemma", "idefics3"])
def test_train_step_lowers_the_loss(ckpts, name):
    params = VLMHFParams(hf_pretrained=ckpts[name])
    hp = HyperParams(precision="fp32", lr=1e-2, warmup="0", global_batch_size=4, per_gpu_batch_size=4)
    _, state, step = single_device_train_step(params, hp, 100, load_weights=True)
    batch = _batch(with_token_types=name == "paligemma")
    model_record("vlm_hf").batch_check(params, batch)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses


def test_paligemma_trains_through_launch_train(ckpts, tmp_path):
    """The CLI end to end: gin -> image_caption pipeline (shapes captions) -> vlm_hf loss -> checkpoints."""
    out = str(tmp_path / "run")
    data = os.path.join(TINY, "shapes", "train", "manifest.jsonl")
    bindings = [
        "experiment.model = @vlm_hf()",
        f"vlm_hf.hf_pretrained = '{ckpts['paligemma']}'",
        "experiment.data = @image_caption()",
        f"image_caption.dataset_manifest = ['{data}']",
        f"image_caption.processor = '{PROCESSOR}'",
        "image_caption.image_size = 32",
        "image_caption.img_num_tokens = 16",
        "image_caption.seq_len = 24",
        "image_caption.allow_multiple_epochs = True",
        f"experiment.output_dir = '{out}'",
        "experiment.total_train_samples = 128",  # 16 steps of 8
        "experiment.num_checkpoints = 1",
        "experiment.log_every_n_steps = 1",
        "hparams.precision = 'fp32'",
        "hparams.global_batch_size = 8",
        "hparams.per_gpu_batch_size = 8",
        "hparams.lr = 1e-2",
        "hparams.warmup = '2'",
    ]
    run(train_command(None, bindings))
    losses = logged_losses(out)
    assert len(losses) == 16
    first, last = np.mean([losses[s] for s in sorted(losses)[:3]]), np.mean([losses[s] for s in sorted(losses)[-3:]])
    assert last < 0.8 * first, losses
    assert os.path.isdir(os.path.join(out, "checkpoints"))
