"""Experiment tracking (issue 18): wandb in offline mode (the files it writes, resume under the same run id,
failures that never stop training), the step-time breakdown and FLOPs, run curves (local and on S3) and their
CLI's bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest
from PIL import Image

from tests.fixtures.multidevice import subprocess_env
from tests.fixtures.paths import ROOT
from tests.fixtures.runs import tiny_experiment, tiny_train_command
from tests.fixtures.wandb_log import offline_runs, run_contents
from vla_foundry_jax.params import ParamsError
from vla_foundry_jax.training import tracking
from vla_foundry_jax.training.curves import CurvesError, plot_runs, read_metrics
from vla_foundry_jax.training.flops import peak_flops, step_flops
from vla_foundry_jax.training.loop import train

GIN = "experiment.wandb_project = 'vft-test'\nhparams.lr = 0.01\n"
TIMING = ("step_time_s", "data_wait_s", "compute_s", "checkpoint_s", "eval_s", "samples_per_s_per_device")


def _wandb_env(mp: pytest.MonkeyPatch, wandb_dir: str) -> None:
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_DIR", wandb_dir)
    mp.setenv("WANDB_SILENT", "true")
    mp.delenv("WANDB_API_KEY", raising=False)


def _records(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    """A tiny LM run logging to wandb offline: 2 steps, then resumed to 4 under a larger budget."""
    tmp = tmp_path_factory.mktemp("wandb_run")
    out, wandb_dir = str(tmp / "run"), str(tmp / "wandb_dir")
    os.makedirs(wandb_dir)
    exp = tiny_experiment(out, steps=2).replace(
        wandb_project="vft-test", wandb_run_name="tiny", wandb_tags=("ci", "tiny"), wandb_group="g1"
    )
    import wandb

    with pytest.MonkeyPatch.context() as mp:
        _wandb_env(mp, wandb_dir)
        try:
            train(exp, gin_config=GIN)
            result = train(exp.replace(total_train_samples=16), gin_config=GIN, allow_config_change=True)
        finally:
            wandb.teardown()  # stops this process's wandb-core and takes its address out of os.environ
    return out, wandb_dir, result


def test_wandb_offline_logs_every_metric_the_config_and_resumes_the_same_run(wandb_run):
    out, wandb_dir, _ = wandb_run
    with open(os.path.join(out, tracking.WANDB_RUN_ID_FILE)) as f:
        run_id = f.read().strip()
    runs = [run_contents(d) for d in offline_runs(wandb_dir)]
    assert len(runs) == 2  # the first run and its resume, under one id
    for r in runs:
        assert r["run"].run_id == run_id and r["run"].project == "vft-test" and r["run"].display_name == "tiny"
        assert list(r["run"].tags) == ["ci", "tiny"] and r["run"].run_group == "g1"
        assert r["config"]["gin_config"] == GIN and r["config"]["hparams"]["lr"] == 0.01
        assert r["config"]["wandb_project"] == "vft-test" and r["config"]["model"]["hidden_dim"] == 32
    assert runs[1]["config"]["total_train_samples"] == 16
    logged = {}
    for r in runs:
        for row in r["history"]:
            logged[row["step"]] = row
    records = _records(out)
    assert sorted(logged) == [1, 2, 3, 4] and len(records) == 4
    for rec in records:
        row = logged[rec["step"]]
        for key, value in rec.items():
            if key != "step":
                assert row[f"train/{key}"] == pytest.approx(value, rel=1e-12), key


def test_step_time_breakdown_and_throughput_per_device(wandb_run):
    out, _, result = wandb_run
    records = _records(out)
    devices = jax.device_count()
    for rec in records:
        assert all(rec[k] >= 0 for k in TIMING)
        # host-blocking parts of the wall time of the record's one step
        assert rec["data_wait_s"] + rec["checkpoint_s"] + rec["eval_s"] <= rec["step_time_s"] * 1.001
        assert rec["samples_per_s"] == pytest.approx(4 / rec["step_time_s"])
        assert rec["samples_per_s_per_device"] == pytest.approx(rec["samples_per_s"] / devices)
        assert rec["tokens_per_s_per_device"] == pytest.approx(4 * 16 / rec["step_time_s"] / devices)
        assert "mfu" not in rec  # no known peak on a CPU
    # saves at steps 1, 2 (first run) and 4 (the resume: 2 exists) follow their steps' log lines: a save's time is
    # in the next record of its run (step 2's save and step 4's end a run)
    assert [r["step"] for r in records if r["checkpoint_s"] > 0] == [2]
    assert set(TIMING) <= set(result.metrics)


def test_step_flops_match_the_transformer_formula(wandb_run):
    """The counted FLOPs of the tiny LM's step against 6 N T (N: matmul weights, T: tokens) plus attention."""
    out, _, result = wandb_run
    rec = _records(out)[-1]
    counted = rec["tflops_per_s_per_device"] * 1e12 * rec["step_time_s"] * jax.device_count()
    params = jax.tree.leaves(result.state["params"])
    d, layers, seq, tokens = 32, 2, 16, 4 * 16
    embed = 160 * d
    matmul_weights = sum(x.size for x in params if x.ndim >= 2) - embed  # the input embedding is a gather
    tied = not any(x.shape in ((d, 160), (160, d)) for x in params if x.ndim >= 2 and x.size != embed)
    matmul_weights += embed if tied else 0  # a tied output projection is a matmul by the embedding
    attention = 3 * 2 * 2 * layers * seq * d * tokens  # fwd + 2x bwd of QK^T and AV, full (unmasked) square
    assert counted == pytest.approx(6 * matmul_weights * tokens + attention, rel=0.1)


