"""Validation during training: ``total_val_samples`` held-out samples scored every ``val_every_n_checkpoints``."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.fixtures.paths import TINY
from tests.fixtures.runs import tiny_experiment
from vla_foundry_jax.params import ParamsError
from vla_foundry_jax.training.loop import train


def _rows(run: str) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_val_loss_logged_at_due_checkpoints_and_matches_a_hand_average(tmp_path):
    run = str(tmp_path / "run")
    exp = tiny_experiment(run, steps=8)
    val = os.path.join(TINY, "text_untokenized", "manifest.jsonl")
    exp = exp.replace(
        num_checkpoints=4,
        total_val_samples=10,  # rounded up to whole global batches: 3 of 4 = 12 samples
        val_every_n_checkpoints=2,
        data=exp.data.replace(val_dataset_manifest=[val]),
    )
    result = train(exp)
    rows = [r for r in _rows(run) if "val_loss" in r]
    assert [r["step"] for r in rows] == [4, 8]  # checkpoints at 2, 4, 6, 8; every second one validates
    assert all(r["val_samples"] == 12 for r in rows)
    assert rows[1]["val_loss"] < rows[0]["val_loss"]  # it learns the corpus it is scored on

    # Independent check of the last figure: score the same batches by hand with the final model.
    from vla_foundry_jax.data.pipeline import build_eval_iterator
    from vla_foundry_jax.layers.losses import cross_entropy_with_z_loss

    model = result.model()
    total, seen = 0.0, 0
    for _, batch in zip(range(3), build_eval_iterator(exp.data, global_batch_size=4), strict=False):
        ids = batch["input_ids"]
        logits = np.asarray(model(ids[:, :-1]).logits)
        loss, _ = cross_entropy_with_z_loss(logits, ids[:, 1:], batch["loss_mask"][:, 1:])
        n = int(batch["valid"].sum())
        total, seen = total + n * float(loss), seen + n
    assert seen == 12
    np.testing.assert_allclose(rows[1]["val_loss"], total / seen, rtol=1e-5)


def test_validation_needs_held_out_data_and_enough_of_it(tmp_path):
    exp = tiny_experiment(str(tmp_path / "a"))
    with pytest.raises(ParamsError, match="val_dataset_manifest"):
        train(exp.replace(total_val_samples=4))
    val = os.path.join(TINY, "text_untokenized", "manifest.jsonl")
    with pytest.raises(ParamsError, match="total_val_samples = 100000 but"):
        train(exp.replace(total_val_samples=100000, data=exp.data.replace(val_dataset_manifest=[val])))
    with pytest.raises(ParamsError, match="val_every_n_checkpoints must be positive"):
        exp.replace(total_val_samples=4, val_every_n_checkpoints=0)
    with pytest.raises(ParamsError, match="total_val_samples must be positive"):
        exp.replace(total_val_samples=0)
