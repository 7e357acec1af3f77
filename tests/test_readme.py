"""Every command README.md documents runs (issue 11, item 8).

The fenced ``bash`` blocks of README.md are read in order and each command runs as a subprocess in a scratch
directory that sees the repository's ``gin_configs/``, ``tiny_data/`` and ``benchmarks/`` (so ``runs/...`` paths are
fresh and later commands find what earlier ones wrote), with budgets shrunk to a few steps. A command that needs
what a test machine has not (the Hugging Face hub, a downloaded checkpoint, a GPU) carries a ``# needs: ...``
comment in README; those are not run, but their module and every ``--flag`` they pass must exist. Installs and the
test command itself are left to CI, which runs exactly them.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.fixtures.multidevice import subprocess_env
from tests.fixtures.paths import ROOT

README = os.path.join(ROOT, "README.md")
LINKED = ("gin_configs", "tiny_data", "benchmarks")
# Shrunk budgets: a few steps of a small batch, one checkpoint (appended last, so they win over the command's own).
TINY_TRAIN = [
    "experiment.total_train_samples = 8",
    "hparams.global_batch_size = 4",
    "hparams.per_gpu_batch_size = 4",
    "experiment.num_checkpoints = 1",
    "experiment.total_val_samples = None",
    "experiment.log_every_n_steps = 1",
]
# Evaluation and sampling flags that keep the documented commands short (flag -> value), by module.
TINY_FLAGS = {
    "launch.eval_policy": {"num_episodes": "2", "num_plot_samples": "2"},
    "launch.eval_sd": {"samples_per_color": "1", "num_steps": "2"},
    "launch.sample_sd": {"num_images": "2", "num_steps": "2"},
    "launch.eval_caption": {"limit": "8"},
    "launch.generate": {"max_new_tokens": "4"},
}
SKIPPED_PROGRAMS = ("pip", "python -m pytest")
WRITE = "write-file"  # a heredoc of README (``cat > FILE <<'TAG'``), written by the test
# README placeholders for what a reader brings, replaced by something the test makes: a LeRobot dataset.
PLACEHOLDERS = {"ORG/DATASET": "lerobot_src"}


def readme_commands() -> list[tuple[str, str | None]]:
    """``(command, needs)`` for every command of every fenced bash block, in order; ``needs`` is the text of its
    ``# needs: ...`` comment or None. Lines that continue with ``\\`` are joined; ``a && b`` gives two commands;
    lines that are not commands (comments, bare ``--flag`` fragments) are left out."""
    text = open(README).read()
    out = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S):
        lines = iter(block.replace("\\\n", " ").splitlines())
        for line in lines:
            heredoc = re.match(r"cat > (\S+) <<'(\w+)'$", line.strip())
            if heredoc:  # a file the commands below read: its lines up to the closing tag
                body = []
                for inner in lines:
                    if inner.strip() == heredoc.group(2):
                        break
                    body.append(inner)
                out.append((f"{WRITE} {heredoc.group(1)}\n" + "\n".join(body) + "\n", None))
                continue
            code, _, comment = line.partition("  #") if "  #" in line else (line, "", "")
            code = code.strip()
            if not code or code.startswith(("#", "--")):
                continue
            needs = re.search(r"needs:\s*(.+)", comment)
            for part in code.split("&&"):
                out.append((part.strip(), needs.group(1).strip() if needs else None))
    return out


def module_of(argv: list[str]) -> str | None:
    return argv[argv.index("-m") + 1] if "-m" in argv else None


def known_flags(module: str) -> set[str]:
    proc = subprocess.run(
        [sys.executable, "-m", module, "--helpfull"], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True
    )
    return set(re.findall(r"--(?:\[no\])?(\w+)", proc.stdout + proc.stderr))


def shrink(argv: list[str]) -> list[str]:
    module = module_of(argv)
    if module == "launch.train":
        return [*argv, *[f"--gin_bindings={b}" for b in TINY_TRAIN]]
    tiny = TINY_FLAGS.get(module, {})
    kept = [a for a in argv if not any(a.startswith(f"--{f}=") for f in tiny)]
    return [*kept, *[f"--{f}={v}" for f, v in tiny.items()]]


COMMANDS = readme_commands()


def test_readme_has_commands_and_every_one_is_classified():
    assert len(COMMANDS) >= 15
    for cmd, _ in COMMANDS:
        assert cmd.startswith(("python", "pip", "XLA_FLAGS=", "WANDB_MODE=", WRITE)), (
            f"README command of an unknown kind: {cmd}"
        )
        if "/models/" in cmd or "hf://" in cmd:
            assert dict(COMMANDS)[cmd], f"{cmd!r} reads a downloaded checkpoint: mark it '# needs: ...'"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    work = tmp_path_factory.mktemp("readme")
    for name in LINKED:
        os.symlink(os.path.join(ROOT, name), work / name)
    Image.fromarray(np.full((48, 48, 3), (200, 30, 30), np.uint8)).save(work / "some_image.png")
    from vla_foundry_jax.testbeds.tiny_lerobot import write_tiny_lerobot

    write_tiny_lerobot(str(work / PLACEHOLDERS["ORG/DATASET"]), num_episodes=10)
    return str(work)


def test_every_readme_command_runs(scratch):
    """All commands in README order (each later one may read what an earlier one wrote)."""
    ran = 0
    for cmd, needs in COMMANDS:
        if cmd.startswith(SKIPPED_PROGRAMS):
            continue
        if cmd.startswith(WRITE):
            head, _, body = cmd.partition("\n")
            with open(os.path.join(scratch, head.split()[1]), "w") as f:
                f.write(body)
            continue
        for placeholder, path in PLACEHOLDERS.items():
            cmd = cmd.replace(placeholder, path)
        env = subprocess_env()
        words = shlex.split(cmd)
        while words and re.match(r"^\w+=", words[0]):  # VAR=value prefixes
            key, _, value = words.pop(0).partition("=")
            env[key] = value
        if words[0] == "python":
            words[0] = sys.executable
        module = module_of(words)
        if needs and module is None:  # a script (benchmarks/...): it must exist
            script = next((w for w in words[1:] if w.endswith(".py")), None)
            assert script and os.path.isfile(os.path.join(ROOT, script)), cmd
            continue
        if needs:
            flags = {re.match(r"--(\w+)", a).group(1) for a in words if a.startswith("--")}
            missing = flags - known_flags(module)
            assert not missing, f"{cmd!r}: {module} has no flag(s) {sorted(missing)}"
            continue
        stdout_file = None
        if ">" in words:  # `command > FILE`: the command's stdout goes to FILE in the scratch directory
            stdout_file = os.path.join(scratch, words[words.index(">") + 1])
            words = words[: words.index(">")]
        proc = subprocess.run(shrink(words), cwd=scratch, env=env, capture_output=True, text=True, timeout=900)
        if stdout_file:
            with open(stdout_file, "w") as f:
                f.write(proc.stdout)
        assert proc.returncode == 0, f"{cmd}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, f"{cmd}\n{proc.stderr[-3000:]}"
        ran += 1
    assert ran >= 10
