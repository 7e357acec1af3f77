"""A diffusion policy on a Qwen3-VL ``vlm_backbone``: the ``vla_diffusion_qwen3vl_2b`` preset (the original's
``vla_diffusion_redbellpepper_qwen_2b_thinking`` recipe) and, with a tiny random Qwen3-VL and a tiny Qwen-VL processor
on the bundled reach task, training through ``launch.train``, an exact resume, and 8 simulated devices against one."""

from __future__ import annotations

import contextlib
import os
import shutil

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.fixtures.multidevice import run  # noqa: E402
from tests.fixtures.paths import REACH  # noqa: E402
from tests.fixtures.qwen_vl import save_qwen_processor, save_tiny_qwen3_vl  # noqa: E402
from tests.fixtures.runs import logged_losses, train_command  # noqa: E402
from vla_foundry_jax.gin_utils import build_experiment, parse_gin  # noqa: E402

PRESET = "vla_diffusion_qwen3vl_2b.gin"
QWEN = "Qwen/Qwen3-VL-2B-Thinking"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_policy")
    path, hf = save_tiny_qwen3_vl(root / "model")
    return save_qwen_processor(root / "processor"), path, hf


def test_preset_is_the_original_recipe(tiny):
    parse_gin([PRESET], [])
    exp = build_experiment()
    model, data, hp = exp.model, exp.data, exp.hparams
    bb, tp, ns = model.vision_language_backbone, model.transformer, model.noise_scheduler
    assert (bb.type, bb.hf_pretrained, bb.num_vlm_layers_to_use, bb.freeze) == ("vlm_backbone", QWEN, 4, False)
    assert (tp.hidden_dim, tp.n_layers, tp.n_heads, tp.post_embed_norm, tp.is_causal) == (512, 12, 8, True, False)
    assert (ns.num_timesteps, ns.beta_start, ns.beta_end, ns.clamp_range) == (1000, 0.0001, 0.02, (-3.0, 3.0))
    assert model.use_flow_matching_scheduler
    assert (data.type, data.processor, dict(data.processor_kwargs)) == (
        "robotics",
        QWEN,
        {"size": {"height": 224, "width": 224}},
    )
    assert len(data.camera_names) == 6 and tuple(data.image_indices) == (-1, 0)
    assert (data.lowdim_past_timesteps, data.lowdim_future_timesteps, data.seq_len) == (1, 14, 2048)
    assert len(data.action_fields) == len(data.proprioception_fields) == 6
    assert data.normalization.method == "percentile_1_99" and data.normalization.scope == "per_timestep"
    assert (hp.precision, hp.lr, hp.lr_cooldown_end, hp.grad_clip_norm) == ("amp_bf16", 5e-4, 1e-5, 1.0)
    assert (hp.global_batch_size, hp.per_gpu_batch_size) == (2, 1)
    assert (exp.total_train_samples, exp.num_checkpoints) == (1000, 5)

    # with the tiny checkpoint in place of the hub id, the policy builds: the backbone is HF's model + the action row
    from vla_foundry_jax.models import build_model
    from vla_foundry_jax.training.state import count_params

    _, path, hf = tiny
    parse_gin([PRESET], [f"vlm_backbone.hf_pretrained = '{path}'", "vlm_backbone.num_vlm_layers_to_use = 3"])
    policy = build_experiment().model.replace(action_dim=20, proprioception_dim=20)
    abstract = nnx.eval_shape(lambda: build_model(policy, rngs=nnx.Rngs(0), load_weights=False))
    backbone = abstract.vision_language_backbone
    assert backbone.conditioning_dim == 3 * 32
    assert count_params(nnx.state(backbone, nnx.Param)) == sum(p.numel() for p in hf.parameters()) + 32


@contextlib.contextmanager
def compile_cache(path: str):
    """JAX's persistent compilation cache in ``path`` for the block, so that a resumed run reuses the executables
    of the first run instead of compiling them again (test time only)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    keys = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    old = {k: getattr(jax.config, k) for k in keys}
    for k, v in zip(keys, (path, 0.0, 0), strict=True):
        jax.config.update(k, v)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        for k, v in old.items():
            jax.config.update(k, v)
        compilation_cache.reset_cache()


def _bindings(proc: str, path: str, out: str, per_gpu: int) -> list[str]:
    return [
        "diffusion_policy.vision_language_backbone = @vlm_backbone()",
        f"vlm_backbone.hf_pretrained = '{path}'",
        "vlm_backbone.num_vlm_layers_to_use = 2",
        f"robotics.processor = '{proc}'",
        f"robotics.dataset_manifest = ['{os.path.join(REACH, 'train', 'manifest.jsonl')}']",
        "robotics.val_dataset_manifest = []",
        f"robotics.dataset_statistics = ['{os.path.join(REACH, 'train', 'stats.json')}']",
        "robotics.max_text_seq_len = 48",
        "robotics.num_workers = 0",
        f"experiment.output_dir = '{out}'",
        "experiment.total_train_samples = 32",  # 4 steps of 8
        "experiment.num_checkpoints = 2",
        "experiment.log_every_n_steps = 1",
        "hparams.global_batch_size = 8",
        f"hparams.per_gpu_batch_size = {per_gpu}",
        "hparams.warmup = '1'",
    ]


def test_tiny_qwen3_vl_policy_trains_resumes_and_shards(tiny, tmp_path):
    """On 1 device (in this process, as launch.train runs it): 4 steps, checkpoints at 2 and 4; resumed from step 2
    it logs the same losses 3 and 4. ``launch.train`` on 8 simulated devices (fsdp 4 x tensor 2) logs the same
    losses within 1e-5."""
    from vla_foundry_jax.training.loop import train

    proc, path, _ = tiny
    one = str(tmp_path / "one")
    with compile_cache(str(tmp_path / "jax_cache")):
        parse_gin(["vla_quickstart.gin"], _bindings(proc, path, one, 8))
        train(build_experiment())
        losses = logged_losses(one)
        assert sorted(losses) == [1, 2, 3, 4] and all(np.isfinite(list(losses.values())))
        shutil.rmtree(os.path.join(one, "checkpoints", "4"))
        os.remove(os.path.join(one, "metrics.jsonl"))
        parse_gin(["vla_quickstart.gin"], _bindings(proc, path, one, 8))
        train(build_experiment())
    again = logged_losses(one)
    assert sorted(again) == [3, 4]
    for s in (3, 4):
        assert again[s] == pytest.approx(losses[s], rel=1e-6, abs=1e-7)
    from vla_foundry_jax.errors import UsageError
    from vla_foundry_jax.serving import Policy

    with pytest.raises(UsageError, match=r"Qwen-VL processor .* serving does not build such observations yet"):
        Policy.from_run(one)

    eight = str(tmp_path / "eight")
    mesh = ["distributed.fsdp_parallelism = 4", "distributed.tensor_parallelism = 2"]
    run(train_command("vla_quickstart.gin", [*_bindings(proc, path, eight, 2), *mesh]), devices=8, timeout=600)
    sharded = logged_losses(eight)
    assert sorted(sharded) == [1, 2, 3, 4]
    for s in sharded:
        assert sharded[s] == pytest.approx(losses[s], abs=1e-5)
