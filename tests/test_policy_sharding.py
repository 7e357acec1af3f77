"""The ``diffusion_policy`` train step on 8 simulated CPU devices (fsdp x tensor mesh) matches one device within
1e-5, and a save / restore in the middle of a run reproduces the uninterrupted run's losses exactly.

Each run is a subprocess (its own ``XLA_FLAGS`` device count) executing this file's ``worker``: a tiny
vit-backbone policy trained on fixed synthetic robotics batches with the project's train step (EMA on).
"""

from __future__ import annotations

import json

import pytest

from tests.fixtures.multidevice import run_python

STEPS, BATCH = 4, 8


def worker(mesh: tuple[int, int, int], out_dir: str, resume_at: int | None) -> list[float]:
    import jax
    import numpy as np

    from vla_foundry_jax import checkpoint as ckpt_lib
    from vla_foundry_jax import parallel
    from vla_foundry_jax.params import DistributedParams, EMAParams, HyperParams, TrainExperimentParams
    from vla_foundry_jax.params.model_params import (
        DiffusionPolicyParams,
        NoiseSchedulerParams,
        TransformerParams,
        ViTBackboneParams,
    )
    from vla_foundry_jax.registry import get_loss
    from vla_foundry_jax.training.optimizer import make_optimizer
    from vla_foundry_jax.training.state import init_train_state, make_model_spec
    from vla_foundry_jax.training.step import make_train_step

    params = DiffusionPolicyParams(
        vision_language_backbone=ViTBackboneParams(
            hidden_dim=16, inter_dim=32, patch_size=8, img_size=16, n_heads=2, n_layers=1
        ),
        transformer=TransformerParams(hidden_dim=32, n_layers=2, n_heads=2, is_causal=False, max_seq_len=64),
        noise_scheduler=NoiseSchedulerParams(num_timesteps=100),
        use_flow_matching_scheduler=True,
        action_dim=3,
        proprioception_dim=2,
        num_action_head_repeats=2,
    )
    hp = HyperParams(precision="fp32", lr=3e-3, warmup="0", global_batch_size=BATCH, seed=0)
    ema = EMAParams(enabled=True)
    dist = DistributedParams(data_parallelism=mesh[0], fsdp_parallelism=mesh[1], tensor_parallelism=mesh[2])
    m = parallel.make_mesh(dist)
    spec = make_model_spec(params, hp, m)
    opt = make_optimizer(hp, STEPS)
    loss_fn = get_loss("diffusion_policy")

    def fresh():
        state = init_train_state(spec, opt, hp, use_ema=True)
        sh = jax.tree.map(lambda x: x.sharding, state)
        step = make_train_step(spec, loss_fn, opt, hp, ema, accum_steps=1, total_steps=STEPS, state_shardings=sh)
        return state, step

    def batch(i: int) -> dict:
        r = np.random.default_rng(100 + i)
        past = np.zeros((BATCH, 4), bool)
        past[:, 0] = True
        host = {
            "input_ids": r.integers(0, 50, (BATCH, 5)).astype(np.int32),
            "attention_mask": np.ones((BATCH, 5), np.int32),
            "pixel_values": r.uniform(-1, 1, (BATCH, 2, 16, 16, 3)).astype(np.float32),
            "attention_mask_images": np.ones((BATCH, 2), bool),
            "actions": r.uniform(-1, 1, (BATCH, 4, 3)).astype(np.float32),
            "past_mask": past,
            "future_mask": ~past,
            "proprioception": r.standard_normal((BATCH, 2, 2)).astype(np.float32),
        }
        return parallel.host_batch_to_global(host, m)

    state, step = fresh()
    losses = []
    for i in range(STEPS):
        state, metrics = step(state, batch(i))
        losses.append(float(metrics["loss"]))
        if resume_at is not None and i + 1 == resume_at:
            exp = TrainExperimentParams(model=params, hparams=hp, output_dir=out_dir)
            ck = ckpt_lib.RunCheckpointer(out_dir, async_save=False)
            ck.save(i + 1, state, exp, {})
            ck.wait()
            state, step = fresh()  # a new process would start from a fresh state: restore into it
            state, _ = ck.restore_train(i + 1, state)
            ck.close()
            assert int(state["step"]) == i + 1
    return losses


def _run(tmp_path, name: str, devices: int, mesh: tuple[int, int, int], resume_at: int | None = None) -> list[float]:
    out = str(tmp_path / name)
    code = (
        "import json, sys; from tests.test_policy_sharding import worker; "
        f"print('LOSSES', json.dumps(worker({mesh!r}, {out!r}, {resume_at!r})))"
    )
    proc = run_python(code, devices=devices, timeout=500)
    line = [x for x in proc.stdout.splitlines() if x.startswith("LOSSES ")][-1]
    return json.loads(line[len("LOSSES ") :])


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("one"), "run", 1, (1, 1, 1))


def test_policy_on_eight_devices_matches_one(tmp_path, one_device):
    sharded = _run(tmp_path, "fsdp4_tensor2", 8, (1, 4, 2))
    assert len(sharded) == len(one_device) == STEPS
    for a, b in zip(one_device, sharded, strict=True):
        assert abs(a - b) <= 1e-5, (one_device, sharded)
    assert one_device[-1] != one_device[0]


def test_policy_save_restore_mid_run_reproduces_losses(tmp_path, one_device):
    resumed = _run(tmp_path, "resumed", 1, (1, 1, 1), resume_at=2)
    assert resumed == one_device
