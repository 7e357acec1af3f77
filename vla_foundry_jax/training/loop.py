"""The training loop: budget, data, resume, the jitted step, logging and checkpoints.

``train(experiment)`` runs one experiment on every process of a (possibly multi-host) run. The same
call with the same ``output_dir`` resumes from the newest checkpoint there that restores. Non-finite steps,
SIGTERM / SIGINT and failed saves are handled as ``training/reliability.py`` describes.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from vla_foundry_jax import checkpoint as ckpt_lib
from vla_foundry_jax import parallel, paths
from vla_foundry_jax.cpu_threads import pin_xla_cpu_workers
from vla_foundry_jax.data.pipeline import build_train_iterator
from vla_foundry_jax.models import load_weights
from vla_foundry_jax.models.build import submodels
from vla_foundry_jax.params import ParamsError, TrainExperimentParams
from vla_foundry_jax.registry import get_loss, model_record
from vla_foundry_jax.training import curves
from vla_foundry_jax.training.ema import model_from_state
from vla_foundry_jax.training.flops import peak_flops, step_flops
from vla_foundry_jax.training.optimizer import make_optimizer
from vla_foundry_jax.training.reliability import (
    NonFiniteError,
    NonFiniteMonitor,
    PreemptionWatcher,
    TrainingPreempted,
    skipped_so_far,
)
from vla_foundry_jax.training.resolve import resolve_experiment
from vla_foundry_jax.training.run_data import write_run_data
from vla_foundry_jax.training.state import ModelSpec, count_params, init_train_state, make_model_spec
from vla_foundry_jax.training.step import make_train_step
from vla_foundry_jax.training.tracking import MetricsWriter, check_tracking, input_bound
from vla_foundry_jax.training.validation import make_validator


@dataclasses.dataclass
class TrainResult:
    """What a finished ``train`` call leaves: the last logged metrics, the state and how to rebuild the model."""

    metrics: dict[str, Any]
    state: dict[str, Any]
    spec: ModelSpec
    experiment: TrainExperimentParams

    def model(self, *, use_ema: bool = False) -> Any:
        """The trained model; with ``use_ema`` its EMA weights (cast to the parameter dtypes) when the run kept them."""
        return model_from_state(self.spec, self.state, use_ema=use_ema)


@dataclasses.dataclass(frozen=True)
class Budget:
    total_steps: int
    accum_steps: int
    micro_batch_size: int  # global rows per micro-batch
    checkpoint_steps: tuple[int, ...]


def make_budget(exp: TrainExperimentParams, mesh: jax.sharding.Mesh) -> Budget:
    """Steps, accumulation and checkpoint steps from the experiment (reference §1.6, §5.1)."""
    hp = exp.hparams
    total_steps = exp.total_train_samples // hp.global_batch_size
    if total_steps <= 0:
        raise ParamsError(
            f"experiment.total_train_samples = {exp.total_train_samples} is less than one global batch "
            f"(hparams.global_batch_size = {hp.global_batch_size})."
        )
    shards = parallel.num_batch_shards(mesh)
    per_step = shards * hp.per_gpu_batch_size
    if hp.global_batch_size % per_step:
        raise ParamsError(
            f"hparams.global_batch_size = {hp.global_batch_size} must be a multiple of the batch shards "
            f"(data x fsdp = {shards}) times hparams.per_gpu_batch_size = {hp.per_gpu_batch_size} "
            f"(= {per_step}); the quotient is the number of gradient-accumulation steps."
        )
    if hp.global_batch_size % jax.process_count():
        raise ParamsError(
            f"hparams.global_batch_size = {hp.global_batch_size} must be divisible by the number of processes "
            f"({jax.process_count()})."
        )
    n = min(exp.num_checkpoints, total_steps)
    steps = tuple(sorted({round(k * total_steps / n) for k in range(1, n + 1)}))
    return Budget(total_steps, hp.global_batch_size // per_step, per_step, steps)


def default_output_dir(exp: TrainExperimentParams) -> str:
    if exp.output_dir:
        return exp.output_dir
    if exp.name:
        return os.path.join("experiments", exp.name)
    stamp = int(multihost_utils.broadcast_one_to_all(np.int64(time.time())))
    date = datetime.datetime.fromtimestamp(stamp).strftime("%Y_%m_%d-%H_%M_%S")
    return os.path.join(
        "experiments", f"{date}-model_{exp.model.type}-lr_{exp.hparams.lr}-bsz_{exp.hparams.global_batch_size}"
    )


def write_run_files(output_dir: str, exp: TrainExperimentParams, gin_config: str | None) -> None:
    if jax.process_index() != 0:
        return
    paths.makedirs(output_dir)
    write_run_data(output_dir, exp)
    if gin_config is not None:
        paths.write_text(paths.join(output_dir, "config.gin"), gin_config)
    paths.write_text(paths.join(output_dir, "params.json"), exp.to_json())


# Fields that change how or where a run executes, not what it computes: a rerun may change them freely. A changed
# mesh or host count in particular is never a changed experiment (resuming on another topology gives the same
# losses), nor is a run directory that was moved or copied.
OPERATIONAL_FIELDS = (
    "name",
    "output_dir",
    "distributed",
    "hparams.per_gpu_batch_size",
    "async_checkpointing",
    "log_every_n_steps",
    "log_level",
    "num_checkpoints",
    "max_checkpoint_limit",
    "total_val_samples",
    "val_every_n_checkpoints",
    "sample_prompt",
    "sample_max_new_tokens",
    "data.num_workers",
    "data.prefetch_factor",
    "data.max_bad_sample_fraction",
    "wandb_project",
    "wandb_entity",
    "wandb_run_name",
    "wandb_tags",
    "wandb_group",
)


def config_changes(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``field: stored -> current`` for every experiment field (operational ones aside) that differs."""
    a, b = ckpt_lib.flatten_dict(stored), ckpt_lib.flatten_dict(current)
    out = []
    for name in sorted(set(a) | set(b)):
        if any(name == f or name.startswith(f + ".") for f in OPERATIONAL_FIELDS):
            continue
        if a.get(name) != b.get(name):
            out.append(f"{name}: {a.get(name)!r} -> {b.get(name)!r}")
    return out


