"""Orbax checkpoints: exact resume after a hard kill, weights-only and per-sub-model loads, strict shapes."""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest

from tests.fixtures.multidevice import run, start
from tests.fixtures.runs import logged_losses, tiny_experiment, tiny_train_command
from vla_foundry_jax import checkpoint as ckpt_lib
from vla_foundry_jax.training.loop import train


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished tiny LLM run (4 steps, checkpoints at 2 and 4)."""
    out = str(tmp_path_factory.mktemp("llm"))
    result = train(tiny_experiment(out, steps=4))
    return out, result


def _leaves(state):
    return {k: np.asarray(v) for k, v in ckpt_lib.flat_params(state).items()}


def test_run_directory_layout(trained_run):
    out, _ = trained_run
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["2", "4"]
    assert set(ckpt_lib.ITEMS) <= set(os.listdir(os.path.join(out, "checkpoints", "4")))
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(lines[0])
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(out, "tensorboard")))
    stored = ckpt_lib.load_experiment_params(out)
    assert stored.model.hidden_dim == 32 and stored.output_dir == out


def test_model_rebuilds_from_checkpoint_without_gin(trained_run):
    from vla_foundry_jax.sampling import load_model

    out, result = trained_run
    model, exp = load_model(out)
    ids = np.arange(10, dtype=np.int32)[None]
    np.testing.assert_allclose(model(ids).logits, result.model()(ids).logits, atol=1e-6)
    assert exp.model == result.experiment.model


def test_weights_only_resume_loads_weights_and_restarts(trained_run, tmp_path):
    src, result = trained_run
    exp = tiny_experiment(str(tmp_path / "ft"), steps=2)
    exp = exp.replace(model=exp.model.replace(resume_from_checkpoint=src, resume_weights_only=True))
    from vla_foundry_jax import parallel
    from vla_foundry_jax.training.optimizer import make_optimizer
    from vla_foundry_jax.training.state import init_train_state, make_model_spec

    mesh = parallel.make_mesh(exp.distributed)
    spec = make_model_spec(exp.model, exp.hparams, mesh)
    state = init_train_state(spec, make_optimizer(exp.hparams, 2), exp.hparams, use_ema=False)
    (loaded,) = ckpt_lib.restore_model_weights(src, [state["params"]])
    want = _leaves(result.state["params"])
    got = _leaves(loaded)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(want[k], got[k])
    ft = train(exp)
    lines = [json.loads(line) for line in open(tmp_path / "ft" / "metrics.jsonl")]
    assert [r["step"] for r in lines] == [1, 2]  # fresh step counter
    assert int(ft.state["step"]) == 2
    fresh_first = json.loads(open(os.path.join(src, "metrics.jsonl")).readline())["loss"]
    assert lines[0]["loss"] < fresh_first  # started from the trained weights


def test_nested_resume_loads_only_the_submodel(trained_run):
    from tests.fixtures.wrapper_model import WrapperParams
    from vla_foundry_jax import parallel
    from vla_foundry_jax.models import load_weights
    from vla_foundry_jax.params import HyperParams
    from vla_foundry_jax.training.optimizer import make_optimizer
    from vla_foundry_jax.training.state import init_train_state, make_model_spec

    src, result = trained_run
    tparams = result.experiment.model.replace(resume_from_checkpoint=src)
    params = WrapperParams(transformer=tparams)
    hp = HyperParams(precision="fp32")
    spec = make_model_spec(params, hp, parallel.make_mesh(result.experiment.distributed))
    state = init_train_state(spec, make_optimizer(hp, 2), hp, use_ema=False)
    trainable, _ = load_weights(spec.params, [state["params"], state["frozen"]])
    want = _leaves(result.state["params"])
    got = _leaves(trainable)
    assert set(got) == {"bias"} | {f"transformer.{k}" for k in want}
    for k in want:
        np.testing.assert_array_equal(got[f"transformer.{k}"], want[k])
    np.testing.assert_array_equal(got["bias"], 0.0)


def test_shape_mismatch_lists_paths(trained_run, tmp_path):
    src, _ = trained_run
    exp = tiny_experiment(str(tmp_path / "bad"), steps=2, hidden_dim=48)
    exp = exp.replace(model=exp.model.replace(resume_from_checkpoint=src, resume_weights_only=True))
    with pytest.raises(ckpt_lib.CheckpointError, match=r"shape mismatches .*embeddings: checkpoint \(160, 32\)"):
        train(exp)


def test_resume_path_without_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpt_lib.CheckpointError, match="no finished checkpoint"):
        ckpt_lib.resolve_step_dir(str(tmp_path / "empty"))
    with pytest.raises(ckpt_lib.CheckpointError, match="does not exist"):
        ckpt_lib.resolve_step_dir(str(tmp_path / "nowhere"))


def test_checkpoint_from_a_different_model_is_refused(trained_run):
    """An LLM run cannot fill a wrapper model directly: the names differ, and the error lists them."""
    from tests.fixtures.wrapper_model import WrapperParams
    from vla_foundry_jax import parallel
    from vla_foundry_jax.params import HyperParams, TransformerParams
    from vla_foundry_jax.training.optimizer import make_optimizer
    from vla_foundry_jax.training.state import init_train_state, make_model_spec

    src, _ = trained_run
    params = WrapperParams(transformer=TransformerParams(hidden_dim=32, n_layers=2, n_heads=2, vocab_size=160))
    hp = HyperParams(precision="fp32")
    spec = make_model_spec(params, hp, parallel.make_mesh(tiny_experiment(None).distributed))
    state = init_train_state(spec, make_optimizer(hp, 2), hp, use_ema=False)
    with pytest.raises(ckpt_lib.CheckpointError, match=r"missing from the checkpoint .*transformer\.embeddings"):
        ckpt_lib.restore_model_weights(src, [state["params"]])


def test_hard_kill_then_resume_reproduces_losses(tmp_path):
    steps = 80
    straight = str(tmp_path / "straight")
    run(tiny_train_command(straight, steps, ["ema.enabled = True"]), timeout=300)

    killed = str(tmp_path / "killed")
    proc = start(tiny_train_command(killed, steps, ["ema.enabled = True"]), quiet=True)
    half = os.path.join(killed, "checkpoints", str(steps // 2))
    deadline = time.time() + 240
    while time.time() < deadline:
        if os.path.isdir(half) and os.path.exists(os.path.join(killed, "metrics.jsonl")):
            if max(logged_losses(killed), default=0) > steps // 2:
                break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt_lib.RunCheckpointer(killed).latest_step() == steps // 2, "the run was not killed mid-way"
    done = run(tiny_train_command(killed, steps, ["ema.enabled = True"]), timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stderr
    a, b = logged_losses(straight), logged_losses(killed)
    assert sorted(b) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    # running the finished command again does nothing and says so
    again = run(tiny_train_command(killed, steps, ["ema.enabled = True"]), timeout=300, check=False)
    assert again.returncode == 0 and "nothing to do" in again.stderr


def test_max_checkpoint_limit_keeps_the_newest(tmp_path):
    exp = tiny_experiment(str(tmp_path / "run"), steps=3).replace(num_checkpoints=3, max_checkpoint_limit=1)
    train(exp)
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["3"]
