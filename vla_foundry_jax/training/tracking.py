"""Metrics sinks of a run: ``<output_dir>/metrics.jsonl`` (one JSON object per logged step), TensorBoard events and,
when ``experiment.wandb_project`` is set, a Weights & Biases run.

Only process 0 writes. A tracker that fails during training (wandb's service, a full disk under TensorBoard) is
warned about once and dropped; training goes on. Problems that can be seen before training (wandb asked for but
not installed, online mode without an API key) are a :class:`TrackingError` raised by :func:`check_tracking`.

On object storage, where an object cannot be appended to, process 0 keeps the whole metrics.jsonl in memory and
rewrites the object (one atomic PUT) at most every ``REMOTE_FLUSH_S`` seconds, before each checkpoint and at close;
TensorBoard writes its event file on local disk (under ``VLA_FOUNDRY_CACHE``) and that file is uploaded at the same
moments. A run killed between flushes loses at most those seconds of records; the resumed run logs again from its
checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging as std_logging
import netrc
import os
import time
import urllib.parse
import uuid
from typing import Any

import jax
from absl import logging

from vla_foundry_jax import paths
from vla_foundry_jax.errors import VLAFoundryError
from vla_foundry_jax.params import TrainExperimentParams

WANDB_RUN_ID_FILE = "wandb_run_id.txt"
OFFLINE_MODES = ("offline", "dryrun", "disabled")
REMOTE_FLUSH_S = 10.0


class TrackingError(VLAFoundryError):
    """Experiment tracking was asked for but cannot start (package missing, no credentials)."""


def tag(name: str) -> str:
    """The dashboard name of a metrics.jsonl key: ``val_loss`` -> ``val/loss``, ``loss`` -> ``train/loss``."""
    return f"val/{name[4:]}" if name.startswith("val_") else f"train/{name}"


def check_tracking(exp: TrainExperimentParams) -> None:
    """Raise :class:`TrackingError` when ``experiment.wandb_project`` is set but wandb cannot run: the package is
    missing, or the mode is online and there is no API key (``WANDB_API_KEY`` or a ``wandb login`` netrc entry)."""
    if not exp.wandb_project or jax.process_index() != 0:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise TrackingError(
            f"experiment.wandb_project = {exp.wandb_project!r} needs the wandb package, which is not installed: "
            "pip install '.[wandb]' (or pip install wandb), or unset experiment.wandb_project."
        ) from None
    mode = os.environ.get("WANDB_MODE", "online").lower()
    if mode in OFFLINE_MODES or os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return
    if not _netrc_has_key(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")):
        raise TrackingError(
            f"experiment.wandb_project = {exp.wandb_project!r} logs online (WANDB_MODE={mode!r}) but no wandb API key "
            "was found: run `wandb login`, set WANDB_API_KEY, or set WANDB_MODE=offline (sync later with "
            "`wandb sync`)."
        )


def _netrc_has_key(base_url: str) -> bool:
    host = urllib.parse.urlparse(base_url).hostname or base_url
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def input_bound(*, data_wait_s: float, step_time_s: float, compute_s: float) -> bool:
    """Whether the data pipeline, not the device, sets the pace of a log window: more than half of the step time
    waits for batches, and longer than the device takes for a step."""
    return data_wait_s > 0.5 * step_time_s and data_wait_s > compute_s


class JsonlSink:
    """metrics.jsonl: appended and flushed per record locally; kept whole and rewritten by ``flush`` on a store."""

    def __init__(self, output_dir: str):
        self.path = paths.join(output_dir, "metrics.jsonl")
        self.remote = paths.is_remote(output_dir)
        if self.remote:
            self._records = paths.read_text(self.path) if paths.exists(self.path) else ""
        else:
            os.makedirs(output_dir, exist_ok=True)
            self._f = open(self.path, "a")

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record) + "\n"
        if self.remote:
            self._records += line
        else:
            self._f.write(line)
            self._f.flush()

    def flush(self) -> None:
        if self.remote:
            paths.write_text(self.path, self._records)

    def close(self) -> None:
        self.flush()
        if not self.remote:
            self._f.close()


class TensorBoardSink:
    """Event files in ``<output_dir>/tensorboard``; for a run on a store, written under the local cache and
    uploaded by ``flush``."""

    def __init__(self, output_dir: str):
        from tensorboardX import SummaryWriter

        self.output_dir = output_dir
        self.remote = paths.is_remote(output_dir)
        if self.remote:
            digest = hashlib.sha1(paths.normalize(output_dir).encode()).hexdigest()[:16]
            self.local_dir = os.path.join(paths.cache_root(), "runs", digest, "tensorboard")
        else:
            self.local_dir = os.path.join(output_dir, "tensorboard")
        self._tb = SummaryWriter(self.local_dir)

    def write(self, record: dict[str, Any]) -> None:
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                self._tb.add_scalar(tag(k), v, record["step"])

    def flush(self) -> None:
        if not self.remote:
            return
        self._tb.flush()
        for root, _, names in os.walk(self.local_dir):
            for name in names:
                full = os.path.join(root, name)
                rel = os.path.relpath(full, self.local_dir).replace(os.sep, "/")
                with open(full, "rb") as f:
                    paths.write_bytes(paths.join(self.output_dir, "tensorboard", rel), f.read())

    def close(self) -> None:
        self._tb.close()
        self.flush()


class WandbSink:
    """One wandb run per output_dir: its id is kept in ``<output_dir>/wandb_run_id.txt`` and reused on resume."""

    def __init__(self, output_dir: str, exp: TrainExperimentParams, gin_config: str | None):
        import wandb

        id_path = paths.join(output_dir, WANDB_RUN_ID_FILE)
        if paths.exists(id_path):
            run_id = paths.read_text(id_path).strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            paths.write_text(id_path, run_id + "\n")
        config = {**exp.to_dict(), "gin_config": gin_config or ""}
        self.run = wandb.init(
            project=exp.wandb_project,
            entity=exp.wandb_entity,
            name=exp.wandb_run_name or exp.name or paths.basename(output_dir),
            tags=list(exp.wandb_tags) or None,
            group=exp.wandb_group,
            id=run_id,
            resume="allow",
            config=config,
            # the run's files beside the run's (a local run), unless WANDB_DIR says otherwise
            dir=None if os.environ.get("WANDB_DIR") or paths.is_remote(output_dir) else output_dir,
            reinit="create_new",
        )
        # A resumed run logs steps it already logged (from the last checkpoint on): a custom x-axis accepts them,
        # wandb's own step would drop them.
        self.run.define_metric("step")
        self.run.define_metric("train/*", step_metric="step")
        self.run.define_metric("val/*", step_metric="step")

    def write(self, record: dict[str, Any]) -> None:
        data = {tag(k): v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        self.run.log({"step": record["step"], **data})

    def close(self) -> None:
        self.run.finish()

    def abort(self) -> None:
        """After a failure (already warned about): release wandb without its own error reports, which would
        repeat ours as tracebacks (its logger, its exit hook)."""
        import wandb

        std_logging.getLogger("wandb").disabled = True
        for release in (lambda: self.run.finish(exit_code=1), wandb.teardown):
            try:
                release()
            except Exception:  # the service is gone: nothing left to release
                pass


class MetricsWriter:
    """Every sink of a run behind one ``write(step, metrics)``; on processes other than 0 it does nothing.

    ``exp`` with ``wandb_project`` set adds a wandb run (config: ``exp`` and ``gin_config``). A sink that fails
    (to start or to write) is warned about and dropped, except metrics.jsonl, whose failure is the run's.
    """

    def __init__(
        self,
        output_dir: str,
        *,
        tensorboard: bool = True,
        exp: TrainExperimentParams | None = None,
        gin_config: str | None = None,
    ):
        self.enabled = jax.process_index() == 0
        self._jsonl: JsonlSink | None = None
        self._trackers: dict[str, Any] = {}
        self._remote = paths.is_remote(output_dir)
        self._flushed = 0.0
        if not self.enabled:
            return
        self._jsonl = JsonlSink(output_dir)
        if tensorboard:
            self._start("tensorboard", lambda: TensorBoardSink(output_dir))
        if exp is not None and exp.wandb_project:
            self._start("wandb", lambda: WandbSink(output_dir, exp, gin_config))

    def _start(self, name: str, make: Any) -> None:
        try:
            self._trackers[name] = make()
        except Exception as e:  # tracking never stops training
            logging.warning("%s tracking could not start and is off for this run: %s: %s", name, type(e).__name__, e)

    @property
    def trackers(self) -> list[str]:
        return list(self._trackers)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        self._jsonl.write(record)
        for name, sink in list(self._trackers.items()):
            try:
                sink.write(record)
            except Exception as e:  # tracking never stops training
                logging.warning(
                    "%s tracking failed at step %d and is off for the rest of the run (metrics.jsonl still has "
                    "every metric): %s: %s",
                    name,
                    step,
                    type(e).__name__,
                    e,
                )
                self._trackers.pop(name, None)
                if hasattr(sink, "abort"):
                    sink.abort()
                else:
                    self._close_quietly(name, sink)
        if self._remote and time.monotonic() - self._flushed >= REMOTE_FLUSH_S:
            self.flush()

    def flush(self) -> None:
        """Bring a store's metrics.jsonl and TensorBoard events up to date (local files flush per write)."""
        if not (self.enabled and self._remote):
            return
        self._jsonl.flush()
        tb = self._trackers.get("tensorboard")
        if tb is not None:
            try:
                tb.flush()
            except Exception as e:  # tracking never stops training
                logging.warning("tensorboard upload failed and is off for this run: %s: %s", type(e).__name__, e)
                self._trackers.pop("tensorboard", None)
        self._flushed = time.monotonic()

    def _close_quietly(self, name: str, sink: Any) -> None:
        self._trackers.pop(name, None)
        try:
            sink.close()
        except Exception as e:  # tracking never stops training
            logging.warning("%s tracking did not close cleanly: %s: %s", name, type(e).__name__, e)
            if hasattr(sink, "abort"):
                sink.abort()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        for name, sink in list(self._trackers.items()):
            self._close_quietly(name, sink)


def _scalar(v: Any) -> Any:
    try:
        return float(v)
    except (TypeError, ValueError):
        return v
