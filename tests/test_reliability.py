"""Runs you can trust (issue 11, items 1-4): divergence never reaches the weights or a checkpoint, a damaged
newest checkpoint falls back to the previous one, SIGTERM / SIGINT save and exit, a failed save stops the run.

Faults are real: real signals to real ``python -m launch.train`` processes, real damaged files, a real full
filesystem (a small tmpfs) and a real permission fault (an immutable directory, which stops root too).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.fixtures.multidevice import run, subprocess_env
from tests.fixtures.paths import ROOT
from tests.fixtures.runs import logged_losses, tiny_experiment, tiny_train_command
from vla_foundry_jax import checkpoint as ckpt_lib
from vla_foundry_jax import parallel
from vla_foundry_jax.params import DistributedParams, EMAParams, HyperParams, ParamsError, TransformerParams
from vla_foundry_jax.registry import get_loss
from vla_foundry_jax.training.loop import train
from vla_foundry_jax.training.optimizer import make_optimizer
from vla_foundry_jax.training.reliability import (
    EXIT_INTERRUPTED_AT_ONCE,
    EXIT_PREEMPTED,
    NonFiniteError,
    NonFiniteMonitor,
)
from vla_foundry_jax.training.state import init_train_state, make_model_spec
from vla_foundry_jax.training.step import make_train_step


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return run(cmd, timeout=timeout, check=False)


def _records(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _steps(out: str) -> list[int]:
    d = os.path.join(out, "checkpoints")
    return sorted(int(s) for s in os.listdir(d) if s.isdigit())


def _stored_weights(step_dir: str) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in ocp.PyTreeCheckpointer().restore(os.path.join(step_dir, "model")).items()}


def _all_finite(step_dir: str) -> bool:
    return all(np.isfinite(v).all() for v in _stored_weights(step_dir).values())


# ---------------------------------------------------------------- 1. non-finite guard


def test_nonfinite_policy_fields_are_validated():
    with pytest.raises(ParamsError, match="nonfinite_policy = 'ignore'"):
        HyperParams(nonfinite_policy="ignore")
    with pytest.raises(ParamsError, match="max_consecutive_nonfinite = 0"):
        HyperParams(max_consecutive_nonfinite=0)
    assert HyperParams().nonfinite_policy == "halt"


def test_nonfinite_step_leaves_weights_optimizer_and_ema_unchanged():
    """A step whose loss is NaN changes nothing but the step counter; the next finite step trains as usual."""
    model_params = TransformerParams(hidden_dim=32, n_layers=2, n_heads=2, vocab_size=50, max_seq_len=32)
    hp = HyperParams(precision="fp32", lr=1e-2, warmup="0")
    ema = EMAParams(enabled=True)
    mesh = parallel.make_mesh(DistributedParams(), jax.devices()[:1])
    spec = make_model_spec(model_params, hp, mesh)
    opt = make_optimizer(hp, 100)
    state = init_train_state(spec, opt, hp, use_ema=True)
    lm_loss = get_loss(model_params.type)

    def poisoned_loss(model, batch, **kw):  # NaN when the batch says so: a real non-finite loss and gradient
        loss, metrics = lm_loss(model, batch, **kw)
        return jnp.where(batch["poison"][0], jnp.nan, 1.0) * loss, metrics

    step = make_train_step(
        spec,
        poisoned_loss,
        opt,
        hp,
        ema,
        accum_steps=1,
        total_steps=100,
        state_shardings=jax.tree.map(lambda x: x.sharding, state),
    )
    ids = np.random.default_rng(0).integers(0, 50, size=(8, 17)).astype(np.int32)
    batch = {"input_ids": ids, "loss_mask": np.ones((8, 17), bool)}
    state, m = step(state, {**batch, "poison": np.zeros(8, bool)})  # one good step: EMA and moments non-trivial
    assert int(m["nonfinite"]) == 0
    before = jax.tree.map(np.array, {k: state[k] for k in ("params", "opt_state", "ema")})
    state, m = step(state, {**batch, "poison": np.ones(8, bool)})
    assert int(m["nonfinite"]) == 1 and not np.isfinite(float(m["loss"]))
    assert int(state["step"]) == 2  # the batch is consumed: the data position and checkpoints follow the step
    after = jax.tree.map(np.array, {k: state[k] for k in ("params", "opt_state", "ema")})
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)
    state, m = step(state, {**batch, "poison": np.zeros(8, bool)})
    assert int(m["nonfinite"]) == 0
    moved = [
        not np.array_equal(a, np.asarray(b))
        for a, b in zip(jax.tree.leaves(before["params"]), jax.tree.leaves(state["params"]), strict=True)
    ]
    assert all(moved)


def test_skip_policy_counts_and_halts_after_n_in_a_row():
    monitor = NonFiniteMonitor(HyperParams(nonfinite_policy="skip", max_consecutive_nonfinite=3), skipped_before=5)
    bad, good = {"nonfinite": 1, "loss": float("nan"), "grad_norm": float("nan")}, {"nonfinite": 0}
    for step, m in enumerate([bad, bad, good, bad, bad], start=10):
        monitor.observe(step, m, lambda: "/run/checkpoints/8")
    assert monitor.skipped == 9 and monitor.in_a_row == 2
    with pytest.raises(NonFiniteError, match=r"steps 13-15: 3 non-finite steps in a row .* /run/checkpoints/8"):
        monitor.observe(15, bad, lambda: "/run/checkpoints/8")
    halt = NonFiniteMonitor(HyperParams())
    with pytest.raises(NonFiniteError, match=r"step 3: non-finite loss = nan.*no checkpoint had been saved yet"):
        halt.observe(3, bad, lambda: None)


DIVERGE = ["hparams.lr = 1e6", "hparams.grad_clip_norm = 0.0", "experiment.max_checkpoint_limit = 2"]


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """A finished 4-step run (checkpoints 2 and 4, at most 2 kept), as the issue's divergence case continues."""
    out = str(tmp_path_factory.mktemp("good") / "run")
    res = _run(tiny_train_command(out, 4, ["experiment.max_checkpoint_limit = 2", "hparams.grad_clip_norm = 1.0"]))
    assert res.returncode == 0, res.stderr[-3000:]
    assert _steps(out) == [2, 4]
    return out


