"""What keeps a run trustworthy when things go wrong: the non-finite policy and preemption signals.

* ``NonFiniteMonitor`` reads the per-step ``nonfinite`` flag of the jitted step (which already dropped that
  update) and applies ``hparams.nonfinite_policy``: ``halt`` raises ``NonFiniteError`` at the first such step,
  ``skip`` counts them and raises after ``hparams.max_consecutive_nonfinite`` in a row.
* ``PreemptionWatcher`` turns SIGTERM / SIGINT into "finish this step, save, exit with ``EXIT_PREEMPTED``";
  a second SIGINT exits at once (status 130) without touching the checkpoints. On a multi-process run the hosts
  agree on the step through JAX's preemption sync (the coordination service), so they all save the same one.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import jax
from absl import logging
from jax.experimental import multihost_utils

from vla_foundry_jax import paths
from vla_foundry_jax.errors import VLAFoundryError
from vla_foundry_jax.params import HyperParams

# EX_TEMPFAIL: "a temporary failure; retry". The run saved a checkpoint and the same command continues it.
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED_AT_ONCE = 130


class NonFiniteError(VLAFoundryError, RuntimeError):
    """The loss or gradient norm stopped being finite; the message names the step and the last good checkpoint."""


class TrainingPreempted(SystemExit):
    """Raised by ``train`` after a SIGTERM / SIGINT once the checkpoint is saved. A ``SystemExit`` so that a CLI exits
    with ``EXIT_PREEMPTED`` and no traceback, and ``except Exception`` blocks do not swallow it."""

    def __init__(self, message: str, step: int):
        super().__init__(EXIT_PREEMPTED)
        self.message = message
        self.step = step

    def __str__(self) -> str:
        return self.message


class NonFiniteMonitor:
    """Host side of the non-finite guard: per-step flags in, counts out, ``NonFiniteError`` when the policy says."""

    def __init__(self, hparams: HyperParams, skipped_before: int = 0):
        self.policy = hparams.nonfinite_policy
        self.max_in_a_row = hparams.max_consecutive_nonfinite
        self.skipped = skipped_before  # running total over the run (continued from metrics.jsonl on resume)
        self.in_a_row = 0

    def observe(self, step: int, metrics: dict[str, Any], last_checkpoint: Callable[[], str | None]) -> None:
        """``metrics``: the fetched outputs of step ``step`` (1-based, the step just completed);
        ``last_checkpoint()``: the newest committed checkpoint, asked only when the run stops."""
        if not int(metrics["nonfinite"]):
            self.in_a_row = 0
            return
        self.skipped += 1
        self.in_a_row += 1
        what = f"loss = {float(metrics['loss'])}, gradient norm = {float(metrics['grad_norm'])}"
        if self.policy == "skip" and self.in_a_row < self.max_in_a_row:
            logging.warning(
                "step %d: non-finite %s; update skipped (%d in a row, %d in this run)",
                step,
                what,
                self.in_a_row,
                self.skipped,
            )
            return
        good = last_checkpoint()
        kept = f"the last good checkpoint is {good}" if good else "no checkpoint had been saved yet"
        fix = "lower hparams.lr, set hparams.grad_clip_norm, or check the data of that step"
        if self.policy == "halt":
            raise NonFiniteError(
                f"step {step}: non-finite {what}; training stopped (hparams.nonfinite_policy = 'halt'). That update "
                f"was dropped and nothing from step {step} on was saved; {kept}. To continue: {fix}, or set "
                f"hparams.nonfinite_policy = 'skip'."
            )
        raise NonFiniteError(
            f"steps {step - self.in_a_row + 1}-{step}: {self.in_a_row} non-finite steps in a row (last: {what}); "
            f"training stopped (hparams.max_consecutive_nonfinite = {self.max_in_a_row}). Those updates were "
            f"dropped; {kept}. To continue: {fix}."
        )


def skipped_so_far(output_dir: str, step: int) -> int:
    """The ``nonfinite_skipped`` total of the last metrics.jsonl record at or before ``step`` (0 if none): a
    resumed run continues the count."""
    total = 0
    path = paths.join(output_dir, "metrics.jsonl")
    try:
        text = paths.read_text(path) if paths.exists(path) else ""
    except OSError:
        return 0
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("step", step + 1) <= step and "nonfinite_skipped" in record:
            total = int(record["nonfinite_skipped"])
    return total


class PreemptionWatcher:
    """Catches SIGTERM and SIGINT for the duration of a ``with`` block; ``requested(step)`` says when to stop.

    One process: a signal sets a flag, read after each step. Several processes: SIGTERM is left to JAX's
    preemption notifier (it tells the coordination service, which picks one step for every host), SIGINT is
    forwarded to it as a SIGTERM, and ``requested`` asks ``multihost_utils.reached_preemption_sync_point``.
    A second SIGINT exits at once with status 130: Orbax commits a checkpoint by renaming a finished temporary
    directory, so the last committed one stays usable.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}
        self._multi = jax.process_count() > 1
        self._disabled = False

    def __enter__(self) -> PreemptionWatcher:
        if threading.current_thread() is not threading.main_thread():
            logging.warning("train() runs outside the main thread: SIGTERM / SIGINT will not save a checkpoint")
            return self
        signals = (signal.SIGINT,) if self._multi else (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signal is not None:
            if signum == signal.SIGINT:
                sys.stderr.write(
                    f"\n{name} again: exiting now without saving; the last committed checkpoint stays usable.\n"
                )
                sys.stderr.flush()
                os._exit(EXIT_INTERRUPTED_AT_ONCE)
            return
        self.signal = signum
        sys.stderr.write(
            f"\n{name}: finishing the current step and saving a checkpoint (Ctrl-C again exits at once).\n"
        )
        sys.stderr.flush()
        if self._multi:
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's notifier spreads it to every host

    def requested(self, step: int) -> bool:
        """Call after every step with the number of completed steps (the same on every host)."""
        if self._disabled:
            return False
        if self._multi:
            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError as e:  # jax_enable_preemption_service is off: no agreed step to save
                logging.warning("SIGTERM / SIGINT will not save a checkpoint on this multi-process run: %s", e)
                self._disabled = True
                return False
        return self.signal is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else "SIGTERM"
