"""Shared test helpers: a tiny text experiment and a test-only wrapper model type.

Tests run on the host CPU; multi-device tests start subprocesses with their own XLA_FLAGS.
"""

from __future__ import annotations

import os
import sys

import gin
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tiny_data")
sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True, scope="module")
def _fresh_gin_config():
    """No gin binding parsed by one test module reaches the params another module builds."""
    gin.clear_config()
    yield
    gin.clear_config()


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


def tiny_train_command(out_dir: str, steps: int, bindings: list[str] = (), batch: int = 8) -> list[str]:
    """``python -m launch.train`` for a tiny LLM on the bundled data, logging every step."""
    data = os.path.join(TINY, "")
    base = [
        "transformer.vocab_size = 160",
        "transformer.hidden_dim = 32",
        "experiment.data = @text_untokenized()",
        f"text_untokenized.dataset_manifest = ['{data}text_untokenized/manifest.jsonl']",
        f"text_untokenized.tokenizer = '{data}tokenizer'",
        "text_untokenized.seq_len = 32",
        "text_untokenized.allow_multiple_epochs = True",
        f"experiment.output_dir = '{out_dir}'",
        f"experiment.total_train_samples = {steps * batch}",
        "experiment.num_checkpoints = 2",
        "experiment.log_every_n_steps = 1",
        "hparams.precision = 'fp32'",
        f"hparams.global_batch_size = {batch}",
        f"hparams.per_gpu_batch_size = {batch}",
        "hparams.warmup = '5'",
        "hparams.lr = 3e-3",
    ]
    cmd = [sys.executable, "-m", "launch.train", "--gin_file=gin_configs/transformer_tiny.gin"]
    return cmd + [f"--gin_bindings={b}" for b in [*base, *bindings]]


def logged_losses(out_dir: str) -> dict[int, float]:
    """step -> loss from metrics.jsonl (a resumed run's later lines win)."""
    import json

    out = {}
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            out[rec["step"]] = rec["loss"]
    return out
