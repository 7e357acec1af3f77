"""``vlm_hf`` training: ``python -m launch.train`` on the bundled shapes captions, and the jitted train step on a
fixed batch (PaliGemma's prefix-LM ``token_type_ids``, Idefics3's pixel-shuffle connector), loss going down."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import ROOT, TINY, logged_losses, subprocess_env  # noqa: E402

from vla_foundry_jax import parallel  # noqa: E402
from vla_foundry_jax.models import load_weights  # noqa: E402
from vla_foundry_jax.params import DistributedParams, EMAParams, HyperParams  # noqa: E402
from vla_foundry_jax.params.model_params import VLMHFParams  # noqa: E402
from vla_foundry_jax.registry import get_loss, model_record  # noqa: E402
from vla_foundry_jax.training.optimizer import make_optimizer  # noqa: E402
from vla_foundry_jax.training.state import init_train_state, make_model_spec  # noqa: E402
from vla_foundry_jax.training.step import make_train_step  # noqa: E402

IMAGE_TOKEN = 142  # tiny_data/vlm_processor's <image> id (its tokenizer has 143 tokens)
VOCAB = 150
TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
)
# 32x32 images as the shapes data; PaliGemma: patch 8 -> 16 image tokens; Idefics3: patch 4 -> 64, shuffled by 2 -> 16
VISION = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2, image_size=32)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm_hf_train")
    torch.manual_seed(0)
    pali = transformers.PaliGemmaConfig(
        text_config=dict(TEXT, model_type="gemma"),
        vision_config=dict(VISION, patch_size=8),
        image_token_index=IMAGE_TOKEN,
        projection_dim=32,
    )
    transformers.PaliGemmaForConditionalGeneration(pali).save_pretrained(str(root / "paligemma"))
    idefics = transformers.Idefics3Config(
        vision_config=dict(VISION, patch_size=4),
        text_config=dict(TEXT, model_type="llama", pad_token_id=0),
        image_token_id=IMAGE_TOKEN,
        scale_factor=2,
    )
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
    mesh = parallel.make_mesh(DistributedParams(), jax.devices()[:1])
    spec = make_model_spec(params, hp, mesh)
    opt = make_optimizer(hp, 100)
    state = init_train_state(spec, opt, hp, use_ema=False)
    state["params"], state["frozen"] = load_weights(spec.params, [state["params"], state["frozen"]])
    shardings = jax.tree.map(lambda x: x.sharding, state)
    step = make_train_step(
        spec, get_loss("vlm_hf"), opt, hp, EMAParams(), accum_steps=1, total_steps=100, state_shardings=shardings
    )
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
        f"image_caption.processor = '{os.path.join(TINY, 'vlm_processor')}'",
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
    cmd = [sys.executable, "-m", "launch.train", *(f"--gin_bindings={b}" for b in bindings)]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = logged_losses(out)
    assert len(losses) == 16
    first, last = np.mean([losses[s] for s in sorted(losses)[:3]]), np.mean([losses[s] for s in sorted(losses)[-3:]])
    assert last < 0.8 * first, losses
    assert os.path.isdir(os.path.join(out, "checkpoints"))
