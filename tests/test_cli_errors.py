"""Every entry point answers bad input with ``error: <message>`` naming what the user gave, exit status 2, and no
traceback (issue 11, item 5). Each case runs the real command in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.fixtures.multidevice import subprocess_env
from tests.fixtures.paths import ROOT, TINY
from tests.fixtures.runs import tiny_train_command

QUICK = ["-m", "launch.train", "--gin_file=gin_configs/quickstart.gin"]


@pytest.fixture(scope="module")
def llm_run(tmp_path_factory) -> str:
    """A finished 2-step LLM run, the wrong kind of run for the VLM / SD / policy commands."""
    out = str(tmp_path_factory.mktemp("cli") / "llm")
    proc = subprocess.run(tiny_train_command(out, 2), cwd=ROOT, env=subprocess_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _fails_cleanly(args: list[str], culprit: str, cwd: str = ROOT) -> str:
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    tail = proc.stderr[proc.stderr.index(errors[0]) :]
    assert culprit in tail, tail
    assert not [ln for ln in proc.stderr.splitlines() if ln.startswith("E1")], proc.stderr  # no error log lines
    return tail


def _train(tmp_path, *bindings: str) -> list[str]:
    return [
        *QUICK,
        f"--gin_bindings=experiment.output_dir = '{tmp_path}/run'",
        *[f"--gin_bindings={b}" for b in bindings],
    ]


TRAIN_CASES = {
    "unknown configurable": (["transfomer.n_layers = 3"], "transfomer"),
    "misspelled field": (["transformer.n_layer = 3"], "n_layers"),
    "heads do not divide": (["transformer.n_heads = 3"], "transformer.n_heads = 3"),
    "negative lr": (["hparams.lr = -1.0"], "hparams.lr"),
    "nan lr": (["hparams.lr = float('nan')"], "hparams.lr"),
    "negative weight decay": (["hparams.wd = -0.1"], "hparams.wd"),
    "unknown log level": (["experiment.log_level = 'LOUD'"], "experiment.log_level"),
    "bad nonfinite policy": (["hparams.nonfinite_policy = 'ignore'"], "nonfinite_policy"),
    "batch not a multiple": (["hparams.per_gpu_batch_size = 5"], "per_gpu_batch_size"),
    "budget under one batch": (["experiment.total_train_samples = 1"], "total_train_samples"),
    "num_epochs is not a budget here": (["experiment.num_epochs = 2"], "num_epochs"),
    "missing manifest": (
        ["text_untokenized.dataset_manifest = ['/nowhere/manifest.jsonl']"],
        "/nowhere/manifest.jsonl",
    ),
    "tokenizer path is a file": (["text_untokenized.tokenizer = 'README.md'"], "README.md"),
    "max_seq_len under seq_len": (["transformer.max_seq_len = 16"], "max_seq_len"),
    "mesh larger than the machine": (["distributed.fsdp_parallelism = 4", "distributed.data_parallelism = 1"], "4"),
    "two -1 mesh axes": (["distributed.fsdp_parallelism = -1"], "-1"),
    "validation without held-out data": (["experiment.total_val_samples = 8"], "val_dataset_manifest"),
    "bad-sample fraction out of range": (["text_untokenized.max_bad_sample_fraction = 2.0"], "max_bad_sample_fraction"),
    "unknown model type reference": (["experiment.model = @transformer_xl()"], "transformer_xl"),
    "hf checkpoint that is not there": (
        ["experiment.model = @transformer_hf()", "transformer_hf.hf_pretrained = '/nowhere/llm'"],
        "/nowhere/llm",
    ),
    "resume from a run that is not there": (["transformer.resume_from_checkpoint = '/nowhere/run'"], "/nowhere/run"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_train_bad_config(case, tmp_path):
    bindings, culprit = TRAIN_CASES[case]
    _fails_cleanly(_train(tmp_path, *bindings), culprit)
    assert not os.path.exists(os.path.join(tmp_path, "run", "checkpoints"))  # nothing trained


def test_train_missing_gin_file_and_bad_flags(tmp_path):
    _fails_cleanly(["-m", "launch.train", "--gin_file=gin_configs/quickstrat.gin"], "quickstrat.gin")
    _fails_cleanly([*QUICK, "--bogus_flag=1"], "bogus_flag")
    _fails_cleanly([*QUICK, "stray_argument"], "stray_argument")


def test_train_refuses_a_changed_rerun_and_keeps_the_run(llm_run, tmp_path):
    before = sorted(os.listdir(os.path.join(llm_run, "checkpoints")))
    args = [a for a in tiny_train_command(llm_run, 2, ["hparams.lr = 0.5"])[1:]]
    _fails_cleanly(args, "hparams.lr: 0.003 -> 0.5")
    assert sorted(os.listdir(os.path.join(llm_run, "checkpoints"))) == before


RUN_CASES = {
    "generate": (["launch.generate", "--prompt=hi"], None),
    "caption": (["launch.caption"], "README.md"),
    "eval_caption": (["launch.eval_caption"], None),
    "sample_sd": (["launch.sample_sd"], None),
    "eval_sd": (["launch.eval_sd"], None),
    "eval_policy": (["launch.eval_policy"], None),
    "export_hf": (["launch.export_hf"], "--out_dir={tmp}/hf"),
}


@pytest.mark.parametrize("name", sorted(RUN_CASES))
def test_run_commands_on_a_missing_run_name_the_path(name, tmp_path):
    (module, *extra), arg = RUN_CASES[name]
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    args = ["-m", module, f"--run_dir={empty}", *extra] + ([arg.format(tmp=tmp_path)] if arg else [])
    tail = _fails_cleanly(args, empty)
    assert "resume_from_checkpoint" not in tail  # the user gave --run_dir


WRONG_KIND = {
    "caption": (["launch.caption", "README.md"], "captioning needs a run of vlm"),
    "eval_caption": (["launch.eval_caption"], "captioning needs a run of vlm"),
    "sample_sd": (["launch.sample_sd"], "not stable_diffusion"),
    "eval_sd": (["launch.eval_sd"], "not stable_diffusion"),
    "eval_policy": (["launch.eval_policy"], "not a diffusion_policy"),
    "export_hf": (["launch.export_hf", "--out_dir=/tmp/never-written-by-this-test"], "transformer_hf"),
}


@pytest.mark.parametrize("name", sorted(WRONG_KIND))
def test_run_commands_on_the_wrong_kind_of_run(name, llm_run):
    (module, *extra), culprit = WRONG_KIND[name]
    tail = _fails_cleanly(["-m", module, f"--run_dir={llm_run}", *extra], culprit)
    assert "'transformer'" in tail or "transformer" in tail
    assert not os.path.exists("/tmp/never-written-by-this-test")


def test_caption_of_a_missing_image_names_it(llm_run):
    _fails_cleanly(["-m", "launch.caption", f"--run_dir={llm_run}", "/nowhere/image.png"], "/nowhere/image.png")


def test_required_flags_and_bad_values(tmp_path):
    _fails_cleanly(["-m", "launch.generate"], "--run_dir")
    _fails_cleanly(["-m", "launch.eval_policy", "--run_dir=x", "--num_episodes=many"], "num_episodes")


def test_convert_hf_from_a_directory_without_a_checkpoint_writes_nothing(tmp_path):
    empty, out = str(tmp_path / "empty_hf"), str(tmp_path / "converted")
    os.makedirs(empty)
    tail = _fails_cleanly(["-m", "launch.convert_hf", f"--hf_pretrained={empty}", f"--output_dir={out}"], empty)
    assert out not in tail  # the source is blamed, not the output directory
    assert not os.path.exists(out) and not [p for p in os.listdir(tmp_path) if p.startswith("converted")]


def test_make_tiny_datasets_rejects_stray_arguments():
    _fails_cleanly(["-m", "launch.make_tiny_datasets", "--out_dir=/tmp/unused-by-this-test", "extra"], "extra")


def test_traceback_on_request(tmp_path):
    env = {**subprocess_env(), "VLA_FOUNDRY_TRACEBACK": "1"}
    proc = subprocess.run(
        [sys.executable, *_train(tmp_path, "hparams.lr = -1.0")], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "hparams.lr" in proc.stderr


def test_tiny_data_is_where_the_cases_expect_it():
    assert os.path.isfile(os.path.join(TINY, "text_untokenized", "manifest.jsonl"))


def test_ctrl_c_before_the_loop_is_one_line_and_status_130(tmp_path):
    """SIGINT while the run is still being built (before the loop's own handler) exits 130 with one line."""
    import signal
    import time

    def default_sigint() -> None:  # a test worker may run with SIGINT ignored, which a child would inherit
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    proc = subprocess.Popen(
        [sys.executable, *_train(tmp_path)],
        cwd=ROOT,
        env=subprocess_env(),
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    time.sleep(1.5)  # past interpreter start-up, inside absl's main (imports, gin, model build)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, (proc.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]


_SIGINT_IN_GC_CALLBACK = """
import gc, signal, sys, time
from vla_foundry_jax import cli

def main(argv):
    def land_here(phase, info):  # the signal handler runs inside a gc callback, which swallows its SystemExit
        gc.callbacks.remove(land_here)
        signal.raise_signal(signal.SIGINT)
    gc.callbacks.append(land_here)
    gc.collect()
    time.sleep(60)
    print("still running", flush=True)

cli.run(main)
"""


def test_ctrl_c_swallowed_by_a_gc_callback_still_exits_130_at_once_without_a_traceback():
    """Where XLA's gc callback eats the handler's SystemExit, the unraisable hook exits, not the 10 s grace timer."""
    import time

    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", _SIGINT_IN_GC_CALLBACK], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True
    )
    assert proc.returncode == 130, (proc.returncode, proc.stderr[-3000:])
    assert time.monotonic() - start < 8.0, "exited by the grace timer, not when the exit was swallowed"
    assert proc.stderr.strip() == "interrupted (Ctrl-C); exiting", proc.stderr[-3000:]
    assert "still running" not in proc.stdout


def test_convert_hf_to_an_object_store_url_is_refused_not_written_locally(tmp_path):
    """The conversion assembles its output by renames on a local disk: a bucket URL is one error, no ``./s3:`` dir."""
    tail = _fails_cleanly(
        ["-m", "launch.convert_hf", f"--hf_pretrained={tmp_path}", "--output_dir=s3://bucket/converted"],
        "--output_dir='s3://bucket/converted'",
        cwd=str(tmp_path),
    )
    assert "local directory" in tail
    assert not os.path.exists(tmp_path / "s3:")