def check_rerun(output_dir: str, exp: TrainExperimentParams, *, allow_config_change: bool) -> None:
    """A rerun of an ``output_dir`` that holds a run continues that run: its experiment must be the same.

    Refuses a changed experiment (lr, budget, model, data, ...) with the list of changes, unless
    ``allow_config_change``, which continues under the new values with the changes in a warning.
    """
    path = paths.join(output_dir, "params.json")
    if not paths.exists(path):
        return
    stored = json.loads(paths.read_text(path))
    changes = config_changes(stored, json.loads(exp.to_json()))
    if not changes:
        return
    listing = "; ".join(changes[:12]) + (f"; and {len(changes) - 12} more" if len(changes) > 12 else "")
    if not allow_config_change:
        raise ParamsError(
            f"experiment.output_dir = {output_dir!r} already holds a run with a different experiment ({listing}). "
            "Rerunning an output_dir continues its run: use a new output_dir, restore the old values, or pass "
            "--allow_config_change to continue this run under the new ones."
        )
    logging.warning("continuing the run in %s under a changed experiment: %s", output_dir, listing)


def train(
    exp: TrainExperimentParams, *, gin_config: str | None = None, allow_config_change: bool = False
) -> TrainResult:
    """Run (or resume) the experiment; ``gin_config`` is written to ``<output_dir>/config.gin``.

    Rerunning the same ``output_dir`` continues its run (``check_rerun``: the experiment must be the same unless
    ``allow_config_change``).
    """
    parallel.initialize_distributed(exp.distributed)
    exp = resolve_experiment(exp)
    mesh = parallel.make_mesh(exp.distributed)
    pin_xla_cpu_workers()  # CPU backend: no slow steps after eval / checkpoint pauses (cpu_threads)
    budget = make_budget(exp, mesh)
    output_dir = default_output_dir(exp)
    paths.check_writable(output_dir, "experiment.output_dir")
    exp = exp.replace(output_dir=output_dir)
    check_rerun(output_dir, exp, allow_config_change=allow_config_change)
    check_tracking(exp)
    hp = exp.hparams
    logging.info(
        "mesh %s on %d devices (%d processes); %d steps, %d accumulation step(s), checkpoints at %s",
        dict(mesh.shape),
        jax.device_count(),
        jax.process_count(),
        budget.total_steps,
        budget.accum_steps,
        list(budget.checkpoint_steps),
    )

    spec = make_model_spec(exp.model, hp, mesh)
    optimizer = make_optimizer(hp, budget.total_steps)
    # Everything the run reads is checked before anything is written under output_dir.
    for path, child in submodels(exp.model):
        if child.resume_from_checkpoint:
            try:
                ckpt_lib.resolve_step_dir(child.resume_from_checkpoint)
            except ckpt_lib.CheckpointError as e:
                where = f"{path[:-1] or child.gin_name}.resume_from_checkpoint = {child.resume_from_checkpoint!r}"
                raise ckpt_lib.CheckpointError(f"{where}: {e}") from None
    validator = make_validator(exp, spec, get_loss(exp.model.type), mesh)
    iterator = build_train_iterator(
        exp.data,
        global_batch_size=hp.global_batch_size,
        num_batches=budget.total_steps,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    checkpointer = ckpt_lib.RunCheckpointer(
        output_dir, max_to_keep=exp.max_checkpoint_limit, async_save=exp.async_checkpointing
    )
    state = init_train_state(spec, optimizer, hp, use_ema=exp.ema.enabled)
    state["params"], state["frozen"] = load_weights(
        spec.params, [state["params"], state["frozen"]], top_level_resume=False
    )
    latest, state, data_state = checkpointer.restore_newest(state)
    top_resume = exp.model.resume_from_checkpoint
    if latest is not None:
        logging.info("resuming from %s/%d (same output_dir)", checkpointer.location, latest)
        ignored = [
            f"{p[:-1] or exp.model.gin_name}.resume_from_checkpoint"
            for p, c in submodels(exp.model)
            if c.resume_from_checkpoint
        ]
        if ignored:
            logging.warning(
                "%s already has checkpoints: the run continues from step %d and %s (which only seed a new run) "
                "are not read.",
                output_dir,
                latest,
                ", ".join(ignored),
            )
    elif top_resume and exp.model.resume_weights_only:
        logging.info("loading weights only from %s (fresh optimizer, step 0)", top_resume)
        state["params"], state["frozen"] = ckpt_lib.restore_model_weights(
            top_resume, [state["params"], state["frozen"]]
        )
    elif top_resume:
        step_dir = ckpt_lib.resolve_step_dir(top_resume)
        logging.info("resuming the full training state from %s", step_dir)
        other = ckpt_lib.RunCheckpointer(paths.dirname(paths.dirname(step_dir)), async_save=False)
        state, data_state = other.restore_train(int(paths.basename(step_dir)), state)
        other.close()
    write_run_files(output_dir, exp, gin_config)
    logging.info(
        "model %s: %d trainable, %d frozen parameters",
        exp.model.type,
        count_params(state["params"]),
        count_params(state["frozen"]),
    )

    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    train_step = make_train_step(
        spec,
        get_loss(exp.model.type),
        optimizer,
        hp,
        exp.ema,
        accum_steps=budget.accum_steps,
        total_steps=budget.total_steps,
        state_shardings=state_shardings,
    )
    if data_state is not None:
        iterator.set_state(data_state)

    start = int(jax.device_get(state["step"]))
    writer = MetricsWriter(output_dir, exp=exp, gin_config=gin_config)
    bar = tqdm(total=budget.total_steps, initial=start, disable=jax.process_index() != 0, desc="train")
    monitor = NonFiniteMonitor(hp, skipped_before=skipped_so_far(output_dir, start))
    run = _Run(budget, hp, writer, checkpointer, monitor, bar, iterator)
    last: dict[str, Any] = {}
    batch_check = model_record(exp.model.type).batch_check
    try:
        with PreemptionWatcher() as preemption:
            for step in range(start, budget.total_steps):
                t0 = time.perf_counter()
                host_batch = next(iterator)
                if batch_check is not None:
                    batch_check(exp.model, host_batch)
                if "input_ids" in host_batch:
                    run.tokens_per_step = hp.global_batch_size * (host_batch["input_ids"].shape[1] - 1)
                global_batch = parallel.host_batch_to_global(host_batch, mesh)
                run.data_wait += time.perf_counter() - t0
                done = step + 1
                if run.flops_per_step is None and step == start:
                    run.flops_per_step = _flops_or_none(train_step, state, global_batch)
                if done % exp.log_every_n_steps == 0 or done == budget.total_steps or step == start:
                    # A log step times the device alone: the queue drained before, the result awaited after.
                    jax.block_until_ready(state)
                    t0 = time.perf_counter()
                    state, metrics = train_step(state, global_batch)
                    jax.block_until_ready(metrics)
                    run.compute_s = time.perf_counter() - t0
                else:
                    state, metrics = train_step(state, global_batch)
                run.add(done, metrics)
                bar.update(1)
                checkpointer.check_for_errors()  # a failed background save stops the run now, not a save later
                stop = preemption.requested(done) and done < budget.total_steps  # the last step just finishes
                log_now = done % exp.log_every_n_steps == 0 or done == budget.total_steps or step == start or stop
                save_now = done in budget.checkpoint_steps or stop
                # Non-finite flags are read one step behind (the device keeps the next step queued), and all of
                # them before a log line or a save: no state after a non-finite step under 'halt' is ever saved.
                run.check(keep_newest=not (log_now or save_now))
                if log_now:
                    last = run.log()
                if save_now and done not in checkpointer.all_steps():
                    writer.flush()  # on object storage: the records up to a checkpoint are stored before it
                    t0 = time.perf_counter()
                    checkpointer.save(done, state, exp, iterator.get_state())
                    run.checkpoint_wait += time.perf_counter() - t0  # in the next record: its window holds it
                t0 = time.perf_counter()
                if done in budget.checkpoint_steps and validator is not None:
                    index = budget.checkpoint_steps.index(done) + 1
                    if validator.due(index):
                        val = validator(state)
                        writer.write(done, val)
                        logging.info("step %d validation: %s", done, " ".join(f"{k} {v:.4g}" for k, v in val.items()))
                if save_now:
                    curves.write_curves_quietly(output_dir)
                run.eval_wait += time.perf_counter() - t0
                if stop:
                    checkpointer.wait()
                    message = (
                        f"{preemption.signal_name}: stopped after step {done}/{budget.total_steps} and saved "
                        f"{run.last_checkpoint()}; run the same command again to continue."
                    )
                    logging.warning("%s", message)
                    raise TrainingPreempted(message, done)
            run.check(keep_newest=False)
        checkpointer.wait()
    except BaseException:
        run.close_quietly()
        raise
    bar.close()
    checkpointer.close()
    writer.close()
    if start >= budget.total_steps:
        logging.info("nothing to do: the run in %s already finished %d steps", output_dir, budget.total_steps)
    return TrainResult(last, state, spec, exp)


def _flops_or_none(train_step: Any, state: Any, batch: Any) -> float | None:
    """The step's FLOPs (``training.flops``); a model the counter cannot trace gets no MFU, never a failed run."""
    try:
        return step_flops(train_step, state, batch)
    except Exception as e:
        logging.warning("could not count the train step's FLOPs (no MFU in the log): %s: %s", type(e).__name__, e)
        return None


class _Run:
    """The loop's bookkeeping: step outputs waiting to be logged or checked, metrics records, the monitor."""

    def __init__(
        self,
        budget: Budget,
        hp: Any,
        writer: MetricsWriter,
        checkpointer: ckpt_lib.RunCheckpointer,
        monitor: NonFiniteMonitor,
        bar: Any,
        iterator: Any,
    ):
        self.budget = budget
        self.hp = hp
        self.writer = writer
        self.checkpointer = checkpointer
        self.monitor = monitor
        self.bar = bar
        self.iterator = iterator
        self.pending: list[tuple[int, dict[str, Any]]] = []  # (step, device outputs) not yet in metrics.jsonl
        self.unchecked: list[tuple[int, dict[str, Any]]] = []  # ... whose non-finite flag is not yet read
        self.tokens_per_step = 0
        self.t_last = time.perf_counter()
        # Host seconds of the current log window spent waiting for batches, in checkpoint saves and in validation
        # plus curves; the device seconds of the window's last step (timed alone).
        self.data_wait = self.checkpoint_wait = self.eval_wait = 0.0
        self.compute_s: float | None = None
        self.flops_per_step: float | None = None
        self.peak_flops = peak_flops(jax.devices()[0].device_kind)
        self.records = 0
        self.input_bound_warnings = 0

    def add(self, step: int, metrics: dict[str, Any]) -> None:
        self.pending.append((step, metrics))
        self.unchecked.append((step, metrics))

    def last_checkpoint(self) -> str | None:
        steps = self.checkpointer.all_steps()
        return paths.join(self.checkpointer.location, str(steps[-1])) if steps else None

    def _last_good_checkpoint(self) -> str | None:
        self.checkpointer.wait()  # in-flight saves hold states from before the bad step: let them commit
        return self.last_checkpoint()

    def check(self, *, keep_newest: bool) -> None:
        """Apply the non-finite policy to the unchecked steps (all, or all but the newest)."""
        while len(self.unchecked) > int(keep_newest):
            step, metrics = self.unchecked.pop(0)
            flags = jax.device_get({k: metrics[k] for k in ("nonfinite", "loss", "grad_norm")})
            try:
                self.monitor.observe(step, flags, self._last_good_checkpoint)
            except NonFiniteError:
                self.log()  # the bad step reaches metrics.jsonl before the run stops
                raise

    def log(self) -> dict[str, Any]:
        """One metrics.jsonl record for the pending steps (loss and norms: means over the finite steps)."""
        if not self.pending:
            return {}
        done = self.pending[-1][0]
        fetched = jax.device_get([m for _, m in self.pending])
        finite = [m for m in fetched if not int(m["nonfinite"])] or fetched
        dt = time.perf_counter() - self.t_last
        n = len(fetched)
        last = {k: float(np.mean([m[k] for m in finite])) for k in fetched[-1] if k != "nonfinite"}
        last["lr"] = float(fetched[-1]["lr"])
        last["nonfinite"] = float(sum(int(m["nonfinite"]) for m in fetched))  # steps of this record
        last["nonfinite_skipped"] = float(self.monitor.skipped)  # running total over the run
        # Samples the data pipeline skipped as corrupt so far (data.max_bad_sample_fraction), over every host.
        last["bad_samples"] = float(np.sum(multihost_utils.process_allgather(np.int64(self.iterator.bad_samples))))
        last.update(self._timing(n, dt))
        self.writer.write(done, last)
        mfu = f"{last['mfu']:.1%}" if "mfu" in last else "n/a"
        logging.info(
            "step %d/%d loss %.4f lr %.3e grad_norm %.3f tokens/s %.0f step %.3fs (data %.3fs, compute %.3fs, "
            "checkpoint %.3fs) mfu %s",
            done,
            self.budget.total_steps,
            last["loss"],
            last["lr"],
            last["grad_norm"],
            last["tokens_per_s"],
            last["step_time_s"],
            last["data_wait_s"],
            last.get("compute_s", float("nan")),
            last["checkpoint_s"],
            mfu,
        )
        self._check_input_bound(done, last)
        self.bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}")
        self.pending, self.t_last = [], time.perf_counter()
        self.data_wait = self.checkpoint_wait = self.eval_wait = 0.0
        self.compute_s = None
        self.records += 1
        return last

    def _timing(self, n: int, dt: float) -> dict[str, float]:
        """Where the window's ``dt`` seconds over ``n`` steps went, per step, and the throughput they give."""
        devices = jax.device_count()
        out = {
            "step_time_s": dt / n,
            "data_wait_s": self.data_wait / n,
            "checkpoint_s": self.checkpoint_wait / n,
            "eval_s": self.eval_wait / n,
            "samples_per_s": n * self.hp.global_batch_size / dt,
            "samples_per_s_per_device": n * self.hp.global_batch_size / dt / devices,
            "tokens_per_s": n * self.tokens_per_step / dt,
        }
        if self.compute_s is not None:
            out["compute_s"] = self.compute_s
        if self.tokens_per_step:
            out["tokens_per_s_per_device"] = out["tokens_per_s"] / devices
        if self.flops_per_step:
            achieved = n * self.flops_per_step / dt / devices
            out["tflops_per_s_per_device"] = achieved / 1e12
            if self.peak_flops:
                out["mfu"] = achieved / self.peak_flops
        return out

    def _check_input_bound(self, step: int, last: dict[str, float]) -> None:
        """Warn when a log window is input-bound (``tracking.input_bound``; the first window, which holds the
        compile and the pipeline's start, is left out). Said at most once every 10 such windows."""
        data, total, compute = last["data_wait_s"], last["step_time_s"], last.get("compute_s")
        if self.records == 0 or compute is None:
            return
        if not input_bound(data_wait_s=data, step_time_s=total, compute_s=compute):
            return
        if self.input_bound_warnings % 10 == 0:
            logging.warning(
                "input-bound at step %d: %.0f%% of the step time (%.3fs of %.3fs) waits for data while a step "
                "computes in %.3fs; raise data.num_workers / data.prefetch_factor or make samples cheaper to load.",
                step,
                100 * data / total,
                data,
                total,
                compute,
            )
        self.input_bound_warnings += 1

    def close_quietly(self) -> None:
        """On the way out of a stopped run: let in-flight saves commit (they hold good states), release files."""
        self.bar.close()
        self.writer.close()
        try:
            self.checkpointer.wait()
            self.checkpointer.close()
        except Exception:  # a failed save: the error already propagating says so
            pass