def test_flop_counter_counts_scans_and_convolutions():
    def layers(ws, x):
        h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)
        return h.sum()

    # 4 scanned layers of [64, 256] x [256, 256]: forward, input gradient and weight gradient per layer
    assert (
        step_flops(jax.jit(jax.grad(layers)), jnp.ones((4, 256, 256)), jnp.ones((64, 256))) == 3 * 4 * 2 * 64 * 256**2
    )

    def conv(w, x):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    assert step_flops(conv, jnp.ones((3, 3, 4, 8)), jnp.ones((2, 16, 16, 4))) == 2 * (2 * 16 * 16 * 8) * (3 * 3 * 4)
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("TPU v5 lite") == 197e12 and peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("cpu") is None


def test_curves_written_at_checkpoints(wandb_run):
    out, _, _ = wandb_run
    img = Image.open(os.path.join(out, "curves.png"))
    assert img.format == "PNG" and img.size[0] >= 1000
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_input_bound_rule():
    assert tracking.input_bound(data_wait_s=0.6, step_time_s=1.0, compute_s=0.3)
    assert not tracking.input_bound(data_wait_s=0.6, step_time_s=1.0, compute_s=0.9)  # the device is the pace
    assert not tracking.input_bound(data_wait_s=0.2, step_time_s=1.0, compute_s=0.1)