def test_divergence_halts_keeps_every_good_checkpoint_and_exits_nonzero(good_run, tmp_path):
    """Before: NaN weights saved at 6 and 8, rotation deleted 2 and 4, exit 0. Now: stop at the first NaN step."""
    out = str(tmp_path / "run")
    shutil.copytree(good_run, out)
    good = {s: _stored_weights(os.path.join(out, "checkpoints", str(s))) for s in (2, 4)}
    # continuing a finished run under a new lr and budget is a changed experiment: said explicitly
    res = _run([*tiny_train_command(out, 8, [*DIVERGE, "experiment.num_checkpoints = 4"]), "--allow_config_change"])
    assert res.returncode not in (0, EXIT_PREEMPTED), res.stderr[-3000:]
    (last,) = [ln for ln in res.stderr.splitlines() if "non-finite loss" in ln and "training stopped" in ln]
    assert f"the last good checkpoint is {out}/checkpoints/4" in last
    bad_step = int(last.split("step ")[1].split(":")[0])
    assert bad_step > 4
    assert _steps(out) == [2, 4]  # nothing saved from the bad step on, nothing rotated away
    for s in (2, 4):
        stored = _stored_weights(os.path.join(out, "checkpoints", s.__str__()))
        for k, v in good[s].items():
            np.testing.assert_array_equal(stored[k], v)
    recs = {r["step"]: r for r in _records(out)}
    assert recs[bad_step]["nonfinite"] == 1 and max(recs) == bad_step


