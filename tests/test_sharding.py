"""The train step on 8 simulated CPU devices (fsdp=8; data=2 x fsdp=2 x tensor=2) and on two processes
joined by jax.distributed on loopback, each matching the single-device losses within 1e-5."""

from __future__ import annotations

import socket

import pytest

from tests.fixtures.multidevice import assert_losses_match, finish, losses_on_one_and_eight_devices, start
from tests.fixtures.runs import logged_losses, tiny_train_command, train_command

STEPS, BATCH = 6, 16


def _run(out_dir, devices, bindings, extra_args=()):
    return start(tiny_train_command(out_dir, STEPS, bindings, batch=BATCH) + list(extra_args), devices=devices)


def _finish(proc):
    done = finish(proc, timeout=420)
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def single_device_losses(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("single"))
    _finish(_run(out, 1, []))
    return logged_losses(out)


def _assert_close(a, b):
    assert_losses_match(a, b, list(range(1, STEPS + 1)), 1e-5)


@pytest.mark.parametrize(
    "mesh",
    [
        {"data": 1, "fsdp": 8, "tensor": 1},
        {"data": 2, "fsdp": 2, "tensor": 2},
    ],
    ids=["fsdp8", "data2_fsdp2_tensor2"],
)
def test_eight_devices_match_one(tmp_path, single_device_losses, mesh):
    shards = mesh["data"] * mesh["fsdp"]
    bindings = [
        f"distributed.data_parallelism = {mesh['data']}",
        f"distributed.fsdp_parallelism = {mesh['fsdp']}",
        f"distributed.tensor_parallelism = {mesh['tensor']}",
        f"hparams.per_gpu_batch_size = {BATCH // shards}",
    ]
    out = str(tmp_path / "run")
    log = _finish(_run(out, 8, bindings))
    assert f"'fsdp': {mesh['fsdp']}" in log
    _assert_close(single_device_losses, logged_losses(out))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path, single_device_losses):
    port = _free_port()
    out = str(tmp_path / "run")
    bindings = [
        "distributed.fsdp_parallelism = -1",
        "distributed.data_parallelism = 1",
        "hparams.per_gpu_batch_size = 2",
    ]
    procs = [
        _run(out, 4, bindings, [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"])
        for i in range(2)
    ]
    logs = [_finish(p) for p in procs]
    assert "process 0 of 2" in logs[0] and "process 1 of 2" in logs[1]
    _assert_close(single_device_losses, logged_losses(out))
    # the same command again: both processes restore the last checkpoint together and find nothing to do
    port = _free_port()
    procs = [
        _run(out, 4, bindings, [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"])
        for i in range(2)
    ]
    logs = [_finish(p) for p in procs]
    assert all("resuming from" in log and "nothing to do" in log for log in logs)


def _vlm_command(out_dir: str, bindings: list[str]) -> list[str]:
    base = [
        f"experiment.output_dir = '{out_dir}'",
        "experiment.total_train_samples = 64",  # 4 steps of 16
        "experiment.log_every_n_steps = 1",
        "hparams.global_batch_size = 16",
        "hparams.per_gpu_batch_size = 16",
    ]
    return train_command("vlm_quickstart.gin", [*base, *bindings])


def test_vlm_on_eight_devices_matches_one(tmp_path):
    one, sharded = losses_on_one_and_eight_devices(_vlm_command, tmp_path, timeout=420)
    assert_losses_match(one, sharded, [1, 2, 3, 4], 1e-5)
