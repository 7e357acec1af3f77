"""The headline chain, end to end on tiny configs: LLM on text -> VLM on image captions (language model started
from the LLM run) -> VLA policy on robotics data (backbone = the VLM run), each step one ``launch.train``
command with the shipped gin files, then ``launch.eval_policy`` on the policy.

Freezing the carried sub-model in each later step makes the hand-over checkable: the LLM's block weights must
reappear unchanged in the VLM run and again inside the policy's backbone, and the policy's token table must be
the VLM's rows plus one action row equal to their mean.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.fixtures.multidevice import last_json, run
from tests.fixtures.runs import train_command

STEPS = 3
BATCH = 8


def _train(gin_file: str, out_dir: str, bindings: list[str]) -> None:
    base = [
        f"experiment.output_dir = '{out_dir}'",
        f"experiment.total_train_samples = {STEPS * BATCH}",
        "experiment.num_checkpoints = 1",
        f"hparams.global_batch_size = {BATCH}",
        f"hparams.per_gpu_batch_size = {BATCH}",
    ]
    run(train_command(gin_file, [*base, *bindings]))


def _weights(run_dir: str) -> dict[str, np.ndarray]:
    ckpts = os.path.join(run_dir, "checkpoints")
    step = max(int(s) for s in os.listdir(ckpts) if s.isdigit())
    return {
        k: np.asarray(v) for k, v in ocp.PyTreeCheckpointer().restore(os.path.join(ckpts, str(step), "model")).items()
    }


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    llm, vlm, vla = (str(root / name) for name in ("llm", "vlm", "vla"))
    _train("quickstart.gin", llm, ["experiment.sample_prompt = None"])
    _train("chain_vlm.gin", vlm, [f"transformer.resume_from_checkpoint = '{llm}'", "transformer.freeze = True"])
    _train(
        "chain_vla.gin",
        vla,
        [
            f"vlm_foundry_backbone.resume_from_checkpoint = '{vlm}'",
            "vlm_foundry_backbone.freeze = True",
            "experiment.total_val_samples = 8",  # validation with the policy's sampled-action error
        ],
    )
    return llm, vlm, vla


def test_llm_weights_reach_the_vlm_and_the_policy(chain):
    llm, vlm, vla = (_weights(d) for d in chain)
    blocks = [k for k in llm if k.startswith("layers.") or k.startswith("norm.")]
    assert blocks
    for name in blocks:
        np.testing.assert_array_equal(vlm[f"transformer.{name}"], llm[name], err_msg=name)
        np.testing.assert_array_equal(vla[f"vision_language_backbone.transformer.{name}"], llm[name], err_msg=name)
    for name in (k for k in vlm if k.startswith("vit.") or k == "projection"):
        np.testing.assert_array_equal(vla[f"vision_language_backbone.{name}"], vlm[name], err_msg=name)


def test_policy_token_table_has_the_action_row(chain):
    _, vlm, vla = (_weights(d) for d in chain)
    old = vlm["transformer.embeddings"]
    new = vla["vision_language_backbone.transformer.embeddings"]
    assert new.shape == (old.shape[0] + 1, old.shape[1])
    np.testing.assert_array_equal(new[:-1], old)
    np.testing.assert_allclose(new[-1], old.mean(axis=0), rtol=1e-5, atol=1e-6)


def test_policy_trains_and_evaluates(chain):
    _, _, vla = chain
    with open(os.path.join(vla, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) >= 1 and all(np.isfinite(losses))
    (val,) = [r for r in rows if "val_loss" in r]
    assert val["step"] == STEPS and val["val_samples"] == 8
    assert np.isfinite(val["val_loss"]) and 0.0 < val["val_action_mse"] < 10.0
    result = last_json(run([sys.executable, "-m", "launch.eval_policy", f"--run_dir={vla}", "--num_episodes=2"]))
    assert 0.0 <= result["success_rate"] <= 1.0 and result["num_episodes"] == 2
    assert os.path.exists(os.path.join(vla, "eval_policy.png"))


def test_policy_loads_without_its_source_vlm_run(chain):
    """The policy run keeps its vlm_foundry_backbone's source VLM params in <run>/data (training/run_data.py)."""
    from vla_foundry_jax.sampling import load_run_model

    _, vlm, vla = chain
    copy = os.path.join(vla, "data", "source_vlm", "vision_language_backbone", "params.json")
    assert os.path.isfile(copy)
    os.rename(vlm, vlm + "_gone")
    try:
        model, exp, _ = load_run_model(vla)
    finally:
        os.rename(vlm + "_gone", vlm)
    backbone = exp.model.vision_language_backbone
    assert backbone.vlm_experiment_dir == os.path.dirname(copy) and backbone.resume_from_checkpoint is None
    np.testing.assert_array_equal(
        np.asarray(model.vision_language_backbone.transformer.embeddings[...]),
        _weights(vla)["vision_language_backbone.transformer.embeddings"],
    )
