"""Training params: ``hparams``, ``ema``, ``distributed`` and the top-level ``experiment``."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

from vla_foundry_jax.params.base import BaseParams, ParamsError, register_params
from vla_foundry_jax.params.data_params import DataParams
from vla_foundry_jax.params.model_params import ModelParams

PRECISIONS = ("amp_bfloat16", "amp_bf16", "amp", "pure_bf16", "fp32", "float32")
LR_SCHEDULERS = ("cosine", "const", "warmup_constant_decay")
NONFINITE_POLICIES = ("halt", "skip")
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable", "everything_saveable")


@register_params("hparams", family="config")
class HyperParams(BaseParams):
    """Optimisation hyper-parameters (the original's HyperParams).

    ``precision``: ``fp32``/``float32`` computes in float32; ``amp*`` keeps float32 parameters and
    optimizer state and computes in bfloat16 (the original's FSDP mixed-precision policy, the sound one;
    its non-FSDP path silently trains pure bf16); ``pure_bf16`` also stores parameters in bfloat16.
    """

    precision: str = "amp_bfloat16"
    global_batch_size: int = 512
    per_gpu_batch_size: int = 8  # per device
    seed: int = 42
    lr: float = 1e-4
    lr_scheduler: str = "cosine"
    warmup: str = "1000"  # < 1: fraction of total steps; else steps
    decay: str = "0.3"  # warmup_constant_decay only; same convention
    lr_cooldown_end: float = 0.0
    force_min_lr: float = 0.0
    optimizer: str = "adamw"
    wd: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    loss_function: str = "cross_entropy"
    z_loss_coefficient: float = 0.0
    grad_clip_norm: float | None = None
    grad_checkpointing: bool = False
    # (JAX) jax.checkpoint policy used when grad_checkpointing is on.
    remat_policy: str = "nothing_saveable"
    # (JAX) A step whose loss or gradient norm is not finite never updates the weights, optimizer state or EMA.
    # "halt": stop at the first such step (every checkpoint kept, nothing after it saved) and raise naming the step
    # and the last good checkpoint; "skip": drop that update, count it in metrics.jsonl (nonfinite_skipped), and
    # halt only after max_consecutive_nonfinite such steps in a row.
    nonfinite_policy: str = "halt"
    max_consecutive_nonfinite: int = 10

    def validate(self) -> None:
        for name, value, choices in (
            ("precision", self.precision, PRECISIONS),
            ("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS),
            ("optimizer", self.optimizer, ("adamw",)),
            ("loss_function", self.loss_function, ("cross_entropy", "mse")),
            ("remat_policy", self.remat_policy, REMAT_POLICIES),
            ("nonfinite_policy", self.nonfinite_policy, NONFINITE_POLICIES),
        ):
            if value not in choices:
                raise ParamsError(f"hparams.{name} = {value!r} is not supported; choose one of {list(choices)}.")
        for name in ("warmup", "decay"):
            try:
                value = float(getattr(self, name))
            except ValueError:
                raise ParamsError(f"hparams.{name} = {getattr(self, name)!r} must be a number as a string") from None
            if not math.isfinite(value) or value < 0:
                raise ParamsError(
                    f"hparams.{name} = {getattr(self, name)!r} must be >= 0 (a fraction of the run's steps below 1, "
                    "else a number of steps)."
                )
        for name, ok, rule in (
            ("lr", self.lr >= 0, ">= 0 (a negative lr trains by gradient ascent)"),
            ("wd", self.wd >= 0, ">= 0 (weight decay pulls weights towards 0)"),
            ("lr_cooldown_end", self.lr_cooldown_end >= 0, ">= 0"),
            ("force_min_lr", self.force_min_lr >= 0, ">= 0"),
            ("z_loss_coefficient", self.z_loss_coefficient >= 0, ">= 0"),
            ("beta1", 0 <= self.beta1 < 1, "in [0, 1)"),
            ("beta2", 0 <= self.beta2 < 1, "in [0, 1)"),
            ("eps", self.eps > 0, "> 0"),
            (
                "grad_clip_norm",
                self.grad_clip_norm is None or self.grad_clip_norm >= 0,
                ">= 0, or None for no clipping",
            ),
        ):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or not ok):
                raise ParamsError(f"hparams.{name} = {value} must be {rule}.")
        if self.lr_cooldown_end > self.lr:
            raise ParamsError(f"hparams.lr_cooldown_end = {self.lr_cooldown_end} must be <= hparams.lr = {self.lr}.")
        if self.global_batch_size <= 0 or self.per_gpu_batch_size <= 0:
            raise ParamsError("hparams.global_batch_size and hparams.per_gpu_batch_size must be positive.")
        if self.max_consecutive_nonfinite < 1:
            raise ParamsError(
                f"hparams.max_consecutive_nonfinite = {self.max_consecutive_nonfinite} must be >= 1 (the number of "
                f"non-finite steps in a row after which hparams.nonfinite_policy = 'skip' halts)."
            )

    @property
    def compute_dtype(self) -> str:
        return "float32" if self.precision in ("fp32", "float32") else "bfloat16"

    @property
    def param_dtype(self) -> str:
        return "bfloat16" if self.precision == "pure_bf16" else "float32"


@register_params("ema", family="config")
class EMAParams(BaseParams):
    """Exponential moving average of the weights: ``ema`` (adaptive, diffusers-style) or ``vanilla``."""

    enabled: bool = False
    type: str = "ema"
    alpha: float = 0.999
    update_after_step: int = 0
    inv_gamma: float = 1.0
    power: float = 0.75
    min_value: float = 0.0
    max_value: float = 0.9999

    def __post_init__(self) -> None:  # ``type`` here is the EMA kind, not a registry key
        super().__post_init__()
        if self.type not in ("ema", "vanilla"):
            raise ParamsError(f"ema.type = {self.type!r}; choose 'ema' (adaptive) or 'vanilla'.")


@register_params("distributed", family="config")
class DistributedParams(BaseParams):
    """Device mesh and multi-host runtime.

    The mesh has axes ``data``, ``fsdp``, ``tensor``; one size may be -1 to take the remaining devices.
    Multi-host: ``jax.distributed.initialize`` auto-detects TPU pods, SLURM and Open MPI; elsewhere set
    ``coordinator_address``/``num_processes``/``process_id`` (or the env variables ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``).
    """

    data_parallelism: int = -1
    fsdp_parallelism: int = 1
    tensor_parallelism: int = 1
    # "auto": join a multi-process run when the environment describes one; "always"/"never" force it.
    initialize: str = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def validate(self) -> None:
        sizes = (self.data_parallelism, self.fsdp_parallelism, self.tensor_parallelism)
        if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ParamsError(
                f"distributed mesh sizes (data, fsdp, tensor) = {sizes}: each must be positive, and at most one -1."
            )
        if self.initialize not in ("auto", "always", "never"):
            raise ParamsError(f"distributed.initialize = {self.initialize!r}; choose 'auto', 'always' or 'never'.")


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "FATAL")


@register_params("experiment", family="config")
class TrainExperimentParams(BaseParams):
    """One training run. ``output_dir`` is the run directory: running again with the same one resumes."""

    name: str | None = None
    output_dir: str | None = None
    log_every_n_steps: int = 20
    log_level: str = "INFO"
    total_train_samples: int | None = None
    num_epochs: int | None = None
    num_checkpoints: int = 5
    max_checkpoint_limit: int | None = None
    total_val_samples: int | None = None
    val_every_n_checkpoints: int = 1
    # (JAX) write checkpoints on a background thread.
    async_checkpointing: bool = True
    # (JAX) prompt and length of the text sample generated at the end of an LLM run (None: skip).
    sample_prompt: str | None = None
    sample_max_new_tokens: int = 32
    # (JAX) Weights & Biases: a project logs every metric of metrics.jsonl, the operative gin config and these
    # params to that project (process 0 only; ``pip install .[wandb]``; WANDB_MODE=offline / disabled honoured).
    # A rerun of the same output_dir resumes the same wandb run (its id is kept in <output_dir>/wandb_run_id.txt).
    wandb_project: str | None = None
    wandb_entity: str | None = None
    wandb_run_name: str | None = None  # None: the experiment name, else the output_dir's last part
    wandb_tags: tuple[str, ...] = ()
    wandb_group: str | None = None
    data: DataParams | None = None
    distributed: DistributedParams = dataclasses.field(default_factory=DistributedParams)
    ema: EMAParams = dataclasses.field(default_factory=EMAParams)
    hparams: HyperParams = dataclasses.field(default_factory=HyperParams)
    model: ModelParams | None = None

    def validate(self) -> None:
        if self.num_checkpoints <= 0:
            raise ParamsError(f"experiment.num_checkpoints must be positive, got {self.num_checkpoints}.")
        if self.max_checkpoint_limit is not None and self.max_checkpoint_limit <= 0:
            raise ParamsError("experiment.max_checkpoint_limit must be positive (or None to keep all).")
        if self.total_val_samples is not None and self.total_val_samples <= 0:
            raise ParamsError(f"experiment.total_val_samples must be positive (or None), got {self.total_val_samples}.")
        if self.val_every_n_checkpoints <= 0:
            raise ParamsError(
                f"experiment.val_every_n_checkpoints must be positive, got {self.val_every_n_checkpoints}."
            )
        if str(self.log_level).upper() not in LOG_LEVELS:
            raise ParamsError(f"experiment.log_level = {self.log_level!r}; choose one of {', '.join(LOG_LEVELS)}.")
        if self.log_every_n_steps <= 0:
            raise ParamsError(f"experiment.log_every_n_steps must be positive, got {self.log_every_n_steps}.")
        if self.num_epochs is not None:
            raise ParamsError(
                f"experiment.num_epochs = {self.num_epochs} is not supported as a budget: the run length is "
                "experiment.total_train_samples (steps = samples / hparams.global_batch_size). Remove num_epochs and "
                "set total_train_samples = epochs x the samples in your data (with data.allow_multiple_epochs = True "
                "for more than one epoch)."
            )
        if self.total_train_samples is not None and self.total_train_samples <= 0:
            raise ParamsError(f"experiment.total_train_samples must be positive, got {self.total_train_samples}.")
        wandb_only = ("wandb_entity", "wandb_run_name", "wandb_tags", "wandb_group")
        if not self.wandb_project and any(getattr(self, f) for f in wandb_only):
            given = [f"experiment.{f}" for f in wandb_only if getattr(self, f)]
            raise ParamsError(
                f"{', '.join(given)} set without experiment.wandb_project: name the wandb project to log to "
                "(experiment.wandb_project = 'my-project'), or drop them."
            )


def check_warmup(exp: TrainExperimentParams) -> None:
    """A warmup longer than the run never reaches ``hparams.lr``: say so, once per setting (a warning, not an
    error: short test and smoke runs keep their schedules). Called when the experiment is resolved for training."""
    hp = exp.hparams
    if exp.total_train_samples is None:
        return
    total_steps = exp.total_train_samples // hp.global_batch_size
    warmup = float(hp.warmup)
    if warmup >= 1 and total_steps > 0 and int(warmup) > total_steps:
        _warn_once(
            f"hparams.warmup = {hp.warmup!r} steps is longer than the run's {total_steps} steps "
            "(experiment.total_train_samples / hparams.global_batch_size): the learning rate never reaches "
            f"hparams.lr = {hp.lr} (it ends at {hp.lr * total_steps / int(warmup):.3g}). Lower hparams.warmup, or "
            "give it as a fraction of the run (e.g. '0.1')."
        )


@functools.cache
def _warn_once(message: str) -> None:
    logging.getLogger(__name__).warning(message)


def check_sequence_fits(model: ModelParams, data: DataParams) -> None:
    """A ``transformer`` language model (alone or inside a ``vlm``) reads ``data.seq_len`` tokens per sample (the
    inputs of ``seq_len + 1``-token rows): its ``max_seq_len`` must hold them. Raises ``ParamsError``; called when
    the experiment is resolved (``training.resolve``), so a mismatch fails before training starts, not at step 1.
    (Not in ``validate``: params objects may hold a partial combination, e.g. the default seq_len, until then.)"""
    lm = model if model.type == "transformer" else getattr(model, "transformer", None) if model.type == "vlm" else None
    if lm is None or getattr(lm, "type", None) != "transformer" or data.type == "robotics":
        return
    if lm.max_seq_len < data.seq_len:
        raise ParamsError(
            f"transformer.max_seq_len = {lm.max_seq_len} is smaller than {data.gin_name}.seq_len = {data.seq_len}: the "
            f"model reads {data.seq_len} tokens per sample. Raise transformer.max_seq_len to at least {data.seq_len} "
            f"or lower {data.gin_name}.seq_len."
        )
