"""``python -m launch.train`` end to end: bad input fails before compiling, with the name and the fix."""

from __future__ import annotations

import subprocess

import pytest

from tests.fixtures.multidevice import run
from tests.fixtures.runs import tiny_experiment, train_command
from vla_foundry_jax import parallel
from vla_foundry_jax.params import DistributedParams, ParamsError


def _train(*args: str) -> subprocess.CompletedProcess:
    return run([*train_command("quickstart.gin"), *args], timeout=120, check=False)


@pytest.mark.parametrize(
    "binding, expected",
    [
        ("transformer.n_layer = 3", "n_layers"),
        ("transfomer.n_layers = 3", "transformer"),
        ("transformer.n_heads = 3", "n_heads = 3 does not divide"),
        ("hparams.per_gpu_batch_size = 5", "global_batch_size = 32 must be a multiple"),
        ("text_untokenized.dataset_manifest = ['/nowhere/manifest.jsonl']", "/nowhere/manifest.jsonl"),
    ],
)
def test_bad_bindings_fail_before_training(binding, expected, tmp_path):
    res = _train(f"--gin_bindings={binding}", f"--gin_bindings=experiment.output_dir = '{tmp_path}/run'")
    assert res.returncode != 0
    assert expected in res.stderr, res.stderr[-2000:]
    assert "step 1/" not in res.stderr  # nothing trained


def test_missing_gin_file_is_named():
    res = run(train_command("quickstrat.gin"), timeout=120, check=False)
    assert res.returncode != 0 and "quickstrat.gin" in res.stderr and "quickstart.gin" in res.stderr


def test_mesh_that_does_not_fit_the_devices():
    with pytest.raises(parallel.MeshError, match="needs 4 devices but 1 are available"):
        parallel.mesh_shape(DistributedParams(data_parallelism=2, fsdp_parallelism=2), 1)
    assert parallel.mesh_shape(DistributedParams(data_parallelism=2, fsdp_parallelism=-1, tensor_parallelism=2), 8) == (
        2,
        2,
        2,
    )


def test_budget_errors_name_the_fields():
    from vla_foundry_jax.training.loop import make_budget

    mesh = parallel.make_mesh(DistributedParams())
    exp = tiny_experiment(None)
    with pytest.raises(ParamsError, match="total_train_samples"):
        make_budget(exp.replace(total_train_samples=1), mesh)
    budget = make_budget(
        exp.replace(hparams=exp.hparams.replace(global_batch_size=8, per_gpu_batch_size=2), total_train_samples=80),
        mesh,
    )
    assert budget.accum_steps == 4 and budget.total_steps == 10 and budget.checkpoint_steps == (5, 10)