def test_divergence_with_skip_counts_and_never_saves_nonfinite_weights(good_run, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(good_run, out)
    skip = [*DIVERGE, "experiment.num_checkpoints = 4", "hparams.nonfinite_policy = 'skip'"]
    res = _run([*tiny_train_command(out, 8, skip), "--allow_config_change"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "update skipped" in res.stderr
    recs = {r["step"]: r for r in _records(out)}
    skipped = [s for s in range(5, 9) if recs[s]["nonfinite"] == 1]
    assert skipped, "lr = 1e6 should have produced non-finite steps"
    assert [recs[s]["nonfinite_skipped"] for s in range(5, 9)] == list(
        np.cumsum([recs[s]["nonfinite"] for s in range(5, 9)])
    )
    # rotation (2 kept) deleted only finite checkpoints: the ones kept are finite too
    assert _steps(out) == [6, 8]
    assert all(_all_finite(os.path.join(out, "checkpoints", str(s))) for s in (6, 8))
    # a resumed run continues the count
    again = _run([*tiny_train_command(out, 10, skip), "--allow_config_change"])
    assert again.returncode == 0, again.stderr[-3000:]
    recs = {r["step"]: r for r in _records(out)}
    assert recs[10]["nonfinite_skipped"] >= recs[8]["nonfinite_skipped"]


# ---------------------------------------------------------------- 2. damaged newest checkpoint


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("finished") / "run")
    result = train(tiny_experiment(out, steps=4))
    return out, {r["step"]: r["loss"] for r in _records(out)}, float(result.metrics["loss"])


def _damage(step_dir: str, kind: str) -> None:
    if kind == "train_item_deleted":
        shutil.rmtree(os.path.join(step_dir, "train"))
        return
    for root, _, files in os.walk(step_dir):
        for name in files:
            path = os.path.join(root, name)
            size = os.path.getsize(path)
            if kind == "data_files_truncated" and f"{os.sep}d{os.sep}" not in path:
                continue
            with open(path, "r+b") as f:
                if kind in ("truncated", "data_files_truncated"):
                    f.truncate(size // 2)
                elif kind == "zeroed":
                    f.write(b"\0" * size)
                elif kind == "emptied":
                    f.truncate(0)


@pytest.mark.parametrize("kind", ["truncated", "train_item_deleted", "zeroed", "emptied", "data_files_truncated"])
def test_damaged_newest_checkpoint_falls_back_and_finishes_the_same(finished_run, kind, tmp_path, caplog):
    src, losses, final = finished_run
    out = str(tmp_path / "run")
    shutil.copytree(src, out)
    _damage(os.path.join(out, "checkpoints", "4"), kind)
    with caplog.at_level(logging.WARNING):
        result = train(tiny_experiment(out, steps=4))
    warnings = [r.getMessage() for r in caplog.records if "do not restore" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "step(s) 4 under" in warnings[0] and "resuming from step 2" in warnings[0]
    assert os.path.isdir(os.path.join(out, "checkpoints_corrupt", "4"))  # moved aside, not deleted
    assert _steps(out) == [2, 4]  # step 4 trained again and saved
    recs = _records(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 3, 4]  # resumed from 2
    assert [r["loss"] for r in recs[4:]] == [losses[3], losses[4]]  # exactly the uninterrupted losses
    assert float(result.metrics["loss"]) == final


def test_when_no_checkpoint_restores_nothing_is_moved(finished_run, tmp_path):
    """Every step failing means a changed config far more often than damage: refuse, list each step, move nothing."""
    src, _, _ = finished_run
    out = str(tmp_path / "run")
    shutil.copytree(src, out)
    _damage(os.path.join(out, "checkpoints", "4"), "zeroed")
    with pytest.raises(ckpt_lib.CheckpointError, match=r"(?s)no checkpoint under .* restores.*step 4: .*step 2: "):
        # 2 is intact but was trained with hidden_dim 32 (the rerun check is waived to reach the restore)
        train(tiny_experiment(out, steps=4, hidden_dim=48), allow_config_change=True)
    assert _steps(out) == [2, 4] and not os.path.exists(os.path.join(out, "checkpoints_corrupt"))


# ---------------------------------------------------------------- 3. preemption

PREEMPT_STEPS = 60


@pytest.fixture(scope="module")
def straight_losses(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("straight") / "run")
    res = _run(tiny_train_command(out, PREEMPT_STEPS))
    assert res.returncode == 0, res.stderr[-3000:]
    return logged_losses(out)


def _start(out: str, log: str, steps: int = PREEMPT_STEPS) -> subprocess.Popen:
    with open(log, "w") as err:  # a file, not a pipe: the child never blocks on a full pipe
        return subprocess.Popen(
            tiny_train_command(out, steps), cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=err
        )


def _wait_for_step(proc: subprocess.Popen, out: str, step: int, timeout: float = 240) -> int:
    path = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before the signal"
        if os.path.exists(path):
            logged = max(logged_losses(out), default=0)
            if logged >= step:
                return logged
        time.sleep(0.005)
    raise AssertionError(f"no step {step} logged in {timeout} s")


def test_sigint_then_sigterm_save_and_the_rerun_continues_exactly(straight_losses, tmp_path):
    out, log = str(tmp_path / "run"), str(tmp_path / "stderr.txt")
    stopped = []
    for sig, at in ((signal.SIGINT, 3), (signal.SIGTERM, PREEMPT_STEPS // 2 + 2)):
        proc = _start(out, log)
        _wait_for_step(proc, out, at)
        proc.send_signal(sig)
        proc.wait(timeout=240)
        err = open(log).read()
        assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
        assert "Traceback" not in err
        name = signal.Signals(sig).name
        line = [ln for ln in err.splitlines() if f"{name}: stopped after step" in ln]
        assert len(line) == 1, err[-3000:]
        step = int(line[0].split("stopped after step ")[1].split("/")[0])
        assert f"saved {out}/checkpoints/{step};" in line[0] and "run the same command again" in line[0]
        assert step in _steps(out) and step < PREEMPT_STEPS
        stopped.append(step)
    done = _run(tiny_train_command(out, PREEMPT_STEPS))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {out}/checkpoints/{stopped[-1]}" in done.stderr
    got = logged_losses(out)
    assert sorted(got) == list(range(1, PREEMPT_STEPS + 1))
    assert all(got[s] == straight_losses[s] for s in got), [(s, got[s], straight_losses[s]) for s in got]


def test_second_ctrl_c_exits_at_once_and_the_last_checkpoint_stays_usable(straight_losses, tmp_path):
    out, log = str(tmp_path / "run"), str(tmp_path / "stderr.txt")
    proc = _start(out, log)
    half = os.path.join(out, "checkpoints", str(PREEMPT_STEPS // 2))
    deadline = time.time() + 240
    while not os.path.isdir(half) and time.time() < deadline:  # committed (Orbax renames a finished save)
        assert proc.poll() is None
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    while "finishing the current step" not in open(log).read() and proc.poll() is None:
        time.sleep(0.002)  # the first SIGINT is handled: the second is a separate press
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    err = open(log).read()
    assert proc.returncode == EXIT_INTERRUPTED_AT_ONCE, err[-3000:]
    assert "SIGINT again: exiting now without saving" in err and "Traceback" not in err
    done = _run(tiny_train_command(out, PREEMPT_STEPS))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stderr
    got = logged_losses(out)
    assert all(got[s] == straight_losses[s] for s in range(1, PREEMPT_STEPS + 1))


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    """Multi-host: JAX's preemption notifier takes the SIGTERM of one host to the coordination service, and every
    host saves the same step (``reached_preemption_sync_point``)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "run")
    mesh = ["distributed.fsdp_parallelism = -1", "distributed.data_parallelism = 1", "hparams.per_gpu_batch_size = 4"]
    procs, logs = [], []
    for i in range(2):
        cmd = [
            *tiny_train_command(out, PREEMPT_STEPS, mesh),
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
        ]
        logs.append(str(tmp_path / f"stderr{i}.txt"))
        with open(logs[-1], "w") as err:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(1), stdout=subprocess.DEVNULL, stderr=err))
    try:
        _wait_for_step(procs[0], out, 3)
        procs[1].send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=240)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    errs = [open(log).read() for log in logs]
    assert [p.returncode for p in procs] == [EXIT_PREEMPTED] * 2, [e[-2000:] for e in errs]
    lines = [[ln.split("] ", 1)[1] for ln in e.splitlines() if "SIGTERM: stopped after step" in ln] for e in errs]
    assert len(lines[0]) == 1 and lines[0] == lines[1]  # the same step on both hosts
    step = int(lines[0][0].split("stopped after step ")[1].split("/")[0])
    assert _steps(out) == [step] and step < PREEMPT_STEPS


# ---------------------------------------------------------------- 4. failed saves


def _mount_tmpfs(path: str, size: str) -> bool:
    os.makedirs(path, exist_ok=True)
    return (
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True).returncode
        == 0
    )


def test_disk_full_during_a_background_save_stops_the_run_at_once(tmp_path):
    """A real full disk: ``<output_dir>/checkpoints`` is a tmpfs with room for one checkpoint, not two."""
    out = str(tmp_path / "run")
    ckpt_dir = os.path.join(out, "checkpoints")
    if not _mount_tmpfs(ckpt_dir, "1400k"):
        pytest.skip("mounting a tmpfs needs root with CAP_SYS_ADMIN")
    try:
        res = _run(tiny_train_command(out, 40, ["experiment.num_checkpoints = 4"]))  # saves due at 10,20,30,40
        assert res.returncode not in (0, EXIT_PREEMPTED)
        # the error's line (Orbax's own background-thread logs and its interpreter-shutdown noise surround it)
        (last,) = [ln for ln in res.stderr.splitlines() if "saving the checkpoint" in ln]
        assert f"saving the checkpoint {ckpt_dir}/20 failed: No space left on device" in last, res.stderr[-3000:]
        assert f"the previous checkpoint {ckpt_dir}/10 is intact" in last
        assert max(logged_losses(out)) < 30  # stopped well before the next save would have noticed
        assert _steps(out) == [10]
        assert _all_finite(os.path.join(ckpt_dir, "10"))
        assert ckpt_lib.load_experiment_params(out).total_train_samples == 40 * 8
    finally:
        subprocess.run(["umount", ckpt_dir], check=False)


def test_permission_fault_on_save_names_the_directory(finished_run, tmp_path):
    """A real permission fault that stops root: the checkpoints directory is made immutable (chattr +i)."""
    src, _, _ = finished_run
    out = str(tmp_path / "run")
    shutil.copytree(src, out)
    ckpt_dir = os.path.join(out, "checkpoints")
    if subprocess.run(["chattr", "+i", ckpt_dir], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        with pytest.raises(ckpt_lib.CheckpointSaveError) as err:
            # resumes at 4 with a longer budget; saves due at 6 and 8
            train(tiny_experiment(out, steps=8).replace(num_checkpoints=4), allow_config_change=True)
    finally:
        subprocess.run(["chattr", "-i", ckpt_dir], check=False)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"saving the checkpoint {ckpt_dir}/6 failed: Operation not permitted" in msg, msg
    assert f"the previous checkpoint {ckpt_dir}/4 is intact" in msg
    assert _steps(out) == [2, 4] and max(r["step"] for r in _records(out)) == 6
    assert _all_finite(os.path.join(ckpt_dir, "4"))


# ---------------------------------------------------------------- reruns of the same output_dir


def test_rerun_with_a_changed_experiment_is_refused_with_the_changes(finished_run, tmp_path, caplog):
    src, _, _ = finished_run
    out = str(tmp_path / "run")
    shutil.copytree(src, out)
    before = open(os.path.join(out, "params.json")).read()
    exp = tiny_experiment(out, steps=4)
    with pytest.raises(ParamsError) as err:
        train(exp.replace(hparams=exp.hparams.replace(lr=2e-2), total_train_samples=32))
    msg = str(err.value)
    assert "hparams.lr: 0.01 -> 0.02" in msg and "total_train_samples: 16 -> 32" in msg
    assert "--allow_config_change" in msg and out in msg
    assert open(os.path.join(out, "params.json")).read() == before  # nothing was written
    # how the run executes is not the experiment: another mesh, micro-batch, logging or checkpoint count is fine
    same = exp.replace(
        log_every_n_steps=3,
        num_checkpoints=1,
        distributed=exp.distributed.replace(fsdp_parallelism=1, data_parallelism=1),
        hparams=exp.hparams.replace(per_gpu_batch_size=2),
    )
    train(same)
    # the explicit override continues under the new values and says so
    with caplog.at_level(logging.WARNING):
        train(exp.replace(hparams=exp.hparams.replace(lr=2e-2)), allow_config_change=True)
    assert any("changed experiment: hparams.lr: 0.01 -> 0.02" in r.getMessage() for r in caplog.records)


def test_resume_from_checkpoint_beside_existing_checkpoints_says_which_wins(finished_run, tmp_path, caplog):
    src, _, _ = finished_run
    out, other = str(tmp_path / "run"), str(tmp_path / "other")
    shutil.copytree(src, out)
    shutil.copytree(src, other)
    exp = tiny_experiment(out, steps=4)
    with caplog.at_level(logging.WARNING):
        train(exp.replace(model=exp.model.replace(resume_from_checkpoint=other)), allow_config_change=True)
    (said,) = [r.getMessage() for r in caplog.records if "only seed a new run" in r.getMessage()]
    assert f"{out} already has checkpoints: the run continues from step 4" in said
    assert "transformer.resume_from_checkpoint" in said