def test_wandb_missing_or_without_credentials_is_one_error(tmp_path, monkeypatch):
    exp = tiny_experiment(str(tmp_path / "run")).replace(wandb_project="p")
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` sees when it is not installed
    with pytest.raises(tracking.TrackingError, match=r"needs the wandb package.*pip install '\.\[wandb\]'"):
        tracking.check_tracking(exp)
    monkeypatch.delitem(sys.modules, "wandb")
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    with pytest.raises(tracking.TrackingError, match=r"no wandb API key.*wandb login.*WANDB_MODE=offline"):
        tracking.check_tracking(exp)
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "0" * 40 + "\n")
    tracking.check_tracking(exp)  # a `wandb login` entry
    (tmp_path / "netrc").unlink()
    monkeypatch.setenv("WANDB_MODE", "offline")
    tracking.check_tracking(exp)
    with pytest.raises(ParamsError, match=r"without experiment\.wandb_project"):
        tiny_experiment(None).replace(wandb_tags=("a",))


def test_train_cli_without_wandb_fails_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    blocked = "import sys, runpy; sys.modules['wandb'] = None; runpy.run_module('launch.train', run_name='__main__')"
    cmd = [sys.executable, "-c", blocked, "--gin_file=gin_configs/quickstart.gin"]
    cmd += [f"--gin_bindings=experiment.output_dir = '{out}'", "--gin_bindings=experiment.wandb_project = 'p'"]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "needs the wandb package" in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists()


def _kill_wandb_core_under(pid: int) -> bool:
    """SIGKILL the wandb-core process whose parent is ``pid``; whether one was found. (Scans /proc: a task's
    ``children`` list loses a child whose forking thread has ended.)"""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:  # processes come and go while we look
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != pid:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"wandb-core" in f.read():
                    os.kill(int(entry), signal.SIGKILL)
                    return True
        except (FileNotFoundError, ProcessLookupError):
            continue
    return False


def test_tracking_failures_never_stop_training(tmp_path):
    """wandb's service (wandb-core) killed mid-run and a curves.png that cannot be written: warnings, and every
    step trains. A real launch.train process (wandb's broken connection stays in the process that saw it)."""
    out = str(tmp_path / "run")
    os.makedirs(os.path.join(out, "curves.png"))  # a directory where the picture goes: its rename fails
    cmd = tiny_train_command(out, steps=100, bindings=["experiment.wandb_project = 'vft-test'"])
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("WANDB_")}  # its own wandb service
    env.update(WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true")
    metrics = os.path.join(out, "metrics.jsonl")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed, deadline = False, time.time() + 600
    while not killed and proc.poll() is None and time.time() < deadline:
        if os.path.exists(metrics) and os.path.getsize(metrics):  # training has logged its first step
            killed = _kill_wandb_core_under(proc.pid)
        time.sleep(0.005)
    _, stderr = proc.communicate(timeout=600)
    assert killed and proc.returncode == 0, stderr[-3000:]
    assert [r["step"] for r in _records(out)] == list(range(1, 101))
    assert "wandb tracking failed at step" in stderr and "metrics.jsonl still has every metric" in stderr
    assert "could not draw" in stderr and "curves.png" in stderr and "Traceback" not in stderr


def _tiny_metrics(run: str, losses: list[float], batch: int = 4) -> None:
    os.makedirs(run, exist_ok=True)
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        for i, loss in enumerate(losses, 1):
            f.write(json.dumps({"step": i, "loss": loss, "lr": 1e-3, "grad_norm": 1.0, "samples_per_s": 10.0}) + "\n")
        f.write('{"step": 2, "val_loss": 1.5}\n{"step": 3, "lo')  # a validation record; a line cut by a crash
    with open(os.path.join(run, "params.json"), "w") as f:
        json.dump({"hparams": {"global_batch_size": batch}}, f)


def test_plot_runs_local_and_s3(tmp_path, monkeypatch):
    from moto.server import ThreadedMotoServer

    a, b = str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run")
    _tiny_metrics(a, [3.0, 2.0, 1.0])
    _tiny_metrics(b, [3.5, 2.5], batch=8)
    assert read_metrics(a)["loss"] == {1: 3.0, 2: 2.0, 3: 1.0} and read_metrics(a)["val_loss"] == {2: 1.5}
    png = plot_runs([a, b], str(tmp_path / "c.png"), x="samples")
    assert Image.open(png).size == (1560, 720)  # 5 panels: 3 columns x 2 rows
    with pytest.raises(CurvesError, match=r"unknown metric\(s\) \['los'\].*'loss'"):
        plot_runs([a], str(tmp_path / "d.png"), metrics=["los"])
    with pytest.raises(CurvesError, match=r"has no metrics\.jsonl"):
        plot_runs([str(tmp_path)], str(tmp_path / "d.png"))
    open(os.path.join(tmp_path, "metrics.jsonl"), "w").close()
    with pytest.raises(CurvesError, match="holds no metrics yet"):
        plot_runs([str(tmp_path)], str(tmp_path / "d.png"))
    assert not os.path.exists(tmp_path / "d.png")

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for k, v in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()  # an instance cached by another test talks to another endpoint
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("runs")
        fs.put(a, "runs/exp1", recursive=True)
        s3 = plot_runs(["s3://runs/exp1", b], "s3://runs/cmp.png", metrics=["loss", "val_loss"])
        data = fs.cat_file("runs/cmp.png")
        assert s3 == "s3://runs/cmp.png" and data[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def test_plot_runs_cli(tmp_path):
    run = str(tmp_path / "run")
    _tiny_metrics(run, [3.0, 2.0, 1.0])
    base = [sys.executable, "-m", "launch.plot_runs"]
    out = str(tmp_path / "c.png")
    ok = subprocess.run([*base, run, f"--out={out}", "--metrics=loss,lr"], cwd=ROOT, env=subprocess_env(),
                        capture_output=True, text=True, timeout=300)  # fmt: skip
    assert ok.returncode == 0 and ok.stdout.strip() == out, ok.stderr[-2000:]
    # the other bad inputs are the library's (test_plot_runs_local_and_s3); one shows the CLI's report
    proc = subprocess.run([*base, run, "--metrics=loss,nope"], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: unknown metric(s) ['nope']")
    assert len(proc.stderr.strip().splitlines()) == 1
