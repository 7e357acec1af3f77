"""apps.policy_eval (``launch.eval_policy``): the lockstep rollout (with an oracle and a still policy), the plot, and
the CLI on a policy trained for a few steps from gin_configs/vla_quickstart.gin (the policy's observation windows
and receding horizon: tests/test_serving.py)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from tests.fixtures.multidevice import last_json, run
from tests.fixtures.robotics import reach_data
from tests.fixtures.runs import train_command
from vla_foundry_jax.apps.policy_eval import (
    draw_predictions,
    evaluate,
    prediction_figure,
    random_rollout,
    rollout,
)
from vla_foundry_jax.data.robotics import robotics_transform
from vla_foundry_jax.params.data_params import NormalizationParams
from vla_foundry_jax.testbeds.tiny_robotics import PAST, ReachEnv, expert_action, sample_setup


@pytest.fixture(scope="module")
def transform():
    data = reach_data(normalization=NormalizationParams(method="min_max", centered_norm=True))
    return robotics_transform(data, train=False)


def test_rollout_with_an_oracle_and_a_still_policy():
    n, seed = 6, 40
    targets = np.stack([sample_setup(np.random.default_rng(seed + i)).target for i in range(n)])
    calls = []

    def oracle(episodes, observations):  # commands from the positions it is shown
        calls.append(list(episodes))
        return [expert_action(o["agent_xy"], targets[i]) for i, o in zip(episodes, observations, strict=True)]

    result = rollout(oracle, num_episodes=n, seed=seed)
    assert result["success_rate"] == 1.0 and max(result["steps"]) <= 14
    assert calls[0] == list(range(n)) and len(calls) == max(result["steps"])  # finished episodes stop stepping
    assert all(len(c) == sum(s > k for s in result["steps"]) for k, c in enumerate(calls))

    def still(episodes, observations):
        return [o["agent_xy"] for o in observations]

    result = rollout(still, num_episodes=n, seed=seed, max_steps=5)
    assert result["success_rate"] == 0.0 and result["steps"] == [5] * n
    assert 0.0 <= random_rollout(num_episodes=n, seed=seed) < 1.0
    with pytest.raises(ValueError, match="execute_steps"):
        evaluate("unused", execute_steps=9)


def test_draw_predictions(tmp_path, transform):
    """The picture: scenes in world coordinates with the expert and predicted commands as given, a rollout panel
    coloured by outcome, axis labels, legends and a title; saved as a PNG."""
    env = ReachEnv()
    images = np.stack([transform.processor.preprocess_image(env.reset(seed=s)["image"]) for s in range(2)])
    true = np.linspace(-0.5, 0.5, 18).reshape(1, 9, 2).repeat(2, 0)
    pred = -true
    mask = np.arange(9)[None].repeat(2, 0) >= PAST
    rollouts = {
        "paths": [np.array([[0.0, 0.0], [0.3, 0.4]]), np.array([[-0.5, 0.5], [-0.5, 0.2]])],
        "targets": [np.array([0.3, 0.4]), np.array([0.8, -0.8])],
        "successes": [True, False],
    }
    config = transform.processor.image_config
    fig = prediction_figure(images, true, pred, mask, config, rollouts=rollouts, title="run1 eval")
    axes = fig.get_axes()
    assert len(axes) == 3 and fig._suptitle.get_text() == "run1 eval"
    for ax, t, p in zip(axes, true, pred, strict=False):
        assert [x.get_text() for x in ax.get_legend().get_texts()] == ["expert", "predicted"]
        expert, predicted = ax.get_lines()
        np.testing.assert_array_equal(np.stack(expert.get_data(), -1), t[PAST:])
        np.testing.assert_array_equal(np.stack(predicted.get_data(), -1), p[PAST:])
        error = np.hypot(*(2 * t[PAST:]).T).mean()  # pred = -true
        assert ax.get_xlabel() == "x" and ax.get_ylabel() == "y" and ax.get_title().endswith(f"error {error:.3f}")
        left, right, bottom, top = ax.get_images()[0].get_extent()
        assert left < -1 < 1 < right and bottom < -1 < 1 < top
    legend = [x.get_text() for x in axes[2].get_legend().get_texts()]
    assert legend == ["success", "failure", "target"] and axes[2].get_title() == "rollouts: 1/2 succeeded"
    path = draw_predictions(images, true, pred, mask, config, str(tmp_path / "p.png"), rollouts=rollouts)
    from PIL import Image

    assert Image.open(path).size == (1020, 390) and os.listdir(tmp_path) == ["p.png"]


def test_cli_on_a_briefly_trained_policy(tmp_path):
    run_dir = str(tmp_path / "run")
    bindings = [
        f"experiment.output_dir = '{run_dir}'",
        "experiment.total_train_samples = 24",  # 3 steps of 8
        "experiment.num_checkpoints = 1",
        "experiment.log_every_n_steps = 1",
        "hparams.global_batch_size = 8",
        "hparams.per_gpu_batch_size = 8",
        "vit_backbone.n_layers = 1",
        "transformer.n_layers = 1",
    ]
    run(train_command("vla_quickstart.gin", bindings))
    evaluate = [sys.executable, "-m", "launch.eval_policy", f"--run_dir={run_dir}", "--num_episodes=2"]
    evaluate += ["--num_inference_steps=2", "--num_plot_samples=2", "--max_steps=8"]
    summary = last_json(run(evaluate))
    assert summary["num_episodes"] == 2 and 0.0 <= summary["success_rate"] <= 1.0
    assert 0.0 <= summary["random_success_rate"] <= 1.0 and np.isfinite(summary["val_action_error"])
    assert os.path.isfile(summary["plot"]) and summary["plot"].startswith(run_dir)
