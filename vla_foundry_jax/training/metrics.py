"""Metrics sinks: ``<output_dir>/metrics.jsonl`` (one JSON object per logged step) and TensorBoard events.

On object storage, where an object cannot be appended to, process 0 keeps the whole metrics.jsonl in memory and
rewrites the object (one atomic PUT) at most every ``REMOTE_FLUSH_S`` seconds and at close; TensorBoard writes its
event file on local disk (under ``VLA_FOUNDRY_CACHE``) and that file is uploaded at the same moments. A run killed
between flushes loses at most those seconds of records; the resumed run logs again from its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import jax

from vla_foundry_jax import paths

REMOTE_FLUSH_S = 10.0


class MetricsWriter:
    """Writes on process 0 only; other processes get a no-op writer."""

    def __init__(self, output_dir: str, *, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        self._remote = paths.is_remote(output_dir)
        self._output_dir = output_dir
        self._flushed = 0.0
        if not self.enabled:
            return
        if self._remote:
            path = paths.join(output_dir, "metrics.jsonl")
            self._records = paths.read_text(path) if paths.exists(path) else ""
            digest = hashlib.sha1(paths.normalize(output_dir).encode()).hexdigest()[:16]
            self._tb_dir = os.path.join(paths.cache_root(), "runs", digest, "tensorboard")
        else:
            os.makedirs(output_dir, exist_ok=True)
            self._jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a")
            self._tb_dir = os.path.join(output_dir, "tensorboard")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(self._tb_dir)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        line = json.dumps(record) + "\n"
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    tag = f"val/{k[4:]}" if k.startswith("val_") else f"train/{k}"
                    self._tb.add_scalar(tag, v, step)
        if not self._remote:
            self._jsonl.write(line)
            self._jsonl.flush()
            return
        self._records += line
        if time.monotonic() - self._flushed >= REMOTE_FLUSH_S:
            self.flush()

    def flush(self) -> None:
        """Bring the object store's metrics.jsonl and TensorBoard events up to date (local files flush per write)."""
        if not (self.enabled and self._remote):
            return
        paths.write_text(paths.join(self._output_dir, "metrics.jsonl"), self._records)
        if self._tb is not None:
            self._tb.flush()
            for root, _, names in os.walk(self._tb_dir):
                for name in names:
                    full = os.path.join(root, name)
                    rel = os.path.relpath(full, self._tb_dir).replace(os.sep, "/")
                    with open(full, "rb") as f:
                        paths.write_bytes(paths.join(self._output_dir, "tensorboard", rel), f.read())
        self._flushed = time.monotonic()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        self.flush()
        if self._jsonl is not None:
            self._jsonl.close()


def _scalar(v: Any) -> Any:
    try:
        return float(v)
    except (TypeError, ValueError):
        return v
