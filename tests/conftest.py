"""Shared test helpers: a tiny text experiment and a test-only wrapper model type.

Tests run on the host CPU; multi-device tests start subprocesses with their own XLA_FLAGS.
"""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tiny_data")
sys.path.insert(0, ROOT)


def tiny_experiment(output_dir: str | None, *, steps: int = 4, batch: int = 4, seq_len: int = 16, **model_overrides):
    """A tiny text_untokenized LM experiment over the bundled data (float32, one device)."""
    from vla_foundry_jax.params import HyperParams, TextUntokenizedDataParams, TrainExperimentParams, TransformerParams

    model = TransformerParams(
        **{"hidden_dim": 32, "n_layers": 2, "n_heads": 2, "vocab_size": 160, "max_seq_len": 64, **model_overrides}
    )
    return TrainExperimentParams(
        output_dir=output_dir,
        total_train_samples=steps * batch,
        num_checkpoints=2,
        log_every_n_steps=1,
        async_checkpointing=False,
        model=model,
        data=TextUntokenizedDataParams(
            dataset_manifest=[os.path.join(TINY, "text_untokenized", "manifest.jsonl")],
            tokenizer=os.path.join(TINY, "tokenizer"),
            seq_len=seq_len,
            allow_multiple_epochs=True,
            num_workers=0,
        ),
        hparams=HyperParams(
            precision="fp32", global_batch_size=batch, per_gpu_batch_size=batch, lr=1e-2, warmup="1", seed=0
        ),
    )


@pytest.fixture
def tiny_exp():
    return tiny_experiment


def subprocess_env(num_devices: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    if num_devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    return env
