"""Orbax checkpoints of a run: ``<output_dir>/checkpoints/<step>/`` with four items.

* ``model``  - every parameter (trainable and frozen) as a flat ``{"dotted.path": array}`` tree; weights-only
  and per-sub-model restores read just the names they need (``partial_restore``).
* ``train``  - step, optimizer state, EMA weights, RNG and non-parameter model state: a full resume.
* ``params`` - the resolved experiment params (JSON): a checkpoint rebuilds its model with no gin file.
* ``data``   - the data iterator's state (JSON), so a resumed run reads exactly the batches it would have.

Orbax writes each step into a temporary directory and renames it when complete, so a crash mid-save
leaves the previous checkpoint as the latest usable one. Resuming takes the newest step that restores
completely: newer steps that do not (truncated, zeroed or missing files) are moved to
``<output_dir>/checkpoints_corrupt/<step>`` (never deleted) and named in one warning. A background save that
fails raises ``CheckpointSaveError`` at the next ``check_for_errors`` (every training step), naming the directory
and the cause.

Runs on object storage: for ``gs://`` Orbax and TensorStore read and write the bucket directly (Orbax marks a
finished step with its own commit file, as it does on GCS everywhere). Orbax 0.12 cannot write ``s3://`` (its
TensorStore path comes out as ``s3:/bucket``), so an ``s3://`` run is staged: Orbax saves each step on local disk
(under ``VLA_FOUNDRY_CACHE``), then the step's files are uploaded and ``checkpoints/<step>.committed`` (the list of
files and sizes) is written last. Only steps with that marker count, so a process killed mid-upload leaves the last
committed step as the newest; reading a step downloads the listed files (size-checked) into a local copy first.
Staged runs are single-host (each host would stage to its own disk); pods write ``gs://``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from vla_foundry_jax import paths
from vla_foundry_jax.errors import VLAFoundryError
from vla_foundry_jax.params import TrainExperimentParams, params_from_dict

ITEMS = ("model", "train", "params", "data")


class CheckpointError(VLAFoundryError, ValueError):
    """A checkpoint path or content that cannot serve the requested restore."""


@dataclasses.dataclass
class Mismatch:
    """What keeps a strict weight load from filling a model: the one report of every loader (our Orbax runs here,
    outside checkpoints in :mod:`vla_foundry_jax.convert.engine`), worded the same whatever the source.

    ``missing``: source names the model needs but the source lacks; ``unexpected``: source names nothing uses;
    ``mismatched``: ``(source name, source shape, shape the model needs)``; ``unfilled``: model parameters (or
    rules) no source name fills.
    """

    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = dataclasses.field(default_factory=list)
    unfilled: list[str] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched or self.unfilled)

    def message(self, where: str, *, noun: str = "checkpoint", hint: str | None = None, limit: int = 20) -> str:
        """``where`` (e.g. ``"unet.hf_pretrained = 'dir'"``) and the names of each kind (``limit`` at most);
        ``noun`` names the source (``checkpoint`` / ``file``); ``hint`` (what to check) follows when names are
        missing, unexpected or mis-shaped."""
        lines = [f"{where} does not match the model:"]
        if self.mismatched:
            shown = [f"{name}: {noun} {have} vs model {want}" for name, have, want in self.mismatched[:limit]]
            lines.append(f"  shape mismatches ({len(self.mismatched)}): " + "; ".join(shown))
        for label, names in (
            (f"missing from the {noun}", self.missing),
            (f"in the {noun} but not used by the model", self.unexpected),
            ("model parameters no rule fills", self.unfilled),
        ):
            if names:
                lines.append(f"  {label} ({len(names)}): " + ", ".join(names[:limit]))
        if hint and (self.missing or self.unexpected or self.mismatched):
            lines.append(f"  {hint}")
        return "\n".join(lines)


class CheckpointSaveError(VLAFoundryError, RuntimeError):
    """Writing a checkpoint failed (disk full, permissions, ...); the message names the directory and the cause."""


CORRUPT_DIR = "checkpoints_corrupt"
_OS_CAUSES = re.compile(
    "|".join(
        re.escape(os.strerror(code))
        for code in (errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS, errno.EDQUOT, errno.EFBIG, errno.ENOTDIR)
    )
)


def error_cause(exc: BaseException) -> str:
    """One line for why an I/O call failed: the OS error if one is in the chain (also inside TensorStore's text),
    else the first lines of the innermost message."""
    chain, seen = [], set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, OSError) and e.strerror:
            return f"{e.strerror}" + (f": {e.filename}" if e.filename else "")
    for e in chain:
        found = _OS_CAUSES.search(str(e))
        if found:
            return found.group(0)
    inner = chain[-1]
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    return f"{type(inner).__name__}: {' / '.join(lines[:3])[:400]}"


def _handlers(compress_model: bool = True) -> dict[str, Any]:
    return {
        "model": ocp.PyTreeCheckpointHandler(use_compression=compress_model),
        "train": ocp.StandardCheckpointHandler(),
        "params": ocp.JsonCheckpointHandler(),
        "data": ocp.JsonCheckpointHandler(),
    }


def flat_params(state: Any) -> dict[str, Any]:
    """``{"dotted.path": leaf}`` for every variable of an ``nnx.State`` (leaf: array or abstract array)."""
    return {".".join(str(p) for p in path): var.get_value() for path, var in nnx.to_flat_state(state)}


def flatten_dict(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts (stored metadata, params JSON) -> ``{"a.b.c": leaf}`` in walk order."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten_dict(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def set_flat_params(state: Any, values: dict[str, Any]) -> Any:
    """A copy of ``state`` whose variables take ``values["dotted.path"]`` (absent names unchanged)."""
    flat = nnx.to_flat_state(state)
    leaves = []
    for path, var in flat:
        name = ".".join(str(p) for p in path)
        leaves.append(var.replace(values[name]) if name in values else var)
    return nnx.from_flat_state([(path, leaf) for (path, _), leaf in zip(flat, leaves, strict=True)])


class RunCheckpointer:
    """Saves and restores a run's checkpoints under ``<output_dir>/checkpoints``."""

    def __init__(
        self,
        output_dir: str,
        *,
        max_to_keep: int | None = None,
        async_save: bool = True,
        compress_model: bool = True,
    ):
        """``compress_model=False`` writes the ``model`` item without zstd: Orbax then streams each array from its
        own buffer instead of holding compressed copies of the whole model until the save commits (measured on a
        110M-parameter float32 model: +0.25x instead of +1.0x the model's bytes of host memory during the save;
        float weights barely compress, ~8%). Readers need no option: the format records it."""
        kind = paths.scheme(output_dir)
        self.location = paths.join(paths.normalize(output_dir), "checkpoints")  # what messages name
        self.remote = self.location if kind == "s3" else None  # staged: saved locally, then uploaded
        self.max_to_keep = max_to_keep
        self._upload: concurrent.futures.Future | None = None
        if kind == "gs":
            paths.configure_tensorstore()
        if self.remote:
            if jax.process_count() > 1:
                raise CheckpointError(
                    f"{self.location}: s3:// runs are staged on local disk and support one host; write a multi-host "
                    "run to gs:// (Orbax writes it directly) or to a filesystem every host shares."
                )
            self.directory = staging_dir(self.location)
            self._uploader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint-upload")
            self._sync_staging()
        else:
            self.directory = self.location
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_handlers(compress_model))
        self._in_flight: int | None = None  # the step of the save not yet known to have committed

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        if self.remote:
            return sorted(committed_steps(self.remote))
        return sorted(self.manager.all_steps())

    # ------------------------------------------------------------ staged (s3://) runs

    def _sync_staging(self) -> None:
        """Drop staged steps the store has not committed (a save or upload that never finished)."""
        committed = committed_steps(self.remote)
        if os.path.isdir(self.directory):
            for name in os.listdir(self.directory):
                step = int(name) if name.isdigit() else None
                if (
                    step is None
                    or step not in committed
                    or not _matches(os.path.join(self.directory, name), committed[step])
                ):
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def _stage(self, step: int) -> None:
        """Download the committed ``step`` into the staging directory (unless already there)."""
        files = committed_steps(self.remote).get(step)
        local = os.path.join(self.directory, str(step))
        if files is None or _matches(local, files):
            return
        paths.download_tree(paths.join(self.remote, str(step)), local, files)
        self.manager.reload()

    def _upload_step(self, step: int) -> None:
        remote = paths.join(self.remote, str(step))
        files = paths.upload_tree(os.path.join(self.directory, str(step)), remote)
        paths.write_text(paths.join(self.remote, f"{step}{COMMITTED}"), json.dumps({"files": files}))
        if self.max_to_keep:
            for old in sorted(committed_steps(self.remote))[: -self.max_to_keep]:
                paths.remove(paths.join(self.remote, f"{old}{COMMITTED}"))
                if paths.exists(paths.join(self.remote, str(old))):
                    paths.remove(paths.join(self.remote, str(old)), recursive=True)

    def _start_upload(self) -> None:
        if self.remote and self._in_flight is not None and self._upload is None:
            self._upload = self._uploader.submit(self._upload_step, self._in_flight)

    def save(
        self, step: int, state: dict[str, Any], experiment: TrainExperimentParams, data_state: dict[str, Any]
    ) -> None:
        """Start writing ``step`` (in the background when async); a failure of an earlier save raises here."""
        self.wait()  # Orbax waits for the previous save anyway; waiting here names the right step if it failed
        model = {**flat_params(state["params"]), **flat_params(state["frozen"])}
        train = {k: state[k] for k in ("step", "opt_state", "ema", "rng", "rest")}
        self._in_flight = step
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    model=ocp.args.PyTreeSave(model),
                    train=ocp.args.StandardSave(train),
                    params=ocp.args.JsonSave(experiment.to_dict()),
                    data=ocp.args.JsonSave(data_state),
                ),
            )
        except Exception as e:
            raise self._save_error(e) from e

    def check_for_errors(self) -> None:
        """Raise ``CheckpointSaveError`` now if a background save has failed; never waits for one in progress."""
        try:
            self.manager.check_for_errors()
            if self._in_flight is not None and not self.manager.is_saving_in_progress():
                if self.remote and self._upload is None:
                    self.manager.wait_until_finished()  # returns at once: the local save is over
                    self._start_upload()
                elif self._upload is None or self._upload.done():
                    self.wait()  # the save is over: returns at once, raising its error if it failed
        except CheckpointSaveError:
            raise
        except Exception as e:
            raise self._save_error(e) from e

    def _save_error(self, exc: BaseException) -> CheckpointSaveError:
        step, self._in_flight = self._in_flight, None
        self._upload = None
        where = paths.join(self.location, str(step)) if step is not None else self.location
        try:
            good = [s for s in self._committed_steps() if s != step]
        except paths.PathError:
            good = []
        kept = (
            f"the previous checkpoint {paths.join(self.location, str(good[-1]))} is intact"
            if good
            else "no earlier checkpoint exists"
        )
        return CheckpointSaveError(
            f"saving the checkpoint {where} failed: {error_cause(exc)}; {kept}. Free space or fix the directory, "
            f"then rerun the same command to resume."
        )

    def _committed_steps(self) -> list[int]:
        if self.remote:
            return sorted(committed_steps(self.remote))
        if not paths.isdir(self.directory):
            return []
        return sorted(int(d) for d in paths.listdir(self.directory) if d.isdigit())

    def restore_train(self, step: int, state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Full resume: every array of ``state`` from ``step``; returns (state, data iterator state)."""
        if self.remote:
            self._stage(step)
        params, frozen = restore_model_weights(
            paths.join(self.directory, str(step)), [state["params"], state["frozen"]]
        )
        abstract = {k: _abstract(state[k]) for k in ("step", "opt_state", "ema", "rng", "rest")}
        restored = self.manager.restore(
            step, args=ocp.args.Composite(train=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())
        )
        new_state = dict(state, **restored.train, params=params, frozen=frozen)
        return new_state, restored.data

    def restore_newest(self, state: dict[str, Any]) -> tuple[int | None, dict[str, Any], dict[str, Any] | None]:
        """Resume from the newest step that restores completely: ``(step, state, data state)``, or
        ``(None, state, None)`` when the run has no checkpoint yet.

        A step that fails while an older one restores is damaged (the same model reads the older one): such
        steps are moved to ``<output_dir>/checkpoints_corrupt/`` and named in one warning. When no step restores,
        nothing is moved (the cause is more likely a changed config than damage) and ``CheckpointError`` lists
        each step's failure."""
        failures: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            try:
                restored, data_state = self.restore_train(step, state)
                ok = True
            except Exception as e:  # any failure to read: judged against the older steps below
                failures.append((step, error_cause(e) if not isinstance(e, CheckpointError) else str(e)))
                ok = False
            if jax.process_count() > 1:  # every host must resume from the same step
                ok_here, ok = ok, bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))
                if ok_here and not ok:
                    failures.append((step, "it does not restore on another process"))
            if not ok:
                continue
            if failures:
                self._move_aside([s for s, _ in failures])
                corrupt = paths.join(paths.dirname(self.location), CORRUPT_DIR)
                logging.warning(
                    "checkpoint step(s) %s under %s do not restore and were moved to %s/ (not deleted); resuming "
                    "from step %d. Causes: %s",
                    ", ".join(str(s) for s, _ in failures),
                    self.location,
                    corrupt,
                    step,
                    "; ".join(f"step {s}: {why.splitlines()[0]}" for s, why in failures),
                )
            return step, restored, data_state
        if failures:
            lines = [f"no checkpoint under {self.location} restores into this run's model:"]
            lines += [f"  step {s}: {why}" for s, why in failures]
            lines.append(
                "  If the model or optimizer config changed, rerun with the config the run was started with (its "
                "config.gin); if these checkpoints are damaged, move them out of the directory to start over."
            )
            raise CheckpointError("\n".join(lines))
        return None, state, None

    def _move_aside(self, steps: Sequence[int]) -> None:
        if jax.process_index() == 0:
            corrupt = paths.join(paths.dirname(self.location), CORRUPT_DIR)
            paths.makedirs(corrupt)
            for step in steps:
                target, n = paths.join(corrupt, str(step)), 1
                while paths.exists(target):
                    target, n = paths.join(corrupt, f"{step}.{n}"), n + 1
                if self.remote:  # uncommit first: a kill in between leaves the step ignored, not half-moved
                    paths.remove(paths.join(self.remote, f"{step}{COMMITTED}"))
                    shutil.rmtree(os.path.join(self.directory, str(step)), ignore_errors=True)
                paths.move(paths.join(self.location, str(step)), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("vla_foundry_jax.checkpoint.move_aside")
        self.manager.reload()

    def wait(self) -> None:
        """Block until background saves (and, for a staged run, their uploads) finish; a failed one raises
        ``CheckpointSaveError``."""
        try:
            self.manager.wait_until_finished()
            self._start_upload()
            if self._upload is not None:
                self._upload.result()
        except Exception as e:
            raise self._save_error(e) from e
        self._upload = None
        self._in_flight = None

    def close(self) -> None:
        try:
            if self.remote:
                self.wait()
        finally:
            self.manager.close()
            if self.remote:
                self._uploader.shutdown()


COMMITTED = ".committed"
"""Suffix of the marker object ``checkpoints/<step>.committed`` that makes an uploaded (staged) step count."""


def write_weights_run(directory: str, params: Any, experiment: TrainExperimentParams) -> None:
    """A run holding only ``params`` (saved as step 0, uncompressed) and ``params.json``: what a converted or imported
    model becomes, so that every run reader (``sampling.load_run_model``, ``resume_from_checkpoint``) takes it.

    Uncompressed: the save then adds ~0.25x the model's bytes of host memory instead of ~1x (see RunCheckpointer).
    """
    state = {
        "params": params,
        "frozen": nnx.State({}),
        "step": jax.numpy.zeros((), jax.numpy.int32),
        "opt_state": {},
        "ema": {},
        "rng": jax.random.key_data(jax.random.key(0)),
        "rest": {},
    }
    checkpointer = RunCheckpointer(directory, async_save=False, compress_model=False)
    checkpointer.save(0, state, experiment, {})
    checkpointer.wait()
    checkpointer.close()
    with open(os.path.join(directory, "params.json"), "w") as f:
        f.write(experiment.to_json())


def staging_dir(location: str) -> str:
    """The local directory where Orbax saves the steps of the staged run ``location`` before upload."""
    digest = hashlib.sha1(location.encode()).hexdigest()[:16]
    name = f"{digest}-{paths.basename(paths.dirname(location))}"
    return os.path.join(paths.cache_root(), "runs", name, "checkpoints")


def committed_steps(ckpt_dir: str) -> dict[int, list[tuple[str, int]]]:
    """step -> (file, size) list of the committed steps of a staged ``checkpoints/`` directory on object storage."""
    if not paths.exists(ckpt_dir) and not paths.isdir(ckpt_dir):
        return {}
    out = {}
    for name in paths.listdir(ckpt_dir):
        if name.endswith(COMMITTED) and name[: -len(COMMITTED)].isdigit():
            record = json.loads(paths.read_text(paths.join(ckpt_dir, name)))
            out[int(name[: -len(COMMITTED)])] = [(f, int(n)) for f, n in record["files"]]
    return out


def _matches(local: str, files: list[tuple[str, int]]) -> bool:
    """Whether the local step directory holds exactly the listed files with the listed sizes."""
    if not os.path.isdir(local):
        return False
    have = {}
    for root, _, names in os.walk(local):
        for name in names:
            full = os.path.join(root, name)
            have[os.path.relpath(full, local).replace(os.sep, "/")] = os.path.getsize(full)
    return have == dict(files)


def readable_step_dir(step_dir: str) -> str:
    """A step directory Orbax can read: itself (local or gs://), or a size-checked local copy of a staged s3:// step."""
    if paths.scheme(step_dir) != "s3":
        if paths.scheme(step_dir) == "gs":
            paths.configure_tensorstore()
        return step_dir
    ckpt_dir, step = paths.dirname(step_dir), int(paths.basename(step_dir))
    files = committed_steps(ckpt_dir).get(step)
    if files is None:
        raise CheckpointError(f"{step_dir} is not a committed checkpoint (no {step}{COMMITTED} beside it).")
    local = os.path.join(staging_dir(ckpt_dir), str(step))
    if not _matches(local, files):
        paths.download_tree(step_dir, local, files)
    return local


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def resolve_step_dir(path: str) -> str:
    """A run directory, its ``checkpoints/`` directory or one step directory -> the step directory."""
    try:
        path = paths.normalize(path)
        found = paths.isdir(path)
    except paths.PathError as e:
        raise CheckpointError(str(e)) from None
    if not found:
        raise CheckpointError(
            f"{path} does not exist; give a run directory of ours, its checkpoints/ directory or a "
            "checkpoints/<step> directory."
        )
    names = set(paths.listdir(path))
    if {"model", "params"} <= names:
        if paths.scheme(path) == "s3" and paths.basename(path).isdigit():
            readable_step_dir(path)  # a staged step counts only when committed
        return path
    ckpt_dir = paths.join(path, "checkpoints") if "checkpoints" in names else path
    if paths.scheme(path) == "s3":
        steps = sorted(committed_steps(ckpt_dir))
    else:
        steps = sorted(
            int(d) for d in paths.listdir(ckpt_dir) if d.isdigit() and paths.isdir(paths.join(ckpt_dir, d, "model"))
        )
    if not steps:
        raise CheckpointError(
            f"{path} holds no finished checkpoint (expected {ckpt_dir}/<step>/model); give a run directory that has "
            "saved at least once."
        )
    return paths.join(ckpt_dir, str(steps[-1]))


def load_experiment_params(path: str) -> TrainExperimentParams:
    """The experiment params stored with a checkpoint (run, checkpoints or step directory)."""
    step_dir = readable_step_dir(resolve_step_dir(path))
    data = json.loads(paths.read_text(paths.join(step_dir, "params", "metadata")))
    return params_from_dict(data, TrainExperimentParams, family="config")


def stored_model_shapes(step_dir: str) -> dict[str, tuple[tuple[int, ...], Any]]:
    meta = ocp.PyTreeCheckpointer().metadata(paths.join(readable_step_dir(step_dir), "model"))
    tree = getattr(meta, "item_metadata", None) or getattr(meta, "tree", None) or meta
    return {k: (tuple(v.shape), v.dtype) for k, v in dict(tree).items()}


def _vocab_axes(states: Sequence[Any]) -> dict[str, int]:
    """dotted name -> index of the axis carrying the logical name ``vocab`` (token tables)."""
    out = {}
    for state in states:
        for path, var in nnx.to_flat_state(state):
            names = var.get_metadata().get("out_sharding") or ()
            if "vocab" in names:
                out[".".join(str(p) for p in path)] = list(names).index("vocab")
    return out


def restore_model_weights(
    path: str,
    states: Sequence[Any],
    *,
    target_prefix: str = "",
    source_prefix: str = "",
    grow_vocab: bool = False,
) -> list[Any]:
    """Restore parameters into ``states`` (the ``nnx.State`` parts of one model, possibly abstract).

    Every parameter named ``target_prefix + rest`` is read from the stored name ``source_prefix + rest``;
    others are returned unchanged. ``("", "")`` loads a whole model; ``("transformer.", "")`` starts a
    VLM's language model from an LLM run. Strict: a wanted name missing from the checkpoint, a shape
    mismatch, or a stored name under ``source_prefix`` that nothing consumes raises with the names listed.

    ``grow_vocab``: a token table (a parameter with a ``vocab`` axis) may be stored with fewer rows than
    the model has: the stored rows are copied and the extra rows keep the model's fresh initialisation
    (the original's ``resize_token_embeddings`` after loading an LLM into a VLM). ``states`` must then
    hold real arrays.
    """
    step_dir = readable_step_dir(resolve_step_dir(path))
    stored = stored_model_shapes(step_dir)
    vocab_axes = _vocab_axes(states) if grow_vocab else {}
    wanted: dict[str, Any] = {}  # stored name -> target leaf
    axis_of: dict[str, int] = {}  # stored name -> vocab axis, for tables that may grow
    for state in states:
        for name, leaf in flat_params(state).items():
            if name.startswith(target_prefix):
                src = source_prefix + name[len(target_prefix) :]
                wanted[src] = leaf
                if name in vocab_axes:
                    axis_of[src] = vocab_axes[name]

    def fits(n: str) -> bool:
        have, want = tuple(stored[n][0]), tuple(wanted[n].shape)
        if have == want:
            return True
        if n not in axis_of or len(have) != len(want):
            return False
        a = axis_of[n]
        return have[a] <= want[a] and have[:a] + have[a + 1 :] == want[:a] + want[a + 1 :]

    report = Mismatch(
        missing=sorted(set(wanted) - set(stored)),
        unexpected=sorted(n for n in set(stored) - set(wanted) if n.startswith(source_prefix)),
        mismatched=[
            (n, stored[n][0], tuple(wanted[n].shape)) for n in sorted(set(wanted) & set(stored)) if not fits(n)
        ],
    )
    if report:
        raise CheckpointError(
            report.message(
                f"checkpoint {step_dir}",
                hint="Build the model with the params the checkpoint was trained with (its params/ item holds them).",
            )
        )
    target = {n: _abstract_leaf(v, shape=stored[n][0]) for n, v in wanted.items()}
    values = ocp.PyTreeCheckpointer().restore(
        paths.join(step_dir, "model"),
        args=ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
        ),
    )
    for n, v in values.items():
        if tuple(v.shape) != tuple(wanted[n].shape):  # a grown token table: old rows over the fresh init
            index = tuple(slice(0, d) for d in v.shape)
            values[n] = wanted[n].at[index].set(v.astype(wanted[n].dtype))
    by_target = {target_prefix + n[len(source_prefix) :]: v for n, v in values.items()}
    return [set_flat_params(state, by_target) for state in states]


def _abstract_leaf(x: Any, shape: Sequence[int] | None = None) -> jax.ShapeDtypeStruct:
    shape = tuple(x.shape) if shape is None else tuple(shape)
    sharding = getattr(x, "sharding", None)
    if sharding is None or shape != tuple(x.shape):
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.ShapeDtypeStruct(shape, np.dtype(x.dtype), sharding=sharding)
